"""Bad input: a one-line error, a non-zero exit, no traceback, and nothing written is lost."""

import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from polar_tf import cli, data, progress, run_dir, training
from polar_tf.config import Config

# Flag checks do not depend on the backend: the command-line cases run once, in the JAX pass, whose
# processes start in about half the time (Keras on JAX imports no TensorFlow: 2.7 s against 5.4 s
# on the 2-core CPU). What concerns TensorFlow itself (its start-up notices, its answer to a
# data-parallel run) runs in the TensorFlow pass.
cli_once = pytest.mark.skipif(keras.backend.backend() != "jax", reason="backend-independent CLI check: the JAX pass's")
tensorflow_once = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's start-up and answers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The commands run as a user runs them: the entry points respect a TF_CPP_MIN_LOG_LEVEL already set,
# and the one the pytest process sets (2) lets TensorFlow's "failed call to cuInit" error through.
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", cli.VERBOSE_ENV)}


def _command(program, *args):
    """`python <program> args` for a script, `python -m <program> args` for a module."""
    if program.endswith(".py"):
        return [sys.executable, os.path.join(ROOT, program), *args]
    return [sys.executable, "-m", program, *args]


def _run(program, *args, env=USER_ENV):
    return subprocess.run(_command(program, *args), capture_output=True, text=True, cwd=ROOT, env=env)


def _train_py(*args, env=USER_ENV):
    return _run("train.py", *args, env=env)


def _last_line(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@cli_once
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dataset=cifar10"], "train.py: error: flag --dataset=cifar10: value should be one of <mnist|fashion_mnist>"),
        (["--model=resnet"], "train.py: error: flag --model=resnet: value should be one of <polarized|baseline|direct_quant|adversarial>"),
        (["--jump=0"], "train.py: error: jump must be in (0, 1). Received: jump=0.0"),
        (["--epochs_per_stage=-1"], "train.py: error: epochs_per_stage must be a positive integer. Received: epochs_per_stage=-1"),
        (["--data_dir=/nonexistent/data"], "train.py: error: data directory '/nonexistent/data' (from --data_dir) does not exist"),
        (["--export_dir=/dev/null/export"], "train.py: error: the folder of export_dir /dev/null is a file, not a folder"),
    ],
)
def test_train_py_rejects_bad_flags(tmp_path, args, expected):
    result = _train_py(f"--workdir={tmp_path}/run", *args)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expected), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")


@tensorflow_once
def test_train_py_refuses_a_data_parallel_run_on_tensorflow(tmp_path):
    result = _train_py(f"--workdir={tmp_path}/run", "--distribute=data_parallel")  # TensorFlow has no keras.distribution
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
    assert result.stderr.startswith("train.py: error: data-parallel runs need the JAX backend")
    assert not os.path.exists(tmp_path / "run")


@cli_once
@pytest.mark.parametrize(
    "program, args, expected",
    [
        ("train.py", ["--datset=mnist"], "train.py: error: Unknown command line flag 'datset'. Did you mean: dataset ?"),
        ("train.py", ["mnist"], "train.py: error: unexpected arguments mnist"),
        ("evaluate.py", ["--loss=hinge"], "evaluate.py: error: flag --loss=hinge: value should be one of <ce|cw>"),
        ("evaluate.py", ["runs/a.keras"], "evaluate.py: error: unexpected arguments runs/a.keras"),
        ("polar_tf.export", ["--export_dir=/nonexistent/export"],
         "polar_tf.export: error: flag --model_path=None: Flag --model_path must have a value other than None."),
        ("polar_tf.export", [],
         "polar_tf.export: error: flag --model_path=None: Flag --model_path must have a value other than None.; "
         "flag --export_dir=None: Flag --export_dir must have a value other than None."),
        ("polar_tf.reproduce", ["--dataset=cifar10"],
         "polar_tf.reproduce: error: flag --dataset=cifar10: value should be one of <all|mnist|fashion_mnist>"),
        ("polar_tf.reproduce", ["--steps=many"],
         "polar_tf.reproduce: error: flag --steps=many: invalid literal for int() with base 10: 'many'"),
    ],
)
def test_every_entry_point_answers_bad_flags_with_one_line(program, args, expected):
    result = _run(program, *args)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected]


