"""Tests of polar_tf.results_dir: where results go, which finished results are taken over, what an interrupt keeps."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from polar_tf import adaptive, evaluation, report, results_dir, run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_examples=10, steps=2, restarts=2, batch_size=10)


def test_default_output_dir_is_never_a_tracked_folder(polarized_workdir):
    shipped = os.path.join(ROOT, "pretrained", "fashion_mnist_polarized.keras")
    assert results_dir.default_output_dir(shipped) == os.path.join("runs", "evaluate", "fashion_mnist_polarized")
    assert results_dir.default_output_dir(polarized_workdir) == polarized_workdir  # beside the model, in its run folder


def test_an_interrupted_evaluation_resumes_with_the_models_it_finished(tmp_path, polarized_workdir, tiny_model_path):
    config = evaluation.EvalConfig(attacks=("fgsm",), **SMALL)
    paths = [tiny_model_path, polarized_workdir]
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
    assert resumed["device"] == complete["device"] and resumed["backend"] == complete["backend"]  # one machine
    assert not (tmp_path / results_dir.PARTIAL_RESULTS).exists()  # superseded by results.json
    # A partial run of other settings, or of other models, is not taken over.
    run_dir.write_json(str(tmp_path / results_dir.PARTIAL_RESULTS), partial)
    assert results_dir.finished_results(str(tmp_path), paths, config, partial=True)["models"] == [first]
    for other in (dict(partial, config={**partial["config"], "steps": 3}),
                  dict(partial, models=[{**first, "path": os.path.abspath(polarized_workdir)}])):
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
    # Written before the adaptive suite could certify: a run without certificates.
    legacy = {key: value for key, value in dataclasses.asdict(suite).items() if key != "certify"}
    run_dir.write_json(os.path.join(output_dir, "results.json"), {**written, "config": legacy})
    assert results_dir.finished_results(output_dir, [here], suite) is not None
    assert results_dir.finished_results(output_dir, [here], dataclasses.replace(suite, certify=True)) is None


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


def test_the_unfinished_model_is_taken_over_only_if_it_is_the_next_model_unchanged(tmp_path, tiny_model_path):
    correct = np.arange(13) % 3 == 0
    assert np.array_equal(results_dir.unpack_correct(results_dir.pack_correct(correct), 13), correct)
    config = adaptive.AdaptiveConfig(num_examples=13)
    path = str(tmp_path / "model.keras")
    shutil.copyfile(tiny_model_path, path)
    unfinished = {"label": "m", "path": path, "sha256": report.fingerprint(path),
                  "attacks": {"fgsm": {"accuracy": 5 / 13}}, "correct": {"fgsm": results_dir.pack_correct(correct)}}
    partial = {"config": dataclasses.asdict(config), "output_dir": str(tmp_path / "out"), "models": [],
               "interrupted": True, "unfinished_model": unfinished}

    def taken_over(partial, paths=(path,)):
        run_dir.write_json(str(tmp_path / "out" / results_dir.PARTIAL_RESULTS), partial)
        return results_dir.unfinished_model(str(tmp_path / "out"), list(paths), config)
    assert taken_over(partial) == unfinished
    assert taken_over(partial, [tiny_model_path]) is None  # another model
    assert taken_over({**partial, "unfinished_model": {**unfinished, "sha256": "0" * 64}}) is None  # replaced since
    assert taken_over({**partial, "unfinished_model": {k: v for k, v in unfinished.items() if k != "correct"}}) is None
    assert taken_over({**partial, "config": {**partial["config"], "num_examples": 12}}) is None


def test_results_finished_on_another_machine_say_where_each_part_ran():
    earlier = {"models": [{}, {}], "backend": "jax", "device": "NVIDIA H200", "versions": {"keras": "3.15.1", "jax": "0.10.2"}}
    results = {"backend": "tensorflow", "device": "CPU: AMD EPYC (2 cores)", "versions": {"keras": "3.15.1", "tensorflow": "2.21.0"}}
    results_dir.merge_environment(earlier, results)
    assert results == {"backend": "jax (the first 2 models), then tensorflow",
                       "device": "NVIDIA H200 (the first 2 models), then CPU: AMD EPYC (2 cores)",
                       "versions": {"keras": "3.15.1", "jax": "0.10.2", "tensorflow": "2.21.0"}}
    same = dict(earlier, models=[{}])
    results_dir.merge_environment(same, same_copy := dict(same))
    assert same_copy == same


def _refused_before_any_attack(monkeypatch, suite, model_path, output_dir, message):
    def attacked(*args, **kwargs):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(evaluation, "_evaluate_model", attacked)
    monkeypatch.setattr(adaptive, "evaluate_model", attacked)
    evaluate = evaluation.evaluate if suite == "standard" else adaptive.evaluate_adaptive
    config = evaluation.EvalConfig(**SMALL) if suite == "standard" else adaptive.AdaptiveConfig(num_examples=10)
    with pytest.raises(OSError, match=message):
        evaluate([model_path], config, output_dir)


@pytest.mark.parametrize("suite", ["standard", "adaptive"])
def test_a_folder_that_cannot_be_made_is_refused_before_any_attack(tmp_path, tiny_model_path, monkeypatch, suite):
    (tmp_path / "file").write_text("")
    _refused_before_any_attack(monkeypatch, suite, tiny_model_path, str(tmp_path / "file" / "results"),
                               r"^output folder .*/file/results cannot be created: Not a directory$")


@pytest.mark.parametrize("suite", ["standard", "adaptive"])
def test_a_read_only_folder_is_refused_before_any_attack(tmp_path, tiny_model_path, monkeypatch, suite):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):
        pytest.skip("this user (root) may write into a read-only folder")
    _refused_before_any_attack(monkeypatch, suite, tiny_model_path, str(read_only), r"^output folder .*/read_only is not writable$")
