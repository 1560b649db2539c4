"""Certificates: exact counts on hand-built outputs, each interval rule against enumeration,
and soundness on models trained briefly on real MNIST (no certified example broken by PGD)."""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import backend, certify, models
from polar_tf.config import Config
from polar_tf.frontend import PolarizingFrontEnd, Saturation, saturate

# ----------------------------------------------------------------------------- helpers


def _numpy(x) -> np.ndarray:
    return ops.convert_to_numpy(x)


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Every corner of the box [lo, hi] (one example of shape S): [2^size, *S]."""
    bits = np.array(list(itertools.product([0, 1], repeat=lo.size)), bool).reshape(-1, *lo.shape[1:])
    return np.where(bits, hi, lo).astype(np.float32)


def _random_box(rng: np.random.Generator, shape: tuple[int, ...], low: float = -1.0, high: float = 1.0):
    lo = rng.uniform(low, high, shape).astype(np.float32)
    hi = (lo + rng.uniform(0.0, high - low, shape)).astype(np.float32)
    return lo, hi


def _assert_rule_is_exact(layer, lo: np.ndarray, hi: np.ndarray, atol: float = 1e-5):
    """The layer's interval rule equals min/max over the corners of the input box."""
    outputs = _numpy(layer(_corners(lo, hi)))
    rule_lo, rule_hi = (_numpy(b)[0] for b in certify.layer_interval(layer, lo, hi))
    np.testing.assert_allclose(rule_lo, outputs.min(axis=0), atol=atol)
    np.testing.assert_allclose(rule_hi, outputs.max(axis=0), atol=atol)


def _one_hot_kernel(filters: int) -> np.ndarray:
    """Filter k picks one pixel of the 5x5 window (k-th of a fixed list), sign (-1)^k: what trained
    front ends converge to. z is then exactly +-(that pixel)."""
    offsets = [(2, 2), (1, 2), (2, 3), (3, 1), (0, 4)]
    kernel = np.zeros((5, 5, 1, filters), np.float32)
    for k in range(filters):
        row, col = offsets[k % len(offsets)]
        kernel[row, col, 0, k] = 1.0 if k % 2 == 0 else -1.0
    return kernel


def _small_model(kind: str, filters: int = 4, seed: int = 0) -> keras.Model:
    """build_model's model with a small front end (`filters` one-hot filters), saturation on."""
    keras.utils.set_random_seed(seed)
    model = models.build_model(Config(model=kind, num_filters=filters))
    frontend = models.get_frontend(model)
    if frontend is not None:
        frontend.kernel.assign(_one_hot_kernel(filters))
        frontend.set_saturation(True)
    return model


def _trained_baseline(mnist, examples: int = 2000) -> keras.Model:
    """The baseline trained one epoch on real MNIST."""
    model = _small_model("baseline")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    (x, y), _ = mnist
    model.fit(x[:examples], y[:examples], batch_size=64, epochs=1, verbose=0)
    return model


def _polarized_from(baseline: keras.Model) -> keras.Model:
    """A polarized model whose one-filter front end passes the pixels through the saturation,
    with the baseline's classifier: it classifies the ternarized image (no second training)."""
    model = _small_model("polarized", filters=1)
    for layer in model.layers:
        if layer.weights and not isinstance(layer, PolarizingFrontEnd):
            layer.set_weights(baseline.get_layer(layer.name).get_weights())
    return model


_PGD_BATCH = 32


def _pgd_broken(model, x, y, eps: float, steps: int = 10, restarts: int = 3, seed: int = 0) -> np.ndarray:
    """Which examples a margin-loss PGD breaks at any step of any restart (straight-through
    gradients through the saturation, as the layer defines them)."""
    n = len(x)
    # One batch shape for every call, as eager JAX compiles each new shape; the copies that fill
    # it are extra random restarts of their originals.
    x, y = np.resize(x, (_PGD_BATCH, *x.shape[1:])), np.resize(y, _PGD_BATCH)
    rng = np.random.default_rng(seed)
    lo, hi = np.maximum(x - eps, 0.0), np.minimum(x + eps, 1.0)
    one_hot = ops.one_hot(ops.convert_to_tensor(y), 10)

    def loss(images):
        logits = model(images)
        best_other = ops.max(logits - 1e4 * one_hot, axis=1)
        return ops.sum(best_other - ops.sum(logits * one_hot, axis=1))

    broken = np.zeros(len(x), bool)
    for restart in range(restarts):
        adv = x.copy() if restart == 0 else rng.uniform(lo, hi).astype(np.float32)
        for _ in range(steps):
            step = np.sign(_numpy(backend.gradient(loss, adv)))
            adv = np.clip(adv + 0.25 * eps * step, lo, hi).astype(np.float32)
            broken |= np.argmax(_numpy(model(adv)), axis=1) != y
    return np.bincount(np.arange(_PGD_BATCH) % n, weights=broken, minlength=n) > 0