@cli_once
@pytest.mark.parametrize(
    "program, args",
    [("train.py", ["--datset=mnist"]), ("train.py", ["--help"]), ("train.py", ["--jump=0"]), ("evaluate.py", ["--loss=hinge"]),
     ("evaluate.py", ["--suite=robustbench"]), ("evaluate.py", ["--eps=1.5"]), ("evaluate.py", ["--suite=adaptive", "--steps=3"])],
)
def test_the_scripts_answer_their_flags_before_loading_keras(program, args):
    # Loading Keras takes 3-10 s on the 2-core CPU (with TensorFlow or JAX): a mistyped flag or --help
    # is answered without it. `-X importtime` lists every module the process imports on stderr;
    # POLAR_TF_VERBOSE keeps cli.quiet_startup from hiding stderr while it imports Keras.
    result = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, program), *args],
                            capture_output=True, text=True, cwd=ROOT, env={**USER_ENV, cli.VERBOSE_ENV: "1"})
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"absl", "polar_tf"} <= imported  # the list is complete enough to show the flag modules
    assert not imported & {"keras", "tensorflow", "jax", "numpy"}, sorted(imported)
    if args == ["--help"]:
        assert "--dataset: <mnist|fashion_mnist>" in result.stdout  # absl's help (it exits 1)
    else:
        assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith(f"{program}: error: ")


@tensorflow_once
@pytest.mark.parametrize(
    "program, args, expected",
    [
        ("train.py", ["--workdir={tmp}/run", "--data_dir=/nonexistent/data"],
         "train.py: error: data directory '/nonexistent/data' (from --data_dir) does not exist"),
        ("evaluate.py", ["--model_path=pretrained/mnist_polarized.keras", "--output_dir={tmp}/out",
                         "--data_dir=/nonexistent/data"],
         "evaluate.py: error: data directory '/nonexistent/data' (from --data_dir) does not exist"),
        ("polar_tf.export", ["--model_path={tmp}/missing.keras", "--export_dir={tmp}/export"],
         "polar_tf.export: error: model {tmp}/missing.keras does not exist (expected a .keras file or a workdir)"),
    ],
)
def test_start_up_is_quiet_by_default(tmp_path, program, args, expected):
    # Without cli.quiet_startup, TensorFlow would print its notices (oneDNN, CUDA, cuInit) before the error.
    result = _run(program, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected.format(tmp=tmp_path)]
    assert os.listdir(tmp_path) == []


