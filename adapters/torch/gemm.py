"""``a @ w.T`` for the tapes' large products, on the fastest CPU GEMM at hand.

PyTorch's ``torch.mm`` on CPU calls MKL; its oneDNN linear (``torch.ops.mkldnn.
_linear_pointwise``, the kernel ``torch.compile`` uses for ``nn.Linear`` on CPU) was measured
on this project's 2-core AMD machine at 2-2.5x MKL's float32 throughput for the tapes'
shapes ``(T·B, 4H) @ (4H, H)`` (``docs/performance.md``). Both compute the same product
in float32 (no reduced-precision mode); the results differ only by summation order.

``linear_t(a, w, bias)`` returns ``a @ w.T + bias`` (``a``: (N, K), ``w``: (M, K), ``bias``
(M,) or ``None``) through oneDNN for CPU float32 tensors without an autograd graph when
PyTorch was built with it, else through ``torch.mm``/``torch.addmm``. ``backend(a, w)`` says which; ``use_onednn(False)`` switches oneDNN off (for
comparisons). The first call checks oneDNN's product against ``torch.mm`` on a small
problem and, if they disagree, oneDNN is not used (``status()`` then says why).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["linear_t", "backend", "use_onednn", "status"]

_state: dict[str, object] = {"enabled": True, "ok": None, "why": ""}


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _onednn_ok() -> bool:
    """Whether oneDNN's linear exists here and agrees with ``torch.mm`` (checked once)."""
    if _state["ok"] is None:
        op = _onednn_op()
        if op is None or not torch.backends.mkldnn.is_available():
            _state["ok"], _state["why"] = False, "PyTorch was built without oneDNN's linear"
        else:
            g = torch.Generator().manual_seed(0)
            a, w = torch.randn(67, 33, generator=g), torch.randn(45, 33, generator=g)
            try:
                got = op(a, w, None, "none", [], "")
                good = got.shape == (67, 45) and torch.allclose(got, a @ w.t(), rtol=1e-5, atol=1e-5)
                _state["ok"], _state["why"] = good, "" if good else "oneDNN's linear disagreed with torch.mm"
            except RuntimeError as exc:
                _state["ok"], _state["why"] = False, f"oneDNN's linear failed: {exc}"
    return bool(_state["ok"])


def backend(a: torch.Tensor, w: torch.Tensor) -> str:
    """``"onednn"`` or ``"torch.mm"``: which GEMM ``linear_t(a, w)`` takes."""
    if (
        _state["enabled"]
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and a.dim() == 2
        and w.dim() == 2
        and a.shape[0] > 0
        and not (torch.is_grad_enabled() and (a.requires_grad or w.requires_grad))
        # Under torch.compile the compiler picks the GEMM (inductor rejects this op on
        # inputs it computed itself).
        and not torch.compiler.is_compiling()
        and _onednn_ok()
    ):
        return "onednn"
    return "torch.mm"


def linear_t(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ w.T (+ bias)`` for ``a`` (N, K), ``w`` (M, K), ``bias`` (M,): a new (N, M) tensor."""
    if backend(a, w) == "onednn" and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")):
        return _onednn_op()(a if a.stride(-1) == 1 else a.contiguous(), w, bias, "none", [], "")
    return torch.mm(a, w.t()) if bias is None else torch.addmm(bias, a, w.t())


@contextlib.contextmanager
def use_onednn(on: bool) -> Iterator[None]:
    """Switch oneDNN on or off within a block (for comparisons)."""
    if not isinstance(on, bool):
        raise TypeError(f"use_onednn(on) takes a bool, got on={on!r}")
    before = _state["enabled"]
    _state["enabled"] = on
    try:
        yield
    finally:
        _state["enabled"] = before


def status() -> str:
    if not _state["enabled"]:
        return "torch.mm (oneDNN switched off)"
    return "oneDNN linear (float32), torch.mm otherwise" if _onednn_ok() else f"torch.mm ({_state['why']})"
