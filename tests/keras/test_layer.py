"""The layer: same outputs as the wrapped layer, and every bad input's error."""

from __future__ import annotations

import numpy as np
import pytest
import keras
from keras import ops

from hwbptt.keras import HighwayRNN

from helpers import B, D, H, KINDS, T, make, n_states, tensor

rng = np.random.default_rng(2)
X = rng.normal(size=(B, T, D))
MASK = np.arange(T)[None, :] < np.array([T, 3, 1])[:, None]
MASK[2, 0] = False  # a leading masked step too


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("return_sequences,return_state,go_backwards", [(True, True, False), (False, True, True), (True, False, True)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_outputs_equal_wrapped_layer(kind, return_sequences, return_state, go_backwards, with_mask):
    layer, hw_kwargs = make(kind, return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards)
    hw = HighwayRNN(layer, **hw_kwargs)
    init = [tensor(rng.normal(size=(B, H))) for _ in range(n_states(layer))]
    kwargs = {"initial_state": init, "training": False}
    if with_mask:
        kwargs["mask"] = tensor(MASK, "bool")
    ref, got = layer(tensor(X), **kwargs), hw(tensor(X), **kwargs)
    ref, got = (list(ref), list(got)) if return_state else ([ref], [got])
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert tuple(g.shape) == tuple(r.shape)
        np.testing.assert_allclose(ops.convert_to_numpy(g), ops.convert_to_numpy(r), rtol=1e-5, atol=1e-6)


def test_uses_the_wrapped_layers_variables():
    layer, _ = make("lstm")
    hw = HighwayRNN(layer)
    model = keras.Sequential([keras.Input((T, D)), hw])
    assert [id(v) for v in model.trainable_variables] == [id(v) for v in layer.trainable_variables]


def test_not_a_recurrent_layer_is_a_type_error():
    with pytest.raises(TypeError, match="Dense"):
        HighwayRNN(keras.layers.Dense(3))
    with pytest.raises(TypeError, match="LSTMCell"):
        HighwayRNN(keras.layers.LSTMCell(3))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: keras.layers.LSTM(H, activation="softplus"), "activation"),
        (lambda: keras.layers.GRU(H, recurrent_activation="hard_sigmoid"), "recurrent_activation"),
        (lambda: keras.layers.SimpleRNN(H, activation=lambda z: z * z), "activation"),
        (lambda: keras.layers.ConvLSTM1D(2, 3), "ConvLSTM1D: its inputs and states are feature maps"),
    ],
)
def test_unsupported_options_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        HighwayRNN(build())


def test_unsupported_option_set_after_wrapping_is_refused_at_build():
    layer = keras.layers.LSTM(H)
    hw = HighwayRNN(layer)
    layer.cell.activation = keras.activations.softplus
    with pytest.raises(ValueError, match="activation"):
        hw(tensor(X))


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(iterations=-1), ValueError),
        (dict(iterations=2.5), TypeError),
        (dict(iterations=True), TypeError),
        (dict(tol=0.0), ValueError),
        (dict(tol="1e-3"), TypeError),
        (dict(gamma=1.5), ValueError),
        (dict(gamma=None), TypeError),
        (dict(split="cells"), ValueError),
        (dict(diagnostics="verbose"), ValueError),
        (dict(residual="identity"), ValueError),  # a built-in cell has its own residual
    ],
)
def test_option_checks(kwargs, error):
    with pytest.raises(error):
        HighwayRNN(keras.layers.GRU(H), **kwargs)


def test_options_are_validated_attributes():
    hw = HighwayRNN(keras.layers.GRU(H), iterations=2)
    hw.iterations = None
    assert hw.iterations is None and hw.highway_options.exact
    with pytest.raises(ValueError, match="gamma"):
        hw.gamma = -0.1
    with pytest.raises(ValueError, match="residual"):
        HighwayRNN(keras.layers.RNN(keras.layers.SimpleRNNCell(H)), residual="gated")
