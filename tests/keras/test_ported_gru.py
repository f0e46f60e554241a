"""Keras' own ``gru_test.py`` (Keras 3.15) with every layer wrapped in ``HighwayRNN``:
Keras' inputs and expected values, plus the exact-mode gradient against BPTT. (The
torch cuDNN dispatch case is about Keras' own kernels and has no wrapped counterpart.)"""

from __future__ import annotations

import numpy as np
import pytest
import keras

from hwbptt.keras import HighwayRNN

from helpers import BACKEND
from ported import CONST, arange, assert_exact_grads, assert_near, rows, assert_basics, wrap

GRU = keras.layers.GRU


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
    assert_basics(lambda: GRU(**kwargs), (3, 2, 4), shape, trainable=3, losses=losses, call=call)


SEQ = arange(3, 6, 4)
FIRST = [0.5217289, 0.6371659, 0.39384964]
CORRECT = [
    ({}, FIRST),
    ({"go_backwards": True}, [0.24406259, 0.611516, 0.3928808]),
    ({"unroll": True}, FIRST),
    ({"reset_after": False}, [0.51447755, 0.6426879, 0.40208298]),
    ({"use_bias": False}, [0.49988455, 0.64701194, 0.4103359]),
]


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("kwargs,expected", CORRECT)
def test_correctness(implementation, kwargs, expected):
    make = lambda: GRU(3, implementation=implementation, **CONST, **kwargs)
    assert_near(wrap(make())(SEQ), rows(expected, 3))
    assert_exact_grads(make, SEQ / 72.0)


def test_statefulness():
    seq = arange(2, 3, 4)
    layer = wrap(GRU(4, stateful=True, **CONST))
    for _ in range(2):
        layer(seq)
        assert_near(layer(seq), rows([0.29542392, 0.5885018], 4))
        layer.reset_state()


INIT = arange(2, 2)
WITH_INIT = [({}, [[0.23774096, 0.33508456], [0.83659905, 1.0227708]]),
             ({"go_backwards": True}, [[0.13486053, 0.23261218], [0.78257304, 0.9691353]])]


@pytest.mark.parametrize("kwargs,expected", WITH_INIT)
def test_pass_initial_state(kwargs, expected):
    seq = arange(2, 4, 3)
    make = lambda: GRU(2, **CONST, **kwargs)
    assert_near(wrap(make())(seq, initial_state=INIT), expected)
    assert_exact_grads(make, seq / 24.0, initial_state=INIT)


@pytest.mark.parametrize("kwargs,expected", WITH_INIT)
def test_pass_return_state(kwargs, expected):
    output, state = wrap(GRU(2, return_state=True, **CONST, **kwargs))(arange(2, 4, 3), initial_state=INIT)
    assert_near(output, expected)
    assert_near(output, state)


MASK = np.array([[True, True, False, True], [True, False, False, True]])


def test_masking():
    seq = arange(2, 4, 3)
    make = lambda **kw: (lambda: GRU(2, **CONST, **kw))
    assert_near(wrap(make(unroll=True)())(seq, mask=MASK), rows([0.19393763, 0.30818558], 2))
    out = wrap(make(return_sequences=True)())(seq, mask=MASK)
    assert_near(out[0], rows([0.03606692, 0.09497581, 0.09497581, 0.19393763], 2))
    assert_near(out[1], rows([0.16051409, 0.16051409, 0.16051409, 0.30818558], 2))
    assert_exact_grads(make(return_sequences=True), seq / 24.0, mask=MASK)
    out = wrap(make(return_sequences=True, zero_output_for_mask=True)())(seq, mask=MASK)
    assert_near(out[0], rows([0.03606692, 0.09497581, 0.0, 0.19393763], 2))
    assert_near(out[1], rows([0.16051409, 0.0, 0.0, 0.30818558], 2))
    assert_near(wrap(make(go_backwards=True)())(seq, mask=MASK), rows([0.11669192, 0.28380975], 2))


def test_legacy_implementation_argument():
    config = GRU(3, **CONST).get_config()
    config["implementation"] = 0  # old saved models
    assert_near(wrap(GRU.from_config(config))(SEQ), rows(FIRST, 3))
    # and through HighwayRNN's own config
    hw_config = wrap(GRU(3, **CONST)).get_config()
    hw_config["layer"]["config"]["implementation"] = 0
    assert_near(HighwayRNN.from_config(hw_config)(SEQ), rows(FIRST, 3))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow symbolic batch size")
def test_stateful_with_symbolic_batch_size():
    import tensorflow as tf

    layer = wrap(GRU(5, stateful=True))
    x = np.ones((2, 10, 10), dtype=np.float32)
    layer(x, training=True)

    @tf.function(input_signature=[tf.TensorSpec(shape=(None, 10, 10), dtype=tf.float32)])
    def f(v):
        return layer(v, training=True)

    assert tuple(f(x).shape) == (2, 5)
