"""SavedModel export and .keras round trips across backends."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from polar_tf import models, runfiles
from polar_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A polarized model with a saturating front end, saved under the current backend."""
    keras.utils.set_random_seed(0)
    model = models.build_model(Config())
    models.get_frontend(model).set_saturation(True)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.keras")
    runfiles.save_model(model, path)
    return path


def test_saved_model_serves_the_keras_outputs_without_polar_tf(tmp_path, saved_checkpoint, mnist):
    export_dir = str(tmp_path / "export")
    result = subprocess.run(
        [sys.executable, "-m", "polar_tf.export", f"--model_path={saved_checkpoint}", f"--export_dir={export_dir}"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    x = mnist[1][0][:64]
    # Load and serve in a fresh interpreter that never imports polar_tf.
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"loaded = tf.saved_model.load({export_dir!r})\n"
        "out = loaded.signatures['serving_default'](images=tf.constant(np.load(sys.argv[1])))\n"
        "np.savez(sys.argv[2], logits=out['logits'].numpy(), probabilities=out['probabilities'].numpy())\n"
        "assert 'polar_tf' not in sys.modules\n"
    )
    np.save(tmp_path / "x.npy", x)
    served = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, cwd=str(tmp_path),
    )
    assert served.returncode == 0, served.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    model = runfiles.load_model(saved_checkpoint)
    expected = ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(out["logits"], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["probabilities"], ops.convert_to_numpy(ops.softmax(expected)), atol=1e-6)


def test_export_replaces_an_existing_dir_and_fails_cleanly(tmp_path, saved_checkpoint):
    from polar_tf.export import export_saved_model

    export_dir = str(tmp_path / "export")
    model = runfiles.load_model(saved_checkpoint)
    export_saved_model(model, export_dir)
    export_saved_model(model, export_dir)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    result = subprocess.run(
        [sys.executable, "-m", "polar_tf.export", f"--model_path={tmp_path}/missing.keras", f"--export_dir={export_dir}"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("polar_tf.export: error: model ")


@pytest.mark.parametrize("other", ["tensorflow", "jax"])
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="both directions are covered by the TensorFlow pass")
def test_checkpoint_loads_and_predicts_identically_under_each_backend(tmp_path, saved_checkpoint, other):
    """A .keras file saved under this backend gives the same predictions under `other`."""
    x = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np\n"
        "from keras import ops\n"
        "from polar_tf import runfiles\n"
        f"model = runfiles.load_model({saved_checkpoint!r})\n"
        "np.save(sys.argv[2], ops.convert_to_numpy(model(np.load(sys.argv[1]))))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = ops.convert_to_numpy(runfiles.load_model(saved_checkpoint)(x))
    if other == keras.backend.backend():
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    else:
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
