"""Tests of the adaptive suite: APGD, Square, transfer, the worst case and the masking checks."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import adaptive, apgd, attacks, data, models, runfiles, square

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.3
SMALL = dict(num_examples=100, pgd_steps=10, pgd_restarts=2, apgd_iterations=20, square_queries=300,
             check_examples=100)


def mlp(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


@pytest.fixture(scope="module")
def mnist_small():
    """3000 MNIST training images and the first 100 test images."""
    (x_train, y_train), (x_test, y_test) = data.load_dataset("mnist", train_examples=3000)
    return x_train, y_train, x_test[:100], y_test[:100]


def _train(model, x, y):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained(mnist_small):
    """An undefended MLP trained for a few seconds (~90% on the test images)."""
    x_train, y_train, _, _ = mnist_small
    return _train(mlp(0), x_train, y_train)


def masked(model: keras.Model) -> keras.Model:
    """`model` with its logits rounded to multiples of 0.25 and a zero gradient: masks gradients."""
    inputs = keras.Input((28, 28, 1))
    logits = model(inputs)
    hard = keras.layers.Lambda(lambda z: 0.0 * z + ops.stop_gradient(ops.round(4.0 * z) / 4.0))(logits)
    return keras.Model(inputs, hard)


# Pieces, exact values.


def test_dlr_loss_values_and_invariance():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 2.0, 4.0]], np.float32)
    y = np.array([0, 0], np.int32)
    got = ops.convert_to_numpy(apgd.dlr_loss(logits, y))
    # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): -(1 - 3) / (3 - 1) and -(5 - 4) / (5 - 2).
    np.testing.assert_allclose(got, [1.0, -1.0 / 3.0], rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(apgd.dlr_loss(3.0 * logits + 7.0, y)), got, rtol=1e-5)


def test_dlr_targeted_loss_values_and_invariance():
    logits = np.array([[1.0, 3.0, 2.0, 0.0, -1.0], [5.0, 1.0, 2.0, 4.0, 0.0]], np.float32)
    y, target = np.array([0, 0], np.int32), np.array([2, 3], np.int32)
    got = ops.convert_to_numpy(apgd.dlr_targeted_loss(logits, y, target))
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): -(1 - 2) / (3 - (1 + 0) / 2), -(5 - 4) / (5 - (2 + 1) / 2).
    np.testing.assert_allclose(got, [1.0 / 2.5, -1.0 / 3.5], rtol=1e-6)
    shifted = apgd.dlr_targeted_loss(3.0 * logits + 7.0, y, target)
    np.testing.assert_allclose(ops.convert_to_numpy(shifted), got, rtol=1e-5)


def test_apgd_t_maximizes_the_targeted_loss_towards_the_runner_up(trained, mnist_small):
    """With one target class, APGD-T attacks each example's clean runner-up class: on the examples
    it does not fool, it raised that targeted loss above the clean one, and further than APGD-CE
    (which is not aimed at it) did."""
    _, _, x, y = mnist_small
    correct = models.predict_labels(trained, x) == y
    x, y = x[correct], y[correct]
    runner_up = np.argsort(-trained.predict(x, verbose=0), axis=1)[:, 1]

    def targeted_loss(images):
        return ops.convert_to_numpy(apgd.dlr_targeted_loss(trained.predict(images, verbose=0), y, runner_up))

    eps = 0.05  # small enough that many examples survive
    x_t = apgd.apgd(trained, x, y, eps=eps, iterations=20, loss="dlr-t", target_classes=1)
    x_ce = apgd.apgd(trained, x, y, eps=eps, iterations=20, loss="ce")
    survived = models.predict_labels(trained, x_t) == y
    assert 10 <= survived.sum() < len(y)  # neither vacuous nor toothless
    clean, towards, untargeted = targeted_loss(x)[survived], targeted_loss(x_t)[survived], targeted_loss(x_ce)[survived]
    assert np.all(towards > clean)
    assert towards.mean() > untargeted.mean()


def test_apgd_checkpoints_are_the_papers():
    assert [i + 1 for i, _ in apgd.checkpoints(100)] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert [w for _, w in apgd.checkpoints(100)] == [22, 19, 16, 13, 10, 7, 6, 6]
    assert apgd.checkpoints(5) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]


def test_square_schedule():
    assert square.DEFAULT_P_INIT == 0.8 and square.DEFAULT_QUERIES == 5000  # AutoAttack's standard
    assert square.p_selection(0.8, 0, 5000) == 0.8
    assert square.p_selection(0.8, 10, 5000) == 0.8 and square.p_selection(0.8, 11, 5000) == 0.4
    assert square.p_selection(0.8, 4999, 5000) == 0.8 / 128  # past 4000 of the fixed schedule
    # The reference's rescaled schedule: 6 of 5000 is 12 of 10,000, past 10.
    assert square.p_selection(0.05, 6, 5000, rescale=True) == 0.025
    assert square.p_selection(0.05, 4999, 5000, rescale=True) == 0.05 / 512
    assert square.square_side(0.05, 28, 28) == 6 and square.square_side(1e-6, 28, 28) == 1
    assert square.square_side(1.0, 28, 28) == 27


def test_worst_case_is_exact():
    clean = np.array([1, 1, 1, 1, 0], bool)
    under = {"a": np.array([1, 0, 1, 1, 1], bool), "b": np.array([1, 1, 0, 1, 1], bool),
             "c": np.array([1, 1, 1, 1, 1], bool)}
    np.testing.assert_array_equal(adaptive.worst_case(clean, under), [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(adaptive.worst_case(clean, {}), clean)


def test_check_verdicts_on_hand_built_numbers():
    assert adaptive.check_eps_to_half({0.3: 0.7, 0.5: 0.0}, 1000)["status"] == "pass"
    assert adaptive.check_eps_to_half({0.3: 0.7, 0.5: 0.4}, 1000)["status"] == "warn"
    assert adaptive.check_more_budget(0.5, {"x2": 0.49}, 1000)["status"] == "pass"
    assert adaptive.check_more_budget(0.5, {"x2": 0.3}, 1000)["status"] == "warn"
    square_correct = np.array([0] * 50 + [1] * 50, bool)
    gradient = {"pgd": np.array([1] * 100, bool)}
    check = adaptive.check_gradient_free(square_correct, gradient)
    assert check["status"] == "warn" and check["fooled_only_by_square"] == 50 and "masked" in check["verdict"]
    assert adaptive.check_gradient_free(gradient["pgd"], {"pgd": square_correct})["status"] == "pass"
    # Square no stronger overall, but more queries kept fooling more examples: masked all the same.
    rounds = [{"queries": 600, "attacked": 50, "newly_fooled": 3}, {"queries": 1200, "attacked": 47, "newly_fooled": 0}]
    check = adaptive.check_gradient_free(gradient["pgd"], {"pgd": square_correct}, rounds)
    assert check["status"] == "warn" and "3, 0 more examples fooled at 600, 1200 queries" in check["verdict"]
    assert adaptive.check_gradient_free(gradient["pgd"], {"pgd": square_correct}, rounds[1:])["status"] == "pass"
    assert adaptive.check_iterative({"fgsm": 0.2}, {"pgd": 0.6}, 1000)["status"] == "warn"
    assert adaptive.check_noise(0.9, {"pgd": 0.1, "fgsm": 0.5}, 1000)["status"] == "pass"
    assert adaptive.check_noise(0.9, {"pgd": 0.1, "fgsm": 0.9}, 1000)["status"] == "warn"


# The attacks.


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t", "square"])
def test_new_attacks_drive_an_undefended_model_to_near_zero(trained, mnist_small, name):
    _, _, x, y = mnist_small
    assert models.accuracy(trained, x, y) > 0.85
    if name == "square":
        x_adv = square.square(trained, x, y, eps=EPS, queries=300)
    else:
        loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-t"}[name]
        x_adv = apgd.apgd(trained, x, y, eps=EPS, iterations=20, loss=loss, target_classes=2)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.max(np.abs(x_adv.astype(np.float64) - x)) <= EPS + attacks.INVARIANT_TOLERANCE
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert models.accuracy(trained, x_adv, y) <= 0.05


def test_transfer_from_another_model(trained, mnist_small):
    x_train, y_train, x, y = mnist_small
    source = _train(mlp(1), x_train, y_train)
    config = adaptive.AdaptiveConfig(**SMALL)
    x_adv = adaptive.transfer(source, x, y, EPS, config)
    attacks.check_adversarial(x_adv, x, EPS)
    assert models.accuracy(trained, x_adv, y) < 0.3
    assert models.accuracy(trained, adaptive.random_noise(x, EPS), y) > 0.5


def test_square_respects_its_query_budget(trained, mnist_small):
    _, _, x, y = mnist_small
    x_adv, spent = square.square(trained, x, y, eps=0.03, queries=150, return_queries=True, batch_size=64)
    # Square decides with its own forward pass (batch 64); this one (predict) may round a margin
    # within float noise of 0 the other way: those examples are left out, and must be few.
    margins, decided = {}, np.ones(len(y), bool)
    for name, images in (("clean", x), ("adversarial", x_adv)):
        logits = trained.predict(images, verbose=0)
        margins[name] = ops.convert_to_numpy(square.margin(logits, y))
        decided &= np.abs(margins[name]) > 2 * float_paths.logit_atol(logits)
    assert decided.mean() >= 0.95
    correct, survived = margins["clean"] > 0, margins["adversarial"] > 0
    assert spent.max() <= 150
    np.testing.assert_array_equal(spent[~correct & decided], 1)  # the clean query alone
    np.testing.assert_array_equal(x_adv[~correct & decided], x[~correct & decided])
    assert np.all(spent[survived & decided] == 150) and survived.sum() > 10  # unfooled examples use it all
    assert np.all(spent[correct & ~survived & decided] < 150)


def test_square_proposals_are_per_example():
    rows = np.arange(600)
    for iteration, side in ((0, 6), (7, 3), (120, 1)):
        corners, signs = square.proposals(0, iteration, rows, side, 28, 3)
        assert corners.shape == (600, 2) and signs.shape == (600, 3)
        assert corners.min() >= 0 and corners.max() < 28 - side and set(np.unique(signs)) == {-1.0, 1.0}
        # Any subset of the examples, in any batch, is proposed exactly the same squares.
        part = np.array([3, 255, 256, 257, 599])
        part_corners, part_signs = square.proposals(0, iteration, part, side, 28, 3)
        np.testing.assert_array_equal(part_corners, corners[part])
        np.testing.assert_array_equal(part_signs, signs[part])
    assert not np.array_equal(square.proposals(1, 0, rows, 6, 28, 3)[0], square.proposals(0, 0, rows, 6, 28, 3)[0])


def _square_run(model, x, y, todo, batch_size, queries, eps=0.03):
    return square.Run(model, x, y, todo, eps=eps, queries=queries, p_init=0.05, clip_min=0.0, clip_max=1.0, seed=0,
                      batch_size=batch_size)


def _square_history(run, queries):
    """Per example of the run's `todo`: the images [T, k, ...], margins [T, k] and queries [T, k]
    after the start and each iteration (an example no longer attacked repeats its last state),
    and per iteration the compiled calls made, (rows, shape) each. Checks the run's contract on
    the way: each example yielded from the start, once per iteration without a gap, its last
    state its result."""
    todo, steps = run.todo, queries - 1
    images = np.zeros((steps, todo.size, *run.x.shape[1:]), np.float32)
    margins, spent = np.zeros((steps, todo.size), np.float32), np.zeros((steps, todo.size), np.int64)
    last, calls = np.full(todo.size, -1), [[] for _ in range(steps)]
    for t, rows, state in run:
        at = np.searchsorted(todo, rows)
        np.testing.assert_array_equal(todo[at], rows)
        assert np.all(last[at] == t - 1), t
        last[at] = t
        values = [ops.convert_to_numpy(v) for v in state]
        images[t, at], margins[t, at], spent[t, at] = (v[: len(rows)] for v in values)
        calls[t].append((rows, len(values[1])))
    assert np.all(last >= 0)
    for j in range(todo.size):
        for history in (images, margins, spent):
            history[last[j] + 1 :, j] = history[last[j], j]
    np.testing.assert_array_equal(run.x_best, images[-1])
    np.testing.assert_array_equal(run.margin, margins[-1])
    np.testing.assert_array_equal(run.queries, spent[-1])
    return images, margins, spent, calls


def test_square_layout_takes_few_shapes():
    assert square.layout(0, 100) == []
    assert square.layout(100, 100) == [100] and square.layout(99, 100) == [100]
    assert square.layout(64, 100) == [64] and square.layout(65, 100) == [100] and square.layout(33, 100) == [64]
    assert square.layout(3, 100) == [4] and square.layout(1, 100) == [1]
    assert square.layout(250, 100) == [100, 100, 64] and square.layout(201, 100) == [100, 100, 1]
    sizes = {size for active in range(1, 1001) for size in square.layout(active, 500)}
    assert sizes == {500, 256, 128, 64, 32, 16, 8, 4, 2, 1}


def test_square_computes_only_the_examples_still_attacked(trained, mnist_small):
    """From each copy of the margins to the host (every _SYNC_EVERY iterations) on, the calls
    hold every example not fooled then, in the shapes `layout` gives for as many: the forward
    passes computed come close to the queries used, far below the batch's rows times the
    iterations; the few shapes are traced once."""
    _, _, x, y = mnist_small
    queries, every, batch = 150, square._SYNC_EVERY, 32
    todo = np.flatnonzero(models.predict_labels(trained, x) == y)
    compiled = square.compiled_square(trained)
    traces = compiled.traces
    run = _square_run(trained, x, y, todo, batch, queries, eps=0.2)
    _, margins, spent, calls = _square_history(run, queries)
    assert calls[0] and [size for _, size in calls[0]] == square.layout(todo.size, batch)
    for t in range(1, queries - 1):
        synced = (t - 1) // every * every  # the state whose margins the calls of iteration t - 1 follow
        active = todo[margins[synced] > 0]
        assert [size for _, size in calls[t]] == square.layout(active.size, batch), t
        assert np.all(np.isin(active, np.concatenate([rows for rows, _ in calls[t]] or [[]]))), t
    shapes = {size for call in calls for _, size in call}
    assert len(shapes) >= 3  # the calls did shrink: the test is not vacuous
    assert compiled.traces - traces <= len(shapes) + len({size for _, size in calls[0]})
    computed = sum(size for call in calls for _, size in call)
    assert computed >= np.sum(spent[-1] - 1)  # every query but the clean one is a forward pass
    assert computed < 0.5 * len(calls[0]) * batch * (queries - 1)
    # The same run again: no shape is new, and nothing differs (the same shapes in one process).
    traces = compiled.traces
    again = _square_run(trained, x, y, todo, batch, queries, eps=0.2)
    np.testing.assert_array_equal(_square_history(again, queries)[1], margins)
    assert compiled.traces == traces


def test_square_batch_sizes_differ_only_at_near_ties(trained, mnist_small):
    """The squares proposed do not depend on the batch size; whether one is accepted compares two
    margins, which another batch shape may round differently in the last bits (oneDNN, XLA). So
    the runs at batch sizes 64 and 100 (each re-packed into smaller calls, at other times, as
    examples are fooled) must agree exactly until an accept decision where the two
    margins were within that float noise, or where an example's margin was within it of 0 (one
    run stops attacking it), and from there on the example may follow another path."""
    _, _, x, y = mnist_small
    queries = 150
    todo = np.flatnonzero(models.predict_labels(trained, x) == y)
    x_a, m_a, q_a, _ = _square_history(_square_run(trained, x, y, todo, 64, queries), queries)
    x_b, m_b, q_b, _ = _square_history(_square_run(trained, x, y, todo, 100, queries), queries)
    # The noise: margins of the same images (every state of run a) at the two batch shapes.
    images = x_a.reshape(-1, *x.shape[1:])
    labels = np.tile(y[todo], queries - 1)
    logits = [trained.predict(images, batch_size=b, verbose=0) for b in (64, 100)]
    margins = [ops.convert_to_numpy(square.margin(z, labels)) for z in logits]
    measured = np.max(np.abs(margins[0] - margins[1]))
    # 4x the measured difference, and never below a few float32 ulps of the logits' size.
    noise = max(4 * float(measured), 1e-5 * max(1.0, float(np.abs(logits[0]).max())))
    np.testing.assert_array_equal(x_a[0], x_b[0])  # the stripes start: no decision yet
    same = np.all(x_a == x_b, axis=(2, 3, 4))  # [T, k]
    diverged = 0
    for k in np.flatnonzero(~same.all(axis=0)):
        t = int(np.argmin(same[:, k]))  # the first state that differs: decided at iteration t - 1
        before = [m_a[t - 1, k], m_b[t - 1, k]]
        drop = max(m_a[t - 1, k] - m_a[t, k], m_b[t - 1, k] - m_b[t, k])  # the accepting run's gain
        assert drop <= 2 * noise or min(np.abs(before)) <= noise, (k, t, before, drop, noise)
        diverged += 1
    undiverged = same.all(axis=0)
    np.testing.assert_array_equal(q_a[:, undiverged], q_b[:, undiverged])
    np.testing.assert_array_equal(m_a[:, undiverged] > 0, m_b[:, undiverged] > 0)
    assert diverged <= 0.05 * len(todo)  # near-ties are rare: the comparison is not vacuous


def test_eps_zero_returns_x_and_apgd_traces_once(trained, mnist_small):
    _, _, x, y = mnist_small
    np.testing.assert_array_equal(apgd.apgd(trained, x, y, eps=0.0, iterations=3), x)
    np.testing.assert_array_equal(square.square(trained, x, y, eps=0.0, queries=10), x)
    model = mlp(2)  # fresh: counts its own traces
    model.set_weights(trained.get_weights())
    compiled = apgd.compiled_apgd(model, "ce")
    apgd.apgd(model, x, y, eps=0.1, iterations=3, restarts=3, batch_size=40)
    # Start and iteration, one batch shape: the last batch and later restarts (fewer examples) padded.
    assert compiled.traces == 2
    with pytest.raises(ValueError, match="loss"):
        apgd.apgd(model, x, y, eps=0.1, loss="cw")
    with pytest.raises(ValueError, match="queries"):
        square.square(model, x, y, eps=0.1, queries=1)


# The suite and its checks.


def test_checks_pass_on_an_honest_model_and_flag_a_masked_one(trained, mnist_small):
    _, _, x, y = mnist_small
    config = adaptive.AdaptiveConfig(**SMALL)
    honest = adaptive.evaluate_model(trained, "honest", x, y, config)
    status = {c["name"]: c["status"] for c in honest["checks"]}
    assert status["eps_to_half"] == "pass" and status["gradient_free_vs_gradient"] == "pass"
    assert status["noise_vs_attacks"] == "pass" and status["iterative_vs_single_step"] == "pass"
    assert honest["worst_case_accuracy"] <= min(r["accuracy"] for r in honest["attacks"].values())

    fake = adaptive.evaluate_model(masked(trained), "masked", x, y, config)
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


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="backend-independent glue; saves a JAX start-up")
def test_cli_writes_the_report_with_its_reproducing_command(trained, tmp_path):
    path = str(tmp_path / "mlp.keras")
    runfiles.save_model(trained, path)
    out = tmp_path / "out"
    args = [f"--model_path={path}", "--suite=adaptive", "--num_examples=20", "--steps=2", "--restarts=1",
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
    for flag in ("--suite=adaptive", "--num_examples=20", "--steps=2", "--restarts=1", "--apgd_iterations=3",
                 "--square_queries=20", "--check_examples=20", f"--transfer_from={path}", f"--output_dir={out}"):
        assert flag in results["reproduce"]
    assert results["reproduce"] in done.stdout and "| worst case |" in done.stdout
    report = (out / "results.md").read_text()
    assert "Sanity checks" in report
    assert ("**Reduced budgets, not the standard ones** (PGD 2 steps of 100; PGD 1 restarts of 20; APGD 3 iterations "
            "of 100; Square 20 queries of 5000)") in report
    quick = dataclasses.replace(adaptive.AdaptiveConfig(), apgd_target_classes=3)
    assert adaptive.reduced_budgets(dataclasses.asdict(quick)) == ["APGD-T 3 target classes of 9"]
    assert adaptive.reduced_budgets(dataclasses.asdict(adaptive.AdaptiveConfig())) == []
