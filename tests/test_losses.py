"""Tests of polar_tf.losses: each loss against values computed by hand on small logits.

float32 rounding: every value below is an O(1)-sized result of a few float32 operations on
exactly representable logits, so a relative tolerance of 1e-6 (a few ulps) holds on either
backend; exact comparisons only where the arithmetic is exact in float32 (differences of small
integers).
"""

import math

import numpy as np
from keras import ops

from polar_tf import backend, losses


def values(tensor) -> np.ndarray:
    return ops.convert_to_numpy(tensor).astype(np.float64)


def test_cross_entropy_by_hand():
    # Row 0: logits (0, ln 3): softmax (1/4, 3/4), so -log p_0 = ln 4 and -log p_1 = ln 4/3.
    # Row 1: logits (2, 1, 0): -log p_0 = log(e^2 + e + 1) - 2.
    logits = np.array([[0.0, math.log(3.0), -1e4], [2.0, 1.0, 0.0]], np.float32)
    got = values(losses.cross_entropy(logits, np.array([0, 0])))
    np.testing.assert_allclose(got, [math.log(4.0), math.log(math.e**2 + math.e + 1) - 2.0], rtol=1e-6)
    got = values(losses.cross_entropy(logits[:1], np.array([1])))
    np.testing.assert_allclose(got, [math.log(4.0 / 3.0)], rtol=1e-6)


def test_cross_entropy_on_a_confident_example_and_its_gradient():
    # True logit 30 above 9 others at 0: -log p_y = log(1 + 9 e^-30), which float32 -log softmax
    # rounds to 0; the gradient p - onehot, whose true component p_y - 1 = -9 p is 0 there too.
    logits = np.zeros((1, 10), np.float32)
    logits[0, 0] = 30.0
    y = np.zeros(1, np.int32)
    np.testing.assert_allclose(values(losses.cross_entropy(logits, y)), [math.log1p(9 * math.exp(-30.0))], rtol=1e-5)
    grad = values(backend.gradient(lambda l: ops.sum(losses.cross_entropy(l, y)), logits))
    p = math.exp(-30.0) / (1 + 9 * math.exp(-30.0))  # softmax of every wrong class
    np.testing.assert_allclose(grad[0, 1:], p, rtol=1e-5)
    np.testing.assert_allclose(grad[0, 0], -9 * p, rtol=1e-5)


def test_cross_entropy_reference_fallback_where_it_underflows():
    # log(9 e^-40) = -37.8 <= -53 ln 2 = -36.7: float64's 1 + 9 e^-40 is 1, the reference's
    # cross-entropy 0; its fallback is the MSE to the one-hot label, (40 - 1)^2 / 10. At 30,
    # log(9 e^-30) = -27.8 > -36.7: no fallback.
    logits = np.zeros((3, 10), np.float32)
    logits[0, 0], logits[1, 0], logits[2, :2] = 40.0, 30.0, [2.0, 1.0]
    y = np.zeros(3, np.int32)
    np.testing.assert_array_equal(losses.ce_falls_back(logits, y), [True, False, False])
    got = values(losses.cross_entropy(logits, y, reference_fallback=True))
    plain = values(losses.cross_entropy(logits, y))
    np.testing.assert_allclose(got[0], 39.0**2 / 10, rtol=1e-6)
    np.testing.assert_allclose(plain[0], 9 * math.exp(-40.0), rtol=1e-5)
    np.testing.assert_array_equal(got[1:], plain[1:])
    # Maximizing the fallback raises the true logit; the plain cross-entropy lowers it.
    grad = values(backend.gradient(lambda l: ops.sum(losses.cross_entropy(l, y, reference_fallback=True)), logits))
    np.testing.assert_allclose(grad[0, 0], 2 * 39.0 / 10, rtol=1e-6)  # d/dz_0 of (z_0 - 1)^2 / 10
    grad = values(backend.gradient(lambda l: ops.sum(losses.cross_entropy(l, y)), logits))
    assert grad[0, 0] < 0 and np.all(grad[0, 1:] > 0)


def test_cw_and_margin():
    logits = np.array([[1.0, 3.0, 2.0], [5.0, 1.0, 4.0], [0.0, 100.0, -2.0]], np.float32)
    y = np.array([0, 0, 2], np.int32)
    # max_{j != y} z_j - z_y: 3 - 1, 4 - 5, 100 - (-2).
    np.testing.assert_array_equal(values(losses.cw(logits, y)), [2.0, -1.0, 102.0])
    np.testing.assert_array_equal(values(losses.margin(logits, y)), [-2.0, 1.0, -102.0])


def test_split_logits():
    logits = np.array([[1.0, 3.0, 2.0]], np.float32)
    onehot, true_logit, others = (values(v) for v in losses.split_logits(logits, np.array([1])))
    np.testing.assert_array_equal(onehot, [[0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(true_logit, [3.0])
    np.testing.assert_array_equal(others[0, [0, 2]], [1.0, 2.0])
    assert others[0, 1] <= -1e29


def test_dlr_by_hand_and_invariance():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 2.0, 4.0]], np.float32)
    y = np.array([0, 0], np.int32)
    got = values(losses.dlr(logits, y))
    # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): -(1 - 3) / (3 - 1) and -(5 - 4) / (5 - 2).
    np.testing.assert_allclose(got, [1.0, -1.0 / 3.0], rtol=1e-6)
    np.testing.assert_allclose(values(losses.dlr(3.0 * logits + 7.0, y)), got, rtol=1e-5)


def test_dlr_targeted_by_hand_and_invariance():
    logits = np.array([[1.0, 3.0, 2.0, 0.0, -1.0], [5.0, 1.0, 2.0, 4.0, 0.0]], np.float32)
    y, target = np.array([0, 0], np.int32), np.array([2, 3], np.int32)
    got = values(losses.dlr_targeted(logits, y, target))
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): -(1 - 2) / (3 - (1 + 0) / 2), -(5 - 4) / (5 - (2 + 1) / 2).
    np.testing.assert_allclose(got, [1.0 / 2.5, -1.0 / 3.5], rtol=1e-6)
    np.testing.assert_allclose(values(losses.dlr_targeted(3.0 * logits + 7.0, y, target)), got, rtol=1e-5)


def test_dlr_of_tied_logits_is_finite():
    # All logits equal: the scale is 0, and max(., 1e-12) keeps the ratio 0 rather than 0 / 0.
    logits = np.zeros((1, 4), np.float32)
    y = np.zeros(1, np.int32)
    np.testing.assert_array_equal(values(losses.dlr(logits, y)), [0.0])
    np.testing.assert_array_equal(values(losses.dlr_targeted(logits, y, np.ones(1, np.int32))), [0.0])
