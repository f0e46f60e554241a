"""Shared pieces of the Keras adapter tests: backend autodiff, layer factories, user cells."""

from __future__ import annotations

import numpy as np
import keras
from keras import ops

BACKEND = keras.backend.backend()
TOL = {"float32": 1e-5, "float64": 1e-10}
B, T, D, H = 3, 6, 4, 5


def grads(loss_fn, tensors, variables):
    """Gradients of ``loss_fn(*tensors)`` wrt ``tensors`` and ``variables`` by the
    backend's own autodiff (BPTT when the loss runs a Keras RNN layer)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(t) for t in tensors]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            loss = loss_fn(*tensors)
        out = tape.gradient(loss, tensors + [v.value for v in variables],
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [np.asarray(g) for g in out]
    import torch

    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*leaves)
    params = [v.value for v in variables]
    out = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return [np.zeros(tuple(p.shape)) if g is None else g.detach().cpu().numpy() for p, g in zip(leaves + params, out)]


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tensor(x, dtype="float32"):
    return ops.convert_to_tensor(np.asarray(x), dtype=dtype)


@keras.saving.register_keras_serializable(package="hwbptt_tests")
class ResidualCell(keras.layers.Layer):
    """``s_t = s_{t-1} + 0.5 tanh(x_t W + s_{t-1} U + b)``: a residual cell, ``K = I``."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, self.units), name="recurrent_kernel", initializer="orthogonal")
        self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="zeros")

    def call(self, inputs, states):
        s = states[0]
        new = s + 0.5 * ops.tanh(ops.matmul(inputs, self.kernel) + ops.matmul(s, self.recurrent_kernel) + self.bias)
        return new, [new]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="hwbptt_tests")
class TwoStateCell(keras.layers.Layer):
    """Two states ``[h, m]`` and an output that is neither: ``m_t = 0.9 m + 0.1 x W``,
    ``h_t = tanh(x V + h U + m_t)``, ``y_t = h_t ⊙ sigmoid(m_{t-1})``."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, units]
        self.output_size = units

    def build(self, input_shape):
        d = input_shape[-1]
        self.w = self.add_weight(shape=(d, self.units), name="w")
        self.v = self.add_weight(shape=(d, self.units), name="v")
        self.u = self.add_weight(shape=(self.units, self.units), name="u", initializer="orthogonal")

    def call(self, inputs, states):
        h, m = states
        m_new = 0.9 * m + 0.1 * ops.matmul(inputs, self.w)
        h_new = ops.tanh(ops.matmul(inputs, self.v) + ops.matmul(h, self.u) + m_new)
        return h_new * ops.sigmoid(m), [h_new, m_new]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def half_residual(x, states_prev, states_new):
    """A callable residual: 0.5 on the first state, none on the second."""
    return [0.5 * ops.ones_like(states_new[0]), None]


# name -> (factory(dtype, **rnn_kwargs) -> RNN layer, HighwayRNN kwargs)
KINDS = {
    "lstm": (lambda dtype, **kw: keras.layers.LSTM(H, dtype=dtype, **kw), {}),
    "gru": (lambda dtype, **kw: keras.layers.GRU(H, dtype=dtype, **kw), {}),
    "gru_before": (lambda dtype, **kw: keras.layers.GRU(H, reset_after=False, dtype=dtype, **kw), {}),
    "simple": (lambda dtype, **kw: keras.layers.SimpleRNN(H, dtype=dtype, **kw), {}),
    "user": (lambda dtype, **kw: keras.layers.RNN(ResidualCell(H, dtype=dtype), dtype=dtype, **kw), {"residual": "identity"}),
    "user2": (lambda dtype, **kw: keras.layers.RNN(TwoStateCell(H, dtype=dtype), dtype=dtype, **kw), {"residual": half_residual}),
}


def make(kind, dtype="float32", seed=0, **rnn_kwargs):
    """A built RNN layer of ``kind`` with random weights (bias included, so every
    weight gets a gradient)."""
    factory, hw_kwargs = KINDS[kind]
    keras.utils.set_random_seed(seed)
    layer = factory(dtype, **rnn_kwargs)
    layer.build((None, None, D))
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.normal(scale=0.5, size=tuple(v.shape)).astype(dtype))
    return layer, hw_kwargs


def n_states(layer) -> int:
    size = layer.cell.state_size
    return len(size) if isinstance(size, (list, tuple)) else 1