def test_quiet_startup_keeps_a_users_log_level_and_steps_aside_when_verbose(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    cli.quiet_startup()
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    monkeypatch.setenv(cli.VERBOSE_ENV, "0")
    cli.quiet_startup()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    cli.quiet_startup()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


@tensorflow_once
def test_verbose_start_up_shows_tensorflows_notices_before_the_error(tmp_path):
    result = _train_py(f"--workdir={tmp_path}/run", "--data_dir=/nonexistent/data", env={**USER_ENV, cli.VERBOSE_ENV: "1"})
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines[-1] == "train.py: error: data directory '/nonexistent/data' (from --data_dir) does not exist"
    assert len(lines) > 1  # TensorFlow 2.21 (pinned) logs its oneDNN and CUDA notices while it loads.


@tensorflow_once
def test_ctrl_c_stops_training_with_one_line_and_status_130_keeping_what_it_wrote(tmp_path, mnist_subset_dir):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        _command("train.py", f"--workdir={workdir}", f"--data_dir={mnist_subset_dir}", "--train_examples=64",
                 "--epochs_per_stage=100", "--verbose=0"),
        cwd=ROOT, env=USER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A runner started in the background (`cmd &`) ignores SIGINT, and its children inherit that:
        # Python would then never raise KeyboardInterrupt. Ctrl-C at a terminal finds SIGINT's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def checkpoints():  # Everything in the folder, temporary files included.
        return sorted((workdir / "checkpoints").iterdir()) if (workdir / "checkpoints").exists() else []

    def complete():
        return [p for p in checkpoints() if p.name.startswith("epoch_") and p.suffix == ".keras"]

    deadline = time.monotonic() + 300
    while not complete() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None and complete(), f"no epoch checkpoint within 300 s (exit status {process.poll()})"
    config = (workdir / "config.json").read_text()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "train.py: interrupted"
    assert (workdir / "config.json").read_text() == config
    assert run_dir.read_config(str(workdir)).epochs_per_stage == 100
    assert complete() and complete() == checkpoints()  # No temporary file left behind.
    for path in complete():
        run_dir.load_model(str(path))  # Complete: each was written atomically.
    epochs = [r["epoch"] for r in run_dir.MetricsLog(str(workdir / "metrics.jsonl")).read()]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 1


@cli_once
def test_train_py_rejects_corrupt_idx(tmp_path, mnist_subset_dir):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in os.listdir(os.path.join(mnist_subset_dir, "mnist")):
        with open(os.path.join(mnist_subset_dir, "mnist", name), "rb") as f:
            blob = f.read()
        (folder / name).write_bytes(blob[:-7] if name.startswith("train-images") else blob)
    line = _last_line(_train_py(f"--workdir={tmp_path}/run", f"--data_dir={tmp_path}"))
    assert line.startswith("train.py: error: ") and "train-images-idx3-ubyte: header says (320, 28, 28)" in line


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_checkpoints(tmp_path, mnist_subset_dir, monkeypatch):
    config = Config(epochs_per_stage=1, train_examples=128)
    workdir = str(tmp_path)
    training.train_and_evaluate(config, workdir, "1", mnist_subset_dir)
    stage1 = os.path.join(workdir, "stage1.keras")
    with open(stage1, "rb") as f:
        stage1_bytes = f.read()

    real_load = data.load_dataset

    def poisoned(*args, **kwargs):
        (x, y), test = real_load(*args, **kwargs)
        x = x.copy()
        x[:] = np.nan
        return (x, y), test

    monkeypatch.setattr(data, "load_dataset", poisoned)
    with pytest.raises(FloatingPointError, match=r"at epoch 1: NaN or Inf loss encountered at batch 0"):
        training.train_and_evaluate(config, workdir, "2", mnist_subset_dir)
    with open(stage1, "rb") as f:
        assert f.read() == stage1_bytes
    assert run_dir.latest_epoch_checkpoint(workdir)[0] == 0
    assert [r["epoch"] for r in run_dir.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()] == [0]
    assert not os.path.exists(os.path.join(workdir, "stage2.keras"))


@pytest.fixture(scope="module")
def wrong_shape_model(tmp_path_factory):
    inputs = keras.Input((14, 14, 1))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    path = str(tmp_path_factory.mktemp("wrong") / "wrong.keras")
    run_dir.save_model(model, path)
    return path


@cli_once
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--eps=-0.1"], "eps must be in [0, 1]. Received: eps=-0.1"),
        (["--eps=1.5"], "eps must be in [0, 1]. Received: eps=1.5"),
        (["--steps=0"], "steps must be a positive integer. Received: steps=0"),
        (["--restarts=-2"], "restarts must be a positive integer. Received: restarts=-2"),
        (["WRONG_SHAPE"], "maps (14, 14, 1) to (10,); expected images (28, 28, 1) to 10 logits"),
        (["--suite=adaptive", "--loss=cw", "--steps=3"], "--steps, --loss do not apply to --suite=adaptive (it runs "
                                                          "every attack; its PGD takes --pgd_steps and --pgd_restarts)"),
        (["--apgd_iterations=3"], "--apgd_iterations do not apply to --suite=standard (they are the adaptive suite's settings)"),
    ],
)
def test_evaluate_py_rejects_bad_input_and_keeps_earlier_results(tmp_path, wrong_shape_model, args, expected):
    earlier = tmp_path / "results.json"
    earlier.write_text('{"kept": true}\n')
    model = wrong_shape_model if args == ["WRONG_SHAPE"] else os.path.join(ROOT, "pretrained", "mnist_polarized.keras")
    flags = [a for a in args if a != "WRONG_SHAPE"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--model_path={model}", f"--output_dir={tmp_path}",
         "--num_examples=10", *flags],
        capture_output=True, text=True, cwd=ROOT,
    )
    if args == ["WRONG_SHAPE"]:
        expected = f"model {model} {expected}"
    assert _last_line(result) == f"evaluate.py: error: {expected}"
    assert earlier.read_text() == '{"kept": true}\n'


