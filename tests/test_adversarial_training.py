"""Adversarial training in the compiled train step: its PGD is the host's, its steps train as
train_on_batch on the host's PGD examples would (warm-up and noise per batch included), and a run
resumed from an epoch checkpoint ends where an uninterrupted one does."""

import keras
import numpy as np
import pytest
from keras import ops

from polar_tf import adversarial_training, attacks, run_dir, training
from polar_tf.config import Config

CLASSES = 4
# Batches of 4, 12 images: 3 batches per epoch, run as a compiled call of 2 steps and one of 1.
CONFIG = Config(model="adversarial", eps=0.3, adv_steps=3, adv_step_size=0.1, adv_warmup_epochs=1, batch_size=4,
                steps_per_execution=2, epochs_per_stage=1)
# Float32 rounding of the same sums in another order (one compiled program against two), after at
# most 6 Adam steps of 1e-3 on weights of order 0.1-1; a wrong batch's noise, scale or weights moves
# them by about 1e-3.
WEIGHT_ATOL = 1e-5


def _network(seed: int = 0) -> keras.Model:
    """6x6 images, 4 classes: a small CNN of the model's kinds of layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x))
    training.compile_for_stage(model, CONFIG, 1)
    return model


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 6, 6, 1), dtype=np.float32), rng.integers(0, CLASSES, n).astype(np.int32)


def _weights(model):
    return [ops.convert_to_numpy(v) for v in model.trainable_variables]


def _noise(config: Config, batch_number: int, shape) -> np.ndarray:
    """The random start of the run's batch `batch_number`, as the trainer draws it."""
    seed = keras.random.SeedGenerator(config.seed)
    seed.state.assign(ops.cast(ops.convert_to_tensor([config.seed, batch_number]), seed.state.dtype))
    return ops.convert_to_numpy(keras.random.uniform(shape, minval=-1.0, maxval=1.0, seed=seed))


def test_the_attack_is_the_hosts_pgd_and_stays_valid():
    network = _network()
    x, y = _data(8)
    noise = np.random.default_rng(1).uniform(-1.0, 1.0, x.shape).astype(np.float32)
    eps, scale = CONFIG.eps, 0.5
    x_adv = ops.convert_to_numpy(adversarial_training.adversarial_examples(
        network, x, y, noise, eps * scale, CONFIG.adv_step_size * scale, CONFIG.adv_steps))
    host = training.adversarial_batch(network, CONFIG, x, y, noise, scale=scale)
    # Signs of the same gradients: equal up to the float32 rounding of eps * scale at the ball's edge.
    np.testing.assert_allclose(x_adv, host, rtol=0, atol=1e-6)
    attacks.check_adversarial(x_adv, x, eps * scale)
    start = np.clip(x + np.float32(eps * scale) * noise, 0.0, 1.0)
    assert np.abs(x_adv - start).max() > 0.05  # the steps moved it


def test_compiled_steps_train_as_train_on_batch_on_the_hosts_pgd_examples():
    x, y = _data(12)
    steps = 3
    compiled, host = _network(), _network()
    trainer = adversarial_training.trainer(compiled, CONFIG, 0, steps, training._fit_metrics())
    history = trainer.fit(adversarial_training.inputs(x, y), y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert float(ops.convert_to_numpy(trainer.position)) == steps

    losses = []
    for b in range(steps):
        xb, yb = x[4 * b : 4 * b + 4], y[4 * b : 4 * b + 4]
        scale = training.adversarial_scale(CONFIG, 0, b, steps)  # 1/3, 2/3, 1: a different eps per batch
        x_adv = training.adversarial_batch(host, CONFIG, xb, yb, _noise(CONFIG, b, xb.shape), scale=scale)
        losses.append(host.train_on_batch(x_adv, yb, return_dict=True)["loss"])
    for a, b in zip(_weights(compiled), _weights(host)):
        np.testing.assert_allclose(a, b, rtol=0, atol=WEIGHT_ATOL)
    assert history.history["loss"][-1] == pytest.approx(np.mean(losses), abs=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(_weights(compiled), _weights(_network()))) > 1e-3  # it trained


def test_an_epoch_resumed_from_its_checkpoint_trains_as_an_uninterrupted_run(tmp_path):
    x, y = _data(12)
    whole = _network()
    for epoch in range(2):
        training.train_epoch(whole, CONFIG, epoch, x, y)

    first = _network()
    training.train_epoch(first, CONFIG, 0, x, y)
    path = str(tmp_path / "epoch_0000.keras")
    run_dir.save_model(first, path)
    resumed = run_dir.load_model(path)
    training.compile_for_stage(resumed, CONFIG, 1, resumed.optimizer)  # as training._resume does
    record = training.train_epoch(resumed, CONFIG, 1, x, y)
    assert np.isfinite(record["loss"])
    for a, b in zip(_weights(resumed), _weights(whole)):
        np.testing.assert_allclose(a, b, rtol=0, atol=WEIGHT_ATOL)
