"""Keras GRU (both ``reset_after`` settings): the step, its residual and analytic VJPs.

Keras conventions: gates in the order ``z, r, h``; ``W`` is ``kernel`` (D, 3H), ``U``
``recurrent_kernel`` (H, 3H); ``σ`` the recurrent activation, ``φ`` the activation;
``x^z, x^r, x^h = x_t W + b_in``.

``reset_after=True`` (bias ``[b_in; b_rec]``):  ``q^z, q^r, q^h = h_{t-1} U + b_rec``,
    ``z = σ(x^z + q^z)``, ``r = σ(x^r + q^r)``, ``n = φ(x^h + r ⊙ q^h)``.
``reset_after=False`` (bias ``b_in``):  ``q^z, q^r = h_{t-1} U_{zr}``,
    ``z, r`` as above, ``n = φ(x^h + (r ⊙ h_{t-1}) U_h)``.

Both: ``h_t = z ⊙ h_{t-1} + (1 - z) ⊙ n``. Keras puts ``z`` on ``h_{t-1}``, so the
residual is ``K_t = diag(z_t)``; the block is everything through ``z``, ``r`` and ``n``.
For a cotangent ``λ`` on ``h_t``:

    dn_pre = λ ⊙ (1 - z) ⊙ φ'        dz_pre = λ ⊙ (h_{t-1} - n) ⊙ σ'(z)
    after:  dr_pre = dn_pre ⊙ q^h ⊙ σ'(r),   λ J = [dz_pre, dr_pre, dn_pre ⊙ r] Uᵀ
    before: dq = dn_pre U_hᵀ, dr_pre = dq ⊙ h_{t-1} ⊙ σ'(r),
            λ J = [dz_pre, dr_pre] U_{zr}ᵀ + dq ⊙ r
"""

from __future__ import annotations

from typing import Any

from keras import ops

from . import activations as act
from .backend_ops import matmul
from .gate_dropout import gate_matmul, gate_matmul_t, gate_weight_grad
from .steps import StepMath, scan_states, weight_grad

__all__ = ["GRUMath"]


