r"""TensorFlow SavedModel export with a serving signature.

  python -m polar_tf.export --model_path=runs/mnist_polarized/stage3.keras --export_dir=export/mnist
  saved_model_cli run --dir export/mnist --tag_set serve --signature_def serving_default \
      --input_exprs 'images=np.zeros((1,28,28,1),np.float32)'

The signature takes float32 images [N, 28, 28, 1] in [0, 1] and returns "logits" and
"probabilities" of the model as evaluated (a polarized model with its saturation switched on).
Needs TensorFlow (imported lazily); from the JAX backend Keras converts through jax2tf.
TensorFlow's start-up logs are hidden; POLAR_TF_VERBOSE=1 shows them. Bad or missing flags end
with one line `polar_tf.export: error: ...` (exit 1).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

from polar_tf import cli

if __name__ == "__main__":
    cli.quiet_startup()  # Before the imports below load Keras and TensorFlow, which logs while it loads.

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

from polar_tf import models, run_dir  # noqa: E402


def check_export_dir(export_dir: str) -> None:
    """Refuses an export that would fail: no TensorFlow to write the SavedModel with (from the JAX
    backend Keras converts through jax2tf), or no folder to write it in. `training.train` asks before
    training, so that the export is not refused only once the model is trained."""
    if importlib.util.find_spec("tensorflow") is None:  # found without importing it (seconds, and its logs)
        raise ValueError(f"export_dir needs TensorFlow to write a SavedModel, and it is not installed "
                         f"(received: export_dir={export_dir})")
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise OSError(f"export_dir {export_dir} is a file, not a folder")
    run_dir.make_folder(os.path.dirname(os.path.abspath(export_dir)), "the folder of export_dir")


def export_saved_model(model: keras.Model, export_dir: str) -> None:
    """Writes `model` as a SavedModel with a "serving_default" signature, atomically.

    Args:
      model: a polar_tf model; a front end's saturation is switched on for the export.
      export_dir: the SavedModel folder; an existing one is replaced only once the new one is complete.
    """
    check_export_dir(export_dir)
    frontend = models.get_frontend(model)
    if frontend is not None:
        frontend.set_saturation(True)

    def serve(images):
        logits = model(images, training=False)
        return {"logits": logits, "probabilities": keras.ops.softmax(logits, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serve",
        fn=serve,
        input_signature=[keras.InputSpec(shape=(None, *models.IMAGE_SHAPE), dtype="float32", name="images")],
    )
    parent = os.path.dirname(os.path.abspath(export_dir))
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.", suffix=".tmp", dir=parent)
    try:
        archive.write_out(staging, verbose=False)
        if os.path.exists(export_dir):
            old = staging + ".old"
            os.replace(export_dir, old)
            os.replace(staging, export_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, export_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


def main(argv):
    del argv
    flags_ = flags.FLAGS

    def body():
        model = run_dir.load_model(run_dir.resolve_model_path(flags_.model_path), compile=False)
        export_saved_model(model, flags_.export_dir)
        print(f"SavedModel written to {flags_.export_dir}")

    cli.run_main("polar_tf.export", body)


if __name__ == "__main__":
    flags.DEFINE_string("model_path", None, "A .keras checkpoint or a workdir.", required=True)
    flags.DEFINE_string("export_dir", None, "SavedModel folder to write.", required=True)
    app.run(main, flags_parser=cli.flags_parser("polar_tf.export"))
