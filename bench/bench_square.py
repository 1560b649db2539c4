"""Queries per second of the Square attack on a model where most examples fall early.

    git worktree add --detach /tmp/square_old <commit before the change>
    POLAR_TF_DATA_DIR=../shared/data python bench/bench_square.py \
        --baseline=/tmp/square_old/polar_tf/square.py
    git worktree remove /tmp/square_old

Runs `square.square` on the first `--examples` test images of the shipped Fashion-MNIST polarized
model (eps 0.1, `--queries` per example: at 5,000, half of the examples attacked fall within
about 200 queries and 4 of 178 hold out to the end), and with `--baseline` the same with the
`square.py` of another commit, loaded as a module of its own in this process, the two
alternating, so that their ratio holds on a CPU shared with other work. Each gets a warm-up call
first (it traces the shapes a short run takes). Prints per run the wall and CPU time of this
process, the queries used (the forward passes whose output the attack uses, the clean one
included) per wall second and per CPU second, the rows the compiled calls computed (replayed
from the queries spent: `rows_computed`), and how many examples' results differ from the
baseline's. With `--draw_examples`, it also times the host's part of an iteration for that many
examples, drawing the squares proposed (`square.proposal_draws` and `square.proposals` once per
`SYNC_EVERY` iterations; a baseline without `proposal_draws` drew each iteration's with
`proposals(seed, iteration, rows, side, height, channels)`).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import backend, data, run_dir, square  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
flags.DEFINE_string("model", os.path.join(ROOT, "pretrained", "reduced", "fashion_mnist_polarized.keras"), "Model attacked.")
flags.DEFINE_string("dataset", "fashion_mnist", "Its dataset.")
flags.DEFINE_integer("examples", 200, "First test images attacked.")
flags.DEFINE_float("eps", 0.1, "L-inf radius.")
flags.DEFINE_integer("queries", 5000, "Query budget per example.")
flags.DEFINE_integer("repeats", 1, "Timed runs of each implementation (alternating); medians are reported.")
flags.DEFINE_integer("draw_examples", 0, "Also time drawing the squares for this many examples (0: not).")
flags.DEFINE_string("baseline", None, "Path to another commit's polar_tf/square.py to compare with.")
FLAGS = flags.FLAGS


def _load_baseline(path: str):
    """The module at `path` as `square_baseline`; it imports the rest of polar_tf from this tree."""
    spec = importlib.util.spec_from_file_location("square_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_computed(spent: np.ndarray, queries: int, batch: int, compacted: bool) -> int:
    """The rows the compiled calls computed, padding included, replayed from the queries spent.

    An example still attacked at iteration i (not fooled by an earlier one) spent more than
    i + 2 queries; the calls follow the margins copied every `SYNC_EVERY` iterations: compacted,
    all examples in the calls `square.layout` gives for those still attacked; before, batch by
    batch, every row of a batch until none was left.
    """
    attacked = spent[spent > 1]  # 1: misclassified, the clean query alone
    if compacted:
        return _rows(attacked, queries, lambda active: sum(square.layout(active, batch)))
    return sum(_rows(attacked[first : first + batch], queries, lambda active: batch)
               for first in range(0, attacked.size, batch))


def _rows(spent: np.ndarray, queries: int, rows_for) -> int:
    rows = rows_for(spent.size)  # the stripes start
    for i in range(queries - 2):
        if i % square.SYNC_EVERY == 0:
            active = int(np.sum(spent - 2 > i))
            if active == 0:
                break
            size = rows_for(active)
        rows += size
    return rows


def _timed(module, model, x, y):
    wall, cpu = time.perf_counter(), time.process_time()
    x_adv, spent = module.square(model, x, y, eps=FLAGS.eps, queries=FLAGS.queries, return_queries=True)
    return x_adv, spent, time.perf_counter() - wall, time.process_time() - cpu


def draw_milliseconds(module, examples: int, iterations: int = 200) -> float:
    """Host milliseconds per iteration to draw the squares proposed to `examples` examples."""
    rows, start = np.arange(examples), time.perf_counter()
    for i in range(iterations):
        if hasattr(module, "proposal_draws"):
            if i % module.SYNC_EVERY == 0:
                draws = module.proposal_draws(0, i, rows, 1)
                module.proposals(draws, np.full(module.SYNC_EVERY, 3), 28)
        else:
            module.proposals(0, i, rows, 3, 28, 1)
    return (time.perf_counter() - start) / iterations * 1000


def main(argv):
    del argv
    model = run_dir.load_model(FLAGS.model, compile=False)
    x, y = data.load(FLAGS.dataset, "test")
    x, y = x[: FLAGS.examples], y[: FLAGS.examples]
    modules = {"current": square}
    if FLAGS.baseline:
        modules = {"baseline": _load_baseline(FLAGS.baseline), **modules}
    print(f"{backend.name()} on {backend.device_description()}; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"{FLAGS.examples} images, eps {FLAGS.eps:g}, {FLAGS.queries} queries each")
    if FLAGS.draw_examples:
        for name, module in modules.items():
            ms = statistics.median(draw_milliseconds(module, FLAGS.draw_examples) for _ in range(5))
            print(f"{name}: drawing the squares for {FLAGS.draw_examples} examples: {ms:.2f} ms per iteration "
                  "(median of 5 runs of 200 iterations)")
    for module in modules.values():
        module.square(model, x, y, eps=FLAGS.eps, queries=100)  # traces
    runs = {name: [] for name in modules}
    for repeat in range(FLAGS.repeats):
        for name, module in modules.items():
            x_adv, spent, wall, cpu = _timed(module, model, x, y)
            runs[name].append((wall, cpu, int(spent.sum())))
            print(f"run {repeat + 1} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, {spent.sum()} queries used, "
                  f"{spent.sum() / wall:,.0f} queries/s, {spent.sum() / cpu:,.0f} per CPU-second, "
                  f"{int(np.sum(spent == FLAGS.queries))} examples at the budget", flush=True)
            rows = rows_computed(spent, FLAGS.queries, min(backend.default_attack_batch_size(), len(x)),
                                 compacted=hasattr(module, "layout"))
            print(f"  rows computed, padding included: {rows} ({rows / np.sum(spent - 1):.2f} per query after the "
                  "clean one)")
            if name == "baseline":
                baseline = (x_adv, spent)
            elif "baseline" in modules:
                same = np.all(x_adv == baseline[0], axis=(1, 2, 3)) & (spent == baseline[1])
                print(f"  examples whose adversarial or queries differ from the baseline's: {int(np.sum(~same))}")
    if "baseline" in runs:
        wall = statistics.median(r[0] for r in runs["baseline"]) / statistics.median(r[0] for r in runs["current"])
        cpu = statistics.median(r[1] for r in runs["baseline"]) / statistics.median(r[1] for r in runs["current"])
        print(f"speed-up (baseline / current, medians): {wall:.2f}x wall time, {cpu:.2f}x CPU time")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    app.run(main)
