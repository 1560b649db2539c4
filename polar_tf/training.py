"""Staged training: `train_and_evaluate(config, workdir, stage)` is what train.py calls.

Each epoch is one `model.fit` call on that epoch's permutation of the training set, so the
schedule's switches (saturation, regularizer kind and weight, learning rate) are plain variable
assignments between epochs, the data order depends only on (seed, epoch), and a stage run from
its predecessor's checkpoint trains exactly as it would inside a full run.
"""

from __future__ import annotations

import os
import time
from typing import Any

import keras
import numpy as np
from absl import logging

from polar_tf import adversarial_training, attacks, backend, certified_training, cli, data, export, models, monitoring, parallel, plots, run_dir, schedule
from polar_tf.config import Config

TRAIN_EVAL_EXAMPLES = 10000  # train accuracy of the saturated model is measured on these
FIT_ACCURACY = "fit_accuracy"  # Keras' accuracy metric, as its progress bar and metrics.jsonl name it
CERTIFY_EVAL_EXAMPLES = 1000  # certified test accuracy of certified-training epochs is measured on these


def parse_stages(config: Config, stage: str) -> list[int]:
    """'all' or a stage number, as a list of stages to run."""
    if stage == "all":
        return list(range(1, config.num_stages + 1))
    if stage not in {str(s) for s in range(1, config.num_stages + 1)}:
        choices = "all" if config.num_stages == 1 else "1, 2, 3 or all"
        raise ValueError(f"--stage must be {choices} for model {config.model!r}. Received: stage={stage!r}")
    return [int(stage)]


def _optimizer(model: keras.Model, config: Config, previous: keras.optimizers.Optimizer | None):
    """A fresh Adam built on the model's current trainable variables, carrying over the slot
    variables and iteration count of `previous` where a variable is still trainable.

    This is how a layer is frozen between stages on both backends: Keras' optimizers cannot
    drop a variable once built, and Adam keeps moving a variable with zero gradient.
    """
    optimizer = keras.optimizers.Adam(learning_rate=config.lr, epsilon=config.adam_epsilon)
    optimizer.build(model.trainable_variables)
    if previous is not None:
        old = {v.name: v for v in previous.variables}
        for v in optimizer.variables:
            if v.name != "learning_rate" and v.name in old and tuple(old[v.name].shape) == tuple(v.shape):
                v.assign(old[v.name])
    return optimizer


def _previous_checkpoint(config: Config, workdir: str, stage: int) -> str:
    """The model file stage `stage` > 1 starts from: config.init_from, or the run folder's
    checkpoint of the stage before."""
    if config.init_from:
        if not os.path.isfile(config.init_from):
            raise run_dir.CheckpointError(f"init_from {config.init_from} does not exist")
        return config.init_from
    path = run_dir.checkpoint_path(workdir, config, stage - 1)
    if not os.path.isfile(path):
        raise run_dir.CheckpointError(
            f"--stage={stage} needs the stage-{stage - 1} checkpoint {path}, which does not exist; "
            f"run --stage={stage - 1} first"
        )
    return path


def prepare_stage(config: Config, workdir: str, stage: int) -> keras.Model:
    """The compiled model at the start of `stage`: built (stage 1) or loaded from stage-1's
    checkpoint, with the front end frozen or not as the schedule says."""
    if stage == 1:
        keras.utils.set_random_seed(config.seed)
        model = models.build_model(config)
        previous = None
    else:
        model = run_dir.load_model(_previous_checkpoint(config, workdir, stage))
        _check_same_front_end(model, config)
        previous = model.optimizer
    compile_for_stage(model, config, stage, previous)
    return model


