"""One recurrent layer, one direction: the fused forward and its Highway-BP backward.

Each ``torch.autograd.Function`` here runs the framework's fused kernel (cuDNN, oneDNN,
ATen) for the forward with no autograd graph, and in the backward rebuilds the gates
from the saved hidden states (``LSTMTape``/``GRUTape``), runs the Highway-BP iteration
and returns every gradient from one batched VJP. No step is replayed in the backward.

Sequences of unequal length are right-padded: the fused forward on the padded batch
computes the same states for every ``t < length``; the adjoint at padded steps is zero
because nothing downstream reads them (the final state is taken at ``length - 1``), so
they contribute nothing to any gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import _VF
from torch.autograd.function import once_differentiable

from hwbptt import HighwayOptions

from . import reserve, workspace
from .gru_math import FastGRUTape, GRUWeights, make_gru_tape
from .lstm_math import FastLSTMTape, LSTMWeights, lstm_cell_states, make_lstm_tape

__all__ = ["lstm_layer", "gru_layer", "exact_by_tape", "at_lengths", "reverse_within", "WEIGHT_NAMES"]

WEIGHT_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def at_lengths(seq: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``seq[length_b - 1, b]`` for every batch row ``b`` (the last valid step)."""
    if lengths is None:
        return seq[-1]
    return seq[lengths - 1, torch.arange(seq.shape[1], device=seq.device)]


def _reversal_index(T: int, lengths: torch.Tensor) -> torch.Tensor:
    t = torch.arange(T, device=lengths.device).unsqueeze(1)
    return torch.where(t < lengths, lengths - 1 - t, t)  # (T, B)


