"""Keras' own ``rnn_test.py`` (Keras 3.15) with every ``keras.layers.RNN(cell)`` wrapped in
``HighwayRNN``: Keras' cells (rewritten here: all-ones weights, no residual, so the wrapper
runs FPI), inputs and expected values, plus the exact-mode gradient against BPTT."""

from __future__ import annotations

import numpy as np
import pytest
import keras
from keras import ops

from hwbptt.keras import HighwayRNN

from ported import arange, assert_exact_grads, assert_near, assert_basics, wrap

RNN = keras.layers.RNN


@keras.saving.register_keras_serializable(package="hwbptt_ported")
class OneState(keras.layers.Layer):
    """``y_t = s_t = x_t W + s_{t-1} U`` (Keras' ``OneStateRNNCell``)."""

    def __init__(self, units, state_size=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = state_size if state_size else units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="ones", name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, self.units), initializer="ones", name="recurrent_kernel")

    def call(self, inputs, states):
        out = ops.matmul(inputs, self.kernel) + ops.matmul(states[0], self.recurrent_kernel)
        return out, [out]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "state_size": self.state_size}


@keras.saving.register_keras_serializable(package="hwbptt_ported")
class TwoStates(keras.layers.Layer):
    """Keras' ``TwoStatesRNNCell``: both new states read the first old state,
    ``s^i_t = x_t W + s^1_{t-1} U_i``, ``y_t = s^1_t + s^2_t``."""

    def __init__(self, units, state_size=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = state_size if state_size else [units, units]
        self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="ones", name="kernel")
        self.u1 = self.add_weight(shape=(self.units, self.units), initializer="ones", name="recurrent_kernel_1")
        self.u2 = self.add_weight(shape=(self.units, self.units), initializer="ones", name="recurrent_kernel_2")

    def call(self, inputs, states):
        h = ops.matmul(inputs, self.kernel)
        a, b = h + ops.matmul(states[0], self.u1), h + ops.matmul(states[0], self.u2)
        return a + b, [a, b]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "state_size": self.state_size}


@pytest.mark.parametrize(
    "make,kwargs,shape,trainable",
    [
        (lambda: OneState(5, state_size=5), {}, (3, 5), 2),
        (lambda: OneState(5, state_size=[5]), {}, (3, 5), 2),
        (lambda: OneState(5, state_size=(5,)), {}, (3, 5), 2),
        (lambda: OneState(5), {"return_sequences": True}, (3, 2, 5), 2),
        (lambda: OneState(5), {"go_backwards": True, "unroll": True}, (3, 5), 2),
        (lambda: TwoStates(5, state_size=[5, 5]), {}, (3, 5), 3),
        (lambda: TwoStates(5, state_size=(5, 5)), {}, (3, 5), 3),
        (lambda: TwoStates(5), {"return_sequences": True}, (3, 2, 5), 3),
    ],
)
def test_basics(make, kwargs, shape, trainable):
    assert_basics(lambda: RNN(make(), **kwargs), (3, 2, 4), shape, trainable=trainable)


@pytest.mark.parametrize("cell,n_states", [(OneState, 1), (TwoStates, 2)])
@pytest.mark.parametrize("shape", [(3, 4, 5), (None, None, 3)])
def test_compute_output_shape(cell, n_states, shape):
    batch, steps = shape[0], shape[1]
    for seqs, state in [(False, False), (True, False), (False, True), (True, True)]:
        out = wrap(RNN(cell(8), return_sequences=seqs, return_state=state)).compute_output_shape(shape)
        main = (batch, steps, 8) if seqs else (batch, 8)
        if state:
            assert out[0] == main and all(s == (batch, 8) for s in out[1:]) and len(out) == 1 + n_states
        else:
            assert out == main


def test_forward_pass_single_state():
    seq = np.ones((1, 2, 3))
    assert_near(wrap(RNN(OneState(2)))(seq), [[9.0, 9.0]])
    assert_near(wrap(RNN(OneState(2), return_sequences=True))(seq), [[[3.0, 3.0], [9.0, 9.0]]])
    out, state = wrap(RNN(OneState(2), return_state=True))(seq)
    assert_near(out, [[9.0, 9.0]]), assert_near(state, [[9.0, 9.0]])
    out, state = wrap(RNN(OneState(2), return_sequences=True, return_state=True))(seq)
    assert_near(out, [[[3.0, 3.0], [9.0, 9.0]]]), assert_near(state, [[9.0, 9.0]])
    assert_exact_grads(lambda: RNN(OneState(2), return_sequences=True, return_state=True), seq)


