"""Tests of polar_tf.results_md: the Markdown tables of results.md."""

import dataclasses

from conftest import check_tables
from polar_tf import adaptive, evaluation, results_md

SMALL = dict(num_examples=10, steps=2, restarts=2, batch_size=10)


def test_results_md_rows_have_as_many_cells_as_their_header_with_certified_and_paper_rows(polarized_workdir, tmp_path):
    config = evaluation.EvalConfig(eps_sweep=(0.1,), certify=True, **SMALL)  # eps 0.3: the paper's rows.
    evaluation.evaluate([polarized_workdir], config, output_dir=str(tmp_path))
    table = (tmp_path / "results.md").read_text()
    assert "| model | clean | FGSM | BIM | PGD | certified |" in table
    assert "**Reduced budgets, not the paper's protocol** (2 steps of 100; 2 restarts of 20)" in table
    assert results_md.reduced_budgets(dataclasses.asdict(evaluation.EvalConfig())) == []
    assert "| paper: polarizing front end | 99.10 | 93.20 | 86.50 | 70.80 | - |" in table
    check_tables(table)


def test_adaptive_budgets_below_the_standard_ones_are_named():
    quick = dataclasses.replace(adaptive.AdaptiveConfig(), apgd_target_classes=3)
    assert results_md.adaptive_reduced_budgets(dataclasses.asdict(quick)) == ["APGD-T 3 target classes of 9"]
    assert results_md.adaptive_reduced_budgets(dataclasses.asdict(adaptive.AdaptiveConfig())) == []
