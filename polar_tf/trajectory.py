r"""How the front end learns, epoch by epoch, beside the original implementation's trajectory.

  python -m polar_tf.trajectory --workdir=runs/fashion_mnist_polarized \
      --reference_dir=../shared/reference_trajectory
  python -m polar_tf.trajectory --workdir=runs/a,runs/b --output_dir=results/front_end  # runs side by side
  python -m polar_tf.trajectory --workdir=pretrained/full_protocol/fashion_mnist_polarized.keras --output_dir=...

Reads the kernels train.py saves after every epoch (workdir/filters/, or <name>.filters.npz beside
a shipped model; for a shipped model without them, the statistics its metrics.jsonl recorded after
each epoch, and no filter grid) and, when given, the original's published files (filter_save/ and
hist_save/ every 5 epochs of their 60-epoch "second run": MNIST c = 0.5, Fashion-MNIST c = 0.3).
Writes into --output_dir (default workdir/plots; needed for a shipped model):
  trajectory.png          filter concentration and near-jump fraction against epochs completed
  trajectory_filters.png  the 25 filters at the reference's epochs, a row per run, theirs last
  trajectory.md           per run its settings and those figures after 10, 20, 30, 40 epochs
  trajectory.json         the series drawn

Epochs are counted as epochs completed: the reference's file "epoch e" was saved at the start of
epoch e, so it sits at e, as does our kernel after e epochs (0 = as initialised). Our near-jump
fraction is measured on the first --examples training images; the reference's is read from its
histogram over all 60,000 (100 bins on [-1, 1], mass spread evenly within a bin).
"""

from __future__ import annotations

import os
import re
import sys

from polar_tf import cli

if __name__ == "__main__":
    cli.quiet_startup()  # Before the imports below load Keras and TensorFlow, which logs while it loads.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import data, models, monitoring, plots, run_dir  # noqa: E402
from polar_tf.config import CLASSIFIER_INITS, Config  # noqa: E402
from polar_tf.frontend import PolarizingFrontEnd  # noqa: E402

# The jump of the original's published trajectory (their "second run"), per dataset.
REFERENCE_JUMP = {"mnist": 0.5, "fashion_mnist": 0.3}
_REFERENCE_NAME = {"mnist": "mnist", "fashion_mnist": "fashion"}
_REFERENCE_FILE = re.compile(r"(mnist|fashion)_(\d+)\.npz")


def reference_trajectory(folder: str, dataset: str) -> dict[int, dict[str, np.ndarray]]:
    """{epoch: {"kernel": [5, 5, 1, 25] (our layout), "hist": [100] counts}} of the original's
    files for `dataset`; epochs with only one of the two files are left out."""
    found: dict[int, dict[str, np.ndarray]] = {}
    for kind, key in (("filter_save", "filters"), ("hist_save", "hist")):
        subfolder = os.path.join(folder, kind)
        if not os.path.isdir(subfolder):
            raise FileNotFoundError(f"{subfolder} does not exist: --reference_dir must hold filter_save/ and hist_save/")
        for name in os.listdir(subfolder):
            match = _REFERENCE_FILE.fullmatch(name)
            if match and match.group(1) == _REFERENCE_NAME[dataset]:
                with np.load(os.path.join(subfolder, name)) as npz:
                    value = npz[key]
                # PyTorch's [filter, channel, row, column] -> Keras' [row, column, channel, filter].
                entry = found.setdefault(int(match.group(2)), {})
                entry["kernel" if key == "filters" else "hist"] = value.transpose(2, 3, 1, 0) if key == "filters" else value
    return {epoch: entry for epoch, entry in sorted(found.items()) if len(entry) == 2}


def histogram_fraction_near_jump(counts: np.ndarray, jump: float, eps: float) -> float:
    """The fraction of a histogram's mass (equal bins on [-1, 1]) with ||z| - jump| <= eps,
    counting each bin in proportion to its overlap with the two intervals."""
    edges = np.linspace(-1.0, 1.0, len(counts) + 1)
    lo, hi = edges[:-1], edges[1:]
    inside = np.zeros(len(counts))
    for a, b in ((jump - eps, jump + eps), (-jump - eps, -jump + eps)):
        inside += np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0.0, None) / (hi - lo)
    counts = np.asarray(counts, dtype=np.float64)
    return float(np.sum(counts * np.minimum(inside, 1.0)) / np.sum(counts))


