"""How far float32 results may differ between two computation paths, and which decisions they may flip.

oneDNN (TensorFlow) and XLA (JAX) sum in an order that depends on the batch shape, the thread
count, the CPU and on whether a step is compiled, so one model on one input gives results that
differ in the last bits from path to path (issue #12). Tests that compare two paths compare
values within these bounds, and decisions (a saturation level, an argmax) only away from the
near-ties that such a difference could flip.
"""

from __future__ import annotations

import keras
import numpy as np

from polar_tf import certify, models

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, twice float32's unit roundoff

# z = sum_i (w_i / ||w||_1) x_i over a 5x5 window with x_i in [0, 1]: the normalized weights'
# magnitudes sum to 1, so the terms' magnitudes sum to at most 1 and, whatever the order, each
# path's z is within (25 for the normalization, ||w||_1's 24 additions and a division, + 1 for the
# products + 24 for the additions) * 2**-24 = 3e-6 of the exact value. Two paths differ by less
# than 6e-6 < 1e-5 (certify's Z_MARGIN, the same bound).
Z_TOLERANCE = 1e-5

# The classifier's logits are sums of 625, 800, 1024 and 100 terms, layer after layer: two orders
# of summation differ by about sqrt(n) roundings of the terms' size, 2e-6 of it for n = 1024;
# measured between batch shapes, compiled and eager calls and backends: at most 1e-6 of the
# logits' scale. 1e-5 of max(1, largest |logit|) bounds it with a factor of 10 to spare.
LOGIT_TOLERANCE = 1e-5


def logit_atol(logits: np.ndarray) -> float:
    """The absolute tolerance between two paths' logits: LOGIT_TOLERANCE of their scale."""
    return LOGIT_TOLERANCE * max(1.0, float(np.abs(logits).max()))


def dot_atol(inputs: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Worst-case difference of two float32 evaluations of inputs @ kernel + bias, in any order.

    A sum of n rounded products, in any order, is within n * 2**-24 * sum |term| of the exact sum
    (n - 1 additions and n products, each rounded once; to first order): two evaluations differ
    by at most n * 2**-23 of it.
    """
    n = kernel.shape[0] + (bias is not None)
    magnitude = np.abs(inputs) @ np.abs(kernel) + (0.0 if bias is None else np.abs(bias))
    return n * EPS32 * magnitude


def jump_gaps(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Per example, how close its nearest front-end output z comes to a jump +-c (inf without a
    polarizing front end: a pixel saturation acts elementwise on exact values, the same everywhere)."""
    frontend = models.get_frontend(model)
    if frontend is None:
        return np.full(len(x), np.inf)
    gaps = [np.abs(np.abs(z) - frontend.jump).reshape(len(z), -1).min(axis=1) for z in models.frontend_outputs(model, x)]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def decided_classes(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Per example, the class that every computation path predicts, or -1 where rounding decides.

    The saturated model's logits bounded over every front-end output within `certify.Z_MARGIN`
    (>= Z_TOLERANCE) of the one computed: an output that close to a jump counts as either of its
    neighbouring levels (`certify.interval_bounds` at eps = 0, run only on the images that have
    one), every other output is fixed, and an image with none has one point, its logits. A class
    is decided when its lower bound exceeds every other class's upper bound by more than two
    paths' rounding of the logits (2 * logit_atol); elsewhere (a near-tie of two logits, or a
    jump output the prediction hangs on) another path may predict another class.
    """
    assert certify.Z_MARGIN >= Z_TOLERANCE
    with models.as_evaluated(model):
        lo = models.predict_logits(model, x)
    hi = lo.copy()
    near = np.flatnonzero(jump_gaps(model, x) <= certify.Z_MARGIN)
    if len(near):
        lo[near], hi[near] = certify.interval_bounds(model, x[near], 0.0)
    best = np.argmax(lo, axis=1)
    rows = np.arange(len(x))
    others = np.where(np.arange(lo.shape[1]) == best[:, None], -np.inf, hi).max(axis=1)
    decided = lo[rows, best] - others > 2 * logit_atol(np.concatenate([lo, hi]))
    return np.where(decided, best, -1)
