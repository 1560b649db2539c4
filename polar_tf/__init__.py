"""polar_tf: polarizing front ends for robust CNNs (Bakışkan et al., ICASSP 2020) in Keras 3.

Runs on the TensorFlow backend (default) and on JAX (KERAS_BACKEND=jax); TensorFlow itself is
imported only where it is needed (tfds, tf.summary, SavedModel export).
"""

from polar_tf.config import Config
from polar_tf.frontend import PolarizingFrontEnd, Saturation
from polar_tf.models import build_model

__all__ = ["Config", "PolarizingFrontEnd", "Saturation", "build_model"]
