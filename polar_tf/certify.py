"""Certified lower bounds on robust accuracy under an L-inf attack of size eps.

Attacks give an upper bound on robust accuracy; this module gives a sound lower bound.

The attacker may move each pixel anywhere in the box [max(0, x - eps), min(1, x + eps)]. Over
that box each normalized front-end output z = (w * x') / ||w||_1 ranges over an interval we
compute exactly (centre/radius form of a linear map on a box); it lies inside z +- eps (Hölder).
The saturation f(z) = 0.5 * (sign(z - c) + sign(z + c)) is monotone, so an output whose
interval does not reach +-c cannot change at all, and one that does can only take the values
f(z_lo) .. f(z_hi).

Two certificates, both about the saturated model (the one that is evaluated), whatever the
state of the front end's saturation switch:
  1. exact front end: the image is classified correctly and no front-end output can change
     (`changeable_outputs`, from the exact z interval; `outputs_near_jump` is the simpler
     count of outputs with |z -+ c| <= eps, an upper bound on it);
  2. interval: the set of possible front-end outputs (or, for a model without a saturating
     first layer, the input box) is propagated through the classifier with interval bound
     propagation (IBP) up to the last layer, whose bounds are taken on the logit differences
     logit_y - logit_j directly (the last layer "elided" into the specification, Gowal et al.
     2018: never looser than the lower bound of logit_y minus the upper bound of logit_j); the
     image is certified if every such difference is bounded above 0. Every image certified by 1
     is certified by 2.

The interval rules and `margin_bounds` are written with keras.ops and are what certified training
(`polar_tf.certified_training`) differentiates inside its compiled train step: the bounds a model
is trained on are computed by the same code as the bounds it is certified with.

The saturating first layer is the polarizing front end ("frontend" certificates) or the
direct-quantization `Saturation` on the pixels ("quantize" certificates). Models with neither
(baseline, adversarially trained) get only the interval certificate from the input box.

Float rounding. A certificate must not be broken by the model's own float32 arithmetic:
  - intervals of z before a saturation are widened by `Z_MARGIN` on each side; the float32 error
    of a normalized 25-tap convolution is below 25 * 2**-24 (~1.5e-6) in the model and here;
  - a margin is certified only if it exceeds `LOGIT_TOLERANCE` * max(1, largest |logit bound|),
    covering rounding in the classifier and in the straight-through saturation, whose forward
    value z + (f(z) - z) equals f(z) only up to an ulp.
Both only ever withhold certificates (an output exactly at +-c counts as changeable even at
eps = 0). They are generous bounds on float32 error, not a proof with directed rounding.

Usage:
    result = certify(model, x_test, y_test, eps=0.3)
    result.certified_ibp          # per-example bool, what evaluate.py checks against attacks
    result.summary()              # labelled accuracies for results.json
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterator

import keras
import numpy as np
from absl import logging
from keras import ops

from polar_tf import backend, progress
from polar_tf.frontend import PolarizingFrontEnd, Saturation, hard_saturation, saturate

Z_MARGIN = 1e-5
LOGIT_TOLERANCE = 1e-4
# What the certificates are called in `CertificationResult.summary`, by saturating first layer.
SOURCES = ("frontend", "quantize", "input")


class CertificateViolation(RuntimeError):
    """An attack broke a certified example: a bug in the certificate or in the attack."""


@dataclasses.dataclass(frozen=True)
class CertificationResult:
    """Per-example certificates of one model at one eps.

    Attributes:
      eps: the L-inf radius.
      source: where the interval certificate starts: "frontend" (polarizing front end),
        "quantize" (saturation on the pixels) or "input" (no saturating first layer).
      clean_correct: bool [N], the saturated model classifies the clean image correctly.
      changeable_outputs: int [N], outputs of the saturating first layer whose exact interval over
        the attack box reaches a jump +-c (so whose value may change); None for source "input".
      outputs_near_jump: int [N], outputs with |z -+ c| <= eps, the simpler count of the issue
        (an upper bound on changeable_outputs); None for source "input".
      certified_frontend: bool [N], certified by the exact certificate: correct, no changeable
        output, and a clean logit margin above the float tolerance; None for source "input".
      certified_ibp: bool [N], certified by interval propagation from the source (includes every
        example of certified_frontend): the sound lower bound to report.
      margin_lower_bound: float [N], a lower bound on min over the box of
        logit_y - max_{j != y} logit_j; -inf for misclassified images, where none was computed.
    """

    eps: float
    source: str
    clean_correct: np.ndarray
    changeable_outputs: np.ndarray | None
    outputs_near_jump: np.ndarray | None
    certified_frontend: np.ndarray | None
    certified_ibp: np.ndarray
    margin_lower_bound: np.ndarray

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.clean_correct))

    @property
    def frontend_accuracy(self) -> float | None:
        """Certified accuracy of the exact front-end certificate (None without one)."""
        return None if self.certified_frontend is None else float(np.mean(self.certified_frontend))

    @property
    def ibp_accuracy(self) -> float:
        """Certified accuracy of the interval certificate: the sound lower bound."""
        return float(np.mean(self.certified_ibp))

    def summary(self) -> dict[str, Any]:
        """Labelled numbers for results.json.

        Keys of "certified_accuracy": "<source>_exact" (the exact certificate of the saturating
        first layer) and "interval_from_<source>" (IBP), with source "frontend", "quantize" or
        "input"; a model without a saturating first layer has only "interval_from_input".
        """
        certified = {f"interval_from_{self.source}": self.ibp_accuracy}
        out: dict[str, Any] = {
            "eps": self.eps,
            "examples": int(len(self.clean_correct)),
            "source": self.source,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": certified,
            "float_margins": {"z_margin": Z_MARGIN, "logit_tolerance": LOGIT_TOLERANCE},
        }
        if self.source == "frontend":
            out["frontend_saturation"] = "forced on, as evaluated (the layer's switch is ignored)"
        if self.certified_frontend is not None:
            certified[f"{self.source}_exact"] = self.frontend_accuracy
            out["mean_changeable_outputs"] = float(np.mean(self.changeable_outputs))
            out["mean_outputs_near_jump"] = float(np.mean(self.outputs_near_jump))
            out["images_without_changeable_outputs"] = float(np.mean(self.changeable_outputs == 0))
        return out


# ----------------------------------------------------------------------------- interval rules


def input_box(x, eps: float):
    """The attacker's set of images: [max(0, x - eps), min(1, x + eps)], as (lo, hi)."""
    x = ops.convert_to_tensor(x, dtype="float32")
    return ops.maximum(x - eps, 0.0), ops.minimum(x + eps, 1.0)


