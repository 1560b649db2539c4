"""What every results file shares: the software versions and device, percentages, model labels.

evaluation.py (the paper's attacks), adaptive.py (the adaptive suite) and reproduce.py (the
paper's table) write their results.json and Markdown with these.
"""

from __future__ import annotations

import hashlib

import keras
import numpy as np

from polar_tf import backend


def percent(value: float) -> str:
    """0.8765 -> '87.65'."""
    return f"{100 * value:.2f}"


def versions() -> dict[str, str]:
    """Keras' version and the backend's (TensorFlow or JAX), as results files record them."""
    found = {"keras": keras.__version__}
    name = backend.name()
    if name == "jax":
        import jax

        found["jax"] = jax.__version__
    elif name == "tensorflow":
        import tensorflow as tf

        found["tensorflow"] = tf.__version__
    return found


def unique_labels(labels: list[str]) -> list[str]:
    """The labels, a repeated one numbered from its second use: ['a', 'a'] -> ['a', 'a (2)']."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def check_model(model: keras.Model, path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Raises ValueError unless `model` maps images shaped like x's to logits over y's classes."""
    input_shape, output_shape = tuple(model.input_shape[1:]), tuple(model.output_shape[1:])
    if input_shape != x.shape[1:] or len(output_shape) != 1 or output_shape[0] <= int(np.max(y)):
        raise ValueError(f"model {path} maps {input_shape} to {output_shape}; expected images {x.shape[1:]} to 10 logits")


def fingerprint(path: str) -> str:
    """The SHA-256 of a model file: results record it, so that a model replaced at the same path is
    evaluated again rather than reported with its predecessor's results."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
