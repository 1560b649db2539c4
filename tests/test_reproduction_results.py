"""Tests of polar_tf.reproduction_results: what a reproduction's files say, read back for its report."""

import pytest

from polar_tf import reproduction_results, run_dir
from polar_tf.config import Config


def test_stage2_trend_is_the_mean_per_epoch_change_over_the_last_epochs_of_stage_2():
    records = [{"stage": 1, "frac_within_eps_of_jump": 0.5}]
    records += [{"stage": 2, "frac_within_eps_of_jump": f} for f in (0.30, 0.20, 0.16, 0.12, 0.10, 0.08)]
    records += [{"stage": 3, "frac_within_eps_of_jump": 0.08}]
    assert reproduction_results.stage2_trend(records) == pytest.approx((0.08 - 0.20) / 4)
    assert reproduction_results.stage2_trend([{"stage": 1, "loss": 0.1}]) is None  # a model without a front end


def test_how_a_shipped_model_was_trained_is_read_from_the_files_beside_it(tmp_path):
    config = Config(dataset="mnist", model="polarized", epochs_per_stage=1, train_examples=128)
    stem = str(tmp_path / "pretrained" / "mnist_polarized")
    run_dir.write_json(stem + ".config.json", config.to_dict())
    run_dir.MetricsLog(stem + ".metrics.jsonl").append({"epoch": 0, "stage": 1, "epoch_seconds": 2.5, "test_accuracy": 0.5})
    workdir = str(tmp_path / "runs" / "mnist_polarized")
    summary = reproduction_results.training_summary(stem + ".keras", workdir, str(tmp_path / "results"))
    assert (summary["seed"], summary["epochs"], summary["train_seconds"], summary["figures"]) == (0, 1, 2.5, [])
    assert summary["command"] == ("python train.py --dataset=mnist --model=polarized --epochs_per_stage=1 "
                                  f"--train_examples=128 --workdir={workdir}")


def test_a_model_is_described_by_its_own_settings_only(tmp_path):
    # The jump belongs to a front end: a baseline has none, whatever its config's default says.
    for model, jump in (("baseline", None), ("polarized", 0.5)):
        stem = str(tmp_path / model)
        run_dir.write_json(stem + ".config.json", Config(dataset="mnist", model=model).to_dict())
        run_dir.MetricsLog(stem + ".metrics.jsonl").append({"epoch": 0, "stage": 1})
        assert reproduction_results._trained(stem + ".keras")["jump"] == jump
    # Adversarial training says its PGD steps and eps ramp, which the further runs' table shows.
    assert reproduction_results._training_kind(Config(dataset="mnist", model="adversarial")) == "Madry et al. (40-step PGD)"
    assert reproduction_results._training_kind(Config(dataset="mnist", model="adversarial", adv_steps=10, adv_warmup_epochs=2)) == (
        "Madry et al. (10-step PGD, eps ramped up over 2 epochs)")
    assert reproduction_results._training_kind(Config(dataset="mnist")) == "the paper's schedule"
    # Certified training started from another model says so, and counts that model's epochs too.
    source = str(tmp_path / "polarized.keras")
    config = Config(dataset="mnist", certified_training=True, init_from=source)
    assert reproduction_results._training_kind(config) == (
        f"IBP, stage 3, started from {source}: eps 0 to 0.3 and kappa 1 to 0.5 over 10 of 20 epochs")
    assert reproduction_results._training_kind(Config(dataset="mnist", certified_training=True, sigma2=0.3)) == (
        "IBP, stage 3 (stages 1-2 with sigma2 0.3): eps 0 to 0.3 and kappa 1 to 0.5 over 10 of 20 epochs")
    stem = str(tmp_path / "follow")
    run_dir.write_json(stem + ".config.json", config.to_dict())
    for epoch in (40, 41):
        run_dir.MetricsLog(stem + ".metrics.jsonl").append({"epoch": epoch, "stage": 3})
    assert reproduction_results._trained(stem + ".keras")["epochs"] == 1 + 2
    # A chain (started from a model that itself started from another) counts every link once.
    again = str(tmp_path / "again")
    run_dir.write_json(again + ".config.json", Config(dataset="mnist", certified_training=True, init_from=stem + ".keras").to_dict())
    run_dir.MetricsLog(again + ".metrics.jsonl").append({"epoch": 42, "stage": 3})
    assert reproduction_results._trained(again + ".keras")["epochs"] == 1 + 2 + 1
