"""``HighwayLSTM`` and ``HighwayGRU``: drop-in subclasses of ``nn.LSTM`` and ``nn.GRU``.

Same constructor arguments, forward signature, outputs and ``state_dict`` keys as the
parents, plus the Highway options (``hwbptt.options``). The forward runs the parent's
fused kernel one layer and direction at a time; the backward is Highway-BP.

When is which path taken (nothing switches silently: each is the documented behaviour):

- no gradient needed (``torch.no_grad()``, nothing requires grad): the parent's forward
  on padded input; a ``PackedSequence`` runs at padded speed (below);
- ``iterations=None`` and no ``tol`` (exact): the parent's own forward and autograd
  (BPTT through the fused kernel); for a ``PackedSequence``, autograd through the padded
  fused kernel. Except on the CPU fast path (float32/float64, the C kernels built, no
  ``proj_size``, no ``torch.jit.trace``; ``torch.compile`` included): BPTT's adjoint as one
  C time loop on the gates the forward kept (``layer._LSTMFunction``,
  ``layer._GRUFunction`` in exact mode), the same gradient in less time than the parent's
  backward (``docs/performance.md``); under ``create_graph=True`` that backward
  differentiates the fused kernel with autograd, so higher-order gradients work;
- forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad`` dual tensors) or
  nested ``torch.func`` gradient transforms: in exact mode the parent's forward (which
  supports them); in Highway mode ``RuntimeError`` naming ``iterations=None``;
- other ``torch.func`` transforms (``vmap``, ``grad``, ``vjp``, ``jacrev``): this layer's
  Functions, in exact mode too (the parent's kernels have no batching rule); vmap runs the
  layer once per sample;
- an empty input (batch 0, T = 0, no features): the parent's forward and autograd (its
  error for T = 0; for an empty batch every gradient is zero under either algorithm);
- otherwise: Highway-BP with the options read at this forward call.

Highway-BP's backward is not differentiable: a backward with ``create_graph=True``
through a Highway layer raises ``RuntimeError`` (use ``iterations=None`` for higher-order
gradients). ``torch.jit.script`` raises ``RuntimeError`` (the backward is a Python
``autograd.Function``); ``torch.jit.trace`` raises ``RuntimeError`` on the Highway path
(trace under ``torch.no_grad()`` or with ``iterations=None``). ``torch.compile`` sees the
forward and backward as registered operators (``ops``): no graph break, Highway-BP runs
in the compiled backward, and ``last_diagnostics`` is filled there too (the entries of
the previous backward are overwritten, not cleared at the forward, in compiled code).

Pickling (``torch.save(model)``, ``copy.deepcopy``) keeps the options and parameters, not
``last_diagnostics`` (transient); ``torch.load(..., weights_only=True)`` of a whole model
needs ``torch.serialization.add_safe_globals([HighwayLSTM, HighwayGRU])``.

``check_finite=True`` raises ``FloatingPointError`` for a NaN/Inf in the input, the initial
state or the outputs (forward) or in the upstream gradient of an output (backward),
naming the tensor and the first time step where it appears.

``PackedSequence`` inputs run on the padded batch (the fused kernel on a packed batch
is 10-100x slower): forward states are the same for ``t < length``, the final state is
taken at ``length - 1``, and the reverse direction reverses each sequence within its own
length. Dropout between layers is ``F.dropout``: the same distribution as the parent's,
not the same random stream.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from hwbptt import Diagnostics, HighwayOptionsMixin
from hwbptt.options import CheckFiniteMixin

from . import auto as highway_auto
from . import ops
from .dispatch import exact_adjoint_pays
from .finite import nonfinite_at, nonfinite_at_step, raise_nonfinite
from .layer import (exact_by_tape, forward_ad_requested, functorch_active, functorch_grad_levels, gru_layer, lstm_layer,
                    reverse_within)

__all__ = ["HighwayLSTM", "HighwayGRU"]


def _packed_steps(batch_sizes: torch.Tensor) -> torch.Tensor:
    """Time index of every row of a ``PackedSequence``'s data."""
    return torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes.cpu())


