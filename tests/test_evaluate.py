"""Tests of polar_tf.evaluation and evaluate.py: settings, the report files, the plots, the CLI."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import matplotlib.image
import numpy as np
import pytest

from polar_tf import (adaptive, attacks, data, evaluation, evaluation_config, models, report, results_dir, results_md,
                      run_dir)
from polar_tf.config import Config
from polar_tf.frontend import PolarizingFrontEnd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_examples=10, steps=2, restarts=2, batch_size=10)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A polarized-model workdir holding a small front-end model with random weights (25 filters,
    a small jump so that gradients flow, a small classifier: quick to compile on JAX too)."""
    folder = str(tmp_path_factory.mktemp("runs") / "mnist_polarized")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    z = PolarizingFrontEnd(filters=25, jump=0.05, saturate=True, name="frontend")(inputs)
    hidden = keras.layers.Conv2D(4, 5, strides=2, activation="relu")(z)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hidden)))
    run_dir.write_config(folder, Config(jump=0.05))
    run_dir.save_model(model, os.path.join(folder, "stage3.keras"))
    return folder


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """A small undefended CNN (random weights) as a .keras file: quick to compile in a subprocess."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 5, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    path = str(tmp_path_factory.mktemp("tiny") / "model.keras")
    run_dir.save_model(model, path)
    return path


def test_parse_eps_sweep():
    sweep = evaluation_config.parse_eps_sweep("0:0.4:0.02")
    assert len(sweep) == 21 and sweep[0] == 0.0 and sweep[-1] == 0.4 and sweep[15] == 0.3
    assert evaluation_config.parse_eps_sweep("0.1:0.1:0.05") == (0.1,)
    assert evaluation_config.parse_eps_sweep("0:0.25:0.1") == (0.0, 0.1, 0.2)
    for bad in ("0:0.4", "a:b:c", "0.3:0.1:0.1", "0:0.4:0", "0:1.5:0.5", "0:0.4:0.1:1"):
        with pytest.raises(ValueError, match="eps_sweep"):
            evaluation_config.parse_eps_sweep(bad)


def test_eval_config_defaults_and_validation():
    config = evaluation.EvalConfig(dataset="fashion_mnist", eps_sweep=(0.2, 0.0))
    assert config.eps == 0.1 and config.steps == 100 and config.restarts == 20
    assert config.eps_values == [0.0, 0.1, 0.2]
    assert config.step_size_at(0.2) == 0.02
    assert evaluation.EvalConfig(step_size=0.05).step_size_at(0.3) == 0.05
    for kwargs, message in (
        (dict(attacks=("fgsm", "cw")), "attacks"),
        (dict(attacks=()), "attacks"),
        (dict(eps=1.5), "eps"),
        (dict(steps=0), "steps"),
        (dict(loss="mse"), "loss"),
        (dict(backward="tanh"), "backward"),
        (dict(dataset="cifar10"), "dataset"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluation.EvalConfig(**kwargs)


def test_model_paths(workdir):
    checkpoint = os.path.join(workdir, "stage3.keras")
    assert run_dir.resolve_model_path(workdir) == checkpoint
    assert run_dir.resolve_model_path(checkpoint) == checkpoint
    assert evaluation.model_dataset(checkpoint) == "mnist"
    assert report.model_label(checkpoint) == "mnist_polarized/stage3"
    with pytest.raises(run_dir.CheckpointError, match="does not exist"):
        run_dir.resolve_model_path(os.path.join(workdir, "missing.keras"))


def test_evaluate_writes_the_report_and_plots(workdir, tmp_path):
    config = evaluation.EvalConfig(eps_sweep=(0.0, 0.1), **SMALL)
    results = evaluation.evaluate([workdir], config, output_dir=str(tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["models"][0]["accuracy"] == results["models"][0]["accuracy"]
    (model,) = results["models"]
    x, y = data.load("mnist", "test")
    loaded = run_dir.load_model(os.path.join(workdir, "stage3.keras"))
    assert model["clean_accuracy"] == models.accuracy(loaded, x[:10], y[:10])
    assert sorted(model["accuracy"]) == ["bim", "fgsm", "pgd"]
    assert len(model["runs"]) == 9  # 3 attacks at eps 0, 0.1 and 0.3
    for run in model["runs"]:
        if run["eps"] == 0:
            assert run["accuracy"] == model["clean_accuracy"]
    # A reported cell is the accuracy on the attack's images: FGSM is deterministic, so redoing it
    # here on the same images in the same batch gives the same images and the same accuracy.
    x_adv = evaluation.run_attack("fgsm", attacks.with_backward(loaded, "identity", None), x[:10], y[:10], 0.3, config)
    assert model["accuracy"]["fgsm"] == float(np.mean(models.correct(loaded, x_adv, y[:10])))
    pgd = [r for r in model["runs"] if r["attack"] == "pgd" and r["eps"] == 0.3][0]
    assert (pgd["steps"], pgd["restarts"], pgd["random_start"]) == (2, 2, True)
    assert pgd["step_size"] == pytest.approx(0.03)
    assert results["backend"] == keras.backend.backend() and results["device"]
    table = (tmp_path / "results.md").read_text()
    assert "| model | clean | FGSM | BIM | PGD |" in table
    assert "| mnist_polarized/stage3 | " in table and "paper: polarizing front end" in table
    assert "## Accuracy (%) against eps" in table
    _check_tables(table)
    assert sorted(results["plots"]) == [
        "accuracy_vs_eps.png", "adversarial_examples.png", "frontend_maps.png", "frontend_maps_attacked.png"
    ]
    for name in results["plots"]:
        image = matplotlib.image.imread(str(tmp_path / name))
        assert image.shape[0] > 200 and image.shape[1] > 200 and np.std(image) > 0


def _check_tables(markdown: str) -> None:
    """Every row of every table in `markdown` has as many cells as its header."""
    tables, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            tables.append(rows)
            rows = []
    assert tables
    for header, separator, *body in tables:
        width = len(header.strip("|").split("|"))
        assert separator == "|---" * width + "|", header
        for row in body:
            assert len(row.strip("|").split("|")) == width, f"{row!r} under {header!r}"


def test_results_md_rows_have_as_many_cells_as_their_header_with_certified_and_paper_rows(workdir, tmp_path):
    config = evaluation.EvalConfig(eps_sweep=(0.1,), certify=True, **SMALL)  # eps 0.3: the paper's rows.
    evaluation.evaluate([workdir], config, output_dir=str(tmp_path))
    table = (tmp_path / "results.md").read_text()
    assert "| model | clean | FGSM | BIM | PGD | certified |" in table
    assert "**Reduced budgets, not the paper's protocol** (2 steps of 100; 2 restarts of 20)" in table
    assert results_md.reduced_budgets(dataclasses.asdict(evaluation.EvalConfig())) == []
    assert "| paper: polarizing front end | 99.10 | 93.20 | 86.50 | 70.80 | - |" in table
    _check_tables(table)


def test_pgd_on_the_first_images_only_and_the_others_on_all(workdir, tmp_path):
    config = evaluation.EvalConfig(**{**SMALL, "batch_size": 4}, pgd_examples=4, certify=True)
    results = evaluation.evaluate([workdir], config, output_dir=str(tmp_path / "subset"))
    (model,) = results["models"]
    examples = {r["attack"]: r["examples"] for r in model["runs"]}
    assert examples == {"fgsm": 10, "bim": 10, "pgd": 4}
    # PGD's accuracy is over its 4 images: the same as attacking only those 4 with the same seed.
    alone = evaluation.evaluate([workdir], dataclasses.replace(config, num_examples=4, pgd_examples=None),
                                output_dir=str(tmp_path / "alone"))
    assert model["accuracy"]["pgd"] == alone["models"][0]["accuracy"]["pgd"]
    assert "on the first 4 images" in results["attacks"]["pgd"]
    table = (tmp_path / "subset" / "results.md").read_text()
    assert "on the first 10 test images (PGD: the first 4)" in table
    _check_tables(table)
    for bad in (0, 11):
        with pytest.raises(ValueError, match="pgd_examples"):
            evaluation.EvalConfig(**SMALL, pgd_examples=bad)


def test_evaluate_rejects_bad_inputs(workdir, tmp_path):
    config = evaluation.EvalConfig(**SMALL)
    with pytest.raises(ValueError, match="required"):
        evaluation.evaluate([], config)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(run_dir.CheckpointError, match="not a .keras file"):
        evaluation.evaluate([str(broken)], config)
    with pytest.raises(ValueError, match="num_examples"):
        evaluation.evaluate([workdir], evaluation.EvalConfig(num_examples=10**6))


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_path=/nonexistent/model.keras"], "does not exist"),  # a user error in the run
        (["--model_path=x.keras", "--loss=mse"], "loss"),  # a flag that absl rejects
    ],
)
def test_cli_errors_are_one_line(args, message):
    done = _run_cli(*args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert _last_line(done.stderr).startswith("evaluate.py: error:") and message in _last_line(done.stderr)


def test_a_model_knows_its_dataset(workdir, tiny_model_path):
    shipped = os.path.join(ROOT, "pretrained", "fashion_mnist_polarized.keras")
    assert evaluation.model_dataset(shipped) == "fashion_mnist"  # its .config.json beside it
    assert evaluation.model_dataset(workdir) == "mnist"  # its run's config.json
    assert evaluation.model_dataset(tiny_model_path) is None
    assert evaluation.resolve_dataset([shipped]) == "fashion_mnist"
    assert evaluation.resolve_dataset([tiny_model_path]) == evaluation.DEFAULT_DATASET
    assert evaluation.resolve_dataset([shipped], "fashion_mnist") == "fashion_mnist"
    with pytest.raises(ValueError, match="trained on fashion_mnist, not mnist.*--allow_dataset_mismatch"):
        evaluation.resolve_dataset([shipped], "mnist")
    assert evaluation.resolve_dataset([shipped], "mnist", allow_mismatch=True) == "mnist"
    with pytest.raises(ValueError, match="different datasets"):
        evaluation.resolve_dataset([shipped, workdir])


def test_default_output_dir_is_never_a_tracked_folder(workdir):
    shipped = os.path.join(ROOT, "pretrained", "fashion_mnist_polarized.keras")
    assert results_dir.default_output_dir(shipped) == os.path.join("runs", "evaluate", "fashion_mnist_polarized")
    assert results_dir.default_output_dir(workdir) == workdir  # beside the model, in its run folder


def test_an_interrupted_evaluation_resumes_with_the_models_it_finished(tmp_path, workdir, tiny_model_path):
    config = evaluation.EvalConfig(attacks=("fgsm",), **SMALL)
    paths = [tiny_model_path, workdir]
    complete = evaluation.evaluate(paths, config, str(tmp_path))
    # What Ctrl-C during the second model leaves: the first model's record (marked, to be recognized).
    first = {**complete["models"][0], "clean_accuracy": -1.0}
    partial = {**complete, "models": [first], "plots": ["model_adversarial_examples.png"], "total_seconds": 100.0,
               "interrupted": True}
    os.remove(tmp_path / "results.json")
    run_dir.write_json(str(tmp_path / results_dir.PARTIAL_RESULTS), partial)
    resumed = evaluation.evaluate(paths, config, str(tmp_path))
    assert resumed["models"][0] == first  # taken over, not evaluated again
    assert resumed["models"][1]["accuracy"] == complete["models"][1]["accuracy"]  # same model, batches and seed
    assert resumed["total_seconds"] > 100.0 and resumed["plots"][:2] == ["accuracy_vs_eps.png", "model_adversarial_examples.png"]
    assert not (tmp_path / results_dir.PARTIAL_RESULTS).exists()  # superseded by results.json
    # A partial run of other settings, or of other models, is not taken over.
    run_dir.write_json(str(tmp_path / results_dir.PARTIAL_RESULTS), partial)
    assert results_dir.finished_results(str(tmp_path), paths, config, partial=True)["models"] == [first]
    for other in (dict(partial, config={**partial["config"], "steps": 3}),
                  dict(partial, models=[{**first, "path": os.path.abspath(workdir)}])):
        run_dir.write_json(str(tmp_path / results_dir.PARTIAL_RESULTS), other)
        assert results_dir.finished_results(str(tmp_path), paths, config, partial=True) is None


def test_finished_results_match_models_relative_to_the_results_folder(tmp_path):
    """Results written in a checkout elsewhere (a GPU machine's) match the same models here."""
    config = evaluation.EvalConfig(dataset="mnist", num_examples=20)
    output_dir = str(tmp_path / "results" / "full_protocol" / "mnist_table")
    written = {"config": dataclasses.asdict(config), "output_dir": "/device/checkout/results/full_protocol/mnist_table",
               "models": [{"path": "/device/checkout/pretrained/full_protocol/mnist_baseline.keras"}]}
    run_dir.write_json(os.path.join(output_dir, "results.json"), written)
    here = str(tmp_path / "pretrained" / "full_protocol" / "mnist_baseline.keras")
    assert results_dir.finished_results(output_dir, [here], config)["models"] == written["models"]
    assert results_dir.finished_results(output_dir, [str(tmp_path / "pretrained" / "mnist_baseline.keras")], config) is None
    assert results_dir.finished_results(output_dir, [here], dataclasses.replace(config, num_examples=10)) is None
    assert results_dir.finished_results(output_dir, [here], config, partial=True) is None  # no partial results there
    # Written before pgd_examples existed: PGD ran on every image, which is what None asks for.
    del written["config"]["pgd_examples"]
    run_dir.write_json(os.path.join(output_dir, "results.json"), written)
    assert results_dir.finished_results(output_dir, [here], config) is not None
    assert results_dir.finished_results(output_dir, [here], dataclasses.replace(config, pgd_examples=10)) is None
    # The adaptive suite's transfer source likewise, though its config holds it as given (here: relative).
    suite = adaptive.AdaptiveConfig(dataset="mnist", transfer_from="pretrained/full_protocol/mnist_baseline.keras")
    run_dir.write_json(os.path.join(output_dir, "results.json"), {
        **written, "config": dataclasses.asdict(suite),
        "transfer_from_path": "/device/checkout/pretrained/full_protocol/mnist_baseline.keras"})
    assert results_dir.finished_results(output_dir, [here], dataclasses.replace(suite, transfer_from=here)) is not None
    other = str(tmp_path / "pretrained" / "full_protocol" / "mnist_adversarial.keras")
    assert results_dir.finished_results(output_dir, [here], dataclasses.replace(suite, transfer_from=other)) is None


def test_a_model_replaced_at_the_same_path_is_evaluated_again(tmp_path, tiny_model_path):
    path = str(tmp_path / "model.keras")
    shutil.copyfile(tiny_model_path, path)
    config = evaluation.EvalConfig(attacks=("fgsm",), **SMALL)
    results = evaluation.evaluate([path], config, output_dir=str(tmp_path / "out"))
    assert results["models"][0]["sha256"] == report.fingerprint(path)
    assert results_dir.finished_results(str(tmp_path / "out"), [path], config) is not None
    other = run_dir.load_model(path)
    other.set_weights([w + 1.0 for w in other.get_weights()])
    run_dir.save_model(other, path)
    assert results_dir.finished_results(str(tmp_path / "out"), [path], config) is None


def test_interrupt_keeps_finished_attacks_and_the_earlier_results(tmp_path):
    (tmp_path / "results.json").write_text('{"complete": true}')
    results = {"models": [{"label": "a", "accuracy": {"fgsm": 0.5}}]}
    runs = [{"attack": "fgsm", "eps": 0.3, "accuracy": 0.25}]
    with pytest.raises(KeyboardInterrupt, match="results.partial.json"):
        with results_dir.keep_on_interrupt(str(tmp_path), results, {"label": "b", "runs": runs}):
            raise KeyboardInterrupt
    partial = json.loads((tmp_path / results_dir.PARTIAL_RESULTS).read_text())
    assert partial["interrupted"] and partial["models"] == results["models"]
    assert partial["unfinished_model"] == {"label": "b", "runs": runs}
    assert json.loads((tmp_path / "results.json").read_text()) == {"complete": True}


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
def test_ctrl_c_stops_an_evaluation_within_seconds_keeping_the_finished_attacks(tmp_path):
    shipped = os.path.join(ROOT, "pretrained", "mnist_polarized.keras")
    (tmp_path / "results.json").write_text('{"earlier": true}')
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--model_path={shipped}", "--attacks=fgsm,pgd",
         "--num_examples=500", f"--output_dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A runner started in the background (`cmd &`) ignores SIGINT, and its children inherit that:
        # Python would then never raise KeyboardInterrupt. Ctrl-C at a terminal finds SIGINT's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:  # The progress bars' titles: FGSM has finished when PGD starts.
        if line.startswith("pgd eps=0.3"):
            break
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    # PGD runs in compiled calls of a few seconds on the CPU; generous for a loaded machine.
    assert time.monotonic() - sent < 60
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    partial_path = tmp_path / results_dir.PARTIAL_RESULTS
    assert stderr.splitlines()[-1] == f"evaluate.py: interrupted; finished attacks kept in {partial_path}"
    partial = json.loads(partial_path.read_text())
    assert [run["attack"] for run in partial["unfinished_model"]["runs"]] == ["fgsm"]
    assert json.loads((tmp_path / "results.json").read_text()) == {"earlier": True}
