"""One recurrent layer and direction as registered operators (``torch.ops.hwbptt.*``).

Why operators: ``torch.compile`` (Dynamo, AOTAutograd) and ``torch.func`` see a registered
operator as one opaque call with a schema and a fake (meta) implementation, whatever
runs inside it (the compiled kernels, a lock, the workspace pool). Four operators:

- ``lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cast)`` ->
  ``(y, c_last, gates, c, tanh_c, gain)``; ``gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh,
  cast)`` -> ``(y, gates, gh)`` (absent weights are ``None``). The fused forward of one layer and direction, plus what the backward
  needs besides the inputs: where ``reserve`` takes the tensors, the kept gates
  ((T+1, B, G·H), the last row zero) and the LSTM's cell-state tensors (T, B, H) each;
  elsewhere empty (0,) placeholders, and the backward rebuilds them from ``y``.
- ``lstm_backward(...)``/``gru_backward(...)`` -> one tensor per input x, h0[, c0] and
  weight (``LSTM_GRAD_NAMES``, ``GRU_GRAD_NAMES``): its gradient where the ``needs`` mask
  asks for it, else an empty placeholder. Highway-BP, or for ``iterations=-1`` and no
  ``tol`` the exact adjoint (``reserve``'s C loop where it runs), on the tape rebuilt from
  those tensors.

Non-tensor state cannot go through a schema: the options travel as ints, floats and
strings (``option_args``), and the diagnostics as an int ``handle`` into ``_SINKS``
(``open_sink``), written by the backward at run time, in eager mode and in a compiled
graph alike.

The fake implementations call the same decision (``reserve.supports`` on the fake
tensors' dtype and device) as the kernels, so the two agree on the placeholder shapes;
the switch ``reserve.use(False)`` is read when a graph is traced, so toggling it for an
already compiled model needs ``torch._dynamo.reset()``.

Autocast: inside the operators autocast is off (in a compiled graph it would be anyway),
and the forward casts its floating inputs (not float64) to ``cast``, the autocast dtype
the caller passes where the parent's kernel runs in it (``autocast_dtype``): the same
precision as the parent, from the same cast, in eager mode and compiled.

vmap: each operator has a batching rule that runs it once per index of the vmapped
dimension and stacks the results (per-sample semantics: the Highway estimate of each
sample is the one it gets alone). Weight gradients are sums over the batch, so the
vmapped dimension cannot be folded into it.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable

import torch
from torch import Tensor, _VF

from hwbptt import Diagnostics, HighwayOptions

from . import reserve, workspace
from .gru_math import FastGRUTape, GRUWeights, make_gru_tape
from .lstm_math import FastLSTMTape, LSTMWeights, make_lstm_tape

__all__ = [
    "open_sink", "close_sink", "sink_of", "SinkLease", "option_args", "autocast_dtype", "at_lengths",
    "WEIGHT_NAMES", "LSTM_GRAD_NAMES", "GRU_GRAD_NAMES", "call",
]

WEIGHT_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def at_lengths(seq: Tensor, lengths: Tensor | None) -> Tensor:
    """``seq[length_b - 1, b]`` for every batch row ``b`` (the last valid step)."""
    if lengths is None:
        return seq[-1]
    return seq[lengths - 1, torch.arange(seq.shape[1], device=seq.device)]


# ----------------------------------------------------------------------------- diagnostics

# handle -> an object taking ``sink[key] = Diagnostics`` (a module's dict, a Keras report).
_SINKS: dict[int, Any] = {}
_HANDLES = itertools.count(1)


def open_sink(sink: Any) -> int:
    """A new handle (> 0) under which the backward operators store diagnostics into ``sink``."""
    handle = next(_HANDLES)
    _SINKS[handle] = sink
    return handle


def close_sink(handle: int) -> None:
    _SINKS.pop(handle, None)


def sink_of(handle: int) -> Any:
    return _SINKS.get(handle)


class SinkLease:
    """Holds a handle for a sink that belongs to no module (``lstm_layer(..., sink=...)``):
    kept by the autograd graph (the Function's context), it closes the handle when the
    graph is freed."""

    def __init__(self, sink: Any):
        self.handle = open_sink(sink)

    def __del__(self) -> None:
        close_sink(self.handle)


def _exact_runs_parent(cell: str, tensors: tuple[Tensor, ...], has_proj: bool) -> bool:
    """Whether exact mode runs the parent's kernel for this layer (``dispatch.plan``, the one
    place that decides): cuDNN on CUDA, oneDNN's LSTM above ``H = 256`` on CPU."""
    from .dispatch import plan

    return plan(cell, tensors, exact=True, has_proj=has_proj, wants_grad=True).backward == "parent"


