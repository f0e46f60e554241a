"""Forwards that keep what the backward needs: the CPU analogue of cuDNN's reserve space.

The recompute path (``lstm_math.FastLSTMTape``, ``gru_math.FastGRUTape``) runs the
framework's fused kernel with no graph, then rebuilds every gate in the backward with
two large matmuls over the ``T·B`` rows and one gate pass. The forwards here instead run
the recurrence themselves and write the gates as they go, so the backward starts from
them:

LSTM (gate order i, f, g, o; no ``proj_size``)::

    pre_t = W_ih x_t + b_ih + b_hh                  (one matmul over all T·B rows, gemm.linear_t)
    pre_t += W_hh h_{t-1}                           (one BLAS gemm per step)
    [i, f, g, o]_t = [σ, σ, tanh, σ](pre_t)          (in place)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t,   h_t = o_t ⊙ tanh(c_t)

GRU (gate order r, z, n)::

    gi_t = W_ih x_t + b_ih                          (one matmul over all T·B rows, gemm.linear_t)
    gh_t = W_hh h_{t-1} + b_hh                      (one BLAS gemm per step)
    r, z = σ(gi_{r,z} + gh_{r,z}),  n = tanh(gi_n + r ⊙ gh_n)   (in place in gi)
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

The per-step gate arithmetic is the fused kernels' own row functions
(``hwbptt.torch.fused``), compiled into this library together with the time loop; the
per-step product calls the BLAS ``sgemm_``/``dgemm_`` that PyTorch's CPU library exports
(MKL on x86), so no step returns to Python. Where that symbol is missing (another BLAS
build) or no C compiler is found, ``available()`` is false and the layers use the
recompute path, which gives the same gradients.

Which path is faster was measured, not assumed (``docs/performance.md``); ``use(False)``
switches this path off for comparisons (``tests/test_fast_paths.py`` checks that both give
the same states and gradients; ``python -m hwbptt bench`` times both in the same run).

References: the framework's fused forward (``torch._VF.lstm``/``gru``) for the states and
``LSTMTape``/``GRUTape`` (eager torch) for the gates.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

from hwbptt.kernels.cbuild import addr, load, run_parallel, switch, task

from . import fused, gemm, workspace

__all__ = ["available", "enabled", "use", "supports", "lstm_forward", "gru_forward", "lstm_adjoint", "gru_adjoint"]

_LOOPS = r"""
#include <stdint.h>
typedef void (*gemm_t_f32)(const char*, const char*, const int*, const int*, const int*, const float*,
                           const float*, const int*, const float*, const int*, const float*, float*, const int*);
typedef void (*gemm_t_f64)(const char*, const char*, const int*, const int*, const int*, const double*,
                           const double*, const int*, const double*, const int*, const double*, double*, const int*);
/* Row-major out (B x N) += h (B x K) @ W^T with W (N x K) row-major, through a column-major
   BLAS: out^T = W^T' h^T, i.e. gemm("T", "N", N, B, K, W, K, h, K, out, N). */
