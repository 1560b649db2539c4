"""Tests of polar_tf.driver: checks, padding, seeding and the keeping of the best run, with a NumPy
kernel whose results are set by hand (no model)."""

import numpy as np
import pytest

from polar_tf import driver


def test_pad_appends_zero_rows_and_leaves_full_batches_alone():
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = driver.pad(a, 5)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [0, 0], [0, 0]])
    assert padded.dtype == np.float32
    assert driver.pad(a, 3) is a


def test_batch_rows(monkeypatch):
    assert driver.batch_rows(500, 37) == 37 and driver.batch_rows(10, 37) == 10 and driver.batch_rows(10, 0) == 1
    monkeypatch.setattr(driver.backend, "replica_count", lambda: 4)  # a data-parallel run of 4 devices
    assert driver.batch_rows(7, 100) == 8 and driver.batch_rows(500, 37) == 40 and driver.batch_rows(8, 100) == 8


def test_check_adversarial():
    x = np.full((2, 3), 0.5, np.float32)
    driver.check_adversarial(x + np.float32(0.1) + np.float32(5e-7), x, 0.1)  # float32 slack is fine
    for bad, message in (
        (x + 0.11, "exceeds eps"),
        (np.full_like(x, 1.05), "exceeds eps"),
        (np.where(np.eye(2, 3) > 0, np.nan, x), "non-finite"),
    ):
        with pytest.raises(driver.AttackInvariantError, match=message):
            driver.check_adversarial(bad, x, 0.1)
    with pytest.raises(driver.AttackInvariantError, match="outside"):
        driver.check_adversarial(np.full_like(x, 1.05), np.ones_like(x), 0.1)


def test_checks_refuse_bad_input():
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    for args, message in (
        ((x, y.astype(np.float32), 0.0, 1.0), "labels must be integers"),
        ((x, y[:1], 0.0, 1.0), "x must be"),
        ((x, y, 1.0, 0.0), "clip_min must be < clip_max"),
        ((x + 2.0, y, 0.0, 1.0), "must lie in"),
    ):
        with pytest.raises(ValueError, match=message):
            driver.check_data(*args)
    assert driver.check_data(x, y, 0.0, 1.0)[1].dtype == np.int32
    with pytest.raises(ValueError, match="random_start"):
        driver.check_settings(0.1, 0.01, 10, 2, False, 0)
    with pytest.raises(ValueError, match="batch_size"):
        driver.check_batch_size(0)
    assert driver.check_batch_size(None) == driver.backend.default_attack_batch_size()


def test_an_examples_draws_depend_only_on_its_index():
    rows = np.array([3, 300, 7, 999, 256])
    noise = driver.uniform_noise(5, 2, rows, (2, 2))
    assert noise.shape == (5, 2, 2) and noise.dtype == np.float32 and noise.min() >= -1 and noise.max() < 1
    # Each example alone, or among others, draws the same.
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(driver.uniform_noise(5, 2, np.array([row]), (2, 2))[0], noise[i])
    assert not np.array_equal(driver.uniform_noise(5, 3, rows, (2, 2)), noise)  # another restart
    assert not np.array_equal(driver.uniform_noise(6, 2, rows, (2, 2)), noise)  # another seed
    signs = driver.signs((1, 2), rows, (4,))
    assert set(np.unique(signs)) == {-1.0, 1.0}
    np.testing.assert_array_equal(driver.signs((1, 2), rows[::-1], (4,)), signs[::-1])


def scripted_kernel(outcomes, calls):
    """A kernel whose result for (run, example) is set by hand: outcomes[(run, i)] = (fooled, loss);
    the image it returns is x + 0.01 * (run + 1), so the test can tell which run was kept. The run
    of a row is read off its noise (the driver's `uniform_noise` for that run)."""

    def kernel(x, y, noise, target, count, on_progress):
        runs = []
        for row in range(count):
            i = int(np.flatnonzero(np.all(x[row] == base, axis=1))[0])
            run = next(r for r in range(3) if np.array_equal(noise[row], driver.uniform_noise(0, r, np.array([i]), (2,))[0]))
            runs.append((run, i))
        calls.append(runs)
        fooled = np.zeros(len(x), bool)
        loss = np.zeros(len(x), np.float32)
        x_adv = x.copy()
        for row, (run, i) in enumerate(runs):
            fooled[row], loss[row] = outcomes[(run, i)]
            x_adv[row] = x[row] + np.float32(0.01) * (run + 1)
        return x_adv, fooled, loss

    return kernel


base = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]], np.float32)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_the_first_run_that_fools_is_kept_else_the_highest_loss(batch_size):
    # Example 0: run 1 fools (run 2 never counts); 1: no run fools, run 2 has the highest loss;
    # 2: run 0 fools; 3: already fooled, never attacked.
    outcomes = {(0, 0): (False, 1.0), (1, 0): (True, 0.5), (2, 0): (True, 9.0),
                (0, 1): (False, 1.0), (1, 1): (False, 0.5), (2, 1): (False, 3.0),
                (0, 2): (True, 2.0), (1, 2): (False, 7.0), (2, 2): (False, 8.0)}
    calls = []
    x_adv = driver.run(
        scripted_kernel(outcomes, calls), base, np.zeros(4, np.int32), [driver.Run(r) for r in range(3)], eps=0.05,
        clip_min=0.0, clip_max=1.0, seed=0, random_start=True, batch_size=batch_size, title="test", name="test",
        fooled=np.array([False, False, False, True]),
    )
    np.testing.assert_allclose(x_adv - base, [[0.02] * 2, [0.03] * 2, [0.01] * 2, [0.0] * 2], atol=1e-7)
    attacked = [pair for call in calls for pair in call]
    assert len(attacked) == len(set(attacked)) and all(i != 3 for _, i in attacked)
    assert all(len(call) <= batch_size for call in calls)
    if batch_size == 1:  # one after the other: example 2 is not attacked again once run 0 fooled it
        assert (1, 2) not in attacked and (2, 0) not in attacked


def test_an_adversarial_batch_outside_the_ball_is_refused():
    def kernel(x, y, noise, target, count, on_progress):
        return x + np.float32(0.2), np.zeros(len(x), bool), np.zeros(len(x), np.float32)

    with pytest.raises(driver.AttackInvariantError, match="exceeds eps"):
        driver.run(kernel, base, np.zeros(4, np.int32), [driver.Run(0)], eps=0.1, clip_min=0.0, clip_max=1.0, seed=0,
                   random_start=False, batch_size=4, title="test", name="test")
