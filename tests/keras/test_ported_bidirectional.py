"""Keras' own ``bidirectional_test.py`` (Keras 3.15) with the recurrent layer wrapped in
``HighwayRNN`` inside ``keras.layers.Bidirectional``: Keras' inputs and expected values.
(The cases about Keras' fused cuDNN dispatch, ``use_cudnn`` and its eligibility rules,
concern Keras' own kernels: a ``HighwayRNN`` is never eligible, which
``test_never_fused`` checks; the fused-vs-unfused equality is ported as wrapped vs
plain.)"""

from __future__ import annotations

import numpy as np
import pytest
import keras
from keras import initializers

from helpers import grads
from ported import CONST, arange, assert_near, rows, assert_basics, wrap

Bi, SimpleRNN, GRU, LSTM = keras.layers.Bidirectional, keras.layers.SimpleRNN, keras.layers.GRU, keras.layers.LSTM


def test_basics():
    assert_basics_bi = lambda make, shape: _assert_basics(make, shape)
    assert_basics_bi(lambda: Bi(wrap(SimpleRNN(4))), (3, 8))
    assert_basics_bi(lambda: Bi(wrap(SimpleRNN(4)), backward_layer=wrap(SimpleRNN(4, go_backwards=True)), merge_mode="sum"), (3, 4))


def _assert_basics(make, shape):
    layer = make()
    x = np.random.default_rng(0).normal(size=(3, 2, 4)).astype("float32")
    assert tuple(layer(x).shape) == shape
    assert len(layer.trainable_weights) == 6 and not layer.non_trainable_weights
    assert layer.supports_masking
    clone = Bi.from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    assert_near(clone(x), layer(x), 1e-6)
    inp = keras.Input((2, 4))
    model = keras.Model(inp, make()(inp))
    model.compile(optimizer="sgd", loss="mse")
    assert np.isfinite(model.fit(x, np.zeros((3, shape[1]), "float32"), verbose=0).history["loss"][0])


def test_correctness():
    seq = arange(2, 3, 4)
    forward = wrap(SimpleRNN(2, **CONST))
    assert_near(Bi(forward)(seq), [[0.39687276, 0.39687276, 0.10004295, 0.10004295], [0.7237238, 0.7237238, 0.53391594, 0.53391594]])
    assert_near(Bi(forward, merge_mode="ave")(seq), rows([0.24845785, 0.6288199], 2))
    out1, out2 = Bi(forward, merge_mode=None)(seq)
    assert_near(out1, rows([0.39687276, 0.7237238], 2)), assert_near(out2, rows([0.10004295, 0.53391594], 2))
    backward = wrap(SimpleRNN(2, kernel_initializer=initializers.Constant(0.03), recurrent_initializer=initializers.Constant(0.02),
                              bias_initializer=initializers.Constant(0.01), go_backwards=True))
    assert_near(Bi(forward, backward_layer=backward, merge_mode="mul")(seq), rows([0.08374989, 0.6740834], 2))
    out = Bi(wrap(GRU(2, return_sequences=True, **CONST)), merge_mode="sum")(seq)
    assert_near(out, rows([[0.20937867, 0.34462988, 0.40290534], [0.59829646, 0.6734641, 0.6479671]], 2))


def test_statefulness():
    seq = arange(2, 4, 3)
    layer = Bi(wrap(LSTM(2, stateful=True, **CONST)))
    want = [[0.26234663, 0.26234663, 0.16959146, 0.16959146], [0.6137073, 0.6137073, 0.5381646, 0.5381646]]
    for _ in range(2):
        layer(seq)
        assert_near(layer(seq), want)
        layer.reset_state()


def test_pass_initial_state():
    a = arange(2, 2)
    out = Bi(wrap(LSTM(2, **CONST)))(arange(2, 4, 3), initial_state=[a, 2 * a, 3 * a, 4 * a])
    assert_near(out, [[0.20794602, 0.4577124, 0.14046375, 0.48191673], [0.6682636, 0.6711909, 0.60943645, 0.60950446]])