class _HighwayRNNBase(CheckFiniteMixin, HighwayOptionsMixin):
    """The layer/direction loop shared by ``HighwayLSTM`` and ``HighwayGRU``.

    The subclass supplies ``_state_sizes()`` (one size per state tensor) and ``_layer``
    (one layer and direction: ``(x, states, flat_weights, lengths, options, key) ->
    (y, final_states)``, storing diagnostics under ``self._diagnostics_handle`` and ``key``).

    ``last_diagnostics`` lives outside the module, in ``ops``' sink registry under an int
    handle (what the backward operator receives): it is not pickled, and a copy or an
    unpickled module gets a fresh, empty one.
    """

    @property
    def highway_auto(self):
        """The ``"auto"`` controller (``hwbptt.auto.AutoController``: ``choice``, ``history``)."""
        return highway_auto.controller(self)

    def _init_highway(self, iterations: Any, tol: Any, gamma: Any, split: Any, diagnostics: Any, check_finite: Any,
                      fidelity: Any = 0.99, probe_every: Any = 50) -> None:
        self._set_highway_options(iterations=iterations, tol=tol, gamma=gamma, split=split, diagnostics=diagnostics,
                                  fidelity=fidelity, probe_every=probe_every)
        self.check_finite = check_finite
        self._open_diagnostics()

    def _open_diagnostics(self) -> None:
        # The backward stores each layer's diagnostics here; each entry runs auto.after_backward
        # (the "auto" controller, the divergence warning).
        handle = ops.open_sink(highway_auto.Sink(self))
        self.__dict__["_diagnostics_handle"] = handle
        weakref.finalize(self, ops.close_sink, handle)

    @property
    def last_diagnostics(self) -> dict[tuple[int, int], Diagnostics]:
        """``(layer, direction) -> hwbptt.Diagnostics`` of the last backward."""
        return ops.sink_of(self._diagnostics_handle)

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # RNNBase drops its weight references
        state.pop("_diagnostics_handle", None)
        for name in highway_auto.TRANSIENT:  # the "auto" controller's measurements and warnings
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._open_diagnostics()

    def extra_repr(self) -> str:
        o = self.highway_options
        extra = f", iterations={o.iterations!r}, tol={o.tol}, gamma={o.gamma}, split={o.split!r}"
        if o.auto:
            extra += f", fidelity={o.fidelity}, probe_every={o.probe_every}"
        if self.check_finite:
            extra += ", check_finite=True"
        return super().extra_repr() + extra

    # -- what the parent supports and this layer cannot --------------------------------
    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: its Highway-BP backward is a Python "
            "torch.autograd.Function. Use torch.compile, or script a plain "
            f"nn.{next(c for c in type(self).__mro__ if c in (nn.LSTM, nn.GRU)).__name__} holding the same state_dict "
            "(its gradient is BPTT's)."
        )

    # -- the parent's behaviour, kept --------------------------------------------------
    def _exact_by_tape(self, input: Any, hx: Any) -> bool:
        """Whether exact mode runs this layer's own exact backward (``layer._LSTMFunction``,
        ``layer._GRUFunction``: BPTT's adjoint as a C time loop on the gates the forward
        kept) rather than the parent's forward and autograd. ATen's CPU GRU backward is a loop of
        small operators per step, and oneDNN's LSTM backward measured slower than the C loop."""
        if getattr(self, "proj_size", 0):
            return False
        if isinstance(self, nn.LSTM) and isinstance(input, torch.Tensor):
            T = input.shape[1 if self.batch_first and input.dim() == 3 else 0]
            if not exact_adjoint_pays("lstm", T, self.hidden_size):  # oneDNN's exact BPTT is faster there
                return False
        states = [] if hx is None else list(self._as_tuple(hx))
        return exact_by_tape(input, *states, *self._flat_weights)

    def _needs_grad(self, input: Any, hx: Any) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [input.data if isinstance(input, PackedSequence) else input, *self._flat_weights]
        tensors += list(hx) if isinstance(hx, tuple) else [hx]
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)

    def _parent_for_transforms(self, input: Any, hx: Any, options: Any) -> bool:
        """Forward-mode AD and nested ``torch.func`` gradients: the parent's forward in exact
        mode (it supports them), a clear error in Highway mode."""
        data = input.data if isinstance(input, PackedSequence) else input
        states = [] if hx is None else list(self._as_tuple(hx))
        weights = [getattr(self, n) for n in self._flat_weights_names]
        if forward_ad_requested(data, *states, *weights):
            what = "forward-mode AD (torch.func.jvp, torch.autograd.forward_ad)"
        elif functorch_grad_levels() > 1:
            what = "a derivative of a derivative (nested torch.func gradient transforms)"
        else:
            return False
        if options.exact:
            return True
        raise RuntimeError(
            f"{type(self).__name__}: {what} is not supported by Highway-BP (iterations={options.iterations}), "
            "whose gradient is computed once, in the backward. Use iterations=None: exact mode runs the "
            "parent's forward, which supports it."
        )

    def forward(self, input, hx=None):
        if torch.compiler.is_compiling():
            return self._forward(input, hx)
        # Run eagerly, nested frames included: Dynamo refuses any nn.LSTM/nn.GRU instance
        # (this one too) unless torch._dynamo.config.allow_rnn is set, and it would then
        # compile this layer's inner functions one by one, slower than running them. Without
        # Dynamo in the process there is nothing to keep out (and importing it here would
        # import Triton, which crashes a process that imported TensorFlow first).
        if "torch._dynamo" not in sys.modules:
            return self._forward(input, hx)
        return _forward_eagerly()(self, input, hx)

    def _forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        options = self.highway_options
        if options.auto and self._needs_grad(input, hx):  # hook: "auto" resolved to this step's mode
            steps = len(input.batch_sizes) if packed else input.shape[self._time_dim(input)]
            options = highway_auto.plan(self, options, steps)
        check = self.check_finite
        if check:
            self._check_inputs_finite(input, hx)
        if self._parent_for_transforms(input, hx, options):
            parent = True
        elif functorch_active():  # vmap/grad/jacrev: the parent's kernels have no batching rule
            parent = not packed and input.numel() == 0
        else:
            parent = not packed and ((options.exact and not self._exact_by_tape(input, hx)) or not self._needs_grad(input, hx) or input.numel() == 0)
        if not parent and torch.jit.is_tracing():
            raise RuntimeError(
                f"{type(self).__name__}: torch.jit.trace cannot record Highway-BP's backward (a Python "
                "torch.autograd.Function). Trace under torch.no_grad() or with iterations=None (the parent's "
                "kernel and BPTT)."
            )
        if parent:
            output, h = super().forward(input, hx)
        else:
            self._update_flat_weights()
            if packed:
                output, h = self._forward_packed(input, hx, options)
            else:
                output, h = self._forward_padded(input, hx, options)
        if check:
            self._guard_outputs(input, output, h)
        return output, h

    # -- check_finite ----------------------------------------------------------------------
    def _time_dim(self, input: Any) -> int:
        return 1 if self.batch_first and isinstance(input, torch.Tensor) and input.dim() == 3 else 0

    def _raise_nonfinite(self, what: str, found: tuple[int, float] | None, phase: str, step_name: str = "step") -> None:
        raise_nonfinite(type(self).__name__, what, found, phase, step_name)

    def _check_inputs_finite(self, input: Any, hx: Any) -> None:
        if isinstance(input, PackedSequence):
            found = nonfinite_at(input.data, 0)
            if found is not None:
                found = (int(_packed_steps(input.batch_sizes)[found[0]]), found[1])
            self._raise_nonfinite("input", found, "forward")
        elif isinstance(input, torch.Tensor) and input.numel():
            self._raise_nonfinite("input", nonfinite_at(input, self._time_dim(input)), "forward")
        if hx is not None:
            for i, s in enumerate(self._as_tuple(hx)):
                if isinstance(s, torch.Tensor) and s.numel():
                    # found along dim 0 of the state: the layer·direction index (the state precedes step 0)
                    self._raise_nonfinite(f"initial state hx[{i}]", nonfinite_at(s, 0), "forward", "layer/direction index")

    def _guard_outputs(self, input: Any, output: Any, h: Any) -> None:
        """Forward check of the outputs; backward hooks checking the upstream gradients.
        (The Highway path's refusal of ``create_graph=True`` is in its backward,
        ``layer._LSTMFunction``.)"""
        packed = isinstance(output, PackedSequence)
        out = output.data if packed else output
        steps = _packed_steps(output.batch_sizes) if packed else None
        time_dim = 0 if packed else self._time_dim(input)
        finals = self._as_tuple(h)
        T = int(len(output.batch_sizes)) if packed else out.shape[time_dim]
        if out.numel():
            found = nonfinite_at(out, time_dim)
            if found is not None and steps is not None:
                found = (int(steps[found[0]]), found[1])
            self._raise_nonfinite("output", found, "forward")
            for i, s in enumerate(finals):
                self._raise_nonfinite(f"final state h_n[{i}]", nonfinite_at_step(s, T - 1), "forward")
        if not torch.is_grad_enabled():
            return

        def hook(what: str, time_dim: int | None):
            def fn(grad: torch.Tensor) -> None:
                if grad is not None and grad.numel():
                    if time_dim is None:  # a final state: read at the last step
                        found = nonfinite_at_step(grad, T - 1)
                    else:
                        found = nonfinite_at(grad, time_dim)
                        if found is not None and steps is not None:
                            found = (int(steps[found[0]]), found[1])
                    self._raise_nonfinite(f"the upstream gradient of {what}", found, "backward")
            return fn

        if out.requires_grad:
            out.register_hook(hook("output", time_dim))
        for i, s in enumerate(finals):
            if s.requires_grad:
                s.register_hook(hook(f"h_n[{i}]" if len(finals) > 1 else "h_n", None))

    def _default_state(self, batch: int, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        D = 2 if self.bidirectional else 1
        return tuple(ref.new_zeros(self.num_layers * D, batch, size) for size in self._state_sizes())

    def _as_tuple(self, hx: Any) -> tuple[torch.Tensor, ...]:
        return tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)

    def _from_tuple(self, states: tuple[torch.Tensor, ...]) -> Any:
        return states if len(states) > 1 else states[0]

    def _forward_padded(self, input: torch.Tensor, hx: Any, options: Any):
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        batch = input.shape[0 if self.batch_first else 1]
        if hx is None:
            states = self._default_state(batch, input)
        else:
            states = self._as_tuple(hx)
            want = 3 if batched else 2
            if any(s.dim() != want for s in states):
                dims = ", ".join(f"{s.dim()}-D" for s in states)
                raise RuntimeError(
                    f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx should also be {want}-D but got ({dims}) tensors"
                )
            if not batched:
                states = tuple(s.unsqueeze(1) for s in states)
        self.check_forward_args(input, self._from_tuple(states), None)
        x = input.transpose(0, 1) if self.batch_first else input
        y, finals = self._run_layers(x, states, None, options)
        if self.batch_first:
            y = y.transpose(0, 1)
        if not batched:
            y = y.squeeze(0 if self.batch_first else 1)
            finals = tuple(s.squeeze(1) for s in finals)
        return y, self._from_tuple(finals)

    def _forward_packed(self, input: PackedSequence, hx: Any, options: Any):
        padded, lengths = pad_packed_sequence(input)  # time-major, original batch order
        lengths = lengths.to(padded.device)
        states = self._default_state(padded.shape[1], padded) if hx is None else self._as_tuple(hx)
        self.check_input(input.data, input.batch_sizes)
        for s, size in zip(states, self._state_sizes()):
            self.check_hidden_size(s, (self.num_layers * (2 if self.bidirectional else 1), padded.shape[1], size))
        y, finals = self._run_layers(padded, states, lengths, options)
        order = input.sorted_indices
        if order is not None:
            y, lengths = y[:, order], lengths[order]
        data = pack_padded_sequence(y, lengths.cpu(), enforce_sorted=True).data
        return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), self._from_tuple(finals)

    def _run_layers(self, x: torch.Tensor, states: tuple[torch.Tensor, ...], lengths: torch.Tensor | None, options: Any):
        """Run every layer and direction; ``options=None``-like exact mode when ``options.exact``."""
        D = 2 if self.bidirectional else 1
        per_layer = len(self._flat_weights) // (self.num_layers * D)
        layer_options = None if options.exact else options
        if not torch.compiler.is_compiling():
            self.last_diagnostics.clear()
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(D):
                idx = layer * D + direction
                flat = self._flat_weights[idx * per_layer : (idx + 1) * per_layer]
                inp = layer_input if direction == 0 else reverse_within(layer_input, lengths)
                y, last = self._layer(inp, tuple(s[idx] for s in states), flat, lengths, layer_options, (layer, direction))
                outputs.append(y if direction == 0 else reverse_within(y, lengths))
                for acc, s in zip(finals, last):
                    acc.append(s)
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, tuple(torch.stack(acc) for acc in finals)