#define LOOPS(SUF, T_)                                                                        \
static void step_gemm_##SUF(void* gemm_p, long B, long N, long K, const T_* w, const T_* h,    \
                            T_* out) {                                                        \
  int m = (int)N, n = (int)B, k = (int)K; T_ one = (T_)1;                                     \
  ((gemm_t_##SUF)gemm_p)("T", "N", &m, &n, &k, &one, w, &k, h, &k, &one, out, &m);           \
}                                                                                             \
void lstm_forward_##SUF(void* gemm_p, long T, long B, long H, long b_lo, long b_hi, T_* pre,  \
                        const T_* w_hh, const T_* h0, const T_* c0, T_* y, T_* c, T_* tc,     \
                        T_* gain) {                                                           \
  for (long t = 0; t < T; ++t) {                                                              \
    T_* p = pre + t * B * 4 * H;                                                              \
    step_gemm_##SUF(gemm_p, b_hi - b_lo, 4 * H, H, w_hh,                                      \
                    (t ? y + (t - 1) * B * H : h0) + b_lo * H, p + b_lo * 4 * H);             \
    for (long b = b_lo; b < b_hi; ++b) {                                                      \
      T_* q = p + b * 4 * H;                                                                  \
      long r = (t * B + b) * H;                                                               \
      lstm_gates_row_##SUF(H, q, q + H, q + 2 * H, q + 3 * H,                                 \
                           t ? c + r - B * H : c0 + b * H, c + r, tc + r, gain + r);          \
      for (long h = 0; h < H; ++h) y[r + h] = q[3 * H + h] * tc[r + h];                       \
    }                                                                                         \
  }                                                                                           \
}                                                                                             \
void gru_forward_##SUF(void* gemm_p, long T, long B, long H, long b_lo, long b_hi, T_* gi,    \
                       T_* gh, const T_* w_hh, const T_* b_hh, const T_* h0, T_* y) {         \
  for (long t = 0; t < T; ++t) {                                                              \
    T_* a = gi + t * B * 3 * H;                                                               \
    T_* g = gh + t * B * 3 * H;                                                               \
    for (long b = b_lo; b < b_hi; ++b)                                                        \
      for (long j = 0; j < 3 * H; ++j) g[b * 3 * H + j] = b_hh ? b_hh[j] : (T_)0;             \
    const T_* hp = t ? y + (t - 1) * B * H : h0;                                              \
    step_gemm_##SUF(gemm_p, b_hi - b_lo, 3 * H, H, w_hh, hp + b_lo * H, g + b_lo * 3 * H);   \
    for (long b = b_lo; b < b_hi; ++b) {                                                      \
      T_* q = a + b * 3 * H;                                                                  \
      const T_* e = g + b * 3 * H;                                                            \
      gru_gates_row_##SUF(H, q, q + H, q + 2 * H, e, e + H, e + 2 * H);                       \
      T_* yy = y + (t * B + b) * H;                                                           \
      const T_* hh = hp + b * H;                                                              \
      for (long h = 0; h < H; ++h) yy[h] = ((T_)1 - q[H + h]) * q[2 * H + h] + q[H + h] * hh[h]; \
    }                                                                                         \
  }                                                                                           \
}                                                                                             \
/* The GRU's exact adjoint, BPTT's order, from the kept gates: w_t = lh_t + carry_t with      \
   carry_{t-1} = dgh_t(w_t) W_hh + w_t ⊙ z_t, and (dgi_t, dgh_t) for w_t written as it goes. \
   w_hh_t is W_hh^T (H x 3H) row-major, so that the step product is step_gemm's form. */     \
void gru_adjoint_##SUF(void* gemm_p, long T, long B, long H, long b_lo, long b_hi,             \
                       const T_* gates, const T_* gh, const T_* w_hh_t, const T_* h0,         \
                       const T_* y, const T_* lh, T_* w, T_* dgi, T_* dgh) {                  \
  long n = b_hi - b_lo;                                                                       \
  for (long t = T - 1; t >= 0; --t) {                                                         \
    T_* wt = w + t * B * H;                                                                   \
    const T_* lt = lh + t * B * H;                                                            \
    for (long r = b_lo * H; r < b_hi * H; ++r) wt[r] = t == T - 1 ? lt[r] : wt[r] + lt[r];    \
    for (long b = b_lo; b < b_hi; ++b) {                                                      \
      long row = t * B + b;                                                                   \
      const T_* g = gates + row * 3 * H;                                                      \
      const T_* hp = t ? y + (row - B) * H : h0 + b * H;                                      \
      T_* d = dgh + row * 3 * H;                                                              \
      T_* e = dgi + row * 3 * H;                                                              \
      gru_dgates_row_##SUF(H, wt + b * H, g, g + H, g + 2 * H, gh + row * 3 * H + 2 * H, hp,  \
                           d, d + H, d + 2 * H, e, e + H, e + 2 * H);                         \
    }                                                                                         \
    if (t == 0) break;                                                                        \
    T_* wp = w + (t - 1) * B * H;                                                             \
    for (long b = b_lo; b < b_hi; ++b)                                                        \
      for (long h = 0; h < H; ++h)                                                            \
        wp[b * H + h] = wt[b * H + h] * gates[(t * B + b) * 3 * H + H + h];                   \
    step_gemm_##SUF(gemm_p, n, H, 3 * H, w_hh_t, dgh + (t * B + b_lo) * 3 * H, wp + b_lo * H); \
  }                                                                                           \
}                                                                                             \
/* The LSTM's exact adjoint (no projection), BPTT's order, from the kept gates: with          \
   wh_t = lh_t + dpre_{t+1} W_hh and dc_t = lc_t + wh_t ⊙ gain_t + f_{t+1} ⊙ dc_{t+1}, writes \
   wh, dc and dpre_t = lstm_dpre(dc_t, wh_t) for every step. w_hh_t is W_hh^T (H x 4H).      \
   The step product is added onto wh_{t-1} = lh_{t-1}, set first. */                         \
