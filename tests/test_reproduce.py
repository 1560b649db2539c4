"""The reproduction pipeline end to end on a tiny protocol: resumable, report generated from files."""

import dataclasses
import json
import os

import keras
import pytest

from polar_tf import (adaptive, evaluation, report, reproduce, reproduction_protocol, reproduction_report,
                      reproduction_results, run_dir)
from polar_tf.config import Config


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


def test_stage2_trend_is_the_mean_per_epoch_change_over_the_last_epochs_of_stage_2():
    records = [{"stage": 1, "frac_within_eps_of_jump": 0.5}]
    records += [{"stage": 2, "frac_within_eps_of_jump": f} for f in (0.30, 0.20, 0.16, 0.12, 0.10, 0.08)]
    records += [{"stage": 3, "frac_within_eps_of_jump": 0.08}]
    assert reproduction_results.stage2_trend(records) == pytest.approx((0.08 - 0.20) / 4)
    assert reproduction_results.stage2_trend([{"stage": 1, "loss": 0.1}]) is None  # a model without a front end


def test_further_runs_merge_both_suites_by_model_and_report_training_and_paper_differences(tmp_path):
    workdir = tmp_path / "runs" / "fashion_seed1"
    run_dir.write_json(str(workdir / "config.json"),
                        Config(dataset="fashion_mnist", model="polarized", seed=1, epochs_per_stage=1, jump=0.2).to_dict())
    log = run_dir.MetricsLog(str(workdir / "metrics.jsonl"))
    for epoch, frac in enumerate((0.2, 0.1, 0.05)):
        log.append({"epoch": epoch, "stage": epoch + 1, "frac_within_eps_of_jump": frac})
    model = str(workdir / "stage3.keras")
    common = {"dataset": "fashion_mnist", "num_examples": 1000, "total_seconds": 12.0, "backend": "tensorflow", "device": "CPU"}
    table_config = dataclasses.asdict(evaluation.EvalConfig(dataset="fashion_mnist", restarts=2))
    # A suite run before APGD-T: its config has no apgd_target_classes.
    suite_config = {k: v for k, v in dataclasses.asdict(adaptive.AdaptiveConfig(dataset="fashion_mnist",
                    square_queries=1000)).items() if k != "apgd_target_classes"}
    table = {**common, "command": "python evaluate.py --x", "output_dir": str(tmp_path / "table"), "config": table_config,
             "models": [{"path": model, "label": "fashion_seed1/stage3", "clean_accuracy": 0.873,
                         "accuracy": {"fgsm": 0.5, "bim": 0.25, "pgd": 0.2}}]}
    suite = {**common, "command": "python evaluate.py --suite=adaptive", "output_dir": str(tmp_path / "adaptive"),
             "suite": "adaptive", "config": suite_config,
             "models": [{"path": model, "label": "fashion_seed1/stage3", "clean_accuracy": 0.9, "worst_case_accuracy": 0.125}]}
    for name, results in (("table", table), ("adaptive", suite)):
        run_dir.write_json(str(tmp_path / name / "results.json"), results)
    further = reproduction_results.further_runs((str(tmp_path / "table"), str(tmp_path / "adaptive")))
    assert len(further["models"]) == 1
    text = reproduction_report.further_markdown(further, str(tmp_path))
    # The paper's polarized Fashion-MNIST row is 87.3 / 69.4 / 54.9 / 44.5; clean comes from the table, not the suite.
    row = ("| fashion_mnist | fashion_seed1/stage3 | 1 | 0.2 | 3 | 5.0% | 87.30 (+0.0) | 50.00 (-19.4) | 25.00 (-29.9) "
           "| 20.00 (-24.5) | 12.50 (reduced budgets) |")
    assert row in text.splitlines()
    assert ("- `python evaluate.py --suite=adaptive` (1000 test images, budgets REDUCED (Square 1000 queries of 5000; an "
            "earlier suite: no APGD-T, Square with p_init 0.05 on a rescaled schedule), 12 s; backend tensorflow, "
            "device CPU; adaptive/results.md)") in text
    assert "- `python evaluate.py --x` (1000 test images, budgets REDUCED (2 restarts of 20), 12 s;" in text
    assert reproduction_report.further_markdown(reproduction_results.further_runs(()), str(tmp_path)) == ""
    with pytest.raises(ValueError, match="results folders of evaluate.py"):
        reproduction_results.further_runs((str(tmp_path / "runs"),))