def test_forward_pass_two_states():
    seq = np.ones((1, 2, 3))
    assert_near(wrap(RNN(TwoStates(2)))(seq), [[18.0, 18.0]])
    assert_near(wrap(RNN(TwoStates(2), return_sequences=True))(seq), [[[6.0, 6.0], [18.0, 18.0]]])
    for seqs, want in [(False, [[18.0, 18.0]]), (True, [[[6.0, 6.0], [18.0, 18.0]]])]:
        out, s1, s2 = wrap(RNN(TwoStates(2), return_sequences=seqs, return_state=True))(seq)
        assert_near(out, want), assert_near(s1, [[9.0, 9.0]]), assert_near(s2, [[9.0, 9.0]])
    assert_exact_grads(lambda: RNN(TwoStates(2), return_sequences=True, return_state=True), seq)


def test_passing_initial_state():
    seq, state = np.ones((2, 3, 2)), np.ones((2, 2), dtype="float32")
    assert_near(wrap(RNN(OneState(2)))(seq, initial_state=state), np.full((2, 2), 22.0))
    out, s = wrap(RNN(OneState(2), return_state=True))(seq, initial_state=state)
    assert_near(out, np.full((2, 2), 22.0)), assert_near(s, np.full((2, 2), 22.0))
    assert_exact_grads(lambda: RNN(OneState(2)), seq, initial_state=state)
    states = [state, state]
    assert_near(wrap(RNN(TwoStates(2)))(seq, initial_state=states), np.full((2, 2), 44.0))
    out, s1, s2 = wrap(RNN(TwoStates(2), return_state=True))(seq, initial_state=states)
    assert_near(out, np.full((2, 2), 44.0)), assert_near(s1, np.full((2, 2), 22.0)), assert_near(s2, np.full((2, 2), 22.0))
    assert_exact_grads(lambda: RNN(TwoStates(2)), seq, initial_state=states)


def test_statefulness():
    seq = np.ones((1, 2, 3))
    layer = wrap(RNN(OneState(2), stateful=True))
    layer(seq)
    assert_near(layer(seq), [[45.0, 45.0]])
    layer = wrap(RNN(OneState(2), stateful=True, return_state=True))
    layer(seq)
    out, state = layer(seq)
    assert_near(out, [[45.0, 45.0]]), assert_near(state, [[45.0, 45.0]])
    layer = wrap(RNN(TwoStates(2), stateful=True))
    layer(seq)
    assert_near(layer(seq), [[90.0, 90.0]])
    layer = wrap(RNN(TwoStates(2), stateful=True, return_state=True))
    layer(seq)
    out, s1, s2 = layer(seq)
    assert_near(out, [[90.0, 90.0]]), assert_near(s1, [[45.0, 45.0]]), assert_near(s2, [[45.0, 45.0]])


def test_go_backwards():
    seq = arange(2, 3, 4)
    layer = wrap(RNN(OneState(2), go_backwards=True))
    layer(seq)
    assert_near(layer(seq), [[202.0, 202.0], [538.0, 538.0]])
    assert_exact_grads(lambda: RNN(OneState(2), go_backwards=True), seq / 24.0)
    layer = wrap(RNN(OneState(2), stateful=True, return_state=True))
    layer(seq)
    out, state = layer(seq)
    assert_near(out, [[954.0, 954.0], [3978.0, 3978.0]]), assert_near(state, [[954.0, 954.0], [3978.0, 3978.0]])


@pytest.mark.parametrize("cell", [TwoStates, OneState])
def test_serialization(cell):
    layer = wrap(RNN(cell(2)))
    x = np.ones((1, 3, 2), dtype="float32")
    want = layer(x)
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, HighwayRNN)
    assert clone.get_config() == layer.get_config()
    assert_near(clone(x), want)


def test_stateful_batch_size_mismatch_raises():
    layer = wrap(RNN(TwoStates(2), stateful=True))
    inputs = keras.Input(shape=(5, 3), batch_size=4)
    model = keras.Model(inputs, layer(inputs))
    model(np.random.default_rng(0).uniform(size=(4, 5, 3)).astype("float32"))
    with pytest.raises(ValueError, match="batch size"):
        model(np.random.default_rng(1).uniform(size=(1, 5, 3)).astype("float32"))


def test_masking():
    seq = arange(2, 4, 3)
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    for unroll in (False, True):
        assert_near(wrap(RNN(OneState(2), unroll=unroll))(seq, mask=mask), [[57.0, 57.0], [126.0, 126.0]])
        assert_near(wrap(RNN(OneState(2), return_sequences=True, unroll=unroll))(seq, mask=mask),
              [[[3.0, 3.0], [18.0, 18.0], [57.0, 57.0], [57.0, 57.0]],
               [[39.0, 39.0], [126.0, 126.0], [126.0, 126.0], [126.0, 126.0]]])
    assert_exact_grads(lambda: RNN(OneState(2), return_sequences=True), seq / 24.0, mask=mask)
