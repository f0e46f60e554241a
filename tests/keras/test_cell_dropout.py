"""Dropout inside a user cell (``cell_dropout``): a ``StackedRNNCells`` of built-in cells
with ``dropout``/``recurrent_dropout``, and a user cell with Keras' ``DropoutRNNCell``
mixin, wrapped. The same seeds draw the same masks as the unwrapped layer: the values
match, the exact-mode gradient is the unwrapped layer's BPTT gradient, and Highway-BP at
``k = T`` gives it too (its VJPs run on the flattened ``T·B`` rows with the masks tiled)."""

from __future__ import annotations

import numpy as np
import pytest
import keras
from keras import ops

from hwbptt.keras import HighwayRNN
from hwbptt.keras.cell_dropout import DropoutRNNCell

from helpers import grads, rel

RNN = keras.layers.RNN
T_STEPS = 7


class DropoutCell(DropoutRNNCell, keras.layers.Layer):
    """``h_t = tanh((x_t ⊙ m) W + (h_{t-1} ⊙ r) U)`` with the mixin's masks ``m``, ``r``."""

    def __init__(self, units, dropout=0.0, recurrent_dropout=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.units, self.state_size = units, units
        self.dropout, self.recurrent_dropout = dropout, recurrent_dropout
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, self.units), name="recurrent_kernel")

    def call(self, inputs, states, training=False):
        h = states[0]
        if training:
            inputs = inputs * self.get_dropout_mask(inputs)
            h = h * self.get_recurrent_dropout_mask(h)
        out = ops.tanh(ops.matmul(inputs, self.kernel) + 0.5 * ops.matmul(h, self.recurrent_kernel))
        return out, [out]


class LooseDropoutCell(keras.layers.Layer):
    """A cell that draws its own dropout inside ``call`` (no mixin): refused."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.state_size, self.dropout = units, units, 0.2

    def call(self, inputs, states):
        return states[0], [states[0]]


def _stack_cells():
    # Recurrent weights of gain 0.5: a contracting stack, where k = T is exact and the
    # iteration does not grow on the way (it would warn and keep its best iterate).
    small = lambda seed: dict(recurrent_initializer=keras.initializers.Orthogonal(gain=0.5, seed=seed))
    return [keras.layers.LSTMCell(6, dropout=0.3, recurrent_dropout=0.2, seed=1, **small(1)),
            keras.layers.GRUCell(5, recurrent_dropout=0.25, seed=2, **small(2)),
            keras.layers.SimpleRNNCell(4, dropout=0.2, recurrent_dropout=0.3, seed=3, **small(3))]


def _user_cells():
    return DropoutCell(9, dropout=0.3, recurrent_dropout=0.4, seed=4)


FACTORIES = {"stack": _stack_cells, "user": _user_cells}
OUT = {"stack": 4, "user": 9}  # the output width: the last sub-cell's, the user cell's


def _pair(kind):
    """An unwrapped RNN and a wrapped one with the same weights and seeds."""
    plain, inner = (RNN(FACTORIES[kind](), return_sequences=True) for _ in range(2))
    x = np.random.default_rng(0).normal(size=(4, T_STEPS, 5)).astype("float32")
    plain(x), inner(x)
    for a, b in zip(inner.weights, plain.weights):
        a.assign(b.value)
    return plain, inner, x


def _np(t):
    return ops.convert_to_numpy(ops.stop_gradient(t))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_training_values_use_the_wrapped_layers_masks(kind):
    plain, inner, x = _pair(kind)
    want = _np(plain(x, training=True))
    got = _np(HighwayRNN(inner, iterations=2)(x, training=True))
    np.testing.assert_allclose(got, want, atol=1e-6)
    # The masks changed the output (the comparison above is not the no-dropout one).
    assert np.max(np.abs(_np(plain(x, training=False)) - want)) > 1e-2
    # Nothing stays cached after the call, as after Keras' own.
    cells = inner.cell.cells if hasattr(inner.cell, "cells") else [inner.cell]
    assert all(getattr(c, "_dropout_mask", None) is None and getattr(c, "_recurrent_dropout_mask", None) is None
               for c in cells)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("iterations", [None, T_STEPS], ids=["exact", "k=T"])
def test_training_gradient_is_bptts_with_the_same_masks(kind, iterations):
    """The gradient (input and every weight) of one training call equals the unwrapped
    layer's BPTT gradient for the same seeds; at ``k = T`` the VJPs read the tiled masks
    (with a mask that differs between the steps and the VJP rows it would not)."""
    plain, inner, x = _pair(kind)
    hw = HighwayRNN(inner, iterations=iterations)
    p = ops.convert_to_tensor(np.random.default_rng(1).normal(size=(4, T_STEPS, OUT[kind])).astype("float32"))
    ref = grads(lambda xs: ops.sum(plain(xs, training=True) * p), [ops.convert_to_tensor(x)], plain.trainable_variables)
    got = grads(lambda xs: ops.sum(hw(xs, training=True) * p), [ops.convert_to_tensor(x)], inner.trainable_variables)
    assert len(got) == len(ref) == 1 + len(plain.trainable_variables)
    for g, r in zip(got, ref):
        assert np.all(np.isfinite(g))
        assert rel(g, r) < 1e-4


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_inference_applies_no_mask(kind):
    plain, inner, x = _pair(kind)
    np.testing.assert_allclose(_np(HighwayRNN(inner)(x, training=False)), _np(plain(x, training=False)), atol=1e-6)


def test_a_cell_drawing_its_own_dropout_is_refused():
    with pytest.raises(ValueError, match=r"DropoutRNNCell mixin.*LooseDropoutCell has dropout=0.2"):
        HighwayRNN(RNN(LooseDropoutCell(3)))(np.zeros((2, 3, 4), "float32"))


def test_a_stack_with_dropout_fits():
    """Under ``model.fit`` (a traced step on TensorFlow) the masks are drawn in the step
    and the loss falls, finite."""
    x = np.random.default_rng(5).normal(size=(16, 10, 5)).astype("float32")
    y = x[:, :, :1].sum(axis=1)
    model = keras.Sequential([keras.Input((10, 5)), HighwayRNN(RNN(_stack_cells()), iterations=3), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    history = model.fit(x, y, epochs=8, batch_size=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0], history

