"""The TensorFlow route (``hwbptt.keras.tf_kernels``) against the ``keras.ops`` path it
replaces: the same outputs and gradients, for every option it takes."""

from __future__ import annotations

import numpy as np
import pytest
import keras
from keras import ops

from hwbptt.keras import HighwayRNN, tf_kernels

from helpers import BACKEND, grads, make, n_states, tensor

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow route")

RNG = np.random.default_rng(4)
X = RNG.normal(size=(3, 9, 4))
INIT = [RNG.normal(size=(3, 5)) for _ in range(2)]


def _grads(kind, on, dtype="float32", **options):
    layer, _ = make(kind, dtype=dtype, return_sequences=True, return_state=True)
    hw = HighwayRNN(layer, **options)
    init = [tensor(s, dtype) for s in INIT[: n_states(layer)]]
    w = tensor(np.arange(5), dtype)

    def loss(x, *s):
        out = hw(x, initial_state=list(s))
        return ops.sum(out[0] * w) + ops.sum(out[-1] ** 2)

    with tf_kernels.use(on):
        return grads(loss, [tensor(X, dtype)] + init, layer.trainable_variables), ops.convert_to_numpy(
            hw(tensor(X, dtype), initial_state=init)[0])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize(
    "options",
    [dict(iterations=0), dict(iterations=1), dict(iterations=3), dict(iterations=None), dict(iterations=20),
     dict(iterations=2, gamma=0.5), dict(iterations=8, tol=1e-3), dict(iterations=2, split="step")],
)
def test_route_equals_keras_ops_path(kind, options):
    (ref, out_ref), (got, out_got) = _grads(kind, False, **options), _grads(kind, True, **options)
    np.testing.assert_allclose(out_got, out_ref, atol=1e-6)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-5 * max(1.0, np.abs(r).max()), rtol=0)


def test_route_float64_is_float64_accurate():
    (ref, _), (got, _) = _grads("lstm", False, "float64", iterations=None), _grads("lstm", True, "float64", iterations=None)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-12 * max(1.0, np.abs(r).max()), rtol=0)


def test_route_is_taken_and_only_where_it_applies():
    calls = []
    original = tf_kernels.run
    tf_kernels.run = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        layer, _ = make("lstm")
        HighwayRNN(layer)(tensor(X))
        assert calls == [1]
        HighwayRNN(layer)(tensor(X), mask=tensor(np.ones((3, 9), bool), "bool"))
        HighwayRNN(make("gru_before")[0])(tensor(X))
        HighwayRNN(make("lstm")[0], diagnostics=True)(tensor(X))
        assert calls == [1]
    finally:
        tf_kernels.run = original


def test_levers_are_checked():
    with pytest.raises(TypeError, match="forward_xla"):
        tf_kernels.levers(forward_xla="yes")
    with pytest.raises(TypeError, match="use"):
        with tf_kernels.use(1):
            pass


def test_first_layer_of_a_model_trains():
    model = keras.Sequential([keras.Input((9, 4)), HighwayRNN(keras.layers.LSTM(5, return_sequences=True)),
                              HighwayRNN(keras.layers.GRU(3), iterations=None)])
    model.compile(optimizer="adam", loss="mse")
    before = [np.array(w) for w in model.get_weights()]
    model.fit(X.astype("float32"), np.ones((3, 3), "float32"), epochs=2, verbose=0)
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
