"""The attack driver: everything an attack does around its per-batch kernel, written once.

An attack is a kernel that attacks one padded batch once (AutoAttack's `attack_single_run`
shape): `kernel(x, y, noise, target, count, on_progress) -> (x_adv, fooled, loss)`. `run` owns
the rest:
  - input validation (`check_data`, `check_settings`, `check_batch_size`);
  - the model as it is evaluated: its saturation switched on for the attack, restored after
    (`models.as_evaluated`);
  - batching: batches of one size, min(batch_size, n) rounded up to a multiple of the devices of
    a data-parallel run, the last one padded (`pad`), so that all share one trace;
  - runs: restarts (and, for a targeted attack, target classes) from random starts. Per example
    the first run that fools the model is kept, and later runs attack only the examples not yet
    fooled; for an example no run fools, the run with the highest loss is kept. Room left in a
    batch by the examples due for run r is filled with run r + 1 of examples in that batch (ignored
    if run r fools the example): the result is the one of running the runs one after the other;
  - one seeding scheme: every random draw of example i depends only on (seed, a key, i), never on
    the batch shape or on which other examples are attacked (`per_example`, `uniform_noise`);
  - the invariant checks of every adversarial batch (`check_adversarial`);
  - the progress bar (`polar_tf.progress`) and a closing log line.

The Square attack uses the driver's validation, seeding, evaluation switch and checks, but runs its
own loop (`polar_tf.square.Run`): its fooled examples leave the compiled calls every few
iterations and the rest are re-packed into a few shapes, which per-batch kernels cannot express.
"""

from __future__ import annotations

import math
import numbers
import time
import weakref
from typing import Callable, NamedTuple, Protocol, Sequence

import keras
import numpy as np
from absl import logging

from polar_tf import backend, progress

INVARIANT_TOLERANCE = 1e-6
BLOCK = 256  # examples per random generator (see `per_example`)


class AttackInvariantError(RuntimeError):
    """An adversarial example left the eps-ball or the valid pixel range: a bug, never a result."""


class Kernel(Protocol):
    def __call__(self, x: np.ndarray, y: np.ndarray, noise: np.ndarray, target: np.ndarray, count: int,
                 on_progress: Callable[[float], object]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Attacks one batch once from `noise` (in [-1, 1], shaped like x; zeros: from x).

        Args:
          x, y: the batch (padded: only the first `count` rows are examples).
          noise: the random start.
          target: per row the target class of a targeted attack (else y).
          count: how many rows are real.
          on_progress: to call with the fraction of the batch's work done, as it goes.

        Returns:
          (x_adv, fooled, loss) as NumPy arrays over the batch's rows: the adversarial images,
          whether each fooled the model, and the loss it reached (compared across runs).
        """


class Run(NamedTuple):
    """One attack of every example: the key of its random start and its target classes [n]
    (None: untargeted)."""

    restart: int
    target: np.ndarray | None = None


def check_data(x, y, clip_min: float, clip_max: float) -> tuple[np.ndarray, np.ndarray]:
    """x as float32 [n, ...] in [clip_min, clip_max] and y as int32 [n]; else a ValueError."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers. Received dtype {y.dtype}")
    y = y.astype(np.int32)
    if x.ndim < 2 or y.shape != (len(x),):
        raise ValueError(f"x must be [n, ...] and y [n]. Received shapes {x.shape} and {y.shape}")
    if not clip_min < clip_max:
        raise ValueError(f"clip_min must be < clip_max. Received: clip_min={clip_min}, clip_max={clip_max}")
    if x.size and not (np.min(x) >= clip_min and np.max(x) <= clip_max):
        raise ValueError(f"x must lie in [{clip_min}, {clip_max}]. Received values in [{np.min(x)}, {np.max(x)}]")
    return x, y