def saturation_interval(z_lo, z_hi, jump: float):
    """Interval rule of the saturation: f is monotone, so f([lo, hi]) lies in [f(lo), f(hi)].

    The interval is first widened by `Z_MARGIN`, so that float rounding of z never lets an
    output move that was declared fixed.
    """
    return hard_saturation(z_lo - Z_MARGIN, jump), hard_saturation(z_hi + Z_MARGIN, jump)


def changeable(z_lo, z_hi, jump: float):
    """Bool mask of the outputs whose saturated value can differ within [z_lo, z_hi]."""
    s_lo, s_hi = saturation_interval(z_lo, z_hi, jump)
    return ops.not_equal(s_lo, s_hi)


def near_jump(z, eps: float, jump: float):
    """Bool mask of |z - c| <= eps or |z + c| <= eps (widened by Z_MARGIN): the issue's count."""
    reach = eps + Z_MARGIN
    return ops.logical_or(ops.abs(z - jump) <= reach, ops.abs(z + jump) <= reach)


def frontend_z_interval(frontend: PolarizingFrontEnd, lo, hi):
    """Exact interval of the front end's normalized outputs z over the box [lo, hi].

    Centre: the layer's own z at the box centre; radius: (|w| * box radius) / ||w||_1. Dividing
    by ||w||_1 rather than the layer's ||w||_1 + 1e-12 makes the radius at most 1e-12 wider.
    """
    centre = frontend.normalized((lo + hi) * 0.5)
    kernel = ops.convert_to_tensor(frontend.kernel)
    l1 = ops.sum(ops.abs(kernel), axis=(0, 1, 2))
    spread = ops.conv((hi - lo) * 0.5, ops.abs(kernel), strides=1, padding="same")
    # An all-zero filter has z = 0 whatever the input.
    radius = ops.where(l1 > 0, spread / ops.where(l1 > 0, l1, 1.0), 0.0)
    return centre - radius, centre + radius


