"""The only backend-specific code: gradients with respect to the input (`value_and_grad`), compiling
a computation on a model (`compile_model_function`), attack batch sizes, and data parallelism (the
devices a batch is split across, and how arrays are placed on them).

Everything else is written with `keras.ops` and runs on TensorFlow and JAX alike. TensorFlow and
JAX are imported lazily, so the package imports on machines that have only one of them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import weakref
from typing import Callable

import keras
import numpy as np


def name() -> str:
    return keras.backend.backend()


def value_and_grad(fn: Callable, x):
    """The one input gradient of each backend: (value, aux, d value / dx) of `fn(x) -> (value, aux)`.

    Works eagerly and inside the functions `compile_model_function` compiles.

    Args:
      fn: maps a tensor shaped like x to (a scalar tensor, anything else to return); may call Keras
        layers and models.
      x: a backend tensor.

    Returns:
      (value, aux, gradient), the gradient shaped like x (zero where value does not depend on x).
    """
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            value, aux = fn(x)
        return value, aux, tape.gradient(value, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if backend == "jax":
        import jax

        (value, aux), grad = jax.value_and_grad(fn, has_aux=True)(x)
        return value, aux, grad
    raise NotImplementedError(f"polar_tf supports the tensorflow and jax backends, not {backend!r}")


def gradient(fn: Callable, x):
    """The gradient of a scalar function `fn` at `x`, computed eagerly.

    Args:
      fn: maps a tensor shaped like x to a scalar tensor; may call Keras layers and models.
      x: array-like input.

    Returns:
      d fn / dx, a backend tensor shaped like x.
    """
    return value_and_grad(lambda v: (fn(v), ()), keras.ops.convert_to_tensor(x))[2]


# Batch size of attacks when none is given. Measured on the 2-core CPU (TensorFlow; see
# BENCHMARKS.md); on an accelerator a batch big enough to fill it but small enough that PGD's
# restarts, which attack only the examples still classified correctly, shrink the work.
CPU_ATTACK_BATCH_SIZE = 500
ACCELERATOR_ATTACK_BATCH_SIZE = 2500


def on_accelerator() -> bool:
    """Whether Keras computes on a GPU or TPU."""
    backend = name()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    raise NotImplementedError(f"polar_tf supports the tensorflow and jax backends, not {backend!r}")


def default_attack_batch_size() -> int:
    return ACCELERATOR_ATTACK_BATCH_SIZE if on_accelerator() else CPU_ATTACK_BATCH_SIZE


# Steps per compiled attack call for TensorFlow on the CPU: a call of 500 images x 20 steps takes
# about 3 s on the 2-core CPU, so progress updates and Ctrl-C (which Python sees only between
# calls) come within seconds; 20 steps per call cost about 2% of PGD's time there, 10 steps 2-4%
# (BENCHMARKS.md). JAX on the CPU: one step per call (a Python loop over one jitted step was 4x
# faster there than the whole loop in one call). On an accelerator the whole loop is one call.
TF_CPU_ATTACK_STEPS_PER_CALL = 20


def attack_steps_per_call() -> int | None:
    """How many steps one call of a compiled attack loop should take (None: all of them)."""
    if on_accelerator():
        return None
    return TF_CPU_ATTACK_STEPS_PER_CALL if name() == "tensorflow" else 1


def device_description() -> str:
    """The device that computes, in words, e.g. "NVIDIA H100 80GB HBM3" or "CPU: AMD EPYC (2 cores)";
    in a data-parallel run followed by how many devices, e.g. ", data-parallel over 8 devices"."""
    replicas = replica_count()
    spread = f", data-parallel over {replicas} devices" if replicas > 1 else ""
    return _one_device_description() + spread


def _one_device_description() -> str:
    backend = name()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return f"{device.device_kind} ({device.platform})"
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"{details.get('device_name', gpus[0].name)} (gpu)"
    return f"CPU: {_cpu_model()} ({os.cpu_count()} cores)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _variable_values(model_ref):
    model = model_ref()
    return (
        [keras.ops.convert_to_tensor(v) for v in model.trainable_variables],
        [keras.ops.convert_to_tensor(v) for v in model.non_trainable_variables],
    )


def _forward(model_ref, trainable, non_trainable, x):
    return model_ref().stateless_call(trainable, non_trainable, x, training=False)[0]


def forward_value_and_grad(forward: Callable) -> Callable:
    """`value_and_grad(objective, x, y)` -> (objective(logits, y), logits, d sum(objective) / dx),
    the logits forward(x): the input gradient an attack step takes, per example (`value_and_grad`).

    Args:
      forward: maps a batch of images to logits (e.g. a `stateless_call` of a model).
    """

    def model_value_and_grad(objective, x, y):
        def total(x):
            logits = forward(x)
            losses = objective(logits, y)
            return keras.ops.sum(losses), (losses, logits)

        _, (losses, logits), grad = value_and_grad(total, x)
        return losses, logits, grad

    return model_value_and_grad


def compile_model_function(model: keras.Model, fn: Callable, on_trace: Callable[[], None]) -> Callable:
    """Compiles `fn(forward, value_and_grad, *args)` on `model`, traced once per argument shape:
    the one way the attacks compile their work.

    Inside `fn` (written with keras.ops; loops with `keras.ops.fori_loop`), `forward(x)` returns
    the logits and `value_and_grad(objective, x, y)` returns (objective(logits, y), logits,
    d sum(objective) / dx) (zero where the loss does not depend on x), both with the model's
    variable values read at each call and passed in as arguments (`model.stateless_call`), so a
    changed weight or switch needs no retrace. TensorFlow: a `tf.function`, with XLA only on a GPU
    (on the CPU an attack loop under XLA was 10-25x slower, measured on the 2-core CPU); JAX: one
    `jax.jit`, its arguments placed for a data-parallel run by `_jax_place_arguments`. The compiled
    function holds the model weakly, so a cache of them keyed on the model does not keep it alive.

    Args:
      model: a built Keras model from inputs to logits.
      fn: the computation; its extra arguments are arrays or (nested) tuples of arrays.
      on_trace: called each time the function is traced (Python side effect).

    Returns:
      run(*args) -> fn's outputs as backend tensors, which a Python loop can pass back in without a
      copy to the host (`keras.ops.convert_to_numpy` for NumPy). Pass NumPy scalars, not Python
      numbers, so that a new value is not a new trace.
    """
    backend = name()
    model_ref = weakref.ref(model)

    def traced(trainable, non_trainable, args):
        on_trace()

        def forward(x):
            return _forward(model_ref, trainable, non_trainable, x)

        return fn(forward, forward_value_and_grad(forward), *args)

    if backend == "tensorflow":
        import tensorflow as tf

        # A partial: TensorFlow counts the traces of every tf.function of one code object together
        # and warns of retracing past 5; each compiled function is traced for its own shapes.
        tf_compiled = tf.function(functools.partial(traced), jit_compile=on_accelerator())

        def tf_run(*args):
            trainable, non_trainable = _variable_values(model_ref)
            return tf_compiled(trainable, non_trainable, tf.nest.map_structure(tf.convert_to_tensor, args))

        return tf_run
    if backend == "jax":
        import jax

        jax_compiled = jax.jit(traced)

        def jax_run(*args):
            trainable, non_trainable = _jax_replicate(_variable_values(model_ref))
            return jax_compiled(trainable, non_trainable, _jax_place_arguments(args))

        return jax_run
    raise NotImplementedError(f"polar_tf supports the tensorflow and jax backends, not {backend!r}")


# ----------------------------------------------------------------------------- data parallelism
#
# A data-parallel run splits every batch across all devices of the default kind (GPUs or TPUs, else
# the CPU's), on every host, with the model's variables replicated on each: the global batch's
# gradient is the one a single device computes, up to the order of float sums. Every collective
# is Keras' or the backend's own.

_hosts_initialized = False


@contextlib.contextmanager
def data_parallel():
    """Runs the block data-parallel over every device of the default kind, on every host.

    JAX: `keras.distribution.DataParallel` over `keras.distribution.list_devices()`, set for the
    block. Where $KERAS_DISTRIBUTION_NUM_PROCESSES is above 1, `keras.distribution.initialize()`
    first joins the processes (it reads $KERAS_DISTRIBUTION_JOB_ADDRESSES, the coordinator's
    address, and $KERAS_DISTRIBUTION_PROCESS_ID too), once per process. Keras objects made in the block (models built or loaded, optimizers) have their
    variables replicated on all devices, `fit` splits each batch across them, and the attack loops
    (`compile_model_function`), `predict` and `place_rows` place batches the same way. Each process
    feeds `fit` its own rows (`polar_tf.parallel.epoch_rows`), so datasets are not auto-sharded.

    Raises:
      ValueError: on the TensorFlow backend: Keras 3's distribution API is JAX-only there.
    """
    backend = name()
    if backend != "jax":
        raise ValueError(
            f"data-parallel runs need the JAX backend (keras.distribution is JAX-only in Keras 3); "
            f"run with KERAS_BACKEND=jax. Received: backend {backend!r}"
        )
    global _hosts_initialized
    processes = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")
    if not processes.isdigit() or int(processes) < 1:
        raise ValueError(f"KERAS_DISTRIBUTION_NUM_PROCESSES must be a positive integer. Received: {processes!r}")
    if not _hosts_initialized and int(processes) > 1:
        keras.distribution.initialize()
        _hosts_initialized = True
    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices(), auto_shard_dataset=False
    )
    with distribution.scope():
        yield


def replica_count() -> int:
    """How many devices each batch is split across: all of a data-parallel run's, else 1."""
    distribution = keras.distribution.distribution() if name() == "jax" else None
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)


