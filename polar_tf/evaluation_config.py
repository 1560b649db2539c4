"""The settings of the two evaluation suites (evaluate.py's flags are made from their fields).

EvalConfig: the paper's attacks (`polar_tf.evaluation`); AdaptiveConfig: the adaptive suite
(`polar_tf.adaptive`). Their defaults are the paper's protocol and AutoAttack's budgets; QUICK
holds the reduced budgets of `evaluate.py --quick`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from polar_tf import cli
from polar_tf.config import BACKWARDS, DATASETS, DEFAULT_EPS, check_choice, choice

# The paper's attacks, the losses they maximize, and their budgets (`polar_tf.attacks`).
ATTACKS = ("fgsm", "bim", "pgd")
LOSSES = ("ce", "cw")
DEFAULT_STEPS = 100
DEFAULT_RESTARTS = 20
# The Square attack's budget and first square size (`polar_tf.square`): AutoAttack's standard for
# L-inf; its p_init is also the Square authors' on MNIST.
DEFAULT_QUERIES = 5000
DEFAULT_P_INIT = 0.8

HALF = 0.5  # the adaptive suite's eps stays below it (its eps_to_half check attacks up to it)

# --quick: budgets that finish in about a minute on a 2-core CPU, to try the commands; not the
# paper's protocol (the command line in results.json says --quick). Flags given explicitly win.
QUICK = {
    "standard": {"num_examples": 500, "steps": 20, "restarts": 2},
    "adaptive": {"num_examples": 100, "pgd_steps": 20, "pgd_restarts": 2, "apgd_iterations": 20,
                 "apgd_target_classes": 3, "square_queries": 500, "check_examples": 100},
}


def parse_eps_sweep(text: str) -> tuple[float, ...]:
    """'start:stop:step' -> (start, start + step, ..., stop), stop included when on the grid;
    'a,b,c' -> (a, b, c)."""
    if ":" not in text:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"eps_sweep must be start:stop:step or values separated by commas. "
                             f"Received: eps_sweep={text!r}") from None
    parts = text.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
        if len(parts) != 3:
            raise ValueError
    except ValueError:
        raise ValueError(f"eps_sweep must be start:stop:step, e.g. 0:0.4:0.02. Received: eps_sweep={text!r}") from None
    if not (step > 0 and 0 <= start <= stop <= 1):
        raise ValueError(f"eps_sweep needs 0 <= start <= stop <= 1 and step > 0. Received: eps_sweep={text!r}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return tuple(round(start + k * step, 10) for k in range(count))


def format_eps_sweep(values: tuple[float, ...]) -> str:
    """The text `parse_eps_sweep` turns back into `values`: start:stop:step where they are on one
    grid, else the values separated by commas."""
    if len(values) > 2:
        text = f"{values[0]!r}:{values[-1]!r}:{round(values[1] - values[0], 10)!r}"
        if parse_eps_sweep(text) == tuple(values):
            return text
    return ",".join(repr(float(v)) for v in values)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation (defaults: the paper's protocol).

    Attributes:
      dataset: "mnist" or "fashion_mnist".
      attacks: which of "fgsm", "bim", "pgd" to run.
      eps: L-inf attack size; None picks the dataset's (0.3 MNIST, 0.1 Fashion-MNIST).
      steps: steps of BIM and PGD.
      step_size: their step size; None means eps / 10 (at every eps of a sweep).
      restarts: PGD's random restarts.
      num_examples: the first N test images.
      pgd_examples: PGD attacks only the first N of those (None: all of them), so that many
        restarts stay affordable where FGSM and BIM run on every image; its accuracy is over those N.
      batch_size: images per compiled attack call; None picks the device's default.
      eps_sweep: further eps values to attack at (for the accuracy-against-eps figure): start:stop:step
        (stop included), e.g. 0:0.4:0.02, or values separated by commas.
      loss: "ce" or "cw" (see `attacks.per_example_loss`).
      backward: the saturation's gradient in the attack: "identity" (BPDA) or "smooth".
      steepness: slope of the smooth backward pass; None keeps the model's.
      seed: seeds PGD's random starts.
      certify: also compute certified accuracy (a sound lower bound, `polar_tf.certify`) at
        every eps, and check per example that no certified image is broken by any attack.
    """

    dataset: str = choice("mnist", DATASETS)
    attacks: tuple[str, ...] = ATTACKS
    eps: float | None = None
    steps: int = DEFAULT_STEPS
    step_size: float | None = None
    restarts: int = DEFAULT_RESTARTS
    num_examples: int = 10000
    pgd_examples: int | None = None
    batch_size: int | None = None
    eps_sweep: tuple[float, ...] = dataclasses.field(
        default=(), metadata={"parse": parse_eps_sweep, "format": format_eps_sweep})
    loss: str = choice("ce", LOSSES)
    backward: str = choice("identity", BACKWARDS)
    steepness: float | None = None
    seed: int = 0
    certify: bool = False

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        object.__setattr__(self, "attacks", tuple(self.attacks))
        if not self.attacks:
            raise ValueError("attacks must name at least one of fgsm, bim, pgd")
        for name in self.attacks:
            check_choice("attacks", name, ATTACKS)
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks must not repeat. Received: attacks={','.join(self.attacks)}")
        if self.eps is None:
            object.__setattr__(self, "eps", DEFAULT_EPS[self.dataset])
        for eps in (self.eps, *self.eps_sweep):
            if not (math.isfinite(eps) and 0.0 <= eps <= 1.0):
                raise ValueError(f"eps must be in [0, 1]. Received: eps={eps}")
        for name in ("steps", "restarts", "num_examples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value}")
        if self.pgd_examples is not None and not (isinstance(self.pgd_examples, int) and 0 < self.pgd_examples <= self.num_examples):
            raise ValueError(f"pgd_examples must be a positive integer <= num_examples ({self.num_examples}). "
                             f"Received: pgd_examples={self.pgd_examples}")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer. Received: batch_size={self.batch_size}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be > 0. Received: step_size={self.step_size}")
        check_choice("loss", self.loss, LOSSES)
        check_choice("backward", self.backward, BACKWARDS)
        if self.steepness is not None and not (math.isfinite(self.steepness) and self.steepness > 0):
            raise ValueError(f"steepness must be > 0. Received: steepness={self.steepness}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0. Received: seed={self.seed}")

    @property
    def eps_values(self) -> list[float]:
        """Every eps attacked: the sweep and eps itself, ascending."""
        return sorted({float(self.eps), *map(float, self.eps_sweep)})

    def step_size_at(self, eps: float) -> float:
        return eps / 10 if self.step_size is None else self.step_size

    def examples_of(self, attack: str, num_examples: int) -> int:
        """How many of the first `num_examples` test images `attack` runs on."""
        return min(num_examples, self.pgd_examples or num_examples) if attack == "pgd" else num_examples


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of the adaptive suite.

    How this relates to AutoAttack's "standard" version (Croce & Hein 2020; APGD-CE, APGD-T, FAB-T,
    Square, each on the examples the ones before left robust), whose budgets are the defaults here:
      - APGD-CE: 100 iterations, 1 restart, cross-entropy, step 2 eps, momentum 0.75, the same
        checkpoints and step-halving conditions (`polar_tf.apgd`); here also APGD-DLR (AutoAttack's
        "plus" and "rand" versions use it) and a run per backward pass of the saturation;
      - APGD-T: the targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) towards each of
        the 9 classes ranked after the top one by the clean logits, 100 iterations each, 1 restart,
        the same random start for every target;
      - FAB-T (minimum-norm, targeted) is left out: it was the weakest of AutoAttack's four on this
        project's models in a cross-check with AutoAttack's code (29.0% against 16.0-17.5% for the APGDs
        on the shipped Fashion-MNIST model), and it finds nothing the worst case here would miss;
      - Square: 5,000 queries, p_init 0.8, the halving schedule at fixed iterations (not rescaled to
        the budget), margin loss, one restart, as AutoAttack's; here raised further while it keeps
        fooling what the gradient attacks missed;
      - every attack runs on every example (not only on those the previous attacks left robust),
        which costs more and gives the same worst case.
    The paper's PGD, FGSM, transfer and noise are this suite's additions.

    Attributes:
      dataset: "mnist" or "fashion_mnist".
      eps: L-inf attack size; None picks the dataset's (0.3 MNIST, 0.1 Fashion-MNIST).
      num_examples: the first N test images.
      batch_size: images per compiled call; None picks the device's default.
      seed: seeds every random start, square and noise.
      backwards: backward passes of the saturation each gradient attack runs with (models with a
        saturation; the others have one gradient).
      steepness: slope of the smooth backward pass; None keeps the model's.
      pgd_steps, pgd_restarts: PGD's steps (of eps / 10) and restarts; also the transfer attack's.
      apgd_iterations, apgd_restarts: APGD's iterations and restarts (every loss; APGD-T runs the
        restarts for each target class).
      apgd_target_classes: APGD-T's target classes (AutoAttack's standard version: 9).
      square_queries: the Square attack's query budget per example.
      square_p_init: its initial square size (fraction of the pixels).
      transfer_from: a .keras file or workdir whose PGD examples are evaluated on each model.
      check_examples: examples the eps_to_half and more_budget checks use (the first ones).
      certify: also compute certified accuracy (a sound lower bound, `polar_tf.certify`) at eps,
        and check per example that no certified image is broken by any attack of the suite.
    """

    dataset: str = choice("mnist", DATASETS)
    eps: float | None = None
    num_examples: int = 10000
    batch_size: int | None = None
    seed: int = 0
    backwards: tuple[str, ...] = BACKWARDS
    steepness: float | None = None
    pgd_steps: int = DEFAULT_STEPS
    pgd_restarts: int = DEFAULT_RESTARTS
    apgd_iterations: int = 100
    apgd_restarts: int = 1
    apgd_target_classes: int = 9
    square_queries: int = DEFAULT_QUERIES
    square_p_init: float = DEFAULT_P_INIT
    transfer_from: str | None = None
    check_examples: int = 1000
    certify: bool = False

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}. Received: dataset={self.dataset!r}")
        if self.eps is None:
            object.__setattr__(self, "eps", DEFAULT_EPS[self.dataset])
        if not (math.isfinite(self.eps) and 0.0 < self.eps < HALF):
            raise ValueError(f"eps must be in (0, 0.5). Received: eps={self.eps}")
        object.__setattr__(self, "backwards", tuple(self.backwards))
        if not self.backwards or len(set(self.backwards)) != len(self.backwards):
            raise ValueError(f"backwards must name identity and/or smooth once each. Received: {self.backwards}")
        for backward in self.backwards:
            if backward not in BACKWARDS:
                raise ValueError(f"backwards must be among {', '.join(BACKWARDS)}. Received: {backward!r}")
        for name in ("num_examples", "pgd_steps", "pgd_restarts", "apgd_iterations", "apgd_restarts",
                     "apgd_target_classes", "check_examples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value}")
        if not (isinstance(self.square_queries, int) and self.square_queries >= 2):
            raise ValueError(f"square_queries must be an integer >= 2. Received: square_queries={self.square_queries}")
        if not 0 < self.square_p_init <= 1:
            raise ValueError(f"square_p_init must be in (0, 1]. Received: square_p_init={self.square_p_init}")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer. Received: batch_size={self.batch_size}")
        if self.steepness is not None and not (math.isfinite(self.steepness) and self.steepness > 0):
            raise ValueError(f"steepness must be > 0. Received: steepness={self.steepness}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0. Received: seed={self.seed}")


# evaluate.py's suites (`polar_tf.suites`), each with its config.
SUITES = {"standard": EvalConfig, "adaptive": AdaptiveConfig}
# Every setting flag of evaluate.py: the fields of both configs, each once.
FIELDS = tuple(dict.fromkeys(field.name for cls in SUITES.values() for field in dataclasses.fields(cls)))

WHY_NOT = {"adaptive": "it runs every attack; its PGD takes --pgd_steps and --pgd_restarts",
           "standard": "they are the adaptive suite's settings"}


def settings_config(suite: str, given: Mapping[str, Any], quick: bool = False,
                    dataset: str | None = None) -> EvalConfig | AdaptiveConfig:
    """The config of `suite` from its setting flags given on the command line.

    Needs no Keras: evaluate.py checks its flags with it before loading Keras, on the dataset given
    (or the config's default: the dataset only picks eps's default, which both configs accept).

    Args:
      suite: "standard" or "adaptive".
      given: {flag: value} of the setting flags on the command line (raw flag values: lists, text).
      quick: fill the settings not given from QUICK[suite] (a one-minute try, not the protocol).
      dataset: the dataset to evaluate on, over `given`'s (`suites.suite_config` resolves it).

    Raises:
      ValueError: a flag of the other suite is given, or a value is out of range.
    """
    cls = SUITES[suite]
    own = {field.name for field in dataclasses.fields(cls)}
    foreign = [f"--{name}" for name in given if name not in own]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} do not apply to --suite={suite} ({WHY_NOT[suite]})")
    values = {**(QUICK[suite] if quick else {}), **given}
    return cli.config_from_flags(cls, values if dataset is None else {**values, "dataset": dataset})