@pytest.fixture(scope="module")
def trained_baseline(mnist):
    return _trained_baseline(mnist)


@pytest.fixture(scope="module")
def trained_polarized(trained_baseline):
    return _polarized_from(trained_baseline)


@pytest.fixture(scope="module")
def test_images(mnist):
    _, (x, y) = mnist
    return x[:200], y[:200]


# ----------------------------------------------------------------------------- exact counts


def test_changeable_is_exact_on_hand_built_intervals():
    z_lo = np.array([0.40, 0.45, 0.4999, 0.5, -0.60, -0.52, 0.10, 0.60, -1.0], np.float32)
    z_hi = np.array([0.45, 0.55, 0.4999, 0.5, -0.55, -0.45, 0.20, 0.90, 1.0], np.float32)
    expected = [False, True, False, True, False, True, False, False, True]
    # An interval that merely touches a jump counts (0.5 itself is conservative: f(0.5) = 0.5).
    np.testing.assert_array_equal(_numpy(certify.changeable(z_lo, z_hi, 0.5)), expected)
    s_lo, s_hi = certify.saturation_interval(z_lo, z_hi, 0.5)
    np.testing.assert_array_equal(_numpy(s_lo), [0, 0, 0, 0, -1, -1, 0, 1, -1])
    np.testing.assert_array_equal(_numpy(s_hi), [0, 1, 0, 1, -1, 0, 0, 1, 1])


def test_near_jump_is_the_issues_count():
    z = np.array([0.0, 0.35, 0.39, 0.41, 0.5, 0.59, 0.61, -0.4, -0.59, -0.75, 1.0], np.float32)
    expected = [False, False, False, True, True, True, False, True, True, False, False]
    np.testing.assert_array_equal(_numpy(certify.near_jump(z, 0.1, 0.5)), expected)


def _frontend_model(kernel: np.ndarray, jump: float) -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    frontend = PolarizingFrontEnd(filters=kernel.shape[-1], jump=jump, name="frontend")
    dense = keras.layers.Dense(2, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant([1.0, 0.0]))
    model = keras.Model(inputs, dense(keras.layers.Flatten()(frontend(inputs))))
    frontend.kernel.assign(kernel)
    return model  # always predicts class 0, by a logit margin of 1


def test_certify_counts_changeable_outputs_exactly():
    # Filters: +centre, -centre, +right neighbour; every interior pixel is seen by all three.
    kernel = np.zeros((5, 5, 1, 3), np.float32)
    kernel[2, 2, 0, 0], kernel[2, 2, 0, 1], kernel[2, 3, 0, 2] = 1.0, -1.0, 1.0
    image = np.zeros((8, 8), np.float32)
    # Within eps = 0.1 of c = 0.5: 0.45, 0.55, 0.6 (touches c); not: 0.3, 0.39, 0.62, 0.95, 1.0.
    image[2, 2:6] = [0.45, 0.3, 0.55, 0.39]
    image[4, 2:6] = [0.62, 0.6, 0.95, 1.0]
    x = np.stack([image, np.zeros_like(image)])[..., None]
    result = certify.certify(_frontend_model(kernel, 0.5), x, np.array([0, 0]), eps=0.1)
    np.testing.assert_array_equal(result.changeable_outputs, [9, 0])
    np.testing.assert_array_equal(result.outputs_near_jump, [9, 0])
    assert result.source == "frontend"
    np.testing.assert_array_equal(result.certified_frontend, [False, True])


def test_exact_box_count_is_tighter_than_z_plus_minus_eps():
    # z = (x[p] + x[p + right]) / 2; a lone 1 gives z = 0.5 at two positions. With eps = 0.15 the
    # box is [0.85, 1] x [0, 0.15] (clipping), so z only reaches [0.425, 0.575].
    kernel = np.zeros((5, 5, 1, 1), np.float32)
    kernel[2, 2, 0, 0] = kernel[2, 3, 0, 0] = 0.5
    image = np.zeros((1, 8, 8, 1), np.float32)
    image[0, 4, 4, 0] = 1.0
    far = certify.certify(_frontend_model(kernel, 0.6), image, np.array([0]), eps=0.15)
    assert (far.outputs_near_jump[0], far.changeable_outputs[0]) == (2, 0)
    close = certify.certify(_frontend_model(kernel, 0.55), image, np.array([0]), eps=0.15)
    assert (close.outputs_near_jump[0], close.changeable_outputs[0]) == (2, 2)


