"""One recurrent layer, one direction: the fused forward and its Highway-BP backward.

Each ``torch.autograd.Function`` here is a thin autograd wrapper around two registered
operators (``ops``): the forward operator runs the framework's fused kernel (cuDNN,
oneDNN, ATen) or, on the CPU fast path, ``reserve``'s forward that keeps the gates; the
backward operator rebuilds what was not kept (``LSTMTape``/``GRUTape``), runs the
Highway-BP iteration (or, in exact mode, the exact adjoint) and returns every gradient
from one batched VJP. No step is replayed in the backward. The Functions use
``setup_context`` and ``generate_vmap_rule`` (the operators have batching rules), so
``torch.func`` transforms, ``is_grads_batched`` and ``torch.compile`` all see them.

Sequences of unequal length are right-padded: the fused forward on the padded batch
computes the same states for every ``t < length``; the adjoint at padded steps is zero
because nothing downstream reads them (the final state is taken at ``length - 1``), so
they contribute nothing to any gradient.

A backward with ``create_graph=True`` (plain autograd): exact mode differentiates the
fused kernel with autograd instead, so that the gradient is itself differentiable (same
values); Highway mode raises, its backward being computed once. Under ``torch.func``
transforms the backward always runs with grad mode on; there it is computed once, and
the modules refuse (Highway) or hand to the parent (exact) nested gradient transforms
before the forward (``functorch_grad_levels``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import _VF

from hwbptt import HighwayOptions

from . import ops, reserve
from .dispatch import exact_adjoint_pays
from .lstm_math import LSTMWeights, lstm_cell_states
from .ops import WEIGHT_NAMES, at_lengths

__all__ = [
    "lstm_layer", "gru_layer", "exact_by_tape", "at_lengths", "reverse_within", "WEIGHT_NAMES",
    "forward_ad_requested", "functorch_active", "functorch_grad_levels",
]


def _reversal_index(T: int, lengths: torch.Tensor) -> torch.Tensor:
    t = torch.arange(T, device=lengths.device).unsqueeze(1)
    return torch.where(t < lengths, lengths - 1 - t, t)  # (T, B)


def reverse_within(seq: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse time within each sequence's own length; padded steps stay in place."""
    if lengths is None:
        return seq.flip(0)
    index = _reversal_index(seq.shape[0], lengths)
    return seq.gather(0, index.view(*index.shape, *([1] * (seq.dim() - 2))).expand_as(seq))


