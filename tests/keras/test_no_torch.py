"""A TensorFlow-only user never needs torch: in a subprocess where ``import torch``
fails, ``hwbptt.keras`` imports and fits LSTM, GRU (the TensorFlow route), SimpleRNN and a
user cell, and ``torch`` is never imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import BACKEND

SCRIPT = r"""
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTorch())
import numpy as np
import keras
from hwbptt.keras import HighwayRNN

class Residual(keras.layers.Layer):
    def __init__(self, units, **kw):
        super().__init__(**kw)
        self.units, self.state_size = units, units
    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units))
    def call(self, x, states):
        s = states[0] + 0.5 * keras.ops.tanh(keras.ops.matmul(x, self.w))
        return s, [s]

assert keras.backend.backend() == "tensorflow"
x = np.random.default_rng(0).normal(size=(8, 12, 3)).astype("float32")
for layer, kw in [(keras.layers.LSTM(4), {}), (keras.layers.GRU(4), {"iterations": None}),
                  (keras.layers.SimpleRNN(4, recurrent_dropout=0.2), {}), (keras.layers.RNN(Residual(4)), {"residual": "identity"})]:
    model = keras.Sequential([keras.Input((12, 3)), HighwayRNN(layer, **kw), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    loss = model.fit(x, np.ones((8, 1), "float32"), epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss), loss
from hwbptt.keras import tf_kernels, torch_kernels
with tf_kernels.use(False), torch_kernels.use(False):  # the switches import nothing either
    HighwayRNN(keras.layers.LSTM(4))(x)
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad
print("NO_TORCH_OK")
"""


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow-only installation: run once, on the TensorFlow leg")
def test_hwbptt_keras_fits_without_torch():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "NO_TORCH_OK" in done.stdout, (done.stdout + done.stderr)[-3000:]
