"""Tests of polar_tf.reproduction_report: the Markdown of a reproduction's report and README blocks."""

import dataclasses

import pytest

from polar_tf import adaptive, evaluation, report, reproduction_report, reproduction_results, run_dir
from polar_tf.config import Config


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
    row = ("| fashion_mnist | fashion_seed1/stage3 | the paper's schedule | 1 | 0.2 | 3 | 5.0% | 87.30 (+0.0) | 50.00 (-19.4) | 25.00 (-29.9) "
           "| 20.00 (-24.5) | 12.50 (reduced budgets) |")
    assert row in text.splitlines()
    assert ("- `python evaluate.py --suite=adaptive` (1000 test images, budgets REDUCED (Square 1000 queries of 5000; an "
            "earlier suite: no APGD-T, Square with p_init 0.05 on a rescaled schedule), 12 s; backend tensorflow, "
            "device CPU; adaptive/results.md)") in text
    assert "- `python evaluate.py --x` (1000 test images, budgets REDUCED (2 restarts of 20), 12 s;" in text
    assert reproduction_report.further_markdown(reproduction_results.further_runs(()), str(tmp_path)) == ""
    with pytest.raises(ValueError, match="results folders of evaluate.py"):
        reproduction_results.further_runs((str(tmp_path / "runs"),))


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
             "config": dataclasses.asdict(evaluation.EvalConfig(certify=True, pgd_examples=100)),
             "models": [{"path": runs["ibp"], "label": "ibp/stage3", "clean_accuracy": 0.98,
                         "accuracy": {"fgsm": 0.95, "bim": 0.93, "pgd": 0.92}, "certified": certified},
                        {"path": runs["plain"], "label": "plain/stage3", "clean_accuracy": 0.99,
                         "accuracy": {"fgsm": 0.9, "bim": 0.8, "pgd": 0.75},
                         "certified": [{"eps": 0.3, "certified_accuracy": {"interval_from_frontend": 0.0}}]}]}
    # The adaptive suite on the first 200 images, certified there too (85%: below its 90% worst case).
    suite = {**common, "num_examples": 200, "command": "python evaluate.py --suite=adaptive",
             "output_dir": str(tmp_path / "adaptive"), "suite": "adaptive", "config": dataclasses.asdict(adaptive.AdaptiveConfig()),
             "models": [{"path": runs["ibp"], "label": "ibp/stage3", "clean_accuracy": 0.98, "worst_case_accuracy": 0.9,
                         "certified": [{"eps": 0.3, "certified_accuracy": {"interval_from_frontend": 0.85}}]}]}
    for name, results in (("table", table), ("adaptive", suite)):
        run_dir.write_json(str(tmp_path / name / "results.json"), results)
    text = reproduction_report.certified_markdown(reproduction_results.further_runs((str(tmp_path / "table"), str(tmp_path / "adaptive"))),
                                        str(tmp_path))
    rows = text.splitlines()
    assert ("| mnist | 0.3 | ibp/stage3 | IBP, stage 3: eps 0 to 0.3 and kappa 1 to 0.5 over 5 of 20 epochs | 60 | 98.00 | 92.00 "
            "| 90.00 (first 200: 85.00 certified) | 87.50 |") in rows
    assert "| mnist | 0.3 | plain/stage3 | the paper's schedule | 60 | 99.00 | 75.00 | - | 0.00 |" in rows
    assert "- `python evaluate.py --certify` (1000 test images (PGD: the first 100), budgets the paper's, 60 s;" in text
    assert "- `python evaluate.py --suite=adaptive` (200 test images, budgets AutoAttack's, 60 s;" in text
    assert reproduction_report.certified_markdown(reproduction_results.further_runs(()), str(tmp_path)) == ""
    readme = tmp_path / "README.md"
    start, end = reproduction_report.CERTIFIED_README_MARKERS
    readme.write_text(f"# Certified training\n{start}\nold\n{end}\nafter\n")
    assert report.replace_block(str(readme), reproduction_report.CERTIFIED_README_MARKERS, ["new", ""])
    assert readme.read_text() == f"# Certified training\n{start}\nnew\n{end}\nafter\n"
