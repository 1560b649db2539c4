"""polar_tf must import and train on a machine with JAX but no TensorFlow (the GPU machine)."""

import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import os, sys, tempfile
sys.modules["tensorflow"] = None  # as if not installed: any import of it raises ImportError
sys.modules["tensorflow_datasets"] = None
os.environ["KERAS_BACKEND"] = "jax"
import polar_tf
from polar_tf import config, run_dir, training
workdir = tempfile.mkdtemp()
try:  # a SavedModel needs TensorFlow: refused before training, not after
    training.train(config.Config(), os.path.join(workdir, "run"), export_dir=os.path.join(workdir, "export"))
except ValueError as e:
    assert str(e).startswith("export_dir needs TensorFlow to write a SavedModel, and it is not installed"), e
    assert os.listdir(workdir) == []
    print("export refused before training")
else:
    raise SystemExit("train ran with an export_dir it cannot write")
training.train_and_evaluate(config.Config(epochs_per_stage=1, train_examples=64), workdir, "all", sys.argv[1])
assert os.path.isfile(os.path.join(workdir, "stage3.keras"))
print("trained without tensorflow")
"""


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="sets its own backend: run once, in the JAX pass")
def test_trains_on_jax_without_tensorflow(mnist_subset_dir):
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", SCRIPT, mnist_subset_dir], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "export refused before training" in result.stdout and "trained without tensorflow" in result.stdout
    assert "TensorFlow is not installed: no TensorBoard events" in result.stderr
