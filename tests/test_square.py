"""Tests of polar_tf.square: the schedule, the per-example proposals, the query budget, and the
compaction that computes only the examples still attacked."""

import numpy as np
import pytest
from keras import ops

import float_paths
from polar_tf import attacks, evaluation_config, losses, models, square


def test_square_schedule():
    assert evaluation_config.DEFAULT_P_INIT == 0.8 and evaluation_config.DEFAULT_QUERIES == 5000  # AutoAttack's standard
    assert square.p_selection(0.8, 0, 5000) == 0.8
    assert square.p_selection(0.8, 10, 5000) == 0.8 and square.p_selection(0.8, 11, 5000) == 0.4
    assert square.p_selection(0.8, 4999, 5000) == 0.8 / 128  # past 4000 of the fixed schedule
    # The reference's rescaled schedule: 6 of 5000 is 12 of 10,000, past 10.
    assert square.p_selection(0.05, 6, 5000, rescale=True) == 0.025
    assert square.p_selection(0.05, 4999, 5000, rescale=True) == 0.05 / 512
    assert square.square_side(0.05, 28, 28) == 6 and square.square_side(1e-6, 28, 28) == 1
    assert square.square_side(1.0, 28, 28) == 27

def test_square_proposals_are_per_example():
    rows = np.arange(600)
    every = square.SYNC_EVERY
    sides = np.arange(every) % 6 + 1  # sides 1 to 6
    for first in (0, every, 6 * every):
        draws = square.proposal_draws(0, first, rows, 3)
        assert draws.shape == (600, every, 5)
        corners, signs = square.proposals(draws, sides, 28)
        assert corners.shape == (600, every, 2) and signs.shape == (600, every, 3)
        for j, side in enumerate(sides):  # every place of each side's square is proposed (600 draws each)
            assert corners[:, j].min() == 0 and corners[:, j].max() == 28 - side - 1
        assert set(np.unique(signs)) == {-1.0, 1.0}
        # Any subset of the examples, in any batch, is proposed exactly the same squares.
        part = np.array([3, 255, 256, 257, 599])
        part_corners, part_signs = square.proposals(square.proposal_draws(0, first, part, 3), sides, 28)
        np.testing.assert_array_equal(part_corners, corners[part])
        np.testing.assert_array_equal(part_signs, signs[part])
        # So is any run of the iterations.
        np.testing.assert_array_equal(square.proposals(draws[:, 5:7], sides[5:7], 28)[0], corners[:, 5:7])
        assert not np.array_equal(corners[:, 0], corners[:, 6])  # each iteration has its own squares
    assert not np.array_equal(square.proposal_draws(1, 0, rows, 3), square.proposal_draws(0, 0, rows, 3))
    assert not np.array_equal(square.proposal_draws(0, every, rows, 3), square.proposal_draws(0, 0, rows, 3))
    with pytest.raises(ValueError, match="multiple of SYNC_EVERY"):
        square.proposal_draws(0, 1, rows, 3)

def test_square_corners_are_uniform():
    """Every top-left corner of a square of side 3 in 28 rows (25 places per axis) is about equally
    likely: 600 x 20 draws per axis, 480 per place expected; a count outside 480 +- 5 standard
    deviations (about +- 108) would be a biased mapping from the uniform draws."""
    draws = square.proposal_draws(0, 0, np.arange(600), 1)
    corners = square.proposals(draws, np.full(square.SYNC_EVERY, 3), 28)[0].reshape(-1, 2)
    for axis in range(2):
        counts = np.bincount(corners[:, axis], minlength=25)
        assert len(counts) == 25 and np.all(np.abs(counts - 480) < 5 * np.sqrt(480 * (1 - 1 / 25)))

def test_square_layout_takes_few_shapes():
    assert square.layout(0, 100) == []
    assert square.layout(100, 100) == [100] and square.layout(99, 100) == [100]
    assert square.layout(64, 100) == [64] and square.layout(65, 100) == [100] and square.layout(33, 100) == [64]
    assert square.layout(3, 100) == [4] and square.layout(1, 100) == [1]
    assert square.layout(250, 100) == [100, 100, 64] and square.layout(201, 100) == [100, 100, 1]
    sizes = {size for active in range(1, 1001) for size in square.layout(active, 500)}
    assert sizes == {500, 256, 128, 64, 32, 16, 8, 4, 2, 1}