def test_ctrl_c_that_python_drops_in_a_destructor_is_delivered_again(monkeypatch, capsys):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # run_main keeps its hook after Ctrl-C.

    class CutOff:
        def __del__(self):
            raise KeyboardInterrupt  # As if Ctrl-C landed in a destructor: Python prints and drops it.

    def body():
        CutOff()
        time.sleep(30)  # The interrupt sent again arrives here.
        raise AssertionError("the interrupt was lost")

    previous, bars = signal.signal(signal.SIGINT, signal.default_int_handler), progress.enabled()  # As at a terminal.
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run_main("prog", body)
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.enable(bars)  # run_main turns the progress bars on.
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "prog: interrupted\n"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_that_a_c_extension_turns_into_its_own_error_is_reported_as_the_interrupt(
        monkeypatch, capsys, signum, code):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # run_main keeps its hook after Ctrl-C.

    def body():
        try:
            os.kill(os.getpid(), signum)
            time.sleep(30)
        except KeyboardInterrupt:  # As matplotlib's path code does with an interrupt in its callback:
            raise ValueError("Invalid affine transformation matrix") from None
        raise AssertionError("the signal did not interrupt")

    previous, bars = signal.signal(signal.SIGINT, signal.default_int_handler), progress.enabled()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run_main("prog", body)
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.enable(bars)
    assert exit_.value.code == code
    assert capsys.readouterr().err == "prog: interrupted\n"


def test_an_error_without_an_interrupt_is_still_an_error(capsys):
    def body():
        raise ValueError("Invalid affine transformation matrix")

    bars = progress.enabled()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run_main("prog", body)
    finally:
        progress.enable(bars)
    assert exit_.value.code == "prog: error: Invalid affine transformation matrix"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_during_fit_waits_for_the_end_of_a_batch(monkeypatch, capsys, signum, code):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # run_main keeps its hook after Ctrl-C.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((40, 4), np.float32), np.zeros((40, 2), np.float32)
    ends = []

    def batch_end(batch, logs):
        if batch == 1:
            os.kill(os.getpid(), signum)
            time.sleep(0.5)  # Python runs a signal's handler here, between two bytecodes: it holds it.
        ends.append(batch)

    def body():
        with cli.interrupts_held() as release:
            model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[
                keras.callbacks.LambdaCallback(on_train_batch_end=batch_end),
                keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: release())])
        raise AssertionError("the interrupt was lost")

    previous, bars = signal.signal(signal.SIGINT, signal.default_int_handler), progress.enabled()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run_main("prog", body)
        # The handlers are back: outside fit, an interrupt raises at once.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.enable(bars)
    assert exit_.value.code == code
    assert ends == [0, 1]  # batch 1's callback ran to its end; the release after it stopped fit
    assert capsys.readouterr().err == "prog: interrupted\n"


def test_held_interrupts_run_their_handler_once_when_released_or_at_the_end():
    class Delivered(Exception):
        pass

    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise Delivered

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Delivered):
            with cli.interrupts_held() as release:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                calls.append("held")
                release()
        assert calls == ["held", signal.SIGTERM]  # once, when released
        with pytest.raises(Delivered):
            with cli.interrupts_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                calls.append("held")
        assert calls == ["held", signal.SIGTERM] * 2  # at the end of the block
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupt_held_while_the_block_fails_is_still_delivered():
    class Delivered(Exception):
        pass

    def handler(signum, frame):
        raise Delivered

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Delivered) as raised:
            with cli.interrupts_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                raise ValueError("an error of the block's own")
        assert isinstance(raised.value.__context__, ValueError)
    finally:
        signal.signal(signal.SIGTERM, previous)
