"""The reproduction pipeline end to end on a tiny protocol: resumable, report generated from files."""

import os

import keras
import pytest

from polar_tf import reproduce, runfiles


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="one backend suffices for the pipeline")
def test_tiny_reproduction_writes_report_and_pretrained_models_and_resumes(tmp_path, mnist_subset_dir):
    protocol = reproduce.Protocol(epochs_per_stage=1, train_examples=128, adv_steps=2, num_examples=40,
                                  steps=2, restarts=1, sweep_examples=20)
    assert not protocol.is_paper and reproduce.Protocol().is_paper
    root, report, pretrained = str(tmp_path / "runs"), str(tmp_path / "REPRODUCTION.md"), str(tmp_path / "pretrained")
    reproduce.reproduce(["mnist"], protocol, root, mnist_subset_dir, report, pretrained)
    with open(report) as f:
        text = f.read()
    assert "a REDUCED schedule/protocol" in text
    for row in ("no defense", "adversarial training", "polarizing front end"):
        assert f"| {row} | " in text
    assert "/ 99.40 (" in text and "accuracy_vs_eps.png" in text
    for model in ("baseline", "adversarial", "polarized"):
        assert os.path.isfile(os.path.join(pretrained, f"mnist_{model}.keras"))
        assert runfiles.read_config(os.path.join(root, f"mnist_{model}")).model == model
    table = os.path.join(root, "mnist_table", "results.json")
    before = os.path.getmtime(table)
    reproduce.reproduce(["mnist"], protocol, root, mnist_subset_dir, report, pretrained)  # nothing to redo
    assert os.path.getmtime(table) == before
