"""Robustness evaluation, what evaluate.py calls: attacks, a report and the paper's figures.

    results = evaluate(["runs/mnist_polarized/stage3.keras"], EvalConfig(dataset="mnist"))

writes into the output folder (default: `results_dir.default_output_dir` of the first model: its run folder,
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

import os
import time
from typing import Any, Sequence

import keras
import numpy as np
from absl import logging

from polar_tf import attacks, certify, data, evaluation_figures, losses, models, plots, report, results_dir, results_md, run_dir
from polar_tf.evaluation_config import ATTACKS, EvalConfig

DEFAULT_DATASET = "mnist"  # for a model whose training config is unknown


def model_dataset(model_path: str) -> str | None:
    """The dataset a model was trained on (its workdir's or shipped config), or None if unknown;
    a model that does not exist is refused (`run_dir.CheckpointError`)."""
    config = run_dir.trained_config(run_dir.resolve_model_path(model_path))
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
        if not trained and model_paths:
            logging.warning("No config says which dataset %s was trained on: evaluating on %s (pass --dataset to "
                            "choose)", ", ".join(model_paths), DEFAULT_DATASET)
        return trained[0] if trained else DEFAULT_DATASET
    for path, trained_on in known.items():
        if trained_on not in (None, dataset) and not allow_mismatch:
            raise ValueError(f"{path} was trained on {trained_on}, not {dataset}: leave --dataset out, or pass "
                             f"--allow_dataset_mismatch to evaluate it on {dataset} anyway")
    return dataset


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
    raise ValueError(f"attack must be one of {', '.join(ATTACKS)}. Received: {name!r}")


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
    started = time.perf_counter()
    paths, loaded = run_dir.load_models(model_paths)
    output_dir = output_dir or results_dir.default_output_dir(paths[0])
    x, y = data.first_test_images(config.dataset, config.num_examples, data_dir)
    for path, model in zip(paths, loaded):
        report.check_model(model, path, x, y)
        trained_on = model_dataset(path)
        if trained_on not in (None, config.dataset):
            logging.warning("%s was trained on %s and is evaluated on %s", path, trained_on, config.dataset)
    run_dir.make_folder(output_dir, "output folder")  # before the first attack
    results = report.results_header(config, len(x), command, output_dir)
    results["attacks"] = {name: _describe(name, config, config.eps) for name in config.attacks}
    labels = report.unique_labels([report.model_label(p) for p in paths])
    results["plots"] = []  # the models' figures so far; the accuracy plot is added at the end
    earlier = results["total_seconds"] = results_dir.resume_partial(output_dir, paths, config, results)
    for path, label, model in list(zip(paths, labels, loaded))[len(results["models"]):]:
        runs: list[dict[str, Any]] = []  # filled attack by attack, kept if interrupted
        with results_dir.keep_on_interrupt(output_dir, results, {"label": label, "path": os.path.abspath(path), "runs": runs}):
            record, adversarial = _evaluate_model(model, path, label, x, y, config, runs)
            prefix = "" if len(paths) == 1 else evaluation_figures.slug(label) + "_"
            figures = evaluation_figures.model_figures(model, label, x, y, adversarial, config, output_dir, prefix)
        results["models"].append(record)
        results["plots"] += figures
        results["total_seconds"] = earlier + time.perf_counter() - started
    accuracy_plot = os.path.join(output_dir, "accuracy_vs_eps.png")
    plots.plot_accuracy_vs_eps(evaluation_figures.accuracy_curves(results), accuracy_plot, config.eps, f"{config.dataset}: {len(x)} test images")
    results["plots"] = [os.path.basename(accuracy_plot), *results["plots"]]
    results["total_seconds"] = earlier + time.perf_counter() - started
    results_dir.write_results(output_dir, results, results_md.standard_markdown(results))
    logging.info("Wrote results.json, results.md and %d plots to %s", len(results["plots"]), output_dir)
    return results


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
        record["certified"] = [certify.checked_against_attacks(model, label, x, y, eps, survives[eps])
                               for eps in config.eps_values]
    return record, adversarial


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