# ----------------------------------------------------------------------------- transforms


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is running (eager only)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def functorch_grad_levels() -> int:
    """How many ``torch.func`` gradient transforms (grad, vjp, jacrev, jvp, ...) are nested
    around this call: two or more ask for a derivative of a derivative."""
    if not functorch_active():
        return 0
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return sum(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def forward_ad_requested(*tensors: Any) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent (``torch.autograd.forward_ad``
    or ``torch.func.jvp``), or a ``torch.func.jvp`` transform is running."""
    if torch.compiler.is_compiling():
        return False
    if functorch_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
            return True
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:
        return False
    return any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# ----------------------------------------------------------------------------- when the C adjoint runs


def _reserve_takes(dtype: torch.dtype) -> bool:
    """Whether ``reserve`` runs for CPU tensors of ``dtype`` (built, switched on): read
    once when a graph is traced, without Dynamo looking into the kernels' Python."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return reserve.supports(torch.empty(0, dtype=dtype))


# What ``torch.compiler.assume_constant_result`` does (it sets this one attribute), without
# importing ``torch._dynamo`` at import: that imports Triton, which crashes a process that
# imported TensorFlow first (docs/reliability.md).
_reserve_takes._dynamo_marked_constant = True  # type: ignore[attr-defined]


def exact_by_tape(*tensors: torch.Tensor) -> bool:
    """Whether the exact gradient runs as this module's Functions (the C time loop on the
    kept gates) for these tensors: where the reserve forward takes them, and a gradient is
    wanted at all. Under ``torch.jit.trace`` exact mode stays autograd through the fused
    kernel, which it can record. Under ``torch.compile`` the test reads the tensors'
    metadata (Dynamo does not trace into the kernels' Python)."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    if torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling():
        t0 = tensors[0]
        return (
            not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == t0.dtype and t.numel() < 2**31 for t in tensors)
            and _reserve_takes(t0.dtype)
        )
    with torch.no_grad():  # the kernels' own test declines tensors that want a graph
        return reserve.supports(*tensors)


# ----------------------------------------------------------------------------- the Functions


class _Spec(NamedTuple):
    """The non-tensor arguments of one layer call."""

    name: str  # the layer, for error messages
    has_bias: bool
    has_proj: bool
    cast: torch.dtype | None  # autocast dtype of the forward kernel (``ops.autocast_dtype``)
    options: tuple  # ``ops.option_args``
    handle: int  # diagnostics sink (``ops.open_sink``), 0 for none
    key: tuple  # the sink's key: (layer, direction) or (key,)
    lease: Any  # ``ops.SinkLease`` for a sink no module owns, else None

    @property
    def exact(self) -> bool:
        return self.options[0] < 0 and self.options[1] is None


def _refuse_create_graph(spec: _Spec) -> RuntimeError:
    return RuntimeError(
        f"{spec.name}: double backward (create_graph=True) is not supported by Highway-BP "
        f"(iterations={spec.options[0]}): its backward is computed once and is not differentiable, "
        "so a second derivative would be wrong. Use iterations=None (exact BPTT through the "
        "parent's kernel) for higher-order gradients."
    )


def _refuse_forward_ad(spec: _Spec) -> RuntimeError:
    return RuntimeError(
        f"{spec.name}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by "
        f"Highway-BP (iterations={spec.options[0]}), whose gradient is only defined for the backward. "
        "Use iterations=None: exact mode runs the parent's forward, which supports forward-mode AD."
    )


def _spread(got: list, needs: list[bool]) -> list:
    it = iter(got)
    return [next(it) if n else None for n in needs]


def _weights(flat: tuple, has_bias: bool, has_proj: bool) -> list:
    """``[w_ih, w_hh, b_ih, b_hh, w_hr]`` with ``None`` for the absent ones."""
    it = iter(flat)
    w_ih, w_hh = next(it), next(it)
    b_ih, b_hh = (next(it), next(it)) if has_bias else (None, None)
    return [w_ih, w_hh, b_ih, b_hh, next(it) if has_proj else None]


def _op_needs(flags: list[bool], flat_flags: list[bool], has_bias: bool, has_proj: bool) -> list[bool]:
    """An operator's ``needs`` mask (one flag per input and weight slot) from the flags of
    the states' inputs and of the flat weights present."""
    return [*flags, *(bool(f) if f is not None else False for f in _weights(flat_flags, has_bias, has_proj))]


def _from_op(got: tuple, n_front: int, has_bias: bool, has_proj: bool, needs: list[bool]) -> list:
    """The Function's gradients (front inputs, then the flat weights present) from an
    operator's one-per-slot result, ``None`` where not needed."""
    slots = [g if need else None for g, need in zip(got, needs)]
    front, weights = slots[:n_front], slots[n_front:]
    present = [weights[0], weights[1]] + ([weights[2], weights[3]] if has_bias else []) + ([weights[4]] if has_proj else [])
    return front + present


class _LSTMFunction(torch.autograd.Function):
    """Inputs ``spec, x (T,B,I), h0 (B,P), c0 (B,H), lengths (B,) or None, *flat``; outputs
    ``y (T,B,P)``, ``c`` at the last valid step ``(B,H)`` and the kept tensors."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spec, x, h0, c0, lengths, *flat):
        return ops.call("lstm_forward", x, h0, c0, *_weights(flat, spec.has_bias, spec.has_proj), lengths, spec.cast)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, x, h0, c0, lengths, *flat = inputs
        y, _, gates, c, tanh_c, gain = output
        ctx.mark_non_differentiable(gates, c, tanh_c, gain)
        # No zeros made for the kept tensors' (unused) gradients: they are as large as the gates.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y, h0, c0, gates, c, tanh_c, gain, lengths, *flat)
        ctx.spec = spec

    @staticmethod
    def backward(ctx, grad_y, grad_c_last, *_):
        spec = ctx.spec
        x, y, h0, c0, gates, c, tanh_c, gain, lengths, *flat = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [n[1], n[2], n[3], *n[5:]]
        if grad_y is None and grad_c_last is None:
            return (None,) * len(n)
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        grad_c_last = c0.new_zeros(c0.shape) if grad_c_last is None else grad_c_last
        if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            if not spec.exact:
                raise _refuse_create_graph(spec)
            outputs = _lstm_autograd(x, h0, c0, flat, spec.has_bias, spec.has_proj, lengths)
            g = _autograd_again(outputs, (grad_y, grad_c_last), [x, h0, c0, *flat], needs)
        elif not any(needs):
            g = [None] * len(needs)
        else:
            mask = _op_needs(needs[:3], needs[3:], spec.has_bias, spec.has_proj)
            with torch.no_grad():
                got = ops.call("lstm_backward",
                    grad_y, grad_c_last, x, y, h0, c0, *_weights(flat, spec.has_bias, spec.has_proj), gates, c, tanh_c,
                    gain, lengths, *spec.options, spec.handle, list(spec.key), mask)
            g = _from_op(got, 3, spec.has_bias, spec.has_proj, mask)
        return (None, g[0], g[1], g[2], None, *g[3:])


class _GRUFunction(torch.autograd.Function):
    """Inputs ``spec, x (T,B,I), h0 (B,H), *flat``; outputs ``y (T,B,H)`` and the kept tensors."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spec, x, h0, *flat):
        return ops.call("gru_forward", x, h0, *_weights(flat, spec.has_bias, False)[:4], spec.cast)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, x, h0, *flat = inputs
        y, gates, gh = output
        ctx.mark_non_differentiable(gates, gh)
        ctx.set_materialize_grads(False)  # (as _LSTMFunction's)
        ctx.save_for_backward(x, y, h0, gates, gh, *flat)
        ctx.spec = spec

    @staticmethod
    def backward(ctx, grad_y, *_):
        spec = ctx.spec
        x, y, h0, gates, gh, *flat = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [n[1], n[2], *n[3:]]
        if grad_y is None:
            return (None,) * len(n)
        if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            if not spec.exact:
                raise _refuse_create_graph(spec)
            g = _autograd_again((_gru_autograd(x, h0, flat, spec.has_bias),), (grad_y,), [x, h0, *flat], needs)
        elif not any(needs):
            g = [None] * len(needs)
        else:
            mask = _op_needs(needs[:2], needs[2:], spec.has_bias, False)[:6]
            with torch.no_grad():
                got = ops.call("gru_backward",
                    grad_y, x, y, h0, *_weights(flat, spec.has_bias, False)[:4], gates, gh, *spec.options, spec.handle,
                    list(spec.key), mask)
            g = _from_op((*got, None), 2, spec.has_bias, False, mask + [False])
        return (None, *g)


class _LSTMFunctionEager(_LSTMFunction):
    """``_LSTMFunction`` with a ``jvp`` that refuses forward-mode AD clearly (Dynamo cannot
    trace a Function that defines ``jvp``, so compiled code uses the parent class)."""

    @staticmethod
    def jvp(ctx, *tangents):
        raise _refuse_forward_ad(ctx.spec)


class _GRUFunctionEager(_GRUFunction):
    """``_GRUFunction`` with the refusing ``jvp`` (``_LSTMFunctionEager``)."""

    @staticmethod
    def jvp(ctx, *tangents):
        raise _refuse_forward_ad(ctx.spec)


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


def _autograd_again(outputs: tuple, grads: tuple, inputs: list, needs: list[bool]) -> list:
    """A backward as autograd through ``outputs`` (recomputed with a graph from the saved
    ``inputs``), with ``create_graph=True``: a differentiable gradient."""
    wanted = [t for t, n in zip(inputs, needs) if n]
    got = torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True)
    return _spread(list(got), needs)