def near_jump_fraction(kernel: np.ndarray, x: np.ndarray, jump: float, eps: float) -> float:
    """The fraction of the front end's outputs on `x` within eps of a jump, for `kernel`."""
    layer = PolarizingFrontEnd(filters=kernel.shape[-1], kernel_size=kernel.shape[0], jump=jump)
    layer.build(x.shape)
    layer.kernel.assign(kernel)
    z = keras.ops.convert_to_numpy(layer.normalized(x))
    return monitoring.frontend_stats(layer, z, eps)["frac_within_eps_of_jump"]


def our_trajectory(kernels: dict[int, np.ndarray], x: np.ndarray, config: Config) -> dict[int, dict[str, float]]:
    """{epochs completed: concentration, mean L1, near-jump fraction} of a run's saved `kernels`."""
    return {
        epoch: {**_filter_summary(kernel), "near_jump_fraction": near_jump_fraction(kernel, x, config.jump, config.eps)}
        for epoch, kernel in kernels.items()
    }


def initial_gradient_balance(config: Config, x: np.ndarray, y: np.ndarray, batches: int = 10) -> dict[str, float]:
    """How strongly the cross-entropy and the B1 barrier pull on the front end at initialisation.

    For `config`'s model as initialised (its seed and classifier_init), the root mean square over
    the front-end kernel's weights and `batches` batches of the gradient of the cross-entropy and
    of mean B1 (the stage-1 term, lambda = 1). Adam steps each weight by about lr whatever the
    gradient's scale, so their ratio decides which of the two moves the filters. Measured with
    Keras' own train step: one SGD step of learning rate 1 moves the weights by minus the
    gradient, and B1's is the difference of the steps with lambda = 1 and 0 from the same weights.
    """
    keras.utils.set_random_seed(config.seed)
    model = models.build_model(config)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    frontend = models.get_frontend(model)
    start = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    kernel = keras.ops.convert_to_numpy(frontend.kernel)
    ce, b1 = [], []
    for first in range(0, batches * config.batch_size, config.batch_size):
        steps = []
        for weight in (0.0, 1.0):
            for variable, value in zip(model.trainable_variables, start):
                variable.assign(value)
            frontend.set_regularizer("b1", weight)
            model.train_on_batch(x[first : first + config.batch_size], y[first : first + config.batch_size])
            steps.append(kernel - keras.ops.convert_to_numpy(frontend.kernel))
        ce.append(steps[0])
        b1.append(steps[1] - steps[0])
    ce_rms, b1_rms = (float(np.sqrt(np.mean(np.square(g)))) for g in (ce, b1))
    return {"cross_entropy_rms": ce_rms, "b1_rms": b1_rms, "ratio": ce_rms / b1_rms}


def recorded_trajectory(metrics: list[dict]) -> dict[int, dict[str, float]]:
    """{epochs completed: concentration, mean L1, near-jump fraction} as train.py recorded them in
    metrics.jsonl after each epoch (on the first monitoring.MONITOR_EXAMPLES training images): the
    trajectory of a shipped model whose kernels were not kept. Epoch 0 (as initialised) is not there."""
    return {
        record["epoch"] + 1: {"filter_concentration": record["filter_concentration"],
                              "filter_l1_mean": record["filter_l1_mean"],
                              "near_jump_fraction": record["frac_within_eps_of_jump"]}
        for record in metrics if "filter_concentration" in record
    }


def _run_record(workdir: str) -> tuple[Config, list[dict]]:
    """The config and metrics of a run folder or of a shipped model (a .keras file)."""
    if not workdir.endswith(".keras"):
        return run_dir.read_config(workdir), run_dir.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
    record = run_dir.run_record(workdir)
    if record is None:
        raise FileNotFoundError(f"{workdir} has no config beside it ({workdir.removesuffix('.keras')}.config.json)")
    return record


def _filter_summary(kernel: np.ndarray) -> dict[str, float]:
    stats = monitoring.filter_stats(kernel)
    return {"filter_concentration": stats["filter_concentration"], "filter_l1_mean": stats["filter_l1_mean"]}


