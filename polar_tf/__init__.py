"""polar_tf: polarizing front ends for robust CNNs (Bakışkan et al., ICASSP 2020) in Keras 3.

Runs on the TensorFlow backend (default) and on JAX (KERAS_BACKEND=jax); TensorFlow itself is
imported only where it is needed (tfds, tf.summary, SavedModel export).
"""

import importlib

__all__ = ["Config", "PolarizingFrontEnd", "Saturation", "build_model"]
_HOMES = {"Config": "config", "PolarizingFrontEnd": "frontend", "Saturation": "frontend", "build_model": "models"}


def __getattr__(name: str):
    # Lazy (PEP 562): importing polar_tf.cli must not load Keras, so that the entry points can quiet
    # TensorFlow's start-up logs before Keras imports it.
    if name in _HOMES:
        return getattr(importlib.import_module(f"polar_tf.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'polar_tf' has no attribute {name!r}")
