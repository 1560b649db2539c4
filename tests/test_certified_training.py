"""Certified training: the IBP loss by hand, its soundness against every flip combination of the
front end's outputs, its identity with certify's bounds, the ramp in the compiled step, and the
schedule end to end (frozen front end, resume)."""

import itertools
import os

import keras
import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import certified_training, certify, models, run_dir, schedule, training
from polar_tf.config import Config
from polar_tf.frontend import PolarizingFrontEnd


def _numpy(x) -> np.ndarray:
    return ops.convert_to_numpy(x)


def _linear_model(kernel: np.ndarray, bias: np.ndarray) -> keras.Model:
    inputs = keras.Input((kernel.shape[0],))
    dense = keras.layers.Dense(kernel.shape[1])
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([kernel, bias])
    return model


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_z - logits[np.arange(len(y)), y]))


# ----------------------------------------------------------------------------- the loss by hand


def test_worst_case_logits_elide_the_last_layer_by_hand():
    # logits = x @ W + b on the box [0.2, 0.4] x [0.5, 0.7] (x = (0.3, 0.6), eps = 0.1), label 0:
    #   logit_0 - logit_1 = -x1 + x2 - 0.5, least at (0.4, 0.5): -0.4;
    #   logit_0 - logit_2 = 2 x1 - x2,      least at (0.2, 0.7): -0.3.
    # Without elision the bound of the first would be lo(logit_0) - hi(logit_1) = 0.2 - 0.8 = -0.6.
    model = _linear_model(np.array([[1.0, 2.0, -1.0], [0.0, -1.0, 1.0]], np.float32), np.array([0.0, 0.5, 0.0], np.float32))
    x, y = np.array([[0.3, 0.6]], np.float32), np.array([0])
    worst = _numpy(certified_training.worst_case_logits(model, x, y, 0.1))
    np.testing.assert_allclose(worst, [[0.0, 0.4, 0.3]], atol=1e-6)  # inputs rounded to float32
    _, logit_lo, logit_hi = certify.margin_bounds(certify.check_supported(model), *certify.input_box(x, 0.1), y)
    np.testing.assert_allclose(_numpy(logit_lo)[0, 0] - _numpy(logit_hi)[0, 1], -0.6, atol=1e-6)
    # The loss: kappa CE(clean) + (1 - kappa) CE(worst), clean logits (0.3, 0.5, 0.3).
    clean = _numpy(model(x))
    loss = float(certified_training.ibp_loss(y, clean, worst, 0.75))
    expected = 0.75 * np.log(1 + np.exp(0.2) + 1) + 0.25 * np.log(1 + np.exp(0.4) + np.exp(0.3))
    assert loss == pytest.approx(expected, abs=1e-6)
    assert not _numpy(certified_training.verified(worst, y))[0]
    # The box clips at [0, 1]: x = (0, 1), eps = 0.1 gives the box [0, 0.1] x [0.9, 1]. Label 2:
    #   logit_2 - logit_0 = -2 x1 + x2,         least at (0.1, 0.9): 0.7;
    #   logit_2 - logit_1 = -3 x1 + 2 x2 - 0.5, least at (0.1, 0.9): 1.0.
    corner = _numpy(certified_training.worst_case_logits(model, np.array([[0.0, 1.0]], np.float32), np.array([2]), 0.1))
    np.testing.assert_allclose(corner, [[-0.7, -1.0, 0.0]], atol=1e-6)
    assert _numpy(certified_training.verified(corner, np.array([2])))[0]


def test_at_eps_zero_the_worst_case_is_the_clean_loss():
    model = _tiny(0, frontend=False)
    x = np.random.default_rng(0).random((4, 6, 6, 1), dtype=np.float32)
    y = np.array([0, 3, 2, 1])
    worst = _numpy(certified_training.worst_case_logits(model, x, y, 0.0))
    clean = _numpy(model(x))
    # -margin_j = logit_j - logit_y: the clean logits shifted by logit_y, whose cross-entropy is the same.
    np.testing.assert_allclose(worst, clean - clean[np.arange(4), y][:, None], atol=2 * float_paths.logit_atol(clean))
    assert float(certified_training.ibp_loss(y, clean, worst, 0.5)) == pytest.approx(_cross_entropy(clean, y), abs=1e-5)


# ----------------------------------------------------------------------------- soundness


