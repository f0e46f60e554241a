"""Keras' own ``simple_rnn_test.py`` (Keras 3.15) with every layer wrapped in
``HighwayRNN``: Keras' inputs and expected values, plus the exact-mode gradient."""

from __future__ import annotations

import numpy as np
import pytest
import keras

from ported import CONST, arange, assert_exact_grads, assert_near, rows, assert_basics, wrap

SimpleRNN = keras.layers.SimpleRNN


def test_basics():
    assert_basics(lambda: SimpleRNN(3, dropout=0.5, recurrent_dropout=0.5), (3, 2, 4), (3, 3), trainable=3,
               non_trainable_variables=1, call={"training": True})
    assert_basics(lambda: SimpleRNN(3, return_sequences=True, bias_regularizer="l1", kernel_regularizer="l2",
                                 recurrent_regularizer="l2"), (3, 2, 4), (3, 2, 3), trainable=3, losses=3)


@pytest.mark.parametrize(
    "kwargs,expected",
    [({}, [0.405432, 0.73605347]), ({"unroll": True}, [0.405432, 0.73605347]),
     ({"go_backwards": True}, [0.11144729, 0.5528889]), ({"go_backwards": True, "unroll": True}, [0.11144729, 0.5528889])],
)
def test_correctness(kwargs, expected):
    seq = arange(2, 3, 4)
    make = lambda: SimpleRNN(4, **CONST, **kwargs)
    assert_near(wrap(make())(seq), rows(expected, 4))
    assert_exact_grads(make, seq / 24.0)


def test_statefulness():
    seq = arange(2, 3, 4)
    layer = wrap(SimpleRNN(4, stateful=True, **CONST))
    for _ in range(2):
        layer(seq)
        assert_near(layer(seq), rows([0.40559256, 0.7361247], 4))
        layer.reset_state()


@pytest.mark.parametrize("kwargs,expected", [({}, [0.33621645, 0.6262637]), ({"go_backwards": True}, [0.07344437, 0.43043602])])
def test_pass_initial_state(kwargs, expected):
    seq, init = arange(2, 4, 3), arange(2, 4)
    make = lambda: SimpleRNN(4, **CONST, **kwargs)
    assert_near(wrap(make())(seq, initial_state=init), rows(expected, 4))
    assert_exact_grads(make, seq / 24.0, initial_state=init / 8.0)


def test_masking():
    seq = arange(2, 4, 3)
    mask = np.array([[True, True, False, True], [True, False, False, True]])
    assert_near(wrap(SimpleRNN(4, unroll=True, **CONST))(seq, mask=mask), rows([0.32951632, 0.61799484], 4))
    out = wrap(SimpleRNN(2, return_sequences=True, **CONST))(seq, mask=mask)
    assert_near(out[0], rows([0.0599281, 0.15122814, 0.15122814, 0.32394567], 2))
    assert_near(out[1], rows([0.3969304, 0.3969304, 0.3969304, 0.608085], 2))
    assert_exact_grads(lambda: SimpleRNN(2, return_sequences=True, **CONST), seq / 24.0, mask=mask)
    out = wrap(SimpleRNN(2, return_sequences=True, zero_output_for_mask=True, **CONST))(seq, mask=mask)
    assert_near(out[0], rows([0.0599281, 0.15122814, 0.0, 0.32394567], 2))
    assert_near(out[1], rows([0.3969304, 0.0, 0.0, 0.608085], 2))
    assert_near(wrap(SimpleRNN(4, go_backwards=True, **CONST))(seq, mask=mask), rows([0.07376196, 0.43645123], 4))
