"""Bad input: a one-line error, a non-zero exit, no traceback, and nothing written is lost."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from polar_tf import data, runfiles, training
from polar_tf.config import Config

# Flag checks do not depend on the backend: run the command-line cases in the TensorFlow pass only.
cli_once = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="backend-independent CLI check")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_py(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def _last_line(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@cli_once
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dataset=cifar10"], "FATAL Flags parsing error: flag --dataset=cifar10"),
        (["--model=resnet"], "FATAL Flags parsing error: flag --model=resnet"),
        (["--jump=0"], "train.py: error: jump must be in (0, 1). Received: jump=0.0"),
        (["--epochs_per_stage=-1"], "train.py: error: epochs_per_stage must be a positive integer. Received: epochs_per_stage=-1"),
        (["--data_dir=/nonexistent/data"], "train.py: error: data directory '/nonexistent/data' (from --data_dir) does not exist"),
    ],
)
def test_train_py_rejects_bad_flags(tmp_path, args, expected):
    result = _train_py(f"--workdir={tmp_path}/run", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert any(line.startswith(expected) for line in lines[-2:]), lines[-3:]


@cli_once
def test_train_py_rejects_corrupt_idx(tmp_path, mnist_subset_dir):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in os.listdir(os.path.join(mnist_subset_dir, "mnist")):
        with open(os.path.join(mnist_subset_dir, "mnist", name), "rb") as f:
            blob = f.read()
        (folder / name).write_bytes(blob[:-7] if name.startswith("train-images") else blob)
    line = _last_line(_train_py(f"--workdir={tmp_path}/run", f"--data_dir={tmp_path}"))
    assert line.startswith("train.py: error: ") and "train-images-idx3-ubyte: header says (320, 28, 28)" in line


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_checkpoints(tmp_path, mnist_subset_dir, monkeypatch):
    config = Config(epochs_per_stage=1, train_examples=128)
    workdir = str(tmp_path)
    training.train_and_evaluate(config, workdir, "1", mnist_subset_dir)
    stage1 = os.path.join(workdir, "stage1.keras")
    with open(stage1, "rb") as f:
        stage1_bytes = f.read()

    real_load = data.load_dataset

    def poisoned(*args, **kwargs):
        (x, y), test = real_load(*args, **kwargs)
        x = x.copy()
        x[:] = np.nan
        return (x, y), test

    monkeypatch.setattr(data, "load_dataset", poisoned)
    with pytest.raises(FloatingPointError, match=r"the loss became nan at epoch 1, batch 0"):
        training.train_and_evaluate(config, workdir, "2", mnist_subset_dir)
    with open(stage1, "rb") as f:
        assert f.read() == stage1_bytes
    assert runfiles.latest_epoch_checkpoint(workdir)[0] == 0
    assert [r["epoch"] for r in runfiles.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()] == [0]
    assert not os.path.exists(os.path.join(workdir, "stage2.keras"))


@pytest.fixture(scope="module")
def wrong_shape_model(tmp_path_factory):
    inputs = keras.Input((14, 14, 1))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    path = str(tmp_path_factory.mktemp("wrong") / "wrong.keras")
    runfiles.save_model(model, path)
    return path


@cli_once
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--eps=-0.1"], "eps must be in [0, 1]. Received: eps=-0.1"),
        (["--eps=1.5"], "eps must be in [0, 1]. Received: eps=1.5"),
        (["--steps=0"], "steps must be a positive integer. Received: steps=0"),
        (["--restarts=-2"], "restarts must be a positive integer. Received: restarts=-2"),
        (["WRONG_SHAPE"], "maps (14, 14, 1) to (10,); expected images (28, 28, 1) to 10 logits"),
        (["--suite=adaptive", "--certify"], "--certify do not apply to --suite=adaptive (it runs every attack)"),
    ],
)
def test_evaluate_py_rejects_bad_input_and_keeps_earlier_results(tmp_path, wrong_shape_model, args, expected):
    earlier = tmp_path / "results.json"
    earlier.write_text('{"kept": true}\n')
    model = wrong_shape_model if args == ["WRONG_SHAPE"] else os.path.join(ROOT, "pretrained", "mnist_polarized.keras")
    flags = [a for a in args if a != "WRONG_SHAPE"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--model_path={model}", f"--output_dir={tmp_path}",
         "--num_examples=10", *flags],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert _last_line(result) == f"evaluate.py: error: {expected}" or expected in _last_line(result)
    assert _last_line(result).startswith("evaluate.py: error:")
    assert earlier.read_text() == '{"kept": true}\n'
