"""User cells (``keras.layers.RNN(cell)``): the forward loop and autodiff VJPs.

A user cell maps ``(x_t, [s^1, ..., s^n]_{t-1}) -> (y_t, [s^1, ..., s^n]_t)``; its
states are concatenated into ``s`` as for the analytic cells and the op also returns
every raw output ``y_t``. The cell is called through ``stateless_call`` with the weights
given as tensors, so the same call serves the forward (inside the custom gradient) and
the VJPs.

The residual ``K_t = diag(a_t)`` comes from ``residual``:

- ``"identity"``: ``a_t = 1`` (a residual cell ``s_t = s_{t-1} + g(...)``);
- ``None`` or ``"none"``: ``a_t = 0``, the fixed-point iteration (FPI);
- a callable ``residual(x_t, states_prev, states_new) -> multipliers``: a tensor (one
  state) or a list with one entry per state, ``None`` for a state without residual; each
  broadcasts to its state's shape. It is evaluated on the whole ``T·B`` batch at once and
  treated as a constant.

A ``keras.layers.StackedRNNCells`` is one user cell whose states are its sub-cells'
states in order (flattened here, nested again for its ``call``). With ``residual=None``
its residual is each built-in sub-cell's own path (``stacked_residual``): ``f_t`` on an
LSTM cell state, ``z_t`` on a GRU state (as ``lstm.py``/``gru.py``), none elsewhere;
``"none"`` is FPI, and a callable or ``"identity"`` covers the whole stack.

The block VJP is the cell's full VJP minus the residual part:
``λ J_t = λ ∂F/∂s_{t-1} - a_t ⊙ λ``. Calling the cell once on the flattened ``T·B``
batch gives every step's VJP in one autodiff call, as long as the cell treats batch rows
independently. An output ``y_t`` that is not the state adds the constant
``(∂L/∂y_t) ∂y_t/∂s_{t-1}`` to the adjoint of ``s_{t-1}``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import keras
from keras import ops

from .backend_ops import make_vjp
from .cell_dropout import masks_in
from .steps import scan_states

__all__ = ["UserCellMath", "check_residual", "state_layout", "nest_states", "stacked_residual"]

RESIDUAL_NAMES = ("identity", "none")


def check_residual(residual: Any) -> Any:
    """The ``residual`` option, checked as the PyTorch adapter checks it."""
    if residual is None or callable(residual) or (isinstance(residual, str) and residual in RESIDUAL_NAMES):
        return residual
    raise ValueError(
        "residual must be None, 'identity', 'none' or a callable (x_t, states_prev, states_new) -> multipliers, "
        f"got residual={residual!r}"
    )


def _autocast(cell: Any) -> Any:
    """The autocast scope ``cell.__call__`` would open (none for a plain policy)."""
    if getattr(cell, "autocast", True) and cell.compute_dtype != cell.variable_dtype:
        from keras.src.backend import AutocastScope  # not in Keras' public API (3.15)

        return AutocastScope(cell.compute_dtype)
    return contextlib.nullcontext()


def _rows(a: Any) -> Any:
    """``(T, B, n) -> (T·B, n)``."""
    n = a.shape[-1] if a.shape[-1] is not None else ops.shape(a)[-1]
    return ops.reshape(a, (-1, n))


def _split(s: Any, sizes: tuple) -> list:
    out, start = [], 0
    for n in sizes:
        out.append(s[..., start : start + n])
        start += n
    return out


def state_layout(cell: Any) -> tuple[tuple[int, ...], list[int] | None]:
    """``(sizes, nesting)``: the cell's state sizes in order, flattened, and for a
    ``StackedRNNCells`` the number of states of each sub-cell (``0`` for a sub-cell whose
    ``state_size`` is a bare int, which Keras passes as one tensor), else ``None``.
    Sizes are left as given (the layer refuses non-integers)."""
    if isinstance(cell, keras.layers.StackedRNNCells):
        sizes, nesting = [], []
        for sub in cell.cells:
            own = sub.state_size
            if isinstance(own, (list, tuple)):
                sizes.extend(own)
                nesting.append(len(own))
            else:
                sizes.append(own)
                nesting.append(0)
        return tuple(sizes), nesting
    sizes = cell.state_size if isinstance(cell.state_size, (list, tuple)) else [cell.state_size]
    return tuple(sizes), None


def nest_states(flat: list, nesting: list[int]) -> list:
    """A ``StackedRNNCells``' nested states from the flat list (``state_layout``)."""
    out, i = [], 0
    for n in nesting:
        if n == 0:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i : i + n]))
            i += n
    return out