void lstm_adjoint_##SUF(void* gemm_p, long T, long B, long H, long b_lo, long b_hi,            \
                        const T_* gates, const T_* c, const T_* c0, const T_* tc,             \
                        const T_* gain, const T_* w_hh_t, const T_* lh, const T_* lc,         \
                        T_* wh, T_* dc, T_* dpre) {                                           \
  long n = b_hi - b_lo;                                                                       \
  for (long r = b_lo * H; r < b_hi * H; ++r) wh[(T - 1) * B * H + r] = lh[(T - 1) * B * H + r]; \
  for (long t = T - 1; t >= 0; --t) {                                                         \
    for (long b = b_lo; b < b_hi; ++b) {                                                      \
      long row = t * B + b, r = row * H;                                                      \
      const T_* g = gates + row * 4 * H;                                                      \
      for (long h = 0; h < H; ++h) {                                                          \
        T_ d = lc[r + h] + wh[r + h] * gain[r + h];                                           \
        if (t < T - 1) d += gates[(row + B) * 4 * H + H + h] * dc[r + B * H + h];             \
        dc[r + h] = d;                                                                        \
      }                                                                                       \
      T_* o = dpre + row * 4 * H;                                                             \
      lstm_dpre_row_##SUF(H, dc + r, wh + r, g, g + H, g + 2 * H, g + 3 * H,                  \
                          t ? c + r - B * H : c0 + b * H, tc + r, o, o + H, o + 2 * H, o + 3 * H); \
    }                                                                                         \
    if (t == 0) break;                                                                        \
    T_* wp = wh + (t - 1) * B * H;                                                            \
    const T_* lp = lh + (t - 1) * B * H;                                                      \
    for (long r = b_lo * H; r < b_hi * H; ++r) wp[r] = lp[r];                                 \
    step_gemm_##SUF(gemm_p, n, H, 4 * H, w_hh_t, dpre + (t * B + b_lo) * 4 * H, wp + b_lo * H); \
  }                                                                                           \
}                                                                                             \
/* The tasks for cbuild.run_parallel: batch rows [lo, hi) through every step (the rows of    \
   a batch never meet); p holds the other arguments in order, pointers as integers. */       \
void lstm_forward_task_##SUF(long lo, long hi, const int64_t* p) {                            \
  lstm_forward_##SUF((void*)p[0], p[1], p[2], p[3], lo, hi, (T_*)p[4], (const T_*)p[5],        \
                     (const T_*)p[6], (const T_*)p[7], (T_*)p[8], (T_*)p[9], (T_*)p[10],       \
                     (T_*)p[11]);                                                             \
}                                                                                             \
void gru_forward_task_##SUF(long lo, long hi, const int64_t* p) {                             \
  gru_forward_##SUF((void*)p[0], p[1], p[2], p[3], lo, hi, (T_*)p[4], (T_*)p[5],               \
                    (const T_*)p[6], (const T_*)p[7], (const T_*)p[8], (T_*)p[9]);            \
}                                                                                             \
void lstm_adjoint_task_##SUF(long lo, long hi, const int64_t* p) {                            \
  lstm_adjoint_##SUF((void*)p[0], p[1], p[2], p[3], lo, hi, (const T_*)p[4], (const T_*)p[5],  \
                     (const T_*)p[6], (const T_*)p[7], (const T_*)p[8], (const T_*)p[9],      \
                     (const T_*)p[10], (const T_*)p[11], (T_*)p[12], (T_*)p[13], (T_*)p[14]); \
}                                                                                             \
void gru_adjoint_task_##SUF(long lo, long hi, const int64_t* p) {                             \
  gru_adjoint_##SUF((void*)p[0], p[1], p[2], p[3], lo, hi, (const T_*)p[4], (const T_*)p[5],   \
                    (const T_*)p[6], (const T_*)p[7], (const T_*)p[8], (const T_*)p[9],       \
                    (T_*)p[10], (T_*)p[11], (T_*)p[12]);                                      \
}
LOOPS(f32, float)
LOOPS(f64, double)
"""

_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_GEMM = {torch.float32: "sgemm_", torch.float64: "dgemm_"}
_FN: dict[tuple[str, torch.dtype], object] = {}
_gemm: dict[torch.dtype, int] = {}
_state = {"enabled": True, "checked": False, "ok": False}


def _blas() -> dict[torch.dtype, int]:
    """Addresses of PyTorch's exported BLAS gemm functions, or ``{}``."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return {dt: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for dt, name in _GEMM.items()}
    except (OSError, AttributeError):
        return {}


