"""The linear scan on CPU as one compiled pass: sequential over time, vectorised across
lanes, the lanes split over the cores. Reads ``a`` and ``b`` once and writes ``u`` once
(the fewest passes a scan can make). Its reference is ``hwbptt.scan.linear_scan_reference``;
``hwbptt.scan`` dispatches here (see its docstring for when).

Layout: time on dim 0, the lanes as ``(M, K)`` with stride 1 along ``K``; ``a`` and ``b``
may have any strides on dims 0 and 1 (views into gate tensors need no copy); ``u`` is
written contiguous. Forward: ``u_t = a_t u_{t-1} + b_t``; reverse: ``u_t = a_t u_{t+1} + b_t``.
Time is the outer loop (each thread streams through its lanes row by row).
``a`` at the first step of the scan (t = 0 forward, t = T-1 reverse) is never read.
"""

from __future__ import annotations

import torch

from .cbuild import addr, load, run_parallel, task

__all__ = ["scan_3d", "available"]

_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
/* c (with strides scT, scM) is an optional second b: u_t = a_t u_{t-1} + b_t + c_t. */
#define SCAN(NAME, TYPE)                                                               \
void NAME(long T, long K, long m_lo, long m_hi, int reverse,                           \
          const TYPE* a, long saT, long saM, const TYPE* b, long sbT, long sbM,         \
          TYPE* u, long M, const TYPE* c, long scT, long scM) {                         \
  long t0 = reverse ? T - 1 : 0, step = reverse ? -1 : 1;                               \
  for (long m = m_lo; m < m_hi; ++m) {                                                  \
    const TYPE* restrict bb = b + t0 * sbT + m * sbM;                                   \
    TYPE* restrict uu = u + (t0 * M + m) * K;                                           \
    if (c) {                                                                            \
      const TYPE* restrict cc = c + t0 * scT + m * scM;                                 \
      for (long k = 0; k < K; ++k) uu[k] = bb[k] + cc[k];                               \
    } else {                                                                            \
      for (long k = 0; k < K; ++k) uu[k] = bb[k];                                       \
    }                                                                                   \
  }                                                                                     \
  for (long n = 1; n < T; ++n) {                                                        \
    long t = t0 + n * step;                                                             \
    for (long m = m_lo; m < m_hi; ++m) {                                                \
      const TYPE* restrict aa = a + t * saT + m * saM;                                  \
      const TYPE* restrict bt = b + t * sbT + m * sbM;                                  \
      const TYPE* restrict up = u + ((t - step) * M + m) * K;                           \
      TYPE* restrict ut = u + (t * M + m) * K;                                          \
      if (c) {                                                                          \
        const TYPE* restrict ct = c + t * scT + m * scM;                                \
        for (long k = 0; k < K; ++k) ut[k] = aa[k] * up[k] + bt[k] + ct[k];            \
      } else {                                                                          \
        for (long k = 0; k < K; ++k) ut[k] = aa[k] * up[k] + bt[k];                    \
      }                                                                                 \
    }                                                                                   \
  }                                                                                     \
}                                                                                       \
/* The task for cbuild.run_parallel: lanes [lo, hi) of M; args as in scan_3d below. */ \
void NAME##_task(long lo, long hi, const int64_t* p) {                                \
  NAME(p[0], p[1], lo, hi, (int)p[2], (const TYPE*)p[3], p[4], p[5], (const TYPE*)p[6], \
       p[7], p[8], (TYPE*)p[9], p[10], (const TYPE*)p[11], p[12], p[13]);               \
}
SCAN(scan_f32, float)
SCAN(scan_f64, double)
"""

_FUNCS: dict[torch.dtype, object] = {}


def available() -> bool:
    return _lib() is not None


def _lib():
    lib = load("cpu_scan", _SOURCE)
    if lib is not None and not _FUNCS:
        for dtype, name in ((torch.float32, "scan_f32"), (torch.float64, "scan_f64")):
            _FUNCS[dtype] = task(lib, f"{name}_task")
    return lib


def scan_3d(a: torch.Tensor, b: torch.Tensor, reverse: bool, out: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
    """``a``, ``b`` (and ``c``): (T, M, K) CPU tensors of one dtype (float32/float64), stride
    1 on K. Returns ``u`` (T, M, K) contiguous for the recurrence with ``b_t + c_t`` in
    place of ``b_t`` when ``c`` is given (``out`` if given, which must overlap no input)."""
    if _lib() is None:
        raise RuntimeError("the compiled CPU scan is unavailable; see hwbptt.kernels.status()")
    T, M, K = b.shape
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride(2) == 1 and b.stride(2) == 1
    assert c is None or (c.shape == b.shape and c.dtype == b.dtype and c.stride(2) == 1)
    u = torch.empty((T, M, K), dtype=b.dtype) if out is None else out
    cs = (addr(c), c.stride(0), c.stride(1)) if c is not None else (0, 0, 0)
    args = [T, K, int(reverse), addr(a), a.stride(0), a.stride(1), addr(b), b.stride(0), b.stride(1), addr(u), M, *cs]
    run_parallel(_FUNCS[b.dtype], args, M, T * M * K)
    return u
