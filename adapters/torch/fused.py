"""Fused CPU kernels for the LSTM and GRU tapes (the fast paths of ``lstm_math`` and
``gru_math``), each the one-pass twin of an eager torch expression kept beside it.

Eager torch spends most of the backward's non-matmul time on a dozen elementwise ops
per expression, each a pass over a (T, B, 4H) tensor. The compiled operators
(``adapters/torch/csrc``, loaded by ``hwbptt.torch.native``) do each expression in one
pass, vectorised with ATen's IEEE-correct ``exp``/``tanh`` (no fast-math: gates saturate
to 0 and 1 over the whole float range, NaN in gives NaN out) and split over PyTorch's
intra-op threads:

- ``lstm_gates``: pre-activations -> the four gates in place, and the cell-state
  recurrence ``c_t = f_t c_{t-1} + i_t g_t`` fused in (sequential over time, per lane),
  with ``tanh(c_t)`` and the readout gain ``o_t (1 - tanh² c_t)``;
- ``lstm_dpre``: ``dpre = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g²), m tanh(c) o(1-o)]``;
- ``gru_gates``: ``r, z = σ(gi + gh)``, ``n = tanh(gi_n + r gh_n)``, in place in ``gi``;
- ``gru_dgates``: ``(dgi, dgh)`` for a cotangent on the outputs.

References: ``LSTMTape``/``GRUTape`` (eager torch); ``tests/test_fast_paths.py`` compares
the fast tapes against them. Built at install; where no build could be made or loaded
``available()`` is false and the tapes use their eager path (``hwbptt.torch.kernels_status()``
says so).

CUDA tensors (float32, float16, bfloat16) go to the Triton twins of these four functions
in ``hwbptt.torch.triton_cells`` (same arguments, outputs and ``out=`` contracts), imported
at the first CUDA call, never at import; without Triton, ``supports`` is false for CUDA
tensors and the tapes use their eager path there.
"""

from __future__ import annotations

import torch

from . import native, workspace

__all__ = ["available", "supports", "lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates"]

_NAMES = {torch.float32: "f32", torch.float64: "f64"}


def available() -> bool:
    return native.ops() is not None


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can take these tensors (one dtype, no autograd graph
    wanted): CPU float32/float64 when the compiled kernels are loaded, or CUDA float32/float16/
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
    native.ops().lstm_gates_(pre, c0, c, tc, gain)
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
    native.ops().lstm_dpre_out(dc, m, gates, _c(c), c0, _c(tanh_c), out)
    return out


def gru_gates(gi: torch.Tensor, gh: torch.Tensor) -> None:
    """In place: ``gi`` (T, B, 3H) becomes ``[r, z, n]``; ``gh`` is read (``gh_n`` stays)."""
    if gi.device.type != "cpu":
        return _gpu(gi).gru_gates(gi, gh)
    T, B, H3 = gi.shape
    assert gi.is_contiguous() and gh.is_contiguous()
    native.ops().gru_gates_(gi, gh)


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
    native.ops().gru_dgates_out(lam, _c(gates), _c(gh), h0, y, dgh, dgi)
    return dgi, dgh