def test_masking():
    mask = np.array([[True, True, False, True], [True, False, False, True]])
    out = Bi(wrap(GRU(2, **CONST)))(arange(2, 4, 3), mask=mask)
    assert_near(out, [[0.19393763, 0.19393763, 0.11669192, 0.11669192], [0.30818558, 0.30818558, 0.28380975, 0.28380975]])


def test_return_state():
    output, h1, c1, h2, c2 = Bi(wrap(LSTM(2, return_state=True, **CONST)))(arange(2, 4, 3))
    assert_near(output, [[0.1990008, 0.1990008, 0.12659755, 0.12659755], [0.52335435, 0.52335435, 0.44717982, 0.44717982]])
    assert_near(h1, rows([0.1990008, 0.52335435], 2)), assert_near(c1, rows([0.35567185, 1.0492687], 2))
    assert_near(h2, rows([0.12659755, 0.44717982], 2)), assert_near(c2, rows([0.2501858, 0.941473], 2))


def test_return_state_in_a_functional_model():
    """The issue's case: Bidirectional(HighwayRNN(LSTM(2, return_state=True))) symbolically."""
    inp = keras.Input((4, 3))
    outs = Bi(wrap(LSTM(2, return_state=True, **CONST)))(inp)
    assert len(outs) == 5
    model = keras.Model(inp, outs)
    got = model.predict(arange(2, 4, 3), verbose=0)
    assert_near(got[0], [[0.1990008, 0.1990008, 0.12659755, 0.12659755], [0.52335435, 0.52335435, 0.44717982, 0.44717982]])
    assert_near(got[2], rows([0.35567185, 1.0492687], 2))


def test_output_shape():
    x = np.array([[[101, 202], [303, 404]]], dtype="float32")
    for merge_mode in ["ave", "concat", "mul", "sum", None]:
        layer = Bi(wrap(LSTM(2, return_state=True)), merge_mode=merge_mode)
        for out, shape in zip(layer(x), layer.compute_output_shape(x.shape)):
            assert tuple(out.shape) == tuple(shape)
    for merge_mode in ["concat", "ave", "mul", "sum"]:
        layer = Bi(wrap(LSTM(2)), merge_mode=merge_mode)
        assert tuple(layer(x).shape) == tuple(layer.compute_output_shape(x.shape))
    layer = Bi(wrap(LSTM(2)), merge_mode=None)
    for out, shape in zip(layer(x), layer.compute_output_shape(x.shape)):
        assert tuple(out.shape) == tuple(shape)


def test_never_fused():
    bidi = Bi(wrap(LSTM(4)))
    bidi.build((None, 5, 3))
    assert not bidi._can_attempt_fused_lstm(mask=None)
    bidi = Bi(wrap(GRU(4)))
    bidi.build((None, 5, 3))
    assert not bidi._can_attempt_fused_gru(mask=None)


@pytest.mark.parametrize("rnn", [LSTM, GRU])
def test_wrapped_matches_plain(rnn):
    """Keras' fused-vs-unfused equality, as wrapped vs plain: outputs and exact gradients."""
    x = np.random.default_rng(0).standard_normal((3, 6, 4)).astype("float32")
    make = lambda: rnn(5, return_sequences=True, kernel_initializer=initializers.GlorotUniform(seed=1),
                       recurrent_initializer=initializers.Orthogonal(seed=2))
    ref, hw = Bi(make()), Bi(wrap(make()))
    ref.build(x.shape), hw(x)
    for a, b in zip(hw.weights, ref.weights):
        a.assign(b.value)
    assert_near(hw(x), ref(x))
    p = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(size=(3, 6, 10)).astype("float32"))
    g_ref = grads(lambda v: keras.ops.sum(ref(v) * p), [keras.ops.convert_to_tensor(x)], ref.trainable_variables)
    g_hw = grads(lambda v: keras.ops.sum(hw(v) * p), [keras.ops.convert_to_tensor(x)], hw.trainable_variables)
    for g, r in zip(g_hw, g_ref):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