def reverse_within(seq: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse time within each sequence's own length; padded steps stay in place."""
    if lengths is None:
        return seq.flip(0)
    index = _reversal_index(seq.shape[0], lengths)
    return seq.gather(0, index.view(*index.shape, *([1] * (seq.dim() - 2))).expand_as(seq))


def _needs(ctx: Any, first: int, flat_names: tuple[str, ...], input_names: tuple[str, ...]) -> dict[str, bool]:
    needs = dict(zip(input_names, ctx.needs_input_grad[: len(input_names)]))
    needs.update({name: False for name in WEIGHT_NAMES})
    needs.update(zip(flat_names, ctx.needs_input_grad[first:]))
    return needs


def exact_by_tape(*tensors: torch.Tensor) -> bool:
    """Whether the exact gradient runs as ``_GRUExact``/``_LSTMExact`` (a C time loop on the kept
    gates) for these tensors: where the reserve forward takes them, and a gradient is
    wanted at all. Under ``torch.jit.trace`` or ``torch.compile`` exact mode stays autograd
    through the fused kernel, which they can record."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    with torch.no_grad():  # the kernels' own test declines tensors that want a graph
        return reserve.supports(*tensors)


def _flat_names(has_bias: bool, has_proj: bool) -> tuple[str, ...]:
    return ("w_ih", "w_hh") + (("b_ih", "b_hh") if has_bias else ()) + (("w_hr",) if has_proj else ())


def _last_step_gradient(like: torch.Tensor, grad_last: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """ℓ for a state read only at the last valid step: zeros with ``grad_last`` placed there."""
    local = workspace.empty(like.shape, like).zero_()
    if lengths is None:
        local[-1] = grad_last
    else:
        local[lengths - 1, torch.arange(like.shape[1], device=like.device)] = grad_last
    return local


def _outside_autocast(backward):
    """Run a backward with autocast off: a ``loss.backward()`` inside ``torch.autocast``
    must not recast the tape's matmuls (the forward already ran in the autocast dtype)."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return backward(ctx, *grads)

    return run


class _LSTMHighway(torch.autograd.Function):
    """Inputs ``x (T,B,I), h0 (B,P), c0 (B,H)``; outputs ``y (T,B,P)`` and ``c`` at the
    last valid step ``(B,H)``."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, options, sink, key, has_bias, has_proj, *flat):
        with torch.no_grad():
            if not has_proj and reserve.supports(x, h0, c0, *flat):
                # Keep the gates (measured faster than rerunning the fused kernel and rebuilding).
                tape, y = FastLSTMTape.from_reserve(x, h0, c0, LSTMWeights.from_flat(list(flat), has_bias, False))
                c_last = at_lengths(tape.c, lengths)
            else:
                y, _, c_n = _VF.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), list(flat), has_bias, 1, 0.0, False, False, False)
                tape = None
                if lengths is None:
                    c_last = c_n[0]
                else:
                    # The fused kernel's c_n is after the padding; the tape has every c_t.
                    tape = make_lstm_tape(x, y, h0, c0, LSTMWeights.from_flat(list(flat), has_bias, has_proj))
                    c_last = at_lengths(tape.c, lengths)
        ctx.tape, ctx.lengths, ctx.options, ctx.sink, ctx.key = tape, lengths, options, sink, key
        ctx.layout = (has_bias, has_proj)
        ctx.save_for_backward(x, y, h0, c0, *flat)
        return y, c_last

    @staticmethod
    @once_differentiable
    @_outside_autocast
    def backward(ctx, grad_y, grad_c_last):
        x, y, h0, c0, *flat = ctx.saved_tensors
        has_bias, has_proj = ctx.layout
        tape = ctx.tape or make_lstm_tape(x, y, h0, c0, LSTMWeights.from_flat(flat, has_bias, has_proj))
        ctx.tape = None
        lc = _last_step_gradient(tape.c, grad_c_last, ctx.lengths)
        dc, wh, diagnostics = tape.highway(grad_y, lc, ctx.options)
        if ctx.sink is not None:
            ctx.sink[ctx.key] = diagnostics
        names = _flat_names(has_bias, has_proj)
        grads = tape.input_grads(dc, wh, _needs(ctx, 9, names, ("x", "h0", "c0")))
        return (grads["x"], grads["h0"], grads["c0"], None, None, None, None, None, None,
                *(grads[n] for n in names))


class _GRUHighway(torch.autograd.Function):
    """Inputs ``x (T,B,I), h0 (B,H)``; output ``y (T,B,H)``."""

    @staticmethod
    def forward(ctx, x, h0, lengths, options, sink, key, has_bias, *flat):
        with torch.no_grad():
            if reserve.supports(x, h0, *flat):
                # Keep the gates (measured faster than rerunning the fused kernel and rebuilding).
                ctx.tape, y = FastGRUTape.from_reserve(x, h0, GRUWeights.from_flat(list(flat), has_bias))
            else:
                ctx.tape = None
                y, _ = _VF.gru(x, h0.unsqueeze(0), list(flat), has_bias, 1, 0.0, False, False, False)
        ctx.options, ctx.sink, ctx.key, ctx.has_bias = options, sink, key, has_bias
        ctx.save_for_backward(x, y, h0, *flat)
        return y

    @staticmethod
    @once_differentiable
    @_outside_autocast
    def backward(ctx, grad_y):
        x, y, h0, *flat = ctx.saved_tensors
        tape = ctx.tape or make_gru_tape(x, y, h0, GRUWeights.from_flat(flat, ctx.has_bias))
        ctx.tape = None
        w, diagnostics = tape.highway(grad_y, ctx.options)
        if ctx.sink is not None:
            ctx.sink[ctx.key] = diagnostics
        names = _flat_names(ctx.has_bias, False)
        grads = tape.input_grads(w, _needs(ctx, 7, names, ("x", "h0")))
        return (grads["x"], grads["h0"], None, None, None, None, None, *(grads[n] for n in names))


class _GRUExact(torch.autograd.Function):
    """Exact mode on the CPU path: the forward keeps the gates (``reserve.gru_forward``), the
    backward is BPTT's adjoint as one C time loop (``reserve.gru_adjoint``), with the same
    inputs and outputs as ``_GRUHighway``. ATen's CPU GRU backward is a loop of small
    operators per step; this gives the same gradient (tests compare it with ``nn.GRU``'s).
    Under ``create_graph=True`` the backward differentiates the fused kernel with autograd
    instead, so that the gradient is itself differentiable (same values)."""

    @staticmethod
    def forward(ctx, x, h0, lengths, options, sink, key, has_bias, *flat):
        return _GRUHighway.forward(ctx, x, h0, lengths, options, sink, key, has_bias, *flat)

    @staticmethod
    def backward(ctx, grad_y):
        if not torch.is_grad_enabled():
            return _GRUHighway.backward(ctx, grad_y)
        ctx.tape = None
        x, _, h0, *flat = ctx.saved_tensors
        y = _gru_autograd(x, h0, flat, ctx.has_bias)
        return _autograd_again(ctx, (y,), (grad_y,), [x, h0], 5, flat)


class _LSTMExact(torch.autograd.Function):
    """``_GRUExact`` for the LSTM (no ``proj_size``): the backward is ``reserve.lstm_adjoint``
    on the gates the forward kept, and autograd through the fused kernel under
    ``create_graph=True``. Inputs and outputs as ``_LSTMHighway``'s."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, options, sink, key, has_bias, has_proj, *flat):
        return _LSTMHighway.forward(ctx, x, h0, c0, lengths, options, sink, key, has_bias, has_proj, *flat)

    @staticmethod
    def backward(ctx, grad_y, grad_c_last):
        if not torch.is_grad_enabled():
            return _LSTMHighway.backward(ctx, grad_y, grad_c_last)
        ctx.tape = None
        x, _, h0, c0, *flat = ctx.saved_tensors
        y, c_last = _lstm_autograd(x, h0, c0, flat, *ctx.layout, ctx.lengths)
        return _autograd_again(ctx, (y, c_last), (grad_y, grad_c_last), [x, h0, c0], 6, flat)


def _lstm_autograd(x, h0, c0, flat, has_bias, has_proj, lengths):
    """``(y, c_last)`` by the fused kernel under autograd: the exact mode's reference path
    (for unequal lengths, ``c`` at the last valid step from the differentiable rebuild)."""
    y, _, c_n = _VF.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), list(flat), has_bias, 1, 0.0, False, False, False)
    if lengths is None:
        return y, c_n[0]
    return y, at_lengths(lstm_cell_states(x, y, h0, c0, LSTMWeights.from_flat(list(flat), has_bias, has_proj)), lengths)


