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

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from hwbptt.engine import highway_adjoint
from hwbptt.options import CheckFiniteMixin, Diagnostics, HighwayOptions, HighwayOptionsMixin, effective_iterations
from .scan import TORCH_OPS

from .auto import TRANSIENT, after_backward, plan, probe_adjoint
from .finite import nonfinite_at, nonfinite_at_step, raise_nonfinite
from .layer import forward_ad_requested, functorch_active

__all__ = ["HighwayRNN"]


def _refuse_double_backward(grad: torch.Tensor) -> None:
    """Output hook: the engine runs it with grad mode on exactly when ``create_graph=True``.
    The Highway backward is computed once and is not differentiable, so a second
    derivative through it would silently lose this layer's part."""
    # torch.func transforms always run the backward with grad mode on; nested gradient
    # transforms are refused at the forward instead (``HighwayRNN.forward``).
    if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "HighwayRNN: double backward (create_graph=True) is not supported by Highway-BP: its "
            "backward is not differentiable. Use iterations=None (exact BPTT by autograd) for "
            "higher-order gradients."
        )

_RESIDUAL_NAMES = ("identity", "none")


# ----------------------------------------------------------------------------- state helpers


def _components(state: Any) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def _pack(components: Sequence[torch.Tensor], is_tuple: bool) -> Any:
    return tuple(components) if is_tuple else components[0]


def _describe(state: Any) -> str:
    if isinstance(state, torch.Tensor):
        return f"tensor of shape {tuple(state.shape)} and dtype {state.dtype}"
    if isinstance(state, (tuple, list)):
        return f"{type(state).__name__} of {len(state)} (" + ", ".join(_describe(s) for s in state) + ")"
    return f"{type(state).__name__}"


def _check_new_state(new: Any, old: tuple[torch.Tensor, ...], is_tuple: bool, step: int) -> tuple[torch.Tensor, ...]:
    """The cell's output state must have the structure, shapes and dtypes of its input state."""
    bad = None
    if is_tuple:
        if not isinstance(new, (tuple, list)) or len(new) != len(old):
            bad = "structure"
    elif not isinstance(new, torch.Tensor):
        bad = "structure"
    if bad is None:
        comps = _components(new)
        for n, o in zip(comps, old):
            if not isinstance(n, torch.Tensor) or n.shape != o.shape or n.dtype != o.dtype:
                bad = "shape or dtype"
                break
    if bad is not None:
        expected = _describe(_pack(old, is_tuple))
        raise ValueError(
            f"HighwayRNN: the cell's output state does not match its input state ({bad}) at step {step}: "
            f"the cell was given a {expected} and returned a {_describe(new)}. "
            "A recurrent cell must return a state of the same structure, shapes and dtypes."
        )
    return comps


def _loop(cell: Callable, x: torch.Tensor, s0: tuple[torch.Tensor, ...], is_tuple: bool) -> list[torch.Tensor]:
    """Run the cell over ``x`` (T, B, ...); return each state component stacked (T, B, ...)."""
    state = s0
    history: list[tuple[torch.Tensor, ...]] = []
    for t in range(x.shape[0]):
        state = _check_new_state(cell(x[t], _pack(state, is_tuple)), state, is_tuple, t)
        history.append(state)
    return [torch.stack(steps) for steps in zip(*history)]