def _affine_interval(lo, hi, linear, linear_abs, bias):
    """Centre/radius rule of an affine map: exact per output for a box input."""
    centre = linear((lo + hi) * 0.5)
    radius = linear_abs((hi - lo) * 0.5)
    if bias is not None:
        centre = centre + bias
    return centre - radius, centre + radius


def _activation_interval(layer: keras.layers.Layer, lo, hi):
    if layer.activation is keras.activations.linear:
        return lo, hi
    return ops.relu(lo), ops.relu(hi)


def _conv_interval(layer: keras.layers.Conv2D, lo, hi):
    kernel = ops.convert_to_tensor(layer.kernel)

    def conv(inputs, k):
        return ops.conv(
            inputs,
            k,
            strides=layer.strides,
            padding=layer.padding,
            data_format=layer.data_format,
            dilation_rate=layer.dilation_rate,
        )

    bias = None
    if layer.use_bias:
        bias = ops.convert_to_tensor(layer.bias)
        if layer.data_format == "channels_first":
            bias = ops.reshape(bias, (-1, 1, 1))
    lo, hi = _affine_interval(lo, hi, lambda v: conv(v, kernel), lambda v: conv(v, ops.abs(kernel)), bias)
    return _activation_interval(layer, lo, hi)


def _dense_interval(layer: keras.layers.Dense, lo, hi):
    kernel = ops.convert_to_tensor(layer.kernel)
    bias = ops.convert_to_tensor(layer.bias) if layer.use_bias else None
    lo, hi = _affine_interval(
        lo, hi, lambda v: ops.matmul(v, kernel), lambda v: ops.matmul(v, ops.abs(kernel)), bias
    )
    return _activation_interval(layer, lo, hi)


def layer_interval(layer: keras.layers.Layer, lo, hi):
    """Interval bound propagation through one supported layer.

    Rules: Conv2D and Dense by centre/radius (W c + b, |W| r), exact per output; the monotone
    layers (MaxPooling2D, ReLU, Flatten and the relu activation) map lo to lo and hi to hi
    through the layer itself; the polarizing front end by its exact z interval, then the
    saturation rule, which is also the rule of `Saturation`. The front end saturates here
    whatever its switch says: certificates are about the model as evaluated.

    Args:
      layer: a layer that `check_supported` accepts.
      lo, hi: bounds of the layer's input, batched.

    Returns:
      (lo, hi), bounds of the layer's output.
    """
    _check_layer(layer)
    if isinstance(layer, PolarizingFrontEnd):
        return saturation_interval(*frontend_z_interval(layer, lo, hi), layer.jump)
    if isinstance(layer, Saturation):
        return saturation_interval(lo, hi, layer.jump)
    if isinstance(layer, keras.layers.Conv2D):
        return _conv_interval(layer, lo, hi)
    if isinstance(layer, keras.layers.Dense):
        return _dense_interval(layer, lo, hi)
    return layer(lo), layer(hi)  # MaxPooling2D, ReLU, Flatten: monotone non-decreasing.


def point_forward(layer: keras.layers.Layer, x):
    """The layer's output as the evaluated model computes it (front end saturated)."""
    if isinstance(layer, PolarizingFrontEnd):
        return saturate(layer.normalized(x), layer.jump, layer.backward, layer.steepness)
    return layer(x)


# ----------------------------------------------------------------------------- model checks

_MONOTONE = (keras.layers.MaxPooling2D, keras.layers.ReLU, keras.layers.Flatten)
_ACTIVATIONS = (keras.activations.linear, keras.activations.relu)