def write_trajectory(workdirs: list[str], reference_dir: str | None, output_dir: str, data_dir: str | None = None,
                     examples: int = monitoring.MONITOR_EXAMPLES, gradient_batches: int = 0,
                     command: str | None = None) -> dict:
    """Computes the trajectories of one or more runs (of one dataset) and of the reference;
    writes trajectory.{png,json,md} and trajectory_filters.png into output_dir. With
    `gradient_batches`, also `initial_gradient_balance` of the first run's config under each
    classifier init. `command`, the command line, is recorded in both files."""
    records = [_run_record(w) for w in workdirs]
    configs = [config for config, _ in records]
    if len({(c.dataset, c.eps) for c in configs}) > 1:
        raise ValueError(f"the runs must share a dataset and eps. Received: {[(c.dataset, c.eps) for c in configs]}")
    config = configs[0]
    x, y = (values[:examples] for values in data.load(config.dataset, "train", data_dir))
    names = [os.path.basename(os.path.normpath(w)).removesuffix(".keras") for w in workdirs]
    if len(set(names)) < len(names):
        names = list(workdirs)
    runs, kernels = [], {}
    for name, workdir, (run_config, metrics) in zip(names, workdirs, records):
        run_kernels = run_dir.load_filters(workdir)
        if run_kernels:
            kernels[name] = run_kernels
            by_epoch = our_trajectory(run_kernels, x, run_config)
        else:
            by_epoch = recorded_trajectory(metrics)
        if not by_epoch:
            raise FileNotFoundError(f"{workdir} has no filters and no front-end statistics in its metrics "
                                    "(train.py records both after every epoch of a polarized model)")
        runs.append({
            "name": name,
            "workdir": workdir,
            "config": {key: getattr(run_config, key) for key in RUN_SETTINGS},
            "test_accuracy": metrics[-1]["test_accuracy"] if metrics else None,
            "from_metrics": not run_kernels,
            "by_epoch": by_epoch,
        })
    reference_files = reference_trajectory(reference_dir, config.dataset) if reference_dir else {}
    jump = REFERENCE_JUMP[config.dataset]
    reference = {
        epoch: {**_filter_summary(entry["kernel"]),
                "near_jump_fraction": histogram_fraction_near_jump(entry["hist"], jump, config.eps)}
        for epoch, entry in reference_files.items()
    }
    result = {
        "command": command,
        "dataset": config.dataset,
        "eps": config.eps,
        "examples": len(x),
        "runs": runs,
        "reference": {"jump": REFERENCE_JUMP[config.dataset], "by_epoch": reference} if reference else None,
        "initial_gradients": {
            init: initial_gradient_balance(config.replace(classifier_init=init), x, y, gradient_batches)
            for init in CLASSIFIER_INITS
        } if gradient_batches else None,
    }
    run_dir.write_json(os.path.join(output_dir, "trajectory.json"), result)
    run_dir.write_text(os.path.join(output_dir, "trajectory.md"), trajectory_table(result))
    _plot_series(result, os.path.join(output_dir, "trajectory.png"))
    last = max(max(run["by_epoch"]) for run in runs)
    epochs = [e for e in (sorted(reference) if reference else range(0, last + 1, 5)) if e <= last]
    if reference:
        kernels["original"] = {e: v["kernel"] for e, v in reference_files.items()}
    if kernels:
        _plot_filters(epochs, kernels, os.path.join(output_dir, "trajectory_filters.png"), config.dataset)
    return result


# The settings a trajectory table names for each run.
RUN_SETTINGS = ("jump", "classifier_init", "adam_epsilon", "seed", "epochs_per_stage")
TABLE_EPOCHS = (10, 20, 30, 40)