def _probe_path(diag: Diagnostics, parent: bool) -> None:
    """A probe's ``exact_path``: ``"parent"`` where exact mode runs the parent's kernel, whose
    time the probe does not measure (it times this project's exact adjoint, which it needs
    for the cosines, in its place), else ``"tape"``."""
    if diag.probe is not None:
        diag.probe["exact_path"] = "parent" if parent else "tape"


def _store(handle: int, key: list[int], diagnostics: Diagnostics) -> None:
    sink = _SINKS.get(handle)
    if sink is not None:
        sink[tuple(key) if len(key) > 1 else key[0]] = diagnostics


# ----------------------------------------------------------------------------- options

_DIAGNOSTICS = {False: "off", True: "on", "debug": "debug"}
_DIAGNOSTICS_BACK = {v: k for k, v in _DIAGNOSTICS.items()}


def option_args(options: HighwayOptions | None) -> tuple[int, float | None, float, str, str, list[int]]:
    """``(iterations, tol, gamma, split, diagnostics, probe)`` for an operator:
    ``iterations=-1`` is ``None``; ``options=None`` is the exact gradient; ``probe`` the
    ladder of an ``"auto"`` probe (``hwbptt.auto``), empty otherwise."""
    if options is None:
        return (-1, None, 0.0, "gates", "off", [])
    iterations = -1 if options.iterations is None else int(options.iterations)
    tol = None if options.tol is None else float(options.tol)
    probe = [] if options.probe is None else [int(options.probe_stops_on_cost), *(int(k) for k in options.probe)]
    return (iterations, tol, float(options.gamma), options.split, _DIAGNOSTICS[options.diagnostics], probe)


def _options(iterations: int, tol: float | None, gamma: float, split: str, diagnostics: str, probe: list[int]) -> HighwayOptions:
    return HighwayOptions(iterations=None if iterations < 0 else iterations, tol=tol, gamma=gamma, split=split,
                          diagnostics=_DIAGNOSTICS_BACK[diagnostics], probe=tuple(probe[1:]) if probe else None,
                          probe_stops_on_cost=bool(probe[0]) if probe else True)


# ----------------------------------------------------------------------------- autocast


def autocast_dtype(x: Tensor, kind: str) -> torch.dtype | None:
    """The dtype the parent's kernel runs in under the current autocast, or ``None``.

    Autocast's CPU list holds oneDNN's LSTM layer, not the GRU; on CUDA the cuDNN RNN
    (both). Float64 tensors are never cast (``_cast``)."""
    device = x.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    if device == "cpu" and kind == "gru":
        return None
    return torch.get_autocast_dtype(device)


def _cast(dtype: torch.dtype | None, *tensors: Tensor) -> list[Tensor]:
    """What autocast does to a kernel's inputs: floating tensors other than float64 to ``dtype``."""
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


@contextlib.contextmanager
def _kernel_context(like: Tensor):
    """No autograd graph and no autocast inside an operator (see the module docstring)."""
    device = like.device.type
    off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext()
    with torch.no_grad(), off:
        yield


# ----------------------------------------------------------------------------- tapes from kept tensors


def _kept(t: Tensor) -> bool:
    return t.dim() != 1  # the forward's placeholder for "not kept" is (0,)


def _lstm_tape(x, y, h0, c0, w: LSTMWeights, gates, c, tanh_c, gain):
    """The LSTM tape on the tensors the forward kept, else rebuilt from ``y``."""
    if not _kept(gates):
        return make_lstm_tape(x, y, h0, c0, w)
    return FastLSTMTape.from_kept(x, y, h0, c0, w, gates, c, tanh_c, gain)


