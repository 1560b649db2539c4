r"""Trains a model of the paper with the staged schedule.

  python train.py --dataset=mnist                   # all 3 stages, 60 epochs
  python train.py --dataset=mnist --stage=2         # stage 2 from the stage-1 checkpoint
  python train.py --dataset=fashion_mnist --epochs_per_stage=1 --train_examples=5000
  python train.py --dataset=mnist --certified_training   # stage 3 on the IBP loss: runs/mnist_polarized_certified
  python train.py --dataset=mnist --model=baseline --certified_training
  KERAS_BACKEND=jax python train.py --dataset=mnist --distribute=data_parallel   # every GPU (BUILD.md)

Every field of `config.Config` is a flag of the same name and default (`python train.py --help`).
TensorFlow's start-up logs are hidden; POLAR_TF_VERBOSE=1 shows them. Bad flags and values end
with one line `train.py: error: ...` (exit 1), Ctrl-C with `train.py: interrupted` (exit 130).
"""

from absl import app, flags

from polar_tf import cli
from polar_tf.config import DISTRIBUTIONS, Config

FLAGS = flags.FLAGS
PROGRAM = "train.py"


def define_flags() -> None:
    cli.define_config_flags(Config)
    cli.define_data_dir_flag()
    flags.adopt_module_key_flags(cli)  # --help lists them with the flags below
    flags.DEFINE_enum("stage", "all", ["1", "2", "3", "all"], "Stage to run; N > 1 starts from stage N-1's checkpoint.")
    flags.DEFINE_string("workdir", None, "Run folder (default: runs/<dataset>_<model>, _certified for certified training).")
    flags.DEFINE_string("export_dir", None, "Also write the trained model as a TensorFlow SavedModel here.")
    flags.DEFINE_integer("verbose", 2, "Keras fit output: 0 silent, 1 progress bar, 2 a line per epoch.")
    flags.DEFINE_enum("distribute", "none", list(DISTRIBUTIONS),
                      "data_parallel: split each batch across all devices and hosts (JAX backend; BUILD.md).")


def main(argv):
    del argv  # cli.flags_parser has rejected positional arguments.
    cli.run_main(PROGRAM, train, prepare=lambda: cli.config_from_flags(Config))


def train(config: Config) -> None:
    # Keras loads here, once the flags are parsed and the config checked: a mistyped flag or a value
    # out of range is answered in a fraction of a second, not after the 3-10 s that loading Keras
    # takes (with TensorFlow, or JAX) on a 2-core CPU.
    from polar_tf import training

    training.train(config, FLAGS.workdir, FLAGS.stage, FLAGS.data_dir, FLAGS.verbose, FLAGS.distribute, FLAGS.export_dir)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
