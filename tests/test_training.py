import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from polar_tf import models, run_dir, training
from polar_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A command-line check that does not depend on the backend runs once, in the JAX pass, whose
# processes start in about half the time (Keras on JAX imports no TensorFlow).
cli_once = pytest.mark.skipif(keras.backend.backend() != "jax", reason="backend-independent CLI check: the JAX pass's")


def _train_py(*args, **kwargs):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        capture_output=True, text=True, cwd=ROOT, **kwargs,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, mnist_subset_dir):
    """train.py end to end: 3 stages of 1 epoch on 320 real MNIST images."""
    workdir = str(tmp_path_factory.mktemp("run"))
    result = _train_py(
        f"--workdir={workdir}", f"--data_dir={mnist_subset_dir}", "--epochs_per_stage=1", "--verbose=0",
        f"--export_dir={workdir}/export",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_smoke_run_writes_checkpoints_config_metrics_and_plots(smoke_run):
    for name in ("stage1.keras", "stage2.keras", "stage3.keras", "config.json", "metrics.jsonl", "export/saved_model.pb"):
        assert os.path.isfile(os.path.join(smoke_run, name)), name
    config = run_dir.read_config(smoke_run)
    assert (config.dataset, config.model, config.epochs_per_stage, config.jump) == ("mnist", "polarized", 1, 0.5)
    records = run_dir.MetricsLog(os.path.join(smoke_run, "metrics.jsonl")).read()
    assert [(r["epoch"], r["stage"], r["regularizer"], r["saturate"]) for r in records] == [
        (0, 1, "b1", False), (1, 2, "b2", False), (2, 3, "none", True),
    ]
    for r in records:
        assert {"loss", "reg_loss", "train_accuracy", "test_accuracy", "b1_mean", "b2_mean"} <= set(r)
        # A fraction of the 200 test images (the last one is checked against the model below).
        assert r["test_accuracy"] * 200 == pytest.approx(round(r["test_accuracy"] * 200), abs=1e-4)
        assert np.isfinite(r["loss"])
        assert 0.04 <= r["filter_concentration"] <= 1.0 and len(r["filter_concentrations"]) == 25
    # The front end's kernel as initialised and after every epoch; frozen in stage 3.
    kernels = run_dir.load_filters(smoke_run)
    assert sorted(kernels) == [0, 1, 2, 3]
    stage3 = run_dir.load_model(os.path.join(smoke_run, "stage3.keras"))
    np.testing.assert_array_equal(kernels[3], ops.convert_to_numpy(models.get_frontend(stage3).kernel))
    assert not np.array_equal(kernels[0], kernels[1])
    assert sorted(os.listdir(os.path.join(smoke_run, "plots"))) == [
        f"stage{stage}_{kind}.png" for stage in (1, 2, 3) for kind in ("filters", "histogram")
    ]


def test_final_model_saturates_and_matches_recorded_accuracy(smoke_run, mnist_subset_dir):
    from polar_tf import data

    model = run_dir.load_model(run_dir.final_checkpoint(smoke_run))
    assert models.get_frontend(model).saturating
    x_test, y_test = data.load("mnist", "test", mnist_subset_dir)
    outputs = ops.convert_to_numpy(models.get_frontend(model)(x_test[:4]))
    assert set(np.unique(outputs)) <= {-1.0, -0.5, 0.0, 0.5, 1.0}
    last = run_dir.MetricsLog(os.path.join(smoke_run, "metrics.jsonl")).read()[-1]
    # Exact, near-ties included: train.py ran this same predict (one batch of the same 200 images,
    # same backend and compile settings) on the same float32 weights, in a process with this one's
    # environment (thread count) on this machine, so every logit has the same bits.
    assert models.accuracy(model, x_test, y_test) == pytest.approx(last["test_accuracy"], abs=1e-9)


def test_tensorboard_events_have_scalars_histogram_and_filters(smoke_run):
    pytest.importorskip("tensorflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = os.path.join(smoke_run, "tb")
    (event_file,) = [f for f in os.listdir(tb) if f.startswith("events.out.tfevents")]
    events = EventAccumulator(os.path.join(tb, event_file), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"loss", "test_accuracy", "train_accuracy", "reg_loss", "b2_mean", "frontend/z", "frontend/filters"} <= tags
    assert [e.step for e in events.Tensors("frontend/z")] == [0, 1, 2]
    histogram = events.Tensors("frontend/z")[0].tensor_proto
    assert [d.size for d in histogram.tensor_shape.dim] == [100, 3]  # buckets x (left, right, count)
    assert events.SummaryMetadata("frontend/z").plugin_data.plugin_name == "histograms"
    assert events.SummaryMetadata("frontend/filters").plugin_data.plugin_name == "images"


@cli_once
def test_stage_2_without_stage_1_checkpoint_is_a_one_line_error(tmp_path, mnist_subset_dir):
    result = _train_py(f"--workdir={tmp_path}", f"--data_dir={mnist_subset_dir}", "--stage=2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"train.py: error: --stage=2 needs the stage-1 checkpoint {tmp_path}/stage1.keras, which does not exist; "
        "run --stage=1 first"
    )
    assert "Traceback" not in result.stderr


@cli_once
def test_bad_flag_value_is_a_one_line_error(tmp_path):
    result = _train_py(f"--workdir={tmp_path}", "--jump=1.5")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "train.py: error: jump must be in (0, 1). Received: jump=1.5"


def test_stage_3_freezes_front_end_and_carries_optimizer_state(tmp_path, mnist_subset_dir):
    config = Config(epochs_per_stage=1, train_examples=128)
    workdir = str(tmp_path)
    training.train_and_evaluate(config, workdir, "1", mnist_subset_dir)
    training.train_and_evaluate(config, workdir, "2", mnist_subset_dir)
    stage2 = run_dir.load_model(os.path.join(workdir, "stage2.keras"))
    model = training.prepare_stage(config, workdir, 3)
    assert not models.get_frontend(model).trainable
    names = {v.name for v in model.optimizer.variables}
    assert "frontend_kernel_momentum" not in names and "conv1_kernel_momentum" in names
    old = {v.name: ops.convert_to_numpy(v) for v in stage2.optimizer.variables}
    for v in model.optimizer.variables:
        if v.name != "learning_rate":
            np.testing.assert_array_equal(ops.convert_to_numpy(v), old[v.name])
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 4  # 2 epochs x 2 batches of 64
    final = training.train_and_evaluate(config, workdir, "3", mnist_subset_dir)
    frozen_before = ops.convert_to_numpy(models.get_frontend(stage2).kernel)
    np.testing.assert_array_equal(ops.convert_to_numpy(models.get_frontend(final).kernel), frozen_before)
    assert not np.array_equal(
        ops.convert_to_numpy(final.get_layer("conv1").kernel), ops.convert_to_numpy(stage2.get_layer("conv1").kernel)
    )


def test_workdir_with_another_config_is_refused(tmp_path, mnist_subset_dir):
    run_dir.write_config(str(tmp_path), Config(epochs_per_stage=1))
    with pytest.raises(ValueError, match="differs in epochs_per_stage"):
        training.train_and_evaluate(Config(epochs_per_stage=2), str(tmp_path), "all", mnist_subset_dir)


@pytest.mark.parametrize("model", ["baseline", "direct_quant"])
def test_one_stage_models_train(tmp_path, mnist_subset_dir, model):
    config = Config(model=model, epochs_per_stage=1, train_examples=128)
    trained = training.train_and_evaluate(config, str(tmp_path), "all", mnist_subset_dir)
    assert os.path.isfile(os.path.join(tmp_path, "model.keras"))
    records = run_dir.MetricsLog(os.path.join(tmp_path, "metrics.jsonl")).read()
    assert [r["epoch"] for r in records] == [0, 1, 2] and trained.name == model
    with pytest.raises(ValueError, match="--stage must be all for model"):
        training.parse_stages(config, "2")


def test_progress_bar_and_record_name_the_accuracy_of_the_model_as_trained(mnist, capsys):
    (x, y), _ = mnist
    config = Config(epochs_per_stage=1)
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    training.compile_for_stage(model, config, 1)
    record = training.train_epoch(model, config, 0, x[:64], y[:64], verbose=1)
    bar = capsys.readouterr().out
    assert f"fit_accuracy: {record['fit_accuracy']:.4f}" in bar and " accuracy:" not in bar
    assert record["saturate"] is False  # Stage 1: the bar's number is the unsaturated model's.


def test_epoch_summary_labels_each_accuracy_with_the_model_it_measures():
    record = {"epoch": 0, "stage": 1, "loss": 0.93, "fit_accuracy": 0.653, "saturate": False,
              "train_accuracy": 0.6792, "test_accuracy": 0.7, "images_per_second": 2500.0}
    assert training.epoch_summary(Config(), record, has_frontend=True) == (
        "epoch 0 stage 1: loss 0.9300, fit_accuracy 0.6530 (unsaturated, mean over the epoch's batches); "
        "saturated model: train acc 0.6792, test acc 0.7000; 2500 img/s"
    )
    stage3 = training.epoch_summary(Config(), {**record, "stage": 3, "saturate": True}, has_frontend=True)
    assert "fit_accuracy 0.6530 (saturated, mean" in stage3 and "saturated model: train acc" in stage3
    adversarial = training.epoch_summary(Config(model="adversarial"), record, has_frontend=False)
    assert "fit_accuracy 0.6530 (on PGD inputs, mean" in adversarial and "; train acc 0.6792" in adversarial
    baseline = training.epoch_summary(Config(model="baseline"), record, has_frontend=False)
    assert "fit_accuracy 0.6530 (mean over the epoch's batches); train acc 0.6792, test acc 0.7000" in baseline


def test_a_stop_while_plotting_a_stage_leaves_the_stage_to_finish_with_its_plots(tmp_path, mnist_subset_dir, monkeypatch):
    config = Config(epochs_per_stage=1, train_examples=64)
    workdir = str(tmp_path)
    plot = training._stage_plots

    def stopped(model, config, workdir, stage, x_train):
        if stage == 2:
            raise KeyboardInterrupt
        plot(model, config, workdir, stage, x_train)

    monkeypatch.setattr(training, "_stage_plots", stopped)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(config, workdir, "all", mnist_subset_dir)
    assert os.path.isfile(os.path.join(workdir, "stage1.keras")) and not os.path.isfile(os.path.join(workdir, "stage2.keras"))
    metrics = run_dir.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    assert [r["epoch"] for r in metrics.read()] == [0, 1]

    monkeypatch.setattr(training, "_stage_plots", plot)
    training.train_and_evaluate(config, workdir, "all", mnist_subset_dir)
    assert [r["epoch"] for r in metrics.read()] == [0, 1, 2]  # epoch 1 was not trained again
    for stage in (1, 2, 3):
        assert os.path.isfile(os.path.join(workdir, f"stage{stage}.keras"))
        assert os.path.isfile(os.path.join(workdir, "plots", f"stage{stage}_histogram.png"))