def test_pixel_saturation_counts_pixels_near_its_jump():
    model = _small_model("direct_quant")  # jump 0.2 on the pixels
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, 10, 10:15, 0] = [0.15, 0.19, 0.25, 0.31, 0.9]
    result = certify.certify(model, x, np.array([0]), eps=0.1)
    assert result.source == "quantize"
    assert result.changeable_outputs[0] == 3 and result.outputs_near_jump[0] == 3


# ----------------------------------------------------------------------------- interval rules


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("strides,padding", [(1, "valid"), (2, "same")])
def test_conv2d_rule_matches_enumeration(activation, strides, padding):
    rng = np.random.default_rng(0)
    layer = keras.layers.Conv2D(2, 2, strides=strides, padding=padding, activation=activation)
    layer.build((None, 3, 3, 1))
    layer.set_weights([rng.normal(size=(2, 2, 1, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)])
    _assert_rule_is_exact(layer, *_random_box(rng, (1, 3, 3, 1)))


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_dense_rule_matches_enumeration(activation):
    rng = np.random.default_rng(1)
    layer = keras.layers.Dense(3, activation=activation)
    layer.build((None, 4))
    layer.set_weights([rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)])
    _assert_rule_is_exact(layer, *_random_box(rng, (1, 4)))


@pytest.mark.parametrize(
    "layer,shape",
    [
        (keras.layers.MaxPooling2D(2), (1, 2, 4, 1)),
        (keras.layers.ReLU(), (1, 6)),
        (keras.layers.Flatten(), (1, 2, 2, 1)),
    ],
)
def test_monotone_rules_match_enumeration(layer, shape):
    _assert_rule_is_exact(layer, *_random_box(np.random.default_rng(2), shape), atol=0.0)


def test_saturation_rule_matches_dense_grid():
    layer = Saturation(jump=0.2)
    lo = np.array([[0.0, 0.1, 0.25, -0.5, -0.9, -0.3]], np.float32)
    hi = np.array([[0.1, 0.3, 0.90, -0.1, 0.9, -0.21]], np.float32)
    grid = lo + np.linspace(0.0, 1.0, 1001, dtype=np.float32)[:, None] * (hi - lo)
    outputs = _numpy(layer(grid))
    rule_lo, rule_hi = (_numpy(b)[0] for b in certify.layer_interval(layer, lo, hi))
    np.testing.assert_array_equal(rule_lo, outputs.min(axis=0))
    np.testing.assert_array_equal(rule_hi, outputs.max(axis=0))
    np.testing.assert_array_equal(rule_lo, [0, 0, 1, -1, -1, -1])


def test_saturation_rule_treats_the_jump_itself_as_changeable():
    """f(c) = 0.5, but float rounding could put the model on either side: take both."""
    lo, hi = certify.layer_interval(Saturation(jump=0.2), np.full((1, 1), 0.2, np.float32), np.full((1, 1), 0.2, np.float32))
    assert (float(_numpy(lo)[0, 0]), float(_numpy(hi)[0, 0])) == (0.0, 1.0)


def test_frontend_rule_matches_enumeration_and_ignores_the_switch():
    rng = np.random.default_rng(0)
    layer = PolarizingFrontEnd(filters=2, kernel_size=3, jump=0.1, saturate=False)
    layer.build((None, 3, 3, 1))
    layer.kernel.assign(rng.normal(size=(3, 3, 1, 2)).astype(np.float32))
    lo, hi = _random_box(rng, (1, 3, 3, 1), 0.0, 0.5)
    corners = _corners(lo, hi)
    z = _numpy(layer.normalized(corners))
    z_lo, z_hi = (_numpy(b)[0] for b in certify.frontend_z_interval(layer, lo, hi))
    # A batch of 512 corners against a batch of 1: two summation orders (float_paths.Z_TOLERANCE).
    np.testing.assert_allclose(z_lo, z.min(axis=0), atol=float_paths.Z_TOLERANCE)
    np.testing.assert_allclose(z_hi, z.max(axis=0), atol=float_paths.Z_TOLERANCE)
    assert np.abs(np.abs(z) - 0.1).min() > 1e-4  # no corner within the float margin of a jump
    saturated = _numpy(saturate(layer.normalized(corners), 0.1))
    rule_lo, rule_hi = (_numpy(b)[0] for b in certify.layer_interval(layer, lo, hi))
    np.testing.assert_array_equal(rule_lo, saturated.min(axis=0))
    np.testing.assert_array_equal(rule_hi, saturated.max(axis=0))
    assert set(np.unique(rule_hi - rule_lo)) >= {0.0, 1.0}  # some outputs fixed, some changeable


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("kind", ["polarized", "baseline", "direct_quant"])
def test_logit_bounds_contain_sampled_perturbations(kind, test_images):
    x, _ = test_images
    x, eps = x[:8], 0.05
    model = _small_model(kind)
    lo, hi = certify.interval_bounds(model, x, eps)
    rng = np.random.default_rng(4)
    box_lo, box_hi = np.maximum(x - eps, 0.0), np.minimum(x + eps, 1.0)
    for points in [box_lo, box_hi, *(rng.uniform(box_lo, box_hi).astype(np.float32) for _ in range(8))]:
        logits = _numpy(model(points))
        slack = 10 * float_paths.logit_atol(logits)  # the bounds and the forward: two float32 paths
        assert np.all(logits >= lo - slack) and np.all(logits <= hi + slack)


