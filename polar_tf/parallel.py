"""Data parallelism: the same training and evaluation over every device, with one switch.

    with parallel.scope("data_parallel"):      # what train.py and evaluate.py --distribute do
        training.train_and_evaluate(config, workdir)

`scope("data_parallel")` runs its block over all devices of the default kind (every GPU, else the
CPU's devices), on every host when the KERAS_DISTRIBUTION_* variables name several processes
(`backend.data_parallel`, which uses Keras' distribution API). Each global batch of
`config.batch_size` images is split evenly across the devices; the model's variables are
replicated, so one training step computes the gradient of the global batch as one device would,
up to the order of float sums. Nothing here communicates between devices: Keras and the backend do.

This module holds what data parallelism asks of the schedule, the same on every backend: which
rows of an epoch each process feeds `fit`, and the rule that every batch splits evenly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from polar_tf import backend
from polar_tf.config import DISTRIBUTIONS


@contextlib.contextmanager
def scope(distribute: str = "none") -> Iterator[None]:
    """Runs the block on one device ("none") or data-parallel over all of them ("data_parallel").

    Models, checkpoints and optimizers the block makes or loads are placed on its devices; make
    them inside it.

    Raises:
      ValueError: an unknown choice, or "data_parallel" where the backend cannot run it.
    """
    if distribute not in DISTRIBUTIONS:
        raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTIONS)}. Received: distribute={distribute!r}")
    if distribute == "none":
        yield
        return
    with backend.data_parallel():
        yield


def check_batch_size(batch_size: int) -> None:
    """Raises ValueError unless a batch of `batch_size` splits evenly across the devices."""
    replicas = backend.replica_count()
    if batch_size % replicas:
        raise ValueError(
            f"batch_size must be a multiple of the {replicas} devices it is split across. Received: batch_size={batch_size}"
        )


def epoch_rows(order: np.ndarray, batch_size: int) -> np.ndarray:
    """The rows of an epoch (in `order`, batches of `batch_size`) that this process feeds `fit`.

    Every batch must split evenly across the devices: the epoch's last, partial batch is cut to a
    multiple of their number (at most `replica_count() - 1` images of the epoch, different ones in
    each epoch's order, are left out; none on one device). With several processes, process p takes
    the p-th of equal consecutive parts of each batch, so that its devices hold those rows of the
    global batch (Keras assembles the global batch from the processes' parts in process order).

    Args:
      order: the epoch's row indices, in training order.
      batch_size: the global batch size, a multiple of `replica_count()` (`check_batch_size`).

    Returns:
      This process's rows, which `fit` reads in batches of `local_batch_size(batch_size)`.
    """
    replicas, processes = backend.replica_count(), backend.process_count()
    order = order[: len(order) - (len(order) % batch_size) % replicas]
    if processes == 1:
        return order
    index = backend.process_index()
    return np.concatenate(
        [np.split(order[start : start + batch_size], processes)[index] for start in range(0, len(order), batch_size)]
    )


def local_batch_size(batch_size: int) -> int:
    """The rows of each global batch that this process feeds `fit`."""
    return batch_size // backend.process_count()
