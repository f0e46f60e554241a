"""``keras.layers.RNN(StackedRNNCells)`` wrapped in ``HighwayRNN``: Keras' own stacked cases
(``stacked_rnn_cells_test.py`` of Keras 3.15, its expected values), the nested states, the
exact mode's gradient against BPTT, Highway-BP's at ``k = T``, the residual composed from
the built-in sub-cells, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import keras
from keras import ops

from hwbptt.keras import HighwayRNN
from hwbptt.keras.user_cell import stacked_residual

from helpers import grads, rel
from ported import assert_near, wrap
from test_ported_rnn import OneState, TwoStates

RNN = keras.layers.RNN
SEQ = np.arange(24).reshape((2, 3, 4)).astype("float32")


def _np(t):
    return ops.convert_to_numpy(ops.stop_gradient(t))


def test_correctness_single_state_stack():
    out = wrap(RNN([OneState(3), OneState(2)]))(SEQ)
    assert_near(out, [[786.0, 786.0], [4386.0, 4386.0]])
    out = wrap(RNN([OneState(3), OneState(2)], return_sequences=True))(SEQ)
    assert_near(out, [[[18.0, 18.0], [156.0, 156.0], [786.0, 786.0]],
                      [[162.0, 162.0], [1020.0, 1020.0], [4386.0, 4386.0]]])
    out, s1, s2 = wrap(RNN([OneState(3), OneState(2)], return_state=True))(SEQ)
    assert_near(out, [[786.0, 786.0], [4386.0, 4386.0]])
    assert_near(s1, [[158.0, 158.0, 158.0], [782.0, 782.0, 782.0]])
    assert_near(s2, [[786.0, 786.0], [4386.0, 4386.0]])


def test_correctness_two_states_stack():
    out = wrap(RNN([TwoStates(3), TwoStates(2)]))(SEQ)
    assert_near(out, [[3144.0, 3144.0], [17544.0, 17544.0]])
    out, s1, s2 = wrap(RNN([TwoStates(3), TwoStates(2)], return_state=True))(SEQ)
    assert_near(out, [[3144.0, 3144.0], [17544.0, 17544.0]])
    assert isinstance(s1, list) and len(s1) == 2 and isinstance(s2, list) and len(s2) == 2  # Keras' nesting
    assert_near(s1[0], [[158.0, 158.0, 158.0], [782.0, 782.0, 782.0]])
    assert_near(s1[1], [[158.0, 158.0, 158.0], [782.0, 782.0, 782.0]])


def _cells():
    return [keras.layers.LSTMCell(4, seed=1), keras.layers.GRUCell(3, seed=2),
            keras.layers.GRUCell(5, reset_after=False, seed=3), keras.layers.SimpleRNNCell(2, seed=4)]


def _pair(**kwargs):
    """An unwrapped stacked RNN and a wrapped one with the same weights."""
    plain, inner = RNN(_cells(), **kwargs), RNN(_cells(), **kwargs)
    x = np.random.default_rng(0).normal(size=(3, 9, 6)).astype("float32")
    plain(x), inner(x)
    for a, b in zip(inner.weights, plain.weights):
        a.assign(b.value)
    return plain, inner, x


def test_built_in_cells_stack_values_and_nested_states():
    plain, inner, x = _pair(return_sequences=True, return_state=True)
    want, got = plain(x), HighwayRNN(inner, iterations=3)(x)
    assert len(got) == len(want) == 5  # outputs, [h, c] of the LSTM cell, then one state per cell
    assert isinstance(got[1], list) and not isinstance(got[2], list)
    for g, w in zip(keras.tree.flatten(got), keras.tree.flatten(want)):
        np.testing.assert_allclose(_np(g), _np(w), atol=1e-6)


@pytest.mark.parametrize("iterations", [None, 9], ids=["exact", "k=T"])
def test_built_in_cells_stack_gradient_is_bptts(iterations):
    """Exact mode, and Highway-BP at k = T with the composed residual, give the unwrapped
    stack's BPTT gradient (input and every weight)."""
    plain, inner, x = _pair(return_sequences=True)
    hw = HighwayRNN(inner, iterations=iterations)
    p = np.random.default_rng(1).normal(size=(3, 9, 2)).astype("float32")

    def loss_of(layer):
        return lambda xs: ops.sum(layer(xs) * ops.convert_to_tensor(p))

    ref = grads(loss_of(plain), [ops.convert_to_tensor(x)], plain.trainable_variables)
    got = grads(loss_of(hw), [ops.convert_to_tensor(x)], inner.trainable_variables)
    assert len(got) == len(ref) == 1 + 3 + 3 + 3 + 3
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-4


