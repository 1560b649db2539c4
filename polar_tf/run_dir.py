"""A training run's files, and the shipped models' layout; every write is atomic.

A workdir holds
  config.json           the Config of the run, written before training starts
  metrics.jsonl         one JSON line per epoch
  stage{1,2,3}.keras    the polarized model after each stage (model.keras for one-stage models)
  checkpoints/          model + optimizer after the latest epoch (epoch_NNNN.keras), for resuming
  filters/              the front end's raw kernel after N epochs (after_NNNN_epochs.npy, N = 0 first)
  tb/                   TensorBoard events
  plots/                PNG figures written at the end of each stage

A shipped model (pretrained/) is <dataset>_<model>.keras with its run's config and metrics beside
it: <dataset>_<model>.config.json and <dataset>_<model>.metrics.jsonl, and for a polarized model
its front end's kernels after every epoch, <dataset>_<model>.filters.npz (after_NNNN_epochs arrays).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Sequence

import keras
import numpy as np
from absl import logging

from polar_tf import frontend  # noqa: F401  (registers the custom layers for loading)
from polar_tf.config import Config


_FILTERS_FILE = re.compile(r"after_(\d{4})_epochs\.npy")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or not a polar_tf model."""


def checkpoint_path(workdir: str, config: Config, stage: int) -> str:
    """Where `stage`'s checkpoint lives: stage{N}.keras, or model.keras for one-stage models."""
    name = f"stage{stage}.keras" if config.num_stages > 1 else "model.keras"
    return os.path.join(workdir, name)


def final_checkpoint(workdir: str) -> str:
    """The fully trained model of a workdir (the last stage's checkpoint)."""
    config = read_config(workdir)
    return checkpoint_path(workdir, config, config.num_stages)


def save_epoch_checkpoint(model: keras.Model, workdir: str, epoch: int) -> str:
    """Saves checkpoints/epoch_NNNN.keras atomically, then removes older epoch checkpoints."""
    folder = os.path.join(workdir, "checkpoints")
    path = os.path.join(folder, f"epoch_{epoch:04d}.keras")
    save_model(model, path)
    for name in os.listdir(folder):
        if _EPOCH_FILE.fullmatch(name) and name != os.path.basename(path):
            os.remove(os.path.join(folder, name))
    return path


def save_filters(workdir: str, epochs_completed: int, kernel: np.ndarray) -> str:
    """Saves the front end's kernel after `epochs_completed` epochs (0: as initialised)."""
    path = os.path.join(workdir, "filters", f"after_{epochs_completed:04d}_epochs.npy")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(kernel, dtype=np.float32))

    _atomic_write(path, write)
    return path


def load_filters(workdir: str) -> dict[int, np.ndarray]:
    """{epochs completed: kernel} of every kernel `save_filters` wrote in workdir, or, given a
    shipped model (a .keras file), of the kernels shipped beside it ({} where none are)."""
    if workdir.endswith(".keras"):
        path = workdir[: -len(".keras")] + ".filters.npz"
        if not os.path.isfile(path):
            return {}
        with np.load(path) as npz:
            return {int(m.group(1)): npz[name] for name in npz.files if (m := _FILTERS_FILE.fullmatch(name + ".npy"))}
    folder = os.path.join(workdir, "filters")
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in sorted(os.listdir(folder)):
        if match := _FILTERS_FILE.fullmatch(name):
            found[int(match.group(1))] = np.load(os.path.join(folder, name))
    return found


