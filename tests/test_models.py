import keras
import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import models, run_dir
from polar_tf.config import Config
from polar_tf.frontend import PolarizingFrontEnd, Saturation


@pytest.mark.parametrize(
    "name, first_layer, params",
    [
        # 5*5*25 front end + (5*5*25*32 + 32) + (5*5*32*64 + 64) + (1024*100 + 100) + (100*10 + 10)
        ("polarized", PolarizingFrontEnd, 625 + 20032 + 51264 + 102500 + 1010),
        ("baseline", keras.layers.Conv2D, 832 + 51264 + 102500 + 1010),
        ("direct_quant", Saturation, 832 + 51264 + 102500 + 1010),
    ],
)
def test_architecture(name, first_layer, params):
    keras.utils.set_random_seed(0)
    model = models.build_model(Config(model=name))
    assert isinstance(model.layers[1], first_layer)
    assert model.count_params() == params + (3 if name == "polarized" else 0)  # + the 3 switches
    assert model.output_shape == (None, 10)
    assert model(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)


def test_front_end_init_is_he_uniform():
    keras.utils.set_random_seed(0)
    kernel = ops.convert_to_numpy(models.get_frontend(models.build_model(Config())).kernel)
    assert kernel.shape == (5, 5, 1, 25)
    limit = np.sqrt(6 / 25)
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
    assert kernel.std() == pytest.approx(limit / np.sqrt(3), rel=0.1)


@pytest.mark.parametrize("name, conv1_fan_in", [("polarized", 5 * 5 * 25), ("baseline", 5 * 5 * 1)])
def test_classifier_init_is_pytorchs_default_or_keras(name, conv1_fan_in):
    """uniform_fan_in: weights and biases uniform in +-1/sqrt(fan_in) (PyTorch's Conv2d/Linear
    default, which the original kept); glorot: Keras' defaults, zero biases."""
    keras.utils.set_random_seed(0)
    model = models.build_model(Config(model=name))
    for layer, fan_in in (("conv1", conv1_fan_in), ("conv2", 5 * 5 * 32), ("dense1", 1024), ("logits", 100)):
        kernel = ops.convert_to_numpy(model.get_layer(layer).kernel)
        bias = ops.convert_to_numpy(model.get_layer(layer).bias)
        limit = 1 / np.sqrt(fan_in)
        for values in (kernel, bias):
            assert np.abs(values).max() <= limit
        # The largest of n uniform draws falls short of the limit by about limit / n.
        assert np.abs(kernel).max() > limit * (1 - 20 / kernel.size)
        # The standard deviation of a uniform on +-limit is limit / sqrt(3); within 4 standard
        # errors of the sample's (relative standard error of a std: ~sqrt(0.8 / (4 n)) for it).
        assert kernel.std() == pytest.approx(limit / np.sqrt(3), rel=4 * np.sqrt(0.2 / kernel.size))
        assert np.count_nonzero(bias) == bias.size
    glorot = models.build_model(Config(model=name, classifier_init="glorot"))
    kernel = ops.convert_to_numpy(glorot.get_layer("dense1").kernel)
    assert np.abs(kernel).max() <= np.sqrt(6 / (1024 + 100)) and not np.any(ops.convert_to_numpy(glorot.get_layer("dense1").bias))


def test_frontend_outputs_are_the_layers_normalized_outputs():
    keras.utils.set_random_seed(1)
    model = models.build_model(Config())
    x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    batches = list(models.frontend_outputs(model, x, batch_size=2))
    assert [b.shape for b in batches] == [(2, 28, 28, 25), (2, 28, 28, 25), (1, 28, 28, 25)]
    z = np.concatenate(batches)
    frontend = models.get_frontend(model)
    probe = keras.Model(model.inputs, frontend.output)  # the unsaturated front end inside the model
    # The same z from batches of 2 (eager) and of 5 (compiled predict), up to the order in which
    # each path sums the 25 taps: float32 rounding, below Z_TOLERANCE.
    np.testing.assert_allclose(z, probe.predict(x, verbose=0), rtol=0, atol=float_paths.Z_TOLERANCE)
    assert np.abs(z).max() <= 1.0
    with pytest.raises(ValueError, match="has no polarizing front end"):
        next(models.frontend_outputs(models.build_model(Config(model="baseline")), x))


def test_accuracy_always_uses_the_saturated_model():
    keras.utils.set_random_seed(2)
    # Keras' init: untrained, PyTorch's small weights and uniform biases predict one class for all.
    model = models.build_model(Config(classifier_init="glorot"))
    frontend = models.get_frontend(model)
    x = np.random.default_rng(0).random((80, 28, 28, 1), dtype=np.float32)
    # Only images whose saturated prediction no float rounding can change (no output the decision
    # hangs on at a jump, no near-tie of two logits): on those, accuracy's batch shape and compiled
    # predict must give exactly these labels, and the accuracy is exact.
    expected = float_paths.decided_classes(model, x)
    decided = np.flatnonzero(expected >= 0)[:64]
    assert len(decided) == 64
    x, expected = x[decided], expected[decided]
    y = expected.copy()
    y[:16] = (y[:16] + 1) % 10
    assert models.accuracy(model, x, y) == 0.75
    assert not frontend.saturating
    # Not vacuous: the unsaturated model predicts otherwise on some of them.
    assert np.any(models.predict_labels(model, x) != expected)


@pytest.mark.parametrize("name", ["polarized", "baseline", "direct_quant"])
def test_keras_save_load_gives_identical_outputs(tmp_path, name):
    keras.utils.set_random_seed(3)
    model = models.build_model(Config(model=name))
    frontend = models.get_frontend(model)
    if frontend is not None:
        frontend.set_saturation(True)
        frontend.set_regularizer("b2", 0.3)
    path = str(tmp_path / "m.keras")
    run_dir.save_model(model, path)
    loaded = run_dir.load_model(path)
    x = np.random.default_rng(1).random((8, 28, 28, 1), dtype=np.float32)
    # Exact: the same weights through the same eager ops on the same batch, in one process.
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))
    if frontend is not None:
        restored = models.get_frontend(loaded)
        assert (restored.saturating, restored.regularizer, restored.reg_weight) == (True, "b2", pytest.approx(0.3))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(run_dir.CheckpointError, match="does not exist"):
        run_dir.load_model(str(tmp_path / "missing.keras"))
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(run_dir.CheckpointError, match="not a .keras file"):
        run_dir.load_model(str(bad))
