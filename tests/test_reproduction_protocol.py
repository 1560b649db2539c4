"""Tests of polar_tf.reproduction_protocol: the settings each model and evaluation of a reproduction
gets under its protocol, and the protocol record a report reads back."""

from polar_tf import reproduction_protocol
from polar_tf.config import Config
from polar_tf.evaluation_config import AdaptiveConfig, EvalConfig
from polar_tf.reproduction_protocol import Protocol


def test_the_paper_protocol_ignores_speed_settings_and_the_sweeps_size():
    assert Protocol().is_paper
    assert Protocol(steps_per_execution=32).is_paper and Protocol(sweep_examples=100).is_paper
    assert not Protocol(steps=20).is_paper and not Protocol(epochs_per_stage=1).is_paper


def test_only_the_adversarial_model_takes_the_adversarial_epochs_steps_and_warmup():
    protocol = Protocol(epochs_per_stage=3, adv_epochs_per_stage=2, adv_steps=7, adv_warmup_epochs=1, train_examples=128,
                        seed=4, fashion_mnist_jump=0.25)
    adversarial = reproduction_protocol.training_config("fashion_mnist", "adversarial", protocol)
    polarized = reproduction_protocol.training_config("fashion_mnist", "polarized", protocol)
    assert (adversarial.epochs_per_stage, adversarial.adv_steps, adversarial.adv_warmup_epochs) == (2, 7, 1)
    assert (polarized.epochs_per_stage, polarized.adv_steps, polarized.adv_warmup_epochs) == (3, Config.adv_steps, 0)
    for config in (adversarial, polarized):
        assert (config.dataset, config.train_examples, config.seed, config.jump) == ("fashion_mnist", 128, 4, 0.25)
    assert reproduction_protocol.training_config("mnist", "polarized", protocol).jump == Config(dataset="mnist").jump


def test_each_evaluation_runs_on_its_images_with_the_protocols_budgets():
    protocol = Protocol(num_examples=40, pgd_examples=30, steps=2, restarts=3, sweep_examples=20, adaptive_examples=20,
                        apgd_iterations=5, square_queries=9, seed=1)
    paths = ["baseline.keras", "adversarial.keras", "polarized.keras"]
    configs = reproduction_protocol.evaluation_configs("mnist", protocol, paths)
    assert list(configs) == list(reproduction_protocol.EVALUATIONS)
    assert configs["table"] == EvalConfig(dataset="mnist", num_examples=40, pgd_examples=30, steps=2, restarts=3, seed=1,
                                          certify=True)
    assert configs["sweep"] == EvalConfig(dataset="mnist", num_examples=20, steps=2, restarts=1, seed=1, certify=True,
                                          eps_sweep=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4))
    # BIM with the margin loss on the images PGD attacks.
    assert configs["bim_margin"] == EvalConfig(dataset="mnist", attacks=("bim",), loss="cw", num_examples=30, steps=2,
                                               restarts=3, seed=1)
    assert configs["adaptive"] == AdaptiveConfig(dataset="mnist", num_examples=20, seed=1, pgd_steps=2, pgd_restarts=3,
                                                 apgd_iterations=5, square_queries=9, transfer_from="baseline.keras",
                                                 check_examples=20)
    every_image = reproduction_protocol.evaluation_configs("mnist", Protocol(num_examples=40, pgd_examples=0), paths)
    assert every_image["table"].pgd_examples is None and every_image["bim_margin"].num_examples == 40
    assert every_image["adaptive"].check_examples == AdaptiveConfig.check_examples  # 1000 of the 10000 images


def test_the_protocol_record_reads_back_as_written(tmp_path):
    results = str(tmp_path / "results")
    assert reproduction_protocol.read_protocol_record(results) is None
    protocol = Protocol(epochs_per_stage=2, adam_epsilon=1e-7)
    reproduction_protocol.write_protocol_record(results, protocol, "runs/x", None)
    assert reproduction_protocol.read_protocol_record(results) == (protocol, "runs/x", None)
    assert reproduction_protocol.run_folder("runs", "mnist", "baseline") == "runs/mnist_baseline"
    assert reproduction_protocol.evaluation_dir(results, "mnist", "table") == f"{results}/mnist_table"
