"""Times `polar_tf.certify.certify` on N test images at one eps and prints images/s.

    POLAR_TF_DATA_DIR=../shared/data python bench/bench_certify.py --examples=10000 --eps=0.3

Without --checkpoint the model is a quickly trained polarized one: its front end is set by hand
to one-hot 5x5 filters (one pixel each, alternating signs: what the trained front ends converge
to), saturation on, and only the classifier is trained for one epoch on --train_examples images.
That model is ~95% accurate, so interval propagation runs on nearly every image (the slow
path); a random model would be misleadingly fast, as misclassified images skip it. Training
time is not counted. The median of --repeats timed runs is reported.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import certify, data, models, run_dir  # noqa: E402
from polar_tf.config import Config  # noqa: E402

flags.DEFINE_string("checkpoint", None, "A .keras model to certify; default: a quickly trained one.")
flags.DEFINE_enum("model", "polarized", ["polarized", "baseline", "direct_quant"], "Quick model's kind.")
flags.DEFINE_integer("examples", 10000, "Test images to certify.")
flags.DEFINE_float("eps", 0.3, "L-inf radius.")
flags.DEFINE_integer("batch_size", 500, "Images per certification batch.")
flags.DEFINE_integer("repeats", 3, "Timed runs; the median is reported.")
flags.DEFINE_integer("train_examples", 10000, "Training images of the quick model.")
FLAGS = flags.FLAGS


def one_hot_kernel(kernel_size: int = 5, filters: int = 25) -> np.ndarray:
    """Filter k picks pixel k of the 5x5 window, with sign (-1)^k."""
    kernel = np.zeros((kernel_size, kernel_size, 1, filters), np.float32)
    for k in range(filters):
        row, col = divmod(k % kernel_size**2, kernel_size)
        kernel[row, col, 0, k] = 1.0 if k % 2 == 0 else -1.0
    return kernel


def quick_model(kind: str, train_examples: int) -> keras.Model:
    """A model trained one epoch; the polarized one has a hand-set, frozen, saturating front end."""
    keras.utils.set_random_seed(0)
    model = models.build_model(Config(model=kind))
    frontend = models.get_frontend(model)
    if frontend is not None:
        frontend.kernel.assign(one_hot_kernel())
        frontend.set_saturation(True)
        frontend.trainable = False
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = data.load("mnist", "train")
    model.fit(x[:train_examples], y[:train_examples], batch_size=64, epochs=1, verbose=0)
    return model


def main(argv):
    del argv
    if FLAGS.checkpoint:
        model, described = run_dir.load_model(FLAGS.checkpoint, compile=False), FLAGS.checkpoint
    else:
        model = quick_model(FLAGS.model, FLAGS.train_examples)
        described = f"quick {FLAGS.model} model (one-hot front end, 1 epoch on {FLAGS.train_examples} images)"
    x, y = data.load("mnist", "test")
    x, y = x[: FLAGS.examples], y[: FLAGS.examples]
    certify.certify(model, x[:FLAGS.batch_size], y[:FLAGS.batch_size], FLAGS.eps, FLAGS.batch_size)  # warm-up
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        result = certify.certify(model, x, y, FLAGS.eps, batch_size=FLAGS.batch_size)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    ran_ibp = np.mean(result.clean_correct & ~(result.certified_frontend if result.certified_frontend is not None
                                               else np.zeros_like(result.clean_correct)))
    print(f"model: {described}; backend: {keras.backend.backend()}")
    print(f"summary: {result.summary()}")
    print(f"interval propagation ran on {ran_ibp:.1%} of the images")
    print(f"times (s): {', '.join(f'{t:.2f}' for t in times)}")
    print(f"certified {len(x)} images at eps={FLAGS.eps} in {median:.2f} s (median of {FLAGS.repeats}): "
          f"{len(x) / median:.0f} images/s")


if __name__ == "__main__":
    app.run(main)