def process_count() -> int:
    """How many processes (hosts) a data-parallel run spans: 1 outside one."""
    if name() != "jax" or keras.distribution.distribution() is None:
        return 1
    import jax

    return jax.process_count()


def process_index() -> int:
    """This process's index among `process_count()` (0 outside a data-parallel run)."""
    if name() != "jax" or keras.distribution.distribution() is None:
        return 0
    import jax

    return jax.process_index()


def place_rows(x: np.ndarray):
    """A batch ready for eager `keras.ops` computations, split across the devices of a
    single-process data-parallel run (rows padded with zeros to a multiple of `replica_count()`),
    which then compute their rows each; elsewhere x unchanged. Cut results back to len(x)."""
    shardings = _jax_shardings()
    if shardings is None or process_count() > 1:  # Several processes: each computes every row.
        return x
    return _jax_place_batch([np.asarray(x)])[0]


def predict(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's outputs on x as a NumPy array, batch by batch, but for data-parallel runs.

    On one device each batch is one `model.predict_on_batch`: the compiled function `model.predict`
    runs, without its data pipeline and callbacks, which cost 55-90 ms a call on TensorFlow (4-6
    times the call itself for 40 images: BENCHMARKS.md, "Small predictions"), and evaluations make
    hundreds of small calls. In a data-parallel run each batch is padded to a multiple of
    `replica_count()` (Keras' predict needs every batch, the last one included, to split evenly)
    and split across the devices; the outputs are gathered on every host (Keras' predict cannot
    fetch them across hosts).
    """
    if _jax_shardings() is None:
        parts = [np.asarray(model.predict_on_batch(x[start : start + batch_size])) for start in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, *model.output_shape[1:]), np.float32)
    forward = _JAX_FORWARD.get(model)
    if forward is None:
        import jax

        model_ref = weakref.ref(model)
        forward = _JAX_FORWARD[model] = jax.jit(lambda t, nt, x: _forward(model_ref, t, nt, x))
    trainable, non_trainable = _jax_replicate(_variable_values(weakref.ref(model)))
    parts = []
    for start in range(0, len(x), batch_size):
        rows = x[start : start + batch_size]
        parts.append(_jax_fetch(forward(trainable, non_trainable, *_jax_place_batch([rows])), len(rows)))
    return np.concatenate(parts) if parts else np.zeros((0, *model.output_shape[1:]), np.float32)


_JAX_FORWARD: "weakref.WeakKeyDictionary[keras.Model, Callable]" = weakref.WeakKeyDictionary()


def _jax_shardings():
    """(batch split across the devices, replicated on each) of the active data-parallel run, or None."""
    if name() != "jax":
        return None
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = distribution.device_mesh.backend_mesh
    return NamedSharding(mesh, PartitionSpec(distribution.batch_dim_name)), NamedSharding(mesh, PartitionSpec())


def _jax_place_batch(arrays: list[np.ndarray]) -> list:
    """Equal-length NumPy arrays as JAX arrays; in a data-parallel run padded with zero rows to a
    multiple of the devices and split across them. Every process holds the whole batch."""
    import jax
    import jax.numpy as jnp

    shardings = _jax_shardings()
    if shardings is None:
        return [jnp.asarray(a) for a in arrays]
    padding = -len(arrays[0]) % replica_count()
    placed = []
    for a in arrays:
        if padding:
            a = np.concatenate([a, np.zeros((padding, *a.shape[1:]), a.dtype)])
        placed.append(jax.make_array_from_callback(a.shape, shardings[0], lambda index, a=a: a[index]))
    return placed


def _jax_place_arguments(args):
    """`compile_model_function`'s arguments as JAX arrays. In a single-process data-parallel run the
    batch (the arrays whose first axis is the longest one) is split across the devices when it
    splits evenly, and everything else is replicated: jit then runs the computation spread over
    them (GSPMD). A batch that does not split evenly, e.g. the last few examples Square still
    attacks, runs replicated: correct, not faster. With several processes every process computes
    every row, as `place_rows`."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree_util.tree_flatten(args)
    shardings = _jax_shardings()
    if shardings is None or process_count() > 1:
        return jax.tree_util.tree_unflatten(tree, [jnp.asarray(leaf) for leaf in leaves])
    rows = max((np.shape(leaf)[0] for leaf in leaves if np.ndim(leaf) > 0), default=0)
    split = rows > 0 and rows % replica_count() == 0

    def placement(leaf):
        return shardings[0] if split and np.ndim(leaf) > 0 and np.shape(leaf)[0] == rows else shardings[1]

    return jax.tree_util.tree_unflatten(tree, [jax.device_put(leaf, placement(leaf)) for leaf in leaves])


def _jax_replicate(values):
    """The model's variable values replicated on every device of a data-parallel run (a no-op for
    variables made inside it, which already are)."""
    shardings = _jax_shardings()
    if shardings is None:
        return values
    import jax

    return jax.device_put(values, shardings[1])


def _jax_fetch(array, rows: int) -> np.ndarray:
    """A batched JAX array as NumPy on this host (gathered from the others if split across hosts),
    its first `rows` rows: without the padding of `_jax_place_batch`."""
    if not (array.is_fully_addressable or array.is_fully_replicated):
        from jax.experimental import multihost_utils

        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(array)[:rows]
