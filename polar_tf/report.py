"""What every results file shares: its header (settings, software versions and device), percentages,
model labels, the paper's table, the command lines that reproduce it, README's generated blocks.

evaluation.py (the paper's attacks), adaptive.py (the adaptive suite), results_md.py (their
results.md) and reproduction_report.py (the paper's table) write their files with these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

import keras
import numpy as np

from polar_tf import backend, cli, run_dir
from polar_tf.config import Config
from polar_tf.evaluation_config import AdaptiveConfig


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


# Table 1 of the paper (accuracy, %), for eps = DEFAULT_EPS[dataset]: clean, FGSM, BIM, PGD.
PAPER_RESULTS = {
    "mnist": {
        "no defense": (99.4, 21.9, 0.47, 0.00),
        "adversarial training": (97.5, 93.1, 90.0, 86.7),
        "polarizing front end": (99.1, 93.2, 86.5, 70.8),
    },
    "fashion_mnist": {
        "no defense": (91.6, 19.7, 1.49, 0.11),
        "adversarial training": (83.8, 77.9, 75.6, 74.1),
        "polarizing front end": (87.3, 69.4, 54.9, 44.5),
    },
}


def model_label(path: str) -> str:
    """'runs/mnist_polarized/stage3.keras' -> 'mnist_polarized/stage3'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{folder}/{stem}" if folder else stem


def results_header(config: Any, num_examples: int, command: str | None, output_dir: str) -> dict[str, Any]:
    """What every results.json starts with: the dataset, eps and settings (`config`, an EvalConfig or
    AdaptiveConfig), the software and device they ran on, the command as run and the folder."""
    return {
        "dataset": config.dataset,
        "num_examples": num_examples,
        "eps": config.eps,
        "config": dataclasses.asdict(config),
        "backend": backend.name(),
        "versions": versions(),
        "device": backend.device_description(),
        "command": command,
        "output_dir": os.path.abspath(output_dir),
        "models": [],
    }


def environment_rows(results: dict[str, Any]) -> list[str]:
    """The backend (with versions) and device rows of a results.md settings table."""
    return [f"| backend | {results['backend']} ({', '.join(f'{k} {v}' for k, v in results['versions'].items())}) |",
            f"| device | {results['device']} |"]


def evaluate_command(paths: Sequence[str], config: Any, output_dir: str, data_dir: str | None = None) -> str:
    """The evaluate.py command that reruns an evaluation of the models `paths` with `config`: the
    paper's attacks for an EvalConfig; for an AdaptiveConfig --suite=adaptive under this backend
    (KERAS_BACKEND=..., which its numbers depend on). It parses back to `config` (`cli.config_flags`)."""
    adaptive = isinstance(config, AdaptiveConfig)
    program = [f"KERAS_BACKEND={backend.name()}"] * adaptive + ["python", "evaluate.py"]
    leading = {"suite": "adaptive" if adaptive else None, "model_path": ",".join(paths)}
    trailing = {"data_dir": data_dir, "output_dir": output_dir}
    return cli.command_line(program, [config], leading, trailing, always=("dataset",))


def train_command(config: Config, workdir: str) -> str:
    """The train.py command that trains `config` into `workdir` (it parses back to `config`)."""
    return cli.command_line(["python", "train.py"], [config], trailing={"workdir": workdir},
                            always=("dataset", "model"))


def replace_block(path: str, markers: tuple[str, str], block: list[str]) -> bool:
    """Replaces the lines between the two markers in the file `path` (README's generated tables);
    False if it lacks them."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        text = f.read()
    start, end = markers
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    run_dir.write_text(path, head + "\n".join([start, *block]) + rest[rest.index(end):])
    return True
