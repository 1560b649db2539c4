"""Robustness evaluation, what evaluate.py calls: attacks, a report and the paper's figures.

    results = evaluate(["runs/mnist_polarized/stage3.keras"], EvalConfig(dataset="mnist"))

writes into the output folder (default: `default_output_dir` of the first model: its run folder,
or runs/evaluate/<name> for a model outside one, e.g. a shipped one)
  results.json                  every number, the settings, backend, device and wall times
  results.md                    the paper's table (clean, FGSM, BIM, PGD accuracy) and the settings
  accuracy_vs_eps.png           accuracy against eps for each attack and model
  adversarial_examples.png      originals, attacked images, their difference and one front-end
                                filter's output for each (the last attack run at eps, in the order asked for)
  frontend_maps.png             the front end's saturated output maps for one image (and
  frontend_maps_attacked.png    for its attacked version); models with a front end only
With several models the per-model figures are prefixed by the model's label.

Accuracies are those of the saturated model (as `models.accuracy`), measured by a forward pass
of the loaded model on the adversarial images, apart from the attack's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Iterator, Sequence

import keras
import numpy as np
from absl import logging

from polar_tf import attacks, backend, certify, data, losses, models, plots, report, runfiles
from polar_tf.attacks import ATTACKS, DEFAULT_RESTARTS, DEFAULT_STEPS, LOSSES
from polar_tf.config import BACKWARDS, DATASETS, DEFAULT_EPS, check_choice
from polar_tf.frontend import saturate

DEFAULT_DATASET = "mnist"  # for a model whose training config is unknown
ATTACK_NAMES = {"fgsm": "FGSM", "bim": "BIM", "pgd": "PGD"}
EXAMPLES_SHOWN = 5
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


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation (defaults: the paper's protocol).

    Attributes:
      dataset: "mnist" or "fashion_mnist".
      attacks: which of "fgsm", "bim", "pgd" to run.
      eps: L-inf attack size; None picks the dataset's (0.3 MNIST, 0.1 Fashion-MNIST).
      steps: steps of BIM and PGD.
      step_size: their step size; None means eps / 10 (at every eps of a sweep).
      restarts: PGD's random restarts.
      num_examples: the first N test images.
      pgd_examples: PGD attacks only the first N of those (None: all of them), so that many
        restarts stay affordable where FGSM and BIM run on every image; its accuracy is over those N.
      batch_size: images per compiled attack call; None picks the device's default.
      eps_sweep: further eps values to attack at (for the accuracy-against-eps figure).
      loss: "ce" or "cw" (see `attacks.per_example_loss`).
      backward: the saturation's gradient in the attack: "identity" (BPDA) or "smooth".
      steepness: slope of the smooth backward pass; None keeps the model's.
      seed: seeds PGD's random starts.
      certify: also compute certified accuracy (a sound lower bound, `polar_tf.certify`) at
        every eps, and check per example that no certified image is broken by any attack.
    """

    dataset: str = "mnist"
    attacks: tuple[str, ...] = ATTACKS
    eps: float | None = None
    steps: int = DEFAULT_STEPS
    step_size: float | None = None
    restarts: int = DEFAULT_RESTARTS
    num_examples: int = 10000
    pgd_examples: int | None = None
    batch_size: int | None = None
    eps_sweep: tuple[float, ...] = ()
    loss: str = "ce"
    backward: str = "identity"
    steepness: float | None = None
    seed: int = 0
    certify: bool = False

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        object.__setattr__(self, "attacks", tuple(self.attacks))
        if not self.attacks:
            raise ValueError("attacks must name at least one of fgsm, bim, pgd")
        for name in self.attacks:
            check_choice("attacks", name, ATTACKS)
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks must not repeat. Received: attacks={','.join(self.attacks)}")
        if self.eps is None:
            object.__setattr__(self, "eps", DEFAULT_EPS[self.dataset])
        for eps in (self.eps, *self.eps_sweep):
            if not (math.isfinite(eps) and 0.0 <= eps <= 1.0):
                raise ValueError(f"eps must be in [0, 1]. Received: eps={eps}")
        for name in ("steps", "restarts", "num_examples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value}")
        if self.pgd_examples is not None and not (isinstance(self.pgd_examples, int) and 0 < self.pgd_examples <= self.num_examples):
            raise ValueError(f"pgd_examples must be a positive integer <= num_examples ({self.num_examples}). "
                             f"Received: pgd_examples={self.pgd_examples}")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer. Received: batch_size={self.batch_size}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be > 0. Received: step_size={self.step_size}")
        check_choice("loss", self.loss, LOSSES)
        check_choice("backward", self.backward, BACKWARDS)
        if self.steepness is not None and not (math.isfinite(self.steepness) and self.steepness > 0):
            raise ValueError(f"steepness must be > 0. Received: steepness={self.steepness}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0. Received: seed={self.seed}")

    @property
    def eps_values(self) -> list[float]:
        """Every eps attacked: the sweep and eps itself, ascending."""
        return sorted({float(self.eps), *map(float, self.eps_sweep)})

    def step_size_at(self, eps: float) -> float:
        return eps / 10 if self.step_size is None else self.step_size

    def examples_of(self, attack: str, num_examples: int) -> int:
        """How many of the first `num_examples` test images `attack` runs on."""
        return min(num_examples, self.pgd_examples or num_examples) if attack == "pgd" else num_examples