# Not direct_quant: its jump 0.2 is the pixel value 51/255, where the saturation is 0.5 and the
# interval rule rightly says [0, 1] even at eps = 0.
@pytest.mark.parametrize("kind", ["polarized", "baseline"])
def test_interval_bounds_at_zero_radius_are_the_point_forward(kind, test_images):
    x, _ = test_images
    model = _small_model(kind)
    lo, hi = certify.interval_bounds(model, x, 0.0)
    # Centre/radius rules (W c + b, |W| r) keep r = 0 exactly: the two bounds are one computation.
    np.testing.assert_array_equal(lo, hi)
    # The same logits as the model's forward, up to float32 rounding of another batch shape and
    # order of operations (relative to the logits' size).
    logits = _numpy(model(x))
    np.testing.assert_allclose(lo, logits, rtol=0, atol=1e-5 * max(1.0, float(np.abs(logits).max())))


@pytest.mark.parametrize("kind", ["polarized", "baseline", "direct_quant"])
def test_clean_correct_is_the_saturated_models_and_the_switch_is_ignored(kind, test_images):
    x, y = test_images
    model = _small_model(kind)
    _, margin, near_tie = _clean_margins(model, x, y)  # saturation is on in _small_model
    on = certify.certify(model, x, y, eps=0.01)
    np.testing.assert_array_equal(on.clean_correct[~near_tie], margin[~near_tie] > 0)
    frontend = models.get_frontend(model)
    if frontend is not None:
        frontend.set_saturation(False)
        off = certify.certify(model, x, y, eps=0.01)
        assert not frontend.saturating  # the switch is left as it was
        np.testing.assert_array_equal(off.certified_ibp, on.certified_ibp)
        np.testing.assert_array_equal(off.changeable_outputs, on.changeable_outputs)


def test_summary_labels_each_certificate():
    x = np.zeros((2, 28, 28, 1), np.float32)
    y = np.zeros(2, np.int64)
    expected = {
        "polarized": {"frontend_exact", "interval_from_frontend"},
        "direct_quant": {"quantize_exact", "interval_from_quantize"},
        "baseline": {"interval_from_input"},
    }
    for kind, keys in expected.items():
        result = certify.certify(_small_model(kind), x, y, eps=0.1)
        assert set(result.summary()["certified_accuracy"]) == keys
        assert (result.certified_frontend is None) == (kind == "baseline")


def test_unsupported_models_and_arguments_raise():
    inputs = keras.Input((4,))
    tanh = keras.Model(inputs, keras.layers.Dense(2, activation="tanh")(inputs))
    with pytest.raises(ValueError, match="activation tanh"):
        certify.certify(tanh, np.zeros((1, 4), np.float32), np.zeros(1), eps=0.1)
    normed = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    with pytest.raises(ValueError, match="BatchNormalization"):
        certify.certify(normed, np.zeros((1, 4), np.float32), np.zeros(1), eps=0.1)
    dense = keras.layers.Dense(4)
    residual = keras.Model(inputs, keras.layers.ReLU()(dense(inputs) + inputs))
    with pytest.raises(ValueError):
        certify.certify(residual, np.zeros((1, 4), np.float32), np.zeros(1), eps=0.1)
    model = _small_model("baseline")
    with pytest.raises(ValueError, match="eps=1.5"):
        certify.certify(model, np.zeros((1, 28, 28, 1), np.float32), np.zeros(1), eps=1.5)


# ----------------------------------------------------------------------------- trained models


