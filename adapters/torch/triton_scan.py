"""The linear scan as a Triton kernel, for CUDA tensors.

One program per block of ``BLOCK`` lanes walks the time axis sequentially (forward or
reverse), keeping the running value in registers: ``a`` and ``b`` are read once and ``u``
written once, with lanes spread over the GPU's programs. Reference twin:
``hwbptt.torch.scan.linear_scan_reference`` (``tests/test_triton.py`` runs this kernel on CPU
tensors under ``TRITON_INTERPRET=1`` against it).

Layout as in ``hwbptt.torch.cpu_scan``: (T, M, K) with stride 1 on K and any strides
on dims 0 and 1 for ``a`` and ``b``; ``u`` contiguous. Offsets are 32-bit: a scan whose
offsets would reach 2^31 elements is refused (``offsets_fit``) rather than run on wrapped
offsets.

This module also holds what every Triton kernel of the project shares (``triton_cells``
imports it from here): ``enabled()``, the ``HWBPTT_TRITON`` switch (``HWBPTT_TRITON=0``
makes ``available()`` false here and in ``triton_cells``, so CUDA tensors take the eager
torch paths), and ``launch``, which turns a kernel that Triton cannot compile or launch on
the user's GPU into a ``RuntimeError`` naming the kernel and that way out, instead of a
bare Triton traceback (never a silent fallback: a result either comes from the kernel or
the call fails).
"""

from __future__ import annotations

import os

import torch

__all__ = ["available", "enabled", "launch", "offsets_fit", "scan_3d"]

try:  # Triton is optional: without it CUDA tensors take the plain-torch scan.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    _HAVE_TRITON = False


def enabled() -> bool:
    """``HWBPTT_TRITON`` is not set to ``0``/``false``/``no``/``off`` (read at every call,
    so that it can be changed in a running process)."""
    return os.environ.get("HWBPTT_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """Triton is installed, neither ``HWBPTT_KERNELS=0`` nor ``HWBPTT_TRITON=0`` is set, and
    there is a GPU for it (or its interpreter was chosen with ``TRITON_INTERPRET=1``)."""
    if not _HAVE_TRITON or not enabled():
        return False
    from .native import kernels_enabled

    return kernels_enabled() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _where(t: torch.Tensor) -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton's interpreter"
    if t.device.type == "cuda":
        try:
            major, minor = torch.cuda.get_device_capability(t.device)
            return f"{torch.cuda.get_device_name(t.device)}, sm_{major}{minor}"
        except Exception:  # pragma: no cover - the device could not be queried
            return str(t.device)
    return str(t.device)


def launch(module: str, name: str, kernel, grid, like: torch.Tensor, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``. Triton compiles a kernel at its first launch for
    each specialisation, so a Triton version or GPU architecture it cannot handle fails
    here, deep inside a backward pass: re-raised as a ``RuntimeError`` that names the
    kernel (``module``, ``name``), the GPU (from ``like``'s device) and ``HWBPTT_TRITON=0``
    (the eager torch path), with Triton's error chained. Out-of-memory errors pass as they
    are."""
    try:
        kernel[grid](*args, **meta)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        version = getattr(triton, "__version__", "?") if _HAVE_TRITON else "not installed"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(
            f"hwbptt: the Triton kernel {name} ({module}) could not be compiled or launched on {_where(like)} "
            f"(Triton {version}, torch {torch.__version__}): {type(exc).__name__}: {first}. "
            "Set HWBPTT_TRITON=0 to use the eager torch path instead (same results, slower)."
        ) from exc


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


def offsets_fit(T: int, M: int, K: int, saT: int, saM: int, sbT: int, sbM: int) -> bool:
    """Whether every offset ``_scan_kernel`` forms (int32 products of the time index and
    the strides) stays below 2^31: past that it would read and write the wrong elements."""
    last = max((T - 1) * saT + (M - 1) * saM, (T - 1) * sbT + (M - 1) * sbM, (T * M - 1) * K) + K - 1
    return last < 2**31


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
    if not offsets_fit(T, M, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1)):
        raise RuntimeError(
            f"hwbptt: the Triton kernel _scan_kernel ({__name__}) computes 32-bit offsets, and a scan over "
            f"(T, M, K) = {(T, M, K)} with strides a {tuple(a.stride())}, b {tuple(b.stride())} reaches past 2^31 elements. "
            "Set HWBPTT_TRITON=0 to use the eager torch path instead (same results, slower)."
        )
    block = min(1024, max(16, triton.next_power_of_2(K)))
    grid = (M, triton.cdiv(K, block))
    launch(__name__, "_scan_kernel", _scan_kernel, grid, b, a, b, u, T, M, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
           REVERSE=bool(reverse), BLOCK=block)
    return u
