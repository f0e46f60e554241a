"""Keras' own ``lstm_test.py`` (Keras 3.15) with every layer wrapped in ``HighwayRNN``:
Keras' inputs and expected values, plus the exact-mode gradient against BPTT."""

from __future__ import annotations

import numpy as np
import pytest
import keras

from ported import CONST, arange, assert_exact_grads, assert_near, rows, assert_basics, wrap

LSTM = keras.layers.LSTM


@pytest.mark.parametrize(
    "kwargs,call,shape,losses",
    [
        (dict(units=3, dropout=0.5), {"training": True}, (3, 3), 0),
        (dict(units=3, dropout=0.5, recurrent_dropout=0.5), {"training": True}, (3, 3), 0),
        (dict(units=3, return_sequences=True, bias_regularizer="l1", kernel_regularizer="l2",
              recurrent_regularizer="l2"), {}, (3, 2, 3), 3),
    ],
)
def test_basics(kwargs, call, shape, losses):
    assert_basics(lambda: LSTM(**kwargs), (3, 2, 4), shape, trainable=3, losses=losses, call=call)


SEQ = arange(3, 6, 4)
CORRECT = [
    ({}, [0.6288687, 0.86899155, 0.9460773]),
    ({"go_backwards": True}, [0.35622165, 0.74789524, 0.8872726]),
    ({"unroll": True}, [0.6288687, 0.86899155, 0.9460773]),
    ({"unit_forget_bias": False}, [0.57019705, 0.8661914, 0.9459622]),
    ({"use_bias": False}, [0.54986924, 0.86226785, 0.9443936]),
]


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("kwargs,expected", CORRECT)
def test_correctness(implementation, kwargs, expected):
    make = lambda: LSTM(3, implementation=implementation, **CONST, **kwargs)
    assert_near(wrap(make())(SEQ), rows(expected, 3))
    assert_exact_grads(make, SEQ / 72.0)


def test_statefulness():
    seq = arange(2, 3, 4)
    layer = wrap(LSTM(4, stateful=True, **CONST))
    for _ in range(2):  # the second round after reset_state
        layer(seq)
        assert_near(layer(seq), rows([0.3124785, 0.6863672], 4))
        layer.reset_state()


INIT = [arange(2, 2), arange(2, 2)]


@pytest.mark.parametrize(
    "kwargs,expected",
    [({}, [[0.20574439, 0.3558822], [0.64930826, 0.66276]]),
     ({"go_backwards": True}, [[0.13281618, 0.2790356], [0.5839337, 0.5992567]])],
)
def test_pass_initial_state(kwargs, expected):
    seq = arange(2, 4, 3)
    make = lambda: LSTM(2, **CONST, **kwargs)
    assert_near(wrap(make())(seq, initial_state=INIT), expected)
    assert_exact_grads(make, seq / 24.0, initial_state=INIT)


MASK = np.array([[True, True, True, False], [True, True, False, False]])


def test_masking():
    seq = arange(2, 4, 3)
    make = lambda **kw: (lambda: LSTM(2, **CONST, **kw))
    assert_near(wrap(make(unroll=True)())(seq, mask=MASK), rows([0.11755939, 0.28556206], 2))

    out = wrap(make(return_sequences=True)())(seq, mask=MASK)
    assert_near(out[0], rows([0.0158891, 0.05552048, 0.11755939, 0.11755939], 2))
    assert_near(out[1], rows([0.14185596, 0.28556206, 0.28556206, 0.28556206], 2))
    assert_exact_grads(make(return_sequences=True), seq / 24.0, mask=MASK)

    out = wrap(make(return_sequences=True, zero_output_for_mask=True)())(seq, mask=MASK)
    assert_near(out[0], rows([0.0158891, 0.05552048, 0.11755939, 0.0], 2))
    assert_near(out[1], rows([0.14185596, 0.28556206, 0.0, 0.0], 2))

    backwards_mask = np.array([[False, True, True, True], [False, False, True, True]])
    assert_near(wrap(make(go_backwards=True)())(seq, mask=backwards_mask), rows([0.15341201, 0.3844719], 2))
    assert_exact_grads(make(go_backwards=True), seq / 24.0, mask=backwards_mask)
