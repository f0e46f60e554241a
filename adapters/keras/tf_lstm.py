"""The TensorFlow route's LSTM (``tf_kernels``): a forward that keeps its gates and the
compiled backward.

Keras LSTM: ``z = x_t W + h_{t-1} U + b``, gates ``i, f, c, o``; ``c_t = f c_{t-1} + i g``,
``h_t = o φ(c_t)``. With the kept gates the per-step coefficients of the block VJP are
(``σ'``, ``φ'`` from the outputs):

    A = [g σ'(i), c_{t-1} σ'(f), i φ'(g)]     Ao = φ(c_t) σ'(o)      Bc = o φ'(c_t)
    δ = [dc ⊙ A, λh ⊙ Ao]                       (the gate pre-activations' cotangent)
    to h_{t-1}: δ Uᵀ                            to c_{t-1}: dc ⊙ f

with ``dc = λc + λh ⊙ Bc`` (``"step"`` split) or ``dc = λc`` (``"gates"``, whose ``fold``
adds ``λh ⊙ Bc`` to the cell-state scan's right-hand side), as in ``lstm.py``.
"""

from __future__ import annotations

from typing import Any

from hwbptt.engine import highway_adjoint
from hwbptt.options import Diagnostics, HighwayOptions

from . import tf_kernels as tk
from .gradient import diagnostics_vector, report_vector

__all__ = ["lstm_run"]


def _forward(act: str, ract: str, H: int) -> Any:
    import tensorflow as tf

    def forward(xw, U, h0, c0):
        steps = tf.shape(xw)[0]
        ta = lambda n: tf.TensorArray(xw.dtype, size=steps, element_shape=tf.TensorShape([None, n]))

        def body(t, h, c, hs, kept):
            z = xw[t] + tf.matmul(h, U)
            i = tk._apply(ract, z[:, :H])
            f = tk._apply(ract, z[:, H : 2 * H])
            g = tk._apply(act, z[:, 2 * H : 3 * H])
            o = tk._apply(ract, z[:, 3 * H :])
            c = f * c + i * g
            h = o * tk._apply(act, c)
            # One write of [c, i, f, g, o] a step, not one for c and one for the gates: each
            # TensorArray write and its stack cost about 20 ms over T = 1024 at B = 32, H = 128
            # (this forward took 108-113 ms there, the one with two writes 127-131 ms).
            return t + 1, h, c, hs.write(t, h), kept.write(t, tf.concat([c, i, f, g, o], axis=-1))

        _, _, _, hs, kept = tf.while_loop(lambda t, *_: t < steps, body, (0, h0, c0, ta(H), ta(5 * H)))
        return hs.stack(), kept.stack()

    return forward


def _backward(act: str, ract: str, H: int, key: tuple) -> Any:
    import tensorflow as tf

    ops_ = tk._TFOps()

    def backward(hs, kept, h0, c0, U, lh, lc):
        cs, gs = kept[..., :H], kept[..., H:]  # sliced inside the compiled function: no copies
        c_prev = tf.concat([c0[None], cs[:-1]], axis=0)
        i, f, g, o = gs[..., :H], gs[..., H : 2 * H], gs[..., 2 * H : 3 * H], gs[..., 3 * H :]
        tc = tk._apply(act, cs)
        C = tf.concat([g * tk._deriv(ract, i), c_prev * tk._deriv(ract, f), i * tk._deriv(act, g),
                       tc * tk._deriv(ract, o)], axis=-1)  # [A, Ao]
        Bc = o * tk._deriv(act, tc)

        def delta(lam_h, dc):
            return tf.concat([dc, dc, dc, lam_h], axis=-1) * C

        if key == ("exact",):
            steps = tf.shape(hs)[0]
            out = tf.TensorArray(hs.dtype, size=steps, element_shape=tf.TensorShape([None, 4 * H]))

            def body(t, ch, cc, out):
                lam_h = lh[t] + ch
                dc = lc[t] + cc + lam_h * Bc[t]
                d = tf.concat([dc, dc, dc, lam_h], axis=-1) * C[t]
                return t - 1, tf.matmul(d, U, transpose_b=True), dc * f[t], out.write(t, d)

            _, dh0, dc0, out = tf.while_loop(lambda t, *_: t >= 0, body, (steps - 1, tf.zeros_like(h0), tf.zeros_like(c0), out))
            return out.stack(), dh0, dc0, diagnostics_vector(Diagnostics())

        k, tol, gamma, split = key
        gates = split == "gates"

        def parts(u):
            uh, uc = u[..., :H], u[..., H:]
            return uh, (uc if gates else uc + uh * Bc)

        def fold(b):
            if not gates:
                return b
            bh, bc = b[..., :H], b[..., H:]
            return tf.concat([bh, bc + bh * Bc], axis=-1)

        def block(u):
            uh, dc = parts(u)
            to_h = tk._project(delta(uh, dc), U, transpose_b=True)
            to_c = tf.zeros_like(to_h) if gates else uh * Bc * f
            return fold(ops_.shift_next(tf.concat([to_h, to_c], axis=-1)))

        if gates and tol is None and gamma == 0.0:
            # The default. The h part of the adjoint has no residual (K = 0 on h): the scan
            # variable is dc alone, λh = ℓh + (δ Uᵀ)_{t+1} is the block's state, and
            # dc = scan(f_{t+1}, ℓc + λh ⊙ Bc) (one (B, H) scan, as lstm_math's "gates"
            # split). observe keeps the λh that belongs to the iterate the engine keeps.
            box, kept = [lh], [lh]

            def gates_block(dc):
                q = ops_.shift_next(tk._project(delta(box[0], dc), U, transpose_b=True))
                box[0] = lh + q
                return q * Bc

            def observe(_, __, best):
                kept[0] = tf.where(best, box[0], kept[0])

            dc, diag = highway_adjoint(ops_.shift_next(f), lc + lh * Bc, gates_block, iterations=k, ops=ops_,
                                       tol=tol, gamma=gamma, observe=observe)
            uh = kept[0]
        else:
            residual = ops_.shift_next(tf.concat([tf.zeros_like(f), f], axis=-1))
            local = fold(tf.concat([lh, lc], axis=-1))
            u, diag = highway_adjoint(residual, local, block, iterations=k, ops=ops_, tol=tol, gamma=gamma)
            uh, dc = parts(u)
        d = delta(uh, dc)
        return d, tf.matmul(d[0], U, transpose_b=True), dc[0] * f[0], diagnostics_vector(diag)

    return backward


