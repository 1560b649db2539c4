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
more than `queries`. A batch's iterations run `SYNC_EVERY` at a time as one compiled loop
(`backend.compile_model_function`); the stripes, squares and signs are drawn on the host, for
each example from (seed, iteration, its index) alone, so the squares proposed do not depend on
the batch size. (Whether a proposal is accepted compares two margins; at a near-tie the float
rounding of another batch shape can decide it otherwise.)
The squares' random numbers are drawn `SYNC_EVERY` iterations at a time (`proposal_draws`):
drawn per iteration, they took about 6.5 ms of host time per iteration for 10,000 examples
(BENCHMARKS.md, "Square attack").

A query is a forward pass, and only the examples still attacked are computed: every
`SYNC_EVERY` iterations the fooled ones leave and the others are re-packed into fewer or
smaller calls, of a few shapes (`Run`, `layout`). On a defended model, where most examples fall
in the first hundred queries and a few hold out to the budget, that is most of the work
(BENCHMARKS.md, "Square attack"). That is why Square is not a per-batch kernel of the attack
driver (`polar_tf.driver.run`, whose batches are fixed until they finish): it takes the driver's
input checks, seeding (`driver.per_example`), saturation switch and invariant check, and keeps its
own loop and progress bar in `Run` and `square`.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
from absl import logging
from keras import ops

from polar_tf import backend, driver, losses, models, progress
from polar_tf.evaluation_config import DEFAULT_P_INIT, DEFAULT_QUERIES

# The reference's schedule: iteration (per 10,000) after which p is halved once more.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_UNCHANGED = 1e-7
SYNC_EVERY = 20  # iterations between copies of the margins to the host, where fooled examples leave


def p_selection(p_init: float, iteration: int, iterations: int, rescale: bool = False) -> float:
    """The fraction of pixels the square covers at `iteration` (of `iterations`, which `rescale`
    maps onto the schedule's 10,000, as the Square reference does; AutoAttack does not)."""
    scaled = int(iteration / iterations * 10000) if rescale else iteration
    return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


def square_side(p: float, height: int, width: int) -> int:
    """Side of a square covering about a fraction p of the image: between 1 and height - 1."""
    return min(max(int(round(math.sqrt(p * height * width))), 1), height - 1)


class CompiledSquare:
    """The Square attack's compiled iterations for one model and clip range: the start's margins
    (`_evaluate`) and a run of iterations as one loop (`_iterate`).

    Attributes:
      traces: times its compiled function was traced (once per batch shape).
    """

    def __init__(self, model: keras.Model, clip_min: float = 0.0, clip_max: float = 1.0):
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.traces = 0

        def clip(values):
            return ops.clip(values, self.clip_min, self.clip_max)

        def evaluate(forward, value_and_grad, x_new, y):
            return losses.margin(forward(x_new), y)

        def step(forward, state, x, y, eps, side, corners, signs, live):
            """One iteration: squares of side `side` at `corners` [k, 2] with `signs` [k, channels];
            nothing changes and no query counts where `live` is false."""
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
            margin_new = losses.margin(forward(x_new), y)
            active = ops.logical_and(margin_best > 0, live)
            better = ops.logical_and(active, margin_new < margin_best)
            x_best = ops.where(ops.reshape(better, (-1, 1, 1, 1)), x_new, x_best)
            margin_best = ops.where(better, margin_new, margin_best)
            return x_best, margin_best, queries + ops.cast(active, queries.dtype)

        def iterate(forward, value_and_grad, state, x, y, eps, sides, corners, signs, count):
            """The first `count` of len(sides) iterations, iteration j with squares of side sides[j]
            at corners[:, j] with signs[:, j], as one loop (the rest change nothing)."""
            def body(j, state):
                return step(forward, state, x, y, eps, ops.take(sides, j), ops.take(corners, j, axis=1),
                            ops.take(signs, j, axis=1), j < count)
            return ops.fori_loop(0, sides.shape[0], body, state)

        self._evaluate = backend.compile_model_function(model, evaluate, self._count_trace)
        self._iterate = backend.compile_model_function(model, iterate, self._count_trace)

    def _count_trace(self) -> None:
        self.traces += 1