def _gru_tape(x, y, h0, w: GRUWeights, gates, gh):
    """The GRU tape on the tensors the forward kept, else rebuilt from ``y``."""
    if not _kept(gates):
        return make_gru_tape(x, y, h0, w)
    return FastGRUTape.from_kept(x, y, h0, w, gates, gh)


def _last_step_gradient(like: Tensor, grad_last: Tensor, lengths: Tensor | None) -> Tensor:
    """ℓ for a state read only at the last valid step: zeros with ``grad_last`` placed there."""
    local = workspace.empty(like.shape, like).zero_()
    if lengths is None:
        local[-1] = grad_last
    else:
        local[lengths - 1, torch.arange(like.shape[1], device=like.device)] = grad_last
    return local


def _grads_out(grads: dict, names: tuple[str, ...], inputs: tuple[Tensor | None, ...], needs: list[bool]) -> tuple:
    """One tensor per input: its gradient where ``needs`` asks for it (in the input's dtype
    and contiguous, what the fake implementation promises), else an empty (0,) placeholder
    (in the dtype of ``inputs[0]``)."""
    out = []
    for name, inp, need in zip(names, inputs, needs):
        if inp is None or not need:
            out.append(inputs[0].new_empty(0))
        else:
            g = grads[name]
            out.append(torch.zeros_like(inp) if g is None else g.to(inp.dtype).contiguous())
    return tuple(out)


def _grads_fake(inputs: tuple[Tensor | None, ...], needs: list[bool]) -> tuple:
    x = inputs[0]
    return tuple(x.new_empty(0) if inp is None or not need else inp.new_empty(inp.shape) for inp, need in zip(inputs, needs))


def _check_devices(x: Tensor, states: tuple[Tensor, ...], flat: list[Tensor]) -> None:
    """The parent kernel's device checks, with its messages, before any kernel runs (a
    ``meta`` tensor would otherwise reach the fake implementation and pass)."""
    for h in states:
        if h.device != x.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at {x.device} "
                               f"and hidden tensor at {h.device}")
    for p in flat:
        if p.device != x.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{x.device} and parameter tensor at {p.device}")


def _check_needs(needs: list[bool], n: int) -> None:
    if len(needs) != n:
        raise ValueError(f"needs must have one flag per input x, states and weights ({n}), got needs={needs!r}")


def _flat(*weights: Tensor | None) -> list[Tensor]:
    """The layer's weights present, in ``nn.LSTM``/``nn.GRU`` order."""
    return [w for w in weights if w is not None]


# The schemas take each weight as its own (optional) tensor and return a fixed number of
# tensors: the batched-gradient path of ``torch.autograd.grad(is_grads_batched=True)`` and
# ``gradcheck`` (the legacy vmap) loops over any operator without tensor lists.

# ----------------------------------------------------------------------------- LSTM


def _lstm_keeps(x: Tensor, h0: Tensor, c0: Tensor, flat: list[Tensor], has_proj: bool) -> bool:
    return not has_proj and reserve.supports(x, h0, c0, *flat)


def _lstm_forward_impl(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    w_hr: Tensor | None, lengths: Tensor | None, cast: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x`` (T, B, I), ``h0`` (B, P), ``c0`` (B, H), ``lengths`` (B,) or None ->
    ``y`` (T, B, P), ``c_last`` (B, H) at each row's last valid step, and the kept tensors."""
    has_bias, has_proj = b_ih is not None, w_hr is not None
    flat = _flat(w_ih, w_hh, b_ih, b_hh, w_hr)
    _check_devices(x, (h0, c0), flat)
    with _kernel_context(x):
        x, h0, c0, *flat = _cast(cast, x, h0, c0, *flat)
        if _lstm_keeps(x, h0, c0, flat, has_proj):
            bias = flat[2] + flat[3] if has_bias else None
            gates, y, c, tanh_c, gain = reserve.lstm_forward(x, h0, c0, flat[0], flat[1], bias)
            return y, at_lengths(c, lengths).clone(), gates, c, tanh_c, gain
        y, _, c_n = _VF.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), flat, has_bias, 1, 0.0, False, False, False)
        if lengths is None:
            c_last = c_n[0]
        else:  # the fused kernel's c_n is after the padding; the tape has every c_t
            c_last = at_lengths(make_lstm_tape(x, y, h0, c0, LSTMWeights.from_flat(flat, has_bias, has_proj)).c, lengths)
        return (y, c_last.contiguous(), *(x.new_empty(0) for _ in range(4)))


