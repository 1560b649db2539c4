r"""Regenerates the paper's table: trains the six models, evaluates them, writes REPRODUCTION.md.

  python -m polar_tf.reproduce --dataset=all                 # the paper's schedule and protocol
  KERAS_BACKEND=jax python -m polar_tf.reproduce --dataset=all --steps_per_execution=32   # on a GPU
  python -m polar_tf.reproduce --dataset=mnist --epochs_per_stage=1 --train_examples=2000 \
      --num_examples=200 --steps=10 --restarts=1 --adv_steps=5  # a reduced run, labelled as such

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

from polar_tf import cli, evaluation, runfiles, training
from polar_tf.config import DATASETS, Config

# The paper's rows, in its order, and the models that reproduce them.
ROWS = (("baseline", "no defense"), ("adversarial", "adversarial training"), ("polarized", "polarizing front end"))
COLUMNS = ("clean", "fgsm", "bim", "pgd")
TOLERANCE = {"clean": 2.0, "fgsm": 5.0, "bim": 5.0, "pgd": 5.0}  # points, as the target says
SWEEP = "0:0.4:0.05"  # the accuracy-against-eps figure (with one PGD restart, on sweep_examples)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How much of the paper's schedule and protocol a reproduction runs (defaults: all of it)."""

    epochs_per_stage: int = 20
    train_examples: int = 0
    adv_steps: int = 40
    num_examples: int = 10000
    steps: int = 100
    restarts: int = 20
    sweep_examples: int = 1000
    seed: int = 0
    steps_per_execution: int = 1

    @property
    def is_paper(self) -> bool:
        paper = Protocol(steps_per_execution=self.steps_per_execution)
        return dataclasses.replace(self, sweep_examples=paper.sweep_examples) == paper


def reproduce(datasets: list[str], protocol: Protocol, root: str, data_dir: str | None, report: str,
              pretrained_dir: str | None) -> None:
    """Trains, evaluates and reports; every step skips work already done."""
    results = {}
    for dataset in datasets:
        paths = []
        for model, _ in ROWS:
            config = Config(dataset=dataset, model=model, epochs_per_stage=protocol.epochs_per_stage,
                            train_examples=protocol.train_examples, adv_steps=protocol.adv_steps,
                            seed=protocol.seed, steps_per_execution=protocol.steps_per_execution)
            workdir = os.path.join(root, f"{dataset}_{model}")
            training.train_and_evaluate(config, workdir, "all", data_dir)
            paths.append(runfiles.final_checkpoint(workdir))
        table = evaluation.EvalConfig(dataset=dataset, num_examples=protocol.num_examples, steps=protocol.steps,
                                      restarts=protocol.restarts, seed=protocol.seed, certify=True)
        sweep = dataclasses.replace(table, num_examples=protocol.sweep_examples, eps_sweep=evaluation.parse_eps_sweep(SWEEP), restarts=1)
        results[dataset] = {
            "table": _evaluate_once(paths, table, os.path.join(root, f"{dataset}_table"), data_dir),
            "sweep": _evaluate_once(paths, sweep, os.path.join(root, f"{dataset}_sweep"), data_dir),
            "training": [_training_summary(os.path.dirname(p)) for p in paths],
        }
        if pretrained_dir:
            _ship_pretrained(paths, pretrained_dir)
    runfiles.write_text(report, reproduction_markdown(results, protocol, os.path.dirname(os.path.abspath(report))))
    logging.info("Wrote %s", report)


def _evaluate_once(paths: list[str], config: evaluation.EvalConfig, output_dir: str, data_dir: str | None) -> dict:
    existing = os.path.join(output_dir, "results.json")
    if os.path.isfile(existing):
        with open(existing) as f:
            results = json.load(f)
        same_models = [m["path"] for m in results["models"]] == [os.path.abspath(p) for p in paths]
        if same_models and results["config"] == json.loads(json.dumps(dataclasses.asdict(config))):
            logging.info("%s is up to date; not evaluating again", existing)
            return results
    command = "python evaluate.py " + " ".join(_flags(paths, config, output_dir))
    return evaluation.evaluate(paths, config, output_dir, data_dir, command=command)


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
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "command": f"python train.py --dataset={config.dataset} --model={config.model} --workdir={workdir} "
                   f"--epochs_per_stage={config.epochs_per_stage} --train_examples={config.train_examples} "
                   f"--seed={config.seed}",
        "final_test_accuracy": records[-1]["test_accuracy"] if records else None,
    }


