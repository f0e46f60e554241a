"""The Keras adapter's reverse linear scan against a plain sequential loop."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from hwbptt.keras.backend_ops import KerasArrayOps, _chunked_reverse_scan

from helpers import BACKEND, tensor


def _reference(a, b):
    """``u_t = a_t u_{t+1} + b_t``, ``u_T = 0``, one step at a time in float64."""
    a, b = np.broadcast_to(a, b.shape).astype(np.float64), b.astype(np.float64)
    u, nxt = np.zeros_like(b), np.zeros_like(b[0])
    for t in range(b.shape[0] - 1, -1, -1):
        nxt = u[t] = b[t] + a[t] * nxt
    return u


@pytest.mark.parametrize("T", [1, 2, 3, 5, 16, 17, 63, 64, 100])
@pytest.mark.parametrize("lanes", [4, 1], ids=["a-full", "a-broadcast"])
def test_chunked_scan_matches_sequential_loop(T, lanes):
    rng = np.random.default_rng(T)
    a = rng.uniform(0.5, 1.0, size=(T, 3, lanes))
    b = rng.normal(size=(T, 3, 4))
    want = _reference(a, b)
    for fn in (_chunked_reverse_scan, lambda a, b, T: KerasArrayOps.reverse_scan(a, b)):
        got = ops.convert_to_numpy(fn(tensor(a, "float64"), tensor(b, "float64"), T))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_chunked_scan_keeps_tiny_products_finite():
    """Gates of 1e-3 over 200 steps: the products underflow, the scan does not blow up."""
    T = 200
    a = np.full((T, 2, 3), 1e-3)
    b = np.random.default_rng(0).normal(size=(T, 2, 3))
    got = ops.convert_to_numpy(_chunked_reverse_scan(tensor(a, "float32"), tensor(b, "float32"), T))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _reference(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="an unknown batch size is a graph-mode case")
def test_scan_in_a_graph_with_unknown_batch_size():
    import tensorflow as tf

    T = 37
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=(T, 5, 1)), rng.normal(size=(T, 5, 4))
    fn = tf.function(lambda a, b: KerasArrayOps.reverse_scan(a, b),
                     input_signature=[tf.TensorSpec((T, None, 1), tf.float64), tf.TensorSpec((T, None, 4), tf.float64)])
    np.testing.assert_allclose(fn(a, b).numpy(), _reference(a, b), rtol=1e-12, atol=1e-12)
