"""The polarizing front end: L1-normalized filters and a ternary saturation.

For a filter w and a perturbation e with ||e||_inf <= eps, |w.e| <= eps * ||w||_1, so dividing
each filter's output by its L1 norm bounds the change of every output z by eps. The saturation
f(z) = 0.5 * (sign(z - c) + sign(z + c)) then removes that change wherever |z -+ c| > eps.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras
from keras import ops

from polar_tf.config import BACKWARDS

REGULARIZERS = ("none", "b1", "b2")
_L1_EPSILON = 1e-12


def hard_saturation(z, jump: float):
    """f(z) = 0.5 * (sign(z - c) + sign(z + c)): -1, 0 or +1, and 0.5 exactly at +-c."""
    return 0.5 * (ops.sign(z - jump) + ops.sign(z + jump))


def saturate(z, jump: float, backward: str = "identity", steepness: float = 8.0):
    """Ternary saturation with a straight-through gradient.

    Forward: 0.5 * (sign(z - jump) + sign(z + jump)), i.e. -1, 0 or +1 (0.5 exactly at +-jump).
    Backward: the identity ("identity"), or the derivative of the surrogate
    0.5 * (tanh(s (z - jump)) + tanh(s (z + jump))) with s = steepness ("smooth").

    Args:
      z: tensor of any shape.
      jump: the jump c, in (0, 1).
      backward: "identity" or "smooth".
      steepness: slope of the smooth surrogate.

    Returns:
      A tensor of z's shape.
    """
    hard = hard_saturation(z, jump)
    if backward == "identity":
        surrogate = z
    elif backward == "smooth":
        surrogate = 0.5 * (ops.tanh(steepness * (z - jump)) + ops.tanh(steepness * (z + jump)))
    else:
        raise ValueError(f"backward must be one of {', '.join(BACKWARDS)}. Received: backward={backward!r}")
    # Forward value `hard`, gradient of `surrogate`; needs no registered custom gradient.
    return surrogate + ops.stop_gradient(hard - surrogate)


def _gaussian_pair(z, centre, width):
    """exp(-(z - m)^2 / (2 w^2)) + exp(-(z + m)^2 / (2 w^2)): the form of both barriers."""
    scale = 2.0 * ops.square(width)
    return ops.exp(-ops.square(z - centre) / scale) + ops.exp(-ops.square(z + centre) / scale)


def barrier_b1(z, sigma1: float):
    """B1(z) = exp(-z^2 / (2 sigma1^2)): penalizes outputs near 0 (stage 1).

    Half the pair centred at 0, which is exactly B1 (halving a doubled float is exact)."""
    return 0.5 * _gaussian_pair(z, 0.0, sigma1)


def barrier_b2(z, jump: float, sigma2: float):
    """B2(z) = exp(-(z-c)^2 / (2 sigma2^2)) + exp(-(z+c)^2 / (2 sigma2^2)): penalizes outputs near +-c."""
    return _gaussian_pair(z, jump, sigma2)


def _check_backward(backward: str, steepness: float) -> None:
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {', '.join(BACKWARDS)}. Received: backward={backward!r}")
    if not steepness > 0:
        raise ValueError(f"steepness must be > 0. Received: steepness={steepness}")


def _check_jump(jump: float) -> None:
    if not (isinstance(jump, (int, float)) and 0.0 < jump < 1.0):
        raise ValueError(f"jump must be in (0, 1). Received: jump={jump}")


@keras.saving.register_keras_serializable(package="polar_tf")
class PolarizingFrontEnd(keras.layers.Layer):
    """Conv filters divided by their L1 norms, then an optional ternary saturation.

    The saturation switch and the regularizer (kind and weight) are non-trainable variables, so
    a training schedule can flip them between epochs without recompiling the train step. The
    regularizer is added with `add_loss` as weight * mean over (batch, rows, cols, filters) of B(z).

    Args:
      filters: number of filters K (25 in the paper).
      kernel_size: filter size (5 in the paper); 'same' padding, stride 1, no bias.
      jump: the saturation jump c, in (0, 1).
      backward: gradient of the saturation, "identity" or "smooth".
      steepness: slope of the smooth surrogate.
      sigma1, sigma2: widths of B1 and B2.
      saturate: initial state of the saturation switch.
      regularizer: initial regularizer, "none", "b1" or "b2".
      reg_weight: initial regularizer weight lambda.
    """

    def __init__(
        self,
        filters: int = 25,
        kernel_size: int = 5,
        jump: float = 0.5,
        backward: str = "identity",
        steepness: float = 8.0,
        sigma1: float = 0.35,
        sigma2: float = 0.15,
        saturate: bool = False,
        regularizer: str = "none",
        reg_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not (isinstance(filters, int) and filters > 0):
            raise ValueError(f"filters must be a positive integer. Received: filters={filters}")
        if not (isinstance(kernel_size, int) and kernel_size > 0):
            raise ValueError(f"kernel_size must be a positive integer. Received: kernel_size={kernel_size}")
        _check_jump(jump)
        _check_backward(backward, steepness)
        for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
            if not sigma > 0:
                raise ValueError(f"{name} must be > 0. Received: {name}={sigma}")
        if regularizer not in REGULARIZERS:
            raise ValueError(
                f"regularizer must be one of {', '.join(REGULARIZERS)}. Received: regularizer={regularizer!r}"
            )
        if not reg_weight >= 0:
            raise ValueError(f"reg_weight must be >= 0. Received: reg_weight={reg_weight}")
        self.filters = filters
        self.kernel_size = kernel_size
        self.jump = float(jump)
        self.backward = backward
        self.steepness = float(steepness)
        self.sigma1 = float(sigma1)
        self.sigma2 = float(sigma2)
        self._saturate = self._switch("saturate", float(saturate))
        self._reg_kind = self._switch("reg_kind", float(REGULARIZERS.index(regularizer)))
        self._reg_weight = self._switch("reg_weight", float(reg_weight))

    def _switch(self, name: str, value: float):
        return self.add_weight(
            shape=(), initializer=keras.initializers.Constant(value), trainable=False, name=name
        )

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(
            shape=(self.kernel_size, self.kernel_size, channels, self.filters),
            initializer=keras.initializers.HeUniform(),
            name="kernel",
        )

    def normalized(self, x):
        """The normalized outputs z = (w_k * x) / ||w_k||_1, before the saturation."""
        l1 = ops.sum(ops.abs(self.kernel), axis=(0, 1, 2))
        # Normalizing the 25 filters rather than the 28x28x25 outputs per image: same z, less work.
        return ops.conv(x, self.kernel / (l1 + _L1_EPSILON), strides=1, padding="same")

    def barrier(self, z):
        """The active regularizer's B(z), elementwise (zero when the regularizer is "none").

        `barrier_b1` or `barrier_b2`, chosen by the switch inside the compiled step: both are a
        Gaussian pair, whose centre, width and factor the switch selects, so that either costs
        two exponentials.
        """
        is_b2 = self._reg_kind > 1.5
        centre = ops.where(is_b2, self.jump, 0.0)
        width = ops.where(is_b2, self.sigma2, self.sigma1)
        factor = ops.where(is_b2, 1.0, ops.where(self._reg_kind > 0.5, 0.5, 0.0))
        return factor * _gaussian_pair(z, centre, width)

    def call(self, inputs):
        z = self.normalized(inputs)
        self.add_loss(self._reg_weight * ops.mean(self.barrier(z)))
        saturated = saturate(z, self.jump, self.backward, self.steepness)
        return ops.where(self._saturate > 0.5, saturated, z)

    # Switches, read and set eagerly between epochs.
    @property
    def saturating(self) -> bool:
        return bool(ops.convert_to_numpy(self._saturate) > 0.5)

    @property
    def regularizer(self) -> str:
        return REGULARIZERS[int(round(float(ops.convert_to_numpy(self._reg_kind))))]

    @property
    def reg_weight(self) -> float:
        return float(ops.convert_to_numpy(self._reg_weight))

    def set_saturation(self, on: bool) -> None:
        self._saturate.assign(1.0 if on else 0.0)

    def set_regularizer(self, kind: str, weight: float) -> None:
        if kind not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {', '.join(REGULARIZERS)}. Received: regularizer={kind!r}")
        if not weight >= 0:
            raise ValueError(f"reg_weight must be >= 0. Received: reg_weight={weight}")
        self._reg_kind.assign(float(REGULARIZERS.index(kind)))
        self._reg_weight.assign(float(weight))

    @contextlib.contextmanager
    def saturation(self, on: bool = True) -> Iterator[None]:
        """Temporarily switches the saturation on (or off), e.g. to evaluate mid-training."""
        before = self.saturating
        self.set_saturation(on)
        try:
            yield
        finally:
            self.set_saturation(before)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "jump": self.jump,
            "backward": self.backward,
            "steepness": self.steepness,
            "sigma1": self.sigma1,
            "sigma2": self.sigma2,
            "saturate": self.saturating,
            "regularizer": self.regularizer,
            "reg_weight": self.reg_weight,
        }


@keras.saving.register_keras_serializable(package="polar_tf")
class Saturation(keras.layers.Layer):
    """The ternary saturation alone, always on: direct quantization of the pixels.

    Args:
      jump: the jump c, in (0, 1).
      backward: gradient of the saturation, "identity" or "smooth".
      steepness: slope of the smooth surrogate.
    """

    def __init__(self, jump: float = 0.2, backward: str = "identity", steepness: float = 8.0, **kwargs):
        super().__init__(**kwargs)
        _check_jump(jump)
        _check_backward(backward, steepness)
        self.jump = float(jump)
        self.backward = backward
        self.steepness = float(steepness)

    def call(self, inputs):
        return saturate(inputs, self.jump, self.backward, self.steepness)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "jump": self.jump,
            "backward": self.backward,
            "steepness": self.steepness,
        }
