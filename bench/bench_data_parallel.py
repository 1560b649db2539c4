r"""Data-parallel training and PGD against one device: throughput, and that the two agree.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 NPROC=8 KERAS_BACKEND=jax \
      python bench/bench_data_parallel.py                                   # 2 devices faked on a CPU
  KERAS_BACKEND=jax python bench/bench_data_parallel.py                    # a machine with several GPUs
  XLA_FLAGS=--xla_force_host_platform_device_count=1 KERAS_BACKEND=jax \
      POLAR_TF_DATA_DIR=../shared/data python bench/bench_data_parallel.py --hosts=2

In one process, on random images: the stage-1 `fit` of the polarized model at --batch_size (the
global batch) and `attacks.pgd` (one restart, --steps steps, saturation on), each timed after a
warm-up call that compiles, first on one device, then with `parallel.scope("data_parallel")` over
every device. Prints images/s and image-steps/s, the speed-up, and how far the two placements'
results differ: the weights after the same fits from the same initial weights (next to one device
trained on the same batches with the rows inside each batch reordered: the same sums in another
order), and the share of adversarial pixels that differ.

--hosts=N instead runs the commands BUILD.md gives for several hosts, as N local processes of one
device each (KERAS_DISTRIBUTION_* variables, a coordinator on localhost): train.py on a small
schedule (--train_examples images, 1 epoch per stage) and evaluate.py on its model, each
process with its own workdir, next to a one-process run; it prints how far the final weights and
the evaluations' accuracies differ. Each host's process computes on its own devices.

On a CPU the fake devices share the same cores, so the figures are a functional check of the
data-parallel path, not of how it scales. Results and machines are recorded in BENCHMARKS.md.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # For `python bench/...`.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import attacks, backend, models, parallel, run_dir, schedule, training  # noqa: E402
from polar_tf.config import Config  # noqa: E402

flags.DEFINE_integer("batch_size", 64, "Global training batch.")
flags.DEFINE_integer("train_steps", 40, "Train steps per timed fit.")
flags.DEFINE_integer("num_examples", 500, "Images attacked per PGD call (one batch).")
flags.DEFINE_integer("steps", 10, "PGD steps.")
flags.DEFINE_integer("hosts", 0, "Instead, run train.py and evaluate.py in this many local processes (0: no).")
flags.DEFINE_integer("train_examples", 256, "--hosts: training images of the small schedule.")
FLAGS = flags.FLAGS


def within_batch_shuffle(n: int, batch_size: int) -> np.ndarray:
    """Row order that permutes the rows inside each batch: every batch's gradient is the same sum."""
    rng = np.random.default_rng(1)
    return np.concatenate([start + rng.permutation(min(batch_size, n - start)) for start in range(0, n, batch_size)])


