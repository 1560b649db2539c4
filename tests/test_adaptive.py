"""Tests of polar_tf.adaptive: transfer, the checks passing on an undefended model and flagging a
masked one, and evaluate.py --suite=adaptive (the checks' verdicts on hand-built numbers are in
test_masking_checks.py, APGD and Square alone in test_apgd.py and test_square.py)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import small_models
from polar_tf import adaptive, attacks, models, run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.3
SMALL = dict(num_examples=100, pgd_steps=10, pgd_restarts=2, apgd_iterations=20, square_queries=300,
             check_examples=100)


def test_transfer_from_another_model(trained_mlp, mnist_small):
    x_train, y_train, x, y = mnist_small
    source = small_models.train(small_models.mlp(1), x_train, y_train)
    config = adaptive.AdaptiveConfig(**SMALL)
    x_adv = adaptive.transfer(source, x, y, EPS, config)
    attacks.check_adversarial(x_adv, x, EPS)
    assert models.accuracy(trained_mlp, x_adv, y) < 0.3
    assert models.accuracy(trained_mlp, adaptive.random_noise(x, EPS), y) > 0.5

def test_checks_pass_on_an_honest_model_and_flag_a_masked_one(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    config = adaptive.AdaptiveConfig(**SMALL)
    honest = adaptive.evaluate_model(trained_mlp, "honest", x, y, config)
    status = {c["name"]: c["status"] for c in honest["checks"]}
    assert status["eps_to_half"] == "pass" and status["gradient_free_vs_gradient"] == "pass"
    assert status["noise_vs_attacks"] == "pass" and status["iterative_vs_single_step"] == "pass"
    assert honest["worst_case_accuracy"] <= min(r["accuracy"] for r in honest["attacks"].values())

    fake = adaptive.evaluate_model(small_models.masked(trained_mlp), "masked", x, y, config)
    status = {c["name"]: c["status"] for c in fake["checks"]}
    assert status["gradient_free_vs_gradient"] == "warn"
    assert status["noise_vs_attacks"] == "warn"
    assert fake["attacks"]["fgsm"]["accuracy"] == fake["clean_accuracy"]  # a zero gradient: FGSM is x
    gradient = [r["accuracy"] for r in fake["attacks"].values() if r["attack"] in adaptive.GRADIENT_ATTACKS]
    assert fake["attacks"]["square"]["accuracy"] < min(gradient) - 0.2
    # Square fooled what the gradients missed: it got more queries on the survivors, in rounds
    # that each doubled them, until a round fooled no more or the rounds ran out.
    check = next(c for c in fake["checks"] if c["name"] == "gradient_free_vs_gradient")
    rounds = check["more_queries"]
    assert rounds and [r["queries"] for r in rounds] == [SMALL["square_queries"] * 2 ** (k + 1) for k in range(len(rounds))]
    assert rounds[-1]["newly_fooled"] == 0 or len(rounds) == adaptive.MAX_SQUARE_DOUBLINGS
    for r in rounds:
        key = f"square-x{r['queries'] // SMALL['square_queries']}"
        assert fake["attacks"][key]["accuracy"] <= fake["attacks"]["square"]["accuracy"]
    assert fake["worst_case_accuracy"] <= min(r["accuracy"] for r in fake["attacks"].values())

def test_square_gets_more_queries_only_where_no_certificate_settles_the_example(monkeypatch):
    # Square fooled example 0, which PGD missed: the check doubles its queries on the examples robust
    # so far (1-9), except the certified ones (2-5), which no query can fool.
    n = 10
    x, y = np.zeros((n, 28, 28, 1), np.float32), np.zeros(n, np.int64)
    clean = np.ones(n, bool)
    correct = {"pgd": np.ones(n, bool), "square": np.arange(n) > 0}
    proven = np.isin(np.arange(n), [2, 3, 4, 5])
    attacked = []

    def fake_square(model, x, y, **kwargs):
        attacked.append((kwargs["queries"], y.size))
        return x
    monkeypatch.setattr(adaptive, "square", fake_square)
    recorded = {}

    def record(key, kind, x_adv, seconds, **extra):
        correct[key] = np.ones(n, bool)  # Nothing more fooled: the rounds stop after one.
        recorded[key] = extra
    config = adaptive.AdaptiveConfig(square_queries=100)
    rounds = adaptive._escalate_square(None, x, y, x, EPS, config, clean, correct, record, proven)
    assert attacked == [(200, 5)] and rounds == [{"queries": 200, "attacked": 5, "newly_fooled": 0}]
    assert recorded["square-x2"]["attacked"] == 5 and "certified examples left out" in recorded["square-x2"]["description"]


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="backend-independent glue; saves a JAX start-up")
def test_cli_writes_the_report_with_its_reproducing_command(trained_mlp, tmp_path):
    path = str(tmp_path / "mlp.keras")
    run_dir.save_model(trained_mlp, path)
    out = tmp_path / "out"
    args = [f"--model_path={path}", "--suite=adaptive", "--num_examples=20", "--pgd_steps=2", "--pgd_restarts=1",
            "--apgd_iterations=3", "--square_queries=20", "--check_examples=20", f"--transfer_from={path}",
            f"--output_dir={out}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (model,) = results["models"]
    assert sorted(model["attacks"]) == ["apgd-ce", "apgd-dlr", "apgd-t", "fgsm", "noise", "pgd", "square", "transfer"]
    assert [c["name"] for c in model["checks"]] == [
        "eps_to_half", "more_budget", "gradient_free_vs_gradient", "iterative_vs_single_step", "noise_vs_attacks"
    ]
    assert model["attacks"]["square"]["queries_max"] <= 20
    for flag in ("--suite=adaptive", "--num_examples=20", "--pgd_steps=2", "--pgd_restarts=1", "--apgd_iterations=3",
                 "--square_queries=20", "--check_examples=20", f"--transfer_from={path}", f"--output_dir={out}"):
        assert flag in results["reproduce"]
    assert results["reproduce"] in done.stdout and "| worst case |" in done.stdout
    report = (out / "results.md").read_text()
    assert "Sanity checks" in report
    assert ("**Reduced budgets, not the standard ones** (PGD 2 steps of 100; PGD 1 restarts of 20; APGD 3 iterations "
            "of 100; Square 20 queries of 5000)") in report
