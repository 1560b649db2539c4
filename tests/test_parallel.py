"""Data parallelism: the rows each process trains on, and training and attacks on 2 devices as on one."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import float_paths
from polar_tf import backend, parallel, training
from polar_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 CPU devices. XLA runs both on one thread pool, by default of one thread per core; with the 2
# threads of the 2-core machine, a longer run's all-reduce once waited 40 s for the other device and
# XLA aborted it (BENCHMARKS.md). NPROC sets the pool's size.
FAKE_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "NPROC": "8"}


def _devices(monkeypatch, replicas: int, processes: int = 1, index: int = 0) -> None:
    monkeypatch.setattr(backend, "replica_count", lambda: replicas)
    monkeypatch.setattr(backend, "process_count", lambda: processes)
    monkeypatch.setattr(backend, "process_index", lambda: index)


def test_one_device_trains_on_every_row_in_order():
    order = np.array([5, 3, 0, 4, 1, 2, 6])
    np.testing.assert_array_equal(parallel.epoch_rows(order, 2), order)
    assert parallel.local_batch_size(2) == 2


def test_the_last_batch_is_cut_to_a_multiple_of_the_devices(monkeypatch):
    _devices(monkeypatch, replicas=4)
    order = np.arange(23)[::-1]  # batches of 8, 8 and 7: the last keeps 4 rows
    np.testing.assert_array_equal(parallel.epoch_rows(order, 8), np.arange(23)[::-1][:20])
    np.testing.assert_array_equal(parallel.epoch_rows(np.arange(20), 8), np.arange(20))  # 8, 8, 4: kept


def test_each_process_takes_its_part_of_every_batch(monkeypatch):
    # 2 processes of 2 devices, batches of 8 over 20 rows (8, 8, 4): process 0 feeds fit the first
    # half of each batch, process 1 the second; fit reads them in batches of 4.
    order = np.arange(100, 120)
    _devices(monkeypatch, replicas=4, processes=2, index=0)
    np.testing.assert_array_equal(parallel.epoch_rows(order, 8), [100, 101, 102, 103, 108, 109, 110, 111, 116, 117])
    assert parallel.local_batch_size(8) == 4
    _devices(monkeypatch, replicas=4, processes=2, index=1)
    np.testing.assert_array_equal(parallel.epoch_rows(order, 8), [104, 105, 106, 107, 112, 113, 114, 115, 118, 119])


def test_batch_size_must_split_evenly(monkeypatch):
    _devices(monkeypatch, replicas=4)
    parallel.check_batch_size(64)
    with pytest.raises(ValueError, match=r"^batch_size must be a multiple of the 4 devices it is split across. "
                                         r"Received: batch_size=30$"):
        parallel.check_batch_size(30)


def test_unknown_choice_is_rejected():
    with pytest.raises(ValueError, match=r"distribute must be one of none, data_parallel. Received: distribute='pmap'"):
        with parallel.scope("pmap"):
            pass


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the TensorFlow backend's answer")
def test_tensorflow_backend_refuses_data_parallel_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match=r"^data-parallel runs need the JAX backend \(keras.distribution is JAX-only "
                                         r"in Keras 3\); run with KERAS_BACKEND=jax"):
        training.train_and_evaluate(Config(), str(tmp_path / "run"), distribute="data_parallel")
    assert not os.path.exists(tmp_path / "run")


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory, mnist_subset_dir):
    """tests/data_parallel_run.py on 2 CPU devices: its results.npz and workdirs."""
    out = tmp_path_factory.mktemp("parallel")
    env = {**os.environ, **FAKE_DEVICES, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "data_parallel_run.py"), mnist_subset_dir, str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out / "results.npz")), str(out)


# The 2-device pass runs in the JAX pass of the suite; the TensorFlow pass checks the refusal above.
jax_pass = pytest.mark.skipif(keras.backend.backend() != "jax", reason="data parallelism runs on the JAX backend")


@jax_pass
@pytest.mark.slow
def test_two_devices_train_the_schedule_as_one_device(two_devices):
    r, _ = two_devices
    # It ran spread: the model's weights on both devices, an attack batch split across them.
    assert (r["replicas"], r["weight_devices"], r["batch_devices"]) == (2, 2, 2)
    # The schedule's switches and the stage-3 freeze, in both runs.
    np.testing.assert_array_equal(r["parallel_saturate"], [False, False, True])
    np.testing.assert_array_equal(r["one_saturate"], [False, False, True])
    assert not r["parallel_frontend_trainable"] and not r["one_frontend_trainable"]
    # The same 12 global batches (64 images, batches of 16, 3 epochs); each gradient is the same
    # sum in another order (float32: ~1e-7 relative). A weight whose gradient is within rounding of
    # 0 can still take an Adam step of up to about lr = 1e-3 either way (reordering the rows inside
    # each batch on one device does the same, BENCHMARKS.md), so the weights are compared at their
    # 99th percentile: rounding only (measured: at most 1e-6), where rows of other batches move
    # most weights by ~1e-3. The loss, ~2.3, moves by far less than 1e-4 of itself; an accuracy
    # by at most one example near a tie.
    assert np.quantile(np.abs(r["parallel_weights"] - r["one_weights"]), 0.99) <= 1e-4
    np.testing.assert_allclose(r["parallel_loss"], r["one_loss"], rtol=1e-4)
    np.testing.assert_allclose(r["parallel_fit_accuracy"], r["one_fit_accuracy"], rtol=0, atol=1 / 64 + 1e-9)
    np.testing.assert_allclose(r["parallel_test_accuracy"], r["one_test_accuracy"], rtol=0, atol=1 / 200 + 1e-9)


@jax_pass
@pytest.mark.slow
def test_data_parallel_checkpoints_resume_and_load_on_one_device(two_devices):
    r, out = two_devices
    from polar_tf import run_dir

    workdir = os.path.join(out, "parallel")
    # Stage 1, then "all": stages 2 and 3 resumed from the stage-1 checkpoint; one record per epoch.
    records = run_dir.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
    assert [(rec["epoch"], rec["stage"]) for rec in records] == [(0, 1), (1, 2), (2, 3)]
    # The model trained on 2 devices, loaded on one, computes what it computes on 2.
    np.testing.assert_allclose(r["one_device_logits"], r["parallel_logits"], rtol=0,
                               atol=float_paths.logit_atol(r["parallel_logits"]))
    tb = os.path.join(workdir, "tb")
    assert sum(os.path.getsize(os.path.join(tb, f)) for f in os.listdir(tb) if f.startswith("events.out.tfevents")) > 0


@jax_pass
@pytest.mark.slow
def test_attacks_and_certify_split_across_devices_match_one_device(two_devices):
    r, _ = two_devices
    x, eps = r["x"], 0.3
    for x_adv in (r["parallel_pgd"], r["one_device_pgd"]):
        assert np.max(np.abs(x_adv.astype(np.float64) - x)) <= eps + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # Each example's steps are the same maths on either placement; a sign of a gradient component
    # within rounding of 0 could differ, so pixels agree but for a few, and the attack reaches the
    # same examples.
    assert np.mean(r["parallel_pgd"] != r["one_device_pgd"]) <= 0.01
    assert np.sum(r["parallel_pgd_fooled"] != r["one_device_pgd_fooled"]) <= 1
    # APGD and Square (the adaptive suite's compiled functions) split their batch of 14 too, and
    # find the same images but for a pixel or decision within rounding (as PGD above).
    assert r["function_batch_devices"] == 2 and list(r["function_shard_rows"]) == [7, 7]
    for name in ("apgd", "square"):
        spread_adv, one_adv = r[f"parallel_{name}"], r[f"one_device_{name}"]
        assert np.max(np.abs(spread_adv.astype(np.float64) - x[:14])) <= eps + 1e-6
        assert np.mean(spread_adv != one_adv) <= 0.01, name
    # Certify: the same certificates, margins equal up to float32 rounding of the bounds.
    one, spread = r["one_device_certified"], r["parallel_certified"]
    np.testing.assert_array_equal(np.isfinite(one), np.isfinite(spread))
    finite = np.isfinite(one)
    np.testing.assert_allclose(spread[finite], one[finite], rtol=0, atol=float_paths.logit_atol(one[finite]))
