"""The shipped pretrained models load under each backend and reach their recorded clean accuracy."""

import json
import os

import pytest

from polar_tf import data, models, runfiles
from polar_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each shipped model and the results file that recorded its accuracy on the first N test images.
SHIPPED = {"mnist_polarized": "results/mnist_polarized_e10/results.json"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_pretrained_model_reaches_recorded_clean_accuracy(name):
    model = runfiles.load_model(os.path.join(ROOT, "pretrained", f"{name}.keras"), compile=False)
    with open(os.path.join(ROOT, "pretrained", f"{name}.config.json")) as f:
        config = Config.from_dict(json.load(f))
    with open(os.path.join(ROOT, SHIPPED[name])) as f:
        recorded = json.load(f)
    assert models.get_frontend(model).saturating == (config.model == "polarized")
    x, y = data.load(config.dataset, "test")
    n = recorded["num_examples"]
    accuracy = models.accuracy(model, x[:n], y[:n])
    # The same weights on another backend may flip an example sitting on a jump: allow 2 in 1000.
    assert accuracy == pytest.approx(recorded["models"][0]["clean_accuracy"], abs=2 / n)
