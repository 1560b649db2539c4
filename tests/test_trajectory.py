import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from polar_tf import run_dir, trajectory
from polar_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_histogram_fraction_near_jump_by_hand():
    counts = np.zeros(100)  # bins of width 0.02 on [-1, 1]; bin i covers [-1 + 0.02 i, -1 + 0.02 (i + 1)]
    counts[60] = 10  # [0.2, 0.22]: inside [0.3 - 0.1, 0.3 + 0.1]
    counts[70] = 30  # [0.4, 0.42]: outside, it starts where the interval ends
    counts[35] = 20  # [-0.3, -0.28]: inside [-0.4, -0.2]
    counts[50] = 40  # [0, 0.02]: outside
    assert trajectory.histogram_fraction_near_jump(counts, 0.3, 0.1) == pytest.approx(30 / 100)
    # An interval edge inside a bin counts the bin's overlapping part: [0.19, 0.21] half of bin 59 and 60.
    counts = np.zeros(100)
    counts[59] = counts[60] = 8
    assert trajectory.histogram_fraction_near_jump(counts, 0.2, 0.01) == pytest.approx(0.5)


def test_near_jump_fraction_uses_the_front_ends_normalization():
    kernel = np.zeros((5, 5, 1, 1), np.float32)
    kernel[2, 2, 0, 0] = 4.0  # z = the pixel itself
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, :7, :, 0] = 0.35  # 196 of 784 outputs within 0.1 of 0.3
    x[0, 7:14, :, 0] = 0.45  # outside
    assert trajectory.near_jump_fraction(kernel, x, 0.3, 0.1) == pytest.approx(196 / 784)


def _write_reference(folder, epochs):
    rng = np.random.default_rng(0)
    for epoch in epochs:
        for kind, key, value in (("filter_save", "filters", rng.normal(size=(25, 1, 5, 5)).astype(np.float32)),
                                 ("hist_save", "hist", rng.uniform(size=100).astype(np.float32))):
            os.makedirs(os.path.join(folder, kind), exist_ok=True)
            np.savez(os.path.join(folder, kind, f"fashion_{epoch}.npz"), **{key: value})
    np.savez(os.path.join(folder, "filter_save", "mnist_0.npz"), filters=np.zeros((25, 1, 5, 5), np.float32))