@pytest.mark.parametrize("kind,eps", [("polarized", 0.01), ("baseline", 5e-4)])
def test_certified_examples_survive_pgd(kind, eps, request, test_images):
    model = request.getfixturevalue(f"trained_{kind}")
    x, y = test_images
    result = certify.certify(model, x, y, eps)
    assert result.certified_ibp.sum() >= 10  # the test is not vacuous
    if kind == "polarized":
        assert np.all(result.certified_frontend <= result.certified_ibp)
        exact = result.certified_frontend
    else:
        assert result.certified_frontend is None
        exact = np.zeros_like(result.certified_ibp)
    # Those certified by intervals alone first: they are the ones a bug could let through.
    certified = np.concatenate([np.flatnonzero(result.certified_ibp & ~exact), np.flatnonzero(exact)])
    attacked = certified[:_PGD_BATCH]
    assert not _pgd_broken(model, x[attacked], y[attacked], eps).any()


def test_pgd_of_the_soundness_test_has_teeth(trained_baseline, test_images):
    x, y = test_images
    correct = np.flatnonzero(np.argmax(_numpy(trained_baseline(x)), axis=1) == y)[:_PGD_BATCH]
    broken = _pgd_broken(trained_baseline, x[correct], y[correct], eps=0.3, steps=5, restarts=1)
    assert broken.mean() >= 0.75
    assert not certify.certify(trained_baseline, x[correct], y[correct], eps=0.3).certified_ibp.any()


def _clean_margins(model, x, y):
    """The model's logits, clean margins logit_y - max_{j != y} logit_j, and which margins are
    near-ties: within twice certify's withheld tolerance of 0 (float rounding of another forward
    pass, e.g. certify's layer by layer or another batch shape, may decide those either way).
    Asserts that near-ties are few, so that a comparison that skips them is not vacuous."""
    logits = _numpy(model(x))
    others = np.where(np.arange(logits.shape[1]) == y[:, None], -np.inf, logits)
    margin = logits[np.arange(len(y)), y] - others.max(axis=1)
    near_tie = np.abs(margin) <= 2 * certify.LOGIT_TOLERANCE * np.maximum(1.0, np.abs(logits).max(axis=1))
    assert near_tie.sum() <= 0.02 * len(y)
    return logits, margin, near_tie


def _assert_eps_zero_certifies_the_correct(model, x, y, result):
    """At eps = 0 the box is the image itself: certified means correct, up to near-ties.

    No front-end output sits at a jump (one-hot z is a pixel k/255, never 0.5), and at zero width
    the centre/radius rules give the point forward exactly, so the margin bound is the clean
    margin. Where the clean margin is within float noise of 0 or of the withheld tolerance
    (`LOGIT_TOLERANCE` * scale), the model's own forward and certify's layer-by-layer forward may
    round a near-tie either way (seen on other machines): those examples may go either way, and
    must be few. Soundness stays exact: nothing incorrect is certified.
    """
    logits, margin, near_tie = _clean_margins(model, x, y)
    assert not np.any(result.certified_ibp & ~result.clean_correct)
    np.testing.assert_array_equal(result.clean_correct[~near_tie], margin[~near_tie] > 0)
    np.testing.assert_array_equal(result.certified_ibp[~near_tie], margin[~near_tie] > 0)
    # The interval forward collapses to the point forward: the bound is the clean margin (float32
    # rounding of two forward passes, relative to the logits' size).
    correct = result.clean_correct & ~near_tie
    np.testing.assert_allclose(result.margin_lower_bound[correct], margin[correct], rtol=0,
                               atol=1e-5 * max(1.0, float(np.abs(logits).max())))


@pytest.mark.parametrize("kind,epsilons", [("polarized", (0.0, 0.005, 0.02, 0.3)), ("baseline", (0.0, 2e-4, 1e-3))])
def test_certificates_shrink_as_eps_grows(kind, epsilons, request, test_images):
    model = request.getfixturevalue(f"trained_{kind}")
    x, y = test_images
    results = [certify.certify(model, x, y, eps) for eps in epsilons]
    _assert_eps_zero_certifies_the_correct(model, x, y, results[0])
    for smaller, larger in zip(results, results[1:]):
        assert np.all(larger.certified_ibp <= smaller.certified_ibp)
        assert np.all(larger.margin_lower_bound <= smaller.margin_lower_bound + 1e-4)
        assert larger.ibp_accuracy <= smaller.ibp_accuracy
        if kind == "polarized":
            assert np.all(larger.certified_frontend <= smaller.certified_frontend)
            assert np.all(larger.changeable_outputs >= smaller.changeable_outputs)
    assert results[1].ibp_accuracy > results[-1].ibp_accuracy
