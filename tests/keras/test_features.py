"""The behaviours of issue 14, each against the unwrapped layer: recurrent dropout (the
same masks for the same seed, exact gradients equal), stateful layers (two calls equal
one call on the concatenation; reset_state), input_shape=, mixed_float16 user cells."""

from __future__ import annotations

import numpy as np
import pytest
import keras
from keras import ops

from hwbptt.keras import HighwayRNN

from helpers import BACKEND, ResidualCell, grads, tensor

RNG = np.random.default_rng(3)
X = RNG.normal(size=(3, 7, 4)).astype("float32")
P = RNG.normal(size=(3, 7, 5)).astype("float32")

DROPOUT_KINDS = {
    "lstm": lambda: keras.layers.LSTM(5, dropout=0.3, recurrent_dropout=0.4, seed=11, return_sequences=True),
    "gru": lambda: keras.layers.GRU(5, dropout=0.3, recurrent_dropout=0.4, seed=11, return_sequences=True),
    "gru_before": lambda: keras.layers.GRU(5, recurrent_dropout=0.4, reset_after=False, seed=11, return_sequences=True),
    "simple": lambda: keras.layers.SimpleRNN(5, dropout=0.3, recurrent_dropout=0.4, seed=11, return_sequences=True),
}


def _pair(make):
    plain, inner = make(), make()
    plain.build((None, 7, 4)), inner.build((None, 7, 4))
    for a, b in zip(inner.weights, plain.weights):
        a.assign(b.value)
    return plain, inner


@pytest.mark.parametrize("kind", list(DROPOUT_KINDS))
@pytest.mark.parametrize("iterations", [None, 2])
def test_recurrent_dropout_matches_the_wrapped_layer(kind, iterations):
    plain, inner = _pair(DROPOUT_KINDS[kind])
    hw = HighwayRNN(inner, iterations=iterations)
    loss = lambda layer: (lambda x: ops.sum(layer(x, training=True) * tensor(P)))
    ref = grads(loss(plain), [tensor(X)], plain.trainable_variables)
    got = grads(loss(hw), [tensor(X)], inner.trainable_variables)
    if iterations is None:  # exact: BPTT's gradient with the same masks
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)
    else:  # 2 iterations: the adjoint is exact on the last 3 of 7 steps, so is ∂L/∂x there
        np.testing.assert_allclose(got[0][:, -3:], ref[0][:, -3:], atol=1e-5, rtol=1e-4)
        assert not np.allclose(got[0][:, 0], ref[0][:, 0], atol=1e-5, rtol=1e-4)
    # the masks advanced both seed streams alike: the next calls agree too
    np.testing.assert_allclose(ops.convert_to_numpy(hw(X, training=True)), ops.convert_to_numpy(plain(X, training=True)),
                               atol=1e-5)
    # no dropout outside training
    np.testing.assert_allclose(ops.convert_to_numpy(hw(X)), ops.convert_to_numpy(plain(X)), atol=1e-5)


def test_recurrent_dropout_changes_the_output_when_training():
    _, inner = _pair(DROPOUT_KINDS["lstm"])
    hw = HighwayRNN(inner)
    assert not np.allclose(ops.convert_to_numpy(hw(X, training=True)), ops.convert_to_numpy(hw(X, training=False)))