def compiled_square(model: keras.Model, clip_min: float = 0.0, clip_max: float = 1.0) -> CompiledSquare:
    """The `CompiledSquare` of (model, clip range), made on first use and then reused."""
    return driver.per_model(model, CompiledSquare, float(clip_min), float(clip_max))


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
    x, y = driver.check_data(x, y, clip_min, clip_max)
    driver.check_settings(eps, eps, 1, 1, True, seed)
    if x.ndim != 4:
        raise ValueError(f"x must be images [n, height, width, channels]. Received shape {x.shape}")
    if not (isinstance(queries, (int, np.integer)) and queries >= 2):
        raise ValueError(f"queries must be an integer >= 2. Received: queries={queries}")
    if not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
        raise ValueError(f"p_init must be in (0, 1]. Received: p_init={p_init}")
    batch_size = driver.check_batch_size(batch_size)
    n = len(x)
    x_adv = x.copy()
    spent = np.ones(n, dtype=np.int64)  # the clean query
    started = time.perf_counter()
    with models.as_evaluated(model):
        correct = models.predict_labels(model, x, max(min(batch_size, n), 1)) == y if n else np.zeros(0, bool)
        todo = np.flatnonzero(correct) if eps > 0 else np.zeros(0, np.int64)
        bar = progress.bar(f"square eps={eps:g}: {todo.size} examples, {queries} queries each", todo.size, "example")
        run = Run(model, x, y, todo, eps=eps, queries=queries, p_init=p_init, clip_min=clip_min, clip_max=clip_max,
                  seed=seed, batch_size=batch_size, rescale_schedule=rescale_schedule)
        shown = -1
        for t, _, _ in run:
            if t != shown:  # once per iteration: the fooled examples count as done, the others in part
                shown = t
                finished = todo.size - run.active
                bar.update(finished + run.active * (t + 2) // queries,
                           [("accuracy", 1 - (n - todo.size + finished) / max(n, 1))])
        driver.check_adversarial(run.x_best, x[todo], eps, clip_min, clip_max)
        x_adv[todo] = run.x_best
        spent[todo] = run.queries
        fooled = n - todo.size + int(np.sum(run.margin <= 0))
        bar.update(todo.size, [("accuracy", 1 - fooled / max(n, 1))])
        logging.info("square eps=%g: %d of %d examples fooled, %d queries at most, %.1f s",
                     eps, fooled, n, queries, time.perf_counter() - started)
    return (x_adv, spent) if return_queries else x_adv


def layout(active: int, batch: int) -> list[int]:
    """The rows of each compiled call that attack `active` examples: full batches, then the rest
    padded up to a power of two (at most `batch`), so that however many examples are left, the
    calls take only a few shapes (each shape is one trace)."""
    full, rest = divmod(active, batch)
    return [batch] * full + ([min(batch, 1 << (rest - 1).bit_length())] if rest else [])