def check_settings(eps, step_size, steps: int, restarts: int, random_start: bool, seed: int) -> None:
    """A ValueError unless eps and step_size are finite and >= 0, steps and restarts positive
    integers (restarts > 1 only from random starts) and seed an integer >= 0."""
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0. Received: eps={eps}")
    if not (isinstance(step_size, numbers.Real) and math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"step_size must be a finite number >= 0. Received: step_size={step_size}")
    for label, value in (("steps", steps), ("restarts", restarts)):
        if not (isinstance(value, numbers.Integral) and value >= 1):
            raise ValueError(f"{label} must be a positive integer. Received: {label}={value}")
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts > 1 needs random_start (restarts from x are identical). Received: restarts={restarts}")
    if not (isinstance(seed, numbers.Integral) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0. Received: seed={seed}")


def check_batch_size(batch_size: int | None) -> int:
    """batch_size, or `backend.default_attack_batch_size()` for None; a ValueError unless positive."""
    batch_size = backend.default_attack_batch_size() if batch_size is None else batch_size
    if not (isinstance(batch_size, numbers.Integral) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size}")
    return int(batch_size)


def check_adversarial(
    x_adv: np.ndarray,
    x: np.ndarray,
    eps: float,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    tolerance: float = INVARIANT_TOLERANCE,
) -> None:
    """Raises `AttackInvariantError` unless x_adv is finite, within eps of x and in the clip range."""
    if x_adv.shape != x.shape:
        raise AttackInvariantError(f"adversarial batch has shape {x_adv.shape}, the clean one {x.shape}")
    if not np.all(np.isfinite(x_adv)):
        raise AttackInvariantError(f"adversarial batch holds {np.sum(~np.isfinite(x_adv))} non-finite values")
    distance = float(np.max(np.abs(x_adv.astype(np.float64) - x), initial=0.0))
    if not distance <= eps + tolerance:
        raise AttackInvariantError(f"||x_adv - x||_inf = {distance:.9g} exceeds eps = {eps} (+{tolerance})")
    low, high = float(np.min(x_adv, initial=clip_min)), float(np.max(x_adv, initial=clip_max))
    if low < clip_min - tolerance or high > clip_max + tolerance:
        raise AttackInvariantError(f"x_adv spans [{low:.9g}, {high:.9g}], outside [{clip_min}, {clip_max}]")


def pad(array: np.ndarray, size: int) -> np.ndarray:
    """array with zero rows appended up to `size` rows."""
    if len(array) == size:
        return array
    padding = np.zeros((size - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, padding])


def batch_rows(batch_size: int, n: int) -> int:
    """The rows of every compiled call: min(batch_size, n), at least 1, rounded up to a multiple of
    the devices of a data-parallel run so that each call splits evenly across them."""
    rows = min(batch_size, max(n, 1))
    return -(-rows // backend.replica_count()) * backend.replica_count()


def per_example(key: Sequence[int], rows: np.ndarray, draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """The one seeding scheme of the attacks: draw(rng)[i % BLOCK] for each example index i of
    `rows`, with rng seeded from (*key, i // BLOCK). An example's draw depends only on the key and
    its index; blocks of consecutive examples share one generator, so that drawing stays cheap.

    Args:
      key: what is drawn, e.g. (seed, restart).
      rows: example indices.
      draw: returns an array of BLOCK rows from a generator.
    """
    rows = np.asarray(rows, np.int64)
    blocks = rows // BLOCK
    out = None
    for block in np.unique(blocks):
        at = np.flatnonzero(blocks == block)
        drawn = draw(np.random.default_rng([*key, int(block)]))
        if out is None:
            out = np.empty((len(rows), *drawn.shape[1:]), drawn.dtype)
        out[at] = drawn[rows[at] % BLOCK]
    return out if out is not None else np.zeros((0,), np.float32)


def uniform_noise(seed: int, restart: int, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform noise in [-1, 1), float32 [len(rows), *shape]: restart `restart`'s random start of
    the examples `rows`."""
    noise = per_example((seed, restart), rows, lambda rng: rng.random((BLOCK, *shape), dtype=np.float32))
    return noise.reshape(len(rows), *shape) * 2.0 - 1.0


def signs(key: Sequence[int], rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Random signs, float32 [len(rows), *shape] in {-1, +1}, each example's from (key, its index)."""
    drawn = per_example(key, rows, lambda rng: rng.choice(np.array([-1.0, 1.0], np.float32), (BLOCK, *shape)))
    return drawn.reshape(len(rows), *shape)


_KERNELS: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def per_model(model: keras.Model, compiled_class: type, *args):
    """`compiled_class(model, *args)` (an attack's compiled kernel), made on first use and then
    reused, so that an attack is traced once per model and settings; the cache does not keep
    models alive."""
    cache = _KERNELS.setdefault(model, {})
    key = (compiled_class, *args)
    if key not in cache:
        cache[key] = compiled_class(model, *args)
    return cache[key]


def run(
    kernel: Kernel,
    x: np.ndarray,
    y: np.ndarray,
    runs: Sequence[Run],
    *,
    eps: float,
    clip_min: float,
    clip_max: float,
    seed: int,
    random_start: bool,
    batch_size: int,
    title: str,
    name: str,
    fooled: np.ndarray | None = None,
) -> np.ndarray:
    """Runs `kernel` over x in batches, run after run; returns per example the best result.

    Call it with the saturation on (`models.as_evaluated`) and checked inputs (`check_data`, ...).

    Args:
      kernel: attacks one padded batch once (`Kernel`).
      x, y: the clean examples (float32 [n, ...]) and labels (int32 [n]).
      runs: the attacks of every example, in order: restart r starts from `uniform_noise(seed, r,
        ...)` (from x if not random_start), towards the run's targets if any.
      eps, clip_min, clip_max: the attack's ball and pixel range, checked on every batch.
      seed: seeds the random starts.
      random_start: start from noise (else from x).
      batch_size: the most rows of a compiled call.
      title: the progress bar's title.
      name: how the closing log line names the attack.
      fooled: examples already adversarial (returned unchanged, never attacked); None: none.

    Returns:
      The adversarial images, float32, shaped like x: per example the first run that fooled the
      model, else the run of highest loss (x itself for examples `fooled` marks).
    """
    n, count = len(x), len(runs)
    batch = batch_rows(batch_size, n)
    x_best = x.copy()
    best_loss = np.full(n, -np.inf, dtype=np.float32)
    fooled = np.zeros(n, dtype=bool) if fooled is None else fooled.copy()
    scheduled = np.zeros(n, dtype=np.int64)  # runs of each example attacked so far
    started = time.perf_counter()
    bar = progress.bar(title, n * count, "run" if count > 1 else "example")

    def settled() -> int:
        """(Example, run) pairs done or made unnecessary by an earlier run that fooled."""
        return int(np.sum(np.where(fooled, count, scheduled)))

    while True:
        before = settled()
        levels, rows = _next_batch(fooled, scheduled, count, batch)
        if rows.size == 0:
            break
        noise = np.zeros_like(x[rows])
        target = y[rows].copy()
        for level in np.unique(levels):
            at = np.flatnonzero(levels == level)
            if random_start:
                noise[at] = uniform_noise(seed, runs[level].restart, rows[at], x.shape[1:])
            if runs[level].target is not None:
                target[at] = runs[level].target[rows[at]]
        accuracy = [("accuracy", 1.0 - fooled.mean())]
        size = len(rows)
        x_adv, now_fooled, losses = kernel(
            pad(x[rows], batch), pad(y[rows], batch), pad(noise, batch), pad(target, batch), size,
            # The batch's last update comes after its bookkeeping, with the new accuracy.
            lambda done: done < 1 and bar.update(before + int(size * done), accuracy),
        )
        x_adv, now_fooled, losses = x_adv[:size], now_fooled[:size], losses[:size]
        check_adversarial(x_adv, x[rows], eps, clip_min, clip_max)
        # In run order, as if runs ran one after the other: a run of an example that an earlier
        # one fooled is ignored; otherwise fooling wins, else a higher loss.
        for level in np.unique(levels):
            at = np.flatnonzero(levels == level)
            at = at[~fooled[rows[at]]]
            better = at[now_fooled[at] | (losses[at] > best_loss[rows[at]])]
            x_best[rows[better]] = x_adv[better]
            best_loss[rows[better]] = losses[better]
            fooled[rows[at]] = now_fooled[at]
        bar.update(settled(), [("accuracy", 1.0 - fooled.mean())])
    bar.update(n * count, [("accuracy", 1.0 - fooled.mean())])  # done, or none left to attack
    logging.info("%s eps=%g: %d of %d examples fooled, %.1f s", name, eps, int(fooled.sum()), n,
                 time.perf_counter() - started)
    return x_best


def _next_batch(fooled: np.ndarray, scheduled: np.ndarray, runs: int, size: int):
    """The next (run, example) pairs to attack, at most `size`, in run order.

    Run r of an example is due when none of its runs so far fooled the model. When the due run-r
    pairs do not fill a batch, the batch is topped up with run r + 1 of examples whose run r is in
    this batch: work that would otherwise be padding, and that is ignored if run r fools the
    example. `scheduled` is updated.
    """
    levels, rows = [], []
    room = size
    for level in range(runs):
        if room == 0:
            break
        due = np.flatnonzero(~fooled & (scheduled == level))[:room]
        scheduled[due] += 1
        levels.append(np.full(len(due), level))
        rows.append(due)
        room -= len(due)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(levels), np.concatenate(rows)