def lstm_run(cell: Any, params: list, x: Any, states: list, options: HighwayOptions,
             auto: Any = None, report: Any = None) -> tuple[Any, list]:
    import tensorflow as tf

    act, ract = tk._act_name(cell.activation), tk._act_name(cell.recurrent_activation)
    W, U = params[0], params[1]
    H = cell.units
    b = params[2] if cell.use_bias else tf.zeros((4 * H,), dtype=x.dtype)
    forward = tk._compiled(("lstm-f", act, ract, H), lambda: _forward(act, ract, H), tk._state["forward_xla"])

    def backward_for(o: HighwayOptions) -> Any:
        key = tk._options_key(o, x.shape[0])
        return tk._compiled(("lstm-b", act, ract, H, key), lambda: _backward(act, ract, H, key), tk._state["backward_xla"])

    @tf.custom_gradient
    def op(x, W, U, b, h0, c0):
        xw = tk._project(x, W) + b
        # stop_gradient: no tape may ask the loop for a gradient of its own (it would keep
        # per-step accumulators, and XLA refuses them): the gradient is grad's.
        hs, kept = forward(*[tf.stop_gradient(t) for t in (xw, U, h0, c0)])
        cs = kept[..., :H]

        def grads(o, dhs, dcs):
            d, dh0, dc0, diag = backward_for(o)(hs, kept, h0, c0, U, dhs, dcs)
            if not o.exact:  # the exact loop measures nothing to report
                report_vector(diag, report)
            d.set_shape(kept.shape[:-1].concatenate([4 * H]))
            h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
            dx = tk._project(d, W, transpose_b=True)  # pruned by the graph when unused
            return dx, tk._weight_grad(x, d), tk._weight_grad(h_prev, d), tf.reduce_sum(d, axis=(0, 1)), dh0, dc0

        def probe(o, x, W, U, b, h0, c0, hs, cs, kept, dhs, dcs):
            # The keras.ops path's probe on this route's states (auto_graph), eagerly; its
            # times are this route's compiled adjoints'.
            def route(mode):
                return backward_for(mode), (hs, kept, h0, c0, U, dhs, dcs)

            dx, ds0, dparams = auto.ops_backward(o, x, tf.concat([h0, c0], -1), tf.concat([hs, cs], -1), None,
                                                 tf.concat([dhs, dcs], -1), [W, U, b][: len(params)], route=route)
            db = dparams[2] if cell.use_bias else tf.zeros_like(b)
            return dx, dparams[0], dparams[1], db, ds0[:, :H], ds0[:, H:]

        def grad(dhs, dcs):
            dhs = tf.zeros_like(hs) if dhs is None else tf.reshape(dhs, tf.shape(hs))
            dcs = tf.zeros_like(cs) if dcs is None else tf.reshape(dcs, tf.shape(cs))
            if auto is None:
                return grads(options, dhs, dcs)
            return tuple(auto.gradient(lambda o: grads(o, dhs, dcs), probe,
                                       [x, W, U, b, h0, c0, hs, cs, kept, dhs, dcs], [x, W, U, b, h0, c0]))

        return (hs, cs), grad

    hs, cs = op(x, W, U, b, states[0], states[1])
    return hs, [hs[-1], cs[-1]]
