"""L-inf attacks: FGSM, BIM and PGD with random restarts, as plain functions on a Keras model.

    x_adv = pgd(model, x, y, eps=0.3)                       # the paper's PGD: 100 steps of eps/10, 20 restarts
    x_adv = bim(model, x, y, eps=0.3)                       # the same from x itself, once
    x_adv = fgsm(model, x, y, eps=0.3)                      # one step of size eps
    x_adv = pgd(with_backward(model, "smooth"), x, y, eps=0.3, loss="cw")

One implementation (as in CleverHans): FGSM is one step of size eps from x, BIM is PGD without
random start and with one restart. Every step is x <- project(x + step_size * sign(grad)), the
projection onto the eps-ball around x intersected with [clip_min, clip_max]. The attack of one
batch is the kernel `CompiledAttack`: its loop over steps is compiled once per batch shape (see
`backend.compile_model_function`), and eps, step size and steps are traced values, so a sweep
over eps does not retrace. On the CPU a batch runs in calls of `backend.attack_steps_per_call()`
steps, so that the progress bar (`polar_tf.progress`) moves and Ctrl-C stops within seconds.
Batching, restarts, the saturation switch, checks and progress are the driver's
(`polar_tf.driver.run`). Adversarial training takes the same steps (`signed_gradient_steps`) inside
Keras' train step (`polar_tf.adversarial_training`).

What is attacked: the model as it is evaluated. The front end's saturation is switched on for the
attack (and restored after), as `models.accuracy` does. Gradients through a saturation are those
its layer defines: the straight-through identity (BPDA) by default; `with_backward(model,
"smooth")` makes a copy whose saturation back-propagates the tanh surrogate instead.

Losses (per example, summed over the batch so that each example's gradient is its own; see
`polar_tf.losses`):
  - "ce": the reference's loss, cross-entropy with its MSE fallback where the reference's float64
    cross-entropy underflows (`losses.cross_entropy(..., reference_fallback=True)`);
  - "cw": the Carlini-Wagner margin max_{j != y} l_j - l_y, whose gradient does not vanish on
    confident examples.

Restarts (PGD), as the driver runs them: each restart starts from a uniform random point of the
eps-ball, that of example i in restart r drawn from (seed, r, i) alone; per example the first
restart that fools the model is kept, else the one of highest loss, and later restarts attack only
the examples still classified correctly.

Every adversarial batch is checked: ||x_adv - x||_inf <= eps and clip_min <= x_adv <= clip_max,
with `INVARIANT_TOLERANCE` of slack for float32 rounding; a violation raises
`AttackInvariantError`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from polar_tf import backend, driver, losses, models
from polar_tf.config import BACKWARDS, check_choice
# Public names of this module that live in the driver, kept for their callers.
from polar_tf.driver import INVARIANT_TOLERANCE, AttackInvariantError, check_adversarial  # noqa: F401
from polar_tf.evaluation_config import DEFAULT_RESTARTS, DEFAULT_STEPS, LOSSES
from polar_tf.frontend import PolarizingFrontEnd, Saturation


def per_example_loss(logits, y, loss: str = "ce"):
    """The attack's loss for each example, to be maximized.

    Args:
      logits: [batch, classes].
      y: integer labels [batch].
      loss: "ce" (cross-entropy with the reference's MSE fallback, `losses.cross_entropy`) or
        "cw" (margin max_{j != y} l_j - l_y, `losses.cw`).

    Returns:
      A [batch] tensor.
    """
    check_choice("loss", loss, LOSSES)
    return losses.cw(logits, y) if loss == "cw" else losses.cross_entropy(logits, y, reference_fallback=True)


def project(x_adv, x, eps, clip_min: float = 0.0, clip_max: float = 1.0):
    """Projects x_adv onto {x' : ||x' - x||_inf <= eps, clip_min <= x' <= clip_max} (elementwise)."""
    low = ops.maximum(x - eps, clip_min)
    high = ops.minimum(x + eps, clip_max)
    return ops.minimum(ops.maximum(x_adv, low), high)


def start(x, noise, eps, clip_min: float = 0.0, clip_max: float = 1.0):
    """project(x + eps * noise): where an attack from noise in [-1, 1] starts (tensors in, tensor out)."""
    return project(x + eps * noise, x, eps, clip_min, clip_max)


def start_point(x: np.ndarray, noise: np.ndarray, eps: float, clip_min: float = 0.0, clip_max: float = 1.0) -> np.ndarray:
    """`start` on NumPy arrays, as a NumPy array."""
    return ops.convert_to_numpy(start(x, noise, np.float32(eps), clip_min, clip_max))


def signed_gradient_step(value_and_grad, objective, x, y, x_t, eps, step_size, clip_min: float = 0.0,
                         clip_max: float = 1.0):
    """One step of every attack here: project(x_t + step_size * sign(d sum(objective) / dx_t)).

    Args:
      value_and_grad: `backend.forward_value_and_grad` of the attacked model's forward pass.
      objective: the per-example loss to maximize, (logits, y) -> [batch] (`per_example_loss`).
      x, y: the clean batch and its labels.
      x_t: the current adversarial batch.
      eps, step_size: the attack's radius and step (floats or scalar tensors).
      clip_min, clip_max: the valid pixel range.
    """
    _, _, gradient = value_and_grad(objective, x_t, y)
    return project(x_t + step_size * ops.sign(gradient), x, eps, clip_min, clip_max)


def signed_gradient_steps(value_and_grad, objective, x, y, x_adv, eps, step_size, steps, clip_min: float = 0.0,
                          clip_max: float = 1.0):
    """`steps` of `signed_gradient_step` from x_adv, as one `keras.ops.fori_loop`."""
    return ops.fori_loop(
        0, steps,
        lambda _, x_t: signed_gradient_step(value_and_grad, objective, x, y, x_t, eps, step_size, clip_min, clip_max),
        x_adv,
    )


class CompiledAttack:
    """The kernel of FGSM, BIM and PGD for one model, loss and clip range: signed-gradient steps on
    one batch, compiled.

    Attributes:
      traces: how many times its compiled functions were traced (two per batch shape: the steps,
        or the single step where a call takes one, and the loss and logits at their end).
      image_steps: gradient steps taken so far, summed over the (unpadded) images attacked.
    """

    def __init__(self, model: keras.Model, loss: str = "ce", clip_min: float = 0.0, clip_max: float = 1.0):
        check_choice("loss", loss, LOSSES)
        self.loss = loss
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.traces = 0
        self.image_steps = 0

        def objective(logits, y):
            return per_example_loss(logits, y, loss)

        def take_step(forward, value_and_grad, x, y, x_adv, eps, step_size):
            return signed_gradient_step(value_and_grad, objective, x, y, x_adv, eps, step_size, self.clip_min, self.clip_max)

        def take_steps(forward, value_and_grad, x, y, x_adv, eps, step_size, steps):
            return signed_gradient_steps(value_and_grad, objective, x, y, x_adv, eps, step_size, steps,
                                         self.clip_min, self.clip_max)

        def evaluate(forward, value_and_grad, x_adv, y):
            logits = forward(x_adv)
            return objective(logits, y), logits

        # One step per call (JAX on the CPU) is a function of its own: XLA on the CPU runs a
        # gradient step inside a loop, even of one iteration, several times slower.
        self._step = backend.compile_model_function(model, take_step, self._count_trace)
        self._steps = backend.compile_model_function(model, take_steps, self._count_trace)
        self._evaluate = backend.compile_model_function(model, evaluate, self._count_trace)

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
        f32 = np.float32
        x_adv = start_point(x, noise, eps, self.clip_min, self.clip_max)
        x, y = ops.convert_to_tensor(np.asarray(x, f32)), ops.convert_to_tensor(np.asarray(y, np.int32))
        per_call = steps_per_call or max(steps, 1)
        done = 0
        while done < steps:
            count = min(per_call, steps - done)
            if per_call == 1:
                x_adv = self._step(x, y, x_adv, f32(eps), f32(step_size))
            else:
                x_adv = self._steps(x, y, x_adv, f32(eps), f32(step_size), np.int32(count))
            done += count
            if on_steps is not None:
                on_steps(done)
        losses_at, logits = self._evaluate(x_adv, y)
        return tuple(ops.convert_to_numpy(v) for v in (x_adv, losses_at, logits))

    def kernel(self, eps: float, step_size: float, steps: int) -> driver.Kernel:
        """This attack as the driver's per-batch kernel (the target is ignored)."""

        def attack(x, y, noise, target, count, on_progress):
            x_adv, loss, logits = self(x, y, noise, eps, step_size, steps,
                                       steps_per_call=backend.attack_steps_per_call(),
                                       on_steps=lambda done: on_progress(done / steps))
            self.image_steps += count * steps
            return x_adv, np.argmax(logits, axis=-1) != y, loss

        return attack


def compiled_attack(model: keras.Model, loss: str = "ce", clip_min: float = 0.0, clip_max: float = 1.0) -> CompiledAttack:
    """The `CompiledAttack` of (model, loss, clip range), made on first use and then reused."""
    return driver.per_model(model, CompiledAttack, loss, float(clip_min), float(clip_max))


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
    x, y = driver.check_data(x, y, clip_min, clip_max)
    step_size = eps / 10 if step_size is None else step_size
    driver.check_settings(eps, step_size, steps, restarts, random_start, seed)
    batch_size = driver.check_batch_size(batch_size)
    attack = compiled_attack(model, loss, clip_min, clip_max)
    title = f"{name} eps={eps:g}: {len(x)} examples" + (f" x {restarts} restarts" if restarts > 1 else "")
    with models.as_evaluated(model):
        return driver.run(
            attack.kernel(eps, step_size, steps), x, y, [driver.Run(r) for r in range(restarts)], eps=eps,
            clip_min=clip_min, clip_max=clip_max, seed=seed, random_start=random_start, batch_size=batch_size,
            title=f"{title}, {steps} step{'s' * (steps != 1)} of {step_size:g}", name=name,
        )


def bim(model: keras.Model, x: np.ndarray, y: np.ndarray, **settings) -> np.ndarray:
    """The basic iterative method (Kurakin et al.): PGD from x itself, one restart.

    Arguments as `pgd` (eps, step_size, steps, loss, clip_min, clip_max, batch_size). Returns the
    adversarial images.
    """
    return pgd(model, x, y, restarts=1, random_start=False, name="bim", **settings)


def fgsm(model: keras.Model, x: np.ndarray, y: np.ndarray, *, eps: float, **settings) -> np.ndarray:
    """The fast gradient sign method (Goodfellow et al.): clip(x + eps * sign(grad), clip range).

    Arguments as `pgd` (eps, loss, clip_min, clip_max, batch_size). Returns the adversarial images.
    """
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, restarts=1, random_start=False, name="fgsm", **settings)


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
