"""What splitting PGD into compiled calls of a few steps costs (TensorFlow on the CPU).

    POLAR_TF_DATA_DIR=../shared/data python bench/bench_steps_per_call.py --examples=500 --repeats=3

`attacks.pgd` runs each batch in calls of `backend.TF_CPU_ATTACK_STEPS_PER_CALL` steps there, so
that progress bars move and Ctrl-C stops within seconds; each call adds a forward pass and a copy
to the host. This times one 100-step restart on the shipped polarized MNIST model with 10 and 20
steps per call and with the whole loop in one call, and prints the median wall time of each and
its ratio to one call.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

from polar_tf import attacks, backend, data, run_dir  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
flags.DEFINE_integer("examples", 500, "Test images attacked (one batch at the CPU default).")
flags.DEFINE_integer("steps", 100, "PGD steps.")
flags.DEFINE_integer("repeats", 3, "Timed runs per setting; the median is reported.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if backend.name() != "tensorflow" or backend.on_accelerator():
        sys.exit("bench_steps_per_call.py: error: measures TensorFlow on the CPU, where the steps are split")
    model = run_dir.load_model(os.path.join(ROOT, "pretrained", "mnist_polarized.keras"), compile=False)
    x, y = data.load("mnist", "test")
    x, y = x[: FLAGS.examples], y[: FLAGS.examples]
    attacks.pgd(model, x, y, eps=0.3, steps=2, restarts=1)  # traces
    medians = {}
    for per_call in (10, 20, None):
        backend.TF_CPU_ATTACK_STEPS_PER_CALL = per_call
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            attacks.pgd(model, x, y, eps=0.3, steps=FLAGS.steps, restarts=1)
            times.append(time.perf_counter() - start)
        medians[per_call] = statistics.median(times)
    for per_call, seconds in medians.items():
        label = "one call" if per_call is None else f"{per_call} steps per call"
        print(f"{label}: median {seconds:.2f} s, {len(x) * FLAGS.steps / seconds:,.0f} image-steps/s, "
              f"{seconds / medians[None]:.3f} x one call")


if __name__ == "__main__":
    app.run(main)
