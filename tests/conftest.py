"""Shared fixtures. Data come from $POLAR_TF_DATA_DIR (CI points it at ../shared/data)."""

import atexit
import gzip
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's persistent compilation cache, for this session and the processes its tests start (they
# inherit the environment): the same small models and attack steps are compiled again and again,
# by the tests in this process and by every train.py a test runs, and XLA's CPU compiles are much
# of the JAX pass's time (tests/test_resume.py: 105 s without the cache, 77 s with it, on the
# 2-core CPU). A cached executable is the one XLA compiled: the results are the same bits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="polar_tf_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
_SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if "POLAR_TF_DATA_DIR" not in os.environ and os.path.isdir(_SHARED_DATA):
    os.environ["POLAR_TF_DATA_DIR"] = os.path.abspath(_SHARED_DATA)


def write_idx(path: str, array: np.ndarray, magic: int, compress: bool = False) -> None:
    """Writes a uint8 array as an IDX file (the format of MNIST's distribution files)."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)


@pytest.fixture(scope="session")
def mnist():
    from polar_tf import data

    return data.load_dataset("mnist")


@pytest.fixture(scope="session")
def mnist_subset_dir(tmp_path_factory, mnist):
    """A data folder with the first 320 MNIST training and 200 test images, as raw IDX files."""
    folder = tmp_path_factory.mktemp("data") / "mnist"
    folder.mkdir()
    (x_train, y_train), (x_test, y_test) = mnist
    for split, x, y, n in (("train", x_train, y_train, 320), ("t10k", x_test, y_test, 200)):
        pixels = np.round(x[:n, :, :, 0] * 255).astype(np.uint8)
        write_idx(str(folder / f"{split}-images-idx3-ubyte"), pixels, 0x803)
        write_idx(str(folder / f"{split}-labels-idx1-ubyte"), y[:n].astype(np.uint8), 0x801)
    return str(folder.parent)


@pytest.fixture(scope="session")
def mnist_small():
    """3000 MNIST training images and the first 100 test images."""
    from polar_tf import data

    (x_train, y_train), (x_test, y_test) = data.load_dataset("mnist", train_examples=3000)
    return x_train, y_train, x_test[:100], y_test[:100]


@pytest.fixture(scope="session")
def trained_mlp(mnist_small):
    """An undefended MLP trained for a few seconds (~90% on the test images)."""
    import small_models

    x_train, y_train, _, _ = mnist_small
    return small_models.train(small_models.mlp(0), x_train, y_train)


@pytest.fixture(scope="session")
def polarized_workdir(tmp_path_factory):
    """A polarized-model workdir holding a small front-end model with random weights (25 filters,
    a small jump so that gradients flow, a small classifier: quick to compile on JAX too)."""
    import keras

    from polar_tf import config, frontend, run_dir

    folder = str(tmp_path_factory.mktemp("runs") / "mnist_polarized")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    z = frontend.PolarizingFrontEnd(filters=25, jump=0.05, saturate=True, name="frontend")(inputs)
    hidden = keras.layers.Conv2D(4, 5, strides=2, activation="relu")(z)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hidden)))
    run_dir.write_config(folder, config.Config(jump=0.05))
    run_dir.save_model(model, os.path.join(folder, "stage3.keras"))
    return folder


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A small undefended CNN (random weights) as a .keras file: quick to compile in a subprocess."""
    import keras

    from polar_tf import run_dir

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 5, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    path = str(tmp_path_factory.mktemp("tiny") / "model.keras")
    run_dir.save_model(model, path)
    return path


def check_tables(markdown: str) -> None:
    """Every row of every table in `markdown` has as many cells as its header."""
    tables, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            tables.append(rows)
            rows = []
    assert tables
    for header, separator, *body in tables:
        width = len(header.strip("|").split("|"))
        assert separator == "|---" * width + "|", header
        for row in body:
            assert len(row.strip("|").split("|")) == width, f"{row!r} under {header!r}"
