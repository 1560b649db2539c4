"""The figures of an evaluation (evaluate.py): accuracy against eps, adversarial examples, front-end maps.

See `polar_tf.evaluation` for the files; `plots` draws them.
"""

from __future__ import annotations

import os
import re
from typing import Any

import keras
import numpy as np

from polar_tf import models, plots, results_md
from polar_tf.evaluation_config import EvalConfig
from polar_tf.frontend import saturate

EXAMPLES_SHOWN = 5


def model_figures(model, label, x, y, adversarial, config: EvalConfig, output_dir: str, prefix: str) -> list[str]:
    """The figures of one model (adversarial examples; front-end maps where it has a front end),
    from `adversarial`: (attack name, its images at config.eps), None where no attack ran at eps.
    Their file names start with `prefix`; returns the names."""
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
    title = f"{label}: {results_md.ATTACK_NAMES[name]}, eps = {config.eps:g}"
    if frontend is not None:
        maps = _saturated_maps(model, x[shown])
        maps_adv = _saturated_maps(model, x_adv[shown])
        changed = np.sum(maps != maps_adv, axis=(0, 1, 2))
        channel = int(np.argmax(changed))  # The filter whose outputs the attack flips most.
        plots.plot_adversarial_examples(
            x[shown], x_adv[shown], config.eps, os.path.join(output_dir, prefix + "adversarial_examples.png"),
            captions, maps[..., channel], maps_adv[..., channel], channel, title,
        )
        for suffix, images, image_maps, kind in (("", x, maps, "clean"), ("_attacked", x_adv, maps_adv, results_md.ATTACK_NAMES[name])):
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


def accuracy_curves(results: dict[str, Any]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{model label: {attack: accuracy against eps}}, each attack's curve starting at eps 0 with the
    clean accuracy, as `plots.plot_accuracy_vs_eps` takes them."""
    curves = {}
    for model in results["models"]:
        by_name = curves[model["label"]] = {}
        for name in results["config"]["attacks"]:
            points = {0.0: model["clean_accuracy"]}
            points.update({r["eps"]: r["accuracy"] for r in model["runs"] if r["attack"] == name})
            eps = sorted(points)
            by_name[results_md.ATTACK_NAMES[name]] = (eps, [points[e] for e in eps])
        if model.get("certified"):
            eps = [entry["eps"] for entry in model["certified"]]
            by_name["certified (lower bound)"] = (eps, [results_md.certified_at(model, e)[1] for e in eps])
    return curves


def slug(label: str) -> str:
    """A label as part of a file name: 'runs/a b' -> 'runs-a-b'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
