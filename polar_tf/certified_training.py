"""Certified training: the interval bound propagation (IBP) loss of Gowal et al. (2018).

For a batch (x, y), with eps and kappa ramped by `schedule.certified_ramp`,

    loss = kappa * CE(y, clean logits) + (1 - kappa) * CE(y, worst-case logits),

where the worst-case logits are z_j = -m_j, m_j the lower bound of logit_y - logit_j over the
attack box that `certify.margin_bounds` computes (z_y = 0): Gowal et al.'s worst case with the last
layer elided. Cross-entropy grows with every logit_j - logit_y, so CE(y, z) bounds from above the
cross-entropy of every image in the box. The box starts where the certificate's does: for the
polarized model, the exact set of saturated front-end outputs (the front end's Hölder interval of
z, then the saturation: only outputs near a jump can take a second level); for the baseline, the
input box [x - eps, x + eps] clipped to [0, 1]; for direct quantization, the pixel saturation's.

The loss runs inside Keras' compiled train step, on TensorFlow and JAX alike, through
`CertifiedTrainer.compute_loss`: a model that wraps the trained network, shares its variables and
its optimizer, and adds only the ramp's position. The network itself stays the plain functional
model that is saved, certified and attacked; the bounds it is trained on are computed by the same
code (`certify.margin_bounds`) as the bounds `certify.certify` reports.

    trainer = certified_training.trainer(model, config, epoch, len(x), metrics)
    trainer.fit(x, y, batch_size=config.batch_size, epochs=epoch + 1, initial_epoch=epoch)
"""

from __future__ import annotations

import math

import keras
from keras import ops

from polar_tf import certify, progress, schedule
from polar_tf.config import Config

VERIFIED_FIT_ACCURACY = "verified_fit_accuracy"


def worst_case_logits(network: keras.Model, x, y, eps):
    """Gowal et al.'s worst-case logits over each image's attack box: -m_j, m_j the lower bound of
    logit_y - logit_j (`certify.margin_bounds`, last layer elided); 0 at the label.

    Args:
      network: a chain of layers that `certify.check_supported` accepts.
      x: images [B, ...] in [0, 1].
      y: integer labels [B].
      eps: the attack radius, a float or scalar tensor.

    Returns:
      A tensor [B, classes].
    """
    layers = certify.check_supported(network)
    margins, _, _ = certify.margin_bounds(layers, *certify.input_box(x, eps), y)
    return -margins


def ibp_loss(y, clean_logits, worst_logits, kappa, sample_weight=None):
    """kappa * CE(y, clean_logits) + (1 - kappa) * CE(y, worst_logits), each averaged over the batch."""
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return kappa * cross_entropy(y, clean_logits, sample_weight) + (1.0 - kappa) * cross_entropy(
        y, worst_logits, sample_weight
    )


def verified(worst_logits, y):
    """Per example, whether every worst-case logit of another class is below the label's (0).

    No float tolerance: a training statistic, not a certificate (`certify` withholds margins).
    """
    label = ops.one_hot(ops.convert_to_tensor(y, dtype="int32"), worst_logits.shape[-1], dtype=worst_logits.dtype)
    return ops.max(ops.where(label > 0, -math.inf, worst_logits), axis=1) < 0.0


class CertifiedTrainer(keras.Model):
    """Trains `network` on the IBP loss inside Keras' compiled train step.

    Its trainable variables are the network's (the front end's only while it is trainable), so
    compiling it with the network's optimizer carries that optimizer's state on. One non-trainable
    variable, `position` (batches of certified training done), sets eps and kappa per batch in the
    compiled step; `trainer` sets it at the start of each epoch from the epoch alone, so a resumed
    run ramps exactly as an uninterrupted one.

    Args:
      network: the model to train (a chain of layers `certify.check_supported` accepts).
      config: the run's config, certified_training on.
      steps_per_epoch: batches per epoch.
    """

    def __init__(self, network: keras.Model, config: Config, steps_per_epoch: int, **kwargs):
        super().__init__(name=f"{network.name}_certified", **kwargs)
        certify.check_supported(network)
        self.network = network
        self.ramp_config = config
        self.steps_per_epoch = int(steps_per_epoch)
        self.position = self.add_weight(shape=(), initializer="zeros", trainable=False, name="ibp_position")
        self.verified_accuracy = keras.metrics.Mean(name=VERIFIED_FIT_ACCURACY)
        self.built = True  # The network is built; this model adds no weights of its own to build.

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def ramp(self):
        """(eps, kappa) of the current batch."""
        return schedule.certified_ramp(self.ramp_config, self.position / self.steps_per_epoch)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        eps, kappa = self.ramp()
        worst = worst_case_logits(self.network, x, y, eps)
        loss = ibp_loss(y, y_pred, worst, kappa, sample_weight)
        for extra in self.losses:  # the front end's regularizer term (its weight is 0 in certified epochs)
            loss = loss + ops.sum(extra)
        self.verified_accuracy.update_state(ops.cast(verified(worst, y), "float32"))
        if training:
            self.position.assign_add(1.0)
        return loss


_last: list[CertifiedTrainer] = []  # the trainer of the latest call, reused while it fits


def trainer(network: keras.Model, config: Config, epoch: int, num_examples: int, metrics: list) -> CertifiedTrainer:
    """The compiled `CertifiedTrainer` of `network` for `epoch`, its ramp placed at the epoch's start.

    The last trainer is reused while the network, its optimizer, the config and the epoch length
    stay the same (a new one traces its train step again). Compiling the network (a new stage, a
    resume) gives it a new optimizer, and so a new trainer compiled with that optimizer.

    Args:
      network: the compiled model being trained.
      config: the run's config, certified_training on.
      epoch: the global epoch about to be trained (`schedule.certified_start` or later).
      num_examples: training images per epoch.
      metrics: the metrics to compile a new trainer with (those the network was compiled with).
    """
    steps = -(-num_examples // config.batch_size)
    reusable = _last and (
        _last[0].network is network and _last[0].optimizer is network.optimizer
        and _last[0].steps_per_epoch == steps and _last[0].ramp_config == config
    )
    if not reusable:
        fresh = CertifiedTrainer(network, config, steps)
        fresh.compile(
            optimizer=network.optimizer,
            metrics=metrics,
            steps_per_execution=config.steps_per_execution,
            jit_compile=config.jit_compile,
        )
        _last[:] = [fresh]
    _last[0].position.assign(float((epoch - schedule.certified_start(config)) * steps))
    return _last[0]


def ramp_record(config: Config, epoch: int, num_examples: int) -> dict[str, float]:
    """eps and kappa of the last batch of `epoch`, for metrics.jsonl."""
    steps = -(-num_examples // config.batch_size)
    eps, kappa = schedule.certified_ramp(config, epoch - schedule.certified_start(config) + 1 - 1 / steps)
    return {"ibp_eps": float(eps), "ibp_kappa": float(kappa)}


def certified_accuracy(model: keras.Model, x, y, eps: float) -> float:
    """`certify.certify`'s interval certified accuracy, without its progress bar (for epoch logs)."""
    shown = progress.enabled()
    progress.enable(False)
    try:
        return certify.certify(model, x, y, eps).ibp_accuracy
    finally:
        progress.enable(shown)
