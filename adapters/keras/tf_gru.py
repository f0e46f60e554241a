"""The TensorFlow route's GRU (``reset_after=True``; ``tf_kernels``): a forward that keeps
its gates and the compiled backward.

Keras GRU: ``x^z, x^r, x^h = x_t W + b_in``, ``q = h_{t-1} U + b_rec``,
``z = σ(x^z + q^z)``, ``r = σ(x^r + q^r)``, ``n = φ(x^h + r ⊙ q^h)``,
``h_t = z ⊙ h_{t-1} + (1 - z) ⊙ n``. The forward keeps ``z, r, n, q^h``; the per-step
coefficients (``σ'``, ``φ'`` from the outputs) are

    Cz = (h_{t-1} - n) σ'(z)    Cn = (1 - z) φ'(n)    Cr = Cn q^h σ'(r)
    δ_in  = λ ⊙ [Cz, Cr, Cn]     (cotangent of x W + b_in)
    δ_rec = λ ⊙ [Cz, Cr, Cn r]   (cotangent of h_{t-1} U + b_rec)
    λ J = δ_rec Uᵀ,   K = diag(z)
"""

from __future__ import annotations

from typing import Any

from hwbptt.engine import highway_adjoint
from hwbptt.options import Diagnostics, HighwayOptions

from . import tf_kernels as tk
from .gradient import diagnostics_vector, report_vector

__all__ = ["gru_run"]


def _forward(act: str, ract: str, H: int) -> Any:
    import tensorflow as tf

    def forward(xw, U, b_rec, h0):
        steps = tf.shape(xw)[0]
        ta = lambda n: tf.TensorArray(xw.dtype, size=steps, element_shape=tf.TensorShape([None, n]))

        def body(t, h, hs, gs):
            q = tf.matmul(h, U) + b_rec
            xt = xw[t]
            z = tk._apply(ract, xt[:, :H] + q[:, :H])
            r = tk._apply(ract, xt[:, H : 2 * H] + q[:, H : 2 * H])
            qh = q[:, 2 * H :]
            n = tk._apply(act, xt[:, 2 * H :] + r * qh)
            h = z * h + (1.0 - z) * n
            return t + 1, h, hs.write(t, h), gs.write(t, tf.concat([z, r, n, qh], axis=-1))

        _, _, hs, gs = tf.while_loop(lambda t, *_: t < steps, body, (0, h0, ta(H), ta(4 * H)))
        return hs.stack(), gs.stack()

    return forward


def _backward(act: str, ract: str, H: int, key: tuple) -> Any:
    import tensorflow as tf

    ops_ = tk._TFOps()

    def backward(hs, gs, h0, U, lam):
        h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
        z, r, n, qh = gs[..., :H], gs[..., H : 2 * H], gs[..., 2 * H : 3 * H], gs[..., 3 * H :]
        cn = (1.0 - z) * tk._deriv(act, n)
        C_in = tf.concat([(h_prev - n) * tk._deriv(ract, z), cn * qh * tk._deriv(ract, r), cn], axis=-1)
        C_rec = tf.concat([C_in[..., : 2 * H], cn * r], axis=-1)

        def tile3(u):
            return tf.concat([u, u, u], axis=-1)

        if key == ("exact",):
            steps = tf.shape(hs)[0]
            out = tf.TensorArray(hs.dtype, size=steps, element_shape=tf.TensorShape([None, H]))

            def body(t, carry, out):
                w = lam[t] + carry
                back = tf.matmul(tile3(w) * C_rec[t], U, transpose_b=True) + w * z[t]
                return t - 1, back, out.write(t, w)

            _, ds0, out = tf.while_loop(lambda t, *_: t >= 0, body, (steps - 1, tf.zeros_like(h0), out))
            u, diag = out.stack(), Diagnostics()
        else:
            k, tol, gamma, _ = key

            def block(u):
                return ops_.shift_next(tk._project(tile3(u) * C_rec, U, transpose_b=True))

            u, diag = highway_adjoint(ops_.shift_next(z), lam, block, iterations=k, ops=ops_, tol=tol, gamma=gamma)
            ds0 = tf.matmul(tile3(u[0]) * C_rec[0], U, transpose_b=True) + u[0] * z[0]
        u3 = tile3(u)
        return u3 * C_in, u3 * C_rec, ds0, diagnostics_vector(diag)

    return backward


def gru_run(cell: Any, params: list, x: Any, states: list, options: HighwayOptions,
            auto: Any = None, report: Any = None) -> tuple[Any, list]:
    import tensorflow as tf

    act, ract = tk._act_name(cell.activation), tk._act_name(cell.recurrent_activation)
    W, U = params[0], params[1]
    H = cell.units
    b = params[2] if cell.use_bias else tf.zeros((2, 3 * H), dtype=x.dtype)
    forward = tk._compiled(("gru-f", act, ract, H), lambda: _forward(act, ract, H), tk._state["forward_xla"])

    def backward_for(o: HighwayOptions) -> Any:
        key = tk._options_key(o, x.shape[0])
        return tk._compiled(("gru-b", act, ract, H, key), lambda: _backward(act, ract, H, key), tk._state["backward_xla"])

    @tf.custom_gradient
    def op(x, W, U, b, h0):
        xw = tk._project(x, W) + b[0]
        # stop_gradient: no tape may ask the loop for a gradient of its own (see tf_lstm).
        hs, gs = forward(*[tf.stop_gradient(t) for t in (xw, U, b[1], h0)])

        def grads(o, dhs):
            d_in, d_rec, ds0, diag = backward_for(o)(hs, gs, h0, U, dhs)
            if not o.exact:  # the exact loop measures nothing to report
                report_vector(diag, report)
            d_in.set_shape(hs.shape[:-1] + [3 * H])
            d_rec.set_shape(hs.shape[:-1] + [3 * H])
            h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
            dx = tk._project(d_in, W, transpose_b=True)  # pruned by the graph when unused
            db = tf.stack([tf.reduce_sum(d_in, axis=(0, 1)), tf.reduce_sum(d_rec, axis=(0, 1))])
            return dx, tk._weight_grad(x, d_in), tk._weight_grad(h_prev, d_rec), db, ds0

        def probe(o, x, W, U, b, h0, hs, gs, dhs):
            # The keras.ops path's probe on this route's states (auto_graph), eagerly; its
            # times are this route's compiled adjoints'.
            def route(mode):
                return backward_for(mode), (hs, gs, h0, U, dhs)

            dx, ds0, dparams = auto.ops_backward(o, x, h0, hs, None, dhs, [W, U, b][: len(params)], route=route)
            return dx, dparams[0], dparams[1], dparams[2] if cell.use_bias else tf.zeros_like(b), ds0

        def grad(dhs):
            dhs = tf.zeros_like(hs) if dhs is None else tf.reshape(dhs, tf.shape(hs))
            if auto is None:
                return grads(options, dhs)
            return tuple(auto.gradient(lambda o: grads(o, dhs), probe, [x, W, U, b, h0, hs, gs, dhs], [x, W, U, b, h0]))

        return hs, grad

    hs = op(x, W, U, b, states[0])
    return hs, [hs[-1]]
