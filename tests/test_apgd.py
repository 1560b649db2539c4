"""Tests of polar_tf.apgd: APGD's checkpoints, APGD-T's aim, its tracing."""

import numpy as np
import pytest
from keras import ops

import small_models
from polar_tf import apgd, attacks, losses, models

EPS = 0.3


def test_apgd_t_maximizes_the_targeted_loss_towards_the_runner_up(trained_mlp, mnist_small):
    """With one target class, APGD-T attacks each example's clean runner-up class: on the examples
    it does not fool, it raised that targeted loss above the clean one, and further than APGD-CE
    (which is not aimed at it) did."""
    _, _, x, y = mnist_small
    correct = models.predict_labels(trained_mlp, x) == y
    x, y = x[correct], y[correct]
    runner_up = np.argsort(-trained_mlp.predict(x, verbose=0), axis=1)[:, 1]

    def targeted_loss(images):
        return ops.convert_to_numpy(losses.dlr_targeted(trained_mlp.predict(images, verbose=0), y, runner_up))

    eps = 0.05  # small enough that many examples survive
    x_t = apgd.apgd(trained_mlp, x, y, eps=eps, iterations=20, loss="dlr-t", target_classes=1)
    x_ce = apgd.apgd(trained_mlp, x, y, eps=eps, iterations=20, loss="ce")
    survived = models.predict_labels(trained_mlp, x_t) == y
    assert 10 <= survived.sum() < len(y)  # neither vacuous nor toothless
    clean, towards, untargeted = targeted_loss(x)[survived], targeted_loss(x_t)[survived], targeted_loss(x_ce)[survived]
    assert np.all(towards > clean)
    assert towards.mean() > untargeted.mean()

def test_apgd_checkpoints_are_the_papers():
    assert [i + 1 for i, _ in apgd.checkpoints(100)] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert [w for _, w in apgd.checkpoints(100)] == [22, 19, 16, 13, 10, 7, 6, 6]
    assert apgd.checkpoints(5) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]


def test_eps_zero_returns_x_and_apgd_traces_once(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    np.testing.assert_array_equal(apgd.apgd(trained_mlp, x, y, eps=0.0, iterations=3), x)
    model = small_models.mlp(2)  # fresh: counts its own traces
    model.set_weights(trained_mlp.get_weights())
    compiled = apgd.compiled_apgd(model, "ce")
    apgd.apgd(model, x, y, eps=0.1, iterations=3, restarts=3, batch_size=40)
    # Start and iteration, one batch shape: the last batch and later restarts (fewer examples) padded.
    assert compiled.traces == 2
    with pytest.raises(ValueError, match="loss"):
        apgd.apgd(model, x, y, eps=0.1, loss="cw")


def test_apgd_runs_the_same_iterations_in_calls_of_any_length(trained_mlp, mnist_small):
    """One iteration per call, 7 per call (checkpoints fall inside calls, the last call is shorter)
    or all 30 in one loop: the same attack, up to float rounding (XLA may compile a loop's gradient
    otherwise, and a sign near zero can then send an example another way): nearly every example
    ends at the same loss and is fooled or not alike."""
    _, _, x, y = mnist_small
    compiled = apgd.compiled_apgd(trained_mlp, "ce")
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    target = np.zeros_like(y)
    runs = [compiled(x, y, target, noise, 0.05, 30, iterations_per_call=per_call) for per_call in (1, 7, None)]
    x_one, fooled_one, loss_one = runs[0]
    assert 0.2 < fooled_one.mean() < 0.9  # neither vacuous nor toothless at eps 0.05
    for x_adv, fooled, loss in runs[1:]:
        assert np.mean(fooled == fooled_one) >= 0.95
        assert np.mean(np.isclose(loss, loss_one, rtol=1e-4, atol=1e-5)) >= 0.95
        assert np.max(np.abs(x_adv - x)) <= 0.05 + attacks.INVARIANT_TOLERANCE


@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-t"])
def test_apgd_drives_an_undefended_model_to_near_zero(trained_mlp, mnist_small, loss):
    _, _, x, y = mnist_small
    assert models.accuracy(trained_mlp, x, y) > 0.85
    x_adv = apgd.apgd(trained_mlp, x, y, eps=EPS, iterations=20, loss=loss, target_classes=2)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.max(np.abs(x_adv.astype(np.float64) - x)) <= EPS + attacks.INVARIANT_TOLERANCE
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert models.accuracy(trained_mlp, x_adv, y) <= 0.05
