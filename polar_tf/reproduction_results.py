"""What a reproduction's report reads: its results, from the files only, and how its models were trained.

`collect` finds each dataset's evaluations under a protocol; `training_summary` tells how a model
was trained (its run folder's or shipped config and metrics); `further_runs` gathers evaluations of
other runs. A report never trains nor evaluates.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging

from polar_tf import report, results_md, run_dir, training
from polar_tf.config import Config
from polar_tf.results_dir import finished_results  # (`results_dir` names a folder here)
from polar_tf.reproduction_protocol import (EVALUATIONS, ROWS, Protocol, evaluation_configs, evaluation_dir,
                                            read_protocol_record, run_folder)

def finished_evaluation(output_dir: str, paths: list[str], config) -> dict | None:
    """The results.json in output_dir if it holds these models under these settings, else None.
    Its output_dir is the folder it was read from (it may have been written on another machine)."""
    results = finished_results(output_dir, paths, config)
    if results is not None:
        logging.info("%s is up to date; not evaluating again", os.path.join(output_dir, "results.json"))
        results["output_dir"] = os.path.abspath(output_dir)
    return results


def collect(dataset: str, protocol: Protocol, root: str, results_dir: str) -> dict | None:
    """One dataset's results as `reproduce` reports them, from the files only: every evaluation
    under `protocol` of the models that its table evaluated; None while any is missing.

    Reads the models from the table's results.json (where the results folder is now: it may have
    been written elsewhere), not from their training: a report never trains nor evaluates."""
    paths = _recorded_models(evaluation_dir(results_dir, dataset, "table"))
    if paths is None or len(paths) != len(ROWS) or any(run_dir.run_record(p) is None for p in paths):
        return None  # not evaluated, or the models' training records are not at hand
    configs = evaluation_configs(dataset, protocol, paths)
    result = {kind: finished_evaluation(evaluation_dir(results_dir, dataset, kind), paths, configs[kind]) for kind in EVALUATIONS}
    if None in result.values():
        return None
    result["training"] = [training_summary(p, run_folder(root, dataset, m), results_dir) for p, (m, _) in zip(paths, ROWS)]
    return result


def _recorded_models(output_dir: str) -> list[str] | None:
    """The models an evaluation's results.json names, as paths from the working directory."""
    path = os.path.join(output_dir, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    return [os.path.relpath(os.path.join(output_dir, os.path.relpath(m["path"], results["output_dir"])))
            for m in results["models"]]


def full_protocol_sections(folder: str | None, results_dir: str, datasets: list[str]) -> dict:
    """{"protocol", "folder", "results": {dataset: results}, "remaining": [datasets], "title"} of the
    full-protocol reproduction in `folder` (empty where there is none, or it is this run's own
    folder); "title" follows the dataset's name in the headings of its tables."""
    if not folder or os.path.abspath(folder) == os.path.abspath(results_dir):
        return {}
    record = read_protocol_record(folder)
    if record is None:
        return {}
    protocol, root, _ = record
    collected = {d: collect(d, protocol, root, folder) for d in datasets}
    return {"protocol": protocol, "folder": folder, "results": {d: r for d, r in collected.items() if r},
            "remaining": [d for d, r in collected.items() if r is None],
            "title": " at the paper's full protocol" if protocol.is_paper else f" ({folder})"}


def further_runs(folders: tuple[str, ...]) -> dict:
    """The models of other evaluations (results folders of evaluate.py, either suite), merged by model
    path, each with how it was trained (from its run folder, where that is at hand)."""
    models, sources = {}, []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist: --further_results takes results folders of evaluate.py")
        with open(path) as f:
            results = json.load(f)
        sources.append(results)
        for record in results["models"]:
            model = models.setdefault(record["path"], {"label": record["label"], "dataset": results["dataset"],
                                                       "accuracy": {}, "trained": _trained(record["path"])})
            if "worst_case_accuracy" in record:  # the adaptive suite
                model["accuracy"]["adaptive"] = record["worst_case_accuracy"]
                model["adaptive_budgets"] = results_md.budget_note(results)
                model["adaptive_examples"] = results["num_examples"]
                if (certified := results_md.certified_at(record, results.get("eps"))) is not None:
                    model["adaptive_certified"] = certified[1]  # on the adaptive suite's own images
            else:
                model["accuracy"].update(record["accuracy"], clean=record["clean_accuracy"])
                if record.get("certified"):
                    model["accuracy"]["certified"] = results_md.certified_at(record, results["eps"])[1]
                model["eps"] = results.get("eps")
    return {"models": list(models.values()), "sources": sources}


def _trained(model_path: str) -> dict | None:
    record = run_dir.run_record(model_path)
    if record is None:
        return None
    config, records = record
    epochs, seen, start = len(records), {model_path}, config
    # The epochs of the model it started from, and of the one that one started from, and so on.
    while start.init_from and start.init_from not in seen and (before := run_dir.run_record(start.init_from)):
        seen.add(start.init_from)
        start, epochs = before[0], epochs + len(before[1])
    return {"model": config.model, "seed": config.seed, "jump": config.jump if config.model == "polarized" else None,
            "epochs": epochs,
            "frac_within_eps_of_jump": records[-1].get("frac_within_eps_of_jump") if records else None,
            "training": _training_kind(config)}


def _training_kind(config: Config) -> str:
    """How a model was trained, in a few words: the paper's schedule, or certified training's settings."""
    if not config.certified_training:
        if config.model != "adversarial":
            return "the paper's schedule"
        warmup = f", eps ramped up over {config.adv_warmup_epochs} epochs" if config.adv_warmup_epochs else ""
        return f"Madry et al. ({config.adv_steps}-step PGD{warmup})"
    where = "stage 3" if config.num_stages > 1 else f"all {config.total_epochs} epochs"
    if config.init_from:
        where += f", started from {config.init_from}"
    if config.num_stages > 1 and (changed := [f"{name} {getattr(config, name):g}" for name in ("sigma1", "sigma2", "reg_max_weight")
                                              if getattr(config, name) != Config.__dataclass_fields__[name].default]):
        where += f" (stages 1-2 with {', '.join(changed)})"
    warmup = f" after {config.ibp_warmup_epochs} at eps 0" if config.ibp_warmup_epochs else ""
    return (f"IBP, {where}: eps 0 to {config.ibp_eps:g} and kappa 1 to {config.ibp_kappa_final:g} over "
            f"{config.ibp_ramp_epochs} of {config.certified_epochs} epochs{warmup}")


def training_summary(model_path: str, workdir: str, results_dir: str) -> dict:
    """The run's settings and cost, and its training figures (copied next to the evaluations).

    A shipped model has its config and metrics beside it (pretrained/<name>.config.json and
    .metrics.jsonl) and no figures of its own: the ones copied when it was trained are kept."""
    record = run_dir.run_record(model_path)
    if record is None:
        raise ValueError(f"{model_path} has no training record (config.json and metrics.jsonl) beside it or in its "
                         "run folder: the report cannot say how it was trained")
    config, records = record
    figures_dir = copy_figures(workdir, config, results_dir)
    figures = sorted(os.listdir(figures_dir)) if os.path.isdir(figures_dir) else []
    return {
        "figures": [os.path.join(figures_dir, name) for name in figures],
        "workdir": workdir,
        "model": config.model,
        "seed": config.seed,
        "epochs": len(records),
        "train_examples": config.train_examples,
        "adv_steps": config.adv_steps if config.model == "adversarial" else None,
        "adv_warmup_epochs": config.adv_warmup_epochs,
        "classifier_init": config.classifier_init,
        "adam_epsilon": config.adam_epsilon,
        "jump": config.jump if config.model == "polarized" else None,
        "dataset": config.dataset,
        "frac_within_eps_of_jump": records[-1].get("frac_within_eps_of_jump") if records else None,
        "frac_change_per_epoch": stage2_trend(records),
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "command": report.train_command(config, workdir),
        "final_test_accuracy": records[-1]["test_accuracy"] if records else None,
        "final_train_accuracy": records[-1].get("train_accuracy") if records else None,
        "train_accuracy_examples": min(training.TRAIN_EVAL_EXAMPLES, config.train_examples or training.TRAIN_EVAL_EXAMPLES),
        "final_fit_accuracy": records[-1].get("fit_accuracy") if records else None,
    }


def copy_figures(workdir: str, config: Config, results_dir: str) -> str:
    """Copies the run's figures (workdir/plots, if there) into results_dir; returns that folder."""
    plots = os.path.join(workdir, "plots")
    figures_dir = os.path.join(results_dir, f"{config.dataset}_{config.model}_training")
    for name in sorted(os.listdir(plots)) if os.path.isdir(plots) else []:
        os.makedirs(figures_dir, exist_ok=True)
        shutil.copyfile(os.path.join(plots, name), os.path.join(figures_dir, name))
    return figures_dir


def stage2_trend(records: list[dict], last: int = 5) -> float | None:
    """Per-epoch change of the fraction of front-end outputs within eps of a jump over the last
    `last` epochs of stage 2 (the front end is frozen after it); None for other models."""
    fractions = [r["frac_within_eps_of_jump"] for r in records if r["stage"] == 2 and "frac_within_eps_of_jump" in r][-last:]
    if len(fractions) < 2:
        return None
    return (fractions[-1] - fractions[0]) / (len(fractions) - 1)
