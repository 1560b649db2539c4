import errno
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import write_idx
from polar_tf import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSED = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
# The tensorflow_datasets fallback does not depend on the backend: check it in the TensorFlow pass only.
tfds_once = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="backend-independent tfds check")


def test_real_mnist_and_fashion_mnist(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    # The published statistics (shared/data/README.md): no normalisation is applied.
    assert x_train.mean() == pytest.approx(0.1307, abs=1e-4)
    assert np.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x_fashion, y_fashion = data.load("fashion_mnist", "test")
    assert x_fashion.shape == (10000, 28, 28, 1) and x_fashion.mean() == pytest.approx(0.2868, abs=1e-3)
    assert np.bincount(y_fashion).tolist() == [1000] * 10


def _write_split(folder, n=3, compress=False, **overrides):
    images = overrides.get("images", np.arange(n * 784, dtype=np.int64).reshape(n, 28, 28) % 256)
    labels = overrides.get("labels", np.arange(n) % 10)
    suffix = ".gz" if compress else ""
    write_idx(str(folder / f"train-images-idx3-ubyte{suffix}"), images, overrides.get("images_magic", 0x803), compress)
    write_idx(str(folder / f"train-labels-idx1-ubyte{suffix}"), labels, 0x801, compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_reads_raw_and_gzip_idx(tmp_path, compress):
    images, labels = _write_split(tmp_path, compress=compress)
    x, y = data.load("mnist", "train", str(tmp_path))
    # Exact: a quotient of small integers is correctly rounded to float32 whether divided in float32
    # or in float64 and rounded (53 >= 2 * 24 + 2 bits), on any CPU.
    np.testing.assert_array_equal(x[..., 0], images.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, labels)


def test_dataset_subfolder_and_env_var(tmp_path, monkeypatch):
    (tmp_path / "fashion_mnist").mkdir()
    _write_split(tmp_path / "fashion_mnist", n=2)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    x, _ = data.load("fashion_mnist", "train")
    assert x.shape == (2, 28, 28, 1)


def test_bad_magic(tmp_path):
    _write_split(tmp_path, images_magic=0x801)
    with pytest.raises(data.DataError, match="bad magic number 0x00000801, expected 0x00000803"):
        data.load("mnist", "train", str(tmp_path))


def test_truncated_file(tmp_path):
    _write_split(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(data.DataError, match=r"header says \(3, 28, 28\) = 2352 bytes of data, file has 2342"):
        data.load("mnist", "train", str(tmp_path))


def test_truncated_gzip(tmp_path):
    _write_split(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(data.DataError, match="corrupt gzip data"):
        data.load("mnist", "train", str(tmp_path))


def test_image_label_count_mismatch(tmp_path):
    _write_split(tmp_path, labels=np.zeros(2))
    with pytest.raises(data.DataError, match="has 3 images but .* has 2 labels"):
        data.load("mnist", "train", str(tmp_path))


def test_labels_out_of_range(tmp_path):
    _write_split(tmp_path, labels=np.array([0, 1, 12]))
    with pytest.raises(data.DataError, match="labels must be 0..9, found 12"):
        data.load("mnist", "train", str(tmp_path))


def test_missing_directory_and_missing_files(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load("mnist", "train", str(tmp_path / "nowhere"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(data.DataError, match=r"^data directory '.*/a_file' \(from --data_dir\) is a file, not a folder$"):
        data.load("mnist", "train", str(tmp_path / "a_file"))
    with pytest.raises(data.DataError, match="no mnist test IDX files found .*looked for"):
        data.load("mnist", "test", str(tmp_path))


def test_no_source_at_all_says_where_it_looked(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(data.DataError, match=r"no --data_dir, \$POLAR_TF_DATA_DIR unset, and tensorflow_datasets"):
        data.load("mnist", "train")


def test_train_examples_limit(mnist_subset_dir):
    (x_train, _), (x_test, _) = data.load_dataset("mnist", mnist_subset_dir, train_examples=100)
    assert len(x_train) == 100 and len(x_test) == 200


def _closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_check_needs_one_host_or_its_proxy_to_answer(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    closed = _closed_port()
    with socket.create_server(("127.0.0.1", 0)) as server:
        listening = server.getsockname()[1]
        assert data._unreachable([f"http://127.0.0.1:{listening}/a.gz"]) is None
        assert data._unreachable([f"http://127.0.0.1:{closed}/a.gz", f"http://127.0.0.1:{listening}/b.gz"]) is None
        assert data._unreachable([]) is None  # Nothing to check: tfds is left to try.
        assert data._unreachable([f"http://127.0.0.1:{closed}/a.gz", f"http://127.0.0.1:{closed}/b.gz"]) == (
            f"no connection to 127.0.0.1:{closed} ({REFUSED})"
        )
        monkeypatch.setenv("http_proxy", f"127.0.0.1:{closed}")  # Downloads would go through it.
        assert data._unreachable([f"http://127.0.0.1:{listening}/a.gz"]).startswith(f"no connection to 127.0.0.1:{closed} (")


@tfds_once
def test_without_network_the_tfds_fallback_fails_in_seconds_with_one_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    # A proxy that refuses connections stands for a machine without network, with or without one.
    env = {k: v for k, v in os.environ.items() if k not in (data.ENV_VAR, "TF_CPP_MIN_LOG_LEVEL", *PROXY_VARS)}
    proxy = f"http://127.0.0.1:{_closed_port()}"
    env.update(TFDS_DATA_DIR=str(tmp_path / "tfds"), http_proxy=proxy, https_proxy=proxy)
    start = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={tmp_path}/run"],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert time.monotonic() - start < 60  # tfds alone retries for minutes.
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"train.py: error: no --data_dir, $POLAR_TF_DATA_DIR unset, and tensorflow_datasets cannot download mnist: "
        f"no connection to {proxy[len('http://'):]} ({REFUSED}); "
        "pass --data_dir or set $POLAR_TF_DATA_DIR to a folder of IDX files"
    ]
    assert not os.path.exists(tmp_path / "tfds") and not os.path.exists(tmp_path / "run")


@tfds_once
@pytest.mark.parametrize("existed", [True, False])
def test_a_failed_tfds_download_removes_what_it_created_and_only_that(tmp_path, monkeypatch, existed):
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tmp_path / "tfds"
    if existed:
        (root / "downloads" / "mnist").mkdir(parents=True)
        (root / "downloads" / "mnist" / "kept.gz").write_bytes(b"earlier download")
        (root / "fashion_mnist" / "3.0.1").mkdir(parents=True)
    before = sorted(root.rglob("*"))
    real_builder = tfds.builder
    monkeypatch.setattr(tfds, "builder", lambda name: real_builder(name, data_dir=str(root)))

    def failing_load(name, **kwargs):  # Leaves what an interrupted tfds download leaves.
        (root / "downloads" / "mnist" / "train-images.gz.tmp.0f3a").mkdir(parents=True)
        (root / "downloads" / "extracted").mkdir()
        (root / name / "3.0.1.incomplete.5").mkdir(parents=True)
        raise ConnectionError("Connection reset by peer\nwhile reading train-images")

    monkeypatch.setattr(tfds, "load", failing_load)
    monkeypatch.setattr(data, "_unreachable", lambda urls: None)  # As if the download host answered.
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DataError) as error:
        data.load("mnist", "train")
    assert str(error.value) == (
        "no --data_dir, $POLAR_TF_DATA_DIR unset, and tensorflow_datasets failed: Connection reset by peer; "
        "pass --data_dir or set $POLAR_TF_DATA_DIR to a folder of IDX files"
    )
    assert sorted(root.rglob("*")) == before and root.exists() == existed