def _gru_autograd(x, h0, flat, has_bias):
    """``y`` by the fused kernel under autograd."""
    return _VF.gru(x, h0.unsqueeze(0), list(flat), has_bias, 1, 0.0, False, False, False)[0]


def _autograd_again(ctx: Any, outputs: tuple, grads: tuple, front: list, skip: int, flat: list) -> tuple:
    """A Function's backward as autograd through ``outputs`` (recomputed with a graph from
    the saved inputs), with ``create_graph=True``: a differentiable gradient. The Function's
    inputs are ``*front``, ``skip`` non-tensor arguments, then ``*flat``."""
    needs = ctx.needs_input_grad
    flags = [*needs[: len(front)], *needs[len(front) + skip :]]
    wanted = [t for t, n in zip([*front, *flat], flags) if n]
    got = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
    g = [next(got) if n else None for n in flags]
    return (*g[: len(front)], *([None] * skip), *g[len(front) :])


def lstm_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    flat: list[torch.Tensor],
    has_bias: bool,
    lengths: torch.Tensor | None,
    options: HighwayOptions | None,
    sink: dict | None = None,
    key: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer and direction: ``(y, h_last, c_last)``.

    ``options=None`` (or exact options) is the exact gradient: on the CPU path without a
    projection by ``_LSTMExact``, else by autograd through the fused kernel (and, for
    unequal lengths, through the differentiable rebuild of the cell states).
    """
    has_proj = len(flat) == (5 if has_bias else 3)
    if options is None or options.exact:
        if not has_proj and exact_by_tape(x, h0, c0, *flat):
            exact = HighwayOptions(iterations=None)
            y, c_last = _LSTMExact.apply(x, h0, c0, lengths, exact, sink, key, has_bias, has_proj, *flat)
        else:
            y, c_last = _lstm_autograd(x, h0, c0, flat, has_bias, has_proj, lengths)
    else:
        y, c_last = _LSTMHighway.apply(x, h0, c0, lengths, options, sink, key, has_bias, has_proj, *flat)
    return y, at_lengths(y, lengths), c_last


def gru_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    flat: list[torch.Tensor],
    has_bias: bool,
    lengths: torch.Tensor | None,
    options: HighwayOptions | None,
    sink: dict | None = None,
    key: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer and direction: ``(y, h_last)``; ``options=None`` (or exact options) is
    the exact gradient: on the CPU path by ``_GRUExact``, else by autograd through the fused
    kernel."""
    if options is None or options.exact:
        if exact_by_tape(x, h0, *flat):
            y = _GRUExact.apply(x, h0, lengths, HighwayOptions(iterations=None), sink, key, has_bias, *flat)
        else:
            y = _gru_autograd(x, h0, flat, has_bias)
    else:
        y = _GRUHighway.apply(x, h0, lengths, options, sink, key, has_bias, *flat)
    return y, at_lengths(y, lengths)
