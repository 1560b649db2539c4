"""What a reproduction of the paper's table runs: its protocol, the models of each row, and the
training and evaluation settings each model and table gets under that protocol.

`polar_tf.reproduce` runs them, `polar_tf.gpu_reproduce` runs them on a lent GPU, and
`reproduction_results` finds their results again in the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from polar_tf import run_dir
from polar_tf.config import DEFAULT_JUMP, Config
from polar_tf.evaluation_config import AdaptiveConfig, EvalConfig, parse_eps_sweep

# The paper's rows, in its order, and the models that reproduce them.
ROWS = (("baseline", "no defense"), ("adversarial", "adversarial training"), ("polarized", "polarizing front end"))
COLUMNS = ("clean", "fgsm", "bim", "pgd")
TOLERANCE = {"clean": 2.0, "fgsm": 5.0, "bim": 5.0, "pgd": 5.0}  # points, as the target says
SWEEP = "0:0.4:0.05"  # the accuracy-against-eps figure (with one PGD restart, on sweep_examples)
EVALUATIONS = ("table", "sweep", "bim_margin", "adaptive")  # each dataset's, one results folder each
PROTOCOL_FILE = "protocol.json"  # in a results folder: the reproduction's protocol and folders


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How much of the paper's schedule and protocol a reproduction runs (defaults: all of it).

    The adversarially trained model has its own epoch count and PGD steps, since its epochs cost
    about adv_steps + 1 times the others'. The adaptive settings are this project's full suite.

    Attributes:
      epochs_per_stage: epochs in each of the 3 stages (paper: 20), every model but the adversarial one.
      train_examples: train on the first N training images (0: all).
      adv_epochs_per_stage: the adversarially trained model's epochs per stage.
      adv_steps: PGD steps per batch of adversarial training.
      adv_warmup_epochs: epochs over which adversarial training ramps its eps up (0: none).
      num_examples: test images of the table's evaluation.
      pgd_examples: PGD attacks only the first N of them (0: all).
      steps, restarts: BIM's and PGD's steps and PGD's restarts (the adaptive suite's PGD too).
      sweep_examples: test images of the accuracy-against-eps figure (one PGD restart).
      adaptive_examples: test images of the adaptive suite.
      apgd_iterations: the adaptive suite's APGD iterations.
      square_queries: the adaptive suite's Square queries per example.
      seed: seeds training and the attacks.
      steps_per_execution: train steps per compiled call (speed only).
      classifier_init: the classifier's initialisation (see `config.Config`).
      adam_epsilon: Adam's epsilon.
      fashion_mnist_jump: the jump c of the Fashion-MNIST models.
    """

    # The paper's protocol: the configs' defaults, where they have the setting.
    epochs_per_stage: int = Config.epochs_per_stage
    train_examples: int = Config.train_examples
    adv_epochs_per_stage: int = Config.epochs_per_stage
    adv_steps: int = Config.adv_steps
    adv_warmup_epochs: int = Config.adv_warmup_epochs
    num_examples: int = EvalConfig.num_examples
    pgd_examples: int = 0  # PGD on the first N of num_examples; 0: all
    steps: int = EvalConfig.steps
    restarts: int = EvalConfig.restarts
    sweep_examples: int = 1000
    adaptive_examples: int = AdaptiveConfig.num_examples
    apgd_iterations: int = AdaptiveConfig.apgd_iterations
    square_queries: int = AdaptiveConfig.square_queries
    seed: int = Config.seed
    steps_per_execution: int = Config.steps_per_execution
    classifier_init: str = Config.classifier_init
    adam_epsilon: float = Config.adam_epsilon
    fashion_mnist_jump: float = DEFAULT_JUMP["fashion_mnist"]

    @property
    def is_paper(self) -> bool:
        paper = Protocol(steps_per_execution=self.steps_per_execution)
        return dataclasses.replace(self, sweep_examples=paper.sweep_examples) == paper


def training_config(dataset: str, model: str, protocol: Protocol) -> Config:
    """The training config of one model of the table under `protocol`."""
    adversarial = model == "adversarial"
    return Config(dataset=dataset, model=model, train_examples=protocol.train_examples, seed=protocol.seed,
                  epochs_per_stage=protocol.adv_epochs_per_stage if adversarial else protocol.epochs_per_stage,
                  adv_steps=protocol.adv_steps if adversarial else Config.adv_steps,
                  adv_warmup_epochs=protocol.adv_warmup_epochs if adversarial else 0,
                  steps_per_execution=protocol.steps_per_execution, classifier_init=protocol.classifier_init,
                  adam_epsilon=protocol.adam_epsilon,
                  # Recorded by every model's config (the unused jump of the others too).
                  jump=protocol.fashion_mnist_jump if dataset == "fashion_mnist" else None)


def run_folder(root: str, dataset: str, model: str) -> str:
    return os.path.join(root, f"{dataset}_{model}")


def evaluation_configs(dataset: str, protocol: Protocol, paths: list[str]) -> dict[str, Any]:
    """The settings of each evaluation in EVALUATIONS of the models `paths` (in ROWS order)."""
    table = EvalConfig(dataset=dataset, num_examples=protocol.num_examples, steps=protocol.steps,
                                  restarts=protocol.restarts, seed=protocol.seed, certify=True,
                                  pgd_examples=protocol.pgd_examples or None)
    return {
        "table": table,
        "sweep": dataclasses.replace(table, num_examples=protocol.sweep_examples, pgd_examples=None,
                                     eps_sweep=parse_eps_sweep(SWEEP), restarts=1),
        # A control for BIM: the margin loss, which has no fallback (see losses.ce_falls_back); on
        # the images PGD attacks, where the table attacks some with BIM only.
        "bim_margin": dataclasses.replace(table, attacks=("bim",), loss="cw", certify=False, pgd_examples=None,
                                          num_examples=protocol.pgd_examples or protocol.num_examples),
        "adaptive": AdaptiveConfig(dataset=dataset, num_examples=protocol.adaptive_examples, seed=protocol.seed,
                                            pgd_steps=protocol.steps, pgd_restarts=protocol.restarts,
                                            apgd_iterations=protocol.apgd_iterations,
                                            square_queries=protocol.square_queries, transfer_from=paths[0],
                                            check_examples=min(protocol.adaptive_examples, AdaptiveConfig.check_examples)),
    }


def evaluation_dir(results_dir: str, dataset: str, kind: str) -> str:
    return os.path.join(results_dir, f"{dataset}_{kind}")


def write_protocol_record(results_dir: str, protocol: Protocol, root: str, pretrained_dir: str | None) -> None:
    """results_dir/protocol.json: the protocol and folders of the reproduction whose results it holds,
    from which a report elsewhere collects them (`reproduction_results.collect`)."""
    run_dir.write_json(os.path.join(results_dir, PROTOCOL_FILE),
                        {"protocol": dataclasses.asdict(protocol), "workdir": root, "pretrained_dir": pretrained_dir})


def read_protocol_record(results_dir: str) -> tuple[Protocol, str, str | None] | None:
    """(protocol, workdir, pretrained_dir) of the reproduction in results_dir; None without protocol.json."""
    path = os.path.join(results_dir, PROTOCOL_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return Protocol(**record["protocol"]), record["workdir"], record["pretrained_dir"]
