"""Derivatives of the activations the analytic cells know.

An analytic block VJP needs ``φ'(z)`` for each activation ``y = φ(z)``; each entry here
gives it from the saved output ``y`` (and the pre-activation ``z`` where needed):

    tanh     1 - y²          sigmoid  y (1 - y)
    relu     [z > 0]         linear   1

Any other activation is refused when the layer is built (``ValueError``): a custom
activation has no derivative we could use, and a wrong one would give a wrong gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import ops

__all__ = ["activation_name", "derivative"]

_KNOWN: dict[str, Callable[[Any, Any], Any]] = {
    "tanh": lambda z, y: 1.0 - y * y,
    "sigmoid": lambda z, y: y * (1.0 - y),
    "relu": lambda z, y: ops.cast(z > 0, y.dtype),
    "linear": lambda z, y: ops.ones_like(y),
}

_FUNCTIONS = {
    keras.activations.tanh: "tanh",
    keras.activations.sigmoid: "sigmoid",
    keras.activations.relu: "relu",
    keras.activations.linear: "linear",
}


def activation_name(fn: Any, where: str) -> str:
    """The name of a known activation, or ``ValueError`` naming ``where`` it was found."""
    if fn is None:
        return "linear"
    name = _FUNCTIONS.get(fn)
    if name is None:
        shown = getattr(fn, "__name__", repr(fn))
        raise ValueError(
            f"{where}={shown!r} has no known derivative; HighwayRNN supports "
            f"{sorted(_KNOWN)} in LSTM, GRU and SimpleRNN layers (their gradient is "
            "written out by hand). For another activation write a user cell and wrap "
            "keras.layers.RNN(cell): its gradient comes from the backend's autodiff."
        )
    return name


def apply(name: str, z: Any) -> Any:
    """``φ(z)`` for a known activation name."""
    return getattr(keras.activations, name)(z)


def derivative(name: str, z: Any, y: Any) -> Any:
    """``φ'(z)`` for ``y = φ(z)``."""
    return _KNOWN[name](z, y)
