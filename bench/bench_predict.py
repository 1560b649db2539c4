"""What one small prediction costs: Keras' `model.predict` against `backend.predict`.

    POLAR_TF_DATA_DIR=../shared/data python bench/bench_predict.py --examples=40 --repeats=50

Evaluations predict on small batches hundreds of times (the examples an attack still has to fool,
a certificate's undecided images). `backend.predict` calls `model.predict_on_batch` per batch, the
same compiled function that `model.predict` runs, without its data pipeline and callbacks. This
times both on the first test images of the shipped polarized MNIST model, prints the median wall
time of a call and checks that the outputs agree.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

import numpy as np  # noqa: E402

from polar_tf import backend, data, run_dir  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
flags.DEFINE_integer("examples", 40, "Test images per call.")
flags.DEFINE_integer("batch_size", 500, "Batch size of both ways (one batch at the default --examples).")
flags.DEFINE_integer("repeats", 50, "Timed calls of each way; the median is reported.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    model = run_dir.load_model(os.path.join(ROOT, "pretrained", "mnist_polarized.keras"), compile=False)
    x = data.load("mnist", "test")[0][: FLAGS.examples]
    ways = {
        "model.predict": lambda: model.predict(x, batch_size=FLAGS.batch_size, verbose=0),
        "backend.predict": lambda: backend.predict(model, x, FLAGS.batch_size),
    }
    medians, outputs = {}, {}
    for name, call in ways.items():
        outputs[name] = call()  # traces
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    gap = float(np.max(np.abs(outputs["model.predict"] - outputs["backend.predict"])))
    for name, seconds in medians.items():
        print(f"{name}: median {seconds * 1000:.1f} ms a call of {len(x)} images "
              f"({seconds / medians['backend.predict']:.2f} x backend.predict)")
    print(f"largest difference of the logits: {gap:.2e} ({backend.name()})")


if __name__ == "__main__":
    app.run(main)
