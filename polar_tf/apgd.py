"""Auto-PGD (Croce & Hein 2020): APGD-CE, APGD-DLR and APGD-T, the white-box core of AutoAttack, L-inf.

    x_adv = apgd(model, x, y, eps=0.3)                        # APGD-CE, 100 iterations, 1 restart
    x_adv = apgd(model, x, y, eps=0.3, loss="dlr")            # APGD with the DLR loss
    x_adv = apgd(model, x, y, eps=0.3, loss="dlr-t")          # APGD-T: targeted DLR, 9 target classes
    x_adv = apgd(with_backward(model, "smooth"), x, y, eps=0.3)

Algorithm 1 of the paper, as their reference implementation runs it:
  - start from a uniform random point of the eps-ball; step size eta = 2 eps for every example;
  - each iteration: z = P(x_k + eta sign(grad)), x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))
    with momentum a = 0.75 (a = 1 at the first iteration), P the projection onto the eps-ball
    and the pixel range;
  - checkpoints after 22, 19, 16, ... iterations (p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as integers: the reference's
    k_1 = 0.22 n, k_{j+1} = max(k_j - 0.03 n, 0.06 n)). At a checkpoint an example's step size is
    halved, and it restarts from its best point (with the gradient there), if (a) its loss
    increased in at most rho = 0.75 of the iterations since the last checkpoint, or (b) its step
    size was not halved at the last checkpoint and its best loss has not improved since.
All of this state (`State`: step size, counters, best points) is per example. The iterations run in
compiled calls (`backend.compile_model_function`), traced once per batch shape and number of
iterations per call: on an accelerator all of them as one loop (a GPU shared by several processes
took about 8 ms per call, BENCHMARKS.md), on the CPU one per call (20 per call, as TensorFlow's PGD
runs there, was about 9% slower: BENCHMARKS.md); the state stays on the device between calls. The
attack of one batch is the kernel `CompiledAPGD`; batching, restarts and target classes, the
saturation switch, checks and progress are the driver's (`polar_tf.driver.run`).

Losses (maximized; `polar_tf.losses`): "ce" is the cross-entropy (`losses.cross_entropy`), as in
Croce & Hein: without the MSE fallback of the paper's attacks, whose maximization can raise the
true logit of a confident example. "dlr" is the difference of logits ratio (`losses.dlr`),
invariant to shifting and scaling the logits. "dlr-t" is AutoAttack's targeted DLR
(`losses.dlr_targeted`), run once per target class t: the classes
ranked 2nd, 3rd, ... (`target_classes` of them, 9 in AutoAttack's standard version) by the clean
logits, each run attacking the examples no earlier one fooled, from the same random start (as
the reference, which reseeds for every target).

Result per example: the last point that fooled the model if any did, else the point of highest
loss. As in the reference, examples the model already misclassifies are returned unchanged (x
itself is adversarial); restarts after the first attack only the examples not yet fooled, from a
new random start, and keep per example the restart that fooled it or else the one of highest loss;
the start of example i in restart r depends only on (seed, r, i) (`driver.uniform_noise`).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from polar_tf import attacks, backend, driver, losses, models

LOSSES = ("ce", "dlr", "dlr-t")
DEFAULT_ITERATIONS = 100
DEFAULT_TARGET_CLASSES = 9
MOMENTUM = 0.75
RHO = 0.75


def objective(loss: str):
    """The per-example loss function (logits, y, target) -> [batch] that `loss` names (the
    untargeted ones ignore the target)."""
    if loss == "dlr-t":
        return losses.dlr_targeted
    if loss == "dlr":
        return lambda logits, y, target: losses.dlr(logits, y)
    if loss == "ce":
        return lambda logits, y, target: losses.cross_entropy(logits, y)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}. Received: loss={loss!r}")


class State(NamedTuple):
    """APGD's per-example state between iterations (all [batch, ...] tensors).

    Attributes:
      x: the current point x_k.
      x_previous: x_{k-1}, for the momentum.
      gradient: the gradient the next step follows (at x_k, or at x_best after a restart from it).
      loss: the loss at x_k.
      x_best, loss_best, gradient_best: the point of highest loss so far, its loss and gradient.
      x_fooled: the last point that fooled the model (x_best's shape; meaningful where `fooled`).
      fooled: whether any point so far fooled the model.
      step: the step size eta.
      increases: iterations since the last checkpoint whose loss rose.
      loss_best_at_check: loss_best at the last checkpoint.
      reduced_at_check: 1 where the step size was halved at the last checkpoint, else 0.
    """

    x: object
    x_previous: object
    gradient: object
    loss: object
    x_best: object
    loss_best: object
    gradient_best: object
    x_fooled: object
    fooled: object
    step: object
    increases: object
    loss_best_at_check: object
    reduced_at_check: object


def checkpoints(iterations: int) -> list[tuple[int, int]]:
    """(iteration index after which a checkpoint falls, iterations since the previous one).

    The reference's integer schedule: windows of max(0.22 n, 1), then each max(0.03 n, 1) shorter,
    down to max(0.06 n, 1). For n = 100: after iterations 22, 41, 57, 70, 80, 87, 93, 99 (1-based).
    """
    window = max(int(0.22 * iterations), 1)
    shrink, shortest = max(int(0.03 * iterations), 1), max(int(0.06 * iterations), 1)
    points, done = [], 0
    while done + window <= iterations:
        done += window
        points.append((done - 1, window))
        window = max(window - shrink, shortest)
    return points


def _rows(flag, like):
    """A [batch] flag shaped to broadcast against `like` [batch, ...]."""
    return ops.reshape(flag, (-1,) + (1,) * (len(like.shape) - 1))


class CompiledAPGD:
    """APGD's compiled start and iteration for one model, loss and clip range.

    Attributes:
      traces: times its compiled functions were traced (two per batch shape).
      image_steps: gradient evaluations so far, summed over the (unpadded) images attacked.
    """

    def __init__(self, model: keras.Model, loss: str = "ce", clip_min: float = 0.0, clip_max: float = 1.0):
        loss_fn = objective(loss)
        self.loss = loss
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.traces = 0
        self.image_steps = 0

        def project(x_adv, x, eps):
            return attacks.project(x_adv, x, eps, self.clip_min, self.clip_max)

        def start(forward, value_and_grad, x, y, target, noise, eps):
            x_adv = project(x + eps * noise, x, eps)
            loss, logits, gradient = value_and_grad(lambda z, t: loss_fn(z, y, t), x_adv, target)
            fooled = ops.argmax(logits, axis=-1) != ops.cast(y, "int32")
            ones = ops.ones_like(loss)
            return State(x=x_adv, x_previous=x_adv, gradient=gradient, loss=loss, x_best=x_adv, loss_best=loss,
                         gradient_best=gradient, x_fooled=x_adv, fooled=fooled, step=2.0 * eps * ones,
                         increases=0.0 * ones, loss_best_at_check=loss, reduced_at_check=ones)

        def iterate(forward, value_and_grad, state: State, x, y, target, eps, momentum, window):
            """One iteration; a checkpoint falls after it where `window` (its iterations since the
            last one) is not 0."""
            x_k = state.x
            z = project(x_k + _rows(state.step, x_k) * ops.sign(state.gradient), x, eps)
            x_next = project(x_k + momentum * (z - x_k) + (1.0 - momentum) * (x_k - state.x_previous), x, eps)
            loss_next, logits, gradient_next = value_and_grad(lambda z, t: loss_fn(z, y, t), x_next, target)
            wrong = ops.argmax(logits, axis=-1) != ops.cast(y, "int32")
            increases = state.increases + ops.cast(loss_next > state.loss, state.increases.dtype)
            better = loss_next > state.loss_best
            x_best = ops.where(_rows(better, x_next), x_next, state.x_best)
            gradient_best = ops.where(_rows(better, x_next), gradient_next, state.gradient_best)
            loss_best = ops.where(better, loss_next, state.loss_best)
            # Checkpoint (after the iterations `checkpoints` lists).
            checking = window > 0
            oscillating = increases <= window * RHO
            stalled = ops.logical_and(state.reduced_at_check < 0.5, state.loss_best_at_check >= loss_best)
            reduce = ops.logical_and(checking, ops.logical_or(oscillating, stalled))
            return State(
                x=ops.where(_rows(reduce, x_next), x_best, x_next),
                x_previous=x_next,
                gradient=ops.where(_rows(reduce, x_next), gradient_best, gradient_next),
                loss=loss_next,
                x_best=x_best,
                loss_best=loss_best,
                gradient_best=gradient_best,
                x_fooled=ops.where(_rows(wrong, x_next), x_next, state.x_fooled),
                fooled=ops.logical_or(state.fooled, wrong),
                step=ops.where(reduce, 0.5 * state.step, state.step),
                increases=ops.where(checking, 0.0 * increases, increases),
                loss_best_at_check=ops.where(checking, loss_best, state.loss_best_at_check),
                reduced_at_check=ops.where(checking, ops.cast(reduce, state.step.dtype), state.reduced_at_check),
            )

        def iterations(forward, value_and_grad, state: State, x, y, target, eps, momenta, windows):
            """len(momenta) iterations as one loop, iteration j with momenta[j] and windows[j]."""
            def body(j, state):
                return iterate(forward, value_and_grad, state, x, y, target, eps, ops.take(momenta, j),
                               ops.take(windows, j))
            return ops.fori_loop(0, momenta.shape[0], body, state)

        self._start = backend.compile_model_function(model, start, self._count_trace)
        # One iteration per call (the CPU) is a function of its own, as PGD's: XLA on the CPU runs a
        # gradient inside a loop slower (`backend.attack_steps_per_call`), TensorFlow's loop costs too.
        self._iterate = backend.compile_model_function(model, iterate, self._count_trace)
        self._iterations = backend.compile_model_function(model, iterations, self._count_trace)

    def _count_trace(self) -> None:
        self.traces += 1

    def __call__(self, x, y, target, noise, eps: float, iterations: int, on_iteration=None,
                 iterations_per_call: int | None = None):
        """Attacks one batch (towards `target`, for the targeted loss; else it is ignored); returns
        (x_adv, fooled, best loss) as NumPy arrays.

        The iterations run in compiled calls of at most `iterations_per_call` (None: one call), each
        continuing from the last one's state; `on_iteration(done)`, if given, is called after each
        call with the number of iterations done."""
        f32 = np.float32
        x_np = x
        x, y, target = (ops.convert_to_tensor(v) for v in (x, y, target))  # on the device once
        state = self._start(x, y, target, noise, f32(eps))
        schedule = dict(checkpoints(iterations))
        momenta = np.array([1.0 if i == 0 else MOMENTUM for i in range(iterations)], f32)
        windows = np.array([schedule.get(i, 0) for i in range(iterations)], f32)
        per_call = iterations_per_call or max(iterations, 1)
        for first in range(0, iterations, per_call):
            if per_call == 1:
                state = self._iterate(state, x, y, target, f32(eps), momenta[first], windows[first])
            else:
                part = slice(first, first + per_call)
                state = self._iterations(state, x, y, target, f32(eps), momenta[part], windows[part])
            if on_iteration is not None:
                on_iteration(min(first + per_call, iterations))
        x_best, loss_best, x_fooled, fooled = (
            ops.convert_to_numpy(v) for v in (state.x_best, state.loss_best, state.x_fooled, state.fooled)
        )
        return np.where(fooled.reshape((-1,) + (1,) * (x_np.ndim - 1)), x_fooled, x_best), fooled, loss_best

    def kernel(self, eps: float, iterations: int) -> driver.Kernel:
        """This attack as the driver's per-batch kernel."""

        def attack(x, y, noise, target, count, on_progress):
            x_adv, fooled, loss = self(x, y, target, noise, eps, iterations,
                                       on_iteration=lambda done: on_progress(done / iterations),
                                       iterations_per_call=None if backend.on_accelerator() else 1)
            self.image_steps += count * (iterations + 1)
            return x_adv, fooled, loss

        return attack


def compiled_apgd(model: keras.Model, loss: str = "ce", clip_min: float = 0.0, clip_max: float = 1.0) -> CompiledAPGD:
    """The `CompiledAPGD` of (model, loss, clip range), made on first use and then reused."""
    return driver.per_model(model, CompiledAPGD, loss, float(clip_min), float(clip_max))


def apgd(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    iterations: int = DEFAULT_ITERATIONS,
    restarts: int = 1,
    loss: str = "ce",
    target_classes: int = DEFAULT_TARGET_CLASSES,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
) -> np.ndarray:
    """APGD (Croce & Hein 2020, Algorithm 1), L-inf: untargeted, or targeted (APGD-T).

    Args:
      model: a Keras model from images to logits (its saturation is switched on for the attack).
      x: clean images, float32 in [clip_min, clip_max], [n, ...].
      y: integer labels [n].
      eps: the L-inf radius.
      iterations: iterations per restart (the paper's N_iter, 100).
      restarts: attacks from independent random starts; later ones only on examples not yet fooled.
      loss: "ce" (APGD-CE), "dlr" (APGD-DLR; at least 3 classes) or "dlr-t" (APGD-T; at least
        target_classes + 1 and 4 classes).
      target_classes: for "dlr-t", how many target classes (ranked 2nd, 3rd, ... by the clean
        logits) are attacked in turn, each with `restarts` restarts; ignored otherwise.
      clip_min, clip_max: the valid pixel range.
      seed: seeds the random starts.
      batch_size: images per compiled call (None: `backend.default_attack_batch_size()`).

    Returns:
      The adversarial images, float32, shaped like x.

    Raises:
      ValueError: bad arguments, or x outside [clip_min, clip_max].
      AttackInvariantError: an adversarial batch left the eps-ball or the pixel range.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}. Received: loss={loss!r}")
    x, y = driver.check_data(x, y, clip_min, clip_max)
    driver.check_settings(eps, eps, iterations, restarts, True, seed)
    targeted = loss == "dlr-t"
    if targeted and not (isinstance(target_classes, (int, np.integer)) and target_classes >= 1):
        raise ValueError(f"target_classes must be a positive integer. Received: target_classes={target_classes}")
    batch_size = driver.check_batch_size(batch_size)
    n = len(x)
    if n == 0 or eps == 0:
        return x.copy()
    compiled = compiled_apgd(model, loss, clip_min, clip_max)
    with models.as_evaluated(model):
        logits = models.predict_logits(model, x, batch_size)
        ranked = np.argsort(-logits, axis=1, kind="stable")
        if targeted and ranked.shape[1] < max(target_classes + 1, 4):
            raise ValueError(f"dlr-t needs at least max(target_classes + 1, 4) classes. Received: {ranked.shape[1]} "
                             f"classes, target_classes={target_classes}")
        # The runs, in order: each target class (ranked 2nd, 3rd, ... by the clean logits) with
        # every restart, all from the same random starts; untargeted, the restarts.
        runs = [driver.Run(r, ranked[:, rank - 1]) for rank in range(2, target_classes + 2) for r in range(restarts)] \
            if targeted else [driver.Run(r) for r in range(restarts)]
        title = f"apgd-{loss} eps={eps:g}: {n} examples" + (f" x {len(runs)} runs" if len(runs) > 1 else "")
        return driver.run(
            compiled.kernel(eps, iterations), x, y, runs, eps=eps, clip_min=clip_min, clip_max=clip_max, seed=seed,
            random_start=True, batch_size=batch_size, title=f"{title}, {iterations} iterations", name=f"apgd-{loss}",
            fooled=np.argmax(logits, axis=1) != y,  # already adversarial: x itself
        )
