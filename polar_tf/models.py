"""One builder for every model of the paper, and access to the front end's outputs."""

from __future__ import annotations

import contextlib

from typing import Iterator

import keras
import numpy as np

from polar_tf import backend
from polar_tf.config import Config
from polar_tf.frontend import PolarizingFrontEnd, Saturation

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
FRONTEND_NAME = "frontend"


def _init(config: Config, fan_in: int) -> dict[str, keras.initializers.Initializer]:
    """Initializers of a classifier layer with `fan_in` inputs per unit, as `config` names them.

    "uniform_fan_in" is PyTorch's default for Conv2d and Linear, which the original kept:
    weights and biases uniform in +-1/sqrt(fan_in) (VarianceScaling's uniform limit is
    sqrt(3 scale / fan_in)). "glorot" keeps Keras' defaults.
    """
    if config.classifier_init == "glorot":
        return {}
    limit = 1.0 / np.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        "bias_initializer": keras.initializers.RandomUniform(-limit, limit),
    }


def _classifier_layers(config: Config, channels: int) -> list[keras.layers.Layer]:
    """The 'standard post front-end CNN' of the paper on `channels` input maps; it outputs logits."""
    return [
        keras.layers.Conv2D(32, 5, padding="valid", name="conv1", **_init(config, 5 * 5 * channels)),
        keras.layers.MaxPooling2D(2, name="pool1"),
        keras.layers.ReLU(name="relu1"),
        keras.layers.Conv2D(64, 5, padding="valid", name="conv2", **_init(config, 5 * 5 * 32)),
        keras.layers.MaxPooling2D(2, name="pool2"),
        keras.layers.ReLU(name="relu2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(100, activation="relu", name="dense1", **_init(config, 4 * 4 * 64)),
        keras.layers.Dense(NUM_CLASSES, name="logits", **_init(config, 100)),
    ]


def build_model(config: Config) -> keras.Model:
    """Builds the model that `config.model` names.

    - "polarized": PolarizingFrontEnd (named "frontend") + the classifier.
    - "baseline": the classifier on the raw image (the undefended model).
    - "adversarial": the same classifier; it differs in how it is trained (on PGD examples).
    - "direct_quant": the saturation applied to the pixels + the classifier.

    Weights are drawn from Keras' global seed: call `keras.utils.set_random_seed` first.

    Returns:
      A functional `keras.Model` from images [N, 28, 28, 1] in [0, 1] to logits [N, 10].
    """
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = inputs
    if config.model == "polarized":
        x = PolarizingFrontEnd(
            filters=config.num_filters,
            kernel_size=config.kernel_size,
            jump=config.jump,
            backward=config.backward,
            steepness=config.steepness,
            sigma1=config.sigma1,
            sigma2=config.sigma2,
            name=FRONTEND_NAME,
        )(x)
    elif config.model == "direct_quant":
        x = Saturation(config.jump, config.backward, config.steepness, name="quantize")(x)
    for layer in _classifier_layers(config, x.shape[-1]):
        x = layer(x)
    return keras.Model(inputs, x, name=config.model)


def get_frontend(model: keras.Model) -> PolarizingFrontEnd | None:
    """The model's polarizing front end, or None for models without one."""
    for layer in model.layers:
        if isinstance(layer, PolarizingFrontEnd):
            return layer
    return None


def frontend_outputs(model: keras.Model, x: np.ndarray, batch_size: int = 1000) -> Iterator[np.ndarray]:
    """Yields the front end's normalized outputs z, [batch, 28, 28, K], batch by batch.

    Uses the layer's own `normalized`, the computation its `call` makes, so there is no second
    code path. The model's input goes straight into the front end.
    """
    frontend = get_frontend(model)
    if frontend is None:
        raise ValueError(f"Model {model.name!r} has no polarizing front end.")
    for start in range(0, len(x), batch_size):
        yield keras.ops.convert_to_numpy(frontend.normalized(x[start : start + batch_size]))


def predict_labels(model: keras.Model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Predicted classes of `x`, with the model as it is (saturation switch included)."""
    return np.argmax(predict_logits(model, x, batch_size), axis=-1)


def predict_logits(model: keras.Model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """The model's logits on x, with the model as it is; split across devices in a data-parallel run."""
    return backend.predict(model, x, batch_size)


@contextlib.contextmanager
def as_evaluated(model: keras.Model) -> Iterator[None]:
    """The model as it is evaluated and attacked, for the block: its front end's saturation on
    (whatever the training schedule's switch says), if it has a front end."""
    frontend = get_frontend(model)
    if frontend is None:
        yield
        return
    with frontend.saturation(True):
        yield


def correct(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Per example, whether the model as evaluated (`as_evaluated`) is right."""
    with as_evaluated(model):
        return predict_labels(model, x, batch_size) == y


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Accuracy of the model as evaluated: with the front end's saturation on, always."""
    return float(np.mean(correct(model, x, y, batch_size)))


def has_saturation(model: keras.Model) -> bool:
    """Whether the model saturates anywhere (a front end or a saturation layer)."""
    return any(isinstance(layer, (PolarizingFrontEnd, Saturation)) for layer in model.layers)
