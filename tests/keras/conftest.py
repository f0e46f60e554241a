"""Test setup for the Keras adapter (both backends: ``KERAS_BACKEND=torch pytest tests/keras``)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for `helpers`

pytest.importorskip("keras")


@pytest.fixture(autouse=True)
def _float64_matmul_on_torch(monkeypatch):
    """Keras 3.15's torch ``ops.matmul`` returns float32 for float64 inputs (its
    result-type rule maps torch dtypes to floatx), so a float64 Keras layer on torch is
    only float32-accurate and cannot serve as the float64 BPTT reference. Patch it for
    the reference; the adapter does not rely on it (``backend_ops.matmul``)."""
    import keras

    if keras.backend.backend() != "torch":
        yield
        return
    import torch
    from keras.src.backend.torch import numpy as knp

    original = knp.matmul

    def matmul(x1, x2):
        x1, x2 = knp.convert_to_tensor(x1), knp.convert_to_tensor(x2)
        if x1.dtype == torch.float64 and x2.dtype == torch.float64:
            return torch.matmul(x1, x2)
        return original(x1, x2)

    monkeypatch.setattr(knp, "matmul", matmul)
    yield