def _flat(components: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], T: int, B: int) -> torch.Tensor:
    """Components (T·B, ...) -> one (T, B, N) tensor; ``None`` reads as zeros."""
    # Explicit sizes: with B = 0 (or an empty state) a -1 would be ambiguous.
    parts = [
        (torch.zeros_like(ref) if c is None else c).reshape(T, B, math.prod(ref.shape[1:]))
        for c, ref in zip(components, like)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _unflat(u: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(T, B, N) -> components shaped like ``like`` (T·B, ...)."""
    sizes = [math.prod(ref.shape[1:]) for ref in like]
    pieces = torch.split(u, sizes, dim=-1) if len(like) > 1 else (u,)
    return [p.reshape(ref.shape) for p, ref in zip(pieces, like)]


# ----------------------------------------------------------------------------- residuals


def _check_residual_option(residual: Any) -> Any:
    if residual is None or callable(residual):
        return residual
    if isinstance(residual, str):
        if residual in _RESIDUAL_NAMES:
            return residual
        raise ValueError(
            f"residual must be None, 'identity', 'none' or a callable (x_t, state_prev, state_new) -> multipliers, "
            f"got residual={residual!r}"
        )
    raise TypeError(
        f"residual must be None, 'identity', 'none' or a callable (x_t, state_prev, state_new) -> multipliers, "
        f"got residual={residual!r} of type {type(residual).__name__}"
    )


def _lstm_residual(cell: nn.LSTMCell, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple:
    """``(None, f_t)``: the forget gate carries ``c_{t-1}`` into ``c_t``; nothing on ``h``."""
    H = cell.hidden_size
    h = state[0]
    pre = x @ cell.weight_ih[H : 2 * H].T + h @ cell.weight_hh[H : 2 * H].T
    if cell.bias:
        pre = pre + cell.bias_ih[H : 2 * H] + cell.bias_hh[H : 2 * H]
    return (None, torch.sigmoid(pre))


def _gru_residual(cell: nn.GRUCell, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``z_t``: the update gate carries ``h_{t-1}`` into ``h_t`` (gate order r, z, n)."""
    H = cell.hidden_size
    pre = x @ cell.weight_ih[H : 2 * H].T + state @ cell.weight_hh[H : 2 * H].T
    if cell.bias:
        pre = pre + cell.bias_ih[H : 2 * H] + cell.bias_hh[H : 2 * H]
    return torch.sigmoid(pre)


class _Residual:
    """The residual multipliers ``a_t`` of one forward call, resolved from the option."""

    def __init__(self, option: Any, cell: Callable):
        self.kind = "none"
        self.fn: Callable | None = None
        if option is None:
            if isinstance(cell, nn.LSTMCell):
                self.kind = "lstm"
            elif isinstance(cell, nn.GRUCell):
                self.kind = "gru"
        elif callable(option):
            self.kind, self.fn = "callable", option
        else:
            self.kind = option
        self.cell = cell

    def multipliers(
        self, x: torch.Tensor, prev: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...], is_tuple: bool
    ) -> list[torch.Tensor | None]:
        """One multiplier per state component (``None``: no residual), each of that
        component's shape. Called without grad on any number of batch rows."""
        if self.kind == "none":
            return [None] * len(prev)
        if self.kind == "identity":
            return [torch.ones_like(p) for p in prev]
        if self.kind == "lstm":
            out = _lstm_residual(self.cell, x, prev)
        elif self.kind == "gru":
            out = _gru_residual(self.cell, x, prev[0])
        else:
            out = self.fn(x, _pack(prev, is_tuple), _pack(new, is_tuple))
        return self._validate(out, prev, is_tuple)

    @staticmethod
    def _validate(out: Any, prev: tuple[torch.Tensor, ...], is_tuple: bool) -> list[torch.Tensor | None]:
        where = "residual (the callable's return value)"
        if is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(prev):
                raise ValueError(
                    f"{where} must be a tuple of {len(prev)} multipliers (None for a component without residual) "
                    f"matching the state, a {_describe(tuple(prev))}; got a {_describe(out)}"
                )
            items = list(out)
        else:
            if isinstance(out, (tuple, list)):
                raise ValueError(
                    f"{where} must be one tensor for a tensor state of shape {tuple(prev[0].shape)}, got a {_describe(out)}"
                )
            items = [out]
        result: list[torch.Tensor | None] = []
        for i, (m, p) in enumerate(zip(items, prev)):
            if m is None:
                result.append(None)
                continue
            if isinstance(m, (int, float)) and not isinstance(m, bool):
                m = torch.tensor(float(m), dtype=p.dtype, device=p.device)
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{where}: component {i} must be a tensor, a number or None, got {type(m).__name__}")
            try:
                fits = torch.broadcast_shapes(m.shape, p.shape) == p.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"{where}: component {i} of shape {tuple(m.shape)} does not match the state component "
                    f"of shape {tuple(p.shape)} (it must broadcast to it)"
                )
            result.append(m.to(p.dtype).expand(p.shape))
        return result


# ----------------------------------------------------------------------------- refusals


def _row_mixing_modules(cell: Any) -> tuple[list[str], list[str]]:
    """Names of BatchNorm and dropout submodules in training mode."""
    norms, drops = [], []
    if isinstance(cell, nn.Module):
        for name, m in cell.named_modules():
            if not m.training:
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                norms.append(name or type(m).__name__)
            elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                drops.append(name or type(m).__name__)
    return norms, drops


_BATCHED_RECOMPUTE = (
    "Highway-BP's backward calls the cell once on all T·B rows (every step's input and previous state) "
    "and needs the same states as the step-by-step forward, so the cell must treat batch rows "
    "independently and deterministically. Put those modules in eval mode, or use iterations=None "
    "(exact BPTT through the Python loop)."
)


