"""The linear scan on CPU as one compiled pass (the ``hwbptt::scan_out`` operator,
``adapters/torch/csrc/loops.cpp``): sequential over time, vectorised across lanes, the
lanes split over PyTorch's intra-op threads. Reads ``a`` and ``b`` once and writes ``u``
once (the fewest passes a scan can make). Its reference is
``hwbptt.torch.scan.linear_scan_reference``; ``hwbptt.torch.scan`` dispatches here (see
its docstring for when).

Layout: time on dim 0, the lanes as ``(M, K)`` with stride 1 along ``K``; ``a`` and ``b``
may have any strides on dims 0 and 1 (views into gate tensors need no copy); ``u`` is
written contiguous. Forward: ``u_t = a_t u_{t-1} + b_t``; reverse: ``u_t = a_t u_{t+1} + b_t``.
``a`` at the first step of the scan (t = 0 forward, t = T-1 reverse) is never read.
"""

from __future__ import annotations

import torch

from . import native

__all__ = ["scan_3d", "available"]


def available() -> bool:
    return native.ops() is not None


def scan_3d(a: torch.Tensor, b: torch.Tensor, reverse: bool, out: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
    """``a``, ``b`` (and ``c``): (T, M, K) CPU tensors of one dtype (float32/float64), stride
    1 on K. Returns ``u`` (T, M, K) contiguous for the recurrence with ``b_t + c_t`` in
    place of ``b_t`` when ``c`` is given (``out`` if given, which must overlap no input)."""
    ops = native.ops()
    if ops is None:
        raise RuntimeError(f"the compiled CPU scan is unavailable: {native.status()['why']}")
    u = torch.empty(b.shape, dtype=b.dtype) if out is None else out
    ops.scan_out(a, b, c, bool(reverse), u)
    return u
