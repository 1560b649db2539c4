"""What a user watches during training: TensorBoard events and front-end statistics.

TensorFlow (for tf.summary) is imported here lazily; where it is absent, e.g. on a JAX-only
machine, TensorBoard events are skipped with a warning and metrics.jsonl still records everything.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from absl import logging

from polar_tf import plots
from polar_tf.frontend import PolarizingFrontEnd, barrier_b1, barrier_b2
from polar_tf.models import frontend_outputs, get_frontend

HISTOGRAM_BINS = 200
MONITOR_EXAMPLES = 1000  # the fixed first training images the front end's statistics are measured on


def frontend_stats(layer: PolarizingFrontEnd, z: np.ndarray, eps: float) -> dict[str, float]:
    """Statistics of the front end's outputs z: mean B1, mean B2, and the fraction within eps of
    a jump +-c (the fraction of outputs an L-inf attack of size eps could flip)."""
    return {
        "b1_mean": float(np.mean(keras.ops.convert_to_numpy(barrier_b1(z, layer.sigma1)))),
        "b2_mean": float(np.mean(keras.ops.convert_to_numpy(barrier_b2(z, layer.jump, layer.sigma2)))),
        "frac_within_eps_of_jump": float(np.mean(np.abs(np.abs(z) - layer.jump) <= eps)),
    }


def filter_stats(kernel: np.ndarray) -> dict[str, Any]:
    """What the front end's filters have learned, from its raw kernel [k, k, 1, K].

    A filter's concentration is the share of its L1 norm in its largest-magnitude weight: 1/k^2
    for a uniform filter, 1 for a single pixel. The original's Fashion-MNIST filters end near 0.7-0.8.

    Returns:
      filter_concentration (the median over filters), filter_concentrations (per filter) and
      filter_l1_mean (the filters' mean L1 norm, which the normalization makes irrelevant to z
      but which sets how far an Adam step turns a filter).
    """
    weights = np.abs(np.asarray(kernel, dtype=np.float64)).reshape(-1, kernel.shape[-1])
    l1 = weights.sum(axis=0)
    concentration = weights.max(axis=0) / l1
    return {
        "filter_concentration": float(np.median(concentration)),
        "filter_concentrations": [float(c) for c in concentration],
        "filter_l1_mean": float(np.mean(l1)),
    }


def frontend_histogram(model, x: np.ndarray, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of z over all of `x` on [-1, 1], accumulated batch by batch (bounded memory)."""
    edges = np.linspace(-1.0, 1.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for z in frontend_outputs(model, x):
        counts += np.histogram(np.clip(z, -1.0, 1.0), bins=edges)[0]
    return counts, edges


class TensorBoard:
    """Writes scalars, histograms and images to a TensorBoard log folder."""

    def __init__(self, logdir: str):
        try:
            import tensorflow as tf  # Lazy: absent on JAX-only machines.
        except ImportError:
            logging.warning("TensorFlow is not installed: no TensorBoard events in %s", logdir)
            self._tf = self._writer = None
            return
        self._tf = tf
        self._writer = tf.summary.create_file_writer(logdir)

    def write(
        self,
        step: int,
        scalars: dict[str, Any],
        histograms: dict[str, np.ndarray] | None = None,
        images: dict[str, np.ndarray] | None = None,
    ) -> None:
        if self._writer is None:
            return
        summary = self._tf.summary
        with self._writer.as_default(step=step):
            for name, value in scalars.items():
                summary.scalar(name, float(value))
            for name, values in (histograms or {}).items():
                # tf.summary.histogram takes ~20 s for the 20M values of the monitor batch on
                # a CPU; numpy bins them in a fraction of that, written as the same summary.
                counts, edges = np.histogram(np.clip(values, -1.0, 1.0), bins=HISTOGRAM_BINS // 2, range=(-1.0, 1.0))
                buckets = np.stack([edges[:-1], edges[1:], counts], axis=1).astype(np.float64)
                summary.write(name, buckets, metadata=self._histogram_metadata(name))
            for name, image in (images or {}).items():
                summary.image(name, image[None].astype(np.float32))
        self._writer.flush()

    @staticmethod
    def _histogram_metadata(name: str):
        from tensorboard.plugins.histogram import metadata

        return metadata.create_summary_metadata(display_name=name, description="")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def frontend_images(model) -> dict[str, np.ndarray]:
    layer = get_frontend(model)
    return {"frontend/filters": plots.filters_grid(keras.ops.convert_to_numpy(layer.kernel))}