def parse_eps_sweep(text: str) -> tuple[float, ...]:
    """'start:stop:step' -> (start, start + step, ..., stop), stop included when on the grid."""
    parts = text.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
        if len(parts) != 3:
            raise ValueError
    except ValueError:
        raise ValueError(f"eps_sweep must be start:stop:step, e.g. 0:0.4:0.02. Received: eps_sweep={text!r}") from None
    if not (step > 0 and 0 <= start <= stop <= 1):
        raise ValueError(f"eps_sweep needs 0 <= start <= stop <= 1 and step > 0. Received: eps_sweep={text!r}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return tuple(round(start + k * step, 10) for k in range(count))


def model_dataset(model_path: str) -> str | None:
    """The dataset a model was trained on (its workdir's or shipped config), or None if unknown."""
    config = runfiles.trained_config(model_path)
    return config.dataset if config else None


def resolve_dataset(model_paths: Sequence[str], dataset: str | None = None, allow_mismatch: bool = False) -> str:
    """The dataset to evaluate on: the one the models were trained on, unless `dataset` is given.

    Args:
      model_paths: `.keras` files or training workdirs.
      dataset: the dataset asked for, or None to use the models'.
      allow_mismatch: evaluate on `dataset` even where a model was trained on another one.

    Raises:
      ValueError: the models were trained on different datasets and none was asked for, or one was
        trained on another dataset than the one asked for (unless `allow_mismatch`).
    """
    known = {path: model_dataset(path) for path in model_paths}
    trained = sorted({d for d in known.values() if d})
    if dataset is None:
        if len(trained) > 1:
            raise ValueError(f"the models were trained on different datasets ({', '.join(trained)}): pass --dataset")
        if not trained:
            logging.warning("No config says which dataset %s was trained on: evaluating on %s (pass --dataset to "
                            "choose)", ", ".join(model_paths), DEFAULT_DATASET)
        return trained[0] if trained else DEFAULT_DATASET
    for path, trained_on in known.items():
        if trained_on not in (None, dataset) and not allow_mismatch:
            raise ValueError(f"{path} was trained on {trained_on}, not {dataset}: leave --dataset out, or pass "
                             f"--allow_dataset_mismatch to evaluate it on {dataset} anyway")
    return dataset


def default_output_dir(model_path: str) -> str:
    """Where results go by default: beside a model in its training run folder; for any other model
    (a shipped one in pretrained/, a bare file), runs/evaluate/<name>, so that evaluating never
    writes into tracked folders nor over another model's results."""
    path = runfiles.resolve_model_path(model_path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    return os.path.join("runs", "evaluate", os.path.splitext(os.path.basename(path))[0])


def model_label(path: str) -> str:
    """'runs/mnist_polarized/stage3.keras' -> 'mnist_polarized/stage3'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{folder}/{stem}" if folder else stem


def run_attack(name: str, model: keras.Model, x: np.ndarray, y: np.ndarray, eps: float, config: EvalConfig) -> np.ndarray:
    """One attack of the protocol with `config`'s settings; returns the adversarial images."""
    common = dict(eps=eps, loss=config.loss, batch_size=config.batch_size)
    if name == "fgsm":
        return attacks.fgsm(model, x, y, **common)
    if name == "bim":
        return attacks.bim(model, x, y, step_size=config.step_size_at(eps), steps=config.steps, **common)
    if name == "pgd":
        return attacks.pgd(
            model, x, y, step_size=config.step_size_at(eps), steps=config.steps, restarts=config.restarts,
            seed=config.seed, **common,
        )
    raise ValueError(f"attack must be one of {', '.join(attacks.ATTACKS)}. Received: {name!r}")


def evaluate(
    model_paths: Sequence[str],
    config: EvalConfig,
    output_dir: str | None = None,
    data_dir: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Attacks each model with the protocol of `config`; writes results.json, results.md and plots.

    A run interrupted (Ctrl-C) with the same models and settings is resumed: the models it finished,
    kept in results.partial.json, are not evaluated again.

    Args:
      model_paths: `.keras` files or training workdirs.
      config: the settings.
      output_dir: where the files go; None means the first model's folder.
      data_dir: folder of IDX files (see `polar_tf.data.load`).
      command: the command line, recorded in results.json.

    Returns:
      The content of results.json.
    """
    if not model_paths:
        raise ValueError("--model_path is required: a .keras file or a training workdir")
    started = time.perf_counter()
    paths = [runfiles.resolve_model_path(p) for p in model_paths]
    loaded = [runfiles.load_model(p, compile=False) for p in paths]  # All load before any attack.
    output_dir = output_dir or default_output_dir(paths[0])
    x, y = data.load(config.dataset, "test", data_dir)
    if config.num_examples > len(x):
        raise ValueError(f"num_examples must be <= {len(x)} (the {config.dataset} test set). Received: {config.num_examples}")
    x, y = x[: config.num_examples], y[: config.num_examples]
    for path, model in zip(paths, loaded):
        report.check_model(model, path, x, y)
        trained_on = model_dataset(path)
        if trained_on not in (None, config.dataset):
            logging.warning("%s was trained on %s and is evaluated on %s", path, trained_on, config.dataset)
    results: dict[str, Any] = {
        "dataset": config.dataset,
        "num_examples": len(x),
        "eps": config.eps,
        "config": dataclasses.asdict(config),
        "attacks": {name: _describe(name, config, config.eps) for name in config.attacks},
        "backend": backend.name(),
        "versions": report.versions(),
        "device": backend.device_description(),
        "command": command,
        "output_dir": os.path.abspath(output_dir),
        "models": [],
    }
    labels = report.unique_labels([model_label(p) for p in paths])
    results["plots"] = []  # the models' figures so far; the accuracy plot is added at the end
    earlier = results["total_seconds"] = resume_partial(output_dir, paths, config, results)
    for path, label, model in list(zip(paths, labels, loaded))[len(results["models"]):]:
        runs: list[dict[str, Any]] = []  # filled attack by attack, kept if interrupted
        with keep_on_interrupt(output_dir, results, {"label": label, "path": os.path.abspath(path), "runs": runs}):
            record, adversarial = _evaluate_model(model, path, label, x, y, config, runs)
            prefix = "" if len(paths) == 1 else _slug(label) + "_"
            figures = _model_figures(model, label, x, y, adversarial, config, output_dir, prefix)
        results["models"].append(record)
        results["plots"] += figures
        results["total_seconds"] = earlier + time.perf_counter() - started
    accuracy_plot = os.path.join(output_dir, "accuracy_vs_eps.png")
    plots.plot_accuracy_vs_eps(_curves(results), accuracy_plot, config.eps, f"{config.dataset}: {len(x)} test images")
    results["plots"] = [os.path.basename(accuracy_plot), *results["plots"]]
    results["total_seconds"] = earlier + time.perf_counter() - started
    write_results(output_dir, results, results_markdown(results))
    logging.info("Wrote results.json, results.md and %d plots to %s", len(results["plots"]), output_dir)
    return results


def finished_results(output_dir: str, paths: Sequence[str], config, partial: bool = False) -> dict[str, Any] | None:
    """The results.json in `output_dir` if it holds the models `paths` under the settings `config`
    (an EvalConfig or AdaptiveConfig), else None. With `partial`, the results.partial.json of an
    interrupted run with these settings whose finished models are the first of `paths`.

    Models are compared as paths relative to the results folder, so that results written in a
    checkout at another place or on another machine (a GPU run, imported) still match."""
    path = os.path.join(output_dir, PARTIAL_RESULTS if partial else "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if "output_dir" not in results or "config" not in results:
        return None
    here = os.path.abspath(output_dir)
    recorded, wanted = dict(results["config"]), json.loads(json.dumps(dataclasses.asdict(config)))
    for key, value in LEGACY_CONFIG_VALUES.items():  # settings added since: what earlier runs did
        if key in wanted:
            recorded.setdefault(key, value)
    if recorded.get("transfer_from") and wanted.get("transfer_from") and results.get("transfer_from_path"):
        # The adaptive suite's transfer source is a model too: compared as the models are.
        if (os.path.relpath(results["transfer_from_path"], results["output_dir"])
                != os.path.relpath(os.path.abspath(_model_file(wanted["transfer_from"])), here)):
            return None
        recorded["transfer_from"] = wanted["transfer_from"]
    if recorded != wanted:
        return None
    models = [os.path.relpath(m["path"], results["output_dir"]) for m in results["models"]]
    expected = [os.path.relpath(os.path.abspath(p), here) for p in paths]
    if models != (expected[: len(models)] if partial else expected):
        return None
    # A model replaced at the same path since is another model (records written before
    # fingerprints existed match by path alone).
    for record, path in zip(results["models"], paths):
        model_file = _model_file(path)
        if record.get("sha256") and os.path.isfile(model_file) and report.fingerprint(model_file) != record["sha256"]:
            return None
    return results


# Settings of EvalConfig added after results files were written, with the value that reproduces what
# those runs did (PGD on every image).
LEGACY_CONFIG_VALUES = {"pgd_examples": None}


def _model_file(path: str) -> str:
    """A training workdir's final checkpoint, else the path itself (which may not exist here)."""
    return runfiles.resolve_model_path(path) if os.path.isdir(path) else path


def resume_partial(output_dir: str, paths: Sequence[str], config, results: dict[str, Any]) -> float:
    """Takes the finished models (and their figures) of an interrupted run with the same settings
    (its results.partial.json) into `results`; returns the seconds it spent on them (0 if none)."""
    earlier = finished_results(output_dir, paths, config, partial=True)
    if not earlier or not earlier["models"]:
        return 0.0
    results["models"] = earlier["models"]
    if "plots" in results:
        results["plots"] = earlier.get("plots", [])
    logging.info("Resuming %s: %d of %d models finished before", output_dir, len(earlier["models"]), len(paths))
    return float(earlier.get("total_seconds", 0.0))


def write_results(output_dir: str, results: dict[str, Any], markdown: str) -> None:
    """Writes results.json and results.md, and removes the partial results they supersede."""
    runfiles.write_json(os.path.join(output_dir, "results.json"), results)
    runfiles.write_text(os.path.join(output_dir, "results.md"), markdown)
    partial = os.path.join(output_dir, PARTIAL_RESULTS)
    if os.path.isfile(partial):
        os.remove(partial)


PARTIAL_RESULTS = "results.partial.json"


@contextlib.contextmanager
def keep_on_interrupt(output_dir: str, results: dict[str, Any], unfinished: dict[str, Any]) -> Iterator[None]:
    """On Ctrl-C in the block, writes what is finished (`results`, and the finished attacks of the
    model in progress, `unfinished`) to results.partial.json in output_dir, leaving a results.json
    of an earlier complete run as it was, and re-raises with a message naming the file."""
    try:
        yield
    except KeyboardInterrupt:
        path = os.path.join(output_dir, PARTIAL_RESULTS)
        os.makedirs(output_dir, exist_ok=True)
        runfiles.write_json(path, {**results, "interrupted": True, "unfinished_model": unfinished})
        raise KeyboardInterrupt(f"finished attacks kept in {path}") from None


def _evaluate_model(model, path, label, x, y, config: EvalConfig, runs: list[dict[str, Any]]):
    """All attacks at all eps on one model, each appended to `runs` as it finishes; returns the
    model's record and the last attack's images at eps."""
    target = attacks.with_backward(model, config.backward, config.steepness)
    clean_correct = models.correct(model, x, y)
    clean = float(np.mean(clean_correct))
    logging.info("%s: clean accuracy %.4f on %d images", label, clean, len(x))
    with models.as_evaluated(model):
        fallback = float(np.mean(losses.ce_falls_back(models.predict_logits(model, x, 1000), y)))
    adversarial = None
    survives = {}  # eps -> per example, correct under every attack run at that eps
    for eps in config.eps_values:
        survives[eps] = clean_correct.copy()
        for name in config.attacks:
            compiled = attacks.compiled_attack(target, config.loss)
            steps_before, start = compiled.image_steps, time.perf_counter()
            n = config.examples_of(name, len(x))
            # Every attack returns x at eps = 0 (tested); skip the work.
            x_adv = x[:n].copy() if eps == 0 else run_attack(name, target, x[:n], y[:n], eps, config)
            seconds = time.perf_counter() - start
            image_steps = compiled.image_steps - steps_before
            correct = models.correct(model, x_adv, y[:n])
            survives[eps][:n] &= correct
            accuracy = float(np.mean(correct))
            logging.info("%s: %s eps=%g accuracy %.4f (%.1f s)", label, name, eps, accuracy, seconds)
            runs.append({
                "attack": name,
                "eps": eps,
                "examples": n,
                "accuracy": accuracy,
                "seconds": seconds,
                "image_steps": image_steps,
                "image_steps_per_second": image_steps / seconds if image_steps else None,
                **_settings(name, config, eps),
            })
            if eps == config.eps:
                adversarial = (name, x_adv)  # The last attack run, in the order asked for.
    at_eps = [r for r in runs if r["eps"] == config.eps]
    record = {
        "label": label,
        "path": os.path.abspath(path),
        "sha256": report.fingerprint(path),
        "has_frontend": models.get_frontend(model) is not None,
        "clean_accuracy": clean,
        "ce_fallback_fraction": fallback,  # clean images where the "ce" loss is the reference's MSE
        "accuracy": {r["attack"]: r["accuracy"] for r in at_eps},
        "seconds": {r["attack"]: r["seconds"] for r in at_eps},
        "runs": runs,
    }
    if config.certify:
        record["certified"] = [_certify_and_check(model, label, x, y, eps, survives[eps]) for eps in config.eps_values]
    return record, adversarial


class CertificateViolation(RuntimeError):
    """An attack broke a certified example: a bug in the certificate or in the attack."""


def _certify_and_check(model, label: str, x, y, eps: float, survives: np.ndarray) -> dict[str, Any]:
    """Certified accuracy at eps; fails loudly if any certified example did not survive every attack."""
    start = time.perf_counter()
    result = certify.certify(model, x, y, eps)
    broken = np.flatnonzero(result.certified_ibp & ~survives)
    if broken.size:
        raise CertificateViolation(
            f"{label}: {broken.size} examples certified at eps={eps} were broken by an attack "
            f"(first indices {broken[:10].tolist()}); the certificate or the attack is wrong"
        )
    summary = result.summary()
    summary["seconds"] = time.perf_counter() - start
    summary["checked_against_attacks"] = True
    logging.info("%s: certified accuracy at eps=%g: %s (%.1f s)", label, eps, summary["certified_accuracy"], summary["seconds"])
    return summary


def certified_at(model_record: dict[str, Any], eps: float) -> tuple[str, float] | None:
    """(label of the interval certificate, certified accuracy) of a model at eps, if computed."""
    for entry in model_record.get("certified", []):
        if entry["eps"] == eps:
            (name, value), = [(k, v) for k, v in entry["certified_accuracy"].items() if k.startswith("interval_from_")]
            return name.replace("_", " "), value
    return None


def _settings(name: str, config: EvalConfig, eps: float) -> dict[str, Any]:
    if name == "fgsm":
        return {"steps": 1, "step_size": eps, "restarts": 1, "random_start": False}
    if name == "bim":
        return {"steps": config.steps, "step_size": config.step_size_at(eps), "restarts": 1, "random_start": False}
    return {"steps": config.steps, "step_size": config.step_size_at(eps), "restarts": config.restarts, "random_start": True}


def _describe(name: str, config: EvalConfig, eps: float) -> str:
    s = _settings(name, config, eps)
    if name == "fgsm":
        return "one signed-gradient step of size eps"
    if name == "bim":
        return f"{s['steps']} steps of {s['step_size']:.4g} from x"
    subset = f", on the first {config.pgd_examples} images" if config.pgd_examples else ""
    return (
        f"{s['steps']} steps of {s['step_size']:.4g} from a uniform random start, {s['restarts']} restarts "
        f"(worst case per example){subset}"
    )


def _model_figures(model, label, x, y, adversarial, config: EvalConfig, output_dir: str, prefix: str) -> list[str]:
    if adversarial is None:
        return []
    name, x_adv = adversarial
    x, y = x[: len(x_adv)], y[: len(x_adv)]  # PGD may have attacked only the first images
    written = []
    with models.as_evaluated(model):
        clean_pred = models.predict_labels(model, x, 1000)
        adv_pred = models.predict_labels(model, x_adv, 1000)
    shown = _pick_examples(y, clean_pred, adv_pred, EXAMPLES_SHOWN)
    captions = [f"label {y[i]}: {clean_pred[i]} -> {adv_pred[i]}" for i in shown]
    frontend = models.get_frontend(model)
    maps = maps_adv = None
    title = f"{label}: {ATTACK_NAMES[name]}, eps = {config.eps:g}"
    if frontend is not None:
        maps = _saturated_maps(model, x[shown])
        maps_adv = _saturated_maps(model, x_adv[shown])
        changed = np.sum(maps != maps_adv, axis=(0, 1, 2))
        channel = int(np.argmax(changed))  # The filter whose outputs the attack flips most.
        plots.plot_adversarial_examples(
            x[shown], x_adv[shown], config.eps, os.path.join(output_dir, prefix + "adversarial_examples.png"),
            captions, maps[..., channel], maps_adv[..., channel], channel, title,
        )
        for suffix, images, image_maps, kind in (("", x, maps, "clean"), ("_attacked", x_adv, maps_adv, ATTACK_NAMES[name])):
            path = os.path.join(output_dir, f"{prefix}frontend_maps{suffix}.png")
            plots.plot_frontend_maps(
                images[shown[0]], image_maps[0], path,
                f"{label}: saturated front-end outputs, test image {shown[0]} ({kind})",
            )
            written.append(os.path.basename(path))
    else:
        plots.plot_adversarial_examples(
            x[shown], x_adv[shown], config.eps, os.path.join(output_dir, prefix + "adversarial_examples.png"),
            captions, title=title,
        )
    return [prefix + "adversarial_examples.png", *written]


def _saturated_maps(model, x: np.ndarray) -> np.ndarray:
    """The front end's outputs as the classifier sees them in evaluation: saturated, [n, 28, 28, K]."""
    frontend = models.get_frontend(model)
    z = np.concatenate(list(models.frontend_outputs(model, x)))
    return keras.ops.convert_to_numpy(saturate(z, frontend.jump))


def _pick_examples(y, clean_pred, adv_pred, count: int) -> list[int]:
    """The first images the attack turns from right to wrong, topped up with the first others."""
    flipped = np.flatnonzero((clean_pred == y) & (adv_pred != y))
    rest = np.setdiff1d(np.arange(len(y)), flipped)
    return [int(i) for i in np.concatenate([flipped, rest])[: min(count, len(y))]]


def _curves(results: dict[str, Any]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{model label: {attack: accuracy against eps}}, each attack's curve starting at eps 0 with the
    clean accuracy, as `plots.plot_accuracy_vs_eps` takes them."""
    curves = {}
    for model in results["models"]:
        by_name = curves[model["label"]] = {}
        for name in results["config"]["attacks"]:
            points = {0.0: model["clean_accuracy"]}
            points.update({r["eps"]: r["accuracy"] for r in model["runs"] if r["attack"] == name})
            eps = sorted(points)
            by_name[ATTACK_NAMES[name]] = (eps, [points[e] for e in eps])
        if model.get("certified"):
            eps = [entry["eps"] for entry in model["certified"]]
            by_name["certified (lower bound)"] = (eps, [certified_at(model, e)[1] for e in eps])
    return curves


def reduced_budgets(config: dict[str, Any]) -> list[str]:
    """How the per-image attack budgets of `config` (an EvalConfig as a dict) fall short of the
    paper's protocol (100 steps, 20 PGD restarts), e.g. ["20 steps of 100", "2 restarts of 20"]."""
    reduced = []
    if config["steps"] < DEFAULT_STEPS and set(config["attacks"]) & {"bim", "pgd"}:
        reduced.append(f"{config['steps']} steps of {DEFAULT_STEPS}")
    if config["restarts"] < DEFAULT_RESTARTS and "pgd" in config["attacks"]:
        reduced.append(f"{config['restarts']} restarts of {DEFAULT_RESTARTS}")
    return reduced


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the paper's table for these models, the settings, and the sweep if any."""
    config = results["config"]
    names = config["attacks"]
    certified = config.get("certify", False)
    reduced = reduced_budgets(config)
    lines = [
        f"# Robustness on {results['dataset']}, eps = {results['eps']:g}",
        "",
        *([f"**Reduced budgets, not the paper's protocol** ({'; '.join(reduced)}): the robust accuracies are "
           "looser upper bounds than the paper's protocol gives.", ""] if reduced else []),
        "Accuracy (%) of the saturated model on the first "
        f"{results['num_examples']} test images{_pgd_note(config, results['num_examples'])}, L-inf attacks, pixels in [0, 1]."
        + (" Certified: a sound lower bound on robust accuracy (interval bound propagation from"
           " the saturating first layer, else from the input box), checked per example against"
           " every attack." if certified else ""),
        "",
        "| model | clean | " + " | ".join(ATTACK_NAMES[n] for n in names) + (" | certified |" if certified else " |"),
        "|---" * (len(names) + 2 + certified) + "|",
    ]
    for model in results["models"]:
        cells = [report.percent(model["clean_accuracy"])] + [report.percent(model["accuracy"][n]) for n in names]
        if certified:
            source, value = certified_at(model, results["eps"])
            cells.append(f"{report.percent(value)} ({source})")
        lines.append(f"| {model['label']} | " + " | ".join(cells) + " |")
    paper = PAPER_RESULTS.get(results["dataset"])
    if paper and results["eps"] == DEFAULT_EPS[results["dataset"]]:
        columns = [0] + [1 + attacks.ATTACKS.index(n) for n in names]
        for defense, values in paper.items():
            cells = [f"{values[c]:.2f}" for c in columns] + ["-"] * certified  # The paper certifies nothing.
            lines.append(f"| paper: {defense} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| setting | value |",
        "|---|---|",
        f"| eps | {results['eps']:g} |",
        *[f"| {ATTACK_NAMES[n]} | {results['attacks'][n]} |" for n in names],
        f"| loss | {_loss_text(config['loss'])} |",
        f"| backward pass of the saturation | {_backward_text(config)} |",
        f"| examples | {results['num_examples']} (first of the test set) |",
        f"| seed | {config['seed']} |",
        f"| backend | {results['backend']} ({', '.join(f'{k} {v}' for k, v in results['versions'].items())}) |",
        f"| device | {results['device']} |",
    ]
    for model in results["models"]:
        times = ", ".join(f"{ATTACK_NAMES[n]} {model['seconds'][n]:.1f} s" for n in names)
        lines.append(f"| wall time, {model['label']} | {times} |")
    lines.append(f"| wall time, total | {results['total_seconds']:.1f} s |")
    sweep = sorted({r["eps"] for m in results["models"] for r in m["runs"]})
    if len(sweep) > 1:
        lines += ["", "## Accuracy (%) against eps", "", "| model | attack | " + " | ".join(f"{e:g}" for e in sweep) + " |",
                  "|---" * (len(sweep) + 2) + "|"]
        for model in results["models"]:
            for n in names:
                by_eps = {r["eps"]: r["accuracy"] for r in model["runs"] if r["attack"] == n}
                lines.append(f"| {model['label']} | {ATTACK_NAMES[n]} | " + " | ".join(report.percent(by_eps[e]) for e in sweep) + " |")
            if certified:
                lines.append(f"| {model['label']} | certified | "
                             + " | ".join(report.percent(certified_at(model, e)[1]) for e in sweep) + " |")
    return "\n".join(lines) + "\n"


def _pgd_note(config: dict[str, Any], num_examples: int) -> str:
    n = pgd_subset(config, num_examples)
    return f" (PGD: the first {n})" if n else ""


def pgd_subset(config: dict[str, Any], num_examples: int) -> int | None:
    """How many images PGD attacked where that is fewer than the others' `num_examples`, else None."""
    n = config.get("pgd_examples")
    return n if n and n < num_examples and "pgd" in config["attacks"] else None


def _loss_text(loss: str) -> str:
    if loss == "cw":
        return "cw: margin max_{j != y} l_j - l_y on the logits"
    return "ce: cross-entropy on the logits; MSE on the one-hot label where it underflows in float64 (as the reference)"


def _backward_text(config: dict[str, Any]) -> str:
    if config["backward"] == "identity":
        return "identity (straight-through, BPDA)"
    steepness = "the model's steepness" if config["steepness"] is None else f"steepness {config['steepness']:g}"
    return f"smooth (tanh surrogate, {steepness})"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
