"""Tests of polar_tf.run_dir: the files of a run folder, written so that a kill never corrupts them."""

import json
import os

import numpy as np
import pytest

from polar_tf import run_dir
from polar_tf.config import Config


def test_checkpoint_names_follow_the_number_of_stages(tmp_path):
    assert run_dir.checkpoint_path("w", Config(model="polarized"), 2) == os.path.join("w", "stage2.keras")
    assert run_dir.checkpoint_path("w", Config(model="baseline"), 1) == os.path.join("w", "model.keras")
    run_dir.write_config(str(tmp_path), Config(model="polarized", epochs_per_stage=3))
    assert run_dir.read_config(str(tmp_path)) == Config(model="polarized", epochs_per_stage=3)
    assert run_dir.final_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), "stage3.keras")


def test_metrics_log_appends_reads_and_truncates_whole_lines(tmp_path):
    log = run_dir.MetricsLog(str(tmp_path / "run" / "metrics.jsonl"))
    assert log.read() == []
    for epoch in range(4):
        log.append({"epoch": epoch, "loss": 1.0 / (epoch + 1)})
    assert [r["epoch"] for r in log.read()] == [0, 1, 2, 3]
    log.truncate_from(2)  # re-running from epoch 2 replaces its lines and the later ones
    log.append({"epoch": 2, "loss": 0.25})
    assert log.read() == [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_a_write_that_fails_halfway_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "model.keras")
    run_dir.write_text(path, "the earlier file")

    class FailsHalfway:
        def save(self, target):
            with open(target, "w") as f:
                f.write("half a file")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_dir.save_model(FailsHalfway(), path)
    assert open(path).read() == "the earlier file"
    assert os.listdir(tmp_path) == ["model.keras"]