def _tiny(seed: int, frontend: bool = True) -> keras.Model:
    """6x6 images; a front end of two one-pixel filters (+pixel, -pixel), saturation on (or none);
    then a small classifier with every kind of layer the models use."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    x = inputs
    if frontend:
        layer = PolarizingFrontEnd(filters=2, kernel_size=3, jump=0.5, saturate=True, name="frontend")
        x = layer(x)
        kernel = np.zeros((3, 3, 1, 2), np.float32)
        kernel[1, 1, 0] = [1.0, -1.0]
        layer.kernel.assign(kernel)
    x = keras.layers.Conv2D(3, 2, padding="valid")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8, activation="relu", bias_initializer="random_normal")(x)
    return keras.Model(inputs, keras.layers.Dense(4, bias_initializer="random_normal")(x))


def _images(n: int, seed: int = 0) -> np.ndarray:
    """6x6 images of values far from 0.5 and a few within 0.1 of it (their outputs can flip at eps 0.1)."""
    rng = np.random.default_rng(seed)
    x = rng.choice([0.0, 0.1, 0.9, 1.0], size=(n, 6, 6, 1))
    near = rng.random((n, 6, 6, 1)) < 0.1
    return np.where(near, rng.choice([0.42, 0.47, 0.53, 0.58], size=x.shape), x).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_worst_case_logits_bound_every_flip_combination_of_the_front_end(seed):
    model = _tiny(seed)
    frontend, *classifier = certify.check_supported(model)
    rng = np.random.default_rng(seed)
    image = rng.choice([0.0, 0.1, 0.9, 1.0], size=(1, 6, 6, 1)).astype(np.float32)
    near = [(0, 1), (2, 2), (3, 4), (4, 0), (5, 5)]
    for (row, col), value in zip(near, [0.45, 0.55, 0.48, 0.58, 0.41]):
        image[0, row, col, 0] = value
    eps = 0.1
    lo, hi = (_numpy(b)[0] for b in certify.layer_interval(frontend, *certify.input_box(image, eps)))
    changeable = np.flatnonzero(lo != hi)
    # Each pixel within eps of 0.5 moves both its outputs (z = +-pixel) across a jump; nothing else moves.
    assert len(changeable) == 2 * len(near) and np.all(hi[lo != hi] - lo[lo != hi] == 1.0)
    flips = np.array(list(itertools.product([0.0, 1.0], repeat=len(changeable))), np.float32)
    outputs = np.repeat(lo.reshape(1, -1), len(flips), axis=0)
    outputs[:, changeable] += flips  # every one of the 1024 combinations of levels
    features = outputs.reshape(len(flips), *lo.shape)
    logits = features
    for layer in classifier:
        logits = layer(logits)
    logits = _numpy(logits)
    for label in range(4):
        worst = _numpy(certified_training.worst_case_logits(model, image, np.array([label]), eps))[0]
        differences = logits - logits[:, label : label + 1]  # logit_j - logit_y of each combination
        slack = 10 * float_paths.logit_atol(logits)  # the bound and the forward: two float32 paths
        assert np.all(differences <= worst + slack)
        assert np.ptp(differences[:, (label + 1) % 4]) > 0.01  # not vacuous: the flips move the logits


def test_worst_case_logits_bound_sampled_images_of_the_input_box():
    model = _tiny(0, frontend=False)
    x, y, eps = _images(8), np.arange(8) % 4, 0.05
    worst = _numpy(certified_training.worst_case_logits(model, x, y, eps))
    rng = np.random.default_rng(0)
    low, high = np.maximum(x - eps, 0.0), np.minimum(x + eps, 1.0)
    for points in [low, high, *(rng.uniform(low, high).astype(np.float32) for _ in range(8))]:
        logits = _numpy(model(points))
        differences = logits - logits[np.arange(8), y][:, None]
        assert np.all(differences <= worst + 10 * float_paths.logit_atol(logits))


# ----------------------------------------------------------------------------- one code path


def test_training_bounds_are_the_certificates_bounds():
    model = _tiny(1)
    x = _images(32, seed=1)
    y = np.argmax(_numpy(model(x)), axis=1)  # its own predictions: certify bounds every example
    eps = 0.1
    result = certify.certify(model, x, y, eps)
    worst = _numpy(certified_training.worst_case_logits(model, x, y, eps))
    rows = np.flatnonzero(result.clean_correct)
    assert len(rows) >= 30 and np.sum(~result.certified_frontend[rows]) >= 16  # most took the interval path
    training_margin = -np.where(np.arange(4) == y[:, None], -np.inf, worst).max(axis=1)
    # One code path on another batch shape (certify pads to 64 rows and takes only those it needs;
    # rows certified exactly report their clean margin, the interval bound at zero width).
    np.testing.assert_allclose(result.margin_lower_bound[rows], training_margin[rows], rtol=0,
                               atol=10 * float_paths.logit_atol(worst))
    assert 0 < result.certified_ibp.sum() < len(rows)  # margins of both signs


def test_the_compiled_step_computes_the_same_loss_and_ramps_per_batch():
    x, y = _images(192), np.arange(192) % 4
    config = Config(epochs_per_stage=4, certified_training=True, ibp_warmup_epochs=1, ibp_ramp_epochs=2)
    model = _tiny(0)
    training.compile_for_stage(model, config, 3)
    trainer = certified_training.trainer(model, config, epoch=10, num_examples=len(x), metrics=[])
    assert trainer.steps_per_epoch == 3 and float(_numpy(trainer.position)) == 6.0  # 2 epochs into stage 3
    trainer.position.assign(4.0)  # 1/3 into the ramp: eps 0.05, kappa 0.917
    eps, kappa = (float(v) for v in schedule.certified_ramp(config, 4.0 / 3))
    assert (eps, kappa) == pytest.approx((0.05, 1 - 0.5 / 6), abs=1e-6)
    # One step at learning rate 0: the compiled step's loss at these weights, and the ramp moves on.
    model.optimizer.learning_rate.assign(0.0)
    compiled = trainer.fit(x[:64], y[:64], batch_size=64, verbose=0).history
    assert float(_numpy(trainer.position)) == 5.0
    clean = _numpy(model(x[:64]))
    worst = certified_training.worst_case_logits(model, x[:64], y[:64], eps)
    eager = float(certified_training.ibp_loss(y[:64], clean, worst, kappa))
    # Two float32 paths; cross-entropy moves by at most twice the largest change of a logit.
    assert compiled["loss"][0] == pytest.approx(eager, abs=20 * float_paths.logit_atol(_numpy(worst)))
    assert compiled[certified_training.VERIFIED_FIT_ACCURACY][0] == pytest.approx(
        float(np.mean(_numpy(certified_training.verified(worst, y[:64])))))
    # An epoch advances the ramp once per batch; the next epoch reuses the trainer, placed anew.
    trainer.fit(x, y, batch_size=64, verbose=0)
    assert float(_numpy(trainer.position)) == 8.0
    assert certified_training.trainer(model, config, 11, len(x), metrics=[]) is trainer
    assert float(_numpy(trainer.position)) == 9.0
    record = certified_training.ramp_record(config, 9, len(x))  # stage 3's second epoch, last batch at 5/3
    assert (record["ibp_eps"], record["ibp_kappa"]) == pytest.approx((0.1, 1 - 0.5 / 3), abs=1e-6)


# ----------------------------------------------------------------------------- end to end


def _stage_3(workdir: str, data_dir: str, stop_at: int | None = None) -> keras.Model | None:
    """Stage 3 (epochs 4 and 5) on the IBP loss from the same random stage-2 checkpoint, on 128 images;
    with `stop_at`, interrupted as that epoch starts."""
    config = Config(epochs_per_stage=2, train_examples=128, certified_training=True, ibp_ramp_epochs=2)
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    training.compile_for_stage(model, config, 2)
    run_dir.save_model(model, run_dir.checkpoint_path(workdir, config, 2))
    real = training.train_epoch

    def train_epoch(model, config, epoch, *args, **kwargs):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return real(model, config, epoch, *args, **kwargs)

    training.train_epoch = train_epoch
    try:
        return training.train_and_evaluate(config, workdir, "3", data_dir)
    except KeyboardInterrupt:
        return None
    finally:
        training.train_epoch = real


@pytest.fixture(scope="module")
def certified_run(tmp_path_factory, mnist_subset_dir):
    workdir = str(tmp_path_factory.mktemp("certified"))
    return workdir, _stage_3(workdir, mnist_subset_dir)


def test_stage_3_trains_the_classifier_on_the_certified_loss_with_the_front_end_frozen(certified_run):
    workdir, final = certified_run
    records = run_dir.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
    assert [(r["epoch"], r["stage"], r["saturate"]) for r in records] == [(4, 3, True), (5, 3, True)]
    # The last batch (of 2 per epoch) of epoch e is e - 4 + 1/2 epochs into the 2-epoch ramp.
    assert [r["ibp_eps"] for r in records] == pytest.approx([0.3 * 0.25, 0.3 * 0.75])
    assert [r["ibp_kappa"] for r in records] == pytest.approx([1 - 0.5 * 0.25, 1 - 0.5 * 0.75])
    for r in records:
        assert 0.0 <= r["certified_test_accuracy"] <= r["test_accuracy"]
        # The mean over the epoch's 128 training images of "verified" (0 or 1 each).
        assert r[certified_training.VERIFIED_FIT_ACCURACY] * 128 == pytest.approx(
            round(r[certified_training.VERIFIED_FIT_ACCURACY] * 128), abs=1e-4)
    stage2 = run_dir.load_model(os.path.join(workdir, "stage2.keras"))
    stage3 = run_dir.load_model(os.path.join(workdir, "stage3.keras"))
    assert models.get_frontend(stage3).saturating and type(stage3) is type(stage2)  # a plain model
    kernels = run_dir.load_filters(workdir)
    assert sorted(kernels) == [5, 6]
    for kernel in (kernels[5], kernels[6], _numpy(models.get_frontend(stage3).kernel)):
        np.testing.assert_array_equal(kernel, _numpy(models.get_frontend(stage2).kernel))  # frozen
    assert not np.array_equal(_numpy(stage3.get_layer("conv1").kernel), _numpy(stage2.get_layer("conv1").kernel))
    assert int(_numpy(stage3.optimizer.iterations)) == 4  # the network's optimizer took the trainer's steps


def test_an_interrupted_certified_run_resumes_mid_ramp_to_the_same_weights(certified_run, tmp_path, mnist_subset_dir):
    workdir, whole = certified_run
    assert _stage_3(str(tmp_path), mnist_subset_dir, stop_at=5) is None
    resumed = _stage_3(str(tmp_path), mnist_subset_dir)
    # Bit for bit (same process, shapes and data order): the resumed epoch ramps from where the
    # interrupted run stood (its position comes from the epoch), with the optimizer's state.
    for a, b in zip(whole.weights, resumed.weights):
        np.testing.assert_array_equal(_numpy(a), _numpy(b))
    assert run_dir.MetricsLog(str(tmp_path / "metrics.jsonl")).read()[1]["ibp_eps"] == pytest.approx(0.3 * 0.75)


def test_init_from_starts_the_certified_stage_from_another_model(certified_run, tmp_path, mnist_subset_dir, monkeypatch):
    # Certified training as a 4th stage: stage 3 starts from a given model (here the certified run's
    # stage-3 model, as a shipped clean stage 3 would be) in a folder that has no stage-2 checkpoint.
    workdir, _ = certified_run
    source = os.path.join(workdir, "stage3.keras")
    config = Config(epochs_per_stage=2, train_examples=128, certified_training=True, ibp_ramp_epochs=2, init_from=source)
    started = []
    real = training.train_epoch
    monkeypatch.setattr(training, "train_epoch", lambda model, *a, **k: started.append(
        [_numpy(w).copy() for w in model.weights]) or real(model, *a, **k))
    final = training.train_and_evaluate(config, str(tmp_path), "3", mnist_subset_dir)
    for a, b in zip(started[0], run_dir.load_model(source).weights, strict=True):
        np.testing.assert_array_equal(a, _numpy(b))
    assert len(started) == 2 and not os.path.exists(tmp_path / "stage2.keras")
    assert run_dir.read_config(str(tmp_path)).init_from == source
    source_model = run_dir.load_model(source)
    np.testing.assert_array_equal(_numpy(models.get_frontend(final).kernel), _numpy(models.get_frontend(source_model).kernel))

    with pytest.raises(ValueError, match="needs --stage=2 or 3"):
        training.train_and_evaluate(config, str(tmp_path / "all"), "all", mnist_subset_dir)
    with pytest.raises(run_dir.CheckpointError, match="does not exist"):
        training.train_and_evaluate(config.replace(init_from=str(tmp_path / "missing.keras")), str(tmp_path / "m"), "3",
                                    mnist_subset_dir)
    with pytest.raises(ValueError, match="with jump 0.5, but the run's config asks for model 'polarized' with jump 0.2"):
        training.train_and_evaluate(config.replace(jump=0.2), str(tmp_path / "j"), "3", mnist_subset_dir)


def test_epoch_summary_adds_the_ramp_and_the_certified_accuracy():
    record = {"epoch": 41, "stage": 3, "loss": 0.8, "fit_accuracy": 0.95, "saturate": True, "train_accuracy": 0.96,
              "test_accuracy": 0.95, "images_per_second": 700.0, "ibp_eps": 0.15, "ibp_kappa": 0.75,
              certified_training.VERIFIED_FIT_ACCURACY: 0.53, "certified_test_accuracy": 0.41}
    assert training.epoch_summary(Config(certified_training=True), record, has_frontend=True).endswith(
        "test acc 0.9500; IBP at eps 0.150, kappa 0.750: verified_fit_accuracy 0.5300; "
        "certified test acc 0.4100 at eps 0.3; 700 img/s")
