"""results.md of each evaluation suite, and what other reports read from their results.

`standard_markdown`: the paper's attacks (evaluate.py, `polar_tf.evaluation`); `adaptive_markdown`:
the adaptive suite (evaluate.py --suite=adaptive, `polar_tf.adaptive`). Both take the content of
results.json, so that a report is always written from the files.
"""

from __future__ import annotations

from typing import Any

from polar_tf import report
from polar_tf.config import DEFAULT_EPS
from polar_tf.evaluation_config import ATTACKS, DEFAULT_RESTARTS, DEFAULT_STEPS, AdaptiveConfig

ATTACK_NAMES = {"fgsm": "FGSM", "bim": "BIM", "pgd": "PGD"}  # the paper's attacks
ADAPTIVE_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T",
                  "square": "Square", "transfer": "transfer", "noise": "noise"}  # the adaptive suite's


def certified_at(model_record: dict[str, Any], eps: float) -> tuple[str, float] | None:
    """(label of the interval certificate, certified accuracy) of a model at eps, if computed."""
    for entry in model_record.get("certified", []):
        if entry["eps"] == eps:
            (name, value), = [(k, v) for k, v in entry["certified_accuracy"].items() if k.startswith("interval_from_")]
            return name.replace("_", " "), value
    return None


def reduced_budgets(config: dict[str, Any]) -> list[str]:
    """How the per-image attack budgets of `config` (an EvalConfig as a dict) fall short of the
    paper's protocol (100 steps, 20 PGD restarts), e.g. ["20 steps of 100", "2 restarts of 20"]."""
    reduced = []
    if config["steps"] < DEFAULT_STEPS and set(config["attacks"]) & {"bim", "pgd"}:
        reduced.append(f"{config['steps']} steps of {DEFAULT_STEPS}")
    if config["restarts"] < DEFAULT_RESTARTS and "pgd" in config["attacks"]:
        reduced.append(f"{config['restarts']} restarts of {DEFAULT_RESTARTS}")
    return reduced


def standard_markdown(results: dict[str, Any]) -> str:
    """results.md of the paper's attacks (`polar_tf.evaluation`): the paper's table for these models, the settings, and the sweep if any."""
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
        f"{results['num_examples']} test images{pgd_note(config, results['num_examples'])}, L-inf attacks, pixels in [0, 1]."
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
    paper = report.PAPER_RESULTS.get(results["dataset"])
    if paper and results["eps"] == DEFAULT_EPS[results["dataset"]]:
        columns = [0] + [1 + ATTACKS.index(n) for n in names]
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
        *report.environment_rows(results),
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


def pgd_note(config: dict[str, Any], num_examples: int) -> str:
    """The note ' (PGD: the first N)' where PGD attacked fewer images than the others, else ''."""
    n = pgd_subset(config, num_examples)
    return f" (PGD: the first {n})" if n else ""


def pgd_subset(config: dict[str, Any], num_examples: int) -> int | None:
    """How many images PGD attacked where that is fewer than the others' `num_examples`, else None."""
    n = config.get("pgd_examples")
    return n if n and n < num_examples and "pgd" in config.get("attacks", ()) else None


def _loss_text(loss: str) -> str:
    if loss == "cw":
        return "cw: margin max_{j != y} l_j - l_y on the logits"
    return "ce: cross-entropy on the logits; MSE on the one-hot label where it underflows in float64 (as the reference)"


def _backward_text(config: dict[str, Any]) -> str:
    if config["backward"] == "identity":
        return "identity (straight-through, BPDA)"
    steepness = "the model's steepness" if config["steepness"] is None else f"steepness {config['steepness']:g}"
    return f"smooth (tanh surrogate, {steepness})"


def adaptive_reduced_budgets(config: dict[str, Any]) -> list[str]:
    """How the per-image budgets of `config` (an AdaptiveConfig as a dict) fall short of the
    standard ones: AutoAttack's (APGD 100 iterations, Square 5,000 queries) and the paper's PGD
    (100 steps, 20 restarts); e.g. ["Square 500 queries of 5000"]."""
    standard = AdaptiveConfig()
    names = {"pgd_steps": "PGD {} steps of {}", "pgd_restarts": "PGD {} restarts of {}",
             "apgd_iterations": "APGD {} iterations of {}", "apgd_target_classes": "APGD-T {} target classes of {}",
             "square_queries": "Square {} queries of {}"}
    # A config written before a setting existed has no entry for it (budget_note says so).
    return [text.format(config[name], getattr(standard, name)) for name, text in names.items()
            if name in config and config[name] < getattr(standard, name)]


