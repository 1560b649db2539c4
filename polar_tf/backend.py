"""The only backend-specific code: gradients with respect to the input.

Everything else is written with `keras.ops` and runs on TensorFlow and JAX alike.
"""

from __future__ import annotations

from typing import Callable

import keras


def name() -> str:
    return keras.backend.backend()


def gradient(fn: Callable, x):
    """The gradient of a scalar function `fn` at `x`, computed eagerly.

    Args:
      fn: maps a tensor shaped like x to a scalar tensor; may call Keras layers and models.
      x: array-like input.

    Returns:
      d fn / dx, a backend tensor shaped like x.
    """
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        return tape.gradient(value, x)
    if backend == "jax":
        import jax

        return jax.grad(fn)(keras.ops.convert_to_tensor(x))
    raise NotImplementedError(f"polar_tf supports the tensorflow and jax backends, not {backend!r}")
