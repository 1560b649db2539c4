"""Tests of polar_tf.evaluation: one suite of the paper's attacks on models, its results and figures."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from conftest import check_tables
from polar_tf import attacks, backend, data, evaluation, models, plots, run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_examples=10, steps=2, restarts=2, batch_size=10)


def test_evaluate_writes_the_report_and_plots(polarized_workdir, tmp_path, monkeypatch):
    figures, draw = [], plots.plot_accuracy_vs_eps
    monkeypatch.setattr(plots, "plot_accuracy_vs_eps", lambda *args, **kwargs: figures.append(draw(*args, **kwargs)))
    config = evaluation.EvalConfig(eps_sweep=(0.0, 0.1), **SMALL)
    results = evaluation.evaluate([polarized_workdir], config, output_dir=str(tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["models"][0]["accuracy"] == results["models"][0]["accuracy"]
    (model,) = results["models"]
    x, y = data.load("mnist", "test")
    loaded = run_dir.load_model(os.path.join(polarized_workdir, "stage3.keras"))
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
    assert (results["backend"], results["device"]) == (keras.backend.backend(), backend.device_description())
    table = (tmp_path / "results.md").read_text()
    assert "| model | clean | FGSM | BIM | PGD |" in table
    assert "| mnist_polarized/stage3 | " in table and "paper: polarizing front end" in table
    assert "## Accuracy (%) against eps" in table
    check_tables(table)
    assert sorted(results["plots"]) == [
        "accuracy_vs_eps.png", "adversarial_examples.png", "frontend_maps.png", "frontend_maps_attacked.png"
    ]
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".png")) == sorted(results["plots"])
    # The accuracy-against-eps figure draws the numbers of results.json, each attack from the clean accuracy.
    (figure,) = figures
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    for name in ("fgsm", "bim", "pgd"):
        line = lines[next(label for label in lines if label.split(" (= ")[0] == name.upper())]
        runs = sorted((r["eps"], r["accuracy"]) for r in model["runs"] if r["attack"] == name)
        assert list(line.get_xdata()) == [eps for eps, _ in runs] == [0.0, 0.1, 0.3]
        np.testing.assert_allclose(line.get_ydata(), [100 * accuracy for _, accuracy in runs], rtol=1e-12)


def test_pgd_on_the_first_images_only_and_the_others_on_all(polarized_workdir, tmp_path):
    config = evaluation.EvalConfig(**{**SMALL, "batch_size": 4}, pgd_examples=4, certify=True)
    results = evaluation.evaluate([polarized_workdir], config, output_dir=str(tmp_path / "subset"))
    (model,) = results["models"]
    examples = {r["attack"]: r["examples"] for r in model["runs"]}
    assert examples == {"fgsm": 10, "bim": 10, "pgd": 4}
    # PGD's accuracy is over its 4 images: the same as attacking only those 4 with the same seed.
    alone = evaluation.evaluate([polarized_workdir], dataclasses.replace(config, num_examples=4, pgd_examples=None),
                                output_dir=str(tmp_path / "alone"))
    assert model["accuracy"]["pgd"] == alone["models"][0]["accuracy"]["pgd"]
    assert "on the first 4 images" in results["attacks"]["pgd"]
    table = (tmp_path / "subset" / "results.md").read_text()
    assert "on the first 10 test images (PGD: the first 4)" in table
    check_tables(table)
    for bad in (0, 11):
        with pytest.raises(ValueError, match="pgd_examples"):
            evaluation.EvalConfig(**SMALL, pgd_examples=bad)


def test_evaluate_rejects_bad_inputs(polarized_workdir, tmp_path):
    config = evaluation.EvalConfig(**SMALL)
    with pytest.raises(ValueError, match="required"):
        evaluation.evaluate([], config)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(run_dir.CheckpointError, match="not a .keras file"):
        evaluation.evaluate([str(broken)], config)
    with pytest.raises(ValueError, match="num_examples"):
        evaluation.evaluate([polarized_workdir], evaluation.EvalConfig(num_examples=10**6))


def test_a_model_knows_its_dataset(polarized_workdir, tiny_model_path):
    shipped = os.path.join(ROOT, "pretrained", "fashion_mnist_polarized.keras")
    assert evaluation.model_dataset(shipped) == "fashion_mnist"  # its .config.json beside it
    assert evaluation.model_dataset(polarized_workdir) == "mnist"  # its run's config.json
    assert evaluation.model_dataset(os.path.join(polarized_workdir, "stage3.keras")) == "mnist"  # a checkpoint's too
    assert evaluation.model_dataset(tiny_model_path) is None
    with pytest.raises(run_dir.CheckpointError, match="^model /nonexistent.keras does not exist"):
        evaluation.model_dataset("/nonexistent.keras")  # not a model of unknown dataset
    assert evaluation.resolve_dataset([shipped]) == "fashion_mnist"
    assert evaluation.resolve_dataset([tiny_model_path]) == evaluation.DEFAULT_DATASET
    assert evaluation.resolve_dataset([shipped], "fashion_mnist") == "fashion_mnist"
    with pytest.raises(ValueError, match="trained on fashion_mnist, not mnist.*--allow_dataset_mismatch"):
        evaluation.resolve_dataset([shipped], "mnist")
    assert evaluation.resolve_dataset([shipped], "mnist", allow_mismatch=True) == "mnist"
    with pytest.raises(ValueError, match="different datasets"):
        evaluation.resolve_dataset([shipped, polarized_workdir])