def test_a_fresh_checkout_evaluates_the_shipped_model_only_where_its_config_is_the_protocols(tmp_path):
    config = Config(dataset="mnist", model="polarized", epochs_per_stage=1, train_examples=128)
    pretrained, root = tmp_path / "pretrained", tmp_path / "runs"
    stem = str(pretrained / "mnist_polarized")
    run_dir.write_json(stem + ".config.json", config.to_dict())
    run_dir.MetricsLog(stem + ".metrics.jsonl").append({"epoch": 0, "stage": 1, "epoch_seconds": 2.5, "test_accuracy": 0.5})
    (pretrained / "mnist_polarized.keras").write_bytes(b"")
    workdir = str(root / "mnist_polarized")
    assert run_dir.shipped_model(str(pretrained), config, workdir) == stem + ".keras"
    assert run_dir.shipped_model(str(pretrained), config.replace(seed=1), workdir) is None  # trained otherwise
    assert run_dir.shipped_model(None, config, workdir) is None
    assert run_dir.shipped_model(str(pretrained), config.replace(model="baseline"), str(root / "mnist_baseline")) is None
    # How the shipped model was trained is read from the files beside it, for the report.
    summary = reproduction_results.training_summary(stem + ".keras", workdir, str(tmp_path / "results"))
    assert (summary["seed"], summary["epochs"], summary["train_seconds"], summary["figures"]) == (0, 1, 2.5, [])
    assert summary["command"] == ("python train.py --dataset=mnist --model=polarized --epochs_per_stage=1 "
                                  f"--train_examples=128 --workdir={workdir}")
    run_dir.write_config(workdir, config)  # a run of its own (even an unfinished one) is resumed instead
    assert run_dir.shipped_model(str(pretrained), config, workdir) is None


def test_certified_section_puts_each_models_bounds_side_by_side_and_fills_its_readme_block(tmp_path):
    runs = {}
    for name, config in (("ibp", Config(dataset="mnist", model="polarized", certified_training=True,
                                                  ibp_ramp_epochs=5)),
                         ("plain", Config(dataset="mnist", model="polarized"))):
        workdir = tmp_path / "runs" / name
        run_dir.write_json(str(workdir / "config.json"), config.to_dict())
        log = run_dir.MetricsLog(str(workdir / "metrics.jsonl"))
        for epoch in range(config.total_epochs):
            log.append({"epoch": epoch, "stage": 1 + epoch // config.epochs_per_stage})
        runs[name] = str(workdir / "stage3.keras")
    common = {"dataset": "mnist", "eps": 0.3, "num_examples": 1000, "total_seconds": 60.0, "backend": "tensorflow",
              "device": "CPU"}
    certified = [{"eps": 0.3, "certified_accuracy": {"frontend": 0.2, "interval_from_frontend": 0.875}}]
    table = {**common, "command": "python evaluate.py --certify", "output_dir": str(tmp_path / "table"),
             "config": dataclasses.asdict(evaluation.EvalConfig(certify=True)),
             "models": [{"path": runs["ibp"], "label": "ibp/stage3", "clean_accuracy": 0.98,
                         "accuracy": {"fgsm": 0.95, "bim": 0.93, "pgd": 0.92}, "certified": certified},
                        {"path": runs["plain"], "label": "plain/stage3", "clean_accuracy": 0.99,
                         "accuracy": {"fgsm": 0.9, "bim": 0.8, "pgd": 0.75},
                         "certified": [{"eps": 0.3, "certified_accuracy": {"interval_from_frontend": 0.0}}]}]}
    suite = {**common, "command": "python evaluate.py --suite=adaptive", "output_dir": str(tmp_path / "adaptive"),
             "suite": "adaptive", "config": dataclasses.asdict(adaptive.AdaptiveConfig()),
             "models": [{"path": runs["ibp"], "label": "ibp/stage3", "clean_accuracy": 0.98, "worst_case_accuracy": 0.9}]}
    for name, results in (("table", table), ("adaptive", suite)):
        run_dir.write_json(str(tmp_path / name / "results.json"), results)
    text = reproduction_report.certified_markdown(reproduction_results.further_runs((str(tmp_path / "table"), str(tmp_path / "adaptive"))),
                                        str(tmp_path))
    rows = text.splitlines()
    assert ("| mnist | 0.3 | ibp/stage3 | IBP, stage 3: eps 0 to 0.3 and kappa 1 to 0.5 over 5 epochs | 60 | 98.00 | 92.00 "
            "| 90.00 | 87.50 |") in rows
    assert "| mnist | 0.3 | plain/stage3 | the paper's schedule | 60 | 99.00 | 75.00 | - | 0.00 |" in rows
    assert "- `python evaluate.py --certify` (1000 test images, budgets the paper's, 60 s;" in text
    assert reproduction_report.certified_markdown(reproduction_results.further_runs(()), str(tmp_path)) == ""
    readme = tmp_path / "README.md"
    start, end = reproduction_report.CERTIFIED_README_MARKERS
    readme.write_text(f"# Certified training\n{start}\nold\n{end}\nafter\n")
    assert report.replace_block(str(readme), reproduction_report.CERTIFIED_README_MARKERS, ["new", ""])
    assert readme.read_text() == f"# Certified training\n{start}\nnew\n{end}\nafter\n"
