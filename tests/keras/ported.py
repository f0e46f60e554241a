"""The harness for the cases ported from Keras' own RNN tests (``keras/src/layers/rnn/*_test.py``
of Keras 3.15): each case's layer is wrapped in ``HighwayRNN`` and must give Keras'
expected values; where a case has a gradient, the exact mode (``iterations=None``) must
give the unwrapped layer's BPTT gradient (the backend's autodiff through Keras' loop)."""

from __future__ import annotations

import numpy as np
import keras
from keras import initializers, ops

from hwbptt.keras import HighwayRNN

from helpers import grads

CONST = dict(
    kernel_initializer=initializers.Constant(0.01),
    recurrent_initializer=initializers.Constant(0.02),
    bias_initializer=initializers.Constant(0.03),
)


def arange(*shape):
    return np.arange(int(np.prod(shape))).reshape(shape).astype("float32")


def rows(values, units):
    """Keras' expected arrays with equal entries along the last axis (constant weights)."""
    v = np.asarray(values, dtype="float32")
    return np.repeat(v[..., None], units, axis=-1)


def _np(a):
    if isinstance(a, (list, tuple)) and a and not isinstance(a[0], (int, float, list, tuple, np.ndarray)):
        return [_np(v) for v in a]
    return np.asarray(a) if isinstance(a, (list, tuple, np.ndarray)) else ops.convert_to_numpy(ops.stop_gradient(a))


def assert_near(got, want, tol=1e-5):
    np.testing.assert_allclose(_np(got), _np(want), atol=tol, rtol=tol)


def wrap(layer, **kwargs):
    kwargs.setdefault("iterations", None)
    return HighwayRNN(layer, **kwargs)


def assert_exact_grads(make, seq, tol=1e-4, **call):
    """``HighwayRNN(make(), iterations=None)`` has the gradient of ``make()`` (BPTT) for
    the loss ``Σ out ⊙ P`` (``P`` fixed random), with respect to the input, any
    ``initial_state`` and every weight."""
    plain, hw_inner = make(), make()
    hw = wrap(hw_inner)
    init = call.pop("initial_state", None)
    init = [] if init is None else (list(init) if isinstance(init, (list, tuple)) else [init])
    seq = np.asarray(seq, dtype="float32")
    plain(seq[:1], **({"initial_state": [s[:1] for s in init]} if init else {}))  # build
    hw(seq[:1], **({"initial_state": [s[:1] for s in init]} if init else {}))
    for a, b in zip(hw_inner.weights, plain.weights):
        a.assign(b.value)

    def loss_of(layer):
        def loss(x, *s):
            out = layer(x, **({"initial_state": list(s)} if s else {}), **call)
            outs = out if isinstance(out, (list, tuple)) else [out]
            total = 0.0
            for i, o in enumerate(outs):
                p = np.random.default_rng(i).normal(size=tuple(o.shape)).astype("float32")
                total = total + ops.sum(o * ops.convert_to_tensor(p))
            return total
        return loss

    tensors = [ops.convert_to_tensor(seq)] + [ops.convert_to_tensor(np.asarray(s, "float32")) for s in init]
    ref = grads(loss_of(plain), tensors, plain.trainable_variables)
    got = grads(loss_of(hw), tensors, hw_inner.trainable_variables)
    assert len(ref) == len(got)
    for g, r in zip(got, ref):
        scale = max(np.abs(r).max(), 1e-6)
        np.testing.assert_allclose(g / scale, r / scale, atol=tol, rtol=0)


def assert_basics(make, input_shape, expected_output_shape, trainable=None, non_trainable=0, losses=0,
               non_trainable_variables=None, call=None):
    """The parts of Keras' ``run_layer_test`` that concern the wrapper: the output shape
    eagerly and symbolically, the weight, variable and loss counts, masking support, a
    config round trip that gives the same outputs, and one ``fit`` step with a finite loss."""
    call = dict(call or {})
    layer = wrap(make(), iterations=3)
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    out = layer(x, **call)
    outs = out if isinstance(out, (list, tuple)) else [out]
    want = expected_output_shape if isinstance(expected_output_shape, list) else [expected_output_shape]
    assert [tuple(o.shape) for o in outs] == [tuple(w) for w in want]
    if trainable is not None:
        assert len(layer.trainable_weights) == trainable
    assert len(layer.non_trainable_weights) == non_trainable
    if non_trainable_variables is not None:
        assert len(layer.non_trainable_variables) == non_trainable_variables
    assert len(layer.losses) == losses
    assert layer.supports_masking

    # symbolic
    sym = wrap(make(), iterations=3)
    inp = keras.Input(batch_shape=input_shape)
    sym_out = sym(inp)
    sym_outs = sym_out if isinstance(sym_out, (list, tuple)) else [sym_out]
    assert [tuple(o.shape) for o in sym_outs] == [tuple(w) for w in want]

    # config round trip: same outputs with the same weights
    clone = HighwayRNN.from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    a, b = layer(x, training=False), clone(x, training=False)
    for u, v in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
        assert_near(u, v, 1e-6)

    # one training step
    model = keras.Model(inp, sym_outs[0])
    model.compile(optimizer="sgd", loss="mse")
    target = np.zeros(tuple(sym_outs[0].shape), dtype="float32")
    history = model.fit(x, target, batch_size=input_shape[0], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