def _gate(cell: Any, x: Any, h: Any, gate: int, count: int) -> Any:
    """``recurrent_activation(x W_g + h U_g + b_g)`` for gate ``gate`` of a Keras cell with
    ``count`` gates (LSTM ``i, f, c, o``; GRU ``z, r, h``, whose ``reset_after`` bias has
    an input and a recurrent row)."""
    H = cell.units
    cut = lambda w: ops.cast(ops.convert_to_tensor(w), x.dtype)[..., gate * H : (gate + 1) * H]
    z = ops.matmul(x, cut(cell.kernel)) + ops.matmul(h, cut(cell.recurrent_kernel))
    if cell.use_bias:
        b = cut(cell.bias)
        z = z + (b[0] + b[1] if len(b.shape) == 2 else b)
    return cell.recurrent_activation(z)


def stacked_residual(cell: Any) -> Callable:
    """The residual of a ``StackedRNNCells`` from its built-in sub-cells (module docstring),
    as a ``residual`` callable on the flat states: ``f_t`` on an ``LSTMCell``'s cell state,
    ``z_t`` on a ``GRUCell``'s state, ``None`` elsewhere. A sub-cell reads the stack's
    input or, above the first, the previous sub-cell's output, which for the built-in cells
    is their first state; above a user sub-cell (whose output may be no state) the built-in
    residual is left out (``None``): it changes how fast the iteration converges, never
    the exact gradient."""
    _, nesting = state_layout(cell)

    def residual(x: Any, prev: list, new: list) -> list:
        out, i, below_ok, below_out = [], 0, True, x
        for sub, n in zip(cell.cells, nesting):
            count = max(n, 1)
            inp = below_out if below_ok else None
            if type(sub) is keras.layers.LSTMCell and inp is not None:
                out.extend([None, _gate(sub, inp, prev[i], 1, 4)])
            elif type(sub) is keras.layers.GRUCell and inp is not None:
                out.append(_gate(sub, inp, prev[i], 0, 3))
            else:
                out.extend([None] * count)
            below_ok = type(sub) in (keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)
            below_out = new[i]
            i += count
        return out

    return residual


class UserCellMath:
    has_output = True

    def __init__(self, cell: Any, residual: Any, training: Any = None, split: str = "step"):
        self.cell = cell
        sizes, self.nesting = state_layout(cell)
        self.residual_option = stacked_residual(cell) if residual is None and self.nesting is not None else residual
        self.state_sizes = tuple(int(n) for n in sizes)
        self.output_size = int(getattr(cell, "output_size", None) or self.state_sizes[0])
        self.kwargs = {"training": training} if getattr(cell, "_call_has_training_arg", False) else {}
        self.non_trainable = [ops.convert_to_tensor(v) for v in cell.non_trainable_variables]
        self.dropout_masks: list = []  # cell_dropout.draw's, set by the layer for its call

    def call(self, params: list, x: Any, states: list, tiles: Any = None) -> list:
        """``[y_t, s^1_t, ..., s^n_t]`` from the cell, with the weights ``params``; ``x``
        holds one step's rows, or ``tiles`` steps flattened (the dropout masks are tiled).

        ``stateless_call`` runs the cell's ``call`` without the autocast scope that
        ``Layer.__call__`` opens under a mixed policy (``mixed_float16``): the backward,
        which runs outside any layer call, would read the float32 variables and mix
        float32 with the float16 states. The cell's own scope is opened here."""
        states = list(states) if self.nesting is None else nest_states(list(states), self.nesting)
        with _autocast(self.cell), masks_in(self.dropout_masks, tiles):
            (y, new), _ = self.cell.stateless_call(list(params), self.non_trainable, x, states, **self.kwargs)
        return [y, *keras.tree.flatten(new)]

    def forward(self, params: list, x: Any, s0: list, mask: Any) -> Any:
        y0 = ops.zeros((ops.shape(x)[1], self.output_size), dtype=x.dtype)

        def step(s, xs):
            y, *new = self.call(params, xs[0], s[:-1])
            return [*new, y]

        return scan_states(step, [*s0, y0], (x,), mask)

    def linearize(self, params: list, x: Any, s_prev: Any, s: Any) -> "UserLinearization":
        return UserLinearization(self, params, x, s_prev, s)