def latest_epoch_checkpoint(workdir: str) -> tuple[int, str] | None:
    """(epoch, path) of the newest epoch checkpoint, or None."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := _EPOCH_FILE.fullmatch(name))]
    return max(found) if found else None


_EPOCH_FILE = re.compile(r"epoch_(\d{4})\.keras")


def remove_stale_temporaries(workdir: str) -> None:
    """Removes temporary files that a killed process left behind (never a finished file)."""
    for folder, _, files in os.walk(workdir):
        for name in files:
            if name.startswith(".") and ".tmp" in name:
                os.remove(os.path.join(folder, name))


def make_folder(folder: str, what: str) -> None:
    """Creates `folder` (and its parents) if missing: a folder that cannot hold what is to be written
    there is refused before the work that writes it, not after. `what` names it in the error."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OSError(f"{what} {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"{what} {folder} cannot be created: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(f"{what} {folder} is not writable")


def resolve_model_path(path: str) -> str:
    """A `.keras` file as given, or a training workdir's final checkpoint."""
    if os.path.isdir(path):
        return final_checkpoint(path)
    if not os.path.exists(path):
        raise CheckpointError(f"model {path} does not exist (expected a .keras file or a workdir)")
    return path


def _atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are meant to be shared.
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_model(model: keras.Model, path: str) -> None:
    """Saves a `.keras` file atomically: a kill never leaves a truncated checkpoint."""
    _atomic_write(path, model.save, suffix=".keras")


def load_model(path: str, compile: bool = True) -> keras.Model:
    """Loads a `.keras` checkpoint, with a one-line error for missing or unreadable files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a .keras file (truncated or foreign)")
    try:
        return keras.models.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many types for foreign or damaged archives.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} could not be loaded: {first_line}") from None


def load_models(model_paths: Sequence[str]) -> tuple[list[str], list[keras.Model]]:
    """The `.keras` files that `model_paths` (files or training workdirs) name, and their models, all
    loaded before anything runs on them."""
    if not model_paths:
        raise ValueError("--model_path is required: a .keras file or a training workdir")
    paths = [resolve_model_path(p) for p in model_paths]
    return paths, [load_model(p, compile=False) for p in paths]


def read_config(workdir: str) -> Config:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: not a polar_tf workdir")
    with open(path) as f:
        return Config.from_dict(json.load(f))


def trained_config(model_path: str) -> Config | None:
    """The config a model was trained with: <name>.config.json beside a shipped <name>.keras, else
    the config.json of its run folder; None where neither exists (a bare .keras file)."""
    if os.path.isdir(model_path):
        folder, shipped = model_path, None
    else:
        folder, shipped = os.path.dirname(os.path.abspath(model_path)), os.path.splitext(model_path)[0] + ".config.json"
    for path in (shipped, os.path.join(folder, "config.json")):
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    return Config.from_dict(json.load(f))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path} could not be read: {e}") from None
    return None


def write_config(workdir: str, config: Config) -> None:
    """Writes config.json; refuses a workdir that holds a run with another config."""
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        existing = read_config(workdir)
        if existing != config:
            changed = sorted(k for k, v in config.to_dict().items() if existing.to_dict()[k] != v)
            raise ValueError(
                f"{workdir} holds a run with another config (differs in {', '.join(changed)}); "
                "pass the same flags or another --workdir"
            )
        return
    write_json(path, config.to_dict())


class MetricsLog:
    """metrics.jsonl: one JSON line per epoch; re-running a stage replaces that stage's lines."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_from(self, epoch: int) -> None:
        kept = [r for r in self.read() if r["epoch"] < epoch]
        write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        # One short write at the end of the file: a kill leaves the earlier lines as they were.
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def shipped_stem(pretrained_dir: str, config: Config) -> str:
    """A shipped model's path without its suffix: pretrained_dir/<dataset>_<model>."""
    return os.path.join(pretrained_dir, f"{config.dataset}_{config.model}")


def shipped_model(pretrained_dir: str | None, config: Config, workdir: str) -> str | None:
    """The shipped model trained with exactly `config`, where `workdir` holds no run of its own
    (a fresh checkout): it is evaluated instead of training again. None where there is none."""
    if not pretrained_dir or os.path.isfile(os.path.join(workdir, "config.json")):
        return None
    stem = shipped_stem(pretrained_dir, config)
    if not all(os.path.isfile(stem + suffix) for suffix in (".keras", ".config.json", ".metrics.jsonl")):
        return None
    if run_record(stem + ".keras")[0] != config:
        return None
    logging.info("%s holds no run; evaluating the shipped %s.keras, trained with the same config", workdir, stem)
    return stem + ".keras"


def run_record(model_path: str) -> tuple[Config, list[dict]] | None:
    """How a model was trained: its config and per-epoch metrics, from beside a shipped model
    (<name>.config.json, <name>.metrics.jsonl) or from its run folder; None where neither is."""
    stem, workdir = model_path[: -len(".keras")], os.path.dirname(model_path)
    for config_path, metrics_path in ((stem + ".config.json", stem + ".metrics.jsonl"),
                                      (os.path.join(workdir, "config.json"), os.path.join(workdir, "metrics.jsonl"))):
        if os.path.isfile(config_path):
            with open(config_path) as f:
                return Config.from_dict(json.load(f)), MetricsLog(metrics_path).read()
    return None


def ship_pretrained(path: str, folder: str) -> str:
    """Copies a finished run's model, with its config, metrics and per-epoch filters beside it,
    into `folder`; returns the copy. Each file is replaced at once (a copy, then a rename), the
    model last."""
    workdir = os.path.dirname(path)
    config = read_config(workdir)
    stem = shipped_stem(folder, config)
    write_json(stem + ".config.json", config.to_dict())
    if kernels := load_filters(workdir):
        arrays = {f"after_{epochs:04d}_epochs": kernel for epochs, kernel in kernels.items()}
        _atomic_write(stem + ".filters.npz", lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    for source, target in ((os.path.join(workdir, "metrics.jsonl"), stem + ".metrics.jsonl"), (path, stem + ".keras")):
        partial = target + ".tmp"
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    return stem + ".keras"
