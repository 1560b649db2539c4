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
from polar_tf import adaptive, attacks, models, results_dir, run_dir

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

def _fake_escalation(monkeypatch, n, newly_fooled):
    """A fake Square, recording (queries, examples) per call, and a record function as
    evaluate_model's, whose rounds fool `newly_fooled[round]` of the examples they attack."""
    attacked, runs, correct = [], {}, {}
    monkeypatch.setattr(adaptive, "square", lambda model, x, y, **kwargs: attacked.append((kwargs["queries"], y.size)) or x)

    def record(key, kind, x_adv, seconds, rows=None, base=None, **extra):
        correct[key] = correct[base].copy()
        correct[key][rows[: newly_fooled[len(attacked) - 1]]] = False
        runs[key] = {**extra, "newly_fooled": int(np.sum(~correct[key][rows]))}
    return attacked, runs, correct, record


def test_square_gets_more_queries_only_where_no_certificate_settles_the_example(monkeypatch):
    # Square fooled example 0, which PGD missed: the check doubles its queries on the examples robust
    # so far (1-9), except the certified ones (2-5), which no query can fool.
    n = 10
    x, y = np.zeros((n, 28, 28, 1), np.float32), np.zeros(n, np.int64)
    clean = np.ones(n, bool)
    proven = np.isin(np.arange(n), [2, 3, 4, 5])
    attacked, runs, correct, record = _fake_escalation(monkeypatch, n, [0])  # nothing more fooled: one round
    correct.update({"pgd": np.ones(n, bool), "square": np.arange(n) > 0})
    config = adaptive.AdaptiveConfig(square_queries=100)
    rounds = adaptive._escalate_square(None, x, y, EPS, config, clean, correct, runs, record, lambda key: False, proven)
    assert attacked == [(200, 5)] and rounds == [{"queries": 200, "attacked": 5, "newly_fooled": 0}]
    assert runs["square-x2"]["attacked"] == 5 and "certified examples left out" in runs["square-x2"]["description"]


def test_square_rounds_taken_over_from_an_interrupted_run_are_not_run_again(monkeypatch):
    # Rounds x2 (which fooled 2 of the 9 robust examples) was finished before the interrupt: it is
    # taken over; x4 runs on the 7 examples still robust, fools 1, and x8 runs on 6.
    n = 10
    x, y = np.zeros((n, 28, 28, 1), np.float32), np.zeros(n, np.int64)
    attacked, runs, correct, record = _fake_escalation(monkeypatch, n, [1, 0])
    correct.update({"pgd": np.ones(n, bool), "square": np.arange(n) > 0})
    kept = {"square-x2": ({"queries": 200, "attacked": 9, "newly_fooled": 2}, np.arange(n) > 2)}

    def resume(key):  # as evaluate_model's
        if key in kept:
            runs[key], correct[key] = kept.pop(key)
            return True
        return False
    config = adaptive.AdaptiveConfig(square_queries=100)
    rounds = adaptive._escalate_square(None, x, y, EPS, config, np.ones(n, bool), correct, runs, record, resume,
                                       np.zeros(n, bool))
    assert attacked == [(400, 7), (800, 6)]
    assert rounds == [{"queries": 200, "attacked": 9, "newly_fooled": 2}, {"queries": 400, "attacked": 7, "newly_fooled": 1},
                      {"queries": 800, "attacked": 6, "newly_fooled": 0}]


def test_an_interrupted_model_resumes_with_its_finished_attacks(trained_mlp, mnist_small, monkeypatch):
    """Interrupted in Square's second round, the suite keeps the attacks finished; resumed from
    them, it runs only the rest and gives the uninterrupted run's numbers (one process, the same
    batches: every attack is deterministic)."""
    _, _, x, y = mnist_small
    config = adaptive.AdaptiveConfig(**SMALL)
    masked = small_models.masked(trained_mlp)
    complete = adaptive.evaluate_model(masked, "masked", x, y, config)
    assert "square-x2" in complete["attacks"]  # Square fooled what the gradients missed: it escalated
    real_square, squares, main_attacks, interrupt = adaptive.square, [], [], [2]

    def interrupted_square(*args, **kwargs):
        squares.append(kwargs["queries"])
        if len(squares) == interrupt[0]:
            raise KeyboardInterrupt
        return real_square(*args, **kwargs)
    monkeypatch.setattr(adaptive, "square", interrupted_square)
    progress = {"attacks": {}, "correct": {}}
    with pytest.raises(KeyboardInterrupt):
        adaptive.evaluate_model(masked, "masked", x, y, config, progress=progress)
    kept = list(progress["attacks"])
    assert kept == [k for k in complete["attacks"] if k in adaptive.GRADIENT_ATTACKS or k == "square"]
    progress = json.loads(json.dumps(progress, sort_keys=True))  # as results.partial.json keeps it
    squares.clear()
    interrupt[0] = None
    real_attack = adaptive.run_gradient_attack

    def counted_attack(name, model, xs, ys, eps, config, **overrides):
        if eps == EPS and not overrides:  # the suite's own runs (the checks' use other eps or budgets)
            main_attacks.append(name)
        return real_attack(name, model, xs, ys, eps, config, **overrides)
    monkeypatch.setattr(adaptive, "run_gradient_attack", counted_attack)
    resumed = adaptive.evaluate_model(masked, "masked", x, y, config, progress=progress)
    assert main_attacks == [] and squares == [2 * SMALL["square_queries"] * 2**k for k in range(len(squares))]
    assert resumed["resumed_attacks"] == kept
    assert list(resumed["attacks"]) == list(complete["attacks"])  # in the order they ran
    accuracy = lambda record: {k: run["accuracy"] for k, run in record["attacks"].items()}  # noqa: E731
    assert accuracy(resumed) == accuracy(complete)
    assert resumed["worst_case_accuracy"] == complete["worst_case_accuracy"]
    assert [c["status"] for c in resumed["checks"]] == [c["status"] for c in complete["checks"]]
    assert resumed["checks"][2]["more_queries"] == complete["checks"][2]["more_queries"]


def test_an_interrupted_suite_keeps_the_model_in_progress_in_its_partial_results(trained_mlp, tmp_path, monkeypatch):
    path, out = str(tmp_path / "mlp.keras"), str(tmp_path / "out")
    run_dir.save_model(trained_mlp, path)
    config = adaptive.AdaptiveConfig(**{**SMALL, "num_examples": 30, "check_examples": 30})
    real_square = adaptive.square

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(adaptive, "square", interrupted)
    with pytest.raises(KeyboardInterrupt, match="results.partial.json"):
        adaptive.evaluate_adaptive([path], config, output_dir=out)
    unfinished = json.loads(open(os.path.join(out, results_dir.PARTIAL_RESULTS)).read())["unfinished_model"]
    assert sorted(unfinished["correct"]) == sorted(unfinished["attacks"]) == sorted(adaptive.GRADIENT_ATTACKS)
    monkeypatch.setattr(adaptive, "square", real_square)
    results = adaptive.evaluate_adaptive([path], config, output_dir=out)
    assert results["models"][0]["resumed_attacks"] == list(adaptive.GRADIENT_ATTACKS)
    assert list(results["models"][0]["attacks"])[:6] == [*adaptive.GRADIENT_ATTACKS, "square"]  # in the order they ran
    assert not os.path.exists(os.path.join(out, results_dir.PARTIAL_RESULTS))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="backend-independent glue: once, in the JAX pass")
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