class UserLinearization:
    """The cell's VJPs on the flattened ``T·B`` batch: one forward, many backwards."""

    has_output = True

    def __init__(self, math: UserCellMath, params: list, x: Any, s_prev: Any, s: Any):
        self.math, self.params, self.x, self.s_prev, self.s = math, params, x, s_prev, s
        shape = ops.shape(x)
        self.T, self.B = shape[0], shape[1]
        self.sizes = math.state_sizes
        self.x_flat = _rows(x)
        self.prev_flat = [_rows(p) for p in _split(s_prev, self.sizes)]
        n = len(self.sizes)

        def fn(xf, *rest):
            return math.call(list(rest[n:]), xf, list(rest[:n]), tiles=self.T)

        self.outs, self._vjp = make_vjp(fn, [self.x_flat, *self.prev_flat, *params])

    def _unflat(self, a: Any) -> Any:
        return ops.reshape(a, (self.T, self.B, -1))

    def _pull(self, gy: Any, lam: Any) -> tuple[Any, list, list]:
        """Full VJP for cotangents ``gy`` on ``y`` and ``lam`` on the new state."""
        n = len(self.sizes)
        gy = ops.zeros_like(self.outs[0]) if gy is None else ops.reshape(gy, (-1, self.math.output_size))
        if lam is None:
            lam_parts = [ops.zeros_like(o) for o in self.outs[1:]]
        else:
            lam_parts = [_rows(p) for p in _split(lam, self.sizes)]
        grads = self._vjp([gy, *lam_parts])
        dx = self._unflat(grads[0])
        dprev = ops.concatenate([self._unflat(g) for g in grads[1 : 1 + n]], axis=-1)
        return dx, list(grads[1 + n :]), dprev

    def residual(self) -> Any:
        opt = self.math.residual_option
        if opt == "identity":
            return ops.ones_like(self.s)
        if opt is None or opt == "none":
            return ops.zeros_like(self.s)
        new_flat = [_rows(p) for p in _split(self.s, self.sizes)]
        out = opt(ops.stop_gradient(self.x_flat), [ops.stop_gradient(p) for p in self.prev_flat], [ops.stop_gradient(p) for p in new_flat])
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        if len(out) != len(self.sizes):
            raise ValueError(
                f"residual (the callable's return value) must give {len(self.sizes)} multiplier(s), one per state "
                f"(None for a state without residual), got {len(out)}"
            )
        parts = [
            ops.zeros_like(p) if a is None else ops.broadcast_to(ops.cast(a, p.dtype), ops.shape(p))
            for a, p in zip(out, new_flat)
        ]
        return self._unflat(ops.concatenate(parts, axis=-1))

    def block(self, lam: Any) -> Any:
        return self._pull(None, lam)[2] - self.residual_cached() * lam

    def residual_cached(self) -> Any:
        if not hasattr(self, "_residual"):
            self._residual = self.residual()
        return self._residual

    def fold(self, b: Any) -> Any:
        return b

    def route(self, gy: Any) -> Any:
        return self._pull(gy, None)[2]

    def grads(self, lam: Any, gy: Any) -> tuple[Any, list, Any]:
        dx, dparams, dprev = self._pull(gy, lam)
        return dx, dparams, dprev[0]

    def exact_grads(self, local: Any, gy: Any, mask: Any) -> tuple[Any, Any, list, Any]:
        """The sequential adjoint, one step's VJP at a time (the length must be static).
        Returns ``(∂L/∂x, ∂L/∂s_0, [∂L/∂θ], w)``."""
        T = self.x.shape[0]
        if T is None:
            raise ValueError(
                "HighwayRNN: the exact gradient (iterations=None) of a user cell needs a static sequence "
                "length under graph execution; give the Input a fixed length or set iterations"
            )
        n = len(self.sizes)
        carry = ops.zeros_like(local[0])
        dxs, ws, dparams = [None] * T, [None] * T, None
        for t in reversed(range(T)):
            w_t = local[t] + carry
            ws[t] = w_t
            m_t = None if mask is None else mask[t]
            fn = lambda xf, *rest: self.math.call(list(rest[n:]), xf, list(rest[:n]))
            outs, vjp = make_vjp(fn, [self.x[t], *_split(self.s_prev[t], self.sizes), *self.params])
            cot_w = w_t if m_t is None else w_t * m_t
            gy_t = ops.zeros_like(outs[0]) if gy is None else (gy[t] if m_t is None else gy[t] * m_t)
            grads = vjp([gy_t, *_split(cot_w, self.sizes)])
            dxs[t] = grads[0]
            back = ops.concatenate(list(grads[1 : 1 + n]), axis=-1)
            carry = back if m_t is None else back + (1 - m_t) * w_t
            step_params = list(grads[1 + n :])
            dparams = step_params if dparams is None else [a + b for a, b in zip(dparams, step_params)]
        return ops.stack(dxs), carry, dparams, ops.stack(ws)