def _check_layer(layer: keras.layers.Layer) -> None:
    name = f"{type(layer).__name__} {layer.name!r}"
    if isinstance(layer, (PolarizingFrontEnd, Saturation)):
        return
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        if layer.activation not in _ACTIVATIONS:
            raise ValueError(f"certify supports linear or relu activations only. Received: {name} "
                             f"with activation {layer.activation.__name__}")
        if isinstance(layer, keras.layers.Conv2D) and layer.groups != 1:
            raise ValueError(f"certify supports Conv2D with groups=1 only. Received: {name} with groups={layer.groups}")
        # The rules read `layer.kernel`; LoRA or quantized kernels compute something else.
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise ValueError(f"certify does not support LoRA or quantized layers. Received: {name}")
        return
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) < 0:
            raise ValueError(f"certify needs a monotone ReLU. Received: {name} with "
                             f"negative_slope={layer.negative_slope}")
        return
    if isinstance(layer, _MONOTONE):
        return
    raise ValueError(
        "certify supports Conv2D, Dense (linear or relu), MaxPooling2D, ReLU, Flatten, "
        f"PolarizingFrontEnd and Saturation layers only. Received: {name}"
    )


def check_supported(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers in order, after checking that it is a chain of supported float32 layers.

    Raises:
      ValueError: naming the first layer that certify cannot bound.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        raise ValueError(f"Model {model.name!r} has no layers to certify.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"certify needs one input and one output. Received: model {model.name!r}")
    previous = model.inputs[0]
    for layer in layers:
        _check_layer(layer)
        if layer.compute_dtype != "float32":
            raise ValueError(f"certify's float margins assume float32. Received: {layer.name!r} "
                             f"computes in {layer.compute_dtype}")
        try:
            chained = layer.input is previous
        except (AttributeError, ValueError):  # A layer called more than once has no single input.
            chained = False
        if not chained:
            raise ValueError(f"certify needs a chain of layers, each feeding the next. Received: "
                             f"{layer.name!r} in model {model.name!r}")
        previous = layer.output
    if model.outputs[0] is not previous:
        raise ValueError(f"The output of model {model.name!r} is not its last layer's.")
    return layers


# ----------------------------------------------------------------------------- certification


def _margins(lo: np.ndarray, hi: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Lower bound of logit_y - max_{j != y} logit_j, given logits in [lo, hi]."""
    rows = np.arange(len(y))
    others = hi.copy()
    others[rows, y] = -np.inf
    return lo[rows, y] - others.max(axis=1)


def _min_other(margins: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min over j != y of margins[:, j]."""
    return np.where(np.arange(margins.shape[1]) == y[:, None], np.inf, margins).min(axis=1)


def _tolerance(*bounds: np.ndarray) -> np.ndarray:
    scale = np.max([np.abs(b).max(axis=1) for b in bounds], axis=0)
    return LOGIT_TOLERANCE * np.maximum(1.0, scale)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def propagate(layers, lo, hi):
    """Interval bound propagation through a chain of supported layers.

    Args:
      layers: the layers in order (`check_supported` gives them for a model).
      lo, hi: bounds of the first layer's input, batched tensors.

    Returns:
      (lo, hi), tensors bounding the last layer's output.
    """
    for layer in layers:
        lo, hi = layer_interval(layer, lo, hi)
    return lo, hi


def _elidable(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.linear


def margin_bounds(layers, lo, hi, y):
    """Lower bounds of logit_y - logit_j over the box, for every class j, and bounds of the logits.

    Interval propagation runs up to the last layer. If that is a linear Dense layer (W, b), each
    difference (W_y - W_j) . h + b_y - b_j is bounded directly by the centre/radius rule over the
    box of its input h (the last layer "elided", Gowal et al. 2018), which is exact for that layer
    and never looser than lo(logit_y) - hi(logit_j); otherwise the latter is used.

    Args:
      layers: the model's layers in order, from the one that takes the box.
      lo, hi: bounds of the first layer's input, batched tensors.
      y: integer labels [B].

    Returns:
      (margins, logit_lo, logit_hi): margins [B, classes] with 0 at the label's column; the plain
      interval bounds of the logits [B, classes] (their size sets certify's float tolerance).
    """
    *body, last = layers
    lo, hi = propagate(body, lo, hi)
    logit_lo, logit_hi = layer_interval(last, lo, hi)
    classes = logit_lo.shape[-1]
    label = ops.one_hot(ops.convert_to_tensor(y, dtype="int32"), classes, dtype=logit_lo.dtype)
    if _elidable(last):
        kernel = ops.convert_to_tensor(last.kernel)
        # diff[b, :, j] = W[:, y_b] - W[:, j]: one small [B, units, classes] tensor per batch.
        diff = ops.expand_dims(ops.matmul(label, ops.transpose(kernel)), 2) - kernel
        centre, radius = (lo + hi) * 0.5, (hi - lo) * 0.5
        margins = ops.einsum("bn,bnc->bc", centre, diff) - ops.einsum("bn,bnc->bc", radius, ops.abs(diff))
        if last.use_bias:
            bias = ops.convert_to_tensor(last.bias)
            margins = margins + ops.sum(label * bias, axis=1, keepdims=True) - bias
    else:
        margins = ops.sum(label * logit_lo, axis=1, keepdims=True) - logit_hi
    return ops.where(label > 0, 0.0, margins), logit_lo, logit_hi


def interval_bounds(model: keras.Model, x: np.ndarray, eps: float, batch_size: int = 500):
    """Bounds on the logits of the saturated model over each image's attack box.

    Plain interval bound propagation from the input box through every layer (no exact
    front-end shortcut); for inspection and tests.

    Returns:
      (lo, hi), float32 numpy arrays [N, classes].
    """
    x = np.asarray(x, dtype=np.float32)
    _check_inputs(x, np.zeros(len(x), np.int64), eps, batch_size)
    layers = check_supported(model)
    parts = [_propagate(layers, *input_box(x[rows], eps)) for rows in _batches(len(x), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _propagate(layers, lo, hi):
    return tuple(ops.convert_to_numpy(b) for b in propagate(layers, lo, hi))


def _forward(layers, x):
    for layer in layers:
        x = point_forward(layer, x)
    return ops.convert_to_numpy(x)


def _check_inputs(x: np.ndarray, y: np.ndarray, eps: float, batch_size: int) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(f"eps must be in [0, 1]. Received: eps={eps}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size}")
    if x.ndim < 2 or y.shape != (len(x),):
        raise ValueError(f"x must be [N, ...] and y [N]. Received: x {x.shape}, y {y.shape}")
    if len(x) and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"images must lie in [0, 1]. Received: range [{x.min()}, {x.max()}]")


def certify(model: keras.Model, x: np.ndarray, y: np.ndarray, eps: float, batch_size: int = 500) -> CertificationResult:
    """Certifies each image of `x` against every L-inf perturbation of size `eps` (clipped to [0, 1]).

    The model is certified as evaluated: with its front end saturating, whatever the switch.
    Interval propagation runs only on the images that need it (correct, not certified exactly).

    Args:
      model: a chain of supported layers, as `polar_tf.models.build_model` makes.
      x: images float [N, 28, 28, 1] in [0, 1].
      y: integer labels [N].
      eps: the attack radius, in [0, 1].
      batch_size: images per batch.

    Returns:
      A `CertificationResult`.

    Raises:
      ValueError: for an unsupported model or malformed inputs.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    _check_inputs(x, y, eps, batch_size)
    layers = check_supported(model)
    source = _source(layers[0])
    bar = progress.bar(f"certify eps={eps:g}: {len(x)} examples", len(x), "example", ("certified",))
    parts, certified = [], 0
    for rows in _batches(len(x), batch_size):
        # In a data-parallel run the batch is split across the devices (padded with zero rows).
        placed = backend.place_rows(x[rows])
        labels = np.concatenate([y[rows], np.zeros(len(placed) - len(y[rows]), y.dtype)])
        part = _certify_batch(layers, source, placed, labels, float(eps))
        parts.append({key: value[: len(y[rows])] for key, value in part.items()})
        certified += int(parts[-1]["ibp"].sum())
        bar.update(rows.stop, [("certified", certified / rows.stop)])
    merged = {key: np.concatenate([p[key] for p in parts]) if parts else np.zeros(0) for key in _BATCH_KEYS}
    has_exact = source != "input"
    return CertificationResult(
        eps=float(eps),
        source=source,
        clean_correct=merged["clean_correct"].astype(bool),
        changeable_outputs=merged["changeable"].astype(np.int64) if has_exact else None,
        outputs_near_jump=merged["near"].astype(np.int64) if has_exact else None,
        certified_frontend=merged["exact"].astype(bool) if has_exact else None,
        certified_ibp=merged["ibp"].astype(bool),
        margin_lower_bound=merged["margin"].astype(np.float64),
    )


_BUCKET = 64
_BATCH_KEYS = ("clean_correct", "changeable", "near", "exact", "ibp", "margin")


def _source(first: keras.layers.Layer) -> str:
    if isinstance(first, PolarizingFrontEnd):
        return "frontend"
    if isinstance(first, Saturation):
        return "quantize"
    return "input"


def _certify_batch(layers: list, source: str, x: np.ndarray, y: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    lo, hi = input_box(x, eps)
    n = len(x)
    changeable_count = near_count = np.zeros(n, np.int64)
    if source == "input":
        classifier = layers
        logits = _forward(layers, x)
    else:
        # The saturating first layer is bounded once; it feeds both certificates.
        first, *classifier = layers
        z = first.normalized(x) if source == "frontend" else ops.convert_to_tensor(x)
        z_lo, z_hi = frontend_z_interval(first, lo, hi) if source == "frontend" else (lo, hi)
        changeable_count = _count(changeable(z_lo, z_hi, first.jump))
        near_count = _count(near_jump(z, eps, first.jump))
        logits = _forward(classifier, point_forward(first, x))
        lo, hi = saturation_interval(z_lo, z_hi, first.jump)
    correct = np.argmax(logits, axis=1) == y
    clean_margin = _margins(logits, logits, y)
    # No output of the saturating layer can move: the logits cannot either (up to rounding).
    exact = correct & (changeable_count == 0) & (clean_margin > _tolerance(logits))
    if source == "input":
        exact[:] = False
    margin = np.where(exact, clean_margin, -np.inf)
    ibp = exact.copy()
    todo = np.flatnonzero(correct & ~exact)
    if len(todo):
        # Padded to a multiple of _BUCKET rows by repeating one: JAX compiles each new shape.
        padded = np.resize(todo, -(-len(todo) // _BUCKET) * _BUCKET)
        bounds = margin_bounds(classifier, ops.take(lo, padded, axis=0), ops.take(hi, padded, axis=0), y[padded])
        margins, logit_lo, logit_hi = (ops.convert_to_numpy(b)[: len(todo)] for b in bounds)
        margin[todo] = _min_other(margins, y[todo])
        ibp[todo] = margin[todo] > _tolerance(logit_lo, logit_hi)
    return {"clean_correct": correct, "changeable": changeable_count, "near": near_count,
            "exact": exact, "ibp": ibp, "margin": margin}


def _count(mask) -> np.ndarray:
    """Number of True entries per example of a batched mask."""
    mask = ops.convert_to_numpy(mask)
    return mask.reshape(len(mask), -1).sum(axis=1)


def checked_against_attacks(model: keras.Model, label: str, x: np.ndarray, y: np.ndarray, eps: float,
                            survives: np.ndarray, result: CertificationResult | None = None) -> dict[str, Any]:
    """`certify`'s summary at eps, after checking that every certified example survived the attacks.

    Args:
      model, x, y, eps: as for `certify`.
      label: the model's name in the error.
      survives: per example, whether it was classified correctly under every attack run at eps.
      result: `certify(model, x, y, eps)` if already computed (it is computed otherwise).

    Raises:
      CertificateViolation: an attack broke a certified example.
    """
    start = time.perf_counter()
    result = certify(model, x, y, eps) if result is None else result
    broken = np.flatnonzero(result.certified_ibp & ~survives)
    if broken.size:
        raise CertificateViolation(
            f"{label}: {broken.size} examples certified at eps={eps} were broken by an attack "
            f"(first indices {broken[:10].tolist()}); the certificate or the attack is wrong"
        )
    summary = result.summary()
    summary["seconds"] = time.perf_counter() - start
    summary["checked_against_attacks"] = True
    logging.info("%s: certified accuracy at eps=%g: %s (%.1f s)", label, eps, summary["certified_accuracy"], summary["seconds"])
    return summary