def adaptive_markdown(results: dict[str, Any]) -> str:
    """results.md of the adaptive suite (`polar_tf.adaptive`): accuracy under each attack and the worst case per model, the checks, the command."""
    reduced = adaptive_reduced_budgets(results["config"])
    lines = [
        f"# Adaptive robustness evaluation on {results['dataset']}, eps = {results['eps']:g}",
        "",
        *([f"**Reduced budgets, not the standard ones** ({'; '.join(reduced)}): the accuracies and the worst "
           "case are looser upper bounds than the standard budgets give.", ""] if reduced else []),
        f"Accuracy (%) of the saturated model on the first {results['num_examples']} test images, L-inf "
        "attacks, pixels in [0, 1]. Worst case: an example counts as robust only if it is classified "
        "correctly clean and under every attack (noise and transfer included).",
        "",
    ]
    keys = list(dict.fromkeys(k for m in results["models"] for k in m["attacks"]))
    certified = results["config"].get("certify", False)
    if certified:
        lines += ["Certified: a sound lower bound on robust accuracy (`polar_tf.certify`), checked per example "
                  "against every attack of the suite.", ""]
    lines += ["| model | clean | " + " | ".join(attack_title(k) for k in keys) + " | worst case |"
              + (" certified |" if certified else ""),
              "|---" * (len(keys) + 3 + certified) + "|"]
    for model in results["models"]:
        cells = [report.percent(model["clean_accuracy"])]
        cells += [report.percent(model["attacks"][k]["accuracy"]) if k in model["attacks"] else "-" for k in keys]
        cells.append(f"**{report.percent(model['worst_case_accuracy'])}**")
        if certified:
            cells.append(report.percent(certified_at(model, results["eps"])[1]))
        lines.append(f"| {model['label']} | " + " | ".join(cells) + " |")
    for model in results["models"]:
        lines += ["", f"## {model['label']}", "", "| attack | accuracy (%) | fooled only by it | seconds | settings |",
                  "|---|---|---|---|---|"]
        for key, run in model["attacks"].items():
            extra = f"; {run['queries_mean']:.0f} queries on average" if "queries_mean" in run else ""
            lines.append(f"| {attack_title(key)} | {report.percent(run['accuracy'])} | {run['fooled_only_by_this']} | "
                         f"{run['seconds']:.1f} | {run['description']}{extra} |")
        lines += ["", "Sanity checks:", "", "| check | status | numbers |", "|---|---|---|"]
        for check in model["checks"]:
            status = "pass" if check["status"] == "pass" else "**WARN**"
            lines.append(f"| {check['name']} | {status} | {check_numbers(check)} |")
    config = results["config"]
    lines += [
        "",
        "| setting | value |",
        "|---|---|",
        f"| backward passes of the saturation | {', '.join(config['backwards'])} (smooth: steepness "
        f"{'of the model' if config['steepness'] is None else config['steepness']}) |",
        f"| examples | {results['num_examples']} (first of the test set); eps_to_half and more_budget on the first "
        f"{min(config['check_examples'], results['num_examples'])} |",
        f"| seed | {config['seed']} |",
        *report.environment_rows(results),
        f"| wall time, total | {results['total_seconds']:.1f} s |",
        "",
        "Reproduce every number:",
        "",
        f"    {results['reproduce']}",
    ]
    return "\n".join(lines) + "\n"


def attack_title(key: str) -> str:
    name, _, backward = key.partition("/")
    if name.startswith("square-x"):
        return f"Square ({name[len('square-'):]} queries)"
    return ADAPTIVE_NAMES[name] + (f" ({backward})" if backward else "")


def check_numbers(check: dict[str, Any]) -> str:
    """A sanity check's numbers on one line: "name value; name {key: value, ...}"."""
    parts = []
    for k, v in check.items():
        if k in ("name", "status") or v is None:
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {_fmt(b)}" for a, b in v.items())
            parts.append(f"{k} {{{v}}}")
        else:
            parts.append(f"{k} {_fmt(v)}")
    return "; ".join(parts)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe(name: str, config: AdaptiveConfig, eps: float) -> str:
    """The settings of one attack of the suite, in words."""
    return {
        "fgsm": "one signed-gradient step of size eps",
        "pgd": f"{config.pgd_steps} steps of {eps / 10:.4g} from a uniform random start, {config.pgd_restarts} "
               "restarts (worst case per example)",
        "apgd-ce": f"{config.apgd_iterations} iterations, {config.apgd_restarts} restart(s), cross-entropy (no fallback)",
        "apgd-dlr": f"{config.apgd_iterations} iterations, {config.apgd_restarts} restart(s), DLR loss",
        "apgd-t": f"{config.apgd_iterations} iterations, {config.apgd_restarts} restart(s) for each of the "
                  f"{config.apgd_target_classes} classes ranked highest after the top one, targeted DLR loss",
        "square": f"{config.square_queries} queries per example at most, p_init {config.square_p_init:g}, margin loss",
        "transfer": f"PGD ({config.pgd_steps} steps, {config.pgd_restarts} restarts) on {config.transfer_from}",
        "noise": "+eps or -eps in every pixel at random",
    }[name]


def budget_note(results: dict) -> str:
    """How an evaluation's per-image budgets compare with the standard ones (the paper's protocol;
    for the adaptive suite AutoAttack's budgets and settings), for every table the results feed."""
    config = results["config"]
    if results.get("suite") != "adaptive":
        reduced = reduced_budgets(config)
        return "the paper's" if not reduced else "REDUCED (" + "; ".join(reduced) + ")"
    reduced = adaptive_reduced_budgets(config)
    if "apgd_target_classes" not in config:  # written before APGD-T and AutoAttack's Square settings
        reduced.append("an earlier suite: no APGD-T, Square with p_init 0.05 on a rescaled schedule")
    return "AutoAttack's" if not reduced else "REDUCED (" + "; ".join(reduced) + ")"