def available() -> bool:
    """Whether the reserve forwards were built and PyTorch exports a BLAS gemm."""
    if not _state["checked"]:
        _state["checked"] = True
        lib = load("torch_rnn_reserve", fused._SOURCE + _LOOPS) if fused.available() else None
        _gemm.update(_blas() if lib is not None else {})
        if lib is not None and len(_gemm) == len(_GEMM):
            for dtype, suf in _DTYPES.items():
                _FN[("lstm", dtype)] = task(lib, f"lstm_forward_task_{suf}")
                _FN[("gru", dtype)] = task(lib, f"gru_forward_task_{suf}")
                _FN[("gru_adjoint", dtype)] = task(lib, f"gru_adjoint_task_{suf}")
                _FN[("lstm_adjoint", dtype)] = task(lib, f"lstm_adjoint_task_{suf}")
            _state["ok"] = True
    return _state["ok"]


def enabled() -> bool:
    return _state["enabled"]


def use(on: bool) -> contextlib.AbstractContextManager[None]:
    """Switch the reserve forwards on or off within a block (for comparisons)."""
    return switch(_state, on, "use")


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the reserve forward takes these tensors: those the fused CPU kernels take
    (``fused.supports``), sizes that fit the BLAS's 32-bit integers, no CPU autocast, switched
    on and built."""
    if not (_state["enabled"] and fused.supports(*tensors)) or tensors[0].device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):  # the fused kernel runs in the autocast dtype, as the parent's does
        return False
    if any(t.numel() >= 2**31 for t in tensors):
        return False
    return available()


def _input_projection(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``W_ih x_t + bias`` for every step, in a (T+1, B, G) buffer whose row ``T`` is zero.

    ``torch.addmm`` into the buffer where it comes from the workspace (memory already touched:
    measured 28 ms against oneDNN's 43 ms into a fresh 64 MB tensor for (32800, 128) @
    (128, 512) on 2 cores); else ``gemm.linear_t`` (oneDNN where it runs) on ``x`` padded with
    one step, since that GEMM cannot write into a given buffer and copying ``x`` is cheaper
    than copying the G-wide result."""
    T, B, I = x.shape
    G = w_ih.shape[0]
    if T * B > 0 and not workspace.pools((T + 1, B, G), x) and gemm.backend(x[0], w_ih) == "onednn":
        x_pad = workspace.empty((T + 1, B, I), x)
        x_pad[:T].copy_(x)
        x_pad[T].zero_()
        buf = gemm.linear_t(x_pad.view(-1, I), w_ih, bias).view(T + 1, B, G)
    else:
        buf = workspace.empty((T + 1, B, G), x)
        x2 = x.reshape(T * B, I)
        if bias is not None:
            torch.addmm(bias, x2, w_ih.t(), out=buf[:T].view(T * B, G))
        else:
            torch.mm(x2, w_ih.t(), out=buf[:T].view(T * B, G))
    buf[T].zero_()
    return buf