# ----------------------------------------------------------------------------- entry points


def _sink_args(sink: Any, key: Any, handle: int | None) -> tuple[int, tuple, Any]:
    """``(handle, key, lease)``: a module's own handle, or a lease on a new one for ``sink``."""
    if handle is not None:
        return handle, tuple(key), None
    if sink is None:
        return 0, (0,), None
    lease = ops.SinkLease(sink)
    return lease.handle, (tuple(key) if isinstance(key, tuple) else (key,)), lease


def _function(eager: type, compiled: type) -> type:
    return compiled if torch.compiler.is_compiling() else eager


def lstm_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    flat: list[torch.Tensor],
    has_bias: bool,
    lengths: torch.Tensor | None,
    options: HighwayOptions | None,
    sink: Any = None,
    key: Any = None,
    *,
    handle: int | None = None,
    name: str = "HighwayLSTM",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer and direction: ``(y, h_last, c_last)`` for ``x`` (T, B, I), ``h0``
    (B, P), ``c0`` (B, H).

    ``options=None`` (or exact options) is the exact gradient: on the CPU path without a
    projection (and under ``torch.func`` transforms) by ``_LSTMFunction``'s exact adjoint,
    else by autograd through the fused kernel (and, for unequal lengths, through the
    differentiable rebuild of the cell states). Diagnostics go to ``sink[key]``, or to the
    sink of ``handle`` (``ops.open_sink``) under the key ``key`` (a tuple).
    """
    has_proj = len(flat) == (5 if has_bias else 3)
    exact = options is None or options.exact
    by_tape = not has_proj and exact_by_tape(x, h0, c0, *flat) and exact_adjoint_pays("lstm", x.shape[0], c0.shape[-1])
    if exact and not functorch_active() and not by_tape:
        y, c_last = _lstm_autograd(x, h0, c0, flat, has_bias, has_proj, lengths)
    else:
        spec = _Spec(name, has_bias, has_proj, ops.autocast_dtype(x, "lstm"),
                     ops.option_args(None if exact else options), *_sink_args(sink, key, handle))
        y, c_last = _function(_LSTMFunctionEager, _LSTMFunction).apply(spec, x, h0, c0, lengths, *flat)[:2]
    return y, at_lengths(y, lengths), c_last


def gru_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    flat: list[torch.Tensor],
    has_bias: bool,
    lengths: torch.Tensor | None,
    options: HighwayOptions | None,
    sink: Any = None,
    key: Any = None,
    *,
    handle: int | None = None,
    name: str = "HighwayGRU",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer and direction: ``(y, h_last)`` for ``x`` (T, B, I), ``h0`` (B, H);
    ``options=None`` (or exact options) is the exact gradient: on the CPU path (and under
    ``torch.func`` transforms) by ``_GRUFunction``'s exact adjoint, else by autograd through
    the fused kernel. Sinks as ``lstm_layer``'s."""
    exact = options is None or options.exact
    if exact and not functorch_active() and not exact_by_tape(x, h0, *flat):
        y = _gru_autograd(x, h0, flat, has_bias)
    else:
        spec = _Spec(name, has_bias, False, ops.autocast_dtype(x, "gru"),
                     ops.option_args(None if exact else options), *_sink_args(sink, key, handle))
        y = _function(_GRUFunctionEager, _GRUFunction).apply(spec, x, h0, *flat)[0]
    return y, at_lengths(y, lengths)
