"""The shipped pretrained models load under each backend and reach their recorded clean accuracy."""

import json
import os

import numpy as np
import pytest

import float_paths
from polar_tf import data, models, reproduction_protocol, run_dir
from polar_tf.config import DATASETS, Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each shipped model, pretrained/<dataset>_<model>.keras, is a row of REPRODUCTION.md, whose table
# (results/reproduction/<dataset>_table/results.json) recorded its accuracy on the first N test images.
SHIPPED = [(dataset, model) for dataset in DATASETS for model, _ in reproduction_protocol.ROWS]


@pytest.mark.parametrize("dataset,model_name", SHIPPED)
def test_pretrained_model_reaches_recorded_clean_accuracy(dataset, model_name):
    name = f"{dataset}_{model_name}"
    model = run_dir.load_model(os.path.join(ROOT, "pretrained", f"{name}.keras"), compile=False)
    with open(os.path.join(ROOT, "pretrained", f"{name}.config.json")) as f:
        config = Config.from_dict(json.load(f))
    with open(os.path.join(ROOT, "results", "reproduction", f"{dataset}_table", "results.json")) as f:
        table = json.load(f)
    # The table evaluated the models in ROWS order (trained runs or, on a fresh checkout, these files).
    record = table["models"][[row for row, _ in reproduction_protocol.ROWS].index(model_name)]
    assert table["dataset"] == dataset
    assert (config.dataset, config.model) == (dataset, model_name)
    frontend = models.get_frontend(model)
    assert (frontend is not None and frontend.saturating) == (model_name == "polarized")
    x, y = data.load(dataset, "test")
    n = table["num_examples"]
    x, y = x[:n], y[:n]
    # The table was computed on another machine (TensorFlow, an Intel CPU). Another backend, CPU or
    # thread count may decide an image differently only where float32 rounding can: a near-tie
    # of two logits, or a front-end output within rounding of a jump that the prediction hangs on
    # (the shipped Fashion-MNIST front end leaves 76 of its 19.6 million outputs on these images
    # within 1e-5 of its jump, and up to 45 predictions may depend on them).
    # Every path's count of correct images, the table's included, lies between the decided correct
    # ones and those plus the undecided ones (this path's own count does, by construction: the
    # decided classes are its argmax).
    classes = float_paths.decided_classes(model, x)
    sure, unsure = int(np.sum(classes == y)), int(np.sum(classes < 0))
    assert unsure <= 0.05 * n
    assert sure <= round(record["clean_accuracy"] * n) <= sure + unsure