def test_square_respects_its_query_budget(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    x_adv, spent = square.square(trained_mlp, x, y, eps=0.03, queries=150, return_queries=True, batch_size=64)
    # Square decides with its own forward pass (batch 64); this one (predict) may round a margin
    # within float noise of 0 the other way: those examples are left out, and must be few.
    margins, decided = {}, np.ones(len(y), bool)
    for name, images in (("clean", x), ("adversarial", x_adv)):
        logits = trained_mlp.predict(images, verbose=0)
        margins[name] = ops.convert_to_numpy(losses.margin(logits, y))
        decided &= np.abs(margins[name]) > 2 * float_paths.logit_atol(logits)
    assert decided.mean() >= 0.95
    correct, survived = margins["clean"] > 0, margins["adversarial"] > 0
    assert spent.max() <= 150
    np.testing.assert_array_equal(spent[~correct & decided], 1)  # the clean query alone
    np.testing.assert_array_equal(x_adv[~correct & decided], x[~correct & decided])
    assert np.all(spent[survived & decided] == 150) and survived.sum() > 10  # unfooled examples use it all
    assert np.all(spent[correct & ~survived & decided] < 150)

def _square_run(model, x, y, todo, batch_size, queries, eps=0.03, iterations_per_call=1):
    return square.Run(model, x, y, todo, eps=eps, queries=queries, p_init=0.05, clip_min=0.0, clip_max=1.0, seed=0,
                      batch_size=batch_size, iterations_per_call=iterations_per_call)

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

def test_square_computes_only_the_examples_still_attacked(trained_mlp, mnist_small):
    """From each copy of the margins to the host (every SYNC_EVERY iterations) on, the calls
    hold every example not fooled then, in the shapes `layout` gives for as many: the forward
    passes computed come close to the queries used, far below the batch's rows times the
    iterations; the few shapes are traced once."""
    _, _, x, y = mnist_small
    queries, every, batch = 150, square.SYNC_EVERY, 32
    todo = np.flatnonzero(models.predict_labels(trained_mlp, x) == y)
    compiled = square.compiled_square(trained_mlp)
    traces = compiled.traces
    run = _square_run(trained_mlp, x, y, todo, batch, queries, eps=0.2)
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
    again = _square_run(trained_mlp, x, y, todo, batch, queries, eps=0.2)
    np.testing.assert_array_equal(_square_history(again, queries)[1], margins)
    assert compiled.traces == traces

def test_square_batch_sizes_differ_only_at_near_ties(trained_mlp, mnist_small):
    """The squares proposed do not depend on the batch size; whether one is accepted compares two
    margins, which another batch shape may round differently in the last bits (oneDNN, XLA). So
    the runs at batch sizes 64 and 100 (each re-packed into smaller calls, at other times, as
    examples are fooled) must agree exactly until an accept decision where the two
    margins were within that float noise, or where an example's margin was within it of 0 (one
    run stops attacking it), and from there on the example may follow another path."""
    _, _, x, y = mnist_small
    queries = 150
    todo = np.flatnonzero(models.predict_labels(trained_mlp, x) == y)
    x_a, m_a, q_a, _ = _square_history(_square_run(trained_mlp, x, y, todo, 64, queries), queries)
    x_b, m_b, q_b, _ = _square_history(_square_run(trained_mlp, x, y, todo, 100, queries), queries)
    # The noise: margins of the same images (every state of run a) at the two batch shapes.
    images = x_a.reshape(-1, *x.shape[1:])
    labels = np.tile(y[todo], queries - 1)
    logits = [trained_mlp.predict(images, batch_size=b, verbose=0) for b in (64, 100)]
    margins = [ops.convert_to_numpy(losses.margin(z, labels)) for z in logits]
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


def test_square_iterations_looped_in_one_call_attack_as_one_call_each(trained_mlp, mnist_small):
    """SYNC_EVERY iterations per compiled call (a loop on the device, the default) run the same
    attack as one call per iteration: after each call every example's state is the per-iteration
    run's at that iteration, except where an accept decision fell on a float near-tie (the loop's
    forward pass may round otherwise: see the test above), which must be rare; the query budget
    holds in the last, shorter call."""
    _, _, x, y = mnist_small
    queries, every = 150, square.SYNC_EVERY
    todo = np.flatnonzero(models.predict_labels(trained_mlp, x) == y)
    x_a, m_a, q_a, _ = _square_history(_square_run(trained_mlp, x, y, todo, 64, queries), queries)
    run = _square_run(trained_mlp, x, y, todo, 64, queries, iterations_per_call=every)
    differs, times = np.zeros(todo.size, bool), set()
    for t, rows, state in run:
        times.add(t)
        at = np.searchsorted(todo, rows)
        images, _, spent = (ops.convert_to_numpy(v)[: len(rows)] for v in state)
        differs[at] |= np.any(images != x_a[t, at], axis=(1, 2, 3)) | (spent != q_a[t, at])
    assert times == {*range(0, queries - 2, every), queries - 2}  # 0, 20, ..., 140, then 148
    assert run.queries.max() <= queries and differs.mean() <= 0.05
    np.testing.assert_array_equal(run.queries[~differs], q_a[-1, ~differs])
    np.testing.assert_array_equal(run.x_best[~differs], x_a[-1, ~differs])
    with pytest.raises(ValueError, match="divide SYNC_EVERY"):
        _square_run(trained_mlp, x, y, todo, 64, queries, iterations_per_call=every + 1)


def test_eps_zero_returns_x_and_too_few_queries_are_refused(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    np.testing.assert_array_equal(square.square(trained_mlp, x, y, eps=0.0, queries=10), x)
    with pytest.raises(ValueError, match="queries"):
        square.square(trained_mlp, x, y, eps=0.1, queries=1)


def test_square_drives_an_undefended_model_to_near_zero(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    assert models.accuracy(trained_mlp, x, y) > 0.85
    x_adv = square.square(trained_mlp, x, y, eps=0.3, queries=300)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.max(np.abs(x_adv.astype(np.float64) - x)) <= 0.3 + attacks.INVARIANT_TOLERANCE
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert models.accuracy(trained_mlp, x_adv, y) <= 0.05
