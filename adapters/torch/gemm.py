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
import math
import time
from typing import Sequence

import torch

from . import native, workspace
from .dispatch import switch

__all__ = ["linear_t", "tn", "backend", "use_onednn", "status", "tn_status"]

# "chunked": whether ``tn``'s chunked path pays on this machine (``_chunked_pays``), None
# until measured; "tn_ms": the two times that decided it.
_state: dict[str, object] = {"enabled": True, "ok": None, "why": "", "chunked": None, "tn_ms": None}


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
# Narrower products stay on torch.mm (on one 2-core machine the transposes cost what the
# faster GEMM saves at K = 128; docs/performance.md).
_TN_MIN_K = 128
# The chunked path is taken where it measured under this fraction of torch.mm's time: a
# clear win, not a coin toss between two near-equal times on a noisy machine.
_TN_WIN = 0.85


def _transpose():
    """The compiled transpose operator, or ``None`` (no kernels loaded)."""
    ops = native.ops()
    return None if ops is None else ops.transpose_out


def _transpose_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[:] = src.T`` for float32 ``src`` (n, G) and ``dst`` (G, n), both unit stride
    along their rows."""
    native.ops().transpose_out(src, dst)


def _tn_mm(d: torch.Tensor, blocks: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``tn`` by ``torch.mm``/``addmm_`` on transposed views of the row pieces."""
    out = []
    for blk in blocks:
        g, r = None, 0
        for p in blk:
            part = d[r : r + p.shape[0]].t()
            g = part.mm(p) if g is None else g.addmm_(part, p)
            r += p.shape[0]
        out.append(g)
    return out


def _tn_chunked(d: torch.Tensor, blocks: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``tn`` by oneDNN on chunks of ``_TN_CHUNK`` rows, each operand transposed by the
    compiled kernel into a buffer that stays in cache; the chunks' products summed."""
    N, G = d.shape
    ks = [blk[0].shape[1] for blk in blocks]
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


def _chunked_pays() -> bool:
    """Whether ``tn``'s chunked path beats ``torch.mm``'s transposed product on this machine,
    measured once per process (about 20 ms): both on a (2048, 512)ᵀ (2048, 256) product, the
    lesser of three interleaved runs each, chunked taken below ``_TN_WIN`` of torch.mm's time.

    Which wins is a property of the machine's BLAS, not of the shapes: on one 2-core machine
    MKL's transposed product ran at about half oneDNN's rate and the chunked path took 7-29%
    less at K = 128 and 42-92% less at K >= 256; on a 2-core Intel Xeon (AVX-512) torch.mm
    took 1.3-2.2x less than the chunked path at every shape of the tapes (docs/performance.md).
    The two compute the same sums in another order."""
    if _state["chunked"] is None:
        g = torch.Generator().manual_seed(0)
        d, z = torch.randn(2048, 512, generator=g), torch.randn(2048, 256, generator=g)
        best = {"chunked": math.inf, "torch.mm": math.inf}
        with torch.no_grad():
            for _ in range(3):
                for name, run in (("chunked", _tn_chunked), ("torch.mm", _tn_mm)):
                    t0 = time.perf_counter()
                    run(d, [[z]])
                    best[name] = min(best[name], time.perf_counter() - t0)
        _state["tn_ms"] = {k: v * 1e3 for k, v in best.items()}
        _state["chunked"] = best["chunked"] < _TN_WIN * best["torch.mm"]
    return bool(_state["chunked"])


def tn(d: torch.Tensor, blocks: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``[d.T @ z for z in blocks]``: the weight gradients ``Σ_n d_n^T z_n`` of a batched VJP.

    ``d`` is (N, G); each block ``z`` (N, K) is given as row pieces stacked in order (e.g.
    ``[h_0, y_{0..T-2}]`` for ``h_{t-1}``), so it is never concatenated. Where oneDNN runs
    (``backend``), the blocks are ``_TN_MIN_K`` columns wide or more in all, and the chunked
    path measured faster on this machine (``_chunked_pays``): ``_tn_chunked``. Otherwise
    ``torch.mm``/``addmm_`` over the pieces (``_tn_mm``)."""
    chunked = (
        sum(blk[0].shape[1] for blk in blocks) >= _TN_MIN_K
        and backend(d, d) == "onednn"
        and all(p.dtype == torch.float32 and p.device.type == "cpu" for blk in blocks for p in blk)
        and _transpose() is not None
        and _chunked_pays()
    )
    return _tn_chunked(d, blocks) if chunked else _tn_mm(d, blocks)


def use_onednn(on: bool) -> contextlib.AbstractContextManager[None]:
    """Switch oneDNN on or off within a block (for comparisons)."""
    return switch(_state, on, "use_onednn")


def tn_status() -> str:
    """Which path ``tn`` takes for wide float32 blocks here, and the times that decided it."""
    if not (_state["enabled"] and _onednn_ok() and _transpose() is not None):
        return "torch.mm"
    chunked = _chunked_pays()
    ms = _state["tn_ms"]
    return (f"{'chunked oneDNN' if chunked else 'torch.mm'} (measured here: chunked oneDNN {ms['chunked']:.2f} ms, "
            f"torch.mm {ms['torch.mm']:.2f} ms)")


def status() -> str:
    if not _state["enabled"]:
        return "torch.mm (oneDNN switched off)"
    if not _onednn_ok():
        return f"torch.mm ({_state['why']})"
    return f"oneDNN linear (float32), torch.mm otherwise; weight gradients: {tn_status()}"
