"""MNIST and Fashion-MNIST: IDX files from a folder, else tensorflow_datasets.

Where the data comes from, in order:
  1. `data_dir` (the --data_dir flag), if given;
  2. the folder in $POLAR_TF_DATA_DIR, if set;
  3. `tensorflow_datasets`, which downloads when a network exists (into $TFDS_DATA_DIR, by
     default ~/tensorflow_datasets). Without a network tfds retries for minutes, so a dataset it
     has not prepared yet is loaded only if one of its download hosts takes a connection within
     a few seconds; otherwise, and when the download fails, a one-line DataError says where to
     point --data_dir, and what the failed attempt left in tfds' folder is removed.
A folder may hold the files directly or in a subfolder named after the dataset, gzipped or raw.
Pixels are scaled to [0, 1] with no mean/std normalisation.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import struct
import urllib.parse
import urllib.request

import numpy as np

from polar_tf.config import DATASETS

ENV_VAR = "POLAR_TF_DATA_DIR"
CONNECT_TIMEOUT_S = 3.0  # How long a download host may take to answer before we call it unreachable.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """The data cannot be found or is malformed."""


def load(dataset: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split.

    Args:
      dataset: "mnist" or "fashion_mnist".
      split: "train" or "test".
      data_dir: folder of IDX files; None looks in $POLAR_TF_DATA_DIR, then tfds.

    Returns:
      images float32 [N, 28, 28, 1] in [0, 1] and labels int32 [N].

    Raises:
      DataError: with one line saying where it looked, or what is wrong with a file.
    """
    if dataset not in DATASETS:
        raise DataError(f"dataset must be one of {', '.join(DATASETS)}. Received: dataset={dataset!r}")
    if split not in _FILES:
        raise DataError(f"split must be 'train' or 'test'. Received: split={split!r}")
    if data_dir is not None:
        return _load_idx_folder(dataset, split, data_dir, "--data_dir")
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        return _load_idx_folder(dataset, split, env_dir, f"${ENV_VAR}")
    return _load_tfds(dataset, split)


def first_test_images(dataset: str, num_examples: int, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_examples` images of the test set and their labels: what an evaluation attacks."""
    x, y = load(dataset, "test", data_dir)
    if num_examples > len(x):
        raise ValueError(f"num_examples must be <= {len(x)} (the {dataset} test set). Received: {num_examples}")
    return x[:num_examples], y[:num_examples]


def _load_idx_folder(dataset: str, split: str, folder: str, origin: str):
    if not os.path.isdir(folder):
        why = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise DataError(f"data directory {folder!r} (from {origin}) {why}")
    images_name, labels_name = _FILES[split]
    candidates = [os.path.join(folder, dataset), folder]
    for candidate in candidates:
        images_path = _find(candidate, images_name)
        labels_path = _find(candidate, labels_name)
        if images_path and labels_path:
            images = read_idx(images_path, IMAGES_MAGIC)
            labels = read_idx(labels_path, LABELS_MAGIC)
            if images.shape[1:] != (28, 28):
                raise DataError(f"{images_path}: expected 28x28 images, found {images.shape[1:]}")
            if len(images) != len(labels):
                raise DataError(
                    f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
                )
            if labels.max(initial=0) > 9:
                raise DataError(f"{labels_path}: labels must be 0..9, found {int(labels.max())}")
            return (images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)
    looked = ", ".join(os.path.join(c, f"{images_name}[.gz]") for c in candidates)
    raise DataError(f"no {dataset} {split} IDX files found (from {origin}); looked for {looked}")


def _find(folder: str, name: str) -> str | None:
    for path in (os.path.join(folder, name + ".gz"), os.path.join(folder, name)):
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str, magic: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes, gzipped or raw, and checks its header.

    Args:
      path: the file.
      magic: the expected magic number (0x803 for images, 0x801 for labels).

    Returns:
      A uint8 array shaped as the header says.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says {shape} = {expected} bytes of data, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_tfds(dataset: str, split: str):
    where = f"no --data_dir, ${ENV_VAR} unset, and tensorflow_datasets"
    hint = f"pass --data_dir or set ${ENV_VAR} to a folder of IDX files"
    try:
        import tensorflow_datasets as tfds  # Lazy: TensorFlow may be absent (JAX-only machines).
    except ImportError as e:
        raise DataError(f"{where} unavailable ({e}); {hint}") from None
    try:
        builder = tfds.builder(dataset)
    except Exception as e:
        raise DataError(f"{where} failed: {_first_line(e)}; {hint}") from None
    # is_prepared() logs a warning for a folder that does not exist: ask only about one that does.
    if not (os.path.isdir(builder.data_dir) and builder.is_prepared()):
        unreachable = _unreachable(builder.url_infos or {})  # The URLs tfds keeps checksums of.
        if unreachable:
            raise DataError(f"{where} cannot download {dataset}: {unreachable}; {hint}")
    root = os.fspath(builder.data_dir_root)
    before = _tree(root)
    try:
        images, labels = tfds.as_numpy(tfds.load(dataset, split=split, batch_size=-1, as_supervised=True))
    except BaseException as e:  # Ctrl-C too: tfds does not resume a partial download.
        _remove_new(root, before)
        if not isinstance(e, Exception):
            raise
        # Network, download and checksum failures all surface here.
        raise DataError(f"{where} failed: {_first_line(e)}; {hint}") from None
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def _unreachable(urls) -> str | None:
    """Says why none of the hosts of `urls` can be reached, or None if one can (or there are none).

    A host is reachable if it takes a TCP connection within CONNECT_TIMEOUT_S (the name lookup
    before it is the system's); where a proxy is configured ($https_proxy, ...), the proxy is
    what has to answer.
    """
    proxies = urllib.request.getproxies()
    addresses = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in proxies and not urllib.request.proxy_bypass(parts.hostname or ""):
            proxy = proxies[parts.scheme]
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        addresses.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    failures = []
    for host, port in dict.fromkeys(addresses):
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            return None
        except OSError as e:
            failures.append(f"{host}:{port} ({e})")
    return f"no connection to {', '.join(failures)}" if failures else None


def _tree(folder: str) -> set[str] | None:
    """Every path under `folder`, or None if it does not exist."""
    if not os.path.isdir(folder):
        return None
    return {os.path.join(d, name) for d, dirs, files in os.walk(folder) for name in dirs + files}


def _remove_new(folder: str, before: set[str] | None) -> None:
    """Removes what appeared under `folder` since `before = _tree(folder)`, and nothing else."""
    if before is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for d, dirs, files in os.walk(folder):
        for name in list(dirs):
            if os.path.join(d, name) not in before:
                shutil.rmtree(os.path.join(d, name), ignore_errors=True)
                dirs.remove(name)
        for name in files:
            if os.path.join(d, name) not in before:
                os.remove(os.path.join(d, name))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_dataset(dataset: str, data_dir: str | None = None, train_examples: int = 0):
    """Train and test splits; `train_examples` > 0 keeps only the first that many training images."""
    x_train, y_train = load(dataset, "train", data_dir)
    x_test, y_test = load(dataset, "test", data_dir)
    if train_examples:
        x_train, y_train = x_train[:train_examples], y_train[:train_examples]
    return (x_train, y_train), (x_test, y_test)
