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
from typing import Sequence

import torch

from . import native, workspace
from .dispatch import switch

__all__ = ["linear_t", "tn", "backend", "use_onednn", "status"]

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


# Rows per chunk of ``tn``: its transposed operands (G·chunk and K·chunk floats) stay in cache.
_TN_CHUNK = 2048
# Narrower products stay on torch.mm. Measured on two 2-core machines: on one, at K = 128
# the transposes cost what the faster GEMM saves (30% less time at K = 256); on another
# (MKL's transposed product there at about half oneDNN's rate) the chunked path took 7-29%
# less at K = 128 and 42-92% less at K >= 256 (one thread, docs/performance.md).
_TN_MIN_K = 128


def _transpose():
    """The compiled transpose operator, or ``None`` (no kernels loaded)."""
    ops = native.ops()
    return None if ops is None else ops.transpose_out


def _transpose_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[:] = src.T`` for float32 ``src`` (n, G) and ``dst`` (G, n), both unit stride
    along their rows."""
    native.ops().transpose_out(src, dst)


def tn(d: torch.Tensor, blocks: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``[d.T @ z for z in blocks]``: the weight gradients ``Σ_n d_n^T z_n`` of a batched VJP.

    ``d`` is (N, G); each block ``z`` (N, K) is given as row pieces stacked in order (e.g.
    ``[h_0, y_{0..T-2}]`` for ``h_{t-1}``), so it is never concatenated. ``torch.mm`` runs
    this product with transposed operands at well under half the rate of the untransposed
    one that oneDNN's linear runs; where that runs (``backend``) the rows are taken in
    chunks of ``_TN_CHUNK``, each transposed by a compiled kernel into a buffer small
    enough to stay in the CPU cache and multiplied by oneDNN, and the chunks' products
    summed (the same sums, in another order). Otherwise, and when the blocks are narrower
    than ``_TN_MIN_K`` columns in all, ``torch.mm``/``addmm_`` over the pieces."""
    N, G = d.shape
    ks = [blk[0].shape[1] for blk in blocks]
    chunked = (
        sum(ks) >= _TN_MIN_K
        and backend(d, d) == "onednn"
        and all(p.dtype == torch.float32 and p.device.type == "cpu" for blk in blocks for p in blk)
        and _transpose() is not None
    )
    if not chunked:
        out = []
        for blk in blocks:
            g, r = None, 0
            for p in blk:
                part = d[r : r + p.shape[0]].t()
                g = part.mm(p) if g is None else g.addmm_(part, p)
                r += p.shape[0]
            out.append(g)
        return out
    K = sum(ks)
    chunk = min(_TN_CHUNK, N)
    dt, zt = workspace.empty((G, chunk), d), workspace.empty((K, chunk), d)
    d = d if d.stride(-1) == 1 else d.contiguous()
    acc = None
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        n = r1 - r0
        a, b = (dt, zt) if n == chunk else (d.new_empty((G, n)), d.new_empty((K, n)))
        _transpose_into(d[r0:r1], a)
        k0 = 0
        for blk, k in zip(blocks, ks):
            p0 = 0
            for p in blk:
                p1 = p0 + p.shape[0]
                lo, hi = max(r0, p0), min(r1, p1)
                if lo < hi:
                    src = p[lo - p0 : hi - p0]
                    _transpose_into(src if src.stride(-1) == 1 else src.contiguous(), b[k0 : k0 + k, lo - r0 : hi - r0])
                p0 = p1
            k0 += k
        prod = _onednn_op()(a, b, None, "none", [], "")
        acc = prod if acc is None else acc.add_(prod)
    out, k0 = [], 0
    for k in ks:
        out.append(acc[:, k0 : k0 + k].contiguous())
        k0 += k
    return out


def use_onednn(on: bool) -> contextlib.AbstractContextManager[None]:
    """Switch oneDNN on or off within a block (for comparisons)."""
    return switch(_state, on, "use_onednn")


def status() -> str:
    if not _state["enabled"]:
        return "torch.mm (oneDNN switched off)"
    return "oneDNN linear (float32), torch.mm otherwise" if _onednn_ok() else f"torch.mm ({_state['why']})"