STATEFUL = {
    "lstm": lambda **kw: keras.layers.LSTM(5, **kw),
    "gru": lambda **kw: keras.layers.GRU(5, **kw),
    "simple": lambda **kw: keras.layers.SimpleRNN(5, **kw),
    "user": lambda **kw: keras.layers.RNN(ResidualCell(5), **kw),
}


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_stateful_two_calls_equal_one_call_on_the_concatenation(kind):
    extra = {"residual": "identity"} if kind == "user" else {}
    keras.utils.set_random_seed(0)
    whole = STATEFUL[kind](return_sequences=True)
    whole.build((3, 7, 4))
    stateful = STATEFUL[kind](return_sequences=True, stateful=True)
    hw = HighwayRNN(stateful, iterations=None, **extra)
    hw.build((3, 7, 4))
    for a, b in zip(stateful.trainable_weights, whole.trainable_weights):
        a.assign(b.value)
    want = ops.convert_to_numpy(whole(X))
    first, second = hw(X[:, :4]), hw(X[:, 4:])
    np.testing.assert_allclose(np.concatenate([ops.convert_to_numpy(first), ops.convert_to_numpy(second)], axis=1), want, atol=1e-5)
    hw.reset_states()
    assert all(np.all(ops.convert_to_numpy(v) == 0) for v in hw.states)
    np.testing.assert_allclose(ops.convert_to_numpy(hw(X[:, :4])), want[:, :4], atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_stateful_gradient_stops_at_the_batch_boundary(kind):
    """The second call's exact gradient is the plain layer's BPTT gradient started from
    the carried state as a constant (Keras: no backpropagation across batches)."""
    plain = STATEFUL[kind](return_sequences=True)
    inner = STATEFUL[kind](return_sequences=True, stateful=True)
    plain.build((3, 7, 4)), inner.build((3, 7, 4))
    for a, b in zip(inner.trainable_weights, plain.trainable_weights):
        a.assign(b.value)
    hw = HighwayRNN(inner, iterations=None)
    hw(X)
    carried = [tensor(ops.convert_to_numpy(v)) for v in inner.states]
    assert all(np.any(ops.convert_to_numpy(c) != 0) for c in carried)
    ref = grads(lambda x: ops.sum(plain(x, initial_state=carried) * tensor(P)), [tensor(X)], plain.trainable_variables)
    got = grads(lambda x: ops.sum(hw(x) * tensor(P)), [tensor(X)], inner.trainable_variables)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


def test_stateful_model_fit_carries_state():
    inner = keras.layers.LSTM(5, stateful=True)
    model = keras.Sequential([keras.Input(batch_shape=(3, 7, 4)), HighwayRNN(inner), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, np.zeros((3, 1), "float32"), batch_size=3, epochs=1, verbose=0, shuffle=False)
    assert np.any(ops.convert_to_numpy(inner.states[0]) != 0)
    model.layers[0].reset_states()
    assert np.all(ops.convert_to_numpy(inner.states[0]) == 0)


def test_input_shape_builds_the_model():
    make = lambda: keras.layers.LSTM(64, input_shape=(10, 8))
    with pytest.warns(UserWarning):
        plain = keras.Sequential([make(), keras.layers.Dense(4)])
        wrapped = keras.Sequential([HighwayRNN(make()), keras.layers.Dense(4)])
    assert wrapped.built
    assert wrapped.count_params() == plain.count_params() == 4 * (8 * 64 + 64 * 64 + 64) + 64 * 4 + 4
    assert tuple(wrapped.output_shape) == (None, 4)


@pytest.mark.parametrize("iterations", [3, None])
def test_mixed_float16_user_cell_fits(iterations):
    """The issue's failure (float16 cotangents meeting float32 variables in the backward):
    fit runs, and the float16 gradient is the plain layer's (exact mode) to float16 accuracy."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        plain, inner = keras.layers.RNN(ResidualCell(5)), keras.layers.RNN(ResidualCell(5))
        plain.build((None, 6, 4)), inner.build((None, 6, 4))
        for a, b in zip(inner.weights, plain.weights):
            a.assign(b.value)
        hw = HighwayRNN(inner, iterations=iterations, residual="identity")
        assert hw.compute_dtype == "float16"
        model = keras.Sequential([keras.Input((6, 4)), hw, keras.layers.Dense(1, dtype="float32")])
        model.compile(optimizer="adam", loss="mse")
        x = np.random.default_rng(0).normal(size=(8, 6, 4)).astype("float32")
        history = model.fit(x, np.ones((8, 1), "float32"), verbose=0, epochs=2)
        assert all(np.isfinite(history.history["loss"]))
        p = tensor(np.random.default_rng(1).normal(size=(8, 5)), "float16")
        loss = lambda layer: (lambda v: ops.sum(ops.cast(layer(v) * p, "float32")))
        ref = grads(loss(plain), [tensor(x)], plain.trainable_variables)
        got = grads(loss(hw), [tensor(x)], inner.trainable_variables)
        for g, r in zip(got, ref):
            assert np.all(np.isfinite(g))
            if iterations is None:
                np.testing.assert_allclose(g, r, atol=2e-2 * np.abs(r).max(), rtol=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
