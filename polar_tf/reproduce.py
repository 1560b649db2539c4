r"""Regenerates the paper's table: trains the six models, evaluates them, writes REPRODUCTION.md.

  python -m polar_tf.reproduce --dataset=all                 # the paper's schedule and protocol
  KERAS_BACKEND=jax python -m polar_tf.reproduce --dataset=all --steps_per_execution=32   # on a GPU
  python -m polar_tf.reproduce --dataset=mnist --epochs_per_stage=1 --train_examples=2000 \
      --num_examples=200 --steps=10 --restarts=1 --adv_steps=5  # a reduced run, labelled as such

Beside the paper's table it runs this project's adaptive suite (`evaluate.py --suite=adaptive`, its
per-example worst case over every attack, transferred from the undefended model) and the sound
certificate (`evaluate.py --certify`) on each model.

Resumable: training picks up from its per-epoch checkpoints, and an evaluation whose results.json
already holds the same settings is not run again, so an interrupted run continues where it stopped
when the same command is given again. REPRODUCTION.md is generated from the results files only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from absl import app, flags, logging

from polar_tf import adaptive, cli, evaluation, runfiles, training
from polar_tf.config import DATASETS, Config

# The paper's rows, in its order, and the models that reproduce them.
ROWS = (("baseline", "no defense"), ("adversarial", "adversarial training"), ("polarized", "polarizing front end"))
COLUMNS = ("clean", "fgsm", "bim", "pgd")
TOLERANCE = {"clean": 2.0, "fgsm": 5.0, "bim": 5.0, "pgd": 5.0}  # points, as the target says
SWEEP = "0:0.4:0.05"  # the accuracy-against-eps figure (with one PGD restart, on sweep_examples)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How much of the paper's schedule and protocol a reproduction runs (defaults: all of it).

    The adversarially trained model has its own epoch count and PGD steps, since its epochs cost
    about adv_steps + 1 times the others'. The adaptive settings are this project's full suite."""

    epochs_per_stage: int = 20
    train_examples: int = 0
    adv_epochs_per_stage: int = 20
    adv_steps: int = 40
    num_examples: int = 10000
    steps: int = 100
    restarts: int = 20
    sweep_examples: int = 1000
    adaptive_examples: int = 10000
    apgd_iterations: int = 100
    square_queries: int = adaptive.DEFAULT_QUERIES
    seed: int = 0
    steps_per_execution: int = 1

    @property
    def is_paper(self) -> bool:
        paper = Protocol(steps_per_execution=self.steps_per_execution)
        return dataclasses.replace(self, sweep_examples=paper.sweep_examples) == paper


def reproduce(datasets: list[str], protocol: Protocol, root: str, data_dir: str | None, report: str,
              pretrained_dir: str | None, results_dir: str | None = None) -> None:
    """Trains, evaluates and reports; every step skips work already done.

    Training runs go to `root` (with their per-epoch checkpoints), evaluations to `results_dir`
    (default: `root`), the trained models to `pretrained_dir` (if given)."""
    results_dir = results_dir or root
    results = {}
    for dataset in datasets:
        paths = []
        for model, _ in ROWS:
            adversarial = model == "adversarial"
            config = Config(dataset=dataset, model=model, train_examples=protocol.train_examples, seed=protocol.seed,
                            epochs_per_stage=protocol.adv_epochs_per_stage if adversarial else protocol.epochs_per_stage,
                            adv_steps=protocol.adv_steps if adversarial else Config.adv_steps,
                            steps_per_execution=protocol.steps_per_execution)
            workdir = os.path.join(root, f"{dataset}_{model}")
            training.train_and_evaluate(config, workdir, "all", data_dir)
            paths.append(runfiles.final_checkpoint(workdir))
        table = evaluation.EvalConfig(dataset=dataset, num_examples=protocol.num_examples, steps=protocol.steps,
                                      restarts=protocol.restarts, seed=protocol.seed, certify=True)
        sweep = dataclasses.replace(table, num_examples=protocol.sweep_examples, eps_sweep=evaluation.parse_eps_sweep(SWEEP), restarts=1)
        suite = adaptive.AdaptiveConfig(dataset=dataset, num_examples=protocol.adaptive_examples, seed=protocol.seed,
                                        pgd_steps=protocol.steps, pgd_restarts=protocol.restarts,
                                        apgd_iterations=protocol.apgd_iterations,
                                        square_queries=protocol.square_queries, transfer_from=paths[0],
                                        check_examples=min(protocol.adaptive_examples, adaptive.AdaptiveConfig.check_examples))
        results[dataset] = {
            "table": _evaluate_once(paths, table, os.path.join(results_dir, f"{dataset}_table"), data_dir),
            "sweep": _evaluate_once(paths, sweep, os.path.join(results_dir, f"{dataset}_sweep"), data_dir),
            "adaptive": _adaptive_once(paths, suite, os.path.join(results_dir, f"{dataset}_adaptive"), data_dir),
            "training": [_training_summary(os.path.dirname(p)) for p in paths],
        }
        if pretrained_dir:
            _ship_pretrained(paths, pretrained_dir)
    runfiles.write_text(report, reproduction_markdown(results, protocol, os.path.dirname(os.path.abspath(report))))
    logging.info("Wrote %s", report)


