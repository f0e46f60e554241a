"""What the two modes cost, for a probe of ``iterations="auto"``, where exact mode runs the parent's kernel.

A probe (``hwbptt.torch.auto.probe_adjoint``) compares the time of ``k`` Highway
iterations with that of the exact adjoint. Where exact mode runs this project's own
adjoint (the C time loop on the kept gates), that comparison is the whole difference:
the rest of the layer's step (the forward keeping the gates, the final VJP) is the same
in both modes. Where exact mode runs the parent's kernel instead (``dispatch.plan``: on
CUDA, cuDNN; on CPU, oneDNN's LSTM at short ``T·H``), the forwards and the backwards
differ, so after the pass (which then has no cost stop: its times are not the ones
compared) the probe times one whole layer step of each candidate on this step's tensors:
the parent's forward and autograd backward on detached copies, and this layer's forward
and backward at the first faithful ``k`` (``retime``; results discarded). A step's cost
depends on the shapes, not on the weights, so each is measured once per shape and mode,
as the lesser of two runs (which also leaves out one-time setup: oneDNN's primitives,
cuDNN's plans), and reused by later probes: measured each time, the two whole layer
steps cost the study's LSTM (``docs/results.md``, part 4) 3.5% of its training time.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor, _VF

__all__ = ["runs_parent", "parent_step", "step_key", "measured", "retime", "seconds"]

_MEASURED: dict = {}  # key -> seconds of one layer step (retime), the least of _RUNS runs
_RUNS = 2
_MAX_KEPT = 256  # shapes and modes remembered; beyond, the memory starts again


def _sync(t: Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def seconds(fn: Callable[[], object], like: Tensor) -> float:
    """Wall-clock seconds of ``fn()``, the device waited for on both ends."""
    _sync(like)
    t = time.perf_counter()
    fn()
    _sync(like)
    return time.perf_counter() - t


def runs_parent(cell: str, tensors: Sequence[Tensor], has_proj: bool) -> bool:
    """Whether exact mode runs the parent's kernel for this layer (``dispatch.plan``, the
    one place that decides), for the time-major ``x``, the states and the weights."""
    from .dispatch import plan

    return plan(cell, tuple(tensors), exact=True, has_proj=has_proj, wants_grad=True).backward == "parent"


def parent_step(cell: str, x: Tensor, states: Sequence[Tensor], flat: Sequence[Tensor], has_bias: bool,
                upstream: Sequence[Tensor], needs: Sequence[bool]) -> Callable[[], None]:
    """One layer step of exact mode on the parent's kernel: its fused forward and autograd
    backward on detached copies of ``x`` (T, B, I), ``states`` (each (B, ·)) and ``flat``
    (the weights in the parent's order), with the upstream gradients (LSTM: of ``y`` and
    of the last cell state; GRU: of ``y``); ``needs`` says which of ``x, *states, *flat``
    want a gradient, as exact mode computes them."""

    def run() -> None:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip((x, *states, *flat), needs)]
            xl, sl, fl = leaves[0], leaves[1 : 1 + len(states)], leaves[1 + len(states) :]
            if cell == "lstm":
                y, _, c_n = _VF.lstm(xl, (sl[0].unsqueeze(0), sl[1].unsqueeze(0)), fl, has_bias, 1, 0.0, True, False, False)
                outs, grads = (y, c_n), (upstream[0], upstream[1].unsqueeze(0))
            else:
                y, _ = _VF.gru(xl, sl[0].unsqueeze(0), fl, has_bias, 1, 0.0, True, False, False)
                outs, grads = (y,), (upstream[0],)
            wanted = [t for t in leaves if t.requires_grad]
            if wanted:
                torch.autograd.grad(outs, wanted, grads, allow_unused=True)

    return run


def step_key(cell: str, tensors: Sequence[Tensor | None], needs: Sequence[bool]) -> tuple:
    """What a layer step's cost depends on: the cell, the device, the dtype, the shapes and
    which gradients are wanted."""
    x = tensors[0]
    return (cell, x.device, x.dtype, tuple(None if t is None else tuple(t.shape) for t in tensors), tuple(needs))


def measured(key: tuple, fn: Callable[[], None], like: Tensor) -> float:
    """Seconds of ``fn()``, a layer step, for ``key``: the least of ``_RUNS`` runs the first
    time, remembered after."""
    if key not in _MEASURED:
        if len(_MEASURED) >= _MAX_KEPT:
            _MEASURED.clear()
        _MEASURED[key] = min(seconds(fn, like) for _ in range(_RUNS))
    return _MEASURED[key]


def retime(probe: dict, fidelity: float, key: tuple, exact_step: Callable[[], None],
           highway_step: Callable[[int], None], like: Tensor) -> None:
    """Replace a probe's times (``Diagnostics.probe``) by whole layer steps (``measured``
    under ``key``, ``step_key``): exact mode's (``exact_step()``) and, where a rung is
    faithful, the first faithful ``k``'s (``highway_step(k)``, the only Highway candidate
    of the decision); the other rungs keep their cosines and lose their times.
    ``probe["timed"]`` says so."""
    rungs = sorted(probe["cosines"])
    first = next((k for k in rungs if probe["cosines"][k] >= fidelity), None)
    probe["pass_seconds"] = probe["seconds"]  # the iterations' own times (hwbptt.auto._carried's slope)
    probe["exact_seconds"] = measured(("exact", *key), exact_step, like)
    probe["seconds"] = {} if first is None else {first: measured((first, *key), lambda: highway_step(first), like)}
    probe["timed"] = "layer steps (exact mode runs the parent's kernel)"
