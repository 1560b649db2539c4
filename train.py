r"""Trains a model of the paper with the staged schedule.

  python train.py --dataset=mnist                   # all 3 stages, 60 epochs
  python train.py --dataset=mnist --stage=2         # stage 2 from the stage-1 checkpoint
  python train.py --dataset=fashion_mnist --epochs_per_stage=1 --train_examples=5000
  python train.py --dataset=mnist --certified_training   # stage 3 on the IBP loss: runs/mnist_polarized_certified
  python train.py --dataset=mnist --model=baseline --certified_training
  KERAS_BACKEND=jax python train.py --dataset=mnist --distribute=data_parallel   # every GPU (BUILD.md)

TensorFlow's start-up logs are hidden; POLAR_TF_VERBOSE=1 shows them. Bad flags and values end
with one line `train.py: error: ...` (exit 1), Ctrl-C with `train.py: interrupted` (exit 130).
"""

from polar_tf import cli

cli.quiet_startup()  # First: TensorFlow logs while it loads, and the imports below load it.

import dataclasses  # noqa: E402

from absl import app, flags  # noqa: E402

from polar_tf import parallel, training  # noqa: E402
from polar_tf.config import BACKWARDS, CLASSIFIER_INITS, MODELS, Config  # noqa: E402

FLAGS = flags.FLAGS
_DEFAULT = {field.name: field.default for field in dataclasses.fields(Config)}


def define_flags() -> None:
    cli.define_data_flags()
    flags.DEFINE_enum("model", "polarized", list(MODELS), "Which model to train.")
    flags.DEFINE_enum("stage", "all", ["1", "2", "3", "all"], "Stage to run; N > 1 starts from stage N-1's checkpoint.")
    flags.DEFINE_string("workdir", None, "Run folder (default: runs/<dataset>_<model>).")
    flags.DEFINE_integer("epochs_per_stage", 20, "Epochs per stage (3 stages).")
    flags.DEFINE_integer("batch_size", 64, "Batch size.")
    flags.DEFINE_float("lr", 1e-3, "Adam learning rate (divided by 10 for the last sixth of training).")
    flags.DEFINE_float("adam_epsilon", 1e-8, "Adam's epsilon (PyTorch's default, as in the original).")
    flags.DEFINE_enum("classifier_init", "uniform_fan_in", list(CLASSIFIER_INITS),
                      "Classifier initialisation: PyTorch's default (the original's) or Keras' glorot.")
    flags.DEFINE_float("jump", None, "Saturation jump c (default 0.5 MNIST, 0.3 Fashion-MNIST; 0.2 direct_quant).")
    flags.DEFINE_enum("backward", "identity", list(BACKWARDS), "Gradient of the saturation.")
    flags.DEFINE_float("steepness", 8.0, "Steepness of the smooth backward pass.")
    flags.DEFINE_integer("train_examples", 0, "Use only the first N training images (0: all).")
    flags.DEFINE_float("eps", None, "Attack size of adversarial training (default 0.3 MNIST, 0.1 Fashion-MNIST).")
    flags.DEFINE_integer("adv_steps", 40, "PGD steps per batch of adversarial training.")
    flags.DEFINE_float("adv_step_size", None, "Their size (default eps / 30 * 40 / adv_steps: a reach of 4/3 eps).")
    flags.DEFINE_integer("adv_warmup_epochs", 0, "Epochs over which adversarial training ramps eps up (0: none).")
    flags.DEFINE_float("sigma2", _DEFAULT["sigma2"], "Width of the stage-2 regularizer B2.")
    flags.DEFINE_bool("certified_training", False, "Train stage 3 (one-stage models: every epoch) on the IBP loss.")
    flags.DEFINE_float("ibp_eps", None, "eps the certified loss ramps up to (default: --eps).")
    flags.DEFINE_integer("ibp_warmup_epochs", _DEFAULT["ibp_warmup_epochs"], "Certified epochs at eps 0, kappa 1 before the ramp.")
    flags.DEFINE_integer("ibp_ramp_epochs", None, "Epochs of the eps and kappa ramps (default: half the certified epochs).")
    flags.DEFINE_float("ibp_kappa_final", _DEFAULT["ibp_kappa_final"], "Weight of the clean loss after the ramp.")
    flags.DEFINE_integer("steps_per_execution", 1, "Train steps per compiled call (speed only).")
    flags.DEFINE_string("export_dir", None, "Also write the trained model as a TensorFlow SavedModel here.")
    flags.DEFINE_integer("verbose", 2, "Keras fit output: 0 silent, 1 progress bar, 2 a line per epoch.")
    flags.DEFINE_enum("distribute", "none", list(parallel.CHOICES),
                      "data_parallel: split each batch across all devices and hosts (JAX backend; BUILD.md).")


def main(argv):
    del argv

    def body():
        config = Config(
            dataset=FLAGS.dataset,
            model=FLAGS.model,
            jump=FLAGS.jump,
            backward=FLAGS.backward,
            steepness=FLAGS.steepness,
            epochs_per_stage=FLAGS.epochs_per_stage,
            batch_size=FLAGS.batch_size,
            lr=FLAGS.lr,
            adam_epsilon=FLAGS.adam_epsilon,
            classifier_init=FLAGS.classifier_init,
            seed=FLAGS.seed,
            train_examples=FLAGS.train_examples,
            steps_per_execution=FLAGS.steps_per_execution,
            eps=FLAGS.eps,
            adv_steps=FLAGS.adv_steps,
            adv_step_size=FLAGS.adv_step_size,
            adv_warmup_epochs=FLAGS.adv_warmup_epochs,
            sigma2=FLAGS.sigma2,
            certified_training=FLAGS.certified_training,
            ibp_eps=FLAGS.ibp_eps,
            ibp_warmup_epochs=FLAGS.ibp_warmup_epochs,
            ibp_ramp_epochs=FLAGS.ibp_ramp_epochs,
            ibp_kappa_final=FLAGS.ibp_kappa_final,
        )
        suffix = "_certified" if config.certified_training else ""
        workdir = FLAGS.workdir or f"runs/{config.dataset}_{config.model}{suffix}"
        model = training.train_and_evaluate(
            config, workdir, FLAGS.stage, FLAGS.data_dir, FLAGS.verbose, distribute=FLAGS.distribute
        )
        if FLAGS.export_dir:
            from polar_tf import export  # Lazy: needs TensorFlow.

            export.export_saved_model(model, FLAGS.export_dir)

    cli.run_main("train.py", body)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser("train.py"))
