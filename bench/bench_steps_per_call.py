"""What splitting PGD (or APGD) into compiled calls of a few steps costs (TensorFlow on the CPU).

    POLAR_TF_DATA_DIR=../shared/data python bench/bench_steps_per_call.py --examples=500 --repeats=3
    POLAR_TF_DATA_DIR=../shared/data python bench/bench_steps_per_call.py --attack=apgd --per_call=1,20

`attacks.pgd` runs each batch in calls of `backend.TF_CPU_ATTACK_STEPS_PER_CALL` steps there, so
that progress bars move and Ctrl-C stops within seconds; each call adds a forward pass and a copy
to the host. This times one 100-step restart on the shipped polarized MNIST model with 10 and 20
steps per call and with the whole loop in one call, and prints the median wall time of each and
its ratio to one call. `--attack=apgd` times APGD-CE (100 iterations) instead, and `--per_call`
chooses the splits (1: one iteration per call, as APGD ran before it looped).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

from polar_tf import apgd, attacks, backend, data, run_dir  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
flags.DEFINE_integer("examples", 500, "Test images attacked (one batch at the CPU default).")
flags.DEFINE_integer("steps", 100, "PGD steps.")
flags.DEFINE_integer("repeats", 3, "Timed runs per setting; the median is reported.")
flags.DEFINE_enum("attack", "pgd", ["pgd", "apgd"], "The attack timed.")
flags.DEFINE_list("per_call", ["10", "20", "all"], "Steps per compiled call to time ('all': one call).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if backend.name() != "tensorflow" or backend.on_accelerator():
        sys.exit("bench_steps_per_call.py: error: measures TensorFlow on the CPU, where the steps are split")
    model = run_dir.load_model(os.path.join(ROOT, "pretrained", "mnist_polarized.keras"), compile=False)
    x, y = data.load("mnist", "test")
    x, y = x[: FLAGS.examples], y[: FLAGS.examples]
    def run(steps):
        if FLAGS.attack == "pgd":
            attacks.pgd(model, x, y, eps=0.3, steps=steps, restarts=1)
        else:
            apgd.apgd(model, x, y, eps=0.3, iterations=steps)

    medians = {}
    for per_call in [None if value == "all" else int(value) for value in FLAGS.per_call]:
        backend.TF_CPU_ATTACK_STEPS_PER_CALL = per_call
        run(2)  # traces
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            run(FLAGS.steps)
            times.append(time.perf_counter() - start)
        medians[per_call] = statistics.median(times)
    base = min(medians, key=lambda k: -float("inf") if k is None else -k)  # one call, else the longest calls
    for per_call, seconds in medians.items():
        label = "one call" if per_call is None else f"{per_call} steps per call"
        print(f"{FLAGS.attack} {label}: median {seconds:.2f} s, {len(x) * FLAGS.steps / seconds:,.0f} image-steps/s, "
              f"{seconds / medians[base]:.3f} x {'one call' if base is None else f'{base} per call'}")


if __name__ == "__main__":
    app.run(main)
