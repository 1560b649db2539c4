"""The staged training schedule of the paper, as a pure function of the epoch.

With E = epochs_per_stage (20 in the paper), for the polarized model:
  stage 1, epochs [0, E):   no saturation, regularizer B1, lambda = w * epoch / E
  stage 2, epochs [E, 2E):  no saturation, regularizer B2, lambda = w * (epoch - E) / E
  stage 3, epochs [2E, 3E): saturation on, no regularizer, front end frozen
Every model trains 3E epochs with Adam; lr is divided by 10 for the epochs after epoch
round(lr_decay_epoch * 3E) (epochs 51-59 of 60, as in the original). The baseline and
direct-quantization models have one stage.

With certified_training, stage 3 (or every epoch of a one-stage model) trains on the interval
bound propagation loss instead, with eps and kappa ramped as `certified_ramp` says.
"""

from __future__ import annotations

import dataclasses

from keras import ops

from polar_tf.config import Config


@dataclasses.dataclass(frozen=True)
class Phase:
    """What the schedule prescribes for one epoch."""

    epoch: int
    stage: int
    regularizer: str  # "none", "b1" or "b2"
    reg_weight: float
    saturate: bool
    frontend_trainable: bool
    lr: float
    certified: bool = False  # trained with the interval bound propagation loss


def stage_epochs(config: Config, stage: int) -> range:
    """The epochs (0-based, global) that `stage` covers."""
    if stage not in range(1, config.num_stages + 1):
        raise ValueError(f"stage must be in 1..{config.num_stages} for model {config.model!r}. Received: stage={stage}")
    if config.num_stages == 1:
        return range(config.total_epochs)
    e = config.epochs_per_stage
    return range((stage - 1) * e, stage * e)


def lr_at(config: Config, epoch: int) -> float:
    last_full_rate = round(config.lr_decay_epoch * config.total_epochs)
    return config.lr * (0.1 if epoch > last_full_rate else 1.0)


def phase(config: Config, epoch: int) -> Phase:
    """The schedule's settings for `epoch` (0-based)."""
    if not 0 <= epoch < config.total_epochs:
        raise ValueError(f"epoch must be in [0, {config.total_epochs}). Received: epoch={epoch}")
    lr = lr_at(config, epoch)
    if config.model != "polarized":
        return Phase(epoch, 1, "none", 0.0, False, True, lr, config.certified_training)
    e = config.epochs_per_stage
    stage = epoch // e + 1
    if stage == 1:
        return Phase(epoch, 1, "b1", config.reg_max_weight * epoch / e, False, True, lr)
    if stage == 2:
        return Phase(epoch, 2, "b2", config.reg_max_weight * (epoch - e) / e, False, True, lr)
    return Phase(epoch, 3, "none", 0.0, True, False, lr, config.certified_training)


def certified_start(config: Config) -> int:
    """The first epoch of certified training (stage 3's, or 0 for a one-stage model)."""
    return config.total_epochs - config.certified_epochs


def certified_ramp(config: Config, epochs_done):
    """(eps, kappa) of the certified loss after `epochs_done` epochs of certified training.

    Gowal et al.'s ramps: ibp_warmup_epochs at eps 0 and kappa 1, then over ibp_ramp_epochs eps
    rises linearly to ibp_eps and kappa falls linearly to ibp_kappa_final; both then stay.

    Args:
      config: a config with certified_training on.
      epochs_done: epochs since certified training began, fractional (batches / batches per
        epoch): a Python float or a scalar tensor (the train step computes it per batch).

    Returns:
      (eps, kappa), scalar tensors.
    """
    done = ops.convert_to_tensor(epochs_done, dtype="float32")
    progress = ops.clip((done - config.ibp_warmup_epochs) / config.ibp_ramp_epochs, 0.0, 1.0)
    return config.ibp_eps * progress, 1.0 - (1.0 - config.ibp_kappa_final) * progress
