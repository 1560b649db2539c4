"""Tests of polar_tf.report: what every results file shares."""

import keras
import numpy as np
import pytest

from polar_tf import report


def test_percent_and_unique_labels():
    assert report.percent(0.87654) == "87.65" and report.percent(1.0) == "100.00"
    assert report.unique_labels(["a", "b", "a", "a"]) == ["a", "b", "a (2)", "a (3)"]


def test_a_models_label_is_its_folder_and_file_name():
    assert report.model_label("runs/mnist_polarized/stage3.keras") == "mnist_polarized/stage3"
    assert report.model_label("/m.keras") == "m"


def test_versions_name_keras_and_the_backend():
    found = report.versions()
    assert found["keras"] == keras.__version__
    assert set(found) == {"keras", keras.backend.backend()}


def test_check_model_refuses_a_model_of_other_shapes():
    x, y = np.zeros((4, 28, 28, 1), np.float32), np.array([0, 9, 3, 1])
    images_to_logits = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    report.check_model(images_to_logits, "ok.keras", x, y)
    for bad in (keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(5)]),
                keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])):
        with pytest.raises(ValueError, match="expected images"):
            report.check_model(bad, "bad.keras", x, y)


def test_fingerprint_is_the_files_sha256(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"abc")
    assert report.fingerprint(str(path)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
