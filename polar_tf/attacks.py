"""L-inf attacks: FGSM, BIM and PGD with random restarts, as plain functions on a Keras model.

    x_adv = pgd(model, x, y, eps=0.3)                       # the paper's PGD: 100 steps of eps/10, 20 restarts
    x_adv = bim(model, x, y, eps=0.3)                       # the same from x itself, once
    x_adv = fgsm(model, x, y, eps=0.3)                      # one step of size eps
    x_adv = pgd(with_backward(model, "smooth"), x, y, eps=0.3, loss="cw")

One implementation (as in CleverHans): FGSM is one step of size eps from x, BIM is PGD without
random start and with one restart. Every step is x <- project(x + step_size * sign(grad)), the
projection onto the eps-ball around x intersected with [clip_min, clip_max]. The loop over steps
is compiled once per batch shape (see `backend.compile_attack_loop`); batches are padded to one
size, and eps, step size and steps are traced values, so a sweep over eps does not retrace. On
the CPU a batch runs in calls of `backend.attack_steps_per_call()` steps, so that the progress bar
(`polar_tf.progress`) moves and Ctrl-C stops within seconds.

What is attacked: the model as it is evaluated. The front end's saturation is switched on for the
attack (and restored after), as `models.accuracy` does. Gradients through a saturation are those
its layer defines: the straight-through identity (BPDA) by default; `with_backward(model,
"smooth")` makes a copy whose saturation back-propagates the tanh surrogate instead.

Losses (per example, summed over the batch so that each example's gradient is its own):
  - "ce": the reference's loss. Cross-entropy on the logits, computed as
    softplus(logsumexp_{j != y}(l_j - l_y)); this equals -log softmax(l)_y and its gradient is
    exact in float32 where -log softmax differentiated directly rounds p_y - 1 to 0 on confident
    examples. Where the reference's float64 cross-entropy underflows to exactly 0 (when
    sum_{j != y} exp(l_j - l_y) <= 2^-53), it fell back to the mean squared error between the
    logits and the one-hot label; so does this loss.
  - "cw": the Carlini-Wagner margin max_{j != y} l_j - l_y, whose gradient does not vanish on
    confident examples.

Restarts (PGD): each restart starts from a uniform random point of the eps-ball. Per example the
first restart that fools the model is kept, and later restarts attack only the examples still
classified correctly (the result is the same as attacking all of them, at a fraction of the
cost); for an example no restart fools, the restart with the highest loss is kept. Room left in
a batch by the examples due for restart r is filled with restart r + 1 of examples in that batch,
rather than with padding (ignored if restart r fools the example). The random start of example i
in restart r depends only on (seed, r, i): not on the batch size, nor on which other examples
are attacked.

Every adversarial batch is checked: ||x_adv - x||_inf <= eps and clip_min <= x_adv <= clip_max,
with `INVARIANT_TOLERANCE` of slack for float32 rounding; a violation raises
`AttackInvariantError`.
"""

from __future__ import annotations

import math
import numbers
import time
import weakref

import keras
import numpy as np
from absl import logging
from keras import ops

from polar_tf import backend, progress
from polar_tf.config import BACKWARDS, check_choice
from polar_tf.frontend import PolarizingFrontEnd, Saturation
from polar_tf.models import as_evaluated

ATTACKS = ("fgsm", "bim", "pgd")
LOSSES = ("ce", "cw")
DEFAULT_STEPS = 100
DEFAULT_RESTARTS = 20
INVARIANT_TOLERANCE = 1e-6
# float64's 1 + s rounds to 1 for s <= 2^-53: there the reference's cross-entropy was exactly 0.
_CE_UNDERFLOW_LOG = -53.0 * math.log(2.0)
_MASKED_LOGIT = -1e30
_NOISE_BLOCK = 256


class AttackInvariantError(RuntimeError):
    """An adversarial example left the eps-ball or the valid pixel range: a bug, never a result."""


def per_example_loss(logits, y, loss: str = "ce"):
    """The attack's loss for each example, to be maximized.

    Args:
      logits: [batch, classes].
      y: integer labels [batch].
      loss: "ce" (cross-entropy with the reference's MSE fallback, see the module docstring) or
        "cw" (margin max_{j != y} l_j - l_y).

    Returns:
      A [batch] tensor.
    """
    check_choice("loss", loss, LOSSES)
    onehot, true_logit, others = _split_logits(logits, y)
    if loss == "cw":
        return ops.max(others, axis=-1) - true_logit
    log_odds = ops.logsumexp(others - true_logit[:, None], axis=-1)
    mse = ops.mean(ops.square(logits - onehot), axis=-1)
    return ops.where(ops.stop_gradient(log_odds) <= _CE_UNDERFLOW_LOG, mse, ops.softplus(log_odds))


