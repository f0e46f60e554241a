"""The linear scan's contract, and its reference (design note, section 5).

Forward:  ``u_t = a_t ⊙ u_{t-1} + b_t``  for ``t = 0 .. T-1``, with ``u_{-1} = 0``.
Reverse:  ``u_t = a_t ⊙ u_{t+1} + b_t``  for ``t = T-1 .. 0``, with ``u_T = 0``.

In the reverse form ``a_t`` is the multiplier that carries ``u_{t+1}`` into ``u_t``: for
the Highway-BP adjoint ``w_t = ℓ_t + a_{t+1} w_{t+1}`` the caller passes the residual
multipliers shifted by one step. ``a`` at the scan's first step is never read.

Every implementation (the compiled CPU pass and the odd-even reduction in
``hwbptt.torch.scan``, the Triton kernel, the Keras scans in ``hwbptt.keras``) solves this
recurrence, only multiplying and adding (never dividing by cumulative products, which
underflow over long sequences). ``linear_scan_reference`` is the sequential loop on NumPy
arrays: the obviously correct twin the framework scans are tested against. The core
imports no framework.
"""

from __future__ import annotations

import numpy as np

__all__ = ["linear_scan_reference"]


def linear_scan_reference(a, b, reverse: bool = False, axis: int = 0) -> np.ndarray:
    """The recurrence above along ``axis``, one step at a time. ``a`` broadcasts to
    ``b``'s shape; half-precision inputs are accumulated in float32 and the result is
    returned in ``b``'s dtype."""
    b = np.asarray(b)
    if b.ndim == 0:
        raise ValueError("linear_scan_reference: b must have at least one dimension (the time axis)")
    if not -b.ndim <= axis < b.ndim:
        raise ValueError(f"linear_scan_reference: axis={axis} is out of range for b with {b.ndim} dimensions")
    try:
        a = np.broadcast_to(np.asarray(a), b.shape)
    except ValueError:
        raise ValueError(f"linear_scan_reference: a of shape {np.shape(a)} does not broadcast to b of shape {b.shape}") from None
    acc = np.float32 if b.dtype == np.float16 else b.dtype
    a_t, b_t = np.moveaxis(a.astype(acc), axis, 0), np.moveaxis(b.astype(acc), axis, 0)
    u = np.empty_like(b_t)
    order = range(len(b_t) - 1, -1, -1) if reverse else range(len(b_t))
    prev = None
    for t in order:
        prev = b_t[t] if prev is None else a_t[t] * prev + b_t[t]
        u[t] = prev
    return np.moveaxis(u, 0, axis).astype(b.dtype)
