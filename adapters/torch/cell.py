"""``HighwayRNN``: Highway-BP for any recurrent cell ``cell(x_t, state) -> state``.

Notation (design note, sections 1-3). Steps are indexed ``t = 0 .. T-1`` here;
``s_t = F(x_t, s_{t-1}; θ)`` is the state *after* step ``t`` and ``s_{-1}`` the initial
state. A state is a tensor or a tuple of tensors; for the math it is the concatenation of
its components flattened per batch row. The residual of step ``t`` is the diagonal
``K_t = diag(a_t)``; the block part is ``J_t = ∂F/∂s_{t-1} - K_t``, only ever applied as a
VJP: ``λ J_t = λ ∂F/∂s_{t-1} - a_t ⊙ λ``.

Residuals (``a_t``) this module knows:

- ``nn.LSTMCell`` (state ``(h, c)``, PyTorch's order; gates ``i, f, g, o``):
  ``a_t = f_t`` on ``c``, nothing (0) on ``h``;
- ``nn.GRUCell`` (gates ``r, z, n``): ``a_t = z_t`` on ``h``;
- ``residual="identity"``: ``a_t = 1`` on every component (``s_t = s_{t-1} + g(...)``);
- ``residual=callable(x_t, state_prev, state_new) -> multipliers``: a tensor (tensor
  state) or a tuple matching the state, with ``None`` for components without residual;
  each multiplier broadcasts to its component's shape;
- no residual (``residual="none"``, or ``None`` for a cell this module does not know):
  ``a_t = 0``, the block is the whole step and Highway-BP is the fixed-point iteration.

Forward: a Python loop over ``T`` calling the cell, without an autograd graph, keeping
every state. Backward: the cell is called once on the flattened ``T·B`` batch (every
step's input and previous state) with grad enabled; that one graph serves every
Highway iteration's block VJP (``hwbptt.engine.highway_adjoint``) and then, with the
final adjoint ``w``, the gradients of the cell's parameters
(``Σ_t w_t ∂F/∂θ``), of the inputs (``w_t ∂F/∂x_t``) and of the initial state
(``w_0 ∂F/∂s_{-1}``). This needs a cell that treats batch rows independently and
deterministically: BatchNorm or dropout in training mode are refused, and the batched
recompute is compared to the states of the forward loop.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from hwbptt.options import CheckFiniteMixin, Diagnostics, HighwayOptionsMixin

from .auto import TRANSIENT, plan
from .cell_function import _HighwayRNNFunction, _refuse_double_backward, _Run
from .cell_parts import (_BATCHED_RECOMPUTE, _check_residual_option, _components, _describe, _loop, _pack, _Residual,
                         _row_mixing_modules)
from .finite import nonfinite_at, nonfinite_at_step, raise_nonfinite
from .layer import forward_ad_requested, functorch_active

__all__ = ["HighwayRNN"]


# ----------------------------------------------------------------------------- module


class HighwayRNN(CheckFiniteMixin, nn.Module, HighwayOptionsMixin):
    """Run any recurrent cell over a sequence, trained with Highway-BP.

    ``HighwayRNN(cell, residual=None, batch_first=False, iterations=3, tol=None,
    gamma=0.0, diagnostics=False, check_finite=False)``

    ``cell(x_t, state) -> state``: an ``nn.LSTMCell``, ``nn.GRUCell`` (or ``nn.RNNCell``),
    or any module or function taking a batch ``x_t`` of shape (B, *F) and a state (a tensor
    (B, *S) or a tuple of such tensors, every component with the batch first) and
    returning a state of the same structure, shapes and dtypes. Batch rows must be
    independent and the cell deterministic (no BatchNorm or dropout in training mode):
    the backward recomputes all steps in one call on T·B rows.

    ``residual`` gives the diagonal residual ``K_t = diag(a_t)`` of each step:

    - ``None`` (default): ``f_t`` on ``c`` for ``nn.LSTMCell``, ``z_t`` for
      ``nn.GRUCell``; no residual (fixed-point iteration) for any other cell;
    - ``"identity"``: ``a_t = 1`` on every state component (``s_t = s_{t-1} + g(x_t, s_{t-1})``);
    - ``"none"``: no residual, whatever the cell (FPI);
    - a callable ``residual(x_t, state_prev, state_new) -> multipliers``: a tensor for a
      tensor state, a tuple matching a tuple state with ``None`` for components without
      residual; each broadcasts to its component's shape. It is called without grad,
      on the first step in the forward (to check it) and on all T·B rows at once in the
      backward. Its value only decides the split ``J + K``; with enough iterations the
      gradient is exact whatever it returns.

    ``batch_first``: input and outputs are (B, T, ...) instead of (T, B, ...), as in
    ``nn.RNN`` (the state is unaffected).

    Highway options (validated attributes, changeable between steps): ``iterations``
    (int >= 0, capped at T; ``None`` for exact), ``tol`` (relative early stop),
    ``gamma`` (residual shift, ``1`` is FPI), ``diagnostics`` (``False``, ``True`` or
    ``"debug"``), ``fidelity`` and ``probe_every`` (for ``iterations="auto"``: every
    ``probe_every`` steps the exact adjoint, by BPTT through the loop, and the ladder's
    cosines and times are measured, and the fastest mode whose cosine reaches ``fidelity``
    is used until the next probe; ``highway_auto.history`` records the choices). A fixed
    ``k`` whose updates grow, or shrink far too slowly (``unconverged``), warns once (``hwbptt.HighwayDivergenceWarning``). ``split``
    (an LSTM-layer option) is not used here.

    ``check_finite`` (bool, default ``False``; a validated attribute): raise
    ``FloatingPointError`` for a NaN/Inf in the input, the initial state (naming its batch
    row), the outputs or final state (forward), or the upstream gradient of the outputs or
    of the final state (backward), naming the tensor and the first time step where it
    appears. When ``False``, non-finite values propagate as BPTT propagates them.

    Gradient modes:

    - under ``torch.no_grad()`` or when nothing (input, state, cell parameters) requires
      grad: just the loop;
    - exact (``iterations=None`` and ``tol=None``): plain autograd through the Python
      loop, i.e. BPTT, exactly;
    - otherwise Highway-BP: the loop runs without a graph; the backward calls the cell
      once on the T·B batch and reuses that graph for every iteration's block VJP and
      the final parameter/input/initial-state VJP. Gradients reach the cell's
      ``parameters()``, the input and the initial state (other tensors the cell may
      capture get none). The batched recompute is compared to the forward's states (the
      same non-finite entries, the same finite values up to rounding) and a mismatch
      raises ``RuntimeError``. NaN/Inf propagate as in BPTT.

    On the Highway path, ``torch.func`` transforms, forward-mode AD and batched gradients
    (``is_grads_batched``) raise ``RuntimeError`` naming ``iterations=None`` (the backward
    recomputes the cell with ``torch.autograd``, which those transforms do not allow);
    exact mode is autograd through the loop and supports them as the cell does.
    ``torch.compile`` traces the forward loop; the backward runs eagerly.
    ``torch.jit.script`` raises ``RuntimeError``; ``torch.jit.trace`` raises
    ``RuntimeError`` on the Highway path (trace under ``torch.no_grad()`` or with
    ``iterations=None``: the trace records the loop).

    ``forward(input, state=None) -> (outputs, final_state)``:

    - ``input``: (T, B, *F), or (B, T, *F) with ``batch_first``; a 2-D input (T, I) is one
      unbatched sequence (the batch dimension is added for the cell and removed from the
      results, as PyTorch's RNNs do; ``state`` is then unbatched too).
    - ``state``: the initial state, or ``None`` for zeros: inferred for
      ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell``; other cells must define
      ``cell.initial_state(batch_size, device, dtype)`` or be given ``state``.
    - ``outputs``: the stacked states (T, B, *S) for a tensor state; for a tuple state the
      stacked first component (the ``h``'s for ``nn.LSTMCell``).
    - ``final_state``: the last state, tensor or tuple like the cell's.

    With ``diagnostics`` on, ``last_diagnostics`` holds a ``hwbptt.Diagnostics`` after each
    Highway-BP backward (iterations used, update norms; with ``"debug"`` also ``cosine``,
    the estimate's cosine to the exact adjoint over all steps, computed with T more
    iterations). It stays ``None`` in exact mode.
    """

    def __init__(
        self,
        cell: Callable,
        residual: Any = None,
        batch_first: bool = False,
        iterations: int | None = 3,
        tol: float | None = None,
        gamma: float = 0.0,
        diagnostics: bool | str = False,
        check_finite: bool = False,
        fidelity: float = 0.99,
        probe_every: int = 50,
    ):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be a callable cell(x_t, state) -> state, got cell={cell!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got batch_first={batch_first!r}")
        self.cell = cell
        # Not registered as a submodule even when it is one: it only decides the split.
        object.__setattr__(self, "residual", _check_residual_option(residual))
        self.batch_first = batch_first
        self._set_highway_options(iterations=iterations, tol=tol, gamma=gamma, diagnostics=diagnostics,
                                  fidelity=fidelity, probe_every=probe_every)
        self.check_finite = check_finite
        self.last_diagnostics: Diagnostics | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["last_diagnostics"] = None  # transient: pickled models carry no Diagnostics
        for name in TRANSIENT:  # nor the "auto" controller's measurements and warnings
            state.pop(name, None)
        return state

    @property
    def highway_auto(self):
        """The ``"auto"`` controller (``hwbptt.auto.AutoController``: ``choice``, ``history``)."""
        from .auto import controller

        return controller(self)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "HighwayRNN cannot be compiled by torch.jit.script: its forward is a Python loop over any cell and its "
            "Highway-BP backward is a Python torch.autograd.Function. Use torch.compile, or script a loop over the "
            "cell itself (its gradient is BPTT's)."
        )

    def extra_repr(self) -> str:
        res = self.residual if isinstance(self.residual, (str, type(None))) else getattr(self.residual, "__name__", "callable")
        extra = (
            f"residual={res!r}, batch_first={self.batch_first}, iterations={self.iterations!r}, "
            f"tol={self.tol}, gamma={self.gamma}, diagnostics={self.diagnostics!r}"
        )
        if self.check_finite:
            extra += ", check_finite=True"
        return extra

    # -- initial state ---------------------------------------------------------------------

    def _zero_state(self, batch: int, x: torch.Tensor) -> Any:
        cell = self.cell
        if isinstance(cell, nn.LSTMCell):
            z = torch.zeros(batch, cell.hidden_size, device=x.device, dtype=x.dtype)
            return (z, z.clone())
        if isinstance(cell, (nn.GRUCell, nn.RNNCell)):
            return torch.zeros(batch, cell.hidden_size, device=x.device, dtype=x.dtype)
        hook = getattr(cell, "initial_state", None)
        if callable(hook):
            return hook(batch, x.device, x.dtype)
        raise ValueError(
            f"state=None needs a way to build the initial state: {type(cell).__name__} is not nn.LSTMCell, "
            "nn.GRUCell or nn.RNNCell and has no initial_state(batch_size, device, dtype) method; pass state"
        )

    def _prepare_state(self, state: Any, batch: int, unbatched: bool, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
        given = state is not None
        if not given:
            state = self._zero_state(batch, x)
            unbatched_state = False
        else:
            unbatched_state = unbatched
        is_tuple = isinstance(state, (tuple, list))
        comps = _components(state)
        if not comps or not all(isinstance(c, torch.Tensor) for c in comps):
            raise TypeError(f"state must be a tensor or a tuple of tensors, got a {_describe(state)}")
        if unbatched_state:
            comps = tuple(c.unsqueeze(0) for c in comps)
        for i, c in enumerate(comps):
            if c.dim() == 0 or c.shape[0] != batch:
                where = "state" if given else "cell.initial_state(...)"
                raise ValueError(
                    f"{where}: component {i} of shape {tuple(c.shape)} does not have the batch size {batch} "
                    "as its first dimension" + (" (an unbatched input takes an unbatched state)" if unbatched else "")
                )
        return comps, is_tuple

    # -- forward -----------------------------------------------------------------------------

    def forward(self, input: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a tensor, got input of type {type(input).__name__}")
        if input.dim() < 2:
            raise ValueError(f"input must be (T, B, *F), (B, T, *F) with batch_first, or unbatched (T, I); got shape {tuple(input.shape)}")
        unbatched = input.dim() == 2
        if unbatched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        T, B = x.shape[0], x.shape[1]
        if T == 0:
            raise ValueError(f"input must have at least one time step, got shape {tuple(input.shape)}")
        s0, is_tuple = self._prepare_state(state, B, unbatched, x)
        check = self.check_finite
        time_dim = 1 if self.batch_first and not unbatched else 0  # of the input and the outputs
        if check:
            self._check_inputs_finite(input, time_dim, s0, is_tuple)
        options = self.highway_options
        residual = _Residual(_check_residual_option(self.residual), self.cell)
        params = [p for p in self.cell.parameters() if p.requires_grad] if isinstance(self.cell, nn.Module) else []

        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(c.requires_grad for c in s0) or bool(params)
        )
        if options.auto and needs_grad:  # hook: "auto" resolved to this step's mode (hwbptt.torch.auto)
            options = plan(self, options, T)
        if not needs_grad or options.exact:
            stacked = _loop(self.cell, x, s0, is_tuple)
            self._check_residual_once(residual, x, s0, stacked, is_tuple)
        else:
            if torch.jit.is_tracing():
                raise RuntimeError(
                    "HighwayRNN: torch.jit.trace cannot record Highway-BP's backward (a Python "
                    "torch.autograd.Function). Trace under torch.no_grad() or with iterations=None (the loop over "
                    "the cell and BPTT)."
                )
            what = None
            if forward_ad_requested(x, *s0, *params):
                what = "forward-mode AD (torch.func.jvp, torch.autograd.forward_ad)"
            elif functorch_active():
                what = "a torch.func transform (vmap, grad, vjp, jacrev, ...)"
            if what is not None:
                raise RuntimeError(
                    f"HighwayRNN: {what} is not supported by Highway-BP (iterations={options.iterations}): its "
                    "backward recomputes the cell under torch.autograd, which torch.func does not allow inside a "
                    "transform, and it has no forward-mode rule. Use iterations=None (autograd through the loop "
                    "over the cell, which supports it)."
                )
            norms, drops = _row_mixing_modules(self.cell)
            if norms or drops:
                what = []
                if norms:
                    what.append(f"BatchNorm in training mode ({', '.join(norms)}) mixes batch rows")
                if drops:
                    what.append(f"dropout in training mode ({', '.join(drops)}) is random")
                raise RuntimeError("HighwayRNN refuses this cell: " + "; ".join(what) + ". " + _BATCHED_RECOMPUTE)
            run = _Run(self, residual, options, len(s0), is_tuple)
            stacked = list(_HighwayRNNFunction.apply(run, x, *s0, *params))
            for s in stacked:
                if s.requires_grad:
                    s.register_hook(_refuse_double_backward)
            self._check_residual_once(residual, x, s0, [s.detach() for s in stacked], is_tuple)

        outputs = stacked[0]
        final = _pack([s[-1] for s in stacked], is_tuple)
        if unbatched:
            outputs = outputs.squeeze(1)
            final = _pack([c.squeeze(0) for c in _components(final)], is_tuple)
        elif self.batch_first:
            outputs = outputs.transpose(0, 1)
        if check:
            self._guard_outputs(outputs, time_dim, final, is_tuple, T)
        return outputs, final

    # -- check_finite ------------------------------------------------------------------------

    @staticmethod
    def _state_names(n: int, is_tuple: bool, what: str) -> list[str]:
        return [f"{what}[{i}]" for i in range(n)] if is_tuple else [what]

    def _check_inputs_finite(self, input: torch.Tensor, time_dim: int, s0: tuple[torch.Tensor, ...], is_tuple: bool) -> None:
        raise_nonfinite("HighwayRNN", "input", nonfinite_at(input, time_dim), "forward")
        for name, c in zip(self._state_names(len(s0), is_tuple, "initial state"), s0):
            # found along dim 0 of the state: the batch row (the state precedes step 0)
            raise_nonfinite("HighwayRNN", name, nonfinite_at(c, 0), "forward", "batch row")

    def _guard_outputs(self, outputs: torch.Tensor, time_dim: int, final: Any, is_tuple: bool, T: int) -> None:
        """The forward check of the outputs and final state; hooks checking their upstream
        gradients in the backward."""
        finals = _components(final)
        names = self._state_names(len(finals), is_tuple, "final state")
        raise_nonfinite("HighwayRNN", "output", nonfinite_at(outputs, time_dim), "forward")
        for name, f in zip(names, finals):
            raise_nonfinite("HighwayRNN", name, nonfinite_at_step(f, T - 1), "forward")
        if not torch.is_grad_enabled():
            return

        def hook(what: str, time_dim: int | None):
            def fn(grad: torch.Tensor) -> None:
                if grad is None or not grad.numel():
                    return
                found = nonfinite_at_step(grad, T - 1) if time_dim is None else nonfinite_at(grad, time_dim)
                raise_nonfinite("HighwayRNN", f"the upstream gradient of {what}", found, "backward")
            return fn

        if outputs.requires_grad:
            outputs.register_hook(hook("output", time_dim))
        for name, f in zip(names, finals):
            if f.requires_grad:
                f.register_hook(hook(name, None))

    @staticmethod
    def _check_residual_once(residual: _Residual, x, s0, stacked, is_tuple) -> None:
        """Check the residual's multipliers against the state on the first step (cheap),
        so that a bad residual fails at the call, not in the backward."""
        if residual.kind in ("callable",):
            with torch.no_grad():
                residual.multipliers(x[0], tuple(c.detach() for c in s0), tuple(s[0].detach() for s in stacked), is_tuple)