class GRUMath(StepMath):
    def __init__(self, cell: Any, split: str = "step"):
        self.units = cell.units
        self.use_bias = cell.use_bias
        self.reset_after = cell.reset_after
        self.act = act.activation_name(cell.activation, "activation")
        self.ract = act.activation_name(cell.recurrent_activation, "recurrent_activation")
        self.state_sizes = (cell.units,)

    def _rec_zr(self) -> Any:
        return None if self.rec_gates is None else self.rec_gates[:, :2]

    def _rec_h(self) -> Any:
        """The recurrent mask of the candidate gate (1 without recurrent dropout)."""
        return 1.0 if self.rec_gates is None else self.rec_gates[:, 2]

    def _biases(self, params: list) -> tuple[Any, Any]:
        if not self.use_bias:
            return None, None
        b = params[2]
        return (b[0], b[1]) if self.reset_after else (b, None)

    # --------------------------------------------------------------- forward
    def forward(self, params: list, x: Any, s0: list, mask: Any) -> Any:
        W, U = params[0], params[1]
        b_in, b_rec = self._biases(params)
        H = self.units
        xw = gate_matmul(x, W, self.in_gates)
        if b_in is not None:
            xw = xw + b_in

        def step(s, xs):
            (h,) = s
            xz, xr, xh = xs[0][:, :H], xs[0][:, H : 2 * H], xs[0][:, 2 * H :]
            if self.reset_after:
                q = gate_matmul(h, U, self.rec_gates)
                if b_rec is not None:
                    q = q + b_rec
            else:
                q = gate_matmul(h, U[:, : 2 * H], self._rec_zr())
            z = act.apply(self.ract, xz + q[:, :H])
            r = act.apply(self.ract, xr + q[:, H : 2 * H])
            if self.reset_after:
                rh = r * q[:, 2 * H :]
            else:
                rh = matmul(r * h * self._rec_h(), U[:, 2 * H :])
            n = act.apply(self.act, xh + rh)
            return [z * h + (1 - z) * n]

        return scan_states(step, s0, (xw,), mask)

    # --------------------------------------------------------------- backward
    def prepare(self, params: list, x: Any, s_prev: Any, s: Any) -> tuple:
        W, U = params[0], params[1]
        b_in, b_rec = self._biases(params)
        H = self.units
        xw = gate_matmul(x, W, self.in_gates)
        if b_in is not None:
            xw = xw + b_in
        if self.reset_after:
            q = gate_matmul(s_prev, U, self.rec_gates)
            if b_rec is not None:
                q = q + b_rec
        else:
            q = gate_matmul(s_prev, U[:, : 2 * H], self._rec_zr())
        zz, zr = xw[..., :H] + q[..., :H], xw[..., H : 2 * H] + q[..., H : 2 * H]
        z, r = act.apply(self.ract, zz), act.apply(self.ract, zr)
        qh = q[..., 2 * H :] if self.reset_after else matmul(r * s_prev * self._rec_h(), U[:, 2 * H :])
        zn = xw[..., 2 * H :] + (r * qh if self.reset_after else qh)
        n = act.apply(self.act, zn)
        dz = act.derivative(self.ract, zz, z)
        dr = act.derivative(self.ract, zr, r)
        dn = act.derivative(self.act, zn, n)
        return (z, r, n, qh, dz, dr, dn, s_prev), (U,)

    def _dpre(self, cache: tuple, lam: Any) -> tuple[Any, Any, Any, Any]:
        """Cotangents of the pre-activations (z, r, n) and, without reset_after, of
        ``r ⊙ h_{t-1}``."""
        (z, r, n, qh, dz, dr, dn, h_prev), (U,) = cache
        H = self.units
        dn_pre = lam * (1 - z) * dn
        dz_pre = lam * (h_prev - n) * dz
        if self.reset_after:
            return dz_pre, dn_pre * qh * dr, dn_pre, None
        dq = matmul(dn_pre, ops.transpose(U[:, 2 * H :])) * self._rec_h()  # cotangent of h_{t-1} ⊙ m_h
        return dz_pre, dq * h_prev * dr, dn_pre, dq

    def residual(self, cache: tuple) -> Any:
        return cache[0][0]

    def block(self, cache: tuple, lam: Any) -> Any:
        r, (U,) = cache[0][1], cache[1]
        H = self.units
        dz_pre, dr_pre, dn_pre, dq = self._dpre(cache, lam)
        if self.reset_after:
            return gate_matmul_t(ops.concatenate([dz_pre, dr_pre, dn_pre * r], axis=-1), U, self.rec_gates)
        return gate_matmul_t(ops.concatenate([dz_pre, dr_pre], axis=-1), U[:, : 2 * H], self._rec_zr()) + dq * r

    def grads(self, params: list, x: Any, s_prev: Any, cache: tuple, lam: Any) -> tuple[Any, list]:
        W = params[0]
        r = cache[0][1]
        dz_pre, dr_pre, dn_pre, _ = self._dpre(cache, lam)
        d_in = ops.concatenate([dz_pre, dr_pre, dn_pre], axis=-1)
        dx = gate_matmul_t(d_in, W, self.in_gates)
        dW = gate_weight_grad(x, d_in, self.in_gates)
        if self.reset_after:
            d_rec = ops.concatenate([dz_pre, dr_pre, dn_pre * r], axis=-1)
            dU = gate_weight_grad(s_prev, d_rec, self.rec_gates)
        else:
            dU = ops.concatenate(
                [gate_weight_grad(s_prev, ops.concatenate([dz_pre, dr_pre], axis=-1), self._rec_zr()),
                 weight_grad(r * s_prev * self._rec_h(), dn_pre)],
                axis=-1,
            )
        dparams = [dW, dU]
        if self.use_bias:
            db_in = ops.sum(d_in, axis=(0, 1))
            dparams.append(ops.stack([db_in, ops.sum(d_rec, axis=(0, 1))]) if self.reset_after else db_in)
        return dx, dparams
