"""Which implementation runs: decided here, once per layer call, and read by the layers,
the benchmark's header and ``kernels_status()``.

A ``Plan`` names, for one layer call (cell, device, dtype, mode), the forward and the
backward that run and the kernels beneath them. The rules, in order:

- ``backward="parent"``: nothing needs a gradient, an empty input, or exact mode where
  the fast exact path does not take the tensors (CUDA, ``proj_size``, float16/bfloat16,
  CPU autocast, kernels not built, ``torch.jit.trace``): the parent's forward and autograd.
- ``backward="exact-adjoint"``: exact mode on the CPU with the compiled kernels
  (float32/float64, no ``proj_size``): BPTT's adjoint as one compiled time loop on the
  gates the forward kept. For the LSTM only where ``H <= 256``: wider, oneDNN's fused LSTM
  (the parent's exact gradient) measured faster on a 2-core Intel Xeon (ours 0.81-0.92x at
  H = 512, T = 128-2048, B = 8-64; 1.02-1.86x at H = 64 and 1.04-1.29x at H = 256,
  docs/performance.md). ATen's CPU GRU is a per-step operator loop, which the GRU's exact
  adjoint beats at every measured size.
- ``backward="highway"``: Highway-BP, with ``forward="reserve"`` (a compiled forward
  that keeps the gates) where the kernels take the tensors, else ``forward="fused"``
  (the framework's fused kernel, the gates rebuilt in the backward).
- ``kernels``: ``"compiled C++ (LEVEL)"`` on the CPU with the build loaded, ``"triton"``
  for CUDA tensors when Triton runs, else ``"eager torch"``.

Every path computes the gradient its mode promises (exact, or Highway-BP's estimate):
the choice changes speed, never the algorithm. The on/off switches of the fast paths
(for comparisons in tests and the benchmark) are the ``switch`` context managers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["Plan", "plan", "exact_adjoint_pays", "highway_loop_pays", "switch", "kernels_status", "EXACT_LSTM_MAX_H", "LOOP_MAX_H"]

# The LSTM's exact adjoint runs up to this width (module docstring).
EXACT_LSTM_MAX_H = 256
# The LSTM's k = 1 runs as one time loop up to this width (``highway_loop_pays``).
LOOP_MAX_H = 256


@contextlib.contextmanager
def switch(state: dict, on: bool, what: str) -> Iterator[None]:
    """Set ``state["enabled"]`` to ``on`` within a block and restore it after: the
    on/off switches of the fast paths (for comparisons). ``what`` names the caller in the
    error for a non-bool ``on``."""
    if not isinstance(on, bool):
        raise TypeError(f"{what}(on) takes a bool, got on={on!r}")
    before = state["enabled"]
    state["enabled"] = on
    try:
        yield
    finally:
        state["enabled"] = before


@dataclass(frozen=True)
class Plan:
    """What runs for one layer call (module docstring)."""

    cell: str  # "lstm" | "gru"
    device: str
    dtype: torch.dtype
    forward: str  # "reserve" | "fused" | "parent"
    backward: str  # "highway" | "exact-adjoint" | "parent"
    kernels: str  # "compiled C++ (AVX512)" | "triton" | "eager torch"


def _kernels(device: torch.device) -> str:
    from . import fused, native

    if device.type == "cpu":
        st = native.status()
        return f"compiled C++ ({st['build'].upper()})" if st["build"] != "none" else "eager torch"
    if device.type == "cuda" and fused._triton_cells() is not None:
        return "triton"
    return "eager torch"


def exact_adjoint_pays(cell: str, T: int, H: int) -> bool:
    """Whether exact mode's compiled adjoint beats the parent's exact BPTT at ``T`` steps of
    width ``H`` (module docstring): always for the GRU, up to ``H = 256`` for the LSTM.
    The layers (``layer.lstm_layer``, ``rnn``) and ``plan`` all ask here."""
    del T  # measured independent of the length (module docstring)
    return cell == "gru" or H <= EXACT_LSTM_MAX_H


def highway_loop_pays(cell: str, H: int) -> bool:
    """Whether one Highway iteration (``k = 1``) runs faster as a compiled time loop
    (``reserve.lstm_highway1``, the same estimate step by step in BPTT's order) than as the
    batched iteration (one product over all ``T·B`` rows and a few passes over the whole
    sequence), for a layer of width ``H``: the LSTM at ``H <= 256`` (docs/performance.md)."""
    return cell == "lstm" and H <= LOOP_MAX_H


def plan(cell: str, tensors: tuple[torch.Tensor, ...], *, exact: bool, has_proj: bool, wants_grad: bool) -> Plan:
    """The plan for one layer and direction. ``tensors``: the time-major input (T, B, I),
    ``h0`` (B, H), then the LSTM's ``c0`` and the weights."""
    from . import reserve

    x = tensors[0]
    kernels = _kernels(x.device)
    if not wants_grad or x.numel() == 0:
        return Plan(cell, x.device.type, x.dtype, "parent", "parent", kernels)
    with torch.no_grad():  # the kernels' own test declines tensors that want a graph
        keeps_gates = not has_proj and reserve.supports(*tensors)
    if exact:
        faster = exact_adjoint_pays(cell, x.shape[0], tensors[1].shape[-1])  # time-major x, h0 (B, H)
        if keeps_gates and faster and not torch.jit.is_tracing():
            return Plan(cell, x.device.type, x.dtype, "reserve", "exact-adjoint", kernels)
        return Plan(cell, x.device.type, x.dtype, "parent", "parent", kernels)
    return Plan(cell, x.device.type, x.dtype, "reserve" if keeps_gates else "fused", "highway", kernels)


def kernels_status() -> dict[str, str]:
    """What runs on this machine: the compiled kernels' build (or why none), the scan,
    the gate kernels, the forwards that keep the gates, the large products and the CUDA
    kernels. Printed by ``python -m hwbptt bench``."""
    from . import fused, gemm, native, reserve

    st = native.status()
    out = {"kernels": st["kernels"]}
    if st["why"]:
        out["why"] = st["why"]
    out["threads"] = f"PyTorch's intra-op pool ({torch.get_num_threads()} threads)"
    out["scan (CPU)"] = "compiled" if fused.available() else "odd-even reduction in torch"
    out["gate kernels (CPU)"] = "compiled" if fused.available() else "eager torch"
    out["forward keeping the gates, exact adjoint (CPU)"] = (
        "compiled" if reserve.available() else "unavailable: fused forward and recompute")
    out["LSTM k=1 (CPU)"] = (f"one compiled time loop up to H = {LOOP_MAX_H}, the batched iteration above"
                             if reserve.available() else "the batched iteration")
    out["LSTM exact mode (CPU)"] = (f"compiled adjoint up to H = {EXACT_LSTM_MAX_H}, oneDNN's LSTM above"
                                    if reserve.available() else "oneDNN's LSTM (the parent's)")
    out["large products"] = gemm.status()
    cells = fused._triton_cells() if torch.cuda.is_available() else None
    out["CUDA kernels"] = "triton" if cells is not None else ("eager torch" if torch.cuda.is_available() else "no CUDA device")
    return out