def lstm_forward(
    x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(buf, y, c, tanh_c, gain)`` for ``x`` (T, B, I), ``h0``/``c0`` (B, H).

    ``buf`` is (T+1, B, 4H): rows ``0..T-1`` the gates ``[i, f, g, o]``, row ``T`` zeros (so
    that ``f_{t+1}`` is a view); ``y`` the hidden states, ``c`` the cell states, ``tanh_c``
    and ``gain = o (1 - tanh² c)``, each (T, B, H). ``bias`` is ``b_ih + b_hh`` or ``None``."""
    T, B = x.shape[:2]
    H = w_hh.shape[1]
    buf = _input_projection(x, w_ih, bias)
    pre = buf[:T].view(T * B, 4 * H)
    y = x.new_empty((T, B, H))
    c, tanh_c, gain = (workspace.empty((T, B, H), x) for _ in range(3))
    w_hh, h0, c0 = w_hh.contiguous(), h0.contiguous(), c0.contiguous()
    args = [_gemm[x.dtype], T, B, H, addr(pre), addr(w_hh), addr(h0), addr(c0), addr(y), addr(c), addr(tanh_c), addr(gain)]
    run_parallel(_FN[("lstm", x.dtype)], args, B, T * B * 4 * H, openmp_only=True)
    return buf, y, c, tanh_c, gain


def gru_forward(
    x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(buf, gh, y)`` for ``x`` (T, B, I), ``h0`` (B, H).

    ``buf`` is (T+1, B, 3H): rows ``0..T-1`` the gates ``[r, z, n]``, row ``T`` zeros (so
    that ``z_{t+1}`` is a view); ``gh`` (T, B, 3H) is ``W_hh h_{t-1} + b_hh`` (the backward
    reads its ``n`` part); ``y`` (T, B, H) the hidden states."""
    T, B = x.shape[:2]
    H = w_hh.shape[1]
    buf = _input_projection(x, w_ih, b_ih)
    gi = buf[:T].view(T * B, 3 * H)
    gh, y = workspace.empty((T, B, 3 * H), x), x.new_empty((T, B, H))
    w_hh, h0 = w_hh.contiguous(), h0.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    args = [_gemm[x.dtype], T, B, H, addr(gi), addr(gh), addr(w_hh), addr(b_hh), addr(h0), addr(y)]
    run_parallel(_FN[("gru", x.dtype)], args, B, T * B * 3 * H, openmp_only=True)
    return buf, gh, y


def lstm_adjoint(
    gates: torch.Tensor, c: torch.Tensor, c0: torch.Tensor, tanh_c: torch.Tensor, gain: torch.Tensor,
    w_hh: torch.Tensor, lh: torch.Tensor, lc: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LSTM's exact adjoint in BPTT's order (no ``proj_size``), as one C time loop:
    ``(dc, wh, dpre)``.

    ``gates`` (T, B, 4H) ``[i, f, g, o]``, ``c``, ``tanh_c`` and ``gain = o (1 - tanh² c)``
    (T, B, H) as ``lstm_forward`` kept them; ``lh``, ``lc`` (T, B, H) the local gradients
    on ``h_t`` and ``c_t``. ``wh_t = ℓh_t + dpre_{t+1} W_hh`` (one BLAS gemm per step),
    ``dc_t = ℓc_t + wh_t ⊙ gain_t + f_{t+1} ⊙ dc_{t+1}`` and ``dpre_t`` (T, B, 4H), the
    gradient on the gate pre-activations. Reference: ``LSTMTape.exact_adjoint``."""
    T, B, H4 = gates.shape
    H = H4 // 4
    lh, lc = lh.contiguous(), lc.contiguous()
    wh, dc = workspace.empty((T, B, H), lh), workspace.empty((T, B, H), lh)
    dpre = workspace.empty((T, B, H4), lh)
    w_hh_t = w_hh.t().contiguous()
    args = [_gemm[lh.dtype], T, B, H, addr(gates), addr(c), addr(c0), addr(tanh_c), addr(gain), addr(w_hh_t),
            addr(lh), addr(lc), addr(wh), addr(dc), addr(dpre)]
    run_parallel(_FN[("lstm_adjoint", lh.dtype)], args, B, T * B * H4, openmp_only=True)
    return dc, wh, dpre


def gru_adjoint(
    gates: torch.Tensor, gh: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, y: torch.Tensor, lh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRU's exact adjoint in BPTT's order, as one C time loop: ``(w, dgi, dgh)``.

    ``gates`` (T, B, 3H) ``[r, z, n]`` and ``gh`` (T, B, 3H) as ``gru_forward`` kept them,
    ``y`` (T, B, H) the outputs, ``lh`` (T, B, H) the upstream gradient. ``w_t = ℓ_t +
    dgh_{t+1} W_hh + w_{t+1} ⊙ z_{t+1}`` (one BLAS gemm per step) and ``(dgi_t, dgh_t)``,
    the gradients on the input and hidden pre-activations for ``w_t``, each (T, B, 3H).
    Reference: ``GRUTape.exact_adjoint`` and ``GRUTape.gate_grads``."""
    T, B, H3 = gates.shape
    H = H3 // 3
    lh = lh.contiguous()
    w = workspace.empty((T, B, H), lh)
    dgi, dgh = workspace.empty((T, B, H3), lh), workspace.empty((T, B, H3), lh)
    w_hh_t = w_hh.t().contiguous()
    args = [_gemm[lh.dtype], T, B, H, addr(gates), addr(gh), addr(w_hh_t), addr(h0), addr(y), addr(lh),
            addr(w), addr(dgi), addr(dgh)]
    run_parallel(_FN[("gru_adjoint", lh.dtype)], args, B, T * B * H3, openmp_only=True)
    return w, dgi, dgh
