"""Dropout masks as the wrapped Keras layer draws them, and the matmuls they enter.

Keras draws a cell's masks once per call (``RNN._maybe_config_dropout_masks``: the input
mask from ``sequences[:, 0]``, then the recurrent mask from the first initial state,
whatever ``training`` is) and applies them only when training. ``draw`` does the same
through the cell's own ``get_dropout_mask``/``get_recurrent_dropout_mask`` and resets
them after, so the same seed gives the same masks as the wrapped layer and the seed
stream advances as it does there.

A recurrent mask is fixed for the whole sequence: it is a constant factor inside the
block ``J`` of every step, ``z = x W + (h_{t-1} ⊙ m) U``, so Highway-BP handles it as
it handles ``U`` (``λ J = (δ Uᵀ) ⊙ m``). With ``implementation=1`` (which Keras uses
whenever ``recurrent_dropout > 0``) each gate ``g`` has its own masks ``m_g``:
``z_g = (x ⊙ d_g) W_g + (h ⊙ m_g) U_g``. Masks here are stacked as ``(B, G, n)``.

    gate_matmul(a, W, M)       [(a ⊙ m_g) W_g]_g           (..., B, n) -> (..., B, G·H)
    gate_matmul_t(d, W, M)     Σ_g (d_g W_gᵀ) ⊙ m_g        (..., B, G·H) -> (..., B, n)
    gate_weight_grad(a, d, M)  [Σ_{t,b} (a ⊙ m_g)ᵀ d_g]_g  the gradient of W
"""

from __future__ import annotations

from typing import Any

from keras import ops

from .backend_ops import matmul
from .steps import weight_grad

__all__ = ["draw", "gate_matmul", "gate_matmul_t", "gate_weight_grad"]


def _applies(cell: Any, rate: float, mask: Any, training: Any) -> bool:
    if not training or mask is None:
        return False
    if hasattr(cell, "implementation"):  # LSTMCell, GRUCell: only 0 < rate < 1
        return 0.0 < rate < 1.0
    return True  # SimpleRNNCell: whenever a mask was drawn


def _stack(mask: Any) -> Any:
    return ops.stack(list(mask), axis=1) if isinstance(mask, (list, tuple)) else mask[:, None, :]


def draw(cell: Any, first_input: Any, first_state: Any, training: Any) -> tuple[Any, Any, Any]:
    """``(input_mask, input_gate_masks, recurrent_gate_masks)``: ``input_mask`` (B, D)
    for one mask shared by every gate (applied to the sequence before the loop), the
    gate masks ``(B, G, n)`` otherwise; ``None`` where no dropout applies."""
    if not (hasattr(cell, "get_dropout_mask") and hasattr(cell, "get_recurrent_dropout_mask")):
        return None, None, None
    dp = cell.get_dropout_mask(first_input)
    rec = cell.get_recurrent_dropout_mask(first_state)
    cell.reset_dropout_mask()
    cell.reset_recurrent_dropout_mask()
    dp = dp if _applies(cell, cell.dropout, dp, training) else None
    rec = rec if _applies(cell, cell.recurrent_dropout, rec, training) else None
    if isinstance(dp, (list, tuple)):
        in_mask, in_gates = None, _stack(dp)
    else:
        in_mask, in_gates = dp, None
    return in_mask, in_gates, (None if rec is None else _stack(rec))


def _per_gate(w: Any, G: int) -> Any:
    """``(n, G·H) -> (G, n, H)``."""
    n, GH = w.shape[0], w.shape[1]
    return ops.transpose(ops.reshape(w, (n, G, GH // G)), (1, 0, 2))


def gate_matmul(a: Any, w: Any, M: Any) -> Any:
    if M is None:
        return matmul(a, w)
    G = M.shape[1]
    out = ops.einsum("...gn,gnk->...gk", ops.expand_dims(a, -2) * M, _per_gate(w, G))
    return ops.reshape(out, (*ops.shape(out)[:-2], w.shape[1]))


def gate_matmul_t(d: Any, w: Any, M: Any) -> Any:
    if M is None:
        return matmul(d, ops.transpose(w))
    G = M.shape[1]
    dg = ops.reshape(d, (*ops.shape(d)[:-1], G, w.shape[1] // G))
    return ops.sum(ops.einsum("...gk,gnk->...gn", dg, _per_gate(w, G)) * M, axis=-2)


def gate_weight_grad(a: Any, d: Any, M: Any) -> Any:
    if M is None:
        return weight_grad(a, d)
    G = M.shape[1]
    dg = ops.reshape(d, (*ops.shape(d)[:-1], G, d.shape[-1] // G))
    per = ops.einsum("tbgn,tbgk->gnk", ops.expand_dims(a, -2) * M, dg)  # (G, n, H)
    return ops.reshape(ops.transpose(per, (1, 0, 2)), (a.shape[-1], d.shape[-1]))