def test_reference_files_are_read_in_keras_layout(tmp_path):
    _write_reference(str(tmp_path), [0, 5])
    os.remove(tmp_path / "hist_save" / "fashion_5.npz")  # An epoch with one of its two files is left out.
    found = trajectory.reference_trajectory(str(tmp_path), "fashion_mnist")
    assert list(found) == [0]
    with np.load(tmp_path / "filter_save" / "fashion_0.npz") as npz:
        torch_layout = npz["filters"]
    kernel = found[0]["kernel"]
    assert kernel.shape == (5, 5, 1, 25)
    assert kernel[1, 3, 0, 7] == torch_layout[7, 0, 1, 3]
    assert trajectory.reference_trajectory(str(tmp_path), "mnist") == {}  # mnist has no histogram here


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the program, once: in the JAX pass (quicker start)")
def test_cli_draws_ours_beside_the_reference(tmp_path, mnist, mnist_subset_dir):
    workdir = tmp_path / "run"
    config = Config(dataset="fashion_mnist", jump=0.3, epochs_per_stage=1)
    run_dir.write_config(str(workdir), config)
    one_pixel = np.zeros((5, 5, 1, 25), np.float32)
    one_pixel[2, 2] = 1.0
    for epochs, kernel in ((0, np.ones((5, 5, 1, 25), np.float32)), (5, one_pixel)):
        run_dir.save_filters(str(workdir), epochs, kernel)
    _write_reference(str(tmp_path / "ref"), [0, 5, 10])
    # The fixture holds MNIST images; a fashion_mnist folder pointing at them serves here.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.symlink(os.path.join(mnist_subset_dir, "mnist"), data_dir / "fashion_mnist")
    result = subprocess.run(
        [sys.executable, "-m", "polar_tf.trajectory", f"--workdir={workdir}", f"--reference_dir={tmp_path / 'ref'}",
         f"--data_dir={data_dir}"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run: filter concentration after N epochs: 0: 0.04, 5: 1.00" in result.stdout
    with open(workdir / "plots" / "trajectory.json") as f:
        written = json.load(f)
    (run,) = written["runs"]
    assert sorted(run["by_epoch"]) == ["0", "5"] and sorted(written["reference"]["by_epoch"], key=int) == ["0", "5", "10"]
    assert run["config"]["jump"] == 0.3 and written["reference"]["jump"] == 0.3 and run["test_accuracy"] is None
    assert written["command"].startswith("python -m polar_tf.trajectory --workdir=")
    # Centred one-pixel filters output each pixel itself: the near-jump fraction is the share of
    # the 320 images' pixels within 0.1 of 0.3 (the fixture stores them rounded to 1/255). Pixels
    # 51/255 and 102/255 sit on the interval's ends, where float rounding decides: bound both ways.
    distance = np.abs(np.round(mnist[0][0][:320] * 255) / 255 - 0.3)
    fraction = run["by_epoch"]["5"]["near_jump_fraction"]
    assert np.mean(distance < 0.1 - 1e-6) <= fraction <= np.mean(distance <= 0.1 + 1e-6)
    assert np.mean(distance < 0.1 - 1e-6) > 0.01
    with open(workdir / "plots" / "trajectory.md") as f:
        table = f.read()
    assert "| run | 0.3 | uniform_fan_in | 1e-08 | 0 | 1 | - | - | - | - | 1.00 | - | - | - | 5 | - |" in table
    assert "| original (published trajectory) | 0.3 | - | - | - | - |" in table
    assert f"Written by `{written['command']}`" in table
    assert sorted(os.listdir(workdir / "plots")) == ["trajectory.json", "trajectory.md", "trajectory.png",
                                                    "trajectory_filters.png"]
    missing = subprocess.run([sys.executable, "-m", "polar_tf.trajectory", f"--workdir={tmp_path}"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == (
        f"polar_tf.trajectory: error: {tmp_path}/config.json does not exist: not a polar_tf workdir"
    )


def test_a_shipped_model_without_kernels_reads_its_recorded_statistics(tmp_path, mnist_subset_dir):
    """A shipped model whose filters were not kept (an older GPU run) gives the statistics train.py
    recorded after each epoch, at epochs completed = epoch + 1, and no filter grid."""
    stem = str(tmp_path / "pretrained" / "fashion_mnist_polarized")
    run_dir.write_json(stem + ".config.json", Config(dataset="fashion_mnist", jump=0.3).to_dict())
    log = run_dir.MetricsLog(stem + ".metrics.jsonl")
    for epoch, concentration in enumerate((0.1, 0.25, 0.8)):
        log.append({"epoch": epoch, "filter_concentration": concentration, "filter_l1_mean": 4.0 + epoch,
                    "frac_within_eps_of_jump": 0.05 * epoch, "test_accuracy": 0.8 + 0.01 * epoch})
    log.append({"epoch": 3, "test_accuracy": 0.9})  # a record without front-end statistics
    assert trajectory.recorded_trajectory(log.read()) == {
        1: {"filter_concentration": 0.1, "filter_l1_mean": 4.0, "near_jump_fraction": 0.0},
        2: {"filter_concentration": 0.25, "filter_l1_mean": 5.0, "near_jump_fraction": 0.05},
        3: {"filter_concentration": 0.8, "filter_l1_mean": 6.0, "near_jump_fraction": 0.1},
    }
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.symlink(os.path.join(mnist_subset_dir, "mnist"), data_dir / "fashion_mnist")
    output_dir = str(tmp_path / "out")
    result = trajectory.write_trajectory([stem + ".keras"], None, output_dir, str(data_dir))
    (run,) = result["runs"]
    assert run["name"] == "fashion_mnist_polarized" and run["from_metrics"] and run["test_accuracy"] == 0.9
    assert run["by_epoch"][3]["filter_concentration"] == 0.8
    assert sorted(os.listdir(output_dir)) == ["trajectory.json", "trajectory.md", "trajectory.png"]
    with open(os.path.join(output_dir, "trajectory.md")) as f:
        table = f.read()
    assert "| fashion_mnist_polarized | 0.3 | uniform_fan_in | 1e-08 | 0 | 20 | - | - | - | - | 0.80 |" in table
    assert "kernels were not kept; near a jump on the first 1000 training images): fashion_mnist_polarized." in table
    with pytest.raises(FileNotFoundError, match="no config beside it"):
        trajectory.write_trajectory([str(tmp_path / "elsewhere.keras")], None, output_dir, str(data_dir))


def test_initial_gradient_balance_is_the_gradient(mnist):
    """The SGD-step measurement equals the gradients a tape computes, and B1's pull does not
    depend on the classifier's init (the front end is drawn first from the same seed)."""
    (x, y), _ = mnist
    x, y = x[:128], y[:128]
    balance = {init: trajectory.initial_gradient_balance(Config(classifier_init=init), x, y, batches=2)
               for init in ("uniform_fan_in", "glorot")}
    assert balance["glorot"]["b1_rms"] == pytest.approx(balance["uniform_fan_in"]["b1_rms"], rel=1e-4)
    for g in balance.values():
        assert g["ratio"] == pytest.approx(g["cross_entropy_rms"] / g["b1_rms"])
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    from polar_tf import frontend as fe, models

    keras.utils.set_random_seed(0)
    model = models.build_model(Config())
    layer = models.get_frontend(model)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ce, b1 = [], []
    for first in (0, 64):
        with tf.GradientTape(persistent=True) as tape:
            ce_value = loss(y[first : first + 64], model(x[first : first + 64]))
            b1_value = tf.reduce_mean(fe.barrier_b1(layer.normalized(x[first : first + 64]), layer.sigma1))
        ce.append(tape.gradient(ce_value, layer.kernel).numpy())
        b1.append(tape.gradient(b1_value, layer.kernel).numpy())
    # The step is the gradient up to the rounding of weights ~0.5 in float32 (~3e-8), far below it.
    assert balance["uniform_fan_in"]["cross_entropy_rms"] == pytest.approx(np.sqrt(np.mean(np.square(ce))), rel=1e-3)
    assert balance["uniform_fan_in"]["b1_rms"] == pytest.approx(np.sqrt(np.mean(np.square(b1))), rel=1e-3)
