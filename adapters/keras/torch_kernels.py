"""On the torch backend, Keras' LSTM and GRU run through the PyTorch adapter's layers.

A Keras ``LSTMCell`` (activations ``tanh``/``sigmoid``) or ``GRUCell`` (``reset_after=True``,
the same activations) is PyTorch's cell with its weights transposed and, for the GRU, its
gates reordered:

    LSTM   Keras  z = x W + h U + b,  gates [i, f, c, o]  ->  W_ih = Wᵀ, W_hh = Uᵀ, b_ih = b, b_hh = 0
    GRU    Keras  gates [z, r, h], bias rows (input, recurrent)
           ->  PyTorch [r, z, n]: W_ih = (W[:, P])ᵀ, W_hh = (U[:, P])ᵀ, b_ih = b_0[P], b_hh = b_1[P]
           with P the column permutation [H:2H, 0:H, 2H:3H]; both update h = z ⊙ h_{t-1} + (1 - z) ⊙ n.

``run`` hands such a layer to ``hwbptt.torch.layer.lstm_layer``/``gru_layer``: the forward
in the fused kernels (keeping the gates), the backward the same Highway-BP on the fused
tapes that ``hwbptt.torch.HighwayLSTM``/``HighwayGRU`` run, and in exact mode their exact
backward (BPTT's adjoint as a C loop on the kept gates). The ``keras.ops`` path (``gradient.py``) computes
the same gradient; ``tests/keras`` compares the two (``use(False)`` switches this one off).

Masks, other activations, ``reset_after=False`` and other dtypes than float32/float64 keep
the ``keras.ops`` path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import keras

from hwbptt.options import Diagnostics, HighwayOptions

from .switch import switch

__all__ = ["applies", "run", "use"]

_state = {"enabled": True}


def use(on: bool) -> contextlib.AbstractContextManager[None]:
    """Switch this route on or off within a block (for comparisons with ``keras.ops``)."""
    return switch(_state, on, "use")


def _activations_are_default(cell: Any) -> bool:
    act, ract = keras.activations.get(cell.activation), keras.activations.get(cell.recurrent_activation)
    return act is keras.activations.tanh and ract is keras.activations.sigmoid


def applies(cell: Any, x: Any, mask: Any, gate_masks: Any = None) -> bool:
    """Whether ``run`` takes this cell and time-major input without a mask (nor
    per-gate dropout masks: recurrent dropout, or input dropout with implementation 1)."""
    if not _state["enabled"] or mask is not None or gate_masks is not None or keras.backend.backend() != "torch":
        return False
    if str(x.dtype).replace("torch.", "") not in ("float32", "float64"):
        return False
    if type(cell) is keras.layers.LSTMCell:
        return _activations_are_default(cell)
    if type(cell) is keras.layers.GRUCell:
        return cell.reset_after and _activations_are_default(cell)
    return False


class _Report(dict):
    """The PyTorch layers' diagnostics sink, forwarding the one entry to ``report``."""

    def __init__(self, report: Callable[[Diagnostics], None]):
        super().__init__()
        self._report = report

    def __setitem__(self, key: Any, value: Diagnostics) -> None:
        self._report(value)


def _gru_order(w: Any, H: int) -> Any:
    import torch

    return torch.cat([w[..., H : 2 * H], w[..., :H], w[..., 2 * H :]], dim=-1)


def run(cell: Any, params: list, x: Any, states: list, options: HighwayOptions,
        report: Callable[[Diagnostics], None]) -> tuple[Any, list]:
    """``(y, final_states)`` for time-major ``x`` (T, B, D) and the initial ``states``:
    ``y`` (T, B, H) the outputs, ``final_states`` the Keras states after the last step."""
    from hwbptt.torch.layer import gru_layer, lstm_layer

    exact = options.exact
    if exact and options.diagnostics:
        report(Diagnostics())  # what the keras.ops path reports: the exact mode runs no iteration
    layer_options = None if exact else options
    sink = None if exact else _Report(report)
    H = cell.units
    if type(cell) is keras.layers.LSTMCell:
        W, U = params[0], params[1]
        flat = [W.t(), U.t()]
        if cell.use_bias:
            flat += [params[2], params[2].new_zeros(params[2].shape)]
        y, h_last, c_last = lstm_layer(x, states[0], states[1], flat, cell.use_bias, None, layer_options, sink, 0)
        return y, [h_last, c_last]
    W, U = params[0], params[1]
    flat = [_gru_order(W, H).t(), _gru_order(U, H).t()]
    if cell.use_bias:
        bias = _gru_order(params[2], H)
        flat += [bias[0], bias[1]]
    y, h_last = gru_layer(x, states[0], flat, cell.use_bias, None, layer_options, sink, 0)
    return y, [h_last]