def time_training(distribute: str, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(images/s of one timed fit, the weights after warm-up and timed fits)."""
    config = Config(batch_size=FLAGS.batch_size)
    with parallel.scope(distribute):
        keras.utils.set_random_seed(0)
        model = models.build_model(config)
        training.compile_for_stage(model, config, 1)
        training.apply_phase(model, schedule.phase(config, 0))
        model.fit(x[: 2 * config.batch_size], y[: 2 * config.batch_size], batch_size=config.batch_size, verbose=0)
        start = time.perf_counter()
        model.fit(x, y, batch_size=config.batch_size, verbose=0, shuffle=False)
        seconds = time.perf_counter() - start
        return len(x) / seconds, np.concatenate([w.ravel() for w in model.get_weights()])


def time_pgd(distribute: str, model_path: str, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(image-steps/s of one timed PGD call, its adversarial images)."""
    with parallel.scope(distribute):
        model = run_dir.load_model(model_path)  # Inside the scope: its weights go to every device.
        run = lambda: attacks.pgd(model, x, y, eps=0.3, steps=FLAGS.steps, restarts=1, batch_size=len(x))  # noqa: E731
        run()
        start = time.perf_counter()
        x_adv = run()
        return len(x) * FLAGS.steps / (time.perf_counter() - start), x_adv


def check_hosts(hosts: int) -> None:
    """train.py and evaluate.py in `hosts` local processes against one process."""
    folder = tempfile.mkdtemp(prefix="bench_data_parallel_")
    train = [sys.executable, os.path.join(ROOT, "train.py"), "--epochs_per_stage=1", "--batch_size=32",
             f"--train_examples={FLAGS.train_examples}", "--verbose=0"]
    evaluate = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--num_examples=100", "--steps=10", "--restarts=2",
                "--attacks=fgsm,pgd", "--certify"]

    def run_all(command: list[str], name: str, flag_dir: str, model_dir: str | None = None) -> float:
        """Runs one process on its own and `hosts` processes together; returns the latter's wall time."""
        model = [f"--model_path={os.path.join(folder, model_dir)}"] if model_dir else []
        single = subprocess.run([*command, *model, f"--{flag_dir}={os.path.join(folder, name + '_one')}"],
                                capture_output=True, text=True)
        if single.returncode:
            sys.exit(single.stderr[-2000:])
        start = time.perf_counter()
        processes = [
            subprocess.Popen(
                [*command, *model, "--distribute=data_parallel", f"--{flag_dir}={os.path.join(folder, f'{name}_{i}')}"],
                env={**os.environ, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "localhost:12421",
                     "KERAS_DISTRIBUTION_NUM_PROCESSES": str(hosts), "KERAS_DISTRIBUTION_PROCESS_ID": str(i)},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            for i in range(hosts)
        ]
        for p in processes:
            if p.wait():
                sys.exit(p.stderr.read()[-2000:])
        return time.perf_counter() - start

    seconds = run_all(train, "train", "workdir")
    weights = {
        name: np.concatenate([w.ravel() for w in run_dir.load_model(os.path.join(folder, name, "stage3.keras")).get_weights()])
        for name in ["train_one", *(f"train_{i}" for i in range(hosts))]
    }
    spread = max(float(np.max(np.abs(weights[f"train_{i}"] - weights["train_one"]))) for i in range(hosts))
    print(f"train.py on {hosts} processes: {seconds:.1f} s; max |weight difference| from one process: {spread:.2e}")
    seconds = run_all(evaluate, "evaluate", "output_dir", model_dir="train_one")
    accuracies = {}
    for name in ["evaluate_one", *(f"evaluate_{i}" for i in range(hosts))]:
        with open(os.path.join(folder, name, "results.json")) as f:
            record = json.load(f)["models"][0]
        accuracies[name] = (record["clean_accuracy"], record["accuracy"], record["certified"][0]["certified_accuracy"])
    same = all(accuracies[f"evaluate_{i}"] == accuracies["evaluate_one"] for i in range(hosts))
    print(f"evaluate.py on {hosts} processes: {seconds:.1f} s; accuracies {'equal to' if same else 'DIFFER from'} "
          f"one process's: {accuracies['evaluate_one']}")
    print(f"(runs in {folder})")


def main(argv):
    del argv
    if backend.name() != "jax":
        sys.exit("bench_data_parallel.py: error: data-parallel runs need the JAX backend; run with KERAS_BACKEND=jax")
    if FLAGS.hosts:
        check_hosts(FLAGS.hosts)
        return
    rng = np.random.default_rng(0)
    n = FLAGS.train_steps * FLAGS.batch_size
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    with parallel.scope("data_parallel"):
        devices = backend.replica_count()
        description = backend.device_description()
    print(f"{description}; batch {FLAGS.batch_size} split across {devices} devices")
    one_rate, one_weights = time_training("none", x, y)
    spread_rate, spread_weights = time_training("data_parallel", x, y)
    order = within_batch_shuffle(n, FLAGS.batch_size)
    _, reordered_weights = time_training("none", x[order], y[order])
    print(f"train (stage 1, {n} images): one device {one_rate:.0f} images/s, {devices} devices {spread_rate:.0f} "
          f"images/s ({spread_rate / one_rate:.2f}x)")
    for label, weights in ((f"{devices} devices", spread_weights), ("one device, rows reordered in each batch", reordered_weights)):
        gap = np.abs(weights - one_weights)
        print(f"  weights after {FLAGS.train_steps + 2} steps, {label}, against one device: max {gap.max():.2e}, "
              f"99th percentile {np.quantile(gap, 0.99):.2e}, median {np.median(gap):.2e}")
    path = os.path.join(tempfile.mkdtemp(prefix="bench_data_parallel_"), "model.keras")
    keras.utils.set_random_seed(0)
    run_dir.save_model(models.build_model(Config()), path)
    x, y = x[: FLAGS.num_examples], y[: FLAGS.num_examples]
    one_rate, one_adv = time_pgd("none", path, x, y)
    spread_rate, spread_adv = time_pgd("data_parallel", path, x, y)
    print(f"pgd ({len(x)} images x {FLAGS.steps} steps): one device {one_rate:.0f} image-steps/s, {devices} devices "
          f"{spread_rate:.0f} image-steps/s ({spread_rate / one_rate:.2f}x); adversarial pixels that differ: "
          f"{np.mean(spread_adv != one_adv):.2%}")


if __name__ == "__main__":
    app.run(main)
