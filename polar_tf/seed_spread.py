r"""A seed spread of the polarized model: several jumps c and seeds, each trained to the paper's
schedule and evaluated alike, and its report.

  python -m polar_tf.seed_spread --from_reproduction=results/full_protocol --output_dir=results/seed_spread
  python -m polar_tf.seed_spread --output_dir=results/seed_spread \
      --run=pretrained/cpu_full_schedule/fashion_mnist_polarized.keras,results/a,results/a_bim_margin,results/a_adaptive

`polar_tf.gpu_reproduce --spread_jumps=0.2,0.3 --spread_seeds=1,2,3` trains and evaluates a spread
beside the paper's table (`Spread`'s fields are its flags). Each (jump, seed) is a run: the
reproduction's polarized model with that jump and seed, in the folders (`run_folders`)
  <workdir>/<dataset>_spread_c<jump>_seed<seed>/                      its training
  <pretrained_dir>/<dataset>_spread_c<jump>_seed<seed>/<dataset>_polarized.keras (with its
                                       .config.json, .metrics.jsonl and .filters.npz)
  <results_dir>/<dataset>_spread_c<jump>_seed<seed>/{standard,bim_margin,adaptive}/   its evaluations
evaluated (`evaluation_configs`) with the standard suite (FGSM, BIM, PGD), BIM with the margin loss,
and the adaptive suite.

The report reads, per run, a model (a shipped .keras with its records beside it, or a run folder)
and its three evaluation folders: those of a reproduction's spread (--from_reproduction: its results
folder), or any given with --run (e.g. a run trained on the CPU with train.py and evaluated with
evaluate.py with the same settings). It writes spread.md and spread.json: per run its settings,
where it was trained (where its metrics record it), its front end after 20, 30 and 40 epochs and
at its end (as train.py recorded after each epoch) and its accuracies; per jump the mean and the
range over its runs. It reads files only.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import statistics
import sys
from typing import Any

from polar_tf import cli

if __name__ == "__main__":
    cli.quiet_startup()  # Before the imports below load Keras and TensorFlow, which logs while it loads.

from absl import app, flags  # noqa: E402

from polar_tf import monitoring, report, run_dir, trajectory  # noqa: E402
from polar_tf.config import DATASETS, Config, choice  # noqa: E402
from polar_tf.evaluation_config import AdaptiveConfig, EvalConfig  # noqa: E402

PROGRAM = "polar_tf.seed_spread"
EVALUATIONS = ("standard", "bim_margin", "adaptive")  # each run's, one results folder each, in this order
MODEL = "polarized"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"spread_jumps must be numbers separated by commas. Received: {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"spread_seeds must be integers separated by commas. Received: {text!r}") from None


def _joined(values: tuple) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Spread:
    """Which polarized models a seed spread trains beside a reproduction, and how each is evaluated.

    Its attacks take their steps, APGD iterations, Square queries and seed from the reproduction's
    protocol (at the paper's protocol: 100, 100, 5000 and 0).

    Attributes:
      spread_jumps: the jumps c of the spread, comma-separated (empty: no spread).
      spread_seeds: the training seeds of each jump, comma-separated.
      spread_dataset: the dataset of the spread.
      spread_examples: test images of the standard suite (FGSM, BIM, PGD).
      spread_margin_examples: test images of BIM with the margin loss.
      spread_adaptive_examples: test images of the adaptive suite.
      spread_restarts: PGD's restarts, in both suites.
      spread_transfer_from: the undefended model whose PGD examples the adaptive suite transfers;
        None: the 30-epoch pretrained/reduced/<spread_dataset>_baseline.keras, the source of the
        seed-0 runs' evaluations.
    """

    spread_jumps: tuple[float, ...] = dataclasses.field(default=(), metadata={"parse": _floats, "format": _joined})
    spread_seeds: tuple[int, ...] = dataclasses.field(default=(), metadata={"parse": _ints, "format": _joined})
    spread_dataset: str = choice("fashion_mnist", DATASETS)
    spread_examples: int = 1000
    spread_margin_examples: int = 500
    spread_adaptive_examples: int = 200
    spread_restarts: int = 2
    spread_transfer_from: str | None = None

    def __post_init__(self):
        if bool(self.spread_jumps) != bool(self.spread_seeds):
            raise ValueError("spread_jumps and spread_seeds go together: give both or neither. Received: "
                             f"spread_jumps={_joined(self.spread_jumps)!r}, spread_seeds={_joined(self.spread_seeds)!r}")
        if any(not 0 < c < 1 for c in self.spread_jumps) or len(set(self.spread_jumps)) < len(self.spread_jumps):
            raise ValueError(f"spread_jumps must be different numbers in (0, 1). Received: {_joined(self.spread_jumps)}")
        if any(s < 0 for s in self.spread_seeds) or len(set(self.spread_seeds)) < len(self.spread_seeds):
            raise ValueError(f"spread_seeds must be different integers >= 0. Received: {_joined(self.spread_seeds)}")
        for name in ("spread_examples", "spread_margin_examples", "spread_adaptive_examples", "spread_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={getattr(self, name)}")

    @property
    def transfer_from(self) -> str:
        return self.spread_transfer_from or os.path.join("pretrained", "reduced", f"{self.spread_dataset}_baseline.keras")

    def runs(self) -> list[SpreadRun]:
        """The runs, jump by jump, each jump's seeds in the order given."""
        return [SpreadRun(self.spread_dataset, jump, seed) for jump in self.spread_jumps for seed in self.spread_seeds]


@dataclasses.dataclass(frozen=True)
class SpreadRun:
    """One model of a spread: the polarized model of `dataset` with jump `jump` and seed `seed`."""

    dataset: str
    jump: float
    seed: int

    @property
    def name(self) -> str:
        """Its name, also its units' in `polar_tf.gpu_reproduce`, e.g. spread_c0.3_seed1."""
        return f"spread_c{self.jump:g}_seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class RunFolders:
    """Where a run of a spread trains, is shipped and evaluated."""

    workdir: str
    pretrained_dir: str  # the shipped model is run_dir.shipped_stem(pretrained_dir, config) + ".keras"
    results_dir: str  # its evaluations are results_dir/<kind> for kind in EVALUATIONS; its figures go here too


def run_folders(run: SpreadRun, root: str, pretrained_dir: str, results_dir: str) -> RunFolders:
    """The folders of `run` in a reproduction's workdir `root`, `pretrained_dir` and `results_dir`."""
    folder = f"{run.dataset}_{run.name}"
    return RunFolders(os.path.join(root, folder), os.path.join(pretrained_dir, folder), os.path.join(results_dir, folder))


def training_config(run: SpreadRun, protocol) -> Config:
    """The reproduction's polarized config (`reproduction_protocol.training_config`) with the run's
    jump and seed."""
    from polar_tf import reproduction_protocol

    return reproduction_protocol.training_config(run.dataset, MODEL, protocol).replace(jump=run.jump, seed=run.seed)


def evaluation_configs(spread: Spread, protocol) -> dict[str, EvalConfig | AdaptiveConfig]:
    """The settings of each evaluation in EVALUATIONS of a run, at the dataset's eps: the standard
    suite with `spread_restarts` PGD restarts, BIM with the margin loss (on fewer images: it costs
    as much per image), the adaptive suite at the protocol's (AutoAttack's) budgets."""
    standard = EvalConfig(dataset=spread.spread_dataset, num_examples=spread.spread_examples, steps=protocol.steps,
                          restarts=spread.spread_restarts, seed=protocol.seed)
    return {
        "standard": standard,
        # The margin loss has no fallback (see losses.ce_falls_back): a control for BIM.
        "bim_margin": EvalConfig(dataset=spread.spread_dataset, attacks=("bim",), loss="cw", steps=protocol.steps,
                                 num_examples=spread.spread_margin_examples, seed=protocol.seed),
        "adaptive": AdaptiveConfig(dataset=spread.spread_dataset, num_examples=spread.spread_adaptive_examples,
                                   seed=protocol.seed, pgd_steps=protocol.steps, pgd_restarts=spread.spread_restarts,
                                   apgd_iterations=protocol.apgd_iterations, square_queries=protocol.square_queries,
                                   transfer_from=spread.transfer_from,
                                   check_examples=min(spread.spread_adaptive_examples, AdaptiveConfig.check_examples)),
    }


def trained_model(run: SpreadRun, protocol, folders: RunFolders) -> str | None:
    """The run's model file to evaluate where it is trained, else None (files only)."""
    from polar_tf import reproduce

    return reproduce.trained_model_at(training_config(run, protocol), folders.workdir, folders.pretrained_dir)


def train(run: SpreadRun, protocol, folders: RunFolders, data_dir: str | None) -> str:
    """Trains the run unless done (resuming an interrupted training), ships it; returns its model file."""
    from polar_tf import reproduce

    return reproduce.train_model_at(training_config(run, protocol), folders.workdir, data_dir, folders.pretrained_dir,
                                    folders.results_dir)


def evaluated(spread: Spread, protocol, model_path: str | None, folders: RunFolders) -> bool:
    """Whether every evaluation of the run is done (files only)."""
    from polar_tf import reproduction_results

    configs = evaluation_configs(spread, protocol)
    return model_path is not None and all(
        reproduction_results.finished_evaluation(os.path.join(folders.results_dir, kind), [model_path], configs[kind])
        for kind in EVALUATIONS)


def evaluate(spread: Spread, protocol, model_path: str, folders: RunFolders, data_dir: str | None) -> None:
    """Runs the evaluations of the run that are not done, in EVALUATIONS order (`reproduce.evaluate_once`)."""
    from polar_tf import reproduce

    for kind, config in evaluation_configs(spread, protocol).items():
        reproduce.evaluate_once([model_path], config, os.path.join(folders.results_dir, kind), data_dir)


# The report (files only).

TABLE_EPOCHS = (20, 30, 40)  # the front end after these epochs (stage 2 ends at 40 in the paper's schedule)
ACCURACIES = (("clean", "clean"), ("fgsm", "FGSM"), ("bim", "BIM"), ("pgd", "PGD"), ("bim_margin", "BIM-margin"),
              ("adaptive", "adaptive worst case"), ("square", "Square"))
FRONT_END = tuple(f"concentration_after_{e}" for e in TABLE_EPOCHS) + ("concentration_at_end", "near_jump_at_end")


def reproduction_runs(results_dir: str) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """(model, {kind: evaluation folder}) of every run of the spread of the reproduction whose
    results folder is `results_dir` (its protocol.json names its folders) whose model and
    evaluations are there, and the folders of its other runs (not finished). Raises ValueError
    where it holds no reproduction."""
    from polar_tf import reproduction_protocol

    record = reproduction_protocol.read_protocol_record(results_dir)
    if record is None:
        raise ValueError(f"{os.path.join(results_dir, reproduction_protocol.PROTOCOL_FILE)} does not exist: "
                         "--from_reproduction takes the results folder of polar_tf.gpu_reproduce or polar_tf.reproduce")
    pretrained_dir = record[2]
    found, unfinished = [], []
    for folder in sorted(glob.glob(os.path.join(results_dir, "*_spread_c*_seed*"))):
        name = os.path.basename(folder)
        models = sorted(glob.glob(os.path.join(pretrained_dir or "", name, "*.keras")))
        kinds = {kind: os.path.join(folder, kind) for kind in EVALUATIONS}
        if len(models) == 1 and all(os.path.isfile(os.path.join(f, "results.json")) for f in kinds.values()):
            found.append((models[0], kinds))
        else:
            unfinished.append(folder)
    return found, unfinished


def parse_run(text: str) -> tuple[str, dict[str, str]]:
    """'MODEL,STANDARD,BIM_MARGIN,ADAPTIVE' (--run) -> (model, {kind: evaluation folder})."""
    parts = text.split(",")
    if len(parts) != 1 + len(EVALUATIONS):
        raise ValueError(f"--run takes a model and its {len(EVALUATIONS)} evaluation folders ({', '.join(EVALUATIONS)}), "
                         f"comma-separated. Received: {text!r}")
    return parts[0], dict(zip(EVALUATIONS, parts[1:]))


def run_row(model_path: str, folders: dict[str, str]) -> dict[str, Any]:
    """One run's row: its settings, where it was trained, its front end and its accuracies.

    Raises ValueError where the model or an evaluation folder is missing, or an evaluation is of
    another model (its recorded sha256 differs from the model file's)."""
    if os.path.isdir(model_path):
        config, metrics = run_dir.read_config(model_path), run_dir.MetricsLog(os.path.join(model_path, "metrics.jsonl")).read()
        model_file = run_dir.final_checkpoint(model_path)
    else:
        record = run_dir.run_record(model_path) if os.path.isfile(model_path) else None
        if record is None:
            raise ValueError(f"{model_path} is not a model with its training record (a run folder, or a shipped "
                             f".keras with its .config.json and .metrics.jsonl beside it)")
        config, metrics = record
        model_file = model_path
    if config.model != MODEL:
        raise ValueError(f"{model_path} is a {config.model} model, not a polarized one")
    results = {kind: _model_results(folder, model_file) for kind, folder in folders.items()}
    by_epoch = trajectory.recorded_trajectory(metrics)
    last = by_epoch[max(by_epoch)] if by_epoch else {}
    standard, adaptive = results["standard"], results["adaptive"]
    squares = {key: entry["accuracy"] for key, entry in adaptive["attacks"].items() if entry["attack"] == "square"}
    return {
        "model": model_path,
        "dataset": config.dataset,
        "jump": config.jump,
        "seed": config.seed,
        "epochs": len(metrics),
        "trained_on": ", ".join(dict.fromkeys(f"{r['backend']} on {r['device']}" for r in metrics if "backend" in r)) or None,
        **{f"concentration_after_{e}": by_epoch[e]["filter_concentration"] if e in by_epoch else None
           for e in TABLE_EPOCHS},
        "concentration_at_end": last.get("filter_concentration"),
        "near_jump_at_end": last.get("near_jump_fraction"),
        "clean": standard["clean_accuracy"],
        **{name: standard["accuracy"].get(name) for name in ("fgsm", "bim", "pgd")},
        "bim_margin": results["bim_margin"]["accuracy"].get("bim"),
        "adaptive": adaptive["worst_case_accuracy"],
        # After its doublings of the queries on the examples it had not fooled: the last is the lowest.
        "square": squares[max(squares, key=_square_queries)] if squares else None,
        "evaluations": {kind: {"folder": folder, "examples": results[kind]["num_examples"], "eps": results[kind]["eps"]}
                        for kind, folder in folders.items()},
    }


def _square_queries(key: str) -> int:
    return int(key.partition("-x")[2] or 1)


def _model_results(folder: str, model_file: str) -> dict[str, Any]:
    """The record of `model_file` in the results.json of `folder`, with the evaluation's num_examples
    and eps: its only model, or the one whose recorded sha256 is the file's."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: each run needs its evaluation folders ({', '.join(EVALUATIONS)})")
    with open(path) as f:
        results = json.load(f)
    models = results["models"]
    sha = report.fingerprint(model_file) if os.path.isfile(model_file) else None
    if len(models) > 1:
        models = [m for m in models if m.get("sha256") == sha]
    if len(models) != 1:
        raise ValueError(f"{path} holds {len(results['models'])} models and none is {model_file} (by sha256): give "
                         "the folder of this model's evaluation")
    model = models[0]
    if sha and model.get("sha256") not in (None, sha):
        raise ValueError(f"{path} is the evaluation of another model than {model_file} (their sha256 differ)")
    return {**model, "num_examples": results["num_examples"], "eps": results["eps"]}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and jump, in the order of first appearance: its runs' seeds, and for every front-end
    figure and accuracy the mean and the [min, max] over the runs that have it."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["jump"]), []).append(row)
    summary = []
    for (dataset, jump), members in groups.items():
        entry = {"dataset": dataset, "jump": jump, "seeds": [r["seed"] for r in members], "mean": {}, "range": {}}
        for key in (*FRONT_END, *(k for k, _ in ACCURACIES)):
            values = [r[key] for r in members if r[key] is not None]
            entry["mean"][key] = statistics.fmean(values) if values else None
            entry["range"][key] = [min(values), max(values)] if values else None
        summary.append(entry)
    return summary


def spread_report(runs: list[tuple[str, dict[str, str]]], output_dir: str, command: str | None = None,
                  unfinished: tuple[str, ...] = ()) -> dict:
    """Reads every run (`run_row`; all before anything is written), writes spread.json and spread.md
    into output_dir, and returns the former's content. `unfinished`: folders of runs not reported yet."""
    if not runs:
        raise ValueError("no run to report: give --run, or --from_reproduction with finished runs of a spread")
    rows = [run_row(model, folders) for model, folders in runs]
    result = {"command": command, "runs": rows, "jumps": summarize(rows), "unfinished": list(unfinished)}
    run_dir.write_json(os.path.join(output_dir, "spread.json"), result)
    run_dir.write_text(os.path.join(output_dir, "spread.md"), spread_markdown(result))
    return result


def spread_markdown(result: dict) -> str:
    """The tables of spread.md: per run, then per jump (mean, and min-max over its runs)."""
    def number(value, percent=False):
        return "-" if value is None else f"{100 * value:.1f}" if percent else f"{value:.2f}"

    front = [*(f"conc. after {e}" for e in TABLE_EPOCHS), "conc. at end", "near a jump at end"]
    accuracy = [title for _, title in ACCURACIES]
    rows, jumps = result["runs"], result["jumps"]
    examples = {kind: sorted({r["evaluations"][kind]["examples"] for r in rows}) for kind in EVALUATIONS}
    eps = sorted({r["evaluations"][kind]["eps"] for r in rows for kind in EVALUATIONS})
    lines = ["# Seed spread of the polarized model", ""]
    if result.get("command"):
        lines += [f"Written by `{result['command']}`.", ""]
    lines += [
        f"Filter concentration (median over the filters of each filter's largest weight's share of its L1 norm) after "
        f"N epochs, and the fraction of front-end outputs within eps of a jump at the end, as train.py recorded them "
        f"(on the first {monitoring.MONITOR_EXAMPLES} training images). Accuracy (%) at eps = {', '.join(f'{e:g}' for e in eps)}: clean, FGSM, "
        f"BIM and PGD on the first {_counts(examples['standard'])} test images, BIM with the margin loss on the first "
        f"{_counts(examples['bim_margin'])}, the adaptive suite's worst case over all its attacks and its Square "
        f"(after its doublings of the queries) on the first {_counts(examples['adaptive'])}.",
        "",
        "| dataset | c | seed | trained on | " + " | ".join(front + accuracy) + " |",
        "|---" * (4 + len(front) + len(accuracy)) + "|",
    ]
    for row in rows:
        cells = [row["dataset"], f"{row['jump']:g}", str(row["seed"]), row["trained_on"] or "not recorded"]
        cells += [number(row[key]) for key in FRONT_END] + [number(row[key], True) for key, _ in ACCURACIES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per jump: the mean over its runs, and in brackets the lowest and highest.", "",
              "| dataset | c | seeds | " + " | ".join(front + accuracy) + " |",
              "|---" * (3 + len(front) + len(accuracy)) + "|"]
    for entry in jumps:
        def cell(key, percent):
            if entry["mean"][key] is None:
                return "-"
            low, high = entry["range"][key]
            return f"{number(entry['mean'][key], percent)} [{number(low, percent)}, {number(high, percent)}]"
        cells = [entry["dataset"], f"{entry['jump']:g}", ", ".join(map(str, entry["seeds"]))]
        cells += [cell(key, False) for key in FRONT_END] + [cell(key, True) for key, _ in ACCURACIES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Runs:", ""]
    lines += [f"- c = {r['jump']:g}, seed {r['seed']}: `{r['model']}` ({r['epochs']} epochs); evaluations "
              + ", ".join(f"`{r['evaluations'][kind]['folder']}`" for kind in EVALUATIONS) for r in rows]
    if result.get("unfinished"):
        lines += ["", "Not finished (trained or evaluated only in part), left out: "
                  + ", ".join(f"`{folder}`" for folder in result["unfinished"]) + "."]
    return "\n".join(lines) + "\n"


def _counts(values: list[int]) -> str:
    return " or ".join(map(str, values))


def main(argv):
    del argv
    f = flags.FLAGS

    def body():
        runs, unfinished = [parse_run(text) for text in f.run or []], []
        if f.from_reproduction:
            found, unfinished = reproduction_runs(f.from_reproduction)
            runs += found
        command = " ".join(["python -m polar_tf.seed_spread", *sys.argv[1:]])
        result = spread_report(runs, f.output_dir, command, tuple(unfinished))
        print(spread_markdown(result), end="")
        print(f"\nWrote spread.md and spread.json in {f.output_dir}")

    cli.run_main(PROGRAM, body)


if __name__ == "__main__":
    flags.DEFINE_multi_string("run", None, "A run: its model (a shipped .keras or a run folder) and its evaluation "
                              "folders (standard, bim_margin, adaptive), comma-separated; repeat for each run.")
    flags.DEFINE_string("from_reproduction", None, "The results folder of a reproduction (e.g. results/full_protocol): "
                        "every run of its spread whose evaluations are done.")
    flags.DEFINE_string("output_dir", "results/seed_spread", "Where spread.md and spread.json go.")
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