def _check_recompute(new: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """The batched recompute must give the forward's states: the same non-finite entries
    (a NaN/Inf input or state propagates the same way in both), and, where both are
    finite, the same values up to rounding."""
    for i, (n, s) in enumerate(zip(new, saved)):
        n = n.detach()
        finite = torch.isfinite(s)
        if not torch.equal(torch.isfinite(n), finite):
            moved = int((torch.isfinite(n) != finite).sum())
            raise RuntimeError(
                f"HighwayRNN: the cell gives different states when called on the flattened T·B batch than in the "
                f"step-by-step forward (state component {i}: {moved} entries are non-finite (NaN/Inf) in one and "
                "finite in the other). The cell mixes batch rows (e.g. batch statistics) or is random (e.g. dropout "
                "in training mode). " + _BATCHED_RECOMPUTE
            )
        eps = torch.finfo(s.dtype).eps if s.is_floating_point() else 0.0
        tol = 4 * math.sqrt(eps)  # one step's rounding is far below; a dropout mask or batch statistic far above
        s, n = s[finite], n[finite]
        scale = float(s.abs().max()) if s.numel() else 0.0
        diff = float((n - s).abs().max()) if s.numel() else 0.0
        if not diff <= tol * max(scale, 1.0):
            raise RuntimeError(
                f"HighwayRNN: the cell gives different states when called on the flattened T·B batch than in the "
                f"step-by-step forward (state component {i}: max difference {diff:.3g}, states up to {scale:.3g}). "
                "The cell mixes batch rows (e.g. batch statistics) or is random (e.g. dropout in training mode). "
                + _BATCHED_RECOMPUTE
            )


# ----------------------------------------------------------------------------- autograd


def _exact_adjoint_by_loop(run: "_Run", x: torch.Tensor, s0: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The exact adjoint ``w_t = ∂L/∂s_t`` (T, B, N) by BPTT through the step-by-step loop:
    each state is fed on as ``s_t + ε_t`` with ``ε_t = 0``, so ``∂L/∂ε_t`` is the total
    gradient on ``s_t``. What the exact mode (``iterations=None``) computes, at its cost."""
    T, B = x.shape[0], x.shape[1]
    state = tuple(s.detach() for s in s0)
    eps: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    with torch.enable_grad():
        for t in range(T):
            new = _check_new_state(run.cell(x[t].detach(), _pack(state, run.is_tuple)), state, run.is_tuple, t)
            e = [torch.zeros_like(c, requires_grad=True) for c in new]
            state = tuple(c + z for c, z in zip(new, e))
            eps += e
            outs += list(state)
        n = len(s0)
        cot = [g[t] if g is not None else torch.zeros_like(outs[t * n + i]) for t in range(T) for i, g in enumerate(grads)]
        live = [(o, c) for o, c in zip(outs, cot) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in live], eps, [c for _, c in live], allow_unused=True)
    got = [torch.zeros_like(e) if g is None else g for g, e in zip(got, eps)]
    per_step = [_flat(got[t * n : (t + 1) * n], list(s0), 1, B) for t in range(T)]
    return torch.cat(per_step, 0)


class _Run:
    """What one forward call hands its backward (not tensors)."""

    def __init__(self, module: "HighwayRNN", residual: _Residual, options: HighwayOptions, n_state: int, is_tuple: bool):
        self.module = module
        self.cell = module.cell
        self.residual = residual
        self.options = options
        self.n_state = n_state
        self.is_tuple = is_tuple


class _HighwayRNNFunction(torch.autograd.Function):
    """Inputs: ``x`` (T, B, ...), the initial state's components (B, ...), the cell's
    parameters that require grad. Outputs: each state component stacked (T, B, ...)."""

    @staticmethod
    def forward(run: _Run, x: torch.Tensor, *tensors: torch.Tensor):
        return tuple(_loop(run.cell, x, tensors[: run.n_state], run.is_tuple))

    @staticmethod
    def setup_context(ctx, inputs, output):
        run, x, *tensors = inputs
        ctx.run = run
        ctx.save_for_backward(x, *tensors, *output)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_stacked: torch.Tensor):
        run: _Run = ctx.run
        if any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grad_stacked):
            raise RuntimeError(
                "HighwayRNN: batched gradients (torch.autograd.grad(..., is_grads_batched=True), gradcheck's "
                "check_batched_grad) are not supported by Highway-BP (iterations="
                f"{run.options.iterations}): its backward recomputes the cell with torch.autograd on the whole "
                "batch. Use one cotangent per backward, or iterations=None (autograd through the loop)."
            )
        n = run.n_state
        saved = ctx.saved_tensors
        x, s0, params, stacked = saved[0], saved[1 : 1 + n], saved[1 + n : -n], saved[-n:]
        T, B = x.shape[0], x.shape[1]
        need_x = ctx.needs_input_grad[1]
        need_s0 = ctx.needs_input_grad[2 : 2 + n]
        need_params = ctx.needs_input_grad[2 + n :]

        # Every step's input and previous state, as one batch of T·B rows.
        x_flat = x.detach().reshape(T * B, *x.shape[2:])
        if need_x:
            x_flat.requires_grad_(True)
        prev = [
            torch.cat([s[None], st[:-1]]).reshape(T * B, *s.shape[1:]).detach().requires_grad_(True)
            for s, st in zip(s0, stacked)
        ]
        saved_flat = [st.reshape(T * B, *st.shape[2:]) for st in stacked]
        with torch.enable_grad():
            new = _check_new_state(run.cell(x_flat, _pack(prev, run.is_tuple)), tuple(prev), run.is_tuple, 0)
        _check_recompute(new, saved_flat)

        with torch.no_grad():
            a_list = run.residual.multipliers(x_flat.detach(), tuple(p.detach() for p in prev), tuple(saved_flat), run.is_tuple)
        r = _flat(a_list, prev, T, B)  # a_t of step t, (T, B, N)
        a = TORCH_OPS.shift_next(r)  # the engine's a_t = a_{t+1}: carries w_{t+1} into w_t
        local = _flat(grad_stacked, prev, T, B)  # ℓ_t

        live = [i for i, s in enumerate(new) if s.requires_grad]
        outputs = [new[i] for i in live]

        def vjp(u: torch.Tensor, inputs: list[torch.Tensor], retain: bool) -> tuple:
            if not outputs:
                return (None,) * len(inputs)
            cot = _unflat(u, prev)
            return torch.autograd.grad(
                outputs, inputs, [cot[i] for i in live], retain_graph=retain, allow_unused=True
            )

        def block(u: torch.Tensor) -> torch.Tensor:
            # v_t = w_{t+1} J_{t+1}, J = ∂F/∂s_prev - diag(a): full VJP minus the residual part.
            g = _flat(vjp(u, prev, True), prev, T, B) - r * u
            return TORCH_OPS.shift_next(g)

        opts = run.options
        cap = effective_iterations(opts, T)
        mode = opts.diagnostics

        def iterate(observe=None):
            watch = None if observe is None else (lambda i, u, best: observe(i, lambda: u, best))
            return highway_adjoint(
                a, local, block, iterations=cap, ops=TORCH_OPS, tol=opts.tol, gamma=opts.gamma, record=bool(mode),
                observe=watch, diverge=run.residual.kind != "none",  # no residual: FPI (see the engine)
            )

        if opts.probe is not None:  # iterations="auto": the exact adjoint by BPTT through the loop, and the ladder
            box: list = []
            w, probe = probe_adjoint(
                lambda: _exact_adjoint_by_loop(run, x, s0, grad_stacked), lambda obs: box.append(iterate(obs)[1]),
                lambda w: w, opts, local,
            )
            diagnostics = box[0]
            diagnostics.probe = probe
        else:
            w, diagnostics = iterate()
        if mode == "debug":
            exact, _ = highway_adjoint(a, local, block, iterations=T, ops=TORCH_OPS)
            num = float((w * exact).sum())
            den = TORCH_OPS.norm(w) * TORCH_OPS.norm(exact)
            diagnostics.cosine = num / den if den > 0 else (1.0 if TORCH_OPS.norm(w - exact) == 0 else 0.0)
        if mode or opts.probe is not None:
            run.module.last_diagnostics = diagnostics
        after_backward(run.module, None, diagnostics)  # hook: auto's probe report, the divergence warning

        # One last VJP with the final adjoint: ∂L/∂θ = Σ_t w_t ∂F/∂θ, ∂L/∂x_t = w_t ∂F/∂x_t,
        # ∂L/∂s_{-1} = w_0 ∂F/∂s_{-1}.
        want = list(prev)
        if need_x:
            want.append(x_flat)
        want_params = [p for p, need in zip(params, need_params) if need]
        want += want_params
        grads = list(vjp(w, want, False))
        g_prev, grads = grads[:n], grads[n:]
        g_x = None
        if need_x:
            g_x = grads.pop(0)
            g_x = torch.zeros_like(x) if g_x is None else g_x.reshape(x.shape)
        g_s0 = []
        for i in range(n):
            if not need_s0[i]:
                g_s0.append(None)
            elif g_prev[i] is None:
                g_s0.append(torch.zeros_like(s0[i]))
            else:
                g_s0.append(g_prev[i][:B].reshape(s0[i].shape))
        it = iter(grads)
        g_params = []
        for p, need in zip(params, need_params):
            if not need:
                g_params.append(None)
                continue
            g = next(it)
            g_params.append(torch.zeros_like(p) if g is None else g)
        return (None, g_x, *g_s0, *g_params)


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
