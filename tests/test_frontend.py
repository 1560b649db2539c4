import keras
import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import backend
from polar_tf.frontend import PolarizingFrontEnd, Saturation, barrier_b1, barrier_b2, saturate


def _conv_same(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Reference 'same' cross-correlation of one [H, W] image with [k, k, K] kernels, in float64."""
    k = kernel.shape[0]
    padded = np.pad(image, k // 2)
    out = np.zeros(image.shape + (kernel.shape[-1],))
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            out[i, j] = np.tensordot(padded[i : i + k, j : j + k], kernel, axes=2)
    return out


def _hand_kernel() -> np.ndarray:
    """Three 5x5 filters: 2 * centre pixel; right neighbour minus centre; a 0.04 box."""
    kernel = np.zeros((5, 5, 1, 3), np.float32)
    kernel[2, 2, 0, 0] = 2.0  # L1 = 2, so z = x exactly
    kernel[2, 2, 0, 1], kernel[2, 3, 0, 1] = -1.0, 1.0  # L1 = 2: z = (right - centre) / 2
    kernel[:, :, 0, 2] = 0.04  # L1 = 1
    return kernel


def _layer(**kwargs) -> PolarizingFrontEnd:
    layer = PolarizingFrontEnd(filters=3, jump=0.5, **kwargs)
    layer.build((None, 6, 6, 1))
    layer.kernel.assign(_hand_kernel())
    return layer


IMAGE = np.array(
    [
        [0.0, 0.2, 0.5, 0.7, 1.0, 0.0],
        [1.0, 1.0, 0.0, 0.0, 0.3, 0.9],
        [0.1, 0.6, 0.5, 0.5, 0.4, 0.0],
        [0.0, 0.0, 1.0, 0.0, 0.8, 0.2],
        [0.5, 0.25, 0.75, 1.0, 0.0, 0.6],
        [0.9, 0.0, 0.0, 0.45, 0.55, 1.0],
    ],
    np.float32,
)


def test_normalized_outputs_match_hand_computation():
    layer = _layer()
    z = ops.convert_to_numpy(layer.normalized(IMAGE[None, :, :, None]))[0]
    expected = _conv_same(IMAGE.astype(np.float64), _hand_kernel()[:, :, 0, :])
    expected /= np.array([2.0, 2.0, 1.0])
    np.testing.assert_allclose(z, expected, atol=1e-6)
    # Exact in any summation order: filter 0 normalizes to one tap of 1 (2 / (2 + 1e-12) rounds
    # to 1 in float32), and its 24 other taps add exact zeros.
    np.testing.assert_array_equal(z[..., 0], IMAGE)
    assert np.abs(z).max() <= 1.0


def test_saturated_outputs_are_the_three_levels_and_half_at_the_jump():
    layer = _layer(saturate=True)
    out = ops.convert_to_numpy(layer(IMAGE[None, :, :, None]))[0, :, :, 0]
    # Filter 0 passes the pixel through: < 0.5 -> 0, > 0.5 -> 1, exactly 0.5 -> 0.5. Exact: z is
    # the pixel exactly (above), and the forward value z + (f(z) - z) is f(z) exactly for |z| <= 1.
    expected = np.where(IMAGE > 0.5, 1.0, np.where(IMAGE == 0.5, 0.5, 0.0))
    np.testing.assert_array_equal(out, expected)


def test_saturation_switch_off_returns_z():
    layer = _layer(saturate=False)
    x = IMAGE[None, :, :, None]
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(x)), ops.convert_to_numpy(layer.normalized(x)))
    layer.set_saturation(True)
    assert set(np.unique(ops.convert_to_numpy(layer(x)))) <= {-1.0, -0.5, 0.0, 0.5, 1.0}


def test_saturate_levels():
    z = np.array([-0.9, -0.51, -0.5, -0.49, 0.0, 0.3, 0.5, 0.500001, 1.0], np.float32)
    out = ops.convert_to_numpy(saturate(z, 0.5))
    np.testing.assert_array_equal(out, [-1.0, -1.0, -0.5, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    out_smooth = ops.convert_to_numpy(saturate(z, 0.5, backward="smooth", steepness=16.0))
    # Exact: the forward value s + (f(z) - s) rounds back to f(z) for any surrogate |s| <= 1.
    np.testing.assert_array_equal(out_smooth, out)


def test_straight_through_gradient_is_identity():
    z = np.array([-0.9, -0.3, 0.0, 0.2, 0.7], np.float32)
    w = np.array([1.0, -2.0, 3.0, 0.5, -1.5], np.float32)
    grad = backend.gradient(lambda t: ops.sum(w * saturate(t, 0.5)), z)
    np.testing.assert_array_equal(ops.convert_to_numpy(grad), w)


def test_smooth_gradient_is_tanh_surrogate_derivative():
    z = np.array([-0.9, -0.45, 0.0, 0.2, 0.55], np.float32)
    c, s = 0.5, 8.0
    grad = backend.gradient(lambda t: ops.sum(saturate(t, c, "smooth", s)), z)
    zz = z.astype(np.float64)
    expected = 0.5 * s * ((1 - np.tanh(s * (zz - c)) ** 2) + (1 - np.tanh(s * (zz + c)) ** 2))
    np.testing.assert_allclose(ops.convert_to_numpy(grad), expected, rtol=1e-4, atol=1e-6)  # float32 1 - tanh^2


def test_layer_gradient_with_saturation_equals_unsaturated_gradient():
    x = IMAGE[None, :, :, None]
    weights = np.random.default_rng(0).normal(size=(1, 6, 6, 3)).astype(np.float32)
    saturated, plain = _layer(saturate=True), _layer(saturate=False)
    g_sat = backend.gradient(lambda t: ops.sum(weights * saturated(t)), x)
    g_plain = backend.gradient(lambda t: ops.sum(weights * plain(t)), x)
    np.testing.assert_allclose(ops.convert_to_numpy(g_sat), ops.convert_to_numpy(g_plain), atol=1e-6)
    assert np.abs(ops.convert_to_numpy(g_sat)).max() > 0


def test_barriers_match_hand_values():
    z = np.array([0.0, 0.35, -0.35, 0.5], np.float32)
    b1 = ops.convert_to_numpy(barrier_b1(z, 0.35))
    np.testing.assert_allclose(b1, [1.0, np.exp(-0.5), np.exp(-0.5), np.exp(-0.25 / 0.245)], rtol=1e-6)
    b2 = ops.convert_to_numpy(barrier_b2(z, 0.5, 0.15))
    far = np.exp(-(0.85**2) / 0.045)  # the other jump's bump at z = +-0.35
    np.testing.assert_allclose(
        b2, [2 * np.exp(-0.25 / 0.045), np.exp(-0.5) + far, np.exp(-0.5) + far, 1.0 + np.exp(-1.0 / 0.045)],
        rtol=1e-6,
    )


@pytest.mark.parametrize("kind", ["b1", "b2"])
def test_add_loss_is_weight_times_mean_barrier(kind):
    layer = _layer(regularizer=kind, reg_weight=0.7)
    x = IMAGE[None, :, :, None]
    layer(x)
    z = _conv_same(IMAGE.astype(np.float64), _hand_kernel()[:, :, 0, :]) / np.array([2.0, 2.0, 1.0])
    if kind == "b1":
        b = np.exp(-(z**2) / (2 * 0.35**2))
    else:
        b = np.exp(-((z - 0.5) ** 2) / 0.045) + np.exp(-((z + 0.5) ** 2) / 0.045)
    (loss,) = layer.losses
    np.testing.assert_allclose(float(ops.convert_to_numpy(loss)), 0.7 * b.mean(), rtol=1e-5)


def test_regularizer_none_adds_zero():
    layer = _layer(regularizer="none", reg_weight=1.0)
    layer(IMAGE[None, :, :, None])
    assert float(ops.convert_to_numpy(layer.losses[0])) == 0.0


def test_switches_take_effect_in_compiled_step_without_recompile():
    inputs = keras.Input((6, 6, 1))
    layer = PolarizingFrontEnd(filters=3, jump=0.5, name="frontend")
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(layer(inputs)))
    model = keras.Model(inputs, outputs)
    layer.kernel.assign(_hand_kernel())
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = IMAGE[None, :, :, None], np.array([1])
    base = model.test_on_batch(x, y)
    layer.set_regularizer("b1", 1.0)
    with_b1 = model.test_on_batch(x, y)
    z = _conv_same(IMAGE.astype(np.float64), _hand_kernel()[:, :, 0, :]) / np.array([2.0, 2.0, 1.0])
    np.testing.assert_allclose(with_b1 - base, np.exp(-(z**2) / (2 * 0.35**2)).mean(), rtol=1e-4)
    plain = model.predict(x, verbose=0)
    layer.set_saturation(True)
    saturated = model.predict(x, verbose=0)
    assert not np.allclose(plain, saturated)
    # The compiled predict and the eager call see the same saturated levels (filters 0 and 1 are
    # exact, one tap or two halves; filter 2 stays 0.05 from the jumps), but may sum the Dense
    # layer's 108 terms in another order: equal up to that float32 rounding.
    levels = ops.convert_to_numpy(layer(x)).reshape(1, -1)
    dense = model.layers[-1]
    atol = float_paths.dot_atol(levels, ops.convert_to_numpy(dense.kernel), ops.convert_to_numpy(dense.bias)).max()
    np.testing.assert_allclose(saturated, ops.convert_to_numpy(model(x)), rtol=0, atol=atol)


def test_config_round_trip_keeps_switches_and_outputs():
    layer = _layer(backward="smooth", steepness=16.0)
    layer.set_saturation(True)
    layer.set_regularizer("b2", 0.25)
    config = layer.get_config()
    assert config["saturate"] is True and config["regularizer"] == "b2" and config["reg_weight"] == 0.25
    assert config["backward"] == "smooth" and config["steepness"] == 16.0 and config["filters"] == 3
    clone = PolarizingFrontEnd.from_config(config)
    clone.build((None, 6, 6, 1))
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == config
    x = IMAGE[None, :, :, None]
    np.testing.assert_array_equal(ops.convert_to_numpy(clone(x)), ops.convert_to_numpy(layer(x)))


def test_saturation_context_restores_switch():
    layer = _layer(saturate=False)
    with layer.saturation(True):
        assert layer.saturating
    assert not layer.saturating


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"jump": 1.7}, "Received: jump=1.7"),
        ({"jump": 0.0}, "Received: jump=0.0"),
        ({"filters": 0}, "Received: filters=0"),
        ({"backward": "sigmoid"}, "Received: backward='sigmoid'"),
        ({"steepness": -1.0}, "Received: steepness=-1.0"),
        ({"regularizer": "b3"}, "Received: regularizer='b3'"),
        ({"sigma2": 0.0}, "Received: sigma2=0.0"),
    ],
)
def test_invalid_arguments_raise_value_error_quoting_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        PolarizingFrontEnd(**kwargs)


def test_direct_quantization_layer_thresholds_pixels():
    layer = Saturation(jump=0.2)
    x = np.array([[0.0, 0.1, 0.2, 0.3, 1.0]], np.float32)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(x)), [[0.0, 0.0, 0.5, 1.0, 1.0]])
    assert Saturation.from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="Received: jump=1.5"):
        Saturation(jump=1.5)


def test_layer_barrier_is_the_active_regularizer():
    layer = _layer()
    z = np.linspace(-1, 1, 41, dtype=np.float32)
    layer.set_regularizer("b1", 1.0)
    np.testing.assert_allclose(ops.convert_to_numpy(layer.barrier(z)), ops.convert_to_numpy(barrier_b1(z, 0.35)), rtol=1e-6)
    layer.set_regularizer("b2", 1.0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer.barrier(z)), ops.convert_to_numpy(barrier_b2(z, 0.5, 0.15)), rtol=1e-6, atol=1e-30
    )
    layer.set_regularizer("none", 1.0)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.barrier(z)), np.zeros_like(z))
