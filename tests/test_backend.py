"""Tests of polar_tf.backend: the input gradient and the compile abstraction, on either backend."""

import keras
import numpy as np
from keras import ops

from polar_tf import backend


def linear_model() -> keras.Model:
    """logits = x @ w + b with small integer weights: every value below is exact in float32."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights([np.array([[1.0, -2.0], [0.0, 3.0], [2.0, 1.0]], np.float32), np.array([0.5, -1.0], np.float32)])
    return model


def test_gradient_of_sum_of_squares_is_2x_exactly():
    x = np.array([[0.5, -1.25], [3.0, 0.0]], np.float32)
    grad = ops.convert_to_numpy(backend.gradient(lambda v: ops.sum(v**2), x))
    np.testing.assert_array_equal(grad, 2 * x)  # 2x: a doubling, exact in float32


def test_value_and_grad_returns_value_aux_and_gradient():
    x = ops.convert_to_tensor(np.array([1.0, 2.0, -3.0], np.float32))
    value, aux, grad = backend.value_and_grad(lambda v: (ops.sum(v**3), v * 2.0), x)
    assert float(ops.convert_to_numpy(value)) == 1.0 + 8.0 - 27.0
    np.testing.assert_array_equal(ops.convert_to_numpy(aux), [2.0, 4.0, -6.0])
    np.testing.assert_array_equal(ops.convert_to_numpy(grad), [3.0, 12.0, 27.0])  # 3 x^2


def test_value_and_grad_is_zero_where_the_value_does_not_depend_on_x():
    x = ops.convert_to_tensor(np.array([1.0, 2.0], np.float32))
    _, _, grad = backend.value_and_grad(lambda v: (ops.sum(ops.zeros_like(v)) + 1.0, ()), x)
    np.testing.assert_array_equal(ops.convert_to_numpy(grad), [0.0, 0.0])


def test_compiled_function_matches_the_eager_one_and_traces_once_per_shape():
    model = linear_model()
    traces = []

    def fn(forward, value_and_grad, x, y):
        losses, logits, grad = value_and_grad(lambda z, labels: z[:, 0] * z[:, 1], x, y)
        return forward(x), losses, grad

    run = backend.compile_model_function(model, fn, lambda: traces.append(1))
    x = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -1.0]], np.float32)
    logits, losses, grad = (ops.convert_to_numpy(v) for v in run(x, np.zeros(2, np.int32)))
    expected_logits = ops.convert_to_numpy(model(x))
    expected_grad = ops.convert_to_numpy(backend.gradient(lambda v: ops.sum(model(v)[:, 0] * model(v)[:, 1]), x))
    # The same float32 arithmetic in a compiled graph: equal up to reassociation (a few ulps).
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-6)
    np.testing.assert_allclose(losses, expected_logits[:, 0] * expected_logits[:, 1], rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)
    # By hand: logits = (2.5, -2.5) and (-1.5, 1.0); d(l0 l1)/dx = l1 w[:, 0] + l0 w[:, 1].
    np.testing.assert_allclose(logits, [[2.5, -2.5], [-1.5, 1.0]], rtol=1e-6)
    w = model.get_weights()[0]
    np.testing.assert_allclose(grad, [l[1] * w[:, 0] + l[0] * w[:, 1] for l in logits], rtol=1e-6)
    run(x + 1.0, np.ones(2, np.int32))
    assert len(traces) == 1  # new values, same shapes: no retrace
    run(x[:1], np.zeros(1, np.int32))
    assert len(traces) == 2


def test_compiled_function_reads_the_weights_at_each_call():
    model = linear_model()
    run = backend.compile_model_function(model, lambda forward, _, x: forward(x), lambda: None)
    x = np.ones((1, 3), np.float32)
    before = ops.convert_to_numpy(run(x))
    model.set_weights([2 * w for w in model.get_weights()])
    np.testing.assert_allclose(ops.convert_to_numpy(run(x)), 2 * before, rtol=1e-6)
