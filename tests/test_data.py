import gzip
import sys

import numpy as np
import pytest

from conftest import write_idx
from polar_tf import data


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
