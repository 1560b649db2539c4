"""Small models the attack tests share: an MLP, its training, and a gradient-masking wrapper."""

import keras
from keras import ops


def mlp(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


def train(model: keras.Model, x, y) -> keras.Model:
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


def masked(model: keras.Model) -> keras.Model:
    """`model` with its logits rounded to multiples of 0.25 and a zero gradient: masks gradients."""
    inputs = keras.Input((28, 28, 1))
    logits = model(inputs)
    hard = keras.layers.Lambda(lambda z: 0.0 * z + ops.stop_gradient(ops.round(4.0 * z) / 4.0))(logits)
    return keras.Model(inputs, hard)
