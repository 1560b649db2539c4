"""The reproduction pipeline end to end on a tiny protocol: resumable, report generated from files."""

import json
import os

import keras
import pytest

from polar_tf import reproduce, reproduction_protocol, reproduction_report, reproduction_results, run_dir


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="one backend suffices for the pipeline")
def test_tiny_reproduction_writes_report_and_pretrained_models_and_resumes(tmp_path, mnist_subset_dir):
    protocol = reproduction_protocol.Protocol(epochs_per_stage=1, train_examples=128, adv_epochs_per_stage=2, adv_steps=2,
                                  num_examples=40, pgd_examples=30, steps=2, restarts=1, sweep_examples=20,
                                  adaptive_examples=20, apgd_iterations=2, square_queries=4)
    assert not protocol.is_paper and reproduction_protocol.Protocol().is_paper
    root, results = str(tmp_path / "runs"), str(tmp_path / "results")
    report, pretrained = str(tmp_path / "REPRODUCTION.md"), str(tmp_path / "pretrained")
    readme = tmp_path / "README.md"
    start, end = reproduction_report.README_MARKERS
    readme.write_text(f"intro\n{start}\nold table\n{end}\nafter\n")
    reproduce.reproduce(["mnist"], protocol, root, mnist_subset_dir, report, pretrained, results, str(readme))
    with open(report) as f:
        text = f.read()
    assert "a REDUCED schedule/protocol" in text
    for row in ("no defense", "adversarial training", "polarizing front end"):
        assert f"| {row} | " in text
    assert "/ 99.40 (" in text and "accuracy_vs_eps.png" in text
    assert "| model | clean | FGSM | BIM | PGD | adaptive | certified |" in text
    assert "## mnist, eps = 0.3, 40 test images (PGD: the first 30; adaptive: the first 20)" in text
    assert "--steps=2 --restarts=1 --num_examples=40 --pgd_examples=30 --certify" in text
    for model in ("baseline", "adversarial", "polarized"):
        assert os.path.isfile(os.path.join(pretrained, f"mnist_{model}.keras"))
        assert os.path.isfile(os.path.join(pretrained, f"mnist_{model}.metrics.jsonl"))
        config = run_dir.read_config(os.path.join(root, f"mnist_{model}"))
        assert config.model == model
        # Only the adversarial model takes the protocol's adversarial epochs and PGD steps.
        expected = (2, 2) if model == "adversarial" else (1, 40)
        assert (config.epochs_per_stage, config.adv_steps) == expected
        assert len(run_dir.MetricsLog(os.path.join(root, f"mnist_{model}", "metrics.jsonl")).read()) == 3 * expected[0]
    with open(os.path.join(results, "mnist_adaptive", "results.json")) as f:
        suite = json.load(f)
    # The adaptive column is the suite's per-example worst case, and the transfer comes from the undefended model,
    # as every evaluation from its copy in pretrained/.
    assert suite["config"]["transfer_from"] == os.path.join(pretrained, "mnist_baseline.keras")
    assert [m["path"] for m in suite["models"]] == [os.path.abspath(os.path.join(pretrained, f"mnist_{m}.keras"))
                                                    for m in ("baseline", "adversarial", "polarized")]
    # Each table says which schedule and budgets its cells come from.
    assert ("Training: REDUCED (baseline 3 epochs of 60, the first 128 training images; adversarial 6 epochs of 60, the "
            "first 128 training images, PGD of 2 steps of 40; polarized 3 epochs of 60, the first 128 training images). "
            "Budgets: table REDUCED (2 steps of 100; 1 restarts of 20); adaptive REDUCED (") in text
    for line, record in zip([l for l in text.splitlines() if l.startswith("| no defense") or l.startswith("| adversarial")
                             or l.startswith("| polarizing")], suite["models"]):
        assert line.split(" | ")[5] == f"{100 * record['worst_case_accuracy']:.2f}"
    # README's marked block now holds the same table; the text around it is kept.
    table_rows = [l for l in text.splitlines() if l.startswith("| no defense")]
    updated = readme.read_text()
    assert updated.startswith(f"intro\n{start}\n") and updated.endswith(f"{end}\nafter\n")
    assert "old table" not in updated and table_rows[0] in updated
    # The polarized model's training figures are copied beside the evaluations and shown.
    assert os.path.isfile(os.path.join(results, "mnist_polarized_training", "stage2_histogram.png"))
    assert "](results/mnist_polarized_training/stage2_histogram.png)" in text
    # Tiny models miss the paper's cells; the report lists what was measured about each of them.
    assert "Cells outside the tolerance" in text
    assert "BIM with the margin loss instead of the cross-entropy leaves" in text
    assert "% on the first 30 images (the cross-entropy takes" in text  # the control runs where PGD does
    with open(os.path.join(results, "mnist_bim_margin", "results.json")) as f:
        assert json.load(f)["num_examples"] == 30
    assert os.path.isfile(os.path.join(results, "mnist_bim_margin", "results.json"))
    assert "- **adversarial training** (" in text and "trained 6 epochs (full schedule: 60); on PGD examples of 2 steps (full: 40)" in text
    # How well it fit its training data at the end, from its own metrics: underfitting shows there.
    last = run_dir.MetricsLog(os.path.join(root, "mnist_adversarial", "metrics.jsonl")).read()[-1]
    assert (f"at its last epoch it classified {100 * last['train_accuracy']:.1f}% of the first 128 training images correctly "
            f"and {100 * last['fit_accuracy']:.1f}% of its PGD training examples (mean over the epoch)") in text
    outputs = [os.path.join(results, f"mnist_{name}", "results.json") for name in reproduction_protocol.EVALUATIONS]
    before = [os.path.getmtime(p) for p in outputs]
    reproduce.reproduce(["mnist"], protocol, root, mnist_subset_dir, report, pretrained, results)  # nothing to redo
    assert [os.path.getmtime(p) for p in outputs] == before

    # Read back from the files only (as another report reads an imported reproduction, by its protocol.json),
    # these results become sections of their own beside another run's.
    full = reproduction_results.full_protocol_sections(results, str(tmp_path / "another_run"), ["mnist", "fashion_mnist"])
    assert full["protocol"] == protocol and full["remaining"] == ["fashion_mnist"] and list(full["results"]) == ["mnist"]
    collected = full["results"]["mnist"]
    assert [collected[k]["models"] for k in reproduction_protocol.EVALUATIONS] == [json.load(open(p))["models"] for p in outputs]
    assert full["title"] == f" ({results})"  # not the paper's protocol: not titled as such
    text = reproduction_report.reproduction_markdown({"mnist": collected}, protocol, str(tmp_path), full)
    assert f"## mnist ({results}), eps = 0.3" in text and "## mnist at a reduced protocol, eps = 0.3" in text
    assert f"Sections titled '({results})' come from the reproduction in `{results}` (a REDUCED protocol" in text
    assert "not yet: fashion_mnist, see BUILD.md" in text
    assert reproduction_report.update_readme(str(readme), {"mnist": collected}, protocol, full)
    assert f"#### mnist ({results}), eps = 0.3" in readme.read_text()
    paper = dict(full, protocol=reproduction_protocol.Protocol(steps_per_execution=32), title=" at the paper's full protocol")
    assert "Sections titled 'at the paper's full protocol' come from" in reproduction_report.reproduction_markdown(
        {"mnist": collected}, protocol, str(tmp_path), paper)


