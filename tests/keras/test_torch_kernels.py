"""The torch backend's route through the PyTorch adapter's fused layers
(``hwbptt.keras.torch_kernels``) against the ``keras.ops`` path it replaces."""

from __future__ import annotations

import numpy as np
import keras
import pytest
from keras import ops

from hwbptt.keras import HighwayRNN, torch_kernels

from helpers import BACKEND, B, D, H, T, grads, rel, tensor

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="the route exists on the torch backend only")

rng = np.random.default_rng(7)
X = rng.normal(size=(B, T, D))


def _layer(kind: str, **kwargs):
    cls = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[kind]
    layer = cls(H, dtype="float64", bias_initializer="random_normal", **kwargs)
    layer.build((B, T, D))
    return layer


def _grads_both_ways(hw, weights, with_init):
    inits = [tensor(rng.normal(size=(B, H)), "float64") for _ in range(2 if isinstance(hw.layer, keras.layers.LSTM) else 1)]

    def loss(x, *init):
        out = hw(x, initial_state=list(init)) if with_init else hw(x)
        outs = list(out) if hw.return_state else [out]
        return sum(ops.sum(o * tensor(w, "float64")) for o, w in zip(outs, weights))

    tensors = [tensor(X, "float64")] + (inits if with_init else [])
    variables = hw.layer.trainable_variables
    calls = []
    original = torch_kernels.run

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch_kernels.run = spy
    try:
        fused = grads(loss, tensors, variables)
        with torch_kernels.use(False):
            plain = grads(loss, tensors, variables)
    finally:
        torch_kernels.run = original
    assert calls == [1], "the fused route was not taken exactly once"
    return fused, plain


@pytest.mark.parametrize("iterations", [0, 2, None])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("case", [(True, False, False, False), (False, True, True, True), (True, True, False, True)],
                         ids=lambda c: "seq{}-st{}-back{}-init{}".format(*map(int, c)))
def test_route_equals_keras_ops_path(kind, iterations, case):
    return_sequences, return_state, go_backwards, with_init = case
    layer = _layer(kind, return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards)
    hw = HighwayRNN(layer, iterations=iterations)
    n = 2 if kind == "lstm" else 1
    weights = [rng.normal(size=(B, T, H) if return_sequences else (B, H))] + [rng.normal(size=(B, H)) for _ in range(n if return_state else 0)]
    fused, plain = _grads_both_ways(hw, weights, with_init)
    for g, r in zip(fused, plain):
        assert np.linalg.norm(r) > 0
        assert rel(g, r) <= 1e-10


def test_route_forward_equals_wrapped_layer():
    for kind in ("lstm", "gru"):
        layer = _layer(kind, return_sequences=True, return_state=True)
        hw = HighwayRNN(layer, iterations=1)
        x = tensor(X, "float64")
        for got, ref in zip(hw(x), layer(x)):
            assert rel(ops.convert_to_numpy(got), ops.convert_to_numpy(ref)) <= 1e-12


def test_route_reports_diagnostics():
    hw = HighwayRNN(_layer("gru", return_sequences=True), iterations=3, diagnostics="debug")
    grads(lambda x: ops.sum(hw(x) ** 2), [tensor(X, "float64")], [])
    assert hw.last_diagnostics.iterations == 3 and 0.5 < hw.last_diagnostics.cosine <= 1 + 1e-12


@pytest.mark.parametrize("make, mask", [
    (lambda: _layer("lstm"), np.ones((B, T), bool)),
    (lambda: _layer("lstm", activation="relu"), None),
    (lambda: _layer("gru", reset_after=False), None),
    (lambda: _layer("gru", recurrent_activation="hard_sigmoid"), None),
    (lambda: keras.layers.SimpleRNN(H, dtype="float64"), None),
], ids=["mask", "relu", "reset_before", "hard_sigmoid", "simple_rnn"])
def test_route_declines_what_it_does_not_compute(make, mask):
    layer = make()
    x = ops.transpose(tensor(X, "float64"), (1, 0, 2))
    m = None if mask is None else tensor(mask.T[..., None], "bool")
    assert not torch_kernels.applies(layer.cell, x, m)
    assert torch_kernels.applies(_layer("lstm").cell, x, None)
    assert not torch_kernels.applies(_layer("lstm").cell, ops.cast(x, "float16"), None)