_lstm_forward = torch.library.custom_op("hwbptt::lstm_forward", mutates_args=())(_lstm_forward_impl)


@_lstm_forward.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cast):
    flat = _flat(w_ih, w_hh, b_ih, b_hh, w_hr)
    _check_devices(x, (h0, c0), flat)
    with _kernel_context(x):
        x, h0, c0, *flat = _cast(cast, x, h0, c0, *flat)
        keeps = _lstm_keeps(x, h0, c0, flat, w_hr is not None)
    T, B = x.shape[:2]
    H, P = c0.shape[-1], w_hh.shape[1]
    y, c_last = x.new_empty((T, B, P)), x.new_empty((B, H))
    if keeps:
        return y, c_last, x.new_empty((T + 1, B, 4 * H)), *(x.new_empty((T, B, H)) for _ in range(3))
    return (y, c_last, *(x.new_empty(0) for _ in range(4)))


LSTM_GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def _lstm_backward_impl(
    grad_y: Tensor, grad_c_last: Tensor, x: Tensor, y: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None, gates: Tensor, c: Tensor, tanh_c: Tensor,
    gain: Tensor, lengths: Tensor | None, iterations: int, tol: float | None, gamma: float, split: str,
    diagnostics: str, probe: list[int], handle: int, key: list[int], needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From ``grad_y`` (T, B, P) and ``grad_c_last`` (B, H): one tensor per input of
    ``LSTM_GRAD_NAMES``, its gradient where ``needs`` asks for it, else an empty placeholder.
    Stores the diagnostics under ``handle``/``key``."""
    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    _check_needs(needs, len(inputs))
    has_proj = w_hr is not None
    with _kernel_context(x):
        w = LSTMWeights(w_ih, w_hh, b_ih, b_hh, w_hr)
        tape = _lstm_tape(x, y, h0, c0, w, gates, c, tanh_c, gain)
        lc = _last_step_gradient(tape.c, grad_c_last, lengths)
        dc, wh, diag = tape.highway(grad_y, lc, _options(iterations, tol, gamma, split, diagnostics, probe))
        if probe:
            _probe_path(diag, _exact_runs_parent("lstm", (x, h0, c0, *_flat(w_ih, w_hh, b_ih, b_hh, w_hr)), has_proj))
        _store(handle, key, diag)
        want = {n: bool(need and t is not None) for n, t, need in zip(LSTM_GRAD_NAMES, inputs, needs)}
        return _grads_out(tape.input_grads(dc, wh, want), LSTM_GRAD_NAMES, inputs, needs)


_lstm_backward = torch.library.custom_op("hwbptt::lstm_backward", mutates_args=())(_lstm_backward_impl)


@_lstm_backward.register_fake
def _(grad_y, grad_c_last, x, y, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, gates, c, tanh_c, gain, lengths, iterations,
      tol, gamma, split, diagnostics, probe, handle, key, needs):
    return _grads_fake((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), needs)


# ----------------------------------------------------------------------------- GRU


def _gru_forward_impl(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    cast: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` (T, B, I), ``h0`` (B, H) -> ``y`` (T, B, H) and the kept ``gates``, ``gh``."""
    has_bias = b_ih is not None
    flat = _flat(w_ih, w_hh, b_ih, b_hh)
    _check_devices(x, (h0,), flat)
    with _kernel_context(x):
        x, h0, *flat = _cast(cast, x, h0, *flat)
        if reserve.supports(x, h0, *flat):
            w = GRUWeights.from_flat(flat, has_bias)
            gates, gh, y = reserve.gru_forward(x, h0, w.w_ih, w.w_hh, w.b_ih, w.b_hh)
            return y, gates, gh
        y, _ = _VF.gru(x, h0.unsqueeze(0), flat, has_bias, 1, 0.0, False, False, False)
        return y, x.new_empty(0), x.new_empty(0)


_gru_forward = torch.library.custom_op("hwbptt::gru_forward", mutates_args=())(_gru_forward_impl)


@_gru_forward.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, cast):
    flat = _flat(w_ih, w_hh, b_ih, b_hh)
    _check_devices(x, (h0,), flat)
    with _kernel_context(x):
        x, h0, *flat = _cast(cast, x, h0, *flat)
        keeps = reserve.supports(x, h0, *flat)
    T, B = x.shape[:2]
    H = h0.shape[-1]
    y = x.new_empty((T, B, H))
    if keeps:
        return y, x.new_empty((T + 1, B, 3 * H)), x.new_empty((T, B, 3 * H))
    return y, x.new_empty(0), x.new_empty(0)