def trajectory_table(result: dict) -> str:
    """Markdown: per run, its settings, the filter concentration and near-jump fraction after
    TABLE_EPOCHS epochs and at its last, and its saturated test accuracy."""
    def at(series: dict, epoch: int, key: str) -> str:
        return f"{series[epoch][key]:.2f}" if epoch in series else "-"

    columns = [*RUN_SETTINGS, *(f"concentration after {e}" for e in TABLE_EPOCHS), "concentration at last",
               *(f"near a jump after {e}" for e in TABLE_EPOCHS[1:]), "epochs", "test accuracy (saturated)"]
    lines = [f"Front end of {result['dataset']} runs (eps = {result['eps']:g}; near a jump: ||z| - c| <= eps, ours on "
             f"the first {result['examples']} training images, the original's from its histogram over all 60,000).",
             "", "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    if result.get("command"):
        lines[1:1] = ["", f"Written by `{result['command']}`; each run's settings are in its config.json."]
    rows = [(run["name"], run["config"], run["by_epoch"], run["test_accuracy"]) for run in result["runs"]]
    if result["reference"]:
        rows.append(("original (published trajectory)", {"jump": result["reference"]["jump"]},
                     result["reference"]["by_epoch"], None))
    for name, settings, series, accuracy in rows:
        series = {int(e): v for e, v in series.items()}
        cells = [str(settings.get(key, "-")) for key in RUN_SETTINGS]
        cells += [at(series, e, "filter_concentration") for e in TABLE_EPOCHS]
        cells += [at(series, max(series), "filter_concentration")]
        cells += [at(series, e, "near_jump_fraction") for e in TABLE_EPOCHS[1:]]
        cells += [str(max(series)), "-" if accuracy is None else f"{100 * accuracy:.1f}%"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    recorded = [run["name"] for run in result["runs"] if run.get("from_metrics")]
    if recorded:
        lines += ["", f"Read from the statistics train.py recorded after each epoch (their kernels were not kept; "
                  f"near a jump on the first {monitoring.MONITOR_EXAMPLES} training images): {', '.join(recorded)}."]
    if result.get("initial_gradients"):
        lines += ["", f"At initialisation (seed of {result['runs'][0]['name']}), the gradient on the front-end kernel, "
                  "root mean square over its weights and batches of 64:", "",
                  "| classifier init | cross-entropy | mean B1 | ratio |", "|---|---|---|---|"]
        for init, g in result["initial_gradients"].items():
            lines.append(f"| {init} | {g['cross_entropy_rms']:.2e} | {g['b1_rms']:.2e} | {g['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def _plot_series(result: dict, path: str) -> None:
    fig, axes = plots.subplots(1, 2, figsize=(11, 3.8))
    series = [(f"{run['name']} (c = {run['config']['jump']:g})", run["by_epoch"]) for run in result["runs"]]
    if result["reference"]:
        series.append((f"original (c = {result['reference']['jump']:g})", result["reference"]["by_epoch"]))
    for ax, key, label in ((axes[0], "filter_concentration", "filter concentration (median over filters)"),
                           (axes[1], "near_jump_fraction", f"outputs within eps = {result['eps']:g} of a jump")):
        for (name, by_epoch), marker in zip(series, plots.MARKERS):
            epochs = sorted(by_epoch)
            ax.plot(epochs, [by_epoch[e][key] for e in epochs], marker=marker, fillstyle="none", markersize=4, label=name)
        ax.set_xlabel("epochs completed")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{result['dataset']}: the front end during training")
    plots.save_figure(fig, path)


def _plot_filters(epochs: list[int], kernels: dict[str, dict[int, np.ndarray]], path: str, dataset: str) -> None:
    fig, axes = plots.subplots(len(kernels), len(epochs), figsize=(1.6 * len(epochs), 1.8 * len(kernels)), squeeze=False)
    for r, (name, by_epoch) in enumerate(kernels.items()):
        for c, epoch in enumerate(epochs):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if epoch in by_epoch:
                ax.imshow(plots.filters_grid(by_epoch[epoch]))
            if r == len(kernels) - 1:
                ax.set_xlabel(f"{epoch} epochs", fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"{dataset}: front-end filters (each grid on its own scale)")
    plots.save_figure(fig, path)


def main(argv):
    del argv
    f = flags.FLAGS

    def body():
        if (len(f.workdir) > 1 or f.workdir[0].endswith(".keras")) and not f.output_dir:
            raise ValueError("--output_dir is needed with several --workdir or a shipped model")
        output_dir = f.output_dir or os.path.join(f.workdir[0], "plots")
        command = " ".join(["python -m polar_tf.trajectory", *sys.argv[1:]])
        result = write_trajectory(f.workdir, f.reference_dir, output_dir, f.data_dir, f.examples, f.gradient_batches,
                                  command)
        named = [(run["name"], run["by_epoch"]) for run in result["runs"]]
        if result["reference"]:
            named.append(("original", result["reference"]["by_epoch"]))
        for name, series in named:
            line = ", ".join(f"{e}: {series[e]['filter_concentration']:.2f}" for e in sorted(series))
            print(f"{name}: filter concentration after N epochs: {line}")
        grids = result["reference"] or not all(run["from_metrics"] for run in result["runs"])
        print(f"Wrote trajectory.png, trajectory.md, trajectory.json{' and trajectory_filters.png' if grids else ''} "
              f"in {output_dir}")

    cli.run_main("polar_tf.trajectory", body)


if __name__ == "__main__":
    flags.DEFINE_list("workdir", None, "Polarized models' run folders (train.py's --workdir) or shipped models "
                      "(pretrained/<name>.keras), comma-separated.", required=True)
    flags.DEFINE_string("reference_dir", None,
                        "The original's trajectory (filter_save/, hist_save/), e.g. ../shared/reference_trajectory.")
    flags.DEFINE_string("output_dir", None, "Where to write (default: <workdir>/plots).")
    flags.DEFINE_string("data_dir", None, "Folder of IDX files (default: $POLAR_TF_DATA_DIR, then tfds).")
    flags.DEFINE_integer("examples", monitoring.MONITOR_EXAMPLES, "Training images our near-jump fraction is measured on.")
    flags.DEFINE_integer("gradient_batches", 0,
                         "Also measure the initial pull of cross-entropy and B1 on the front end over this many batches.")
    app.run(main, flags_parser=cli.flags_parser("polar_tf.trajectory"))