class Run:
    """The attack on the examples `todo` of x (correctly classified ones), iteration by iteration.

    All the examples advance together, `iterations_per_call` iterations (SYNC_EVERY by default, a
    divisor of it) at a time, as one loop, in compiled calls of at most `batch_size` rows
    (`min(batch_size, len(x))`: fixed by the number of examples, not of those attacked). One call
    per iteration paid a dispatch per iteration, most of the time of an attack's tail, where a few
    examples hold out (BENCHMARKS.md, "Square attack").
    Every `SYNC_EVERY` iterations the margins are copied to the host and the examples fooled
    leave: from then on the calls attack only the examples still active, in fewer or smaller
    calls (`layout`; they are re-packed only when that changes the calls' shapes, a fooled example
    left in a call keeps its state). Padding rows repeat a row of the call and mean nothing.

    Iterating over a run (once) attacks and yields, for each compiled call, (t, rows, state):
    t = 0 after the stripes start and t = i + 1 after iteration i (the call's last); `rows` the
    example indices (into x, ascending) whose states are the first len(rows) rows of state =
    (x_best, margin_best, queries spent), backend tensors or NumPy arrays
    (`keras.ops.convert_to_numpy` reads both). Each example is yielded at t = 0 and then after
    every call, without a gap (at t = 0, 1, 2, ... with `iterations_per_call=1`), until it
    leaves, and its last state yielded is its result. Once the iteration is over, `x_best`, `margin` and
    `queries` hold the results of all of `todo`, in its order (NumPy arrays). `square` runs it;
    tests read the states to compare runs. Arguments as `square`; the saturation must already
    be on.

    Attributes:
      active: the examples not fooled at the last copy of the margins (all of them before it).
      x_best, margin, queries: float32 [k, height, width, channels], float32 [k], int32 [k] for
        the k examples of `todo`.
    """

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray, todo: np.ndarray, *, eps: float,
                 queries: int, p_init: float, clip_min: float, clip_max: float, seed: int, batch_size: int,
                 rescale_schedule: bool = False, iterations_per_call: int = SYNC_EVERY):
        if SYNC_EVERY % iterations_per_call:
            raise ValueError(f"iterations_per_call must divide SYNC_EVERY ({SYNC_EVERY}). "
                             f"Received: iterations_per_call={iterations_per_call}")
        self.iterations_per_call = iterations_per_call
        self.x, self.y, self.todo = x, y, np.asarray(todo, np.int64)
        self.eps, self.queries_budget, self.p_init, self.seed = np.float32(eps), queries, p_init, seed
        self.clip_min, self.clip_max, self.rescale_schedule = clip_min, clip_max, rescale_schedule
        self.batch = max(min(batch_size, len(x)), 1)
        self.compiled = compiled_square(model, clip_min, clip_max)
        k = self.todo.size
        self.active = k
        self.x_best = x[self.todo].copy()
        self.margin = np.full(k, np.inf, np.float32)
        self.queries = np.zeros(k, np.int32)

    def __iter__(self):
        _, height, width, channels = self.x.shape
        calls = []  # [positions in todo (padded), how many are real, x, y, state] per compiled call
        for positions, count in self._pack(np.arange(self.todo.size)):
            rows = self.todo[positions]
            xb, yb = self._inputs(rows)
            stripes = driver.signs((self.seed, 0), rows, (1, width, channels))
            x_start = np.clip(self.x[rows] + self.eps * stripes, self.clip_min, self.clip_max)
            state = (x_start, self.compiled._evaluate(x_start, yb), np.full(len(rows), 2, np.int32))
            calls.append([positions, count, xb, yb, state])
            yield 0, rows[:count], state
        iterations, per_call = self.queries_budget - 2, self.iterations_per_call
        for i in range(0, iterations, per_call):
            if i % SYNC_EVERY == 0:
                calls = self._sync(calls)
                if not calls:
                    return
                rows = self.todo[np.concatenate([call[0] for call in calls])]  # fixed until the next copy
                draws = proposal_draws(self.seed, i, rows, channels)
            count = min(per_call, iterations - i)  # the last call's other iterations change nothing
            sides = np.array([square_side(p_selection(self.p_init, i + j, self.queries_budget, self.rescale_schedule),
                                          height, width) for j in range(per_call)], np.int32)
            corners, signs = proposals(draws[:, i % SYNC_EVERY : i % SYNC_EVERY + per_call], sides, height)
            first = 0
            for call in calls:
                size = len(call[0])
                call[4] = self.compiled._iterate(call[4], call[2], call[3], self.eps, sides,
                                                 corners[first : first + size], signs[first : first + size],
                                                 np.int32(count))
                yield i + count, rows[first : first + call[1]], call[4]
                first += size
        self._sync(calls, final=True)

    def _pack(self, positions: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """The calls that attack the examples at `positions` (of todo): each call's positions,
        padded by repeating its first, and how many are real."""
        packed, first = [], 0
        for size in layout(len(positions), self.batch):
            part = positions[first : first + size]
            packed.append((np.concatenate([part, np.repeat(part[:1], size - len(part))]), len(part)))
            first += size
        return packed

    def _inputs(self, rows: np.ndarray):
        # On the device once per call layout, not once per iteration.
        return ops.convert_to_tensor(self.x[rows]), ops.convert_to_tensor(self.y[rows])

    def _sync(self, calls: list, final: bool = False) -> list:
        """Copies the margins to the host; where the examples still active fit in other calls
        (or at the end), copies the states too and re-packs the active examples."""
        for positions, count, _, _, state in calls:
            self.margin[positions[:count]] = ops.convert_to_numpy(state[1])[:count]
        active = np.flatnonzero(self.margin > 0)
        self.active = active.size
        if not final and layout(active.size, self.batch) == [len(call[0]) for call in calls]:
            return calls
        for positions, count, _, _, state in calls:
            at = positions[:count]
            self.x_best[at] = ops.convert_to_numpy(state[0])[:count]
            self.queries[at] = ops.convert_to_numpy(state[2])[:count]
        if final:
            return []
        repacked = []
        for positions, count in self._pack(active):
            xb, yb = self._inputs(self.todo[positions])
            state = (self.x_best[positions], self.margin[positions], self.queries[positions])
            repacked.append([positions, count, xb, yb, state])
        return repacked


def proposal_draws(seed: int, first: int, rows: np.ndarray, channels: int) -> np.ndarray:
    """The random numbers of the squares proposed to the examples `rows` at iterations `first` to
    `first + SYNC_EVERY - 1` (`first` a multiple of SYNC_EVERY): float64 [k, SYNC_EVERY, 2 + channels]
    in [0, 1), per iteration the square's corner (2) and its signs (`channels`), as `proposals`
    reads them. Each example's draw depends only on (seed, its iteration, its index)
    (`driver.per_example`): not on the batch, nor on which others are attacked; one generator per
    block of examples serves SYNC_EVERY iterations."""
    if first % SYNC_EVERY:
        raise ValueError(f"first must be a multiple of SYNC_EVERY ({SYNC_EVERY}). Received: first={first}")
    return driver.per_example((seed, 1 + first // SYNC_EVERY), rows,
                              lambda rng: rng.random((driver.BLOCK, SYNC_EVERY, 2 + channels)))


def proposals(draws: np.ndarray, sides: np.ndarray, height: int):
    """The squares proposed at the iterations of `draws` ([k, m, 2 + channels], m consecutive
    iterations of a `proposal_draws`), of sides `sides` (int [m]): top-left corners int32 [k, m, 2],
    iteration j's in [0, height - sides[j]), and signs float32 [k, m, channels] in {-1, +1}."""
    places = (height - np.asarray(sides)).reshape(1, -1, 1)
    corners = np.floor(draws[:, :, :2] * places).astype(np.int32)  # uniform over the places
    return corners, np.where(draws[:, :, 2:] < 0.5, -1.0, 1.0).astype(np.float32)