_EAGER: list = []


def _forward_eagerly():
    """``_HighwayRNNBase._forward`` kept out of Dynamo (``torch.compiler.disable``), made at
    the first call with Dynamo loaded."""
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_HighwayRNNBase._forward))
    return _EAGER[0]


class HighwayLSTM(_HighwayRNNBase, nn.LSTM):
    r"""``nn.LSTM`` trained with Highway backpropagation.

    Args: every argument of ``nn.LSTM`` (``input_size, hidden_size, num_layers=1,
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
    device=None, dtype=None``), plus, keyword-only:

    - ``iterations`` (int >= 0, None or ``"auto"``, default 3): Highway iterations; None is
      exact BPTT; ``"auto"`` probes every ``probe_every`` steps and uses the fastest mode
      whose gradient cosine to exact is at least ``fidelity`` (``hwbptt.auto``; the choices
      are in ``layer.highway_auto.history``).
    - ``fidelity`` (float in (0, 1], default 0.99), ``probe_every`` (int >= 1, default 50):
      ``"auto"``'s target and probe interval (training steps: forward passes that need a
      gradient).
    - ``tol`` (float > 0 or None): stop once the relative update is below ``tol``.
    - ``gamma`` (float in [0, 1], default 0): residual shift; 1 is FPI.
    - ``split`` (``"gates"`` default, or ``"step"``): what counts as a block.
    - ``diagnostics`` (False, True or ``"debug"``): fill ``last_diagnostics`` in backward.
    - ``check_finite`` (bool, default False): raise ``FloatingPointError`` at the first
      non-finite value in the input, state, outputs or upstream gradient (module docstring).

    Inputs, outputs and shapes are ``nn.LSTM``'s: ``input`` (L, N, H_in) (or (N, L, H_in)
    with ``batch_first``, (L, H_in) unbatched, or a ``PackedSequence``), ``(h_0, c_0)``
    (D·num_layers, N, H_out) and (D·num_layers, N, H_cell); returns ``output, (h_n, c_n)``.

    ``last_diagnostics`` maps ``(layer, direction)`` to ``hwbptt.Diagnostics`` after a
    backward pass (with ``diagnostics`` set; ``diverged``/``growth`` always, a probe's
    measurements in ``probe``). A fixed ``k`` whose updates grow (a diverging path sum), or
    shrink so slowly that the estimated rest outweighs the estimate (``unconverged``), warns
    once per layer and direction (``hwbptt.HighwayDivergenceWarning``).
    """

    def __init__(self, *args, iterations=3, tol=None, gamma=0.0, split="gates", diagnostics=False, check_finite=False,
                 fidelity=0.99, probe_every=50, **kwargs):
        nn.LSTM.__init__(self, *args, **kwargs)
        self._init_highway(iterations, tol, gamma, split, diagnostics, check_finite, fidelity, probe_every)

    def _state_sizes(self) -> tuple[int, int]:
        return (self.proj_size if self.proj_size > 0 else self.hidden_size, self.hidden_size)

    def _layer(self, x, states, flat, lengths, options, key):
        y, h_last, c_last = lstm_layer(x, states[0], states[1], flat, self.bias, lengths, options, key=key,
                                       handle=self._diagnostics_handle, name=type(self).__name__)
        return y, (h_last, c_last)


class HighwayGRU(_HighwayRNNBase, nn.GRU):
    r"""``nn.GRU`` trained with Highway backpropagation.

    Args: every argument of ``nn.GRU`` (``input_size, hidden_size, num_layers=1,
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None,
    dtype=None``) plus the keyword-only Highway options of ``HighwayLSTM`` (``split``
    is accepted for a uniform interface; a GRU has a single way to split).

    Inputs, outputs and shapes are ``nn.GRU``'s: returns ``output, h_n``.
    """

    def __init__(self, *args, iterations=3, tol=None, gamma=0.0, split="gates", diagnostics=False, check_finite=False,
                 fidelity=0.99, probe_every=50, **kwargs):
        nn.GRU.__init__(self, *args, **kwargs)
        self._init_highway(iterations, tol, gamma, split, diagnostics, check_finite, fidelity, probe_every)

    def _state_sizes(self) -> tuple[int]:
        return (self.hidden_size,)

    def _layer(self, x, states, flat, lengths, options, key):
        y, h_last = gru_layer(x, states[0], flat, self.bias, lengths, options, key=key,
                              handle=self._diagnostics_handle, name=type(self).__name__)
        return y, (h_last,)