def _evaluate_once(paths: list[str], config: evaluation.EvalConfig, output_dir: str, data_dir: str | None) -> dict:
    results = _up_to_date(output_dir, paths, config)
    if results is None:
        command = "python evaluate.py " + " ".join(_flags(paths, config, output_dir))
        results = evaluation.evaluate(paths, config, output_dir, data_dir, command=command)
    return results


def _adaptive_once(paths: list[str], config: adaptive.AdaptiveConfig, output_dir: str, data_dir: str | None) -> dict:
    results = _up_to_date(output_dir, paths, config)
    if results is None:
        command = adaptive.reproduce_command(paths, config, output_dir, data_dir)
        results = adaptive.evaluate_adaptive(paths, config, output_dir, data_dir, command=command)
    return results


def _up_to_date(output_dir: str, paths: list[str], config) -> dict | None:
    """The results.json in output_dir if it holds these models under these settings, else None."""
    existing = os.path.join(output_dir, "results.json")
    if not os.path.isfile(existing):
        return None
    with open(existing) as f:
        results = json.load(f)
    same_models = [m["path"] for m in results["models"]] == [os.path.abspath(p) for p in paths]
    if same_models and results["config"] == json.loads(json.dumps(dataclasses.asdict(config))):
        logging.info("%s is up to date; not evaluating again", existing)
        return results
    return None


def _flags(paths: list[str], config: evaluation.EvalConfig, output_dir: str) -> list[str]:
    out = [f"--model_path={','.join(paths)}", f"--dataset={config.dataset}", f"--num_examples={config.num_examples}",
           f"--steps={config.steps}", f"--restarts={config.restarts}", f"--seed={config.seed}", f"--output_dir={output_dir}"]
    if config.eps_sweep:
        out.append(f"--eps_sweep={SWEEP}")
    if config.certify:
        out.append("--certify")
    return out


def _training_summary(workdir: str) -> dict:
    config = runfiles.read_config(workdir)
    records = runfiles.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
    return {
        "workdir": workdir,
        "model": config.model,
        "seed": config.seed,
        "epochs": len(records),
        "adv_steps": config.adv_steps if config.model == "adversarial" else None,
        "frac_within_eps_of_jump": records[-1].get("frac_within_eps_of_jump") if records else None,
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "command": f"python train.py --dataset={config.dataset} --model={config.model} --workdir={workdir} "
                   f"--epochs_per_stage={config.epochs_per_stage} --train_examples={config.train_examples} "
                   f"--seed={config.seed}" + (f" --adv_steps={config.adv_steps}" if config.model == "adversarial" else ""),
        "final_test_accuracy": records[-1]["test_accuracy"] if records else None,
    }