def test_epoch_checkpoints_keep_only_the_newest(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    for epoch in (0, 1, 2):
        run_dir.save_epoch_checkpoint(model, str(tmp_path), epoch)
    assert run_dir.latest_epoch_checkpoint(str(tmp_path)) == (2, os.path.join(str(tmp_path), "checkpoints", "epoch_0002.keras"))
    assert os.listdir(tmp_path / "checkpoints") == ["epoch_0002.keras"]
    (tmp_path / "checkpoints" / ".epoch_0003.keras.abc.tmp.keras").write_bytes(b"partial")
    run_dir.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["epoch_0002.keras"]


def test_filters_round_trip_by_epoch(tmp_path):
    kernels = {epochs: np.full((5, 5, 1, 2), epochs, np.float32) for epochs in (0, 5, 12)}
    for epochs, kernel in kernels.items():
        run_dir.save_filters(str(tmp_path), epochs, kernel)
    loaded = run_dir.load_filters(str(tmp_path))
    assert sorted(loaded) == [0, 5, 12]
    for epochs, kernel in kernels.items():
        np.testing.assert_array_equal(loaded[epochs], kernel)
    assert run_dir.load_filters(str(tmp_path / "elsewhere")) == {}


def test_shipping_copies_the_model_its_record_and_its_filters(tmp_path):
    workdir = tmp_path / "run"
    config = Config(dataset="fashion_mnist", model="polarized", jump=0.3, seed=2)
    run_dir.write_config(str(workdir), config)
    run_dir.MetricsLog(str(workdir / "metrics.jsonl")).append({"epoch": 0, "test_accuracy": 0.5})
    (workdir / "stage3.keras").write_bytes(b"model bytes")
    kernels = {epochs: np.full((5, 5, 1, 3), epochs + 0.5, np.float32) for epochs in (0, 1, 60)}
    for epochs, kernel in kernels.items():
        run_dir.save_filters(str(workdir), epochs, kernel)
    shipped = run_dir.ship_pretrained(str(workdir / "stage3.keras"), str(tmp_path / "pretrained"))
    stem = str(tmp_path / "pretrained" / "fashion_mnist_polarized")
    assert shipped == stem + ".keras"
    assert (tmp_path / "pretrained" / "fashion_mnist_polarized.keras").read_bytes() == b"model bytes"
    assert run_dir.run_record(shipped) == (config, [{"epoch": 0, "test_accuracy": 0.5}])
    loaded = run_dir.load_filters(shipped)
    assert sorted(loaded) == [0, 1, 60]
    for epochs, kernel in kernels.items():
        np.testing.assert_array_equal(loaded[epochs], kernel)
    assert sorted(os.listdir(tmp_path / "pretrained")) == [f"fashion_mnist_polarized.{suffix}" for suffix in
                                                          ("config.json", "filters.npz", "keras", "metrics.jsonl")]
    # A run without filters (an undefended model) ships none, and reads back as none.
    baseline = tmp_path / "baseline"
    run_dir.write_config(str(baseline), config.replace(model="baseline"))
    run_dir.MetricsLog(str(baseline / "metrics.jsonl")).append({"epoch": 0})
    (baseline / "model.keras").write_bytes(b"")
    shipped = run_dir.ship_pretrained(str(baseline / "model.keras"), str(tmp_path / "pretrained"))
    assert not os.path.exists(stem.replace("polarized", "baseline") + ".filters.npz")
    assert run_dir.load_filters(shipped) == {}


def test_a_model_path_is_a_keras_file_or_a_workdirs_final_checkpoint(tmp_path):
    run_dir.write_config(str(tmp_path), Config(model="polarized"))
    checkpoint = str(tmp_path / "stage3.keras")
    assert run_dir.resolve_model_path(str(tmp_path)) == checkpoint
    (tmp_path / "stage3.keras").write_bytes(b"")
    assert run_dir.resolve_model_path(checkpoint) == checkpoint
    with pytest.raises(run_dir.CheckpointError, match="does not exist"):
        run_dir.resolve_model_path(str(tmp_path / "missing.keras"))


def test_a_fresh_checkout_evaluates_the_shipped_model_only_where_its_config_is_the_protocols(tmp_path):
    config = Config(dataset="mnist", model="polarized", epochs_per_stage=1, train_examples=128)
    pretrained, root = tmp_path / "pretrained", tmp_path / "runs"
    stem = str(pretrained / "mnist_polarized")
    run_dir.write_json(stem + ".config.json", config.to_dict())
    run_dir.MetricsLog(stem + ".metrics.jsonl").append({"epoch": 0, "stage": 1, "epoch_seconds": 2.5, "test_accuracy": 0.5})
    (pretrained / "mnist_polarized.keras").write_bytes(b"")
    workdir = str(root / "mnist_polarized")
    assert run_dir.shipped_model(str(pretrained), config, workdir) == stem + ".keras"
    assert run_dir.shipped_model(str(pretrained), config.replace(seed=1), workdir) is None  # trained otherwise
    assert run_dir.shipped_model(None, config, workdir) is None
    assert run_dir.shipped_model(str(pretrained), config.replace(model="baseline"), str(root / "mnist_baseline")) is None
    run_dir.write_config(workdir, config)  # a run of its own (even an unfinished one) is resumed instead
    assert run_dir.shipped_model(str(pretrained), config, workdir) is None


def test_make_folder_creates_parents_and_names_what_it_cannot_make(tmp_path):
    run_dir.make_folder(str(tmp_path / "a" / "b"), "workdir")
    assert (tmp_path / "a" / "b").is_dir()
    run_dir.make_folder(str(tmp_path / "a" / "b"), "workdir")  # an existing folder is fine
    (tmp_path / "file").write_text("kept")
    with pytest.raises(OSError, match=r"^workdir .*/file is a file, not a folder$"):
        run_dir.make_folder(str(tmp_path / "file"), "workdir")
    with pytest.raises(OSError, match=r"^output folder .*/file/results cannot be created: Not a directory$"):
        run_dir.make_folder(str(tmp_path / "file" / "results"), "output folder")
    assert (tmp_path / "file").read_text() == "kept"
