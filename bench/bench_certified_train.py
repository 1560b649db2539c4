r"""Training throughput (images/s) of the certified (IBP) step beside the normal step.

  python bench/bench_certified_train.py                       # TensorFlow, batch 64
  KERAS_BACKEND=jax python bench/bench_certified_train.py --steps=30 --repeats=2

For each model (the polarized model's stage 3, the baseline) it builds the normal step (the
model's own `fit`, as the schedule runs it) and the certified step (`certified_training.trainer`
at the end of the ramp: full eps, final kappa), compiles both with a warm-up fit, then times them
alternately, --repeats times each, on --steps batches of random images (the speed does not depend
on the pixels). Alternating in one process keeps their ratio meaningful on a shared machine; it
prints the images/s of each timed fit per wall second and per CPU second of this process (the
steadier figure when other processes share the CPU), and the median ratios. Results and machines are recorded in BENCHMARKS.md.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # For `python bench/...`.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import backend, certified_training, models, schedule, training  # noqa: E402
from polar_tf.config import Config  # noqa: E402

flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("steps", 100, "Train steps per timed fit.")
flags.DEFINE_integer("repeats", 3, "Timed fits per step kind; the median is reported.")
flags.DEFINE_list("models", ["polarized", "baseline"], "Models to time (polarized: its stage 3).")
FLAGS = flags.FLAGS


def _fit_model(kind: str, certified: bool, num_examples: int) -> keras.Model:
    """What train_epoch fits in the last epoch of the model's last stage: the model, or its trainer."""
    config = Config(model=kind, batch_size=FLAGS.batch_size, certified_training=certified)
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    stage = config.num_stages
    training.compile_for_stage(model, config, stage)
    epoch = schedule.stage_epochs(config, stage)[-1]
    training.apply_phase(model, schedule.phase(config, epoch))
    if not certified:
        return model
    metrics = [keras.metrics.SparseCategoricalAccuracy(name=training.FIT_ACCURACY)]
    return certified_training.trainer(model, config, epoch, num_examples, metrics)


def _time(fitted: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fitted.fit(x, y, batch_size=FLAGS.batch_size, verbose=0, shuffle=False)
    return len(x) / (time.perf_counter() - wall), len(x) / (time.process_time() - cpu)


def main(argv):
    del argv
    n = FLAGS.steps * FLAGS.batch_size
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    print(f"backend={backend.name()} device={backend.device_description()} batch={FLAGS.batch_size} "
          f"steps={FLAGS.steps} repeats={FLAGS.repeats} load_average={os.getloadavg()[0]:.1f}")
    for kind in FLAGS.models:
        steps = {name: _fit_model(kind, name == "certified", n) for name in ("normal", "certified")}
        for fitted in steps.values():
            fitted.fit(x[: 4 * FLAGS.batch_size], y[: 4 * FLAGS.batch_size], batch_size=FLAGS.batch_size, verbose=0)
        rates = {name: [] for name in steps}
        for _ in range(FLAGS.repeats):
            for name, fitted in steps.items():
                rates[name].append(_time(fitted, x, y))
        for name, runs in rates.items():
            walls, cpus = zip(*runs)
            print(f"{kind} {name:9s}: {statistics.median(walls):7.0f} images/s (runs {', '.join(f'{r:.0f}' for r in walls)}); "
                  f"{statistics.median(cpus):7.0f} images per CPU-second")
        for i, clock in enumerate(("wall", "CPU")):
            ratios = [normal[i] / certified[i] for normal, certified in zip(rates["normal"], rates["certified"])]
            print(f"{kind} certified step cost, {clock} time (normal images/s / certified images/s): median "
                  f"{statistics.median(ratios):.2f} (runs {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    app.run(main)