def test_composed_residual_is_each_cells_own_gate():
    """``stacked_residual``: ``f_t`` on the LSTM cell's cell state, ``z_t`` on each GRU's
    state (both bias layouts), nothing on h, the SimpleRNN or a state above a user cell."""
    plain, _, x = _pair()
    lstm, gru, gru_v1, srnn = plain.cell.cells
    g = np.random.default_rng(2)
    x_t = ops.convert_to_tensor(g.normal(size=(5, 6)).astype("float32"))
    prev = [ops.convert_to_tensor(g.normal(size=(5, n)).astype("float32")) for n in (4, 4, 3, 5, 2)]
    new = [ops.convert_to_tensor(g.normal(size=(5, n)).astype("float32")) for n in (4, 4, 3, 5, 2)]
    got = stacked_residual(plain.cell)(x_t, prev, new)
    assert len(got) == 5 and got[0] is None and got[4] is None

    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    k, u, b = (_np(ops.convert_to_tensor(w)) for w in (lstm.kernel, lstm.recurrent_kernel, lstm.bias))
    f = sig(_np(x_t) @ k[:, 4:8] + _np(prev[0]) @ u[:, 4:8] + b[4:8])
    np.testing.assert_allclose(_np(got[1]), f, atol=1e-6)
    k, u, b = (_np(ops.convert_to_tensor(w)) for w in (gru.kernel, gru.recurrent_kernel, gru.bias))
    z = sig(_np(new[0]) @ k[:, :3] + b[0, :3] + _np(prev[2]) @ u[:, :3] + b[1, :3])  # input: the LSTM's h_t
    np.testing.assert_allclose(_np(got[2]), z, atol=1e-6)
    k, u, b = (_np(ops.convert_to_tensor(w)) for w in (gru_v1.kernel, gru_v1.recurrent_kernel, gru_v1.bias))
    z = sig(_np(new[2]) @ k[:, :5] + _np(prev[3]) @ u[:, :5] + b[:5])
    np.testing.assert_allclose(_np(got[3]), z, atol=1e-6)

    above_user = RNN([OneState(4), keras.layers.GRUCell(3)])
    above_user(SEQ)
    assert stacked_residual(above_user.cell)(ops.convert_to_tensor(SEQ[:, 0]), prev[:2], new[:2]) == [None, None]


def test_composed_residual_converges_where_fpi_does_not():
    """The same k = 2 with the sub-cells' residual paths against FPI (``residual="none"``),
    in a long-memory stack (small recurrent weights, the forget bias): the residual path
    carries the cell states over all 40 steps, FPI only over the last 3."""
    def cells():
        small = dict(recurrent_initializer=keras.initializers.Orthogonal(gain=0.2, seed=5),
                     kernel_initializer=keras.initializers.GlorotUniform(seed=6))
        return [keras.layers.LSTMCell(8, **small), keras.layers.GRUCell(8, **small)]

    plain, inner = RNN(cells(), return_sequences=True), RNN(cells(), return_sequences=True)
    x = np.random.default_rng(3).normal(size=(3, 40, 6)).astype("float32")
    plain(x), inner(x)
    for a, b in zip(inner.weights, plain.weights):
        a.assign(b.value)
    p = ops.convert_to_tensor(np.random.default_rng(4).normal(size=(3, 40, 8)).astype("float32"))
    ref = grads(lambda xs: ops.sum(plain(xs) * p), [ops.convert_to_tensor(x)], [])[0]
    errors = {}
    for residual in (None, "none"):
        hw = HighwayRNN(inner, iterations=2, residual=residual)
        errors[residual] = rel(grads(lambda xs: ops.sum(hw(xs) * p), [ops.convert_to_tensor(x)], [])[0], ref)
    assert errors[None] < 0.5 * errors["none"], errors


