"""The Square attack (Andriushchenko et al. 2020), L-inf: gradient-free, score-based.

    x_adv = square(model, x, y, eps=0.3)                      # 5000 queries per example
    x_adv, queries = square(model, x, y, eps=0.3, queries=1000, return_queries=True)

As AutoAttack's standard version runs it (its `SquareAttack` with p_init 0.8, 5,000 queries, one
restart, no rescaled schedule; the Square authors' reference `square_attack_linf` differs only in
rescaling the schedule to the budget, `rescale_schedule=True`), untargeted, with the margin loss
l(x) = z_y - max_{j != y} z_j (minimized; the example is fooled when it is <= 0):
  - start from vertical stripes: each column of the image moved by +eps or -eps (random);
  - each iteration, per example: pick a random square of side s (s = round(sqrt(p * pixels)),
    between 1 and side - 1), set the perturbation on it to +eps or -eps (per channel, random;
    the other sign if that would not change the current image), and keep the new image only if
    the loss decreases;
  - p starts at p_init (0.8) and halves as the iteration passes 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000 (of 10,000; with `rescale_schedule`, those fractions of the budget);
  - an example stops as soon as it is fooled.
Queries are counted per example: forward passes whose output the attack uses, including the
first (is the clean image classified correctly? an already misclassified one costs just that
query and is returned unchanged) and the one at the stripes start; no example is ever given
more than `queries`. One iteration of a batch is one compiled function
(`backend.compile_model_function`); the stripes, squares and signs are drawn on the host, for
each example from (seed, iteration, its index) alone, so the squares proposed do not depend on
the batch size. (Whether a proposal is accepted compares two margins; at a near-tie the float
rounding of another batch shape can decide it otherwise.)
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
from absl import logging
from keras import ops

from polar_tf import attacks, backend, models, progress

DEFAULT_QUERIES = 5000
DEFAULT_P_INIT = 0.8  # AutoAttack's for L-inf, and the Square authors' on MNIST
# The reference's schedule: iteration (per 10,000) after which p is halved once more.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_UNCHANGED = 1e-7
_SYNC_EVERY = 20  # iterations between checks whether a whole batch is fooled
_BLOCK = 256  # examples per random generator (see `_per_example`)


def margin(logits, y):
    """z_y - max_{j != y} z_j per example: > 0 while the example is classified correctly."""
    onehot = ops.one_hot(ops.cast(y, "int32"), logits.shape[-1], dtype=logits.dtype)
    true_logit = ops.sum(logits * onehot, axis=-1)
    return true_logit - ops.max(ops.where(onehot > 0, -1e30, logits), axis=-1)


def p_selection(p_init: float, iteration: int, iterations: int, rescale: bool = False) -> float:
    """The fraction of pixels the square covers at `iteration` (of `iterations`, which `rescale`
    maps onto the schedule's 10,000, as the Square reference does; AutoAttack does not)."""
    scaled = int(iteration / iterations * 10000) if rescale else iteration
    return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


def square_side(p: float, height: int, width: int) -> int:
    """Side of a square covering about a fraction p of the image: between 1 and height - 1."""
    return min(max(int(round(math.sqrt(p * height * width))), 1), height - 1)


class CompiledSquare:
    """The Square attack's compiled iteration for one model and clip range.

    Attributes:
      traces: times its compiled function was traced (once per batch shape).
    """

    def __init__(self, model: keras.Model, clip_min: float = 0.0, clip_max: float = 1.0):
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.traces = 0

        def clip(values):
            return ops.clip(values, self.clip_min, self.clip_max)

        def evaluate(forward, value_and_grad, x_new, y):
            return margin(forward(x_new), y)

        def iterate(forward, value_and_grad, state, x, y, eps, side, corners, signs):
            x_best, margin_best, queries = state
            height, width = x.shape[1], x.shape[2]
            rows = ops.reshape(ops.arange(height, dtype="int32"), (1, height, 1, 1))
            cols = ops.reshape(ops.arange(width, dtype="int32"), (1, 1, width, 1))
            top = ops.reshape(corners[:, 0], (-1, 1, 1, 1))
            left = ops.reshape(corners[:, 1], (-1, 1, 1, 1))
            inside = ops.logical_and(
                ops.logical_and(rows >= top, rows < top + side), ops.logical_and(cols >= left, cols < left + side)
            )
            delta = x_best - x
            signs = ops.reshape(signs, (-1, 1, 1, x.shape[3]))
            candidate = ops.where(inside, eps * signs, delta)
            # As the reference, never spend a query on a square that changes nothing: there the
            # other sign always changes something (eps > 0).
            same = ops.logical_or(ops.abs(clip(x + candidate) - x_best) < _UNCHANGED, ops.logical_not(inside))
            unchanged = ops.reshape(ops.all(same, axis=(1, 2, 3)), (-1, 1, 1, 1))
            candidate = ops.where(inside, eps * ops.where(unchanged, -signs, signs), delta)
            x_new = clip(x + candidate)
            margin_new = margin(forward(x_new), y)
            active = margin_best > 0
            better = ops.logical_and(active, margin_new < margin_best)
            x_best = ops.where(ops.reshape(better, (-1, 1, 1, 1)), x_new, x_best)
            margin_best = ops.where(better, margin_new, margin_best)
            return x_best, margin_best, queries + ops.cast(active, queries.dtype)

        self._evaluate = backend.compile_model_function(model, evaluate, self._count_trace)
        self._iterate = backend.compile_model_function(model, iterate, self._count_trace)

    def _count_trace(self) -> None:
        self.traces += 1


def compiled_square(model: keras.Model, clip_min: float = 0.0, clip_max: float = 1.0) -> CompiledSquare:
    """The `CompiledSquare` of (model, clip range), made on first use and then reused."""
    return attacks.per_model(model, CompiledSquare, float(clip_min), float(clip_max))


def square(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    queries: int = DEFAULT_QUERIES,
    p_init: float = DEFAULT_P_INIT,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    return_queries: bool = False,
    rescale_schedule: bool = False,
):
    """The Square attack, L-inf, untargeted, margin loss.

    Args:
      model: a Keras model from images [n, height, width, channels] to logits (its saturation is
        switched on for the attack).
      x: clean images, float32 in [clip_min, clip_max].
      y: integer labels [n].
      eps: the L-inf radius.
      queries: the query budget per example (>= 2: the clean check and the stripes start).
      p_init: initial fraction of pixels the square covers, in (0, 1].
      clip_min, clip_max: the valid pixel range.
      seed: seeds the stripes, squares and signs.
      batch_size: images per compiled call (None: `backend.default_attack_batch_size()`).
      return_queries: also return the queries spent on each example.
      rescale_schedule: spread the halvings of p over the budget (the Square reference) rather
        than at fixed iterations (AutoAttack).

    Returns:
      The adversarial images (float32, shaped like x), and with `return_queries` the queries per
      example (int [n], each <= `queries`).

    Raises:
      ValueError: bad arguments, or x outside [clip_min, clip_max].
      AttackInvariantError: an adversarial batch left the eps-ball or the pixel range.
    """
    x, y = attacks._check_data(x, y, clip_min, clip_max)
    attacks._check_settings(eps, eps, 1, 1, True, seed)
    if x.ndim != 4:
        raise ValueError(f"x must be images [n, height, width, channels]. Received shape {x.shape}")
    if not (isinstance(queries, (int, np.integer)) and queries >= 2):
        raise ValueError(f"queries must be an integer >= 2. Received: queries={queries}")
    if not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
        raise ValueError(f"p_init must be in (0, 1]. Received: p_init={p_init}")
    batch_size = backend.default_attack_batch_size() if batch_size is None else batch_size
    if not (isinstance(batch_size, (int, np.integer)) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size}")
    n = len(x)
    x_adv = x.copy()
    spent = np.ones(n, dtype=np.int64)  # the clean query
    started = time.perf_counter()
    with attacks.saturated(model):
        correct = models.predict_labels(model, x, max(min(batch_size, n), 1)) == y if n else np.zeros(0, bool)
        todo = np.flatnonzero(correct) if eps > 0 else np.zeros(0, np.int64)
        bar = progress.bar(f"square eps={eps:g}: {todo.size} examples, {queries} queries each", todo.size, "example")
        fooled = n - todo.size
        for rows, states in batches(model, x, y, todo, eps=eps, queries=queries, p_init=p_init, clip_min=clip_min,
                                    clip_max=clip_max, seed=seed, batch_size=batch_size,
                                    rescale_schedule=rescale_schedule):
            done = int(np.searchsorted(todo, rows[0]))
            for i, state in enumerate(states):
                if i % _SYNC_EVERY == 0:  # a progress update costs a copy to the host
                    still = int(np.sum(ops.convert_to_numpy(state[1])[: len(rows)] > 0))
                    bar.update(done + len(rows) * i // (queries - 1), [("accuracy", 1 - (fooled + len(rows) - still) / max(n, 1))])
            result = ops.convert_to_numpy(state[0])[: len(rows)]
            attacks.check_adversarial(result, x[rows], eps, clip_min, clip_max)
            x_adv[rows] = result
            spent[rows] = ops.convert_to_numpy(state[2])[: len(rows)]
            fooled += int(np.sum(ops.convert_to_numpy(state[1])[: len(rows)] <= 0))
            bar.update(done + len(rows), [("accuracy", 1 - fooled / max(n, 1))])
        logging.info("square eps=%g: %d of %d examples fooled, %d queries at most, %.1f s",
                     eps, fooled, n, queries, time.perf_counter() - started)
    return (x_adv, spent) if return_queries else x_adv


def batches(model: keras.Model, x: np.ndarray, y: np.ndarray, todo: np.ndarray, *, eps: float, queries: int,
            p_init: float, clip_min: float, clip_max: float, seed: int, batch_size: int,
            rescale_schedule: bool = False):
    """The attack on the examples `todo` (correctly classified ones), batch by batch.

    Yields, for each batch, (rows, states): the example indices and an iterator over the states
    (x_best, margin_best, queries spent; backend tensors padded to the batch size) after the
    stripes start and after each iteration, the last being the batch's result. A batch stops
    early once every example in it is fooled (checked every `_SYNC_EVERY` iterations). `square`
    runs it; tests read the states to compare runs. Arguments as `square`; the saturation must
    already be on.
    """
    n, height, width, channels = x.shape
    compiled = compiled_square(model, clip_min, clip_max)
    f32 = np.float32
    batch = min(batch_size, n)  # Fixed by the number of examples, not of those attacked: one trace.

    def states(rows):
        xb, yb = attacks._pad(x[rows], batch), attacks._pad(y[rows], batch)
        stripes = attacks._pad(_signs((seed, 0), rows, (1, width, channels)), batch)
        x_start = np.clip(xb + f32(eps) * stripes, clip_min, clip_max)
        xb, yb = ops.convert_to_tensor(xb), ops.convert_to_tensor(yb)  # on the device once per batch
        state = (x_start, compiled._evaluate(x_start, yb), np.full(batch, 2, np.int32))
        yield state
        for i in range(queries - 2):
            if i % _SYNC_EVERY == 0 and not np.any(ops.convert_to_numpy(state[1])[: len(rows)] > 0):
                return
            side = square_side(p_selection(p_init, i, queries, rescale_schedule), height, width)
            corners, signs = proposals(seed, i, rows, side, height, channels)
            state = compiled._iterate(state, xb, yb, f32(eps), np.int32(side), attacks._pad(corners, batch),
                                      attacks._pad(signs, batch))
            yield state

    for first in range(0, todo.size, batch):
        rows = todo[first : first + batch]
        yield rows, states(rows)


def proposals(seed: int, iteration: int, rows: np.ndarray, side: int, height: int, channels: int):
    """The squares proposed at `iteration` to the examples `rows`: top-left corners int32 [k, 2]
    in [0, height - side) and signs float32 [k, channels] in {-1, +1}. Each example's draw depends
    only on (seed, iteration, its index): not on the batch, nor on which others are attacked."""
    corners = _per_example((seed, 1 + iteration, 0), rows, lambda rng: rng.integers(0, height - side, (_BLOCK, 2)))
    return corners.astype(np.int32), _signs((seed, 1 + iteration, 1), rows, (channels,))


def _signs(key: tuple[int, ...], rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Random signs float32 [len(rows), *shape], each example's from (key, its index) alone."""
    return _per_example(key, rows, lambda rng: rng.choice(np.array([-1.0, 1.0], np.float32), (_BLOCK, *shape)))


def _per_example(key: tuple[int, ...], rows: np.ndarray, draw) -> np.ndarray:
    """draw(rng)[i % _BLOCK] for each example index i of `rows`, with rng seeded from (key, i // _BLOCK):
    blocks of consecutive examples share one generator, so that drawing stays cheap."""
    blocks = rows // _BLOCK
    out = None
    for block in np.unique(blocks):
        at = np.flatnonzero(blocks == block)
        drawn = draw(np.random.default_rng([*key, int(block)]))
        if out is None:
            out = np.empty((len(rows), *drawn.shape[1:]), drawn.dtype)
        out[at] = drawn[rows[at] % _BLOCK]
    return out
