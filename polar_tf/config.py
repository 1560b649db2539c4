"""The one home of every hyperparameter.

Defaults follow the original implementation (the paper's code: its hyperparameters, schedule and
initialisation, compared detail by detail in README's "Fidelity of training"):

    python train.py --dataset=mnist            # c = 0.5, eps = 0.3, 60 epochs, ~99% clean
    python train.py --dataset=fashion_mnist    # c = 0.3, eps = 0.1

Flags only fill a `Config`; library code never reads flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

DATASETS = ("mnist", "fashion_mnist")
MODELS = ("polarized", "baseline", "direct_quant", "adversarial")
BACKWARDS = ("identity", "smooth")
# How the classifier's conv and dense layers are initialised: "uniform_fan_in" is PyTorch's default
# (weights and biases uniform in +-1/sqrt(fan_in)), which the original implementation kept;
# "glorot" is Keras' default (Glorot-uniform weights, zero biases).
CLASSIFIER_INITS = ("uniform_fan_in", "glorot")
# Where training and attacks run (`polar_tf.parallel`): one device, or data-parallel on every device.
DISTRIBUTIONS = ("none", "data_parallel")

# Per-dataset defaults of the paper: the front end's jump c and the attack size eps. The paper does
# not say which jump its Fashion-MNIST row used; the original's training script defaults to 0.2 and
# one released checkpoint uses it, but its README trains with 0.3, its published training
# trajectory and second checkpoint use 0.3, that checkpoint's clean accuracy (87.5%) is the paper's
# (87.3%; the c = 0.2 one: 88.3%), and here c = 0.3 reproduces the paper's FGSM and BIM within
# 5 points where c = 0.2 falls 10-26 points short: over a seed spread (results/seed_spread/), the
# five c = 0.3 runs average 5.2 and 5.5 points below the paper's FGSM and BIM, the four c = 0.2
# runs 16-17 points below (README, "Fidelity of training").
DEFAULT_JUMP = {"mnist": 0.5, "fashion_mnist": 0.3}
DEFAULT_EPS = {"mnist": 0.3, "fashion_mnist": 0.1}
# Direct quantization thresholds the pixels themselves; the reference used 0.2.
DIRECT_QUANT_JUMP = 0.2


def choice(default: str, choices: tuple[str, ...]) -> Any:
    """A config field that takes one of `choices` (its flag is an enum of them)."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def _parse_jit_compile(text: str) -> str | bool:
    """--jit_compile's text: "auto", or true/false (Keras' XLA switch)."""
    return {"true": True, "false": False}.get(text.lower(), text)


