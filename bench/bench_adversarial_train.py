r"""Adversarial training throughput (images/s): the compiled train step against the per-batch host loop.

  python bench/bench_adversarial_train.py                            # TensorFlow, batch 64, PGD-40
  KERAS_BACKEND=jax python bench/bench_adversarial_train.py --steps_per_execution=32
  python bench/bench_adversarial_train.py --batches=8 --adv_steps=10 --repeats=2

"compiled" is what training runs: `training.train_epoch` of the adversarial model, one `fit` of
`adversarial_training.AdversarialTrainer` (PGD and the weight update in one compiled step,
--steps_per_execution steps per call). "host loop" is what training ran before: per batch, NumPy
noise, `training.adversarial_batch` (the compiled attack, then its check on the host), then
`train_on_batch` and a check of its loss on the host. Both train the paper's adversarial model
(its CNN, eps 0.3, --adv_steps of eps / 30 * 40 / adv_steps) on --batches batches of random images
(the speed does not depend on the pixels), each after a warm-up epoch that compiles it, alternately
--repeats times in one process, so that their ratio holds on a shared machine. Prints images/s per
wall second and per CPU second of this process (the steadier figure when other processes share
the CPU), and the median ratio. Results and machines are recorded in BENCHMARKS.md.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # For `python bench/...`.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import backend, models, training  # noqa: E402
from polar_tf.config import Config  # noqa: E402

flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("batches", 16, "Training batches per timed epoch.")
flags.DEFINE_integer("adv_steps", 40, "PGD steps per batch.")
flags.DEFINE_integer("steps_per_execution", 1, "Keras steps_per_execution of the compiled step.")
flags.DEFINE_integer("repeats", 3, "Timed epochs per path; the median is reported.")
FLAGS = flags.FLAGS


def host_loop_epoch(model: keras.Model, config: Config, epoch: int, x: np.ndarray, y: np.ndarray) -> None:
    """The per-batch loop training ran before the compiled step (one round trip per batch)."""
    batches = -(-len(x) // config.batch_size)
    for first in range(0, len(x), config.batch_size):
        xb, yb = x[first : first + config.batch_size], y[first : first + config.batch_size]
        scale = training.adversarial_scale(config, epoch, first // config.batch_size, batches)
        noise = np.random.default_rng([config.seed, epoch, first]).uniform(-1.0, 1.0, xb.shape).astype(np.float32)
        x_adv = training.adversarial_batch(model, config, xb, yb, noise, scale=scale)
        logs = model.train_on_batch(x_adv, yb, return_dict=True)
        if not np.isfinite(logs["loss"]):
            raise FloatingPointError(f"the loss became {logs['loss']}")


def compiled_epoch(model: keras.Model, config: Config, epoch: int, x: np.ndarray, y: np.ndarray) -> None:
    training.train_epoch(model, config, epoch, x, y)


def _model(config: Config) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    training.compile_for_stage(model, config, 1)
    return model


def _time(run, model, config, epoch, x, y) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run(model, config, epoch, x, y)
    return len(x) / (time.perf_counter() - wall), len(x) / (time.process_time() - cpu)


def main(argv):
    del argv
    config = Config(model="adversarial", batch_size=FLAGS.batch_size, adv_steps=FLAGS.adv_steps,
                    steps_per_execution=FLAGS.steps_per_execution)
    n = FLAGS.batches * FLAGS.batch_size
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    print(f"backend={backend.name()} device={backend.device_description()} batch={config.batch_size} "
          f"adv_steps={config.adv_steps} steps_per_execution={config.steps_per_execution} "
          f"batches={FLAGS.batches} repeats={FLAGS.repeats}")
    paths = {"host loop": (host_loop_epoch, _model(config)), "compiled": (compiled_epoch, _model(config))}
    for run, model in paths.values():
        run(model, config, 0, x, y)  # compiles (an epoch of another length would make another trainer)
    rates = {name: [] for name in paths}
    for repeat in range(FLAGS.repeats):
        for name, (run, model) in paths.items():
            wall, cpu = _time(run, model, config, 1 + repeat, x, y)
            rates[name].append((wall, cpu))
            print(f"  {name:9s} repeat {repeat}: {wall:8.1f} images/s wall, {cpu:8.1f} per CPU second")
    median = {name: [statistics.median(r[i] for r in runs) for i in (0, 1)] for name, runs in rates.items()}
    for name, (wall, cpu) in median.items():
        print(f"{name:9s}: {wall:8.1f} images/s wall, {cpu:8.1f} per CPU second (median)")
    print(f"compiled / host loop: {median['compiled'][0] / median['host loop'][0]:.2f}x wall, "
          f"{median['compiled'][1] / median['host loop'][1]:.2f}x per CPU second")


if __name__ == "__main__":
    app.run(main)
