"""Adversarial training (Madry et al. 2018) inside Keras' compiled train step.

Each training batch (x, y) is replaced by PGD examples against the current weights, and the weights
take one step on the cross-entropy of those alone:

    x_0   = project(x + eps_b * u),  u uniform in [-1, 1]^n        (a random start in the eps-ball)
    x_t+1 = project(x_t + step_b * sign(d CE(x_t) / d x_t)),  t < adv_steps
    loss  = CE(y, network(x_adv)),  x_adv = x_adv_steps, no gradient through the attack

project is the attacks' projection onto the eps-ball around x and [0, 1], and the step is theirs
(`attacks.signed_gradient_step`, on `attacks.per_example_loss`'s "ce"): one implementation of PGD.
eps_b and step_b are config.eps and config.adv_step_size times the warm-up's scale of the batch
(`warmup_scale`). The attack reads the weights of the step it runs in, as constants
(`frozen_forward`), so the weight gradient flows through the final forward pass only.

All of it runs in `AdversarialTrainer`'s `call` while training, so `fit` runs it, with
`steps_per_execution` batches per compiled call, on TensorFlow and JAX alike. The trainer wraps the
network (the plain functional model that is saved and evaluated), shares its variables and its
optimizer, and adds two variables: `position` (batches of the run done, which places the warm-up)
and the noise's seed. `trainer` sets both at the start of each epoch from the epoch alone, so the
noise of a batch depends on (config.seed, epoch, batch) only and a resumed run trains as an
uninterrupted one.

    trainer = adversarial_training.trainer(model, config, epoch, steps, metrics)
    trainer.fit(adversarial_training.inputs(x, y), y, batch_size=config.batch_size, epochs=epoch + 1, initial_epoch=epoch)
"""

from __future__ import annotations

import keras
from keras import ops

from polar_tf import attacks, backend
from polar_tf.config import Config

IMAGE, LABEL = "image", "label"  # the trainer's inputs: the attack needs the labels too


def inputs(x, y) -> dict:
    """The trainer's inputs for images x and their labels y."""
    return {IMAGE: x, LABEL: y}


def warmup_scale(config: Config, batches_done, steps_per_epoch: int):
    """The fraction of eps (and of the step size) that the batch after `batches_done` batches of
    the run attacks with: a linear ramp over the first `adv_warmup_epochs` epochs, reaching 1 at
    their last batch, then 1.

    Args:
      config: the run's config.
      batches_done: a Python number or a scalar tensor (the train step reads it per batch).
      steps_per_epoch: batches per epoch.

    Returns:
      A scalar float32 tensor (1.0 without warm-up).
    """
    if config.adv_warmup_epochs == 0:
        return ops.convert_to_tensor(1.0, dtype="float32")
    done = ops.convert_to_tensor(batches_done, dtype="float32")
    return ops.minimum((done + 1.0) / float(config.adv_warmup_epochs * steps_per_epoch), 1.0)


def frozen_forward(network: keras.Model):
    """forward(x): the network's logits (training=False) at its variables' current values, taken as
    constants: a gradient through forward reaches x only. Inside a compiled train step the values
    are those of that step (JAX's stateless call included)."""
    trainable = [ops.stop_gradient(ops.convert_to_tensor(v)) for v in network.trainable_variables]
    non_trainable = [ops.stop_gradient(ops.convert_to_tensor(v)) for v in network.non_trainable_variables]
    return lambda x: network.stateless_call(trainable, non_trainable, x, training=False)[0]


def adversarial_examples(network: keras.Model, x, y, noise, eps, step_size, steps: int):
    """PGD examples of (x, y) against the network's current weights, with no gradient.

    Args:
      network: a model from images in [0, 1] to logits.
      x, y: the clean batch and its integer labels.
      noise: the random start in [-1, 1], shaped like x.
      eps, step_size: floats or scalar tensors.
      steps: signed-gradient steps.

    Returns:
      x_adv, a tensor shaped like x, in the eps-ball around x and in [0, 1].
    """
    value_and_grad = backend.forward_value_and_grad(frozen_forward(network))
    objective = lambda logits, labels: attacks.per_example_loss(logits, labels, "ce")  # noqa: E731
    x_adv = attacks.start(x, noise, eps)
    x_adv = attacks.signed_gradient_steps(value_and_grad, objective, x, y, x_adv, eps, step_size, steps)
    return ops.stop_gradient(x_adv)


