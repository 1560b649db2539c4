"""Tests of polar_tf.monitoring: the front-end statistics recorded every epoch, checked by hand."""

import math

import numpy as np
import pytest

from polar_tf import monitoring
from polar_tf.frontend import PolarizingFrontEnd


def test_filter_stats_by_hand():
    kernel = np.zeros((5, 5, 1, 3), np.float32)
    kernel[2, 2, 0, 0] = -3.0  # one pixel: concentration 1, L1 3
    kernel[:, :, 0, 1] = 0.5  # uniform: 1/25, L1 12.5
    kernel[0, 0, 0, 2], kernel[4, 4, 0, 2] = 3.0, -1.0  # 3/4, L1 4
    stats = monitoring.filter_stats(kernel)
    assert stats["filter_concentrations"] == pytest.approx([1.0, 0.04, 0.75])
    assert stats["filter_concentration"] == pytest.approx(0.75)  # the median
    assert stats["filter_l1_mean"] == pytest.approx((3 + 12.5 + 4) / 3)


def test_frontend_stats_by_hand():
    layer = PolarizingFrontEnd(filters=2, jump=0.3, sigma1=0.5, sigma2=0.1)
    z = np.array([0.0, 0.3, -0.25, 0.45, 1.0, -0.1], np.float32)
    stats = monitoring.frontend_stats(layer, z, eps=0.1)
    b1 = [math.exp(-v**2 / (2 * 0.5**2)) for v in z.tolist()]
    b2 = [math.exp(-(v - 0.3) ** 2 / (2 * 0.1**2)) + math.exp(-(v + 0.3) ** 2 / (2 * 0.1**2)) for v in z.tolist()]
    assert stats["b1_mean"] == pytest.approx(np.mean(b1), rel=1e-6)
    assert stats["b2_mean"] == pytest.approx(np.mean(b2), rel=1e-6)
    # Within 0.1 of +-0.3: 0.3 and -0.25 (0.45 and -0.1 are 0.15 and 0.2 away).
    assert stats["frac_within_eps_of_jump"] == pytest.approx(2 / 6)


def test_tensorboard_writes_scalars_and_histograms_that_read_back(tmp_path):
    pytest.importorskip("tensorflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = monitoring.TensorBoard(str(tmp_path))
    values = np.array([-1.5, -0.99, 0.0, 0.5, 0.5, 2.0])  # clipped into [-1, 1] before binning
    board.write(3, {"loss": 0.25}, histograms={"frontend/z": values})
    board.close()
    (event_file,) = [name for name in tmp_path.iterdir() if name.name.startswith("events")]
    events = EventAccumulator(str(event_file), size_guidance={"tensors": 0})
    events.Reload()
    import tensorflow as tf

    (loss,) = events.Tensors("loss")
    assert loss.step == 3 and float(tf.make_ndarray(loss.tensor_proto)) == 0.25
    (histogram,) = events.Tensors("frontend/z")
    buckets = tf.make_ndarray(histogram.tensor_proto)
    assert buckets.shape == (monitoring.HISTOGRAM_BINS // 2, 3)
    assert buckets[0, 0] == -1.0 and buckets[-1, 1] == 1.0
    assert buckets[:, 2].sum() == len(values)
    assert buckets[0, 2] == 2 and buckets[-1, 2] == 1  # -1.5 and -0.99 in the first bin, 2.0 in the last
