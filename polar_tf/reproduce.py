r"""Regenerates the paper's table: trains the six models, evaluates them, writes REPRODUCTION.md.

  python -m polar_tf.reproduce --dataset=all                 # the paper's schedule and protocol
  KERAS_BACKEND=jax python -m polar_tf.reproduce --dataset=all --steps_per_execution=32   # on a GPU
  python -m polar_tf.reproduce --dataset=mnist --epochs_per_stage=1 --train_examples=2000 \
      --num_examples=200 --steps=10 --restarts=1 --adv_steps=5  # a reduced run, labelled as such

Beside the paper's table it runs this project's adaptive suite (`evaluate.py --suite=adaptive`, its
per-example worst case over every attack, transferred from the undefended model) and the sound
certificate (`evaluate.py --certify`) on each model.

Resumable: training picks up from its per-epoch checkpoints, an evaluation whose results.json
already holds the same settings is not run again, and one interrupted resumes with the models it
finished (the adaptive suite also with the attacks finished on the model in progress), so an interrupted run continues where it stopped when the same command is given again.
A trained model is copied into pretrained/ and the copy is what is evaluated. A fresh checkout has
no run folders: a model that pretrained/ ships with exactly the config the protocol asks for is
evaluated instead of trained again. REPRODUCTION.md is generated from the results files only;
--report_only writes it from them without training or evaluating anything.

The paper's full protocol on a lent GPU is `polar_tf.gpu_reproduce` (the same units of work, on
parallel workers, within a device budget); `--import_archive` unpacks what it gives back, and each
dataset that its results folder (--full_protocol_results) has completed is reported beside this
run's, every table stating the schedule and budgets its cells come from.

`--further_results` adds a section on other runs of these models (other seeds, jumps, schedules),
from the results folders of their own `evaluate.py` calls (either suite): how each was trained,
how polarized its front end ended, and its accuracy beside the paper's.

TensorFlow's start-up logs are hidden; POLAR_TF_VERBOSE=1 shows them. Bad flags and values end
with one line `polar_tf.reproduce: error: ...` (exit 1), Ctrl-C with `polar_tf.reproduce: interrupted`
(exit 130); the same command then continues.
"""

from __future__ import annotations

import filecmp
import os

from polar_tf import cli

if __name__ == "__main__":
    cli.quiet_startup()  # Before the imports below load Keras and TensorFlow, which logs while it loads.

from absl import app, flags, logging  # noqa: E402

from polar_tf import adaptive, evaluation, run_dir, state_archive, training  # noqa: E402
from polar_tf.config import DATASETS, Config  # noqa: E402
from polar_tf.evaluation_config import AdaptiveConfig, EvalConfig  # noqa: E402
from polar_tf.report import evaluate_command, replace_block  # noqa: E402
from polar_tf.reproduction_protocol import (EVALUATIONS, ROWS, Protocol, evaluation_configs, evaluation_dir,  # noqa: E402
                                            run_folder, training_config, write_protocol_record)
from polar_tf.reproduction_report import (CERTIFIED_README_MARKERS, certified_markdown, further_markdown,  # noqa: E402
                                          reproduction_markdown, update_readme)
from polar_tf.reproduction_results import (collect, copy_figures, finished_evaluation, full_protocol_sections,  # noqa: E402
                                           further_runs, training_summary)


def trained_model(dataset: str, model: str, protocol: Protocol, root: str, pretrained_dir: str | None) -> str | None:
    """The model file to evaluate if `model` is trained under `protocol`, else None (training remains);
    see `trained_model_at`. Reads files only."""
    return trained_model_at(training_config(dataset, model, protocol), run_folder(root, dataset, model), pretrained_dir)


def trained_model_at(config: Config, workdir: str, pretrained_dir: str | None) -> str | None:
    """The model file to evaluate if `config` is trained in `workdir`, else None (training remains).

    That is the run's final checkpoint, or where `pretrained_dir` is given its copy there (a run not
    yet copied counts as not done); where `workdir` holds no run, a model shipped in `pretrained_dir`
    with exactly this config. Reads files only."""
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        return run_dir.shipped_model(pretrained_dir, config, workdir)
    final = run_dir.checkpoint_path(workdir, config, config.num_stages)
    if run_dir.read_config(workdir) != config or not os.path.isfile(final):
        return None
    if not pretrained_dir:
        return final
    shipped = run_dir.shipped_stem(pretrained_dir, config) + ".keras"
    return shipped if os.path.isfile(shipped) and filecmp.cmp(final, shipped, shallow=False) else None