def cross_entropy(logits, y):
    """-log softmax(logits)_y per example, [batch], without the reference's fallback: computed as
    softplus(log sum_{j != y} exp(l_j - l_y)), so that its gradient does not vanish in float32 on
    confident examples."""
    _, true_logit, others = _split_logits(logits, y)
    return ops.softplus(ops.logsumexp(others - true_logit[:, None], axis=-1))


def _split_logits(logits, y):
    """(one-hot labels, the true class's logit, the logits with the true class masked out)."""
    onehot = ops.one_hot(ops.cast(y, "int32"), logits.shape[-1], dtype=logits.dtype)
    return onehot, ops.sum(logits * onehot, axis=-1), ops.where(onehot > 0, _MASKED_LOGIT, logits)


def ce_falls_back(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per example, whether the "ce" loss takes the reference's MSE fallback at these logits: the
    examples so confident that maximizing that loss can raise the true logit rather than lower it."""
    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(y))
    others = logits - logits[rows, y][:, None]
    others[rows, y] = -np.inf
    top = others.max(axis=1)
    log_odds = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return log_odds <= _CE_UNDERFLOW_LOG


def project(x_adv, x, eps, clip_min: float = 0.0, clip_max: float = 1.0):
    """Projects x_adv onto {x' : ||x' - x||_inf <= eps, clip_min <= x' <= clip_max} (elementwise)."""
    low = ops.maximum(x - eps, clip_min)
    high = ops.minimum(x + eps, clip_max)
    return ops.minimum(ops.maximum(x_adv, low), high)


def start_point(x: np.ndarray, noise: np.ndarray, eps: float, clip_min: float = 0.0, clip_max: float = 1.0) -> np.ndarray:
    """project(x + eps * noise): where an attack from noise in [-1, 1] starts, as a NumPy array."""
    return ops.convert_to_numpy(project(x + np.float32(eps) * noise, x, eps, clip_min, clip_max))


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


class CompiledAttack:
    """The compiled attack loop of one model, loss and clip range.

    Attributes:
      traces: how many times its compiled function was traced (once per batch shape).
      image_steps: gradient steps taken so far, summed over the (unpadded) images attacked.
    """

    def __init__(self, model: keras.Model, loss: str = "ce", clip_min: float = 0.0, clip_max: float = 1.0):
        check_choice("loss", loss, LOSSES)
        self.loss = loss
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.traces = 0
        self.image_steps = 0
        self._run = backend.compile_attack_loop(
            model,
            objective=lambda logits, y: per_example_loss(logits, y, loss),
            update=lambda x_t, gradient, x, eps, step_size: project(
                x_t + step_size * ops.sign(gradient), x, eps, self.clip_min, self.clip_max
            ),
            on_trace=self._count_trace,
        )

    def _count_trace(self) -> None:
        self.traces += 1

    def __call__(self, x, y, noise, eps: float, step_size: float, steps: int, steps_per_call: int | None = None,
                 on_steps=None):
        """Attacks one batch from `start_point(x, noise, eps)`.

        Args:
          x, y: the clean batch and its labels.
          noise: the random start in [-1, 1], shaped like x (zeros: start at x).
          eps, step_size, steps: the attack's settings.
          steps_per_call: run the steps in compiled calls of at most this many (None: one call);
            the result is the same, as each call continues from the last one's images.
          on_steps: called with the number of steps done after each call, if given.

        Returns:
          (x_adv, loss, logits) as NumPy arrays, the loss and logits those of x_adv.
        """
        x_adv = start_point(x, noise, eps, self.clip_min, self.clip_max)
        per_call = steps_per_call or max(steps, 1)
        done = 0
        while True:
            count = min(per_call, steps - done)
            x_adv, losses, logits = self._run(x, y, x_adv, eps, step_size, count)
            done += count
            if on_steps is not None:
                on_steps(done)
            if done >= steps:
                return x_adv, losses, logits


_COMPILED: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def per_model(model: keras.Model, compiled_class: type, *args):
    """`compiled_class(model, *args)`, made on first use and then reused, so that an attack is
    traced once per model and settings; the cache does not keep models alive."""
    cache = _COMPILED.setdefault(model, {})
    key = (compiled_class, *args)
    if key not in cache:
        cache[key] = compiled_class(model, *args)
    return cache[key]


def compiled_attack(model: keras.Model, loss: str = "ce", clip_min: float = 0.0, clip_max: float = 1.0) -> CompiledAttack:
    """The `CompiledAttack` of (model, loss, clip range), made on first use and then reused."""
    return per_model(model, CompiledAttack, loss, float(clip_min), float(clip_max))


def pgd(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    step_size: float | None = None,
    steps: int = DEFAULT_STEPS,
    restarts: int = DEFAULT_RESTARTS,
    random_start: bool = True,
    loss: str = "ce",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    name: str = "pgd",
) -> np.ndarray:
    """Projected gradient descent (Madry et al.) with random restarts, L-inf.

    Args:
      model: a Keras model from images to logits.
      x: clean images, float32 in [clip_min, clip_max], [n, ...].
      y: integer labels [n].
      eps: the L-inf radius.
      step_size: size of each signed-gradient step; None means eps / 10.
      steps: steps per restart.
      restarts: attacks from independent random starts; per example the worst case is kept.
      random_start: start from a uniform random point of the eps-ball (else from x; then
        `restarts` must be 1, since restarts from the same point are identical).
      loss: "ce" or "cw" (see `per_example_loss`).
      clip_min, clip_max: the valid pixel range.
      seed: seeds the random starts.
      batch_size: images per compiled call (None: `backend.default_attack_batch_size()`, or n if
        smaller); every call is filled to this size (the last one padded), so all share one trace.
      name: how progress lines name the attack.

    Returns:
      The adversarial images, float32, shaped like x.

    Raises:
      ValueError: bad arguments, or x outside [clip_min, clip_max].
      AttackInvariantError: an adversarial batch left the eps-ball or the pixel range.
    """
    x, y = _check_data(x, y, clip_min, clip_max)
    step_size = eps / 10 if step_size is None else step_size
    _check_settings(eps, step_size, steps, restarts, random_start, seed)
    batch_size = backend.default_attack_batch_size() if batch_size is None else batch_size
    if not (isinstance(batch_size, numbers.Integral) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size}")
    attack = compiled_attack(model, loss, clip_min, clip_max)
    n = len(x)
    batch = min(batch_size, max(n, 1))
    x_best = x.copy()
    best_loss = np.full(n, -np.inf, dtype=np.float32)
    fooled = np.zeros(n, dtype=bool)
    scheduled = np.zeros(n, dtype=np.int64)  # restarts of each example attacked so far
    started = time.perf_counter()
    title = f"{name} eps={eps:g}: {n} examples" + (f" x {restarts} restarts" if restarts > 1 else "")
    bar = progress.bar(f"{title}, {steps} step{'s' * (steps != 1)} of {step_size:g}", n * restarts,
                       "run" if restarts > 1 else "example")

    def settled() -> int:
        """(Example, restart) runs done or made unnecessary by an earlier restart that fooled."""
        return int(np.sum(np.where(fooled, restarts, scheduled)))

    with as_evaluated(model):
        while True:
            before = settled()
            levels, rows = _next_batch(fooled, scheduled, restarts, batch)
            if rows.size == 0:
                break
            noise = _restart_noise(seed, levels, rows, x.shape[1:]) if random_start else np.zeros_like(x[rows])
            accuracy = [("accuracy", 1.0 - fooled.mean())]
            x_adv, losses, logits = attack(
                _pad(x[rows], batch), _pad(y[rows], batch), _pad(noise, batch), eps, step_size, steps,
                steps_per_call=backend.attack_steps_per_call(),
                # The batch's last update comes after its bookkeeping, with the new accuracy.
                on_steps=lambda done: done < steps and bar.update(before + len(rows) * done // steps, accuracy),
            )
            count = len(rows)
            x_adv, losses, logits = x_adv[:count], losses[:count], logits[:count]
            attack.image_steps += count * steps
            check_adversarial(x_adv, x[rows], eps, clip_min, clip_max)
            now_fooled = np.argmax(logits, axis=-1) != y[rows]
            # In restart order, as if restarts ran one after the other: a restart of an example that
            # an earlier one fooled is ignored; otherwise fooling wins, else a higher loss.
            for level in np.unique(levels):
                at = np.flatnonzero(levels == level)
                at = at[~fooled[rows[at]]]
                better = at[now_fooled[at] | (losses[at] > best_loss[rows[at]])]
                x_best[rows[better]] = x_adv[better]
                best_loss[rows[better]] = losses[better]
                fooled[rows[at]] = now_fooled[at]
            bar.update(settled(), [("accuracy", 1.0 - fooled.mean())])
    logging.info("%s eps=%g: %d of %d examples fooled, %.1f s", name, eps, int(fooled.sum()), n, time.perf_counter() - started)
    return x_best


def bim(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    step_size: float | None = None,
    steps: int = DEFAULT_STEPS,
    loss: str = "ce",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    batch_size: int | None = None,
) -> np.ndarray:
    """The basic iterative method (Kurakin et al.): PGD from x itself, one restart.

    Arguments as `pgd`. Returns the adversarial images.
    """
    return pgd(
        model, x, y, eps=eps, step_size=step_size, steps=steps, restarts=1, random_start=False, loss=loss,
        clip_min=clip_min, clip_max=clip_max, batch_size=batch_size, name="bim",
    )


def fgsm(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    loss: str = "ce",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    batch_size: int | None = None,
) -> np.ndarray:
    """The fast gradient sign method (Goodfellow et al.): clip(x + eps * sign(grad), clip range).

    Arguments as `pgd`. Returns the adversarial images.
    """
    return pgd(
        model, x, y, eps=eps, step_size=eps, steps=1, restarts=1, random_start=False, loss=loss,
        clip_min=clip_min, clip_max=clip_max, batch_size=batch_size, name="fgsm",
    )


def with_backward(model: keras.Model, backward: str, steepness: float | None = None) -> keras.Model:
    """A copy of `model` whose saturations back-propagate `backward`; same weights, same outputs.

    Args:
      model: a functional or sequential Keras model.
      backward: "identity" (straight-through, BPDA) or "smooth" (tanh surrogate).
      steepness: slope of the smooth surrogate; None keeps each layer's own.

    Returns:
      The model itself if every saturation already has that backward pass (and steepness),
      else a clone with the weights (switches included) copied.
    """
    check_choice("backward", backward, BACKWARDS)
    saturating = [layer for layer in model.layers if isinstance(layer, (PolarizingFrontEnd, Saturation))]
    if all(
        layer.backward == backward and (steepness is None or layer.steepness == steepness) for layer in saturating
    ):
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, (PolarizingFrontEnd, Saturation)):
            config["backward"] = backward
            if steepness is not None:
                config["steepness"] = float(steepness)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _next_batch(fooled: np.ndarray, scheduled: np.ndarray, restarts: int, size: int):
    """The next (restart, example) pairs to attack, at most `size`, in restart order.

    Restart r of an example is due when none of its restarts so far fooled the model. When the
    due restart-r pairs do not fill a batch, the batch is topped up with restart r + 1 of examples
    whose restart r is in this batch: work that would otherwise be padding, and that is ignored if
    restart r fools the example. `scheduled` is updated.
    """
    levels, rows = [], []
    room = size
    for level in range(restarts):
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


def _restart_noise(seed: int, levels: np.ndarray, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform noise in [-1, 1) for each (restart, example) pair; it depends only on (seed, restart,
    example index), so not on batching. Drawn in blocks of `_NOISE_BLOCK` examples."""
    noise = np.empty((len(rows), *shape), dtype=np.float32)
    blocks = rows // _NOISE_BLOCK
    for level, block in set(zip(levels.tolist(), blocks.tolist())):
        at = np.flatnonzero((levels == level) & (blocks == block))
        drawn = np.random.default_rng([seed, level, block]).random((_NOISE_BLOCK, *shape), dtype=np.float32)
        noise[at] = drawn[rows[at] % _NOISE_BLOCK] * 2.0 - 1.0
    return noise


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) == size:
        return array
    padding = np.zeros((size - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, padding])


def _check_data(x, y, clip_min: float, clip_max: float) -> tuple[np.ndarray, np.ndarray]:
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


def _check_settings(eps, step_size, steps, restarts, random_start, seed) -> None:
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
