r"""Attacks trained models with FGSM, BIM and PGD; writes a robustness report and the paper's plots.

  python evaluate.py --model_path=pretrained/mnist_polarized.keras --quick   # a first try: about a minute
  python evaluate.py --model_path=runs/mnist_polarized/stage3.keras
  python evaluate.py --model_path=runs/fashion_mnist_polarized --dataset=fashion_mnist \
      --attacks=fgsm,bim,pgd --eps=0.1 --restarts=20 --steps=100
  python evaluate.py --model_path=a.keras,b.keras --dataset=mnist --eps_sweep=0:0.4:0.02 --num_examples=1000
  python evaluate.py --suite=adaptive --model_path=runs/mnist_polarized --transfer_from=runs/mnist_baseline
  KERAS_BACKEND=jax python evaluate.py --model_path=runs/mnist_polarized --distribute=data_parallel  # every GPU

Writes results.json, results.md and PNG figures into --output_dir (default: the first model's
training run folder, or runs/evaluate/<name> for a model outside one, e.g. a shipped one) and
prints the table. --dataset defaults to the dataset the model was trained on (its run's config.json
or the <name>.config.json shipped beside it); another one needs --allow_dataset_mismatch. The
paper's protocol is the default: eps 0.3 (MNIST) or 0.1 (Fashion-MNIST), 100 steps of eps/10, PGD
with 20 restarts, all 10,000 test images; --quick cuts it to a one-minute try (see QUICK).
--suite=adaptive runs `polar_tf.adaptive` instead (FGSM, PGD, APGD-CE/DLR/T per backward pass, Square,
transfer, noise; the per-example worst case; gradient-masking checks) into <output folder>/adaptive/.
Progress bars show each attack's progress; Ctrl-C stops within seconds, keeping finished attacks
in results.partial.json; the same command then continues with the models not finished.

TensorFlow's start-up logs are hidden; POLAR_TF_VERBOSE=1 shows them. Bad flags and values end
with one line `evaluate.py: error: ...` (exit 1), Ctrl-C with `evaluate.py: interrupted` (exit 130).
"""

import sys

from polar_tf import cli

cli.quiet_startup()  # First: TensorFlow logs while it loads, and the imports below load it.

from absl import app, flags  # noqa: E402

from polar_tf import adaptive, attacks, evaluation, parallel, square  # noqa: E402
from polar_tf.config import BACKWARDS  # noqa: E402

FLAGS = flags.FLAGS
PROGRAM = "evaluate.py"


def define_flags() -> None:
    cli.define_data_flags()
    flags.DEFINE_list("model_path", None, "A .keras file or a training workdir; several, comma-separated, are compared.")
    flags.DEFINE_list("attacks", list(attacks.ATTACKS), "Attacks to run: fgsm, bim, pgd.")
    flags.DEFINE_float("eps", None, "L-inf attack size (default 0.3 MNIST, 0.1 Fashion-MNIST).")
    flags.DEFINE_integer("steps", attacks.DEFAULT_STEPS, "Steps of BIM and PGD.")
    flags.DEFINE_float("step_size", None, "Step size of BIM and PGD (default eps / 10).")
    flags.DEFINE_integer("restarts", attacks.DEFAULT_RESTARTS, "Random restarts of PGD.")
    flags.DEFINE_integer("num_examples", 10000, "Attack the first N test images.")
    flags.DEFINE_integer("pgd_examples", None, "PGD attacks only the first N of the --num_examples images (default: all).")
    flags.DEFINE_integer("batch_size", None, "Images per compiled attack call (default: 500 on CPU, 2500 on GPU).")
    flags.DEFINE_string("eps_sweep", None, "Also attack at eps = start:stop:step (stop included), e.g. 0:0.4:0.02.")
    flags.DEFINE_enum("loss", "ce", list(attacks.LOSSES), "Attack loss: ce (cross-entropy) or cw (margin).")
    flags.DEFINE_enum("backward", "identity", list(BACKWARDS), "Gradient through the saturation: identity (BPDA) or smooth.")
    flags.DEFINE_float("steepness", None, "Steepness of the smooth backward pass (default: the model's).")
    flags.DEFINE_bool("certify", False, "Also report certified accuracy (a sound lower bound) at every eps.")
    flags.DEFINE_string("output_dir", None, "Where results and plots go (default: the first model's folder).")
    # --suite=adaptive (polar_tf.adaptive); it reads --eps, --steps, --restarts (PGD), --num_examples,
    # --batch_size, --steepness and --seed too, and ignores --attacks, --loss, --backward, --eps_sweep.
    flags.DEFINE_enum("suite", "standard", ["standard", "adaptive"], "standard: the paper's attacks; adaptive: every attack, worst case, masking checks.")
    flags.DEFINE_list("backwards", list(BACKWARDS), "Adaptive suite: backward passes each gradient attack runs with.")
    flags.DEFINE_integer("apgd_iterations", 100, "Adaptive suite: APGD iterations.")
    flags.DEFINE_integer("apgd_restarts", 1, "Adaptive suite: APGD restarts.")
    flags.DEFINE_integer("apgd_target_classes", 9, "Adaptive suite: APGD-T's target classes (AutoAttack's: 9).")
    flags.DEFINE_integer("square_queries", square.DEFAULT_QUERIES, "Adaptive suite: Square attack query budget per example.")
    flags.DEFINE_float("square_p_init", square.DEFAULT_P_INIT, "Adaptive suite: Square attack initial square size (fraction of pixels).")
    flags.DEFINE_string("transfer_from", None, "Adaptive suite: a model (.keras or workdir) whose PGD examples are transferred.")
    flags.DEFINE_integer("check_examples", 1000, "Adaptive suite: examples of the eps-to-0.5 and doubled-budget checks.")
    flags.DEFINE_bool("quick", False, "Reduced budgets that finish in about a minute on a CPU (a first try, not the "
                      "paper's protocol); explicit flags override them.")
    flags.DEFINE_bool("allow_dataset_mismatch", False, "Evaluate on --dataset even if a model was trained on another.")
    flags.DEFINE_enum("distribute", "none", list(parallel.CHOICES),
                      "data_parallel: split the attacks' and certify's batches across all devices (JAX backend; BUILD.md).")