# Fields added after runs had been recorded, with the value those earlier runs trained with.
LEGACY_VALUES = {"adam_epsilon": 1e-7, "classifier_init": "glorot"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one training run.

    Attributes:
      dataset: "mnist" or "fashion_mnist".
      model: "polarized" (front end + CNN), "baseline" (CNN on pixels), "direct_quant"
        (saturation on pixels + CNN) or "adversarial" (the baseline CNN trained on PGD examples,
        Madry et al. 2018).
      jump: the saturation jump c; None picks the dataset (or direct_quant) default.
      num_filters, kernel_size: the front end's filters (25 of 5x5).
      backward: gradient of the saturation: "identity" (straight-through) or
        "smooth" (derivative of a tanh surrogate with `steepness`).
      steepness: slope s of the smooth surrogate.
      sigma1, sigma2: widths of the B1 and B2 regularizers.
      reg_max_weight: lambda at the end of its ramp in stages 1 and 2.
      epochs_per_stage: epochs in each of the 3 stages (20 in the paper).
      batch_size, lr: Adam's batch size and learning rate.
      adam_epsilon: Adam's epsilon (PyTorch's 1e-8, as in the original; Keras' default is 1e-7).
      classifier_init: "uniform_fan_in" (PyTorch's default, as in the original) or "glorot"
        (Keras' default) for the classifier's layers; the front end is He-uniform either way.
      lr_decay_epoch: fraction of the schedule after which lr is divided by 10: epochs after
        round(lr_decay_epoch * total_epochs) train at lr / 10 (epochs 51-59 of 60, as in the
        original, which lowered it at the end of epoch 50).
      seed: seeds weights and the per-epoch shuffling.
      train_examples: use only the first N training images (0: all).
      steps_per_execution: train steps per compiled call (a speed knob; same maths).
      jit_compile: Keras' XLA switch for the train step ("auto", True or False; speed only).
      eps: L-inf attack size: the dataset's default for evaluation and adversarial training.
      adv_steps: PGD steps per training batch of the adversarial model (40, Madry et al.).
      adv_step_size: their size; None keeps the reach of Madry's MNIST recipe (40 steps of 0.01 at
        eps 0.3: 4/3 eps in all) whatever the number of steps, i.e. eps / 30 * 40 / adv_steps
        (eps / 30 at 40 steps, 1/300 at Fashion-MNIST's eps 0.1).
      adv_warmup_epochs: epochs over which adversarial training ramps its eps (and step size)
        linearly up to eps, batch by batch; 0 (Madry et al.) attacks at the full eps from the start.
        A short budget at MNIST's eps 0.3 can collapse to a constant prediction without it.
      certified_training: train with interval bound propagation (`polar_tf.certified_training`):
        the polarized model's stage 3 (front end frozen, saturation on), or every epoch of the
        baseline and direct_quant models, minimizes kappa * CE(clean) + (1 - kappa) * CE(worst case).
      ibp_eps: the eps certified training ramps up to; None: eps.
      ibp_warmup_epochs: certified epochs at the start trained with eps 0 and kappa 1 (plain
        training on the clean loss) before the ramp.
      ibp_ramp_epochs: epochs over which eps rises linearly from 0 to ibp_eps and kappa from 1 to
        ibp_kappa_final, batch by batch (Gowal et al. 2018); None: half the certified epochs.
      ibp_kappa_final: kappa after the ramp (0.5, Gowal et al.).
      init_from: a model file that the stage run (--stage=2 or 3) starts from in place of the
        run folder's checkpoint of the stage before; e.g. --stage=3 --certified_training
        --init_from=pretrained/mnist_polarized.keras trains with IBP after that model's clean
        stage 3 (certified training as a 4th stage). None: the run folder's checkpoint.
    """

    dataset: str = choice("mnist", DATASETS)
    model: str = choice("polarized", MODELS)
    jump: float | None = None
    num_filters: int = 25
    kernel_size: int = 5
    backward: str = choice("identity", BACKWARDS)
    steepness: float = 8.0
    sigma1: float = 0.35
    sigma2: float = 0.15
    reg_max_weight: float = 1.0
    epochs_per_stage: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    adam_epsilon: float = 1e-8
    classifier_init: str = choice("uniform_fan_in", CLASSIFIER_INITS)
    lr_decay_epoch: float = 50 / 60
    seed: int = 0
    train_examples: int = 0
    steps_per_execution: int = 1
    jit_compile: str | bool = dataclasses.field(default="auto", metadata={"parse": _parse_jit_compile, "format": str})
    eps: float | None = None
    adv_steps: int = 40
    adv_step_size: float | None = None
    adv_warmup_epochs: int = 0
    certified_training: bool = False
    ibp_eps: float | None = None
    ibp_warmup_epochs: int = 0
    ibp_ramp_epochs: int | None = None
    ibp_kappa_final: float = 0.5
    init_from: str | None = None

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, MODELS)
        check_choice("backward", self.backward, BACKWARDS)
        check_choice("classifier_init", self.classifier_init, CLASSIFIER_INITS)
        if self.jump is None:
            default = DIRECT_QUANT_JUMP if self.model == "direct_quant" else DEFAULT_JUMP[self.dataset]
            object.__setattr__(self, "jump", default)
        if self.eps is None:
            object.__setattr__(self, "eps", DEFAULT_EPS[self.dataset])
        if self.adv_step_size is None and isinstance(self.adv_steps, int) and self.adv_steps > 0:
            object.__setattr__(self, "adv_step_size", self.eps / 30 * (40 / self.adv_steps))
        _check_open_unit("jump", self.jump)
        if not (isinstance(self.eps, (int, float)) and 0.0 <= self.eps <= 1.0):
            raise ValueError(f"eps must be in [0, 1]. Received: eps={self.eps}")
        for name in ("num_filters", "kernel_size", "epochs_per_stage", "batch_size", "steps_per_execution", "adv_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value}")
        if not (isinstance(self.adv_warmup_epochs, int) and self.adv_warmup_epochs >= 0):
            raise ValueError(f"adv_warmup_epochs must be an integer >= 0. Received: adv_warmup_epochs={self.adv_warmup_epochs}")
        if not (isinstance(self.train_examples, int) and self.train_examples >= 0):
            raise ValueError(
                f"train_examples must be >= 0 (0 means all). Received: train_examples={self.train_examples}"
            )
        for name in ("steepness", "sigma1", "sigma2", "lr", "adam_epsilon", "adv_step_size"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number. Received: {name}={value}")
        if not (math.isfinite(self.reg_max_weight) and self.reg_max_weight >= 0):
            raise ValueError(f"reg_max_weight must be >= 0. Received: reg_max_weight={self.reg_max_weight}")
        if not 0.0 < self.lr_decay_epoch <= 1.0:
            raise ValueError(f"lr_decay_epoch must be in (0, 1]. Received: lr_decay_epoch={self.lr_decay_epoch}")
        if self.certified_training:
            self._check_certified_training()

    def _check_certified_training(self) -> None:
        if self.model == "adversarial":
            raise ValueError("certified_training applies to the polarized, baseline and direct_quant models. "
                             "Received: model='adversarial'")
        if self.ibp_eps is None:
            object.__setattr__(self, "ibp_eps", self.eps)
        if self.ibp_ramp_epochs is None:
            object.__setattr__(self, "ibp_ramp_epochs", max(1, self.certified_epochs // 2))
        if not (isinstance(self.ibp_eps, (int, float)) and 0.0 <= self.ibp_eps <= 1.0):
            raise ValueError(f"ibp_eps must be in [0, 1]. Received: ibp_eps={self.ibp_eps}")
        if not (isinstance(self.ibp_warmup_epochs, int) and self.ibp_warmup_epochs >= 0):
            raise ValueError(f"ibp_warmup_epochs must be an integer >= 0. Received: ibp_warmup_epochs={self.ibp_warmup_epochs}")
        if not (isinstance(self.ibp_ramp_epochs, int) and self.ibp_ramp_epochs > 0):
            raise ValueError(f"ibp_ramp_epochs must be a positive integer. Received: ibp_ramp_epochs={self.ibp_ramp_epochs}")
        if self.ibp_warmup_epochs + self.ibp_ramp_epochs > self.certified_epochs:
            raise ValueError(
                f"ibp_warmup_epochs + ibp_ramp_epochs must not exceed the epochs of certified training ({self.certified_epochs}). "
                f"Received: ibp_warmup_epochs={self.ibp_warmup_epochs}, ibp_ramp_epochs={self.ibp_ramp_epochs}"
            )
        if not (isinstance(self.ibp_kappa_final, (int, float)) and 0.0 <= self.ibp_kappa_final <= 1.0):
            raise ValueError(f"ibp_kappa_final must be in [0, 1]. Received: ibp_kappa_final={self.ibp_kappa_final}")

    @property
    def num_stages(self) -> int:
        """Stages of the schedule: 3 for the polarized model, 1 for the others."""
        return 3 if self.model == "polarized" else 1

    @property
    def total_epochs(self) -> int:
        """Every model trains for the same number of epochs (3 stages' worth)."""
        return 3 * self.epochs_per_stage

    @property
    def certified_epochs(self) -> int:
        """Epochs trained with the certified loss when certified_training is on: the polarized
        model's stage 3, every epoch of the others."""
        return self.epochs_per_stage if self.model == "polarized" else self.total_epochs

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """The config a config.json records; keys it predates take the value those runs used."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"Unknown config keys: {unknown}")
        return cls(**{**LEGACY_VALUES, **values})


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raises ValueError, quoting the value and the choices, unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}. Received: {name}={value!r}")


def _check_open_unit(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1). Received: {name}={value}")
