"""The adaptive suite (evaluate.py --suite=adaptive): every attack, the per-example worst case and
sanity checks that flag gradient masking.

    results = evaluate_adaptive(["runs/mnist_polarized"], AdaptiveConfig(dataset="mnist"))

A defense built on a quantizer is the kind that gradient attacks overrate (Athalye et al. 2018;
Carlini et al. 2019). So each model is attacked, at one eps, by
  - FGSM, PGD (the paper's: 100 steps of eps/10, 20 restarts), APGD-CE, APGD-DLR and APGD-T (Croce
    & Hein 2020), each once per backward pass of the saturation ("identity": straight-through/BPDA,
    "smooth": tanh surrogate) for models that have one;
  - the Square attack (gradient-free, score-based; `polar_tf.square`), given more queries while it
    keeps fooling examples that every gradient attack missed (see `_escalate_square`);
  - a transfer attack: PGD made on another model (--transfer_from) and evaluated on this one;
  - uniform random sign noise of the same eps (a corner of the eps-ball per example: the baseline
    every attack must beat).
An example counts as robust only if the model classifies it correctly clean and under every one
of them: the worst-case accuracy. Accuracies come from a forward pass of the loaded, saturated
model on the adversarial images, each of which passed `attacks.check_adversarial`.

Its defaults are AutoAttack's budgets (`evaluation_config.AdaptiveConfig` compares the two).

Sanity checks flag gradient masking (`polar_tf.masking_checks`; Carlini et al. 2019, section 5).
Written into results.json and results.md in the output folder (default: `adaptive/` in
`results_dir.default_output_dir` of the first model), with the one command that reproduces every
number. Budgets below the standard ones are labelled in results.md (`results_md.adaptive_reduced_budgets`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np
from absl import logging

from polar_tf import attacks, certify, data, driver, models, report, results_dir, run_dir
from polar_tf.apgd import apgd
from polar_tf.evaluation_config import HALF, AdaptiveConfig
from polar_tf.masking_checks import (check_eps_to_half, check_gradient_free, check_iterative, check_more_budget,
                                     check_noise, worst_case)
from polar_tf.models import has_saturation
from polar_tf.results_md import adaptive_markdown, check_numbers, describe
from polar_tf.square import square

GRADIENT_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t")
# Rounds of doubling Square's queries while it keeps fooling examples the gradient attacks missed.
MAX_SQUARE_DOUBLINGS = 3


def random_noise(x: np.ndarray, eps: float, seed: int = 0, clip_min: float = 0.0, clip_max: float = 1.0) -> np.ndarray:
    """x moved by +eps or -eps in every pixel (uniformly at random; row i from (seed, i), as every
    attack's draws: `driver.signs`), clipped."""
    signs = driver.signs((seed, 2**31), np.arange(len(x)), x.shape[1:])
    return np.clip(x + np.float32(eps) * signs, clip_min, clip_max).astype(np.float32)


def transfer(source: keras.Model, x: np.ndarray, y: np.ndarray, eps: float, config: AdaptiveConfig) -> np.ndarray:
    """Adversarial examples made by PGD (the config's steps and restarts) on another model."""
    return attacks.pgd(
        source, x, y, eps=eps, steps=config.pgd_steps, restarts=config.pgd_restarts, seed=config.seed,
        batch_size=config.batch_size, name="transfer pgd",
    )


def run_gradient_attack(name: str, model: keras.Model, x, y, eps: float, config: AdaptiveConfig, **overrides) -> np.ndarray:
    """One of GRADIENT_ATTACKS on `model` (whose saturations carry the backward pass to use)."""
    common = dict(eps=eps, batch_size=config.batch_size)
    if name == "fgsm":
        return attacks.fgsm(model, x, y, **common)
    if name == "pgd":
        return attacks.pgd(model, x, y, steps=config.pgd_steps, restarts=config.pgd_restarts, seed=config.seed, **common)
    if name in ("apgd-ce", "apgd-dlr", "apgd-t"):
        settings = dict(iterations=config.apgd_iterations, restarts=config.apgd_restarts, seed=config.seed,
                        target_classes=config.apgd_target_classes)
        settings.update(overrides)
        return apgd(model, x, y, loss={"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-t"}[name], **settings, **common)
    raise ValueError(f"attack must be one of {', '.join(GRADIENT_ATTACKS)}. Received: {name!r}")


def evaluate_adaptive(model_paths: Sequence[str], config: AdaptiveConfig, output_dir: str | None = None,
                      data_dir: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Runs the adaptive suite on each model; writes results.json and results.md, and returns the
    former's content. Resumes as `evaluation.evaluate` does, whose arguments these are, except that
    `output_dir` defaults to `adaptive/` in the first model's folder."""
    started = time.perf_counter()
    paths, loaded = run_dir.load_models(model_paths)
    source = run_dir.load_models([config.transfer_from])[1][0] if config.transfer_from else None
    output_dir = output_dir or os.path.join(results_dir.default_output_dir(paths[0]), "adaptive")
    x, y = data.first_test_images(config.dataset, config.num_examples, data_dir)
    for path, model in zip([*paths, config.transfer_from], [*loaded, source]):
        if model is not None:
            report.check_model(model, path, x, y)
    run_dir.make_folder(output_dir, "output folder")  # before the first attack
    eps = float(config.eps)
    x_transfer = None
    if source is not None:
        start = time.perf_counter()
        x_transfer = transfer(source, x, y, eps, config)
        logging.info("transfer examples made on %s in %.1f s", config.transfer_from, time.perf_counter() - start)
    results = report.results_header(config, len(x), command, output_dir)
    results.update({
        "suite": "adaptive",
        "eps": eps,
        "reproduce": report.evaluate_command(paths, config, output_dir, data_dir),
        # The transfer source as a file, as the models' paths (config.transfer_from is as given).
        "transfer_from_path": os.path.abspath(run_dir.resolve_model_path(config.transfer_from)) if config.transfer_from else None,
    })
    labels = report.unique_labels([report.model_label(p) for p in paths])
    earlier = results["total_seconds"] = results_dir.resume_partial(output_dir, paths, config, results)
    kept = results_dir.unfinished_model(output_dir, paths, config)  # the next model's finished attacks, if any
    for path, label, model in list(zip(paths, labels, loaded))[len(results["models"]):]:
        progress = {"attacks": {}, "correct": {}}  # filled attack by attack, kept if interrupted
        if kept:
            progress = {"attacks": kept["attacks"], "correct": kept["correct"]}
            logging.info("Resuming %s on %s: %d attacks finished before", output_dir, label, len(kept["correct"]))
            earlier += sum(run["seconds"] for key, run in kept["attacks"].items() if key in kept["correct"])
            kept = None
        unfinished = {"label": label, "path": os.path.abspath(path), "sha256": report.fingerprint(path), **progress}
        with results_dir.keep_on_interrupt(output_dir, results, unfinished):
            results["models"].append(evaluate_model(model, label, x, y, config, x_transfer, path, progress))
        results["total_seconds"] = earlier + time.perf_counter() - started
    results_dir.write_results(output_dir, results, adaptive_markdown(results))
    logging.info("Wrote results.json and results.md to %s", output_dir)
    return results


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def evaluate_model(
    model: keras.Model,
    label: str,
    x: np.ndarray,
    y: np.ndarray,
    config: AdaptiveConfig,
    x_transfer: np.ndarray | None = None,
    path: str | None = None,
    progress: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every attack, the worst case and the sanity checks on one model (results.json's record).

    Args:
      model: the model as evaluated (its saturation is switched on for attacks and accuracy).
      label: its name in the report.
      x, y: the examples.
      config: the settings (`config.eps` is the attack size).
      x_transfer: adversarial examples made on another model, if any.
      path: the model's file, recorded.
      progress: {"attacks": {key: record}, "correct": {key: per-example outcome, packed}} that
        receives each attack as it finishes (what an interrupt keeps; a new one if None). Attacks
        it already holds with their outcomes, an interrupted run's (`results_dir.unfinished_model`),
        are taken over, not run again; the model's record lists them as "resumed_attacks".
    """
    model_started = time.perf_counter()
    eps = float(config.eps)
    backwards = config.backwards if has_saturation(model) else config.backwards[:1]
    targets = {b: attacks.with_backward(model, b, config.steepness) for b in backwards}
    clean = models.correct(model, x, y)
    logging.info("%s: clean accuracy %.4f on %d images", label, clean.mean(), len(x))
    progress = {"attacks": {}, "correct": {}} if progress is None else progress
    runs, packed = progress["attacks"], progress["correct"]
    kept = {key: runs.pop(key) for key in list(runs) if key in packed}  # (a record without outcomes runs again)
    runs.clear()
    correct: dict[str, np.ndarray] = {}
    resumed: list[str] = []

    def resume(key) -> bool:
        """Takes attack `key` over from the interrupted run, in the order the attacks run; False if it has none."""
        if key not in kept:
            return False
        runs[key], correct[key] = kept.pop(key), results_dir.unpack_correct(packed[key], len(x))
        resumed.append(key)
        return True

    def record(key, kind, x_adv, seconds, backward=None, rows=None, base=None, **extra):
        """Records attack `key`; x_adv are the images of x[rows] (None: all of x), and elsewhere the
        outcome of attack `base` counts (Square's further rounds, on the examples still robust)."""
        attacks.check_adversarial(x_adv, x if rows is None else x[rows], eps)
        if rows is None:
            correct[key] = models.correct(model, x_adv, y)
        else:
            correct[key] = correct[base].copy()
            correct[key][rows] = models.correct(model, x_adv, y[rows])
            extra["newly_fooled"] = int(np.sum(~correct[key][rows]))
        packed[key] = results_dir.pack_correct(correct[key])
        runs[key] = {"attack": kind, "backward": backward, "accuracy": float(correct[key].mean()),
                     "seconds": seconds, "description": describe(kind, config, eps), **extra}
        logging.info("%s: %s accuracy %.4f (%.1f s)", label, key, runs[key]["accuracy"], seconds)

    for backward, target in targets.items():
        for name in GRADIENT_ATTACKS:
            if not resume(key := _key(name, backward, len(targets))):
                x_adv, seconds = _timed(lambda: run_gradient_attack(name, target, x, y, eps, config))
                record(key, name, x_adv, seconds, backward)
    if not resume("square"):
        (x_adv, queries), seconds = _timed(lambda: square(
            model, x, y, eps=eps, queries=config.square_queries, p_init=config.square_p_init, seed=config.seed,
            batch_size=config.batch_size, return_queries=True,
        ))
        record("square", "square", x_adv, seconds, queries_mean=float(queries.mean()), queries_max=int(queries.max()))
    certificate, certify_seconds = _timed(lambda: certify.certify(model, x, y, eps)) if config.certify else (None, 0.0)
    proven = certificate.certified_ibp if certificate is not None else np.zeros(len(x), bool)
    escalation = _escalate_square(model, x, y, eps, config, clean, correct, runs, record, resume, proven)
    if x_transfer is not None and not resume("transfer"):
        record("transfer", "transfer", x_transfer, 0.0, source=config.transfer_from)
    if not resume("noise"):
        x_adv, seconds = _timed(lambda: random_noise(x, eps, config.seed))
        record("noise", "noise", x_adv, seconds)

    robust = worst_case(clean, correct)
    for key in runs:  # Examples that this attack alone breaks: what the worst case would lose without it.
        others = worst_case(clean, {k: v for k, v in correct.items() if k != key})
        runs[key]["fooled_only_by_this"] = int(np.sum(others & ~correct[key]))
    checks = _sanity_checks(targets, x, y, eps, config, clean, correct, runs, escalation)
    for check in checks:
        logging.info("%s: check %s: %s %s", label, check["name"], check["status"], check_numbers(check))
    record = {
        "label": label,
        "path": os.path.abspath(path) if path else None,
        "sha256": report.fingerprint(path) if path else None,
        "has_saturation": has_saturation(model),
        "clean_accuracy": float(clean.mean()),
        "attacks": runs,
        "worst_case_accuracy": float(robust.mean()),
        "checks": checks,
    }
    if config.certify:
        record["certified"] = [certify.checked_against_attacks(model, label, x, y, eps, robust, result=certificate)]
        record["certified"][0]["seconds"] += certify_seconds
    if resumed:
        record["resumed_attacks"] = resumed
    # Its attacks taken over count with the seconds they took then.
    record["seconds"] = time.perf_counter() - model_started + sum(runs[key]["seconds"] for key in resumed)
    return record


def _escalate_square(model, x, y, eps: float, config: AdaptiveConfig, clean, correct, runs, record, resume,
                     proven: np.ndarray) -> list[dict[str, Any]]:
    """Gives Square more queries while they pay: a gradient-free attack that fools what every
    gradient attack missed, or keeps gaining with budget, is the sign of masked gradients, and its
    full strength is what the worst case must count.

    While the last Square run fooled examples that no gradient attack fooled, Square runs again
    with twice the queries (and new random squares) on the examples robust under every attack so
    far, at most `MAX_SQUARE_DOUBLINGS` times; each run is recorded as attack "square-x2", "-x4", ...,
    its outcome that of the run before where it did not attack. A round that `resume` takes over
    (an interrupted run's) is not run again. Examples in `proven` (certified robust) are
    left out of those runs: no query can fool them, and on a certifiably trained model they are
    most of the robust ones. The certificate is still checked against every attack run on them,
    the first Square run included.

    Returns:
      One entry per round: queries, examples attacked, examples newly fooled.
    """
    gradient = {k: v for k, v in correct.items() if k.split("/")[0] in GRADIENT_ATTACKS}
    gained = int(np.sum(~correct["square"] & worst_case(clean, gradient)))
    rounds, queries, before = [], config.square_queries, "square"
    while gained > 0 and len(rounds) < MAX_SQUARE_DOUBLINGS:
        queries *= 2
        key = f"square-x{queries // config.square_queries}"
        if not resume(key):
            robust = np.flatnonzero(worst_case(clean, correct) & ~proven)
            if robust.size == 0:
                break
            x_adv, seconds = _timed(lambda: square(
                model, x[robust], y[robust], eps=eps, queries=queries, p_init=config.square_p_init,
                seed=config.seed + len(rounds) + 1, batch_size=config.batch_size,
            ))
            record(key, "square", x_adv, seconds, rows=robust, base=before, queries=queries, attacked=int(robust.size),
                   description=f"{queries} queries per example at most on the {robust.size} examples robust so far "
                               "(new random squares), the run before's outcome elsewhere"
                               + (" (certified examples left out: no query can fool them)" if proven.any() else ""))
        gained, before = runs[key]["newly_fooled"], key
        rounds.append({"queries": queries, "attacked": runs[key]["attacked"], "newly_fooled": gained})
    return rounds


def _key(name: str, backward: str, backwards: int) -> str:
    return name if backwards == 1 or backward == "identity" else f"{name}/{backward}"


def _sanity_checks(targets, x, y, eps, config: AdaptiveConfig, clean, correct, runs, escalation) -> list[dict[str, Any]]:
    m = min(config.check_examples, len(x))
    xs, ys = x[:m], y[:m]
    model = next(iter(targets.values()))
    apgd_keys = [k for k in runs if runs[k]["attack"] in ("apgd-ce", "apgd-dlr")]
    # eps_to_half: APGD (both losses, every backward) at eps, midway and 0.5; eps itself from the main runs.
    curve = {eps: float(worst_case(clean[:m], {k: correct[k][:m] for k in apgd_keys}).mean())}
    for e in sorted({round((eps + HALF) / 2, 6), HALF} - {eps}):
        survived = {}
        for backward, target in targets.items():
            for name in ("apgd-ce", "apgd-dlr"):
                survived[(name, backward)] = models.correct(model, run_gradient_attack(name, target, xs, ys, e, config), ys)
        curve[e] = float(worst_case(clean[:m], survived).mean())
    checks = [check_eps_to_half(curve, m)]
    # more_budget: APGD-CE (first backward) with twice the iterations, and with twice the restarts.
    base_key = _key("apgd-ce", next(iter(targets)), len(targets))
    doubled = {}
    for label, overrides in (
        (f"{2 * config.apgd_iterations} iterations", dict(iterations=2 * config.apgd_iterations)),
        (f"{2 * config.apgd_restarts} restarts", dict(restarts=2 * config.apgd_restarts)),
    ):
        x_adv = run_gradient_attack("apgd-ce", model, xs, ys, eps, config, **overrides)
        attacks.check_adversarial(x_adv, xs, eps)
        doubled[label] = float(models.correct(model, x_adv, ys).mean())
    checks.append(check_more_budget(float(correct[base_key][:m].mean()), doubled, m))
    gradient = {k: correct[k] for k in runs if runs[k]["attack"] in GRADIENT_ATTACKS}
    checks.append(check_gradient_free(correct["square"], gradient, escalation))
    accuracy = {k: runs[k]["accuracy"] for k in runs}
    checks.append(check_iterative(
        {k: accuracy[k] for k in gradient if runs[k]["attack"] == "fgsm"},
        {k: accuracy[k] for k in gradient if runs[k]["attack"] != "fgsm"}, len(x),
    ))
    white_box = {k: accuracy[k] for k in runs if k not in ("noise", "transfer")}
    checks.append(check_noise(accuracy["noise"], white_box, len(x)))
    return checks
