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

The per-step gate arithmetic is the fused kernels' own row functions, compiled into the
same operators as the time loop (``adapters/torch/csrc/loops.cpp``); the per-step product
calls the BLAS ``sgemm_``/``dgemm_`` that PyTorch's CPU library exports (MKL on x86), so
no step returns to Python. Where that symbol is missing (another BLAS build) or no
kernels were built at install, ``available()`` is false and the layers use the recompute
path, which gives the same gradients.

Which path is faster was measured, not assumed (``docs/performance.md``); ``use(False)``
switches this path off for comparisons (``tests/test_fast_paths.py`` checks that both give
the same states and gradients; ``python -m hwbptt bench`` times both in the same run).

References: the framework's fused forward (``torch._VF.lstm``/``gru``) for the states and
``LSTMTape``/``GRUTape`` (eager torch) for the gates.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import fused, gemm, native, workspace
from .dispatch import switch

__all__ = ["available", "enabled", "use", "supports", "lstm_forward", "gru_forward", "lstm_adjoint", "lstm_highway1", "gru_adjoint"]

_state = {"enabled": True}


def available() -> bool:
    """Whether the compiled kernels are loaded and PyTorch's CPU library exports the BLAS
    gemm their time loops call."""
    ops = native.ops()
    return ops is not None and bool(ops.has_blas())


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


# glibc serves allocations up to its largest mmap threshold (32 MiB) from reused memory.
_FRESH_BYTES = 32 << 20


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def step_product(mode: str):
    """Context manager: the time loops' per-step product on ``"blas"`` (PyTorch's BLAS),
    ``"own"`` (the compiled register-blocked kernel) or ``"auto"`` (by size, the default);
    for comparisons in tests and the benchmark."""
    codes = {"auto": 0, "blas": 1, "own": 2}
    if mode not in codes:
        raise ValueError(f"step_product(mode): mode must be one of {sorted(codes)}, got mode={mode!r}")
    return _StepProduct(codes[mode])


class _StepProduct:
    def __init__(self, code: int) -> None:
        self.code, self.before = code, None

    def __enter__(self) -> None:
        self.before = int(native.ops().step_gemm_mode(self.code))

    def __exit__(self, *exc) -> None:
        native.ops().step_gemm_mode(self.before)


def _input_projection(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``W_ih x_t + bias`` for every step, in a (T+1, B, G) buffer whose row ``T`` is zero.

    ``gemm.linear_t`` (oneDNN where it runs) on ``x`` padded with one step (that GEMM cannot
    write into a given buffer, and copying ``x`` is cheaper than copying the G-wide result),
    except for a narrow input (``I < 256``) into a buffer of over 32 MiB: there ``torch.addmm``
    into the workspace buffer, whose memory is already touched, measured faster (28 ms
    against oneDNN's 43 ms into a fresh 64 MB tensor for (32800, 128) @ (128, 512) on 2
    cores). Smaller fresh tensors come from the allocator's free lists without page faults,
    and there oneDNN measured 1.3-2x MKL's addmm (docs/performance.md)."""
    T, B, I = x.shape
    G = w_ih.shape[0]
    big = (T + 1) * B * G * x.element_size() > _FRESH_BYTES and I < 256
    if T * B > 0 and not (big and workspace.pools((T + 1, B, G), x)) and gemm.backend(x[0], w_ih) == "onednn":
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
    y = x.new_empty((T, B, H))
    c, tanh_c, gain = (workspace.empty((T, B, H), x) for _ in range(3))
    w_hh, h0, c0 = w_hh.contiguous(), h0.contiguous(), c0.contiguous()
    native.ops().lstm_forward_(buf[:T], w_hh, w_hh.t().contiguous(), h0, c0, y, c, tanh_c, gain)
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
    gh, y = workspace.empty((T, B, 3 * H), x), x.new_empty((T, B, H))
    w_hh, h0 = w_hh.contiguous(), h0.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    native.ops().gru_forward_(buf[:T], gh, w_hh, w_hh.t().contiguous(), b_hh, h0, y)
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
    native.ops().lstm_adjoint_out(_c(gates), _c(c), _c(c0), _c(tanh_c), _c(gain), _c(w_hh), w_hh_t, lh, lc, wh, dc, dpre)
    return dc, wh, dpre


def lstm_highway1(
    gates: torch.Tensor, c: torch.Tensor, c0: torch.Tensor, tanh_c: torch.Tensor, gain: torch.Tensor,
    w_hh: torch.Tensor, lh: torch.Tensor, lc: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, float, float]]:
    """One Highway-BP iteration of the LSTM's ``"gates"`` split (``k = 1``, ``γ = 0``, no
    ``proj_size``) as one C time loop: ``(dc, wh, dpre, (||u⁰||, ||u¹ - u⁰||, ||u¹||))``.

    The same estimate as the batched iteration (``LSTMTape._iterate``), computed step by
    step in BPTT's order while each step's rows are in cache::

        u⁰_t = ℓc_t + ℓh_t ⊙ gain_t + f_{t+1} ⊙ u⁰_{t+1}
        q_t = lstm_dpre(u⁰_{t+1}, ℓh_{t+1}) W_hh    (0 at the last step),   wh_t = ℓh_t + q_t
        dc_t = u¹_t = ℓc_t + ℓh_t ⊙ gain_t + q_t ⊙ gain_t + f_{t+1} ⊙ u¹_{t+1}

    and ``dpre_t = lstm_dpre(dc_t, wh_t)`` for the batched VJP of the inputs and weights.
    Arguments as ``lstm_adjoint``'s; the three norms are the engine's (``highway_adjoint``),
    summed in float64 in row order. Reference: ``LSTMTape._iterate`` with one iteration."""
    T, B, H4 = gates.shape
    H = H4 // 4
    lh, lc = lh.contiguous(), lc.contiguous()
    wh, dc = workspace.empty((T, B, H), lh), workspace.empty((T, B, H), lh)
    dpre = workspace.empty((T, B, H4), lh)
    sums = torch.empty(3, dtype=torch.float64)
    native.ops().lstm_highway1_out(_c(gates), _c(c), _c(c0), _c(tanh_c), _c(gain), _c(w_hh), w_hh.t().contiguous(),
                                   lh, lc, wh, dc, dpre, sums)
    s0, s01, s1 = (math.sqrt(v) for v in sums.tolist())
    return dc, wh, dpre, (s0, s01, s1)


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
    native.ops().gru_adjoint_out(_c(gates), _c(gh), _c(w_hh), w_hh_t, _c(h0), _c(y), lh, w, dgi, dgh)
    return w, dgi, dgh
