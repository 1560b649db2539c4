"""Tests of the entry point evaluate.py (the standard suite) run as a program: its table, one-line
errors, the dataset it takes from a model, Ctrl-C. The library it runs is tested in test_evaluation.py,
test_evaluation_config.py, test_results_dir.py, test_results_md.py and test_suites.py."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest

from polar_tf import results_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_cli_runs_and_prints_the_table(tiny_model_path, tmp_path):
    done = _run_cli(
        f"--model_path={tiny_model_path}", "--attacks=fgsm,pgd", "--num_examples=4",
        "--steps=1", "--restarts=1", f"--output_dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| model | clean | FGSM | PGD |" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["attacks"] == ["fgsm", "pgd"] and results["num_examples"] == 4
    assert sorted(results["plots"]) == ["accuracy_vs_eps.png", "adversarial_examples.png"]  # no front end


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="backend-independent CLI glue: once, in the JAX pass (quicker start)")
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_path=/nonexistent/model.keras"], "does not exist"),  # a user error in the run
        ([], "--model_path is required"),
        (["--model_path=x.keras", "--loss=mse"], "loss"),  # a flag that absl rejects
    ],
)
def test_cli_errors_are_one_line(args, message):
    done = _run_cli(*args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert _last_line(done.stderr).startswith("evaluate.py: error:") and message in _last_line(done.stderr)
    assert len(done.stderr.splitlines()) == 1, done.stderr  # no warning before it (of a model's unknown dataset)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="backend-independent CLI glue")
def test_cli_takes_the_dataset_from_a_shipped_model_and_refuses_another(tmp_path):
    shipped = os.path.join(ROOT, "pretrained", "fashion_mnist_polarized.keras")
    done = _run_cli(f"--model_path={shipped}", "--attacks=fgsm", "--num_examples=20", f"--output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "fashion_mnist" and results["eps"] == 0.1
    assert results["models"][0]["clean_accuracy"] >= 0.8  # evaluated on its own dataset
    refused = _run_cli(f"--model_path={shipped}", "--dataset=mnist", "--attacks=fgsm", "--num_examples=20",
                       f"--output_dir={tmp_path / 'other'}")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "was trained on fashion_mnist, not mnist" in _last_line(refused.stderr)
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="backend-independent CLI glue")
# Ctrl-C at a terminal (SIGINT at its default), and SIGTERM to a job started in the background
# (`cmd &`), which ignores SIGINT: Python then never raises KeyboardInterrupt for it.
@pytest.mark.parametrize("signum, sigint", [(signal.SIGINT, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_IGN)])
def test_ctrl_c_stops_an_evaluation_within_seconds_keeping_the_finished_attacks(tmp_path, signum, sigint):
    shipped = os.path.join(ROOT, "pretrained", "mnist_polarized.keras")
    (tmp_path / "results.json").write_text('{"earlier": true}')
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--model_path={shipped}", "--attacks=fgsm,pgd",
         "--num_examples=500", f"--output_dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )
    for line in process.stdout:  # The progress bars' titles: FGSM has finished when PGD starts.
        if line.startswith("pgd eps=0.3"):
            break
    process.send_signal(signum)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    # PGD runs in compiled calls of a few seconds on the CPU; generous for a loaded machine.
    assert time.monotonic() - sent < 60
    assert process.returncode == 128 + signum and "Traceback" not in stderr, stderr[-2000:]
    partial_path = tmp_path / results_dir.PARTIAL_RESULTS
    assert stderr.splitlines()[-1] == f"evaluate.py: interrupted; finished attacks kept in {partial_path}"
    partial = json.loads(partial_path.read_text())
    assert [run["attack"] for run in partial["unfinished_model"]["runs"]] == ["fgsm"]
    assert json.loads((tmp_path / "results.json").read_text()) == {"earlier": True}