GRU_GRAD_NAMES = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")


def _gru_backward_impl(
    grad_y: Tensor, x: Tensor, y: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, gates: Tensor, gh: Tensor, iterations: int, tol: float | None, gamma: float, split: str,
    diagnostics: str, probe: list[int], handle: int, key: list[int], needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From ``grad_y`` (T, B, H): one tensor per input of ``GRU_GRAD_NAMES`` (as
    ``lstm_backward``)."""
    inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
    _check_needs(needs, len(inputs))
    with _kernel_context(x):
        tape = _gru_tape(x, y, h0, GRUWeights(w_ih, w_hh, b_ih, b_hh), gates, gh)
        w, diag = tape.highway(grad_y, _options(iterations, tol, gamma, split, diagnostics, probe))
        if probe:
            _probe_path(diag, _exact_runs_parent("gru", (x, h0, *_flat(w_ih, w_hh, b_ih, b_hh)), False))
        _store(handle, key, diag)
        want = {n: bool(need and t is not None) for n, t, need in zip(GRU_GRAD_NAMES, inputs, needs)} | {"w_hr": False}
        return _grads_out(tape.input_grads(w, want), GRU_GRAD_NAMES, inputs, needs)


_gru_backward = torch.library.custom_op("hwbptt::gru_backward", mutates_args=())(_gru_backward_impl)


@_gru_backward.register_fake
def _(grad_y, x, y, h0, w_ih, w_hh, b_ih, b_hh, gates, gh, iterations, tol, gamma, split, diagnostics, probe, handle,
      key, needs):
    return _grads_fake((x, h0, w_ih, w_hh, b_ih, b_hh), needs)


# ----------------------------------------------------------------------------- vmap


def _per_sample_rule(op: Callable) -> Callable:
    """A batching rule: ``op`` once per index of the vmapped dimension, results stacked
    along a new leading dimension. Slices are made contiguous: the kernels read raw
    memory."""

    def take(arg: Any, dim: Any, i: int) -> Any:
        if dim is None or not isinstance(arg, Tensor):
            return arg
        return arg.select(dim, i).contiguous()

    def rule(info, in_dims, *args):
        n = info.batch_size
        if n == 0:
            raise ValueError(f"{op}: vmap over a dimension of size 0 is not supported")
        results = [op(*(take(a, d, i) for a, d in zip(args, in_dims))) for i in range(n)]
        return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])

    return rule


for _op in (_lstm_forward, _lstm_backward, _gru_forward, _gru_backward):
    _op.register_vmap(_per_sample_rule(_op))


_IMPLS = {"lstm_forward": _lstm_forward_impl, "lstm_backward": _lstm_backward_impl,
          "gru_forward": _gru_forward_impl, "gru_backward": _gru_backward_impl}
_PLAIN = (Tensor, torch.nn.Parameter)


def call(name: str, *args: Any) -> Any:
    """The operator ``name`` (``torch.ops.hwbptt.<name>``) on ``args``: through the
    dispatcher wherever a compiler or a ``torch.func`` transform has to see one call (a
    graph being traced, fake or functional tensors, batched tensors), else its Python
    implementation directly. Eager training then never imports ``torch._dynamo`` (which
    every call of a Python custom operator does, and with it Triton, which crashes a
    process that imported TensorFlow first) and skips the dispatcher's overhead."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or "VmapMode" in str(torch._C._dispatch_tls_local_include_set())  # is_grads_batched's vmap
            or any(isinstance(a, Tensor) and type(a) not in _PLAIN for a in args)):
        return getattr(torch.ops.hwbptt, name)(*args)
    return _IMPLS[name](*args)