def _ship_pretrained(paths: list[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        config = runfiles.read_config(os.path.dirname(path))
        stem = os.path.join(folder, f"{config.dataset}_{config.model}")
        shutil.copyfile(path, stem + ".keras")
        shutil.copyfile(os.path.join(os.path.dirname(path), "metrics.jsonl"), stem + ".metrics.jsonl")
        runfiles.write_json(stem + ".config.json", config.to_dict())


def reproduction_markdown(results: dict, protocol: Protocol, base: str) -> str:
    """REPRODUCTION.md from the results files: the paper's table beside ours, cell by cell."""
    kind = "the paper's schedule and protocol" if protocol.is_paper else "a REDUCED schedule/protocol (see below)"
    lines = ["# Reproduction of the paper's table", "",
             f"Generated by `python -m polar_tf.reproduce` from the results files; {kind}.", "",
             "Accuracy (%). Each cell: ours / paper (difference). Cells off by more than 2 points (clean) "
             "or 5 points (robust) are marked **!**. Two columns are this project's, not the paper's: "
             "`adaptive` is the per-example worst case over the adaptive suite (APGD-CE, APGD-DLR and PGD "
             "through both backward passes, Square, transfer from the undefended model, noise), an upper "
             "bound on robust accuracy; `certified` is the sound lower bound (front-end certificate, then "
             "interval bounds; from the input for models without a front end).", ""]
    for dataset, result in results.items():
        table, suite = result["table"], result["adaptive"]
        lines += [f"## {dataset}, eps = {table['eps']:g}, {table['num_examples']} test images "
                  f"(adaptive: the first {suite['num_examples']})", "",
                  "| model | clean | FGSM | BIM | PGD | adaptive | certified |", "|---|---|---|---|---|---|---|"]
        paper = evaluation.PAPER_RESULTS[dataset]
        for (_, row), record, worst in zip(ROWS, table["models"], suite["models"]):
            ours = [record["clean_accuracy"]] + [record["accuracy"][a] for a in COLUMNS[1:]]
            cells = []
            for column, value, reference in zip(COLUMNS, ours, paper[row]):
                diff = 100 * value - reference
                flag = " **!**" if abs(diff) > TOLERANCE[column] else ""
                cells.append(f"{100 * value:.2f} / {reference:.2f} ({diff:+.2f}){flag}")
            cells.append(f"{100 * worst['worst_case_accuracy']:.2f}")
            certified = evaluation.certified_at(record, table["eps"])
            cells.append(f"{100 * certified[1]:.2f}" if certified else "-")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        failed = [f"{m['label']}: {c['name']}" for m in suite["models"] for c in m["checks"] if c["status"] != "pass"]
        lines += ["", "Adaptive-suite sanity checks: " + ("all pass." if not failed else "warnings on " + "; ".join(failed)
                  + f" (see {os.path.relpath(os.path.join(suite['output_dir'], 'results.md'), base)}).")]
        plot = os.path.join(result["sweep"]["output_dir"], "accuracy_vs_eps.png")
        lines += ["", f"![accuracy against eps, {dataset}]({os.path.relpath(plot, base)})", "",
                  "| run | command | seed | epochs | wall time | final test acc |", "|---|---|---|---|---|---|"]
        for t in result["training"]:
            lines.append(f"| train {t['model']} | `{t['command']}` | {t['seed']} | {t['epochs']} | "
                         f"{t['train_seconds']:.0f} s | {100 * t['final_test_accuracy']:.2f} |")
        for name in ("table", "sweep", "adaptive"):
            r = result[name]
            lines.append(f"| evaluate ({name}) | `{r['command']}` | {r['config']['seed']} | - | "
                         f"{r['total_seconds']:.0f} s | - |")
        lines += ["", f"Backend {table['backend']}, device {table['device']}.", ""]
        lines += _gap_notes(result, protocol)
    lines += ["## Protocol", "", "| setting | value | full protocol |", "|---|---|---|"]
    full = Protocol()
    for field in dataclasses.fields(Protocol):
        lines.append(f"| {field.name} | {getattr(protocol, field.name)} | {getattr(full, field.name)} |")
    return "\n".join(lines) + "\n"


def _gap_notes(result: dict, protocol: Protocol) -> list[str]:
    """For each row with a cell outside the tolerance, the measured facts that bear on it."""
    table, suite = result["table"], result["adaptive"]
    paper, full = evaluation.PAPER_RESULTS[table["dataset"]], Protocol()
    notes = []
    for (model, row), record, worst, trained in zip(ROWS, table["models"], suite["models"], result["training"]):
        ours = [record["clean_accuracy"]] + [record["accuracy"][a] for a in COLUMNS[1:]]
        off = [f"{c} {100 * v - p:+.1f}" for c, v, p in zip(COLUMNS, ours, paper[row]) if abs(100 * v - p) > TOLERANCE[c]]
        if not off:
            continue
        full_epochs = 3 * (full.adv_epochs_per_stage if model == "adversarial" else full.epochs_per_stage)
        facts = [f"trained {trained['epochs']} epochs (full schedule: {full_epochs})"]
        if trained["adv_steps"] is not None:
            facts.append(f"on PGD examples of {trained['adv_steps']} steps (full: {full.adv_steps})")
        facts.append(f"evaluated with {table['config']['restarts']} PGD restart(s) (full: {full.restarts})")
        budget = next((c for c in worst["checks"] if c["name"] == "more_budget"), None)
        if budget:
            moved = max(budget["base_accuracy"] - v for v in budget["doubled_accuracy"].values())
            facts.append(f"doubling PGD's restarts or APGD's iterations lowered accuracy by {100 * moved:.1f} points "
                         f"(noise level {100 * budget['noise_level']:.1f}) on {budget['examples']} images")
        facts.append(f"per-example worst case of the adaptive suite {100 * worst['worst_case_accuracy']:.1f}%")
        if trained["frac_within_eps_of_jump"] is not None:
            facts.append(f"{100 * trained['frac_within_eps_of_jump']:.1f}% of the front-end outputs on training "
                         "images lie within eps of a jump at the last epoch")
        certified = [c for c in record.get("certified", []) if c["eps"] == table["eps"]]
        if certified and certified[0].get("mean_changeable_outputs") is not None:
            facts.append(f"an eps-attack can flip {certified[0]['mean_changeable_outputs']:.0f} front-end outputs "
                         "of a test image on average")
        notes.append(f"- **{row}** ({', '.join(off)} points): " + "; ".join(facts) + ".")
    if not notes:
        return []
    return ["Cells outside the tolerance, with what was measured about each model:", "", *notes, ""]


def main(argv):
    del argv
    f = flags.FLAGS

    def body():
        datasets = list(DATASETS) if f.dataset == "all" else [f.dataset]
        protocol = Protocol(**{field.name: getattr(f, field.name) for field in dataclasses.fields(Protocol)})
        reproduce(datasets, protocol, f.workdir, f.data_dir, f.report, f.pretrained_dir, f.results_dir)

    cli.run_main("polar_tf.reproduce", body)


if __name__ == "__main__":
    flags.DEFINE_enum("dataset", "all", ["all", *DATASETS], "Which datasets.")
    flags.DEFINE_string("workdir", "runs/reproduction", "Where the training runs (with their checkpoints) go.")
    flags.DEFINE_string("results_dir", "results/reproduction", "Where the evaluations go.")
    flags.DEFINE_string("data_dir", None, "Folder of IDX files (default: $POLAR_TF_DATA_DIR, then tfds).")
    flags.DEFINE_string("report", "REPRODUCTION.md", "The report to write.")
    flags.DEFINE_string("pretrained_dir", "pretrained", "Copy the trained models here ('' to skip).")
    for name, default in dataclasses.asdict(Protocol()).items():
        flags.DEFINE_integer(name, default, f"Protocol setting (paper: {default}).")
    app.run(main)
