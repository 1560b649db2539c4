"""The same tiny training and attacks on one device and data-parallel on all of them, for test_parallel.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 NPROC=8 KERAS_BACKEND=jax PYTHONPATH=. \
        python tests/data_parallel_run.py DATA_DIR OUT_DIR

A separate process because JAX reads the device count when it starts. Writes OUT_DIR/results.npz;
the test asserts on it. One device: the schedule's 3 stages (1 epoch each) in OUT_DIR/one. All
devices: stage 1, then "all" again, which resumes stages 2 and 3 from stage 1's checkpoint, in
OUT_DIR/parallel. Then PGD and certify on test images with the data-parallel model loaded both
on all devices and on one.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from polar_tf import apgd, attacks, backend, certify, data, models, parallel, run_dir, square, training
from polar_tf.config import Config

CONFIG = Config(epochs_per_stage=1, batch_size=16, train_examples=64)
# An odd number of images: the batches of the attack (7), predict (7) and certify (15) are padded
# to split across the devices.
ATTACK_EXAMPLES = 15
EPS = 0.3


def main(data_dir: str, out: str) -> None:
    # The stage plots (a third of the time) draw NumPy kernels and the front-end outputs that every
    # epoch's report computes too: skipped here.
    training._stage_plots = lambda *args: None
    one, spread = os.path.join(out, "one"), os.path.join(out, "parallel")
    training.train_and_evaluate(CONFIG, one, data_dir=data_dir)
    training.train_and_evaluate(CONFIG, spread, stage="1", data_dir=data_dir, distribute="data_parallel")
    training.train_and_evaluate(CONFIG, spread, data_dir=data_dir, distribute="data_parallel")
    x, y = data.load("mnist", "test", data_dir)
    x, y = x[:ATTACK_EXAMPLES], y[:ATTACK_EXAMPLES]
    results = {}
    with parallel.scope("data_parallel"):
        model = run_dir.load_model(run_dir.checkpoint_path(spread, CONFIG, 3))
        results["replicas"] = backend.replica_count()
        results["weight_devices"] = len(model.trainable_variables[0].value.devices())
        results["batch_devices"] = len(backend.place_rows(x[:14]).devices())
        results["parallel_logits"] = models.predict_logits(model, x, batch_size=7)
        results["parallel_pgd"] = _pgd(model, x, y)
        results["parallel_apgd"] = apgd.apgd(model, x[:14], y[:14], eps=EPS, iterations=5, batch_size=14)
        results["parallel_square"] = square.square(model, x[:14], y[:14], eps=EPS, queries=10, batch_size=14)
        # What the adaptive suite's compiled functions do with a batch: split it across the devices.
        forward = backend.compile_model_function(model, lambda forward, _, images: forward(images), lambda: None)
        results["function_batch_devices"] = len(forward(x[:14]).sharding.device_set)
        results["function_shard_rows"] = [shard.data.shape[0] for shard in forward(x[:14]).addressable_shards]
        results["parallel_certified"] = certify.certify(model, x, y, EPS).margin_lower_bound
    model = run_dir.load_model(run_dir.checkpoint_path(spread, CONFIG, 3))  # on one device
    results["one_device_logits"] = models.predict_logits(model, x, batch_size=7)
    results["one_device_pgd"] = _pgd(model, x, y)
    results["one_device_apgd"] = apgd.apgd(model, x[:14], y[:14], eps=EPS, iterations=5, batch_size=14)
    results["one_device_square"] = square.square(model, x[:14], y[:14], eps=EPS, queries=10, batch_size=14)
    results["one_device_certified"] = certify.certify(model, x, y, EPS).margin_lower_bound
    for name in ("parallel", "one_device"):
        results[f"{name}_pgd_fooled"] = ~models.correct(model, results[f"{name}_pgd"], y)
    for name, workdir in (("one", one), ("parallel", spread)):
        records = run_dir.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
        for key in ("loss", training.FIT_ACCURACY, "test_accuracy", "saturate"):
            results[f"{name}_{key}"] = np.array([r[key] for r in records])
        final = run_dir.load_model(run_dir.checkpoint_path(workdir, CONFIG, 3))
        results[f"{name}_weights"] = np.concatenate([w.ravel() for w in final.get_weights()])
        results[f"{name}_frontend_trainable"] = models.get_frontend(final).trainable
    results["x"], results["y"] = x, y
    np.savez(os.path.join(out, "results.npz"), **results)


def _pgd(model, x, y) -> np.ndarray:
    return attacks.pgd(model, x, y, eps=EPS, steps=5, restarts=2, batch_size=7)


if __name__ == "__main__":
    main(*sys.argv[1:])