def main(argv):
    del argv  # cli.flags_parser has rejected positional arguments.

    def body():
        # A model knows its dataset (its run's or shipped config): --dataset only to choose another.
        dataset = evaluation.resolve_dataset(
            FLAGS.model_path or [], FLAGS.dataset if FLAGS["dataset"].present else None, FLAGS.allow_dataset_mismatch
        )
        if FLAGS.quick:
            _apply_quick_preset()
        if FLAGS.suite == "adaptive":
            ignored = [f"--{n}" for n in ("attacks", "loss", "backward", "eps_sweep", "certify", "pgd_examples")
                       if FLAGS[n].present]
            if ignored:
                raise ValueError(f"{', '.join(ignored)} do not apply to --suite=adaptive (it runs every attack)")
            run_adaptive(dataset)
            return
        config = evaluation.EvalConfig(
            dataset=dataset,
            attacks=tuple(FLAGS.attacks),
            eps=FLAGS.eps,
            steps=FLAGS.steps,
            step_size=FLAGS.step_size,
            restarts=FLAGS.restarts,
            num_examples=FLAGS.num_examples,
            pgd_examples=FLAGS.pgd_examples,
            batch_size=FLAGS.batch_size,
            eps_sweep=evaluation.parse_eps_sweep(FLAGS.eps_sweep) if FLAGS.eps_sweep else (),
            loss=FLAGS.loss,
            backward=FLAGS.backward,
            steepness=FLAGS.steepness,
            seed=FLAGS.seed,
            certify=FLAGS.certify,
        )
        results = evaluation.evaluate(
            FLAGS.model_path or [], config, FLAGS.output_dir, FLAGS.data_dir, command=" ".join(["python", *sys.argv])
        )
        print(evaluation.results_markdown(results), end="")
        print(f"\nResults and plots in {results['output_dir']}")

    def distributed_body():
        with parallel.scope(FLAGS.distribute):  # Before the models load: their weights go to every device.
            body()

    cli.run_main(PROGRAM, distributed_body)


# --quick: budgets that finish in about a minute on a 2-core CPU, to try the commands; not the
# paper's protocol (the command line in results.json says --quick). Flags given explicitly win.
QUICK = {
    "standard": {"num_examples": 500, "steps": 20, "restarts": 2},
    "adaptive": {"num_examples": 100, "steps": 20, "restarts": 2, "apgd_iterations": 20, "apgd_target_classes": 3,
                 "square_queries": 500, "check_examples": 100},
}


def _apply_quick_preset() -> None:
    for name, value in QUICK[FLAGS.suite].items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


def run_adaptive(dataset: str) -> None:
    config = adaptive.AdaptiveConfig(
        dataset=dataset, eps=FLAGS.eps, num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed, backwards=tuple(FLAGS.backwards), steepness=FLAGS.steepness, pgd_steps=FLAGS.steps,
        pgd_restarts=FLAGS.restarts, apgd_iterations=FLAGS.apgd_iterations, apgd_restarts=FLAGS.apgd_restarts,
        apgd_target_classes=FLAGS.apgd_target_classes,
        square_queries=FLAGS.square_queries, square_p_init=FLAGS.square_p_init, transfer_from=FLAGS.transfer_from,
        check_examples=FLAGS.check_examples,
    )
    results = adaptive.evaluate_adaptive(
        FLAGS.model_path or [], config, FLAGS.output_dir, FLAGS.data_dir, command=" ".join(["python", *sys.argv])
    )
    print(adaptive.results_markdown(results), end="")
    print(f"\nResults in {results['output_dir']}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