def test_nested_stacks_and_a_sub_cell_drawing_its_own_dropout_are_refused():
    """(Sub-cells with Keras' dropout mixin are supported: test_cell_dropout.py.)"""
    from test_cell_dropout import LooseDropoutCell

    with pytest.raises(ValueError, match=r"a StackedRNNCells' LooseDropoutCell has dropout=0.2"):
        HighwayRNN(RNN([keras.layers.LSTMCell(3), LooseDropoutCell(2)]))(SEQ)
    inner = keras.layers.StackedRNNCells([keras.layers.LSTMCell(3)])
    with pytest.raises(ValueError, match="inside a StackedRNNCells"):
        HighwayRNN(RNN([inner, keras.layers.GRUCell(2)]))(SEQ)


def test_stack_fits_and_round_trips_its_config():
    """A wrapped stack in a Sequential model trains (finite, falling loss) and its config
    rebuilds a layer with the same outputs for the same weights."""
    x = np.random.default_rng(5).normal(size=(16, 12, 4)).astype("float32")
    y = x[:, :, :1].sum(axis=1)
    hw = HighwayRNN(RNN([keras.layers.LSTMCell(6, seed=1), keras.layers.GRUCell(5, seed=2)]), iterations=3)
    model = keras.Sequential([keras.Input((12, 4)), hw, keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    losses = model.fit(x, y, epochs=8, batch_size=8, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    clone = HighwayRNN.from_config(hw.get_config())
    clone(x)
    for a, b in zip(clone.weights, hw.weights):
        a.assign(b.value)
    np.testing.assert_allclose(_np(clone(x)), _np(hw(x)), atol=1e-6)


@pytest.mark.parametrize("return_state", [False, True])
def test_bidirectional_stack_equals_the_unwrapped(return_state):
    """``Bidirectional(HighwayRNN(RNN([LSTMCell, GRUCell])))``: the outputs and, with
    ``return_state``, both directions' nested states equal the unwrapped layer's."""
    def make():
        return RNN([keras.layers.LSTMCell(3, seed=1), keras.layers.GRUCell(2, seed=2)], return_sequences=True,
                   return_state=return_state)

    x = np.random.default_rng(6).normal(size=(2, 5, 4)).astype("float32")
    plain, hw = keras.layers.Bidirectional(make()), keras.layers.Bidirectional(HighwayRNN(make(), iterations=None))
    plain(x), hw(x)
    for a, b in zip(hw.weights, plain.weights):
        a.assign(b.value)
    want, got = keras.tree.flatten(plain(x)), keras.tree.flatten(hw(x))
    assert len(got) == len(want) == (7 if return_state else 1)
    for g, w in zip(got, want):
        np.testing.assert_allclose(_np(g), _np(w), atol=1e-6)


def test_stateful_stack_carries_its_nested_states_and_resets():
    """``stateful=True``: two calls give what one call on the concatenated sequence gives,
    and ``reset_states()`` zeros every nested state (Keras' own ``reset_state`` raises on the
    nesting in Keras 3.15)."""
    def make(stateful):
        return RNN([keras.layers.LSTMCell(3, seed=1), keras.layers.GRUCell(2, seed=2)], return_sequences=True,
                   stateful=stateful)

    x = np.random.default_rng(7).normal(size=(2, 6, 4)).astype("float32")
    hw, full = HighwayRNN(make(True), iterations=None), HighwayRNN(make(False), iterations=None)
    first = _np(hw(x[:, :3]))
    second = _np(hw(x[:, 3:]))
    full(x)
    for a, b in zip(full.weights, hw.weights):
        a.assign(b.value)
    np.testing.assert_allclose(np.concatenate([first, second], 1), _np(full(x)), atol=1e-6)
    hw.reset_states()
    assert all(not _np(v.value).any() for v in keras.tree.flatten(hw.layer.states))
    np.testing.assert_allclose(_np(hw(x[:, :3])), first, atol=1e-6)