def _ship_pretrained(paths: list[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        config = runfiles.read_config(os.path.dirname(path))
        stem = os.path.join(folder, f"{config.dataset}_{config.model}")
        shutil.copyfile(path, stem + ".keras")
        runfiles.write_json(stem + ".config.json", config.to_dict())


def reproduction_markdown(results: dict, protocol: Protocol, base: str) -> str:
    """REPRODUCTION.md from the results files: the paper's table beside ours, cell by cell."""
    kind = "the paper's schedule and protocol" if protocol.is_paper else "a REDUCED schedule/protocol (see below)"
    lines = ["# Reproduction of the paper's table", "",
             f"Generated by `python -m polar_tf.reproduce` from the results files; {kind}.", "",
             "Accuracy (%). Each cell: ours / paper (difference). Cells off by more than 2 points (clean) "
             "or 5 points (robust) are marked **!**. `certified` is this project's sound lower bound "
             "(not in the paper).", ""]
    for dataset, result in results.items():
        table = result["table"]
        lines += [f"## {dataset}, eps = {table['eps']:g}, {table['num_examples']} test images", "",
                  "| model | clean | FGSM | BIM | PGD | certified |", "|---|---|---|---|---|---|"]
        paper = evaluation.PAPER_RESULTS[dataset]
        for (model_name, row), record in zip(ROWS, table["models"]):
            ours = [record["clean_accuracy"]] + [record["accuracy"][a] for a in COLUMNS[1:]]
            cells = []
            for column, value, reference in zip(COLUMNS, ours, paper[row]):
                diff = 100 * value - reference
                flag = " **!**" if abs(diff) > TOLERANCE[column] else ""
                cells.append(f"{100 * value:.2f} / {reference:.2f} ({diff:+.2f}){flag}")
            certified = evaluation.certified_at(record, table["eps"])
            cells.append(f"{100 * certified[1]:.2f}" if certified else "-")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        plot = os.path.join(result["sweep"]["output_dir"], "accuracy_vs_eps.png")
        lines += ["", f"![accuracy against eps, {dataset}]({os.path.relpath(plot, base)})", "",
                  "| run | command | seed | epochs | train time | final test acc |", "|---|---|---|---|---|---|"]
        for t in result["training"]:
            lines.append(f"| train {t['model']} | `{t['command']}` | {t['seed']} | {t['epochs']} | "
                         f"{t['train_seconds']:.0f} s | {100 * t['final_test_accuracy']:.2f} |")
        for name in ("table", "sweep"):
            r = result[name]
            lines.append(f"| evaluate ({name}) | `{r['command']}` | {r['config']['seed']} | - | "
                         f"{r['total_seconds']:.0f} s | - |")
        table0 = result["table"]
        lines += ["", f"Backend {table0['backend']}, device {table0['device']}.", ""]
    lines += ["## Protocol", "", "| setting | value | paper |", "|---|---|---|"]
    paper = Protocol()
    for field in dataclasses.fields(Protocol):
        lines.append(f"| {field.name} | {getattr(protocol, field.name)} | {getattr(paper, field.name)} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    f = flags.FLAGS

    def body():
        datasets = list(DATASETS) if f.dataset == "all" else [f.dataset]
        protocol = Protocol(epochs_per_stage=f.epochs_per_stage, train_examples=f.train_examples,
                            adv_steps=f.adv_steps, num_examples=f.num_examples, steps=f.steps,
                            restarts=f.restarts, sweep_examples=f.sweep_examples, seed=f.seed,
                            steps_per_execution=f.steps_per_execution)
        reproduce(datasets, protocol, f.workdir, f.data_dir, f.report, f.pretrained_dir)

    cli.run_main("polar_tf.reproduce", body)


if __name__ == "__main__":
    flags.DEFINE_enum("dataset", "all", ["all", *DATASETS], "Which datasets.")
    flags.DEFINE_string("workdir", "runs/reproduction", "Where the runs and evaluations go.")
    flags.DEFINE_string("data_dir", None, "Folder of IDX files (default: $POLAR_TF_DATA_DIR, then tfds).")
    flags.DEFINE_string("report", "REPRODUCTION.md", "The report to write.")
    flags.DEFINE_string("pretrained_dir", "pretrained", "Copy the trained models here ('' to skip).")
    for name, default in dataclasses.asdict(Protocol()).items():
        flags.DEFINE_integer(name, default, f"Protocol setting (paper: {default}).")
    app.run(main)
