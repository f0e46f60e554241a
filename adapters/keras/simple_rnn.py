"""Keras SimpleRNN: ``h_t = φ(x_t W + b + h_{t-1} U)``.

There is no residual path (``K_t = 0``), so Highway-BP is the fixed-point iteration here:
``k`` iterations reach ``k`` steps back and ``T`` iterations are exact. For a cotangent
``λ`` on ``h_t``: ``dpre = λ ⊙ φ'``, ``λ J = dpre Uᵀ``.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from . import activations as act
from .backend_ops import matmul
from .gate_dropout import gate_matmul, gate_matmul_t, gate_weight_grad
from .steps import StepMath, scan_states, weight_grad

__all__ = ["SimpleRNNMath"]


class SimpleRNNMath(StepMath):
    def __init__(self, cell: Any, split: str = "step"):
        self.units = cell.units
        self.use_bias = cell.use_bias
        self.act = act.activation_name(cell.activation, "activation")
        self.state_sizes = (cell.units,)

    def forward(self, params: list, x: Any, s0: list, mask: Any) -> Any:
        W, U = params[0], params[1]
        xw = matmul(x, W)
        if self.use_bias:
            xw = xw + params[2]

        def step(s, xs):
            return [act.apply(self.act, xs[0] + gate_matmul(s[0], U, self.rec_gates))]

        return scan_states(step, s0, (xw,), mask)

    def prepare(self, params: list, x: Any, s_prev: Any, s: Any) -> tuple:
        W, U = params[0], params[1]
        pre = matmul(x, W)
        if self.use_bias:
            pre = pre + params[2]
        pre = pre + gate_matmul(s_prev, U, self.rec_gates)
        return (act.derivative(self.act, pre, s),), (U,)

    def residual(self, cache: tuple) -> Any:
        return ops.zeros_like(cache[0][0])

    def block(self, cache: tuple, lam: Any) -> Any:
        return gate_matmul_t(lam * cache[0][0], cache[1][0], self.rec_gates)

    def prev(self, cache: tuple, lam: Any) -> Any:
        return self.block(cache, lam)

    def grads(self, params: list, x: Any, s_prev: Any, cache: tuple, lam: Any) -> tuple[Any, list]:
        dpre = lam * cache[0][0]
        dparams = [weight_grad(x, dpre), gate_weight_grad(s_prev, dpre, self.rec_gates)]
        if self.use_bias:
            dparams.append(ops.sum(dpre, axis=(0, 1)))
        return matmul(dpre, ops.transpose(params[0])), dparams
