"""Tests of polar_tf.attacks: invariants, exact values, tracing, determinism and attack strength."""

import gc
import weakref

import keras
import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import attacks, backend, evaluation_config, losses, models
from polar_tf.frontend import PolarizingFrontEnd, Saturation

EPS = 0.1


def tiny_cnn(seed: int = 0) -> keras.Model:
    """A small conv net on MNIST-shaped images: fast on both backends."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 5, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def polarized(kind: str = "polarized") -> keras.Model:
    """A small model with the paper's saturating first layer ("polarized": PolarizingFrontEnd,
    saturation on; "direct_quant": Saturation on the pixels), random weights. The jump is small
    so that on random images many saturated outputs are +-1 (with c = 0.5 all are 0 and every
    gradient vanishes)."""
    keras.utils.set_random_seed(0)
    if kind == "polarized":
        first = PolarizingFrontEnd(filters=4, jump=0.05, saturate=True, name="frontend")
    else:
        first = Saturation(jump=0.5, name="quantize")
    inputs = keras.Input((28, 28, 1))  # Functional, as `models.build_model`'s.
    hidden = keras.layers.Conv2D(4, 5, strides=2, activation="relu")(first(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hidden)))


def random_batch(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)


@pytest.fixture(scope="module")
def polarized_model():
    """One polarized model for the module: each new model is compiled anew (seconds on JAX)."""
    return polarized()


@pytest.fixture(scope="module")
def cnn():
    return tiny_cnn()


@pytest.fixture(scope="module")
def trained_mlp(mnist):
    """An undefended MLP trained for a few seconds on 3000 MNIST images, and 200 test images."""
    (x_train, y_train), (x_test, y_test) = mnist
    x_train, y_train = x_train[:3000], y_train[:3000]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=64, epochs=3, verbose=0)
    return model, x_test[:200], y_test[:200]


# Pieces.


def test_project_clips_to_ball_and_range():
    x = np.array([0.0, 0.5, 1.0, 0.95], np.float32)
    x_adv = np.array([-0.5, 0.9, 0.2, 1.4], np.float32)
    got = ops.convert_to_numpy(attacks.project(x_adv, x, 0.1))
    f = np.float32
    np.testing.assert_array_equal(got, [0.0, f(0.5) + f(0.1), f(1.0) - f(0.1), 1.0])


def test_per_example_loss_names_the_losses_modules_functions():
    logits = np.array([[2.0, 1.0, 0.0], [40.0, 0.0, 0.0], [1.0, 3.0, 2.0]], np.float32)
    y = np.zeros(3, np.int32)
    same = lambda a, b: np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    same(attacks.per_example_loss(logits, y, "ce"), losses.cross_entropy(logits, y, reference_fallback=True))
    same(attacks.per_example_loss(logits, y, "cw"), losses.cw(logits, y))


# Invariants of the attacks.

ATTACKS = {
    "fgsm": lambda m, x, y, eps, **kw: attacks.fgsm(m, x, y, eps=eps, **kw),
    "bim": lambda m, x, y, eps, **kw: attacks.bim(m, x, y, eps=eps, steps=3, **kw),
    "pgd": lambda m, x, y, eps, **kw: attacks.pgd(m, x, y, eps=eps, steps=3, restarts=2, **kw),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_adversarial_examples_stay_in_ball_and_range(polarized_model, name, eps):
    x, y = random_batch(6)
    x_adv = ATTACKS[name](polarized_model, x, y, eps)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.max(np.abs(x_adv.astype(np.float64) - x)) <= eps + attacks.INVARIANT_TOLERANCE
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.mean(x_adv != x) > 0.5  # It moved (the straight-through gradient is nonzero).


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("loss", evaluation_config.LOSSES)
def test_eps_zero_returns_x(cnn, name, loss):
    x, y = random_batch(5)
    np.testing.assert_array_equal(ATTACKS[name](cnn, x, y, 0.0, loss=loss), x)


def test_fgsm_on_a_linear_model_is_the_hand_computed_step():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = np.array([0.1, -0.2, 0.3], np.float32)
    model = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    model.set_weights([w, b])
    x = np.array([[0.05, 0.5, 0.95, 0.3], [0.7, 0.0, 1.0, 0.2]], np.float32)
    y = np.array([2, 0], np.int32)
    logits = x.astype(np.float64) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad_ce = (p - np.eye(3)[y]) @ w.T  # d CE / dx = W (softmax - onehot)
    wrong = np.where(np.eye(3)[y] > 0, -np.inf, logits).argmax(1)
    grad_cw = w.T[wrong] - w.T[y]  # d (l_j* - l_y) / dx
    for loss, grad in (("ce", grad_ce), ("cw", grad_cw)):
        assert np.min(np.abs(grad)) > 1e-3
        expected = np.clip(x + np.float32(0.1) * np.sign(grad).astype(np.float32), 0, 1)
        got = attacks.fgsm(model, x.reshape(2, 2, 2, 1), y, eps=0.1, loss=loss)
        np.testing.assert_array_equal(got.reshape(2, 4), expected)


def test_same_seed_same_result(cnn):
    model = cnn
    x, y = random_batch(7)
    run = lambda seed: attacks.pgd(model, x, y, eps=EPS, steps=2, restarts=2, seed=seed, batch_size=4)
    first = run(0)
    np.testing.assert_array_equal(run(0), first)
    assert not np.array_equal(run(1), first)


def test_result_does_not_depend_on_batching(trained_mlp):
    """Batch 128 attacks all 3 restarts of all 40 examples in one call (restarts 2 and 3 fill the
    batch speculatively); batch 16 runs them mostly one restart after the other. Per example the
    kept restart must be the same."""
    model, x, y = trained_mlp
    x, y = x[:40], y[:40]
    run = lambda batch: attacks.pgd(model, x, y, eps=0.06, step_size=0.02, steps=3, restarts=3, batch_size=batch)
    sequential, together = run(16), run(128)
    # The two batch shapes round the gradients differently in the last bits, which can flip the
    # sign of a component within rounding of 0, moving that pixel by a step. A different restart
    # kept would change nearly every pixel (another random start): so per example at most a few
    # pixels may differ, and most examples not at all.
    moved = np.abs(together - sequential).reshape(len(x), -1) > 1e-6
    assert moved.mean(axis=1).max() <= 0.02
    assert np.sum(moved.any(axis=1)) <= 0.05 * len(x)
    assert 0.2 < models.accuracy(model, sequential, y) < 0.95  # survivors: restarts 2 and 3 ran


def test_attack_is_traced_once_across_batches_and_settings():
    model = tiny_cnn()
    x, y = random_batch(25)
    compiled = attacks.compiled_attack(model, "ce")
    assert compiled.traces == 0
    attacks.pgd(model, x, y, eps=EPS, steps=3, restarts=2, batch_size=10)  # 3 batches, the last padded
    assert compiled.traces == 2  # the steps, and the loss and logits at their end
    attacks.pgd(model, x, y, eps=0.2, step_size=0.05, steps=5, restarts=1, seed=4, batch_size=10)
    attacks.bim(model, x, y, eps=0.3, steps=2, batch_size=10)
    attacks.fgsm(model, x, y, eps=0.3, batch_size=10)
    assert compiled.traces == 2
    # Padding rows are not counted; PGD's second restart attacks only the examples not yet fooled.
    single_restarts = 25 * 3 + 25 * 5 + 25 * 2 + 25
    assert single_restarts <= compiled.image_steps <= single_restarts + 25 * 3
    attacks.fgsm(model, x[:3], y[:3], eps=0.3, batch_size=10)  # fewer images than a batch: a new shape
    assert compiled.traces == 4
    assert attacks.compiled_attack(model, "ce") is compiled
    assert attacks.compiled_attack(model, "cw") is not compiled


def test_steps_per_call_do_not_change_the_result(cnn):
    """The whole loop in one compiled call (accelerators) against one step per call (JAX's CPU) and
    a few per call (TensorFlow's CPU): each call continues from the last one's images."""
    x, y = random_batch(6)
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    attack = attacks.compiled_attack(cnn, "ce")
    outputs = [attack(x, y, noise, EPS, EPS / 4, 5, steps_per_call=per_call) for per_call in (None, 1, 2)]
    # One XLA loop against several calls may round a gradient component within rounding of 0 to
    # the other sign, moving that pixel by a step: few pixels may differ; where none does, the
    # loss and logits agree to float32 rounding.
    (x_whole, *rest_whole) = outputs[0]
    for x_stepped, *rest_stepped in outputs[1:]:
        moved = np.abs(x_whole - x_stepped).reshape(len(x), -1) > 1e-6
        assert moved.mean() <= 0.01
        same = ~moved.any(axis=1)
        for whole, stepped in zip(rest_whole, rest_stepped):
            np.testing.assert_allclose(whole[same], stepped[same], rtol=1e-5, atol=1e-5)


def test_compiled_attack_cache_does_not_keep_models_alive():
    model = tiny_cnn()
    x, y = random_batch(2)
    attacks.fgsm(model, x, y, eps=EPS)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_attack_sees_weight_changes_without_retracing():
    model = tiny_cnn()
    x, y = random_batch(4)
    before = attacks.fgsm(model, x, y, eps=EPS)
    model.set_weights([-w for w in model.get_weights()])
    after = attacks.fgsm(model, x, y, eps=EPS)
    assert attacks.compiled_attack(model).traces == 2
    assert not np.array_equal(before, after)


def test_attack_uses_the_saturated_model_and_restores_the_switch(polarized_model):
    x, y = random_batch(6)
    frontend = models.get_frontend(polarized_model)
    assert frontend.saturating
    on = attacks.bim(polarized_model, x, y, eps=EPS, steps=2)
    with frontend.saturation(False):
        off = attacks.bim(polarized_model, x, y, eps=EPS, steps=2)
        assert not frontend.saturating
    np.testing.assert_array_equal(off, on)


@pytest.mark.parametrize("kind", ["polarized", "direct_quant"])
def test_with_backward_copies_weights_and_outputs(kind):
    model = polarized(kind)
    assert attacks.with_backward(model, "identity") is model
    smooth = attacks.with_backward(model, "smooth", steepness=16.0)
    layers = [l for l in smooth.layers if hasattr(l, "backward")]
    assert [(l.backward, l.steepness) for l in layers] == [("smooth", 16.0)]
    x, y = random_batch(4)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(smooth(x)), ops.convert_to_numpy(model(x))
    )

    def input_gradient(m):
        return ops.convert_to_numpy(backend.gradient(lambda v: ops.sum(attacks.per_example_loss(m(v), y)), x))

    assert not np.allclose(input_gradient(smooth), input_gradient(model))


def test_bad_arguments_raise_value_errors(cnn):
    model = cnn
    x, y = random_batch(2)
    for kwargs, message in (
        (dict(eps=-0.1), "eps"),
        (dict(eps=0.1, restarts=3, random_start=False), "random_start"),
        (dict(eps=0.1, steps=0), "steps"),
        (dict(eps=0.1, loss="mse"), "loss"),
        (dict(eps=0.1, batch_size=0), "batch_size"),
    ):
        with pytest.raises(ValueError, match=message):
            attacks.pgd(model, x, y, **kwargs)
    with pytest.raises(ValueError, match="must lie in"):
        attacks.fgsm(model, x * 2, y, eps=0.1)
    with pytest.raises(ValueError, match="backward"):
        attacks.with_backward(model, "straight")


# Strength on a trained, undefended model.


def test_iterative_attacks_beat_fgsm_and_restarts_never_help_the_model(trained_mlp):
    model, x, y = trained_mlp
    eps = 0.1
    accuracy = lambda x_adv: models.accuracy(model, x_adv, y)
    clean = accuracy(x)
    fgsm = accuracy(attacks.fgsm(model, x, y, eps=eps))
    bim = accuracy(attacks.bim(model, x, y, eps=eps, steps=10))
    pgd = {r: attacks.pgd(model, x, y, eps=eps, steps=10, restarts=r, seed=0) for r in (1, 3)}
    pgd_accuracy = {r: accuracy(x_adv) for r, x_adv in pgd.items()}
    assert clean > 0.85 and fgsm < clean - 0.2
    assert bim <= fgsm and pgd_accuracy[1] <= fgsm
    # The two runs batch restart 1 differently (restarts 2 and 3 fill the batch), so it is rounded
    # differently in the last bits: an example whose margin is within that rounding of 0 may be
    # fooled by one run's restart 1 and not the other's. Away from those near-ties, whatever one
    # restart fools three restarts fool, and the others keep the higher loss (up to rounding).
    logits = {r: ops.convert_to_numpy(model(x_adv)) for r, x_adv in pgd.items()}
    margins = ops.convert_to_numpy(attacks.per_example_loss(logits[1], y, "cw"))
    near_tie = np.abs(margins) <= 2 * float_paths.logit_atol(logits[1])
    assert near_tie.sum() <= 0.02 * len(y)
    assert pgd_accuracy[3] <= pgd_accuracy[1] + near_tie.mean()
    predicted = {r: np.argmax(z, axis=1) for r, z in logits.items()}
    assert np.all(((predicted[1] != y) <= (predicted[3] != y))[~near_tie])
    survivors = (predicted[3] == y) & ~near_tie
    losses = {r: ops.convert_to_numpy(attacks.per_example_loss(z, y)) for r, z in logits.items()}
    rounding = 1e-5 * np.maximum(1.0, np.abs(losses[1]))
    assert np.all(losses[3][survivors] >= losses[1][survivors] - rounding[survivors])
