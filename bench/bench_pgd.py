r"""PGD throughput in image-gradient-steps per second, on the current Keras backend.

  python bench/bench_pgd.py                                  # TensorFlow, the CPU defaults below
  KERAS_BACKEND=jax python bench/bench_pgd.py --num_examples=10000 --steps=100 --repeats=3
  python bench/bench_pgd.py --model_path=runs/mnist_polarized/stage3.keras --protocol

Throughput: `attacks.pgd` with one restart (random start, `--steps` steps of eps/10) on the
first --num_examples MNIST test images (random images if no data is found), timed after a
warm-up call that traces and compiles; prints the median of --repeats calls, in image-steps/s
(images x steps / wall time, host work included: noise, padding, invariant checks). It also prints
image-steps per CPU-second of this process, which other processes on a shared machine disturb far
less than wall time (on an idle machine, wall throughput is at most that times the cores used).
The speed does not depend on the weights: without --model_path the paper's polarized model with
random weights is attacked (saturation on).

--protocol also times the paper's full protocol on the model: PGD with --restarts restarts of
--steps steps on --num_examples images, where restarts attack only the examples not yet fooled;
it prints that wall time and the accuracy, next to the time the same work would take without that
early exit (num_examples x restarts x steps / throughput).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # For `python bench/...`.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import attacks, backend, data, models, run_dir  # noqa: E402
from polar_tf.config import Config  # noqa: E402

flags.DEFINE_string("model_path", None, "A .keras model to attack (default: random-weights polarized model).")
flags.DEFINE_integer("num_examples", 1000, "Images attacked per call.")
flags.DEFINE_integer("steps", 20, "PGD steps.")
flags.DEFINE_float("eps", 0.3, "L-inf attack size.")
flags.DEFINE_integer("batch_size", None, "Images per compiled call (default: the backend's).")
flags.DEFINE_integer("repeats", 3, "Timed calls; the median is reported.")
flags.DEFINE_bool("protocol", False, "Also time the full protocol (restarts with early exit).")
flags.DEFINE_integer("restarts", 20, "Restarts of the --protocol run.")
FLAGS = flags.FLAGS


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        x, y = data.load("mnist", "test")
        if n <= len(x):
            return x[:n], y[:n], "MNIST test images"
    except data.DataError:
        pass
    rng = np.random.default_rng(0)
    return rng.random((n, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32), "random images"


def main(argv):
    del argv
    if FLAGS.model_path:
        model, name = run_dir.load_model(FLAGS.model_path, compile=False), FLAGS.model_path
    else:
        keras.utils.set_random_seed(0)
        model, name = models.build_model(Config()), "polarized model, random weights"
    x, y, source = load_images(FLAGS.num_examples)
    batch_size = FLAGS.batch_size or backend.default_attack_batch_size()
    print(f"backend={backend.name()} device={backend.device_description()} model={name}")
    print(f"{len(x)} {source}, eps={FLAGS.eps}, steps={FLAGS.steps}, batch_size={batch_size}, repeats={FLAGS.repeats}")

    def run(restarts: int = 1) -> np.ndarray:
        return attacks.pgd(model, x, y, eps=FLAGS.eps, steps=FLAGS.steps, restarts=restarts, batch_size=batch_size)

    start = time.perf_counter()
    attacks.pgd(model, x[:batch_size], y[:batch_size], eps=FLAGS.eps, steps=1, restarts=1, batch_size=batch_size)
    print(f"trace and compile: {time.perf_counter() - start:.1f} s")
    rates, cpu_rates = [], []
    for _ in range(FLAGS.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        rates.append(len(x) * FLAGS.steps / (time.perf_counter() - start))
        cpu_rates.append(len(x) * FLAGS.steps / (time.process_time() - cpu_start))
    rate = statistics.median(rates)
    print(f"PGD throughput: {rate:,.0f} image-steps/s (median; runs: {', '.join(f'{r:,.0f}' for r in rates)})")
    print(f"per CPU-second: {statistics.median(cpu_rates):,.0f} image-steps (median; runs: "
          f"{', '.join(f'{r:,.0f}' for r in cpu_rates)}; {os.cpu_count()} cores)")
    if FLAGS.protocol:
        compiled = attacks.compiled_attack(model, "ce")
        before, start = compiled.image_steps, time.perf_counter()
        x_adv = run(FLAGS.restarts)
        seconds = time.perf_counter() - start
        accuracy = models.accuracy(model, x_adv, y)
        work = len(x) * FLAGS.restarts * FLAGS.steps
        print(
            f"protocol: {len(x)} images x {FLAGS.restarts} restarts x {FLAGS.steps} steps in {seconds:.1f} s "
            f"({compiled.image_steps - before:,} image-steps after early exits), PGD accuracy {accuracy:.4f}; "
            f"without early exit {work:,} image-steps would take {work / rate:.1f} s at the throughput above"
        )


if __name__ == "__main__":
    app.run(main)