def train_model(dataset: str, model: str, protocol: Protocol, root: str, data_dir: str | None,
                pretrained_dir: str | None, results_dir: str) -> str:
    """Trains `model` under `protocol` unless done; see `train_model_at`."""
    return train_model_at(training_config(dataset, model, protocol), run_folder(root, dataset, model), data_dir,
                          pretrained_dir, results_dir)


def train_model_at(config: Config, workdir: str, data_dir: str | None, pretrained_dir: str | None,
                   results_dir: str) -> str:
    """Trains `config` in `workdir` unless done (an interrupted run resumes from its last completed
    epoch), copies it into `pretrained_dir` (if given) and its figures into `results_dir`; returns
    the model file to evaluate (see `trained_model_at`)."""
    path = trained_model_at(config, workdir, pretrained_dir)
    if path is None:
        final = run_dir.checkpoint_path(workdir, config, config.num_stages)
        if not (os.path.isfile(final) and run_dir.read_config(workdir) == config):
            training.train_and_evaluate(config, workdir, "all", data_dir)  # refuses a run of another config
        path = run_dir.ship_pretrained(final, pretrained_dir) if pretrained_dir else final
    copy_figures(workdir, config, results_dir)
    return path


def run_evaluation(kind: str, dataset: str, protocol: Protocol, paths: list[str], results_dir: str,
                   data_dir: str | None) -> dict:
    """One evaluation of EVALUATIONS on the models `paths`, unless its results are up to date."""
    config = evaluation_configs(dataset, protocol, paths)[kind]
    return evaluate_once(paths, config, evaluation_dir(results_dir, dataset, kind), data_dir)


def evaluate_once(paths: list[str], config: EvalConfig | AdaptiveConfig, output_dir: str, data_dir: str | None) -> dict:
    """The evaluation of the models `paths` with `config` (either suite) in `output_dir`, unless its
    results there are up to date; an interrupted one resumes with the models it finished."""
    results = finished_evaluation(output_dir, paths, config)
    if results is None:
        run = adaptive.evaluate_adaptive if isinstance(config, AdaptiveConfig) else evaluation.evaluate
        results = run(paths, config, output_dir, data_dir, command=evaluate_command(paths, config, output_dir, data_dir))
    return results


def reproduce(datasets: list[str], protocol: Protocol, root: str, data_dir: str | None, report: str,
              pretrained_dir: str | None, results_dir: str | None = None, readme: str | None = None,
              further_results: tuple[str, ...] = (), full_protocol_results: str | None = None,
              report_only: bool = False, certified_results: tuple[str, ...] = ()) -> None:
    """Trains, evaluates and reports; every step skips work already done.

    Training runs go to `root` (with their per-epoch checkpoints), evaluations to `results_dir`
    (default: `root`), the trained models to `pretrained_dir` (if given; a model shipped there with
    the same config and no run of its own in `root` is used as it is; the copy there is what is
    evaluated), the tables also into the marked block of `readme` (if given). `further_results` are
    results folders of other runs, reported in a section of their own. `full_protocol_results` is the
    results folder of a reproduction at the paper's full protocol (e.g. `polar_tf.gpu_reproduce`'s,
    imported): each dataset it has completed gets its table beside this run's (read, never run).
    `report_only` writes the report from the results files alone (`reproduction_results.collect`), running nothing;
    ValueError if they lack an evaluation. `certified_results` are results folders of the
    evaluations of certified training's models (and of those they are compared with), reported in a
    section and a README block of their own."""
    further = further_runs(further_results)  # read first: a bad folder fails before any work
    certified = further_runs(certified_results)
    results_dir = results_dir or root
    results = {}
    if not report_only:
        write_protocol_record(results_dir, protocol, root, pretrained_dir)
    for dataset in datasets:
        if report_only:
            results[dataset] = collect(dataset, protocol, root, results_dir)
            if results[dataset] is None:
                raise ValueError(f"{results_dir} lacks an evaluation of {dataset} under this protocol "
                                 f"({', '.join(EVALUATIONS)}): run without --report_only")
            continue
        paths = [train_model(dataset, model, protocol, root, data_dir, pretrained_dir, results_dir) for model, _ in ROWS]
        results[dataset] = {kind: run_evaluation(kind, dataset, protocol, paths, results_dir, data_dir) for kind in EVALUATIONS}
        results[dataset]["training"] = [training_summary(p, run_folder(root, dataset, m), results_dir)
                                        for p, (m, _) in zip(paths, ROWS)]
    full = full_protocol_sections(full_protocol_results, results_dir, datasets)
    base = os.path.dirname(os.path.abspath(report))
    run_dir.write_text(report, reproduction_markdown(results, protocol, base, full) + further_markdown(further, base)
                        + certified_markdown(certified, base))
    logging.info("Wrote %s", report)
    if readme and update_readme(readme, results, protocol, full):
        logging.info("Updated the table in %s", readme)
    if readme and certified["models"]:
        # The section without its heading: README has its own.
        section = certified_markdown(certified, os.path.dirname(os.path.abspath(readme))).strip().splitlines()[1:]
        if replace_block(readme, CERTIFIED_README_MARKERS, [*section, ""]):
            logging.info("Updated the certified-training table in %s", readme)


