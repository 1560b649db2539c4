"""The attacks' per-example losses on logits, each written once with `keras.ops`.

    cross_entropy(logits, y)                           # -log softmax(logits)_y
    cross_entropy(logits, y, reference_fallback=True)  # the paper's attacks' loss (MSE where CE underflows)
    cw(logits, y)                                      # max_{j != y} z_j - z_y (Carlini-Wagner margin)
    margin(logits, y)                                  # z_y - max_{j != y} z_j = -cw: > 0 while correct
    dlr(logits, y), dlr_targeted(logits, y, target)    # Croce & Hein's difference of logits ratio

All but `margin` are maximized by an attack; each returns a [batch] tensor, so that the gradient
of their sum is every example's own gradient.

Cross-entropy is computed as softplus(logsumexp_{j != y}(z_j - z_y)): it equals -log softmax(z)_y,
and its gradient is exact in float32 where -log softmax differentiated directly rounds p_y - 1 to 0
on confident examples. The paper's reference computed the cross-entropy in float64, where it
underflows to exactly 0 when sum_{j != y} exp(z_j - z_y) <= 2^-53; there it fell back to the mean
squared error between the logits and the one-hot label (`reference_fallback=True`; `ce_falls_back`
says where). Maximizing that MSE can raise the true logit of a confident example, which is why
APGD (as Croce & Hein) uses the plain cross-entropy.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

# float64's 1 + s rounds to 1 for s <= 2^-53: there the reference's cross-entropy was exactly 0.
CE_UNDERFLOW_LOG = -53.0 * math.log(2.0)
_MASKED_LOGIT = -1e30
# max(., 1e-12) rather than the DLR reference's + 1e-12: TensorFlow's graph optimizer may
# reassociate (a - b) + 1e-12 into a - (b - 1e-12), which is 0 / 0 when a == b in float32.
_DLR_EPSILON = 1e-12


def split_logits(logits, y):
    """(one-hot labels, the true class's logit [batch], the logits with the true class masked to
    -1e30 [batch, classes], whose max over the last axis is the best other logit)."""
    onehot = ops.one_hot(ops.cast(y, "int32"), logits.shape[-1], dtype=logits.dtype)
    return onehot, ops.sum(logits * onehot, axis=-1), ops.where(onehot > 0, _MASKED_LOGIT, logits)


def cross_entropy(logits, y, reference_fallback: bool = False):
    """-log softmax(logits)_y per example, [batch].

    Args:
      logits: [batch, classes].
      y: integer labels [batch].
      reference_fallback: where the reference's float64 cross-entropy underflows to 0
        (`ce_falls_back`), return its fallback instead: the mean squared error between the logits
        and the one-hot label.
    """
    onehot, true_logit, others = split_logits(logits, y)
    log_odds = ops.logsumexp(others - true_logit[:, None], axis=-1)
    if not reference_fallback:
        return ops.softplus(log_odds)
    mse = ops.mean(ops.square(logits - onehot), axis=-1)
    return ops.where(ops.stop_gradient(log_odds) <= CE_UNDERFLOW_LOG, mse, ops.softplus(log_odds))


def ce_falls_back(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per example (NumPy, float64), whether `cross_entropy(..., reference_fallback=True)` takes the
    MSE fallback at these logits: the examples so confident that maximizing it can raise the true
    logit rather than lower it."""
    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(y))
    others = logits - logits[rows, y][:, None]
    others[rows, y] = -np.inf
    top = others.max(axis=1)
    log_odds = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return log_odds <= CE_UNDERFLOW_LOG


def cw(logits, y):
    """The Carlini-Wagner margin max_{j != y} z_j - z_y per example, [batch]: its gradient does not
    vanish on confident examples; > 0 where the example is misclassified."""
    _, true_logit, others = split_logits(logits, y)
    return ops.max(others, axis=-1) - true_logit


def margin(logits, y):
    """z_y - max_{j != y} z_j per example, [batch] (the Square attack's, minimized): > 0 while the
    example is classified correctly."""
    _, true_logit, others = split_logits(logits, y)
    return true_logit - ops.max(others, axis=-1)


def dlr(logits, y):
    """The untargeted difference-of-logits-ratio loss -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
    per example, [batch], z_pi1 >= z_pi2 >= z_pi3 the three largest logits: invariant to shifting
    and scaling the logits. Needs at least 3 classes."""
    _, true_logit, others = split_logits(logits, y)
    top3 = ops.top_k(logits, 3, sorted=True)[0]
    return -(true_logit - ops.max(others, axis=-1)) / ops.maximum(top3[:, 0] - top3[:, 2], _DLR_EPSILON)


def dlr_targeted(logits, y, target):
    """AutoAttack's targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) per example,
    [batch], z_pi the logits sorted in decreasing order, t the target class. Needs at least 4
    classes."""
    _, true_logit, _ = split_logits(logits, y)
    _, target_logit, _ = split_logits(logits, target)
    top4 = ops.top_k(logits, 4, sorted=True)[0]
    scale = top4[:, 0] - 0.5 * (top4[:, 2] + top4[:, 3])
    return -(true_logit - target_logit) / ops.maximum(scale, _DLR_EPSILON)