class AdversarialTrainer(keras.Model):
    """Trains `network` on PGD examples of each batch inside Keras' compiled train step.

    Its inputs are `inputs(x, y)`; while training, `call` returns the network's logits on the
    batch's PGD examples (so fit's loss and accuracy are those on PGD inputs), otherwise on x. Its
    trainable variables are the network's, so compiling it with the network's optimizer carries
    that optimizer's state on. Non-trainable: `position`, the batches of the run done (it places
    the warm-up), and `noise_seed`'s state, which keys each batch's random start.

    Args:
      network: the model to train.
      config: the run's config (eps, adv_steps, adv_step_size, adv_warmup_epochs, seed).
      steps_per_epoch: batches per epoch.
    """

    def __init__(self, network: keras.Model, config: Config, steps_per_epoch: int, **kwargs):
        super().__init__(name=f"{network.name}_adversarial", **kwargs)
        self.network = network
        self.attack_config = config
        self.steps_per_epoch = int(steps_per_epoch)
        self.position = self.add_weight(shape=(), initializer="zeros", trainable=False, name="adv_position")
        self.noise_seed = keras.random.SeedGenerator(config.seed, name="adv_noise_seed")
        self.built = True  # The network is built; this model adds no weights of its own to build.

    def place(self, epoch: int) -> None:
        """Sets the position and the noise's seed to the start of `epoch`: batch b of epoch e is
        the run's batch e * steps_per_epoch + b, its noise keyed by (config.seed, that number)."""
        done = epoch * self.steps_per_epoch
        self.position.assign(float(done))
        self.noise_seed.state.assign(ops.cast(ops.convert_to_tensor([self.attack_config.seed, done]),
                                              self.noise_seed.state.dtype))

    def scale(self):
        """The warm-up's scale of the current batch."""
        return warmup_scale(self.attack_config, self.position, self.steps_per_epoch)

    def call(self, inputs, training=None):
        x = inputs[IMAGE]
        if not training:
            return self.network(x, training=training)
        config = self.attack_config
        scale = self.scale()
        noise = keras.random.uniform(ops.shape(x), minval=-1.0, maxval=1.0, dtype=x.dtype, seed=self.noise_seed)
        x_adv = adversarial_examples(self.network, x, inputs[LABEL], noise, config.eps * scale,
                                     config.adv_step_size * scale, config.adv_steps)
        self.position.assign_add(1.0)
        return self.network(x_adv, training=True)


_last: list[AdversarialTrainer] = []  # the trainer of the latest call, reused while it fits


def trainer(network: keras.Model, config: Config, epoch: int, steps_per_epoch: int, metrics: list) -> AdversarialTrainer:
    """The compiled `AdversarialTrainer` of `network`, placed at the start of `epoch`.

    The last trainer is reused while the network, its optimizer, the config and the epoch length
    stay the same (a new one traces its train step again). Compiling the network (a resume) gives
    it a new optimizer, and so a new trainer compiled with that optimizer.

    Args:
      network: the compiled model being trained.
      config: the run's config.
      epoch: the global epoch about to be trained.
      steps_per_epoch: batches per epoch.
      metrics: the metrics to compile a new trainer with (those the network was compiled with).
    """
    reusable = _last and (
        _last[0].network is network and _last[0].optimizer is network.optimizer
        and _last[0].steps_per_epoch == steps_per_epoch and _last[0].attack_config == config
    )
    if not reusable:
        fresh = AdversarialTrainer(network, config, steps_per_epoch)
        fresh.compile(
            optimizer=network.optimizer,
            loss=network.loss,
            metrics=metrics,
            steps_per_execution=config.steps_per_execution,
            jit_compile=config.jit_compile,
        )
        _last[:] = [fresh]
    _last[0].place(epoch)
    return _last[0]
