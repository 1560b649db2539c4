r"""Attacks trained models with FGSM, BIM and PGD; writes a robustness report and the paper's plots.

  python evaluate.py --model_path=pretrained/mnist_polarized.keras --quick   # a first try: about a minute
  python evaluate.py --model_path=runs/fashion_mnist_polarized --dataset=fashion_mnist \
      --attacks=fgsm,bim,pgd --eps=0.1 --restarts=20 --steps=100
  python evaluate.py --model_path=a.keras,b.keras --dataset=mnist --eps_sweep=0:0.4:0.02 --num_examples=1000
  python evaluate.py --suite=adaptive --model_path=runs/mnist_polarized --transfer_from=runs/mnist_baseline
  KERAS_BACKEND=jax python evaluate.py --model_path=runs/mnist_polarized --distribute=data_parallel  # every GPU

Writes results.json, results.md and PNG figures into --output_dir (default: the first model's run
folder, or runs/evaluate/<name> for a model outside one) and prints the table. --dataset defaults to
the one the model was trained on (another needs --allow_dataset_mismatch). The default is the
paper's protocol (`EvalConfig`); --quick cuts it to a one-minute try. --suite=adaptive runs
`polar_tf.adaptive` (`AdaptiveConfig`; its PGD: --pgd_steps, --pgd_restarts) into <output folder>/adaptive/.
The setting flags are those configs' fields; one of the other suite is refused (`polar_tf.suites`).
Ctrl-C keeps finished attacks in results.partial.json; the same command then continues (with the
models finished; the adaptive suite also with the attacks finished on the model in progress).
TensorFlow's start-up logs are hidden (POLAR_TF_VERBOSE=1 shows them). Bad flags and values end
with one line `evaluate.py: error: ...` (exit 1), Ctrl-C with `evaluate.py: interrupted` (exit 130).
"""

import sys

from absl import app, flags

from polar_tf import cli
from polar_tf.config import DISTRIBUTIONS
from polar_tf.evaluation_config import FIELDS, SUITES, settings_config

FLAGS = flags.FLAGS
PROGRAM = "evaluate.py"


def define_flags() -> None:
    for config in SUITES.values():
        cli.define_config_flags(config)
    cli.define_data_dir_flag()
    flags.adopt_module_key_flags(cli)  # --help lists them with the flags below
    flags.DEFINE_list("model_path", None, "A .keras file or a training workdir; several, comma-separated, are compared.")
    flags.DEFINE_string("output_dir", None, "Where results and plots go (default: the first model's folder).")
    flags.DEFINE_enum("suite", "standard", list(SUITES), "standard: the paper's attacks; adaptive: every attack, worst case, masking checks.")
    flags.DEFINE_bool("quick", False, "Budgets of a one-minute try on a CPU, not the protocol (flags given win).")
    flags.DEFINE_bool("allow_dataset_mismatch", False, "Evaluate on --dataset even if a model was trained on another.")
    flags.DEFINE_enum("distribute", "none", list(DISTRIBUTIONS),
                      "data_parallel: split the attacks' and certify's batches across all devices (JAX backend; BUILD.md).")


def main(argv):
    del argv  # cli.flags_parser has rejected positional arguments.
    cli.run_main(PROGRAM, evaluate, prepare=checked_settings)


def checked_settings() -> dict:
    """The setting flags given, checked before Keras loads (`evaluation_config.settings_config`)."""
    given = {name: FLAGS[name].value for name in FIELDS if FLAGS[name].present}
    settings_config(FLAGS.suite, given, FLAGS.quick)
    return given


def evaluate(given: dict) -> None:
    # Keras loads here, once the flags are parsed and checked (as in train.py).
    from polar_tf import suites

    suites.run(FLAGS.suite, FLAGS.model_path or [], given, FLAGS.output_dir, FLAGS.data_dir,
               " ".join(["python", *sys.argv]), FLAGS.quick, FLAGS.allow_dataset_mismatch, FLAGS.distribute)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