def define_reproduction_flags(workdir: str = "runs/reproduction", results_dir: str = "results/reproduction",
                               pretrained_dir: str = "pretrained", **protocol_defaults: int) -> None:
    """The flags of a reproduction: datasets, folders and every Protocol setting (also
    `polar_tf.gpu_reproduce`'s, with its own defaults)."""
    flags.DEFINE_enum("dataset", "all", ["all", *DATASETS], "Which datasets.")
    flags.DEFINE_string("workdir", workdir, "Where the training runs (with their checkpoints) go.")
    flags.DEFINE_string("results_dir", results_dir, "Where the evaluations go.")
    cli.define_data_dir_flag()
    flags.DEFINE_string("pretrained_dir", pretrained_dir, "Copy the trained models here, and evaluate the copies ('' to skip).")
    cli.define_config_flags(Protocol, protocol_defaults)
    flags.adopt_module_key_flags(cli)  # --help lists them


def reproduction_from_flags() -> tuple[list[str], Protocol]:
    """The datasets and Protocol that the flags of `define_reproduction_flags` ask for."""
    f = flags.FLAGS
    datasets = list(DATASETS) if f.dataset == "all" else [f.dataset]
    return datasets, cli.config_from_flags(Protocol)


def main(argv):
    del argv
    f = flags.FLAGS

    def body():
        if f.import_archive:
            from polar_tf import gpu_reproduce  # the format of its summary, which the manifest holds

            manifest = state_archive.import_archive(f.import_archive)
            print(f"Imported {', '.join(manifest['folders'])} from {f.import_archive}.")
            print(gpu_reproduce.summary_text(manifest))
            return
        datasets, protocol = reproduction_from_flags()
        reproduce(datasets, protocol, f.workdir, f.data_dir, f.report, f.pretrained_dir, f.results_dir, f.readme,
                  tuple(f.further_results), f.full_protocol_results, f.report_only, tuple(f.certified_results))

    cli.run_main("polar_tf.reproduce", body)


if __name__ == "__main__":
    define_reproduction_flags()
    flags.DEFINE_string("report", "REPRODUCTION.md", "The report to write.")
    flags.DEFINE_string("readme", "README.md", "Also put the tables into this file's marked block ('' to skip).")
    flags.DEFINE_list("further_results", [], "Results folders of evaluate.py runs on other models to report too.")
    flags.DEFINE_list("certified_results", [], "Results folders of evaluate.py runs (--certify, and the adaptive suite) "
                      "on certified training's models and those they are compared with: a section of their own.")
    flags.DEFINE_string("full_protocol_results", "results/full_protocol",
                        "Results folder of a full-protocol reproduction (polar_tf.gpu_reproduce's, imported): each "
                        "dataset it has completed is reported beside this run ('' to skip).")
    flags.DEFINE_bool("report_only", False, "Write the report from the results files alone: train and evaluate nothing.")
    flags.DEFINE_string("import_archive", None,
                        "Only unpack what polar_tf.gpu_reproduce wrote into $OUT (the folder holding "
                        "reproduce_state.json) into this checkout, and say what remains.")
    app.run(main, flags_parser=cli.flags_parser("polar_tf.reproduce"))