def _check_same_front_end(model: keras.Model, config: Config) -> None:
    """A model loaded to start a stage has the front end `config` describes (init_from may name any file)."""
    frontend = models.get_frontend(model)
    if (frontend is None) != (config.model != "polarized") or (frontend is not None and not np.isclose(frontend.jump, config.jump)):
        found = "no front end" if frontend is None else f"a front end with jump {frontend.jump:g}"
        wanted = f"jump {config.jump:g}" if config.model == "polarized" else "no front end"
        raise ValueError(f"{config.init_from or 'the checkpoint'} has {found}, but the run's config asks for "
                         f"model {config.model!r} with {wanted}")


def compile_for_stage(
    model: keras.Model, config: Config, stage: int, previous: keras.optimizers.Optimizer | None = None
) -> None:
    """Freezes or unfreezes the front end as `stage` requires and compiles the model with an
    Adam that carries over `previous`'s state."""
    first = schedule.phase(config, schedule.stage_epochs(config, stage)[0])
    frontend = models.get_frontend(model)
    if frontend is not None:
        frontend.trainable = first.frontend_trainable
    model.compile(
        optimizer=_optimizer(model, config, previous),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=_fit_metrics(),
        steps_per_execution=config.steps_per_execution,
        jit_compile=config.jit_compile,
    )


def _fit_metrics() -> list[keras.metrics.Metric]:
    # Named apart from the saturated model's train accuracy, which the epoch line also prints:
    # this is the model as trained (the stage's saturation switch), averaged over the epoch.
    return [keras.metrics.SparseCategoricalAccuracy(name=FIT_ACCURACY)]


def apply_phase(model: keras.Model, phase: schedule.Phase) -> None:
    """Sets the schedule's switches for one epoch; takes effect in the compiled step at once."""
    frontend = models.get_frontend(model)
    if frontend is not None:
        frontend.set_saturation(phase.saturate)
        frontend.set_regularizer(phase.regularizer, phase.reg_weight)
    model.optimizer.learning_rate.assign(phase.lr)


