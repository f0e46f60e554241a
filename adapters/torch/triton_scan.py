"""The linear scan as a Triton kernel, for CUDA tensors.

One program per block of ``BLOCK`` lanes walks the time axis sequentially (forward or
reverse), keeping the running value in registers: ``a`` and ``b`` are read once and ``u``
written once, with lanes spread over the GPU's programs. Reference twin:
``hwbptt.torch.scan.linear_scan_reference`` (``tests/test_triton.py`` runs this kernel on CPU
tensors under ``TRITON_INTERPRET=1`` against it).

Layout as in ``hwbptt.torch.cpu_scan``: (T, M, K) with stride 1 on K and any strides
on dims 0 and 1 for ``a`` and ``b``; ``u`` contiguous.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available", "scan_3d"]

try:  # Triton is optional: without it CUDA tensors take the plain-torch scan.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    _HAVE_TRITON = False


def available() -> bool:
    if not _HAVE_TRITON:
        return False
    from .native import kernels_enabled

    return kernels_enabled() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if _HAVE_TRITON:

    @triton.jit
    def _scan_kernel(a_ptr, b_ptr, u_ptr, T, M, K, saT, saM, sbT, sbM, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        kb = tl.program_id(1)
        k = kb * BLOCK + tl.arange(0, BLOCK)
        mask = k < K
        if REVERSE:
            t0 = T - 1
        else:
            t0 = 0
        acc = tl.load(b_ptr + t0 * sbT + m * sbM + k, mask=mask, other=0.0)
        tl.store(u_ptr + (t0 * M + m) * K + k, acc, mask=mask)
        for n in range(1, T):
            if REVERSE:
                t = T - 1 - n
            else:
                t = n
            at = tl.load(a_ptr + t * saT + m * saM + k, mask=mask, other=0.0)
            bt = tl.load(b_ptr + t * sbT + m * sbM + k, mask=mask, other=0.0)
            acc = at * acc + bt
            tl.store(u_ptr + (t * M + m) * K + k, acc, mask=mask)


def scan_3d(a: torch.Tensor, b: torch.Tensor, reverse: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a``, ``b``: (T, M, K) tensors of one dtype (float32/float64), stride 1 on K.
    Returns ``u`` (T, M, K) contiguous."""
    if not _HAVE_TRITON:
        raise RuntimeError("Triton is not installed; the Triton scan is unavailable")
    T, M, K = b.shape
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride(2) == 1 and b.stride(2) == 1
    u = torch.empty((T, M, K), dtype=b.dtype, device=b.device) if out is None else out
    if T == 0 or M == 0 or K == 0:
        return u
    block = min(1024, max(16, triton.next_power_of_2(K)))
    grid = (M, triton.cdiv(K, block))
    _scan_kernel[grid](a, b, u, T, M, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), REVERSE=bool(reverse), BLOCK=block)
    return u
