"""Fused CPU kernels for the LSTM and GRU tapes (the fast paths of ``lstm_math`` and
``gru_math``), each the one-pass twin of an eager torch expression kept beside it.

Eager torch spends most of the backward's non-matmul time on a dozen elementwise ops
per expression, each a pass over a (T, B, 4H) tensor. These C kernels do each
expression in one pass, vectorised (libmvec ``expf``/``tanhf``) and split over the cores
(``hwbptt.kernels.cbuild``):

- ``lstm_gates``: pre-activations -> the four gates in place, and the cell-state
  recurrence ``c_t = f_t c_{t-1} + i_t g_t`` fused in (sequential over time, per lane),
  with ``tanh(c_t)`` and the readout gain ``o_t (1 - tanh² c_t)``;
- ``lstm_dpre``: ``dpre = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g²), m tanh(c) o(1-o)]``;
- ``gru_gates``: ``r, z = σ(gi + gh)``, ``n = tanh(gi_n + r gh_n)``, in place in ``gi``;
- ``gru_dgates``: ``(dgi, dgh)`` for a cotangent on the outputs.

References: ``LSTMTape``/``GRUTape`` (eager torch); ``tests/test_fast_paths.py`` compares
the fast tapes against them. Built at first use; when no C compiler is available
``available()`` is false and the tapes use their eager path (``hwbptt.kernels.status()``
says so).

CUDA tensors (float32, float16, bfloat16) go to the Triton twins of these four functions
in ``hwbptt.torch.triton_cells`` (same arguments, outputs and ``out=`` contracts), imported
at the first CUDA call, never at import; without Triton, ``supports`` is false for CUDA
tensors and the tapes use their eager path there.
"""

from __future__ import annotations

import torch

from hwbptt.kernels.cbuild import addr, load, run_parallel, task

from . import workspace

__all__ = ["available", "supports", "lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates"]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
/* Each row's inner loop is a separate non-inlined function whose pointer parameters are
   restrict-qualified: that is what lets the compiler vectorise it (with libmvec expf/tanhf). */
