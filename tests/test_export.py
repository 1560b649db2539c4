"""SavedModel export and .keras round trips across backends."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import models, run_dir
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
    run_dir.save_model(model, path)
    return path


def _assert_same_logits(model, x, served, expected):
    """Two computation paths (TensorFlow's graph or the other backend, another process) give the
    same logits up to float32 rounding, wherever no front-end output lies within rounding of a
    jump; there one path may saturate to the next level, a real but legitimate difference. Those
    images must be few, and the logits not all zero (as a saturated random model's are on noise)."""
    far = float_paths.jump_gaps(model, x) > float_paths.Z_TOLERANCE
    assert far.mean() >= 0.9
    assert np.abs(expected[far]).max() > 0.01
    np.testing.assert_allclose(served[far], expected[far], rtol=0, atol=float_paths.logit_atol(expected))


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
    model = run_dir.load_model(saved_checkpoint)
    expected = ops.convert_to_numpy(model(x))
    _assert_same_logits(model, x, out["logits"], expected)
    # The probabilities are the softmax of the served logits (float32 exp and division: within a
    # few ulps of numbers <= 1).
    logits = out["logits"].astype(np.float64)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out["probabilities"], softmax / softmax.sum(axis=1, keepdims=True), rtol=0, atol=1e-6)


def test_export_replaces_an_existing_dir_and_fails_cleanly(tmp_path, saved_checkpoint):
    from polar_tf.export import export_saved_model

    export_dir = str(tmp_path / "export")
    model = run_dir.load_model(saved_checkpoint)
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
def test_checkpoint_loads_and_predicts_identically_under_each_backend(tmp_path, saved_checkpoint, other, mnist):
    """A .keras file saved under this backend gives the same predictions under `other`."""
    x = mnist[1][0][:16]  # real digits: on noise the saturated random model's logits are all 0
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np\n"
        "from keras import ops\n"
        "from polar_tf import run_dir\n"
        f"model = run_dir.load_model({saved_checkpoint!r})\n"
        "np.save(sys.argv[2], ops.convert_to_numpy(model(np.load(sys.argv[1]))))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    model = run_dir.load_model(saved_checkpoint)
    expected = ops.convert_to_numpy(model(x))
    if other == keras.backend.backend():
        # Exact: the same backend runs the same kernels on the same shapes with the same thread
        # count (the subprocess inherits the environment), on the same machine.
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    else:
        _assert_same_logits(model, x, np.load(tmp_path / "y.npy"), expected)


def test_an_export_that_would_fail_is_refused_before_any_work(tmp_path, monkeypatch):
    from polar_tf import export

    (tmp_path / "file").write_text("kept")
    with pytest.raises(OSError, match=r"^export_dir .*/file is a file, not a folder$"):
        export.check_export_dir(str(tmp_path / "file"))
    with pytest.raises(OSError, match=r"^the folder of export_dir .*/file is a file, not a folder$"):
        export.check_export_dir(str(tmp_path / "file" / "export"))
    assert (tmp_path / "file").read_text() == "kept"
    export.check_export_dir(str(tmp_path / "new" / "export"))  # its folder is made; the export's own is not
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "export").exists()
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as on the GPU machine: not installed
    with pytest.raises(ValueError, match=r"^export_dir needs TensorFlow to write a SavedModel, and it is not installed"):
        export.check_export_dir(str(tmp_path / "new" / "export"))
