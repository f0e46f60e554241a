"""``iterations="auto"`` and the divergence warning on the Keras wrapper (eager execution)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from hwbptt import HighwayDivergenceWarning  # noqa: E402
from hwbptt.keras import HighwayRNN  # noqa: E402

T, B, I, H = 32, 4, 6, 16


def _model(scale, iterations, seed=0, **options):
    keras.utils.set_random_seed(seed)
    inner = keras.layers.GRU(H, return_sequences=True)
    layer = HighwayRNN(inner, iterations=iterations, **options)
    inp = keras.Input((T, I))
    model = keras.Model(inp, layer(inp))
    kernel = inner.cell.recurrent_kernel
    kernel.assign(kernel.numpy() * scale)
    return model, layer, inner


def _grad(model, x, y):
    """The gradient of sum(output * y) by the backend's autodiff, in eager mode."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.sum(model(x, training=True) * y)
        grads = tape.gradient(loss, model.trainable_variables)
        return np.concatenate([np.ravel(g.numpy()) for g in grads])
    if backend == "torch":
        import torch

        for v in model.trainable_variables:
            v.value.grad = None
        loss = keras.ops.sum(model(x, training=True) * keras.ops.convert_to_tensor(y))
        loss.backward()
        return np.concatenate([v.value.grad.cpu().numpy().ravel() for v in model.trainable_variables])
    pytest.skip(f"no eager gradient helper for {backend}")


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _data(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, I)).astype("float32"), rng.standard_normal((B, T, H)).astype("float32")


def test_keras_fixed_k_divergence_warns_once():
    """On the keras.ops path (the TensorFlow route for LSTM/GRU runs its adjoint compiled
    and reports no diagnostics yet, so it is switched off here)."""
    from hwbptt.keras import tf_kernels

    model, layer, _ = _model(6.0, 3)
    x, y = _data()
    with tf_kernels.use(False):
        with pytest.warns(HighwayDivergenceWarning, match="iterations='auto'"):
            _grad(model, x, y)
        assert layer.last_diagnostics.diverged
        with warnings.catch_warnings():
            warnings.simplefilter("error", HighwayDivergenceWarning)
            _grad(model, x, y)


def test_keras_slow_convergence_warns():
    """Recurrent kernel x4: the updates shrink too slowly for k = 1 (keras.ops path)."""
    from hwbptt.keras import tf_kernels

    model, layer, _ = _model(4.0, 1)
    exact_model, _, _ = _model(4.0, None)
    x, y = _data()
    with tf_kernels.use(False):
        with pytest.warns(HighwayDivergenceWarning, match="shrank by only"):
            g = _grad(model, x, y)
    d = layer.last_diagnostics
    assert d.unconverged and not d.diverged and d.remainder > 1.0
    assert _cos(g, _grad(exact_model, x, y)) < 0.95


@pytest.mark.parametrize("scale, faithful_k", [(1.0, True), (6.0, False)])
def test_keras_auto_meets_fidelity(scale, faithful_k):
    model, layer, _ = _model(scale, "auto", probe_every=2)
    exact_model, _, _ = _model(scale, None)
    x, y = _data()
    cheap = lambda probe: ({k: 1.0 + k for k in probe["cosines"]}, 100.0)  # noqa: E731
    layer.highway_auto.timing = cheap
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighwayDivergenceWarning)
        for _ in range(4):
            g = _grad(model, x, y)
    assert _cos(g, _grad(exact_model, x, y)) >= 0.99
    assert isinstance(layer.highway_auto.choice, int) == faithful_k
    assert [e["step"] for e in layer.highway_auto.history] == [0, 2]


def test_keras_auto_refuses_a_traced_graph():
    model, _, _ = _model(1.0, "auto")
    if keras.backend.backend() == "torch":
        pytest.skip("the torch backend runs eagerly")
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="run_eagerly=True"):
        model.fit(x, y, epochs=1, verbose=0)
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    model.fit(x, y, epochs=1, batch_size=B, verbose=0)


def test_keras_auto_options_validated_and_serialised():
    with pytest.raises(ValueError, match="fidelity=2"):
        HighwayRNN(keras.layers.GRU(H), iterations="auto", fidelity=2)
    with pytest.raises(ValueError, match="probe_every=0"):
        HighwayRNN(keras.layers.GRU(H), iterations="auto", probe_every=0)
    layer = HighwayRNN(keras.layers.GRU(H), iterations="auto", fidelity=0.9, probe_every=7)
    again = HighwayRNN.from_config(layer.get_config())
    assert (again.iterations, again.fidelity, again.probe_every) == ("auto", 0.9, 7)