#define NI __attribute__((noinline))
#define DEFINE(SUF, T_, EXP, TANH)                                                            \
static inline T_ sig_##SUF(T_ x) { return (T_)1 / ((T_)1 + EXP(-x)); }                       \
static NI void lstm_gates_row_##SUF(long H, T_* restrict pi, T_* restrict pf,                 \
    T_* restrict pg, T_* restrict po, const T_* restrict cp, T_* restrict cc,                 \
    T_* restrict tt, T_* restrict gg) {                                                       \
  for (long h = 0; h < H; ++h) {                                                              \
    T_ i = sig_##SUF(pi[h]), f = sig_##SUF(pf[h]), g = TANH(pg[h]), o = sig_##SUF(po[h]);     \
    T_ cn = f * cp[h] + i * g;                                                                \
    T_ th = TANH(cn);                                                                         \
    pi[h] = i; pf[h] = f; pg[h] = g; po[h] = o;                                               \
    cc[h] = cn; tt[h] = th; gg[h] = o * ((T_)1 - th * th);                                    \
  }                                                                                           \
}                                                                                             \
void lstm_gates_##SUF(long T, long B, long H, long b_lo, long b_hi, T_* pre, const T_* c0,    \
                      T_* c, T_* tc, T_* gain) {                                              \
  for (long t = 0; t < T; ++t)                                                                \
    for (long b = b_lo; b < b_hi; ++b) {                                                      \
      T_* p = pre + (t * B + b) * 4 * H;                                                      \
      long r = (t * B + b) * H;                                                               \
      lstm_gates_row_##SUF(H, p, p + H, p + 2 * H, p + 3 * H,                                 \
                           t ? c + r - B * H : c0 + b * H, c + r, tc + r, gain + r);          \
    }                                                                                         \
}                                                                                             \
static NI void lstm_dpre_row_##SUF(long H, const T_* restrict d, const T_* restrict mm,       \
    const T_* restrict gi, const T_* restrict gf, const T_* restrict gg,                      \
    const T_* restrict go, const T_* restrict cp, const T_* restrict th,                      \
    T_* restrict oi, T_* restrict of, T_* restrict og, T_* restrict oo) {                     \
  for (long h = 0; h < H; ++h) {                                                              \
    T_ i = gi[h], f = gf[h], g = gg[h], o = go[h], dd = d[h];                                 \
    oi[h] = dd * g * i * ((T_)1 - i);                                                         \
    of[h] = dd * cp[h] * f * ((T_)1 - f);                                                     \
    og[h] = dd * i * ((T_)1 - g * g);                                                         \
    oo[h] = mm[h] * th[h] * o * ((T_)1 - o);                                                  \
  }                                                                                           \
}                                                                                             \
void lstm_dpre_##SUF(long B, long H, long r_lo, long r_hi, const T_* dc, const T_* m,         \
                     const T_* gates, const T_* c, const T_* c0, const T_* tc, T_* out) {     \
  for (long r = r_lo; r < r_hi; ++r) {                                                        \
    const T_* g = gates + r * 4 * H;                                                          \
    T_* o = out + r * 4 * H;                                                                  \
    lstm_dpre_row_##SUF(H, dc + r * H, m + r * H, g, g + H, g + 2 * H, g + 3 * H,             \
                        r >= B ? c + (r - B) * H : c0 + r * H, tc + r * H,                    \
                        o, o + H, o + 2 * H, o + 3 * H);                                      \
  }                                                                                           \
}                                                                                             \
static NI void gru_gates_row_##SUF(long H, T_* restrict ar, T_* restrict az,                  \
    T_* restrict an, const T_* restrict br, const T_* restrict bz, const T_* restrict bn) {   \
  for (long h = 0; h < H; ++h) {                                                              \
    T_ rr = sig_##SUF(ar[h] + br[h]), z = sig_##SUF(az[h] + bz[h]);                           \
    T_ n = TANH(an[h] + rr * bn[h]);                                                          \
    ar[h] = rr; az[h] = z; an[h] = n;                                                         \
  }                                                                                           \
}                                                                                             \
void gru_gates_##SUF(long H, long r_lo, long r_hi, T_* gi, const T_* gh) {                    \
  for (long r = r_lo; r < r_hi; ++r) {                                                        \
    T_* a = gi + r * 3 * H;                                                                   \
    const T_* b = gh + r * 3 * H;                                                             \
    gru_gates_row_##SUF(H, a, a + H, a + 2 * H, b, b + H, b + 2 * H);                         \
  }                                                                                           \
}                                                                                             \
static NI void gru_dgates_row_##SUF(long H, const T_* restrict l, const T_* restrict gr,      \
    const T_* restrict gz, const T_* restrict gn, const T_* restrict hn,                      \
    const T_* restrict hp, T_* restrict dr_, T_* restrict dz_, T_* restrict dn_,              \
    T_* restrict ir, T_* restrict iz, T_* restrict in_) {                                     \
  for (long h = 0; h < H; ++h) {                                                              \
    T_ rr = gr[h], z = gz[h], n = gn[h], lm = l[h];                                           \
    T_ dn = lm * ((T_)1 - z) * ((T_)1 - n * n);                                               \
    T_ dz = lm * (hp[h] - n) * z * ((T_)1 - z);                                               \
    T_ dr = dn * hn[h] * rr * ((T_)1 - rr);                                                   \
    dr_[h] = dr; dz_[h] = dz; dn_[h] = dn * rr;                                               \
    ir[h] = dr; iz[h] = dz; in_[h] = dn;                                                      \
  }                                                                                           \
}                                                                                             \
static NI void gru_dgh_row_##SUF(long H, const T_* restrict l, const T_* restrict gr,         \
    const T_* restrict gz, const T_* restrict gn, const T_* restrict hn,                      \
    const T_* restrict hp, T_* restrict dr_, T_* restrict dz_, T_* restrict dn_) {            \
  for (long h = 0; h < H; ++h) {                                                              \
    T_ rr = gr[h], z = gz[h], n = gn[h], lm = l[h];                                           \
    T_ dn = lm * ((T_)1 - z) * ((T_)1 - n * n);                                               \
    dr_[h] = dn * hn[h] * rr * ((T_)1 - rr);                                                  \
    dz_[h] = lm * (hp[h] - n) * z * ((T_)1 - z);                                              \
    dn_[h] = dn * rr;                                                                         \
  }                                                                                           \
}                                                                                             \
void gru_dgates_##SUF(long B, long H, long r_lo, long r_hi, const T_* lam, const T_* gates,   \
                      const T_* gh, const T_* h0, const T_* y, T_* dgh, T_* dgi) {            \
  for (long r = r_lo; r < r_hi; ++r) {                                                        \
    const T_* g = gates + r * 3 * H;                                                          \
    const T_* hp = r >= B ? y + (r - B) * H : h0 + r * H;                                     \
    T_* d = dgh + r * 3 * H;                                                                  \
    if (dgi) {                                                                                \
      T_* e = dgi + r * 3 * H;                                                                \
      gru_dgates_row_##SUF(H, lam + r * H, g, g + H, g + 2 * H, gh + r * 3 * H + 2 * H, hp,   \
                           d, d + H, d + 2 * H, e, e + H, e + 2 * H);                         \
    } else {                                                                                  \
      gru_dgh_row_##SUF(H, lam + r * H, g, g + H, g + 2 * H, gh + r * 3 * H + 2 * H, hp,      \
                        d, d + H, d + 2 * H);                                                 \
    }                                                                                         \
  }                                                                                           \
}                                                                                             \
/* The tasks for cbuild.run_parallel: a share [lo, hi) of the batch (lstm_gates) or of the    \
   T*B rows (the others); p holds the other arguments in order, pointers as integers. */     \