def epoch_permutation(config: Config, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([config.seed, epoch]).permutation(n)


def train_epoch(model, config: Config, epoch: int, x: np.ndarray, y: np.ndarray, verbose: int = 0) -> dict:
    """One epoch of the schedule. Returns fit's loss and accuracy (`FIT_ACCURACY`: the model as
    trained, averaged over the epoch's batches), wall time and images/s."""
    phase = schedule.phase(config, epoch)
    apply_phase(model, phase)
    order = parallel.epoch_rows(epoch_permutation(config, epoch, len(x)), config.batch_size)
    x_epoch, y_epoch = x[order], y[order]
    start = time.perf_counter()
    # Adversarial and certified epochs fit a wrapper that shares the model's variables and optimizer.
    fitted, inputs = model, x_epoch
    if config.model == "adversarial":
        steps = -(-len(x_epoch) // parallel.local_batch_size(config.batch_size))
        fitted = adversarial_training.trainer(model, config, epoch, steps, _fit_metrics())
        inputs = adversarial_training.inputs(x_epoch, y_epoch)
    elif phase.certified:
        fitted = certified_training.trainer(model, config, epoch, len(x), _fit_metrics())
    try:
        with cli.interrupts_held() as release:  # Ctrl-C stops fit between batches (cli.interrupts_held)
            history = fitted.fit(
                inputs,
                y_epoch,
                batch_size=parallel.local_batch_size(config.batch_size),
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,
                verbose=verbose,
                callbacks=[keras.callbacks.TerminateOnNaN(raise_error=True),
                           keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: release())],
            )
    except RuntimeError as error:  # TerminateOnNaN's: "NaN or Inf loss encountered at batch N. ..."
        raise FloatingPointError(f"at epoch {epoch}: {error} The checkpoints of earlier epochs are kept.") from None
    seconds = time.perf_counter() - start
    record = _epoch_record(phase, history.history["loss"][-1], history.history[FIT_ACCURACY][-1], seconds, len(x))
    if phase.certified:
        record.update(certified_training.ramp_record(config, epoch, len(x)))
        record[certified_training.VERIFIED_FIT_ACCURACY] = float(history.history[certified_training.VERIFIED_FIT_ACCURACY][-1])
    return record


def _epoch_record(phase: schedule.Phase, loss: float, accuracy: float, seconds: float, images: int) -> dict:
    return {
        "epoch": phase.epoch,
        "stage": phase.stage,
        "lr": phase.lr,
        "regularizer": phase.regularizer,
        "reg_weight": phase.reg_weight,
        "saturate": phase.saturate,
        "loss": float(loss),
        FIT_ACCURACY: float(accuracy),
        "epoch_seconds": seconds,
        "images_per_second": images / seconds,
        "backend": backend.name(),  # where it was trained: a report can set runs of two machines apart
        "device": backend.device_description(),
    }


def adversarial_batch(model, config: Config, x: np.ndarray, y: np.ndarray, noise: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """One batch of adversarial training's PGD inputs, attacked from the host (`attacks.compiled_attack`)
    and checked there: from the random start `noise` (in [-1, 1], shaped like x), `adv_steps` steps
    of `adv_step_size` on the cross-entropy, against the current weights; eps and the step size
    times `scale`. Training computes the same inside its compiled step (`adversarial_training`)."""
    attack = attacks.compiled_attack(model, "ce")
    eps = config.eps * scale
    x_adv, _, _ = attack(x, y, noise, eps, config.adv_step_size * scale, config.adv_steps)
    attacks.check_adversarial(x_adv, x, eps)
    return x_adv


def adversarial_scale(config: Config, epoch: int, batch: int, batches: int) -> float:
    """The fraction of eps that batch `batch` (of `batches`) of `epoch` attacks with
    (`adversarial_training.warmup_scale`)."""
    return float(adversarial_training.warmup_scale(config, epoch * batches + batch, batches))


def _epoch_report(model, config: Config, record: dict, train, test, tensorboard) -> dict[str, Any]:
    """Adds the saturated model's accuracies and the front end's statistics; writes TensorBoard."""
    (x_train, y_train), (x_test, y_test) = train, test
    record["train_accuracy"] = models.accuracy(model, x_train[:TRAIN_EVAL_EXAMPLES], y_train[:TRAIN_EVAL_EXAMPLES])
    record["test_accuracy"] = models.accuracy(model, x_test, y_test)
    if "ibp_eps" in record:
        n = CERTIFY_EVAL_EXAMPLES
        record["certified_test_accuracy"] = certified_training.certified_accuracy(model, x_test[:n], y_test[:n], config.eps)
    histograms, images = {}, {}
    if models.get_frontend(model) is not None:
        z = np.concatenate(list(models.frontend_outputs(model, x_train[: monitoring.MONITOR_EXAMPLES])))
        stats = monitoring.frontend_stats(models.get_frontend(model), z, config.eps)
        b_mean = {"b1": stats["b1_mean"], "b2": stats["b2_mean"]}.get(record["regularizer"], 0.0)
        filters = monitoring.filter_stats(keras.ops.convert_to_numpy(models.get_frontend(model).kernel))
        record.update(stats, **filters, reg_loss=record["reg_weight"] * b_mean)
        histograms["frontend/z"] = z.ravel()
        histograms["frontend/filter_concentrations"] = np.asarray(filters["filter_concentrations"])
        images = monitoring.frontend_images(model)
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
    tensorboard.write(record["epoch"], scalars, histograms, images)
    return record


def epoch_summary(config: Config, record: dict[str, Any], has_frontend: bool) -> str:
    """The epoch's log line, each accuracy named for the model it measures.

    fit_accuracy (the number on Keras' progress bar) is the model as trained: with the stage's
    saturation switch (off in stages 1 and 2) or on PGD inputs, averaged over the epoch's batches
    while the weights move. train acc and test acc are measured after the epoch on the model as
    evaluated: saturated, where there is a front end. A certified-training epoch adds eps and kappa
    of its last batch, the fraction of its batches' images whose bound proved them correct at
    that eps (verified_fit_accuracy) and the certified test accuracy at config.eps.
    """
    if config.model == "adversarial":
        trained_as = "on PGD inputs, "
    elif has_frontend:
        trained_as = "saturated, " if record["saturate"] else "unsaturated, "
    else:
        trained_as = ""
    certified = ""
    if "ibp_eps" in record:
        certified = (
            f"; IBP at eps {record['ibp_eps']:.3f}, kappa {record['ibp_kappa']:.3f}: "
            f"{certified_training.VERIFIED_FIT_ACCURACY} {record[certified_training.VERIFIED_FIT_ACCURACY]:.4f}; "
            f"certified test acc {record['certified_test_accuracy']:.4f} at eps {config.eps:g}"
        )
    return (
        f"epoch {record['epoch']} stage {record['stage']}: loss {record['loss']:.4f}, "
        f"{FIT_ACCURACY} {record[FIT_ACCURACY]:.4f} ({trained_as}mean over the epoch's batches); "
        f"{'saturated model: ' if has_frontend else ''}train acc {record['train_accuracy']:.4f}, "
        f"test acc {record['test_accuracy']:.4f}{certified}; {record['images_per_second']:.0f} img/s"
    )


def _stage_plots(model, config: Config, workdir: str, stage: int, x_train: np.ndarray) -> None:
    frontend = models.get_frontend(model)
    if frontend is None:
        return
    folder = os.path.join(workdir, "plots")
    kernel = keras.ops.convert_to_numpy(frontend.kernel)
    plots.plot_filters(kernel, os.path.join(folder, f"stage{stage}_filters.png"), f"{config.dataset}: filters after stage {stage}")
    counts, edges = monitoring.frontend_histogram(model, x_train)
    plots.plot_histogram(
        counts, edges, frontend.jump, os.path.join(folder, f"stage{stage}_histogram.png"),
        f"{config.dataset}: z over {len(x_train)} training images after stage {stage}",
    )


def _resume(config: Config, workdir: str, stage: int) -> tuple[keras.Model | None, int | None]:
    """Where to pick `stage` up after an interruption.

    Returns (None, None) when the stage is already complete, (model, first epoch to train) when
    an epoch checkpoint lies inside the stage, and (None, first epoch of the stage) otherwise.
    """
    epochs = schedule.stage_epochs(config, stage)
    latest = run_dir.latest_epoch_checkpoint(workdir)
    if latest is not None and latest[0] >= epochs[-1] and os.path.isfile(run_dir.checkpoint_path(workdir, config, stage)):
        return None, None
    if latest is not None and epochs[0] <= latest[0] <= epochs[-1]:
        model = run_dir.load_model(latest[1])
        compile_for_stage(model, config, stage, model.optimizer)
        return model, latest[0] + 1
    return None, epochs[0]


def train_and_evaluate(
    config: Config, workdir: str, stage: str = "all", data_dir: str | None = None, verbose: int = 0,
    distribute: str = "none",
) -> keras.Model | None:
    """Runs the schedule's `stage` ("1", "2", "3" or "all") and writes everything into workdir.

    After every epoch the model and optimizer are saved to workdir/checkpoints/, so the same call
    after an interruption resumes from the last completed epoch (and a completed stage is not
    trained again); since data order depends only on (seed, epoch), it ends where an
    uninterrupted run would.

    Args:
      config: the run's hyperparameters.
      workdir: where config.json, metrics.jsonl, checkpoints, TensorBoard events and plots go.
      stage: which stage(s) to run; stage N > 1 starts from stage N-1's checkpoint in workdir.
      data_dir: folder of IDX files (see `polar_tf.data.load`).
      verbose: Keras' progress output for fit (0 silent, 1 progress bar, 2 one line).
      distribute: "none" (one device) or "data_parallel": each batch of `config.batch_size` split
        across all devices (and hosts), see `polar_tf.parallel`; checkpoints of either kind resume
        under the other.

    Returns:
      The model after the last stage run (loaded from its checkpoint if already complete).
    """
    with parallel.scope(distribute):
        parallel.check_batch_size(config.batch_size)
        if config.model == "adversarial" and backend.process_count() > 1:
            raise ValueError("adversarial training runs on the devices of one host; it does not span several processes")
        return _train_and_evaluate(config, workdir, stage, data_dir, verbose)


def _train_and_evaluate(config: Config, workdir: str, stage: str, data_dir: str | None, verbose: int) -> keras.Model | None:
    stages = parse_stages(config, stage)
    if config.init_from and stages[0] == 1:
        raise ValueError(f"init_from replaces the checkpoint a stage starts from: it needs --stage=2 or 3. "
                         f"Received: stage={stage!r}, init_from={config.init_from!r}")
    if stages[0] > 1:
        _previous_checkpoint(config, workdir, stages[0])  # Fail before loading any data.
    train, test = data.load_dataset(config.dataset, data_dir, config.train_examples)
    run_dir.make_folder(workdir, "workdir")
    run_dir.write_config(workdir, config)
    run_dir.remove_stale_temporaries(workdir)
    metrics = run_dir.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    tensorboard = monitoring.TensorBoard(os.path.join(workdir, "tb"))
    logging.info("Training %s on %s (%d images) in %s, backend %s", config.model, config.dataset,
                 len(train[0]), workdir, keras.backend.backend())
    model = None
    try:
        for s in stages:
            model, first = _resume(config, workdir, s)
            if first is None:
                logging.info("Stage %d is already complete in %s; skipping it", s, workdir)
                model = None
                continue
            if model is None:
                model = prepare_stage(config, workdir, s)
                if s == 1 and (frontend := models.get_frontend(model)) is not None:
                    run_dir.save_filters(workdir, 0, keras.ops.convert_to_numpy(frontend.kernel))
            else:
                logging.info("Resuming stage %d at epoch %d", s, first)
            metrics.truncate_from(first)
            for epoch in range(first, schedule.stage_epochs(config, s).stop):
                record = train_epoch(model, config, epoch, *train, verbose=verbose)
                record = _epoch_report(model, config, record, train, test, tensorboard)
                metrics.append(record)
                run_dir.save_epoch_checkpoint(model, workdir, epoch)
                if (frontend := models.get_frontend(model)) is not None:
                    run_dir.save_filters(workdir, epoch + 1, keras.ops.convert_to_numpy(frontend.kernel))
                logging.info("%s", epoch_summary(config, record, models.get_frontend(model) is not None))
            # The stage's checkpoint last: it marks the stage complete (`_resume`), so a stop
            # while plotting leaves the stage to be finished, plots and all, by the next call.
            _stage_plots(model, config, workdir, s, train[0])
            run_dir.save_model(model, run_dir.checkpoint_path(workdir, config, s))
    finally:
        tensorboard.close()
    if model is None:
        model = run_dir.load_model(run_dir.checkpoint_path(workdir, config, stages[-1]))
    return model


def default_workdir(config: Config) -> str:
    """train.py's run folder when none is given: runs/<dataset>_<model>, `_certified` appended for
    certified training."""
    return f"runs/{config.dataset}_{config.model}" + ("_certified" if config.certified_training else "")


def train(config: Config, workdir: str | None = None, stage: str = "all", data_dir: str | None = None,
          verbose: int = 0, distribute: str = "none", export_dir: str | None = None) -> keras.Model | None:
    """train.py: `train_and_evaluate` into `workdir` (default: `default_workdir`), then, if
    `export_dir` is given, the trained model exported there as a TensorFlow SavedModel (an export
    that would fail is refused before training)."""
    if export_dir:
        export.check_export_dir(export_dir)
    model = train_and_evaluate(config, workdir or default_workdir(config), stage, data_dir, verbose, distribute)
    if export_dir:
        export.export_saved_model(model, export_dir)
    return model
