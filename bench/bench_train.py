r"""Training throughput (images/s) of each stage of the schedule, on the current Keras backend.

  python bench/bench_train.py                            # TensorFlow, batch 64
  KERAS_BACKEND=jax python bench/bench_train.py          # JAX
  python bench/bench_train.py --steps_per_execution=16 --repeats=5

Times `model.fit` on random images (the speed does not depend on the pixels) after a warm-up
fit that compiles the step, for the model and switches of each stage. Prints the median of
--repeats timed fits. Results and machines are recorded in BENCHMARKS.md.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # For `python bench/...`.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import backend, models, schedule, training  # noqa: E402
from polar_tf.config import Config  # noqa: E402

flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("steps", 150, "Train steps per timed fit.")
flags.DEFINE_integer("repeats", 3, "Timed fits per stage; the median is reported.")
flags.DEFINE_integer("steps_per_execution", 1, "Keras steps_per_execution.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"], "Keras jit_compile.")
flags.DEFINE_list("stages", ["1", "2", "3"], "Stages to time (polarized model).")
FLAGS = flags.FLAGS


def time_stage(stage: int, config: Config, x: np.ndarray, y: np.ndarray) -> float:
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    training.compile_for_stage(model, config, stage)
    training.apply_phase(model, schedule.phase(config, schedule.stage_epochs(config, stage)[-1]))
    model.fit(x[: 4 * config.batch_size * config.steps_per_execution], y[: 4 * config.batch_size * config.steps_per_execution],
              batch_size=config.batch_size, verbose=0)  # compile
    rates = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        model.fit(x, y, batch_size=config.batch_size, verbose=0, shuffle=False)
        rates.append(len(x) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv):
    del argv
    jit = {"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile]
    config = Config(batch_size=FLAGS.batch_size, steps_per_execution=FLAGS.steps_per_execution, jit_compile=jit)
    n = FLAGS.steps * FLAGS.batch_size
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    print(f"backend={backend.name()} batch={config.batch_size} steps_per_execution={config.steps_per_execution} "
          f"jit_compile={FLAGS.jit_compile} steps={FLAGS.steps} repeats={FLAGS.repeats}")
    for stage in map(int, FLAGS.stages):
        print(f"stage {stage}: {time_stage(stage, config, x, y):8.0f} images/s (median)")


if __name__ == "__main__":
    app.run(main)