void lstm_gates_task_##SUF(long lo, long hi, const int64_t* p) {                              \
  lstm_gates_##SUF(p[0], p[1], p[2], lo, hi, (T_*)p[3], (const T_*)p[4], (T_*)p[5], (T_*)p[6], \
                   (T_*)p[7]);                                                                \
}                                                                                             \
void lstm_dpre_task_##SUF(long lo, long hi, const int64_t* p) {                               \
  lstm_dpre_##SUF(p[0], p[1], lo, hi, (const T_*)p[2], (const T_*)p[3], (const T_*)p[4],       \
                  (const T_*)p[5], (const T_*)p[6], (const T_*)p[7], (T_*)p[8]);              \
}                                                                                             \
void gru_gates_task_##SUF(long lo, long hi, const int64_t* p) {                               \
  gru_gates_##SUF(p[0], lo, hi, (T_*)p[1], (const T_*)p[2]);                                  \
}                                                                                             \
void gru_dgates_task_##SUF(long lo, long hi, const int64_t* p) {                              \
  gru_dgates_##SUF(p[0], p[1], lo, hi, (const T_*)p[2], (const T_*)p[3], (const T_*)p[4],      \
                   (const T_*)p[5], (const T_*)p[6], (T_*)p[7], (T_*)p[8]);                   \
}
DEFINE(f32, float, expf, tanhf)
DEFINE(f64, double, exp, tanh)
"""

_NAMES = {torch.float32: "f32", torch.float64: "f64"}
_FN: dict[tuple[str, torch.dtype], object] = {}


def _lib():
    lib = load("torch_rnn_fused", _SOURCE)
    if lib is not None and not _FN:
        for dtype, suf in _NAMES.items():
            for name in ("lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates"):
                _FN[(name, dtype)] = task(lib, f"{name}_task_{suf}")
    return lib


def available() -> bool:
    return _lib() is not None


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can take these tensors (one dtype, no autograd graph
    wanted): CPU float32/float64 when the C kernels were built, or CUDA float32/float16/
    bfloat16 on one device when the Triton kernels are available (``triton_cells``)."""
    t0 = tensors[0]
    if t0.device.type == "cuda":
        if any(t.device != t0.device or t.dtype != t0.dtype for t in tensors):
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        cells = _triton_cells()
        return cells is not None and t0.dtype in cells.DTYPES
    if t0.dtype not in _NAMES or any(t.device.type != "cpu" or t.dtype != t0.dtype for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return available()


_CELLS: list = []  # [triton_cells module or None] once looked up


def _triton_cells():
    """``hwbptt.torch.triton_cells`` if Triton can run its kernels here, else ``None``.
    Imported here, at the first CUDA call, so that importing this module never imports
    Triton."""
    if not _CELLS:
        try:
            from . import triton_cells
        except Exception:  # pragma: no cover - depends on the installation
            triton_cells = None
        _CELLS.append(triton_cells)
    cells = _CELLS[0]
    return cells if cells is not None and cells.available() else None


def _gpu(t: torch.Tensor):
    """The Triton kernels for a tensor not on the CPU (an error if they cannot run)."""
    cells = _triton_cells()
    if cells is None:
        raise RuntimeError(f"the fused gate kernels need Triton for {t.device.type} tensors (see fused.supports)")
    return cells


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def lstm_gates(pre: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: ``pre`` (T, B, 4H) contiguous becomes ``[i, f, g, o]``. Returns ``c``,
    ``tanh(c)`` and ``o (1 - tanh² c)``, each (T, B, H)."""
    if pre.device.type != "cpu":
        return _gpu(pre).lstm_gates(pre, c0)
    T, B, H4 = pre.shape
    H = H4 // 4
    assert pre.is_contiguous()
    c0 = _c(c0)
    c, tc, gain = (workspace.empty((T, B, H), pre) for _ in range(3))
    fn = _FN[("lstm_gates", pre.dtype)]
    run_parallel(fn, [T, B, H, addr(pre), addr(c0), addr(c), addr(tc), addr(gain)], B, T * B * H4)
    return c, tc, gain


def lstm_dpre(dc: torch.Tensor, m: torch.Tensor, gates: torch.Tensor, c: torch.Tensor, c0: torch.Tensor, tanh_c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient on the gate pre-activations (T, B, 4H) from ``dc`` and the gradient ``m``
    on ``o ⊙ tanh(c)``; ``c_{t-1}`` is read from ``c`` and ``c0``. Written into ``out``
    (contiguous, like ``gates``, overlapping no input) when given."""
    if gates.device.type != "cpu":
        return _gpu(gates).lstm_dpre(dc, m, gates, c, c0, tanh_c, out=out)
    T, B, H4 = gates.shape
    H = H4 // 4
    dc, m, c0 = _c(dc), _c(m), _c(c0)
    if out is None:
        out = workspace.empty(gates.shape, gates)
    assert out.shape == gates.shape and out.dtype == gates.dtype and out.is_contiguous()
    fn = _FN[("lstm_dpre", gates.dtype)]
    args = [B, H, addr(dc), addr(m), addr(gates), addr(c), addr(c0), addr(tanh_c), addr(out)]
    run_parallel(fn, args, T * B, T * B * H4)
    return out


def gru_gates(gi: torch.Tensor, gh: torch.Tensor) -> None:
    """In place: ``gi`` (T, B, 3H) becomes ``[r, z, n]``; ``gh`` is read (``gh_n`` stays)."""
    if gi.device.type != "cpu":
        return _gpu(gi).gru_gates(gi, gh)
    T, B, H3 = gi.shape
    assert gi.is_contiguous() and gh.is_contiguous()
    fn = _FN[("gru_gates", gi.dtype)]
    run_parallel(fn, [H3 // 3, addr(gi), addr(gh)], T * B, T * B * H3)


def gru_dgates(lam: torch.Tensor, gates: torch.Tensor, gh: torch.Tensor, h0: torch.Tensor, y: torch.Tensor, with_input: bool, out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(dgi, dgh)`` (T, B, 3H) for the cotangent ``lam`` (T, B, H) on the outputs;
    ``h_{t-1}`` is read from ``h0`` and ``y``. ``dgi`` only when ``with_input``. ``dgh`` is
    written into ``out`` (contiguous, like ``gates``, overlapping no input) when given."""
    if gates.device.type != "cpu":
        return _gpu(gates).gru_dgates(lam, gates, gh, h0, y, with_input, out=out)
    T, B, H3 = gates.shape
    lam, h0, y = _c(lam), _c(h0), _c(y)
    if out is None:
        out = workspace.empty(gates.shape, gates)
    assert out.shape == gates.shape and out.dtype == gates.dtype and out.is_contiguous()
    dgh = out
    dgi = workspace.empty(gates.shape, gates) if with_input else None
    fn = _FN[("gru_dgates", gates.dtype)]
    args = [B, H3 // 3, addr(lam), addr(gates), addr(gh), addr(h0), addr(y), addr(dgh), addr(dgi)]
    run_parallel(fn, args, T * B, T * B * H3)
    return dgi, dgh
