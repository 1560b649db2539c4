"""Adversarial training (Madry et al.): the train step sees PGD examples within eps."""

import keras
import numpy as np
import pytest
from keras import ops

from polar_tf import adversarial_training, attacks, models, training
from polar_tf.config import Config


def _loss(model, x, y):
    logits = ops.convert_to_numpy(model(x))
    shifted = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]))


def test_adversarial_epoch_trains_on_pgd_examples_within_eps(mnist):
    (x_train, y_train), _ = mnist
    x, y = x_train[:128], y_train[:128]
    config = Config(model="adversarial", epochs_per_stage=1, adv_steps=5, batch_size=64)
    # Madry's reach of 40 x 0.01 = 0.4 at eps 0.3, spread over 5 steps.
    assert config.eps == 0.3 and config.adv_step_size == pytest.approx(0.08)
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    training.compile_for_stage(model, config, 1)
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)  # a model worth attacking
    clean_loss = _loss(model, x, y)
    record = training.train_epoch(model, config, 0, x, y)
    # fit's loss is that of the PGD inputs, well above the clean loss of the model it started from.
    assert np.isfinite(record["loss"]) and record["loss"] > clean_loss + 0.1

    # The PGD inputs the train step computes: in the eps-ball and [0, 1], really perturbed, and
    # adversarial: PGD raises the loss beyond its own random start.
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, x[:64].shape).astype(np.float32)
    x_adv = ops.convert_to_numpy(adversarial_training.adversarial_examples(
        model, x[:64], y[:64], noise, config.eps, config.adv_step_size, config.adv_steps))
    attacks.check_adversarial(x_adv, x[:64], config.eps)
    assert np.abs(x_adv - x[:64]).mean() > 0.05
    random_start = np.clip(x[:64] + 0.3 * noise, 0.0, 1.0)
    assert _loss(model, x_adv, y[:64]) > _loss(model, random_start, y[:64]) + 0.1
    assert _loss(model, random_start, y[:64]) > _loss(model, x[:64], y[:64])


def test_fashion_mnist_settings():
    config = Config(dataset="fashion_mnist", model="adversarial")
    assert (config.eps, config.adv_steps) == (0.1, 40)
    assert config.adv_step_size == pytest.approx(0.1 / 30)
    assert Config(dataset="fashion_mnist", model="adversarial", adv_steps=10).adv_step_size == pytest.approx(0.4 / 30)
    assert Config(model="adversarial", adv_steps=10, adv_step_size=0.05).adv_step_size == 0.05
    with pytest.raises(ValueError, match="Received: adv_steps=0"):
        Config(model="adversarial", adv_steps=0)


def test_warmup_ramps_eps_linearly_batch_by_batch_then_holds(mnist):
    config = Config(model="adversarial", adv_warmup_epochs=2)
    # 2 warm-up epochs of 4 batches: 8 batches ramp 1/8, 2/8, ..., 8/8; then the full eps.
    scales = [training.adversarial_scale(config, epoch, batch, 4) for epoch, batch in [(0, 0), (0, 3), (1, 1), (1, 3), (2, 0)]]
    assert scales == [1 / 8, 4 / 8, 6 / 8, 1.0, 1.0]
    assert training.adversarial_scale(Config(model="adversarial"), 0, 0, 4) == 1.0
    with pytest.raises(ValueError, match="Received: adv_warmup_epochs=-1"):
        Config(model="adversarial", adv_warmup_epochs=-1)
    (x_train, y_train), _ = mnist
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, x_train[:64].shape).astype(np.float32)
    x_adv = training.adversarial_batch(model, config, x_train[:64], y_train[:64], noise, scale=0.5)
    distance = np.abs(x_adv - x_train[:64])
    assert distance.max() <= 0.15 + 1e-6 and distance.max() > 0.1
