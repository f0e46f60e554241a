"""Keras LSTM: the step, its residual and its analytic VJPs.

Keras conventions: ``z = x_t W + h_{t-1} U + b`` with gates in the order ``i, f, c, o``
(``W`` is ``kernel``, ``U`` is ``recurrent_kernel``), ``σ`` the recurrent activation
and ``φ`` the activation:

    i, f, g, o = σ(z_i), σ(z_f), φ(z_c), σ(z_o)
    c_t = f ⊙ c_{t-1} + i ⊙ g,      h_t = o ⊙ φ(c_t)

State ``s = [h, c]``. Residual: ``c_{t-1} -> c_t`` with ``diag(f_t)``, nothing on ``h``.
For a cotangent ``(λh, λc)`` on ``(h_t, c_t)`` (design note, section 3):

    dc   = λc + λh ⊙ o ⊙ φ'(c_t)
    dpre = [dc⊙g⊙σ'(i), dc⊙c_{t-1}⊙σ'(f), dc⊙i⊙φ'(g), λh⊙φ(c_t)⊙σ'(o)]
    to h_{t-1}: dpre Uᵀ          to c_{t-1}: dc ⊙ f  (K part: λc ⊙ f)

Two splits (``split``):

- ``"step"``: the block is the whole step but the cell-state residual, so ``J`` carries
  ``dpre Uᵀ`` to ``h`` and ``λh ⊙ o ⊙ φ'(c_t) ⊙ f`` to ``c``.
- ``"gates"``: the adjoint's ``c`` part already holds ``dc`` (the readout included); the
  block is only ``h_{t-1} -> gates`` (``dpre Uᵀ``) and ``fold`` adds the readout
  ``λh ⊙ o ⊙ φ'(c_t)`` to the ``c`` scan's right-hand side at the same step, using the
  new ``λh``. Same fixed point, fewer crossings counted as blocks. It needs ``K`` on
  ``h`` to be zero, so the layer uses ``"step"`` when a mask is present.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from . import activations as act
from .gate_dropout import gate_matmul, gate_matmul_t, gate_weight_grad
from .steps import StepMath, scan_states

__all__ = ["LSTMMath"]


class LSTMMath(StepMath):
    def __init__(self, cell: Any, split: str = "step"):
        self.units = cell.units
        self.use_bias = cell.use_bias
        self.act = act.activation_name(cell.activation, "activation")
        self.ract = act.activation_name(cell.recurrent_activation, "recurrent_activation")
        self.state_sizes = (cell.units, cell.units)
        self.split = split

    # --------------------------------------------------------------- forward
    def forward(self, params: list, x: Any, s0: list, mask: Any) -> Any:
        W, U = params[0], params[1]
        xw = gate_matmul(x, W, self.in_gates)
        H = self.units

        def step(s, xs):
            h, c = s
            z = xs[0] + gate_matmul(h, U, self.rec_gates)
            if self.use_bias:
                z = z + params[2]
            i = act.apply(self.ract, z[:, :H])
            f = act.apply(self.ract, z[:, H : 2 * H])
            g = act.apply(self.act, z[:, 2 * H : 3 * H])
            o = act.apply(self.ract, z[:, 3 * H :])
            c = f * c + i * g
            return [o * act.apply(self.act, c), c]

        return scan_states(step, s0, (xw,), mask)

    # --------------------------------------------------------------- backward
    def prepare(self, params: list, x: Any, s_prev: Any, s: Any) -> tuple:
        W, U = params[0], params[1]
        H = self.units
        h_prev, c_prev, c = s_prev[..., :H], s_prev[..., H:], s[..., H:]
        z = gate_matmul(x, W, self.in_gates) + gate_matmul(h_prev, U, self.rec_gates)
        if self.use_bias:
            z = z + params[2]
        zi, zf, zg, zo = z[..., :H], z[..., H : 2 * H], z[..., 2 * H : 3 * H], z[..., 3 * H :]
        i, f, g, o = act.apply(self.ract, zi), act.apply(self.ract, zf), act.apply(self.act, zg), act.apply(self.ract, zo)
        tc = act.apply(self.act, c)
        # Local derivatives, each of shape (T, B, H).
        di = act.derivative(self.ract, zi, i)
        df = act.derivative(self.ract, zf, f)
        dg = act.derivative(self.act, zg, g)
        do = act.derivative(self.ract, zo, o)
        dtc = act.derivative(self.act, c, tc)
        return (i, f, g, o, c_prev, tc, di, df, dg, do, dtc), (U,)

    def _dpre(self, cache: tuple, lam: Any, split: str | None = None) -> tuple[Any, Any]:
        i, f, g, o, c_prev, tc, di, df, dg, do, dtc = cache[0]
        H = self.units
        lh, lc = lam[..., :H], lam[..., H:]
        dc = lc if (split or self.split) == "gates" else lc + lh * o * dtc
        dpre = ops.concatenate([dc * g * di, dc * c_prev * df, dc * i * dg, lh * tc * do], axis=-1)
        return dpre, dc

    def residual(self, cache: tuple) -> Any:
        f = cache[0][1]
        return ops.concatenate([ops.zeros_like(f), f], axis=-1)

    def block(self, cache: tuple, lam: Any) -> Any:
        (f, o, dtc), (U,) = (cache[0][1], cache[0][3], cache[0][10]), cache[1]
        H = self.units
        dpre, _ = self._dpre(cache, lam)
        to_h = gate_matmul_t(dpre, U, self.rec_gates)
        if self.split == "gates":
            to_c = ops.zeros_like(f)
        else:
            to_c = lam[..., :H] * o * dtc * f
        return ops.concatenate([to_h, to_c], axis=-1)

    def prev(self, cache: tuple, lam: Any, split: str | None = None) -> Any:
        f, (U,) = cache[0][1], cache[1]
        dpre, dc = self._dpre(cache, lam, split)
        return ops.concatenate([gate_matmul_t(dpre, U, self.rec_gates), dc * f], axis=-1)

    def step_prev(self, cache: tuple, lam: Any) -> Any:
        return self.prev(cache, lam, split="step")

    def fold(self, cache: tuple, b: Any) -> Any:
        if self.split != "gates":
            return b
        o, dtc = cache[0][3], cache[0][10]
        H = self.units
        bh, bc = b[..., :H], b[..., H:]
        return ops.concatenate([bh, bc + bh * o * dtc], axis=-1)

    def grads(self, params: list, x: Any, s_prev: Any, cache: tuple, lam: Any) -> tuple[Any, list]:
        W, U = params[0], params[1]
        dpre, _ = self._dpre(cache, lam)
        dx = gate_matmul_t(dpre, W, self.in_gates)
        dparams = [gate_weight_grad(x, dpre, self.in_gates), gate_weight_grad(s_prev[..., : self.units], dpre, self.rec_gates)]
        if self.use_bias:
            dparams.append(ops.sum(dpre, axis=(0, 1)))
        return dx, dparams
