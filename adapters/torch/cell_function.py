"""The autograd Function of ``HighwayRNN`` (``hwbptt.torch.cell``): the forward loop
without a graph, and the backward that recomputes every step in one batched call of the
cell and runs the Highway iteration on its VJP (``hwbptt.engine.highway_adjoint``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch.autograd.function import once_differentiable

from hwbptt.engine import highway_adjoint
from hwbptt.options import HighwayOptions, effective_iterations

from .auto import after_backward, probe_adjoint
from .cell_parts import _Residual, _check_new_state, _check_recompute, _flat, _loop, _pack, _unflat
from .scan import TORCH_OPS

if TYPE_CHECKING:
    from .cell import HighwayRNN


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
