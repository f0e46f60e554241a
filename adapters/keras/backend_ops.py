"""The backend-specific pieces, kept in one place.

``KerasArrayOps`` is ``hwbptt.engine.ArrayOps`` written with ``keras.ops``:

    reverse_scan(a, b):  u_t = a_t ⊙ u_{t+1} + b_t along axis 0, u_T = 0
    shift_next(u):       u_{t+1} at step t, 0 at the last step
    norm(x):             ||x||_2 (a Python float, or a scalar tensor when traced)

The scan is the torch adapter's (``hwbptt.torch.scan.linear_scan``; imported only on the torch
backend, at call time) on the torch backend; elsewhere a
chunked scan written with ``keras.ops`` when the shape is static (``2√T`` sequential steps
over many lanes; it compiles under XLA, where Keras's TensorFlow ``associative_scan`` does
not for odd lengths, and measured 10x faster on TensorFlow than the odd-even reduction
written with strided slices), and ``keras.ops.scan`` (a sequential loop, the reference)
when it is not. None of them divides by cumulative products of gates, which underflow on
long sequences.

``make_vjp`` is the backend's reverse-mode autodiff, used only for user cells.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import keras
from keras import ops

__all__ = ["KerasArrayOps", "is_traced", "make_vjp", "backend_name", "matmul"]


def backend_name() -> str:
    return keras.backend.backend()


def matmul(a: Any, b: Any) -> Any:
    """``a @ b`` in the inputs' dtype. ``keras.ops.matmul`` on the torch backend (Keras
    3.15) computes float64 products in float32 (its result-type rule maps torch dtypes
    to ``floatx``), which would cost the exact mode its float64 accuracy."""
    if backend_name() == "torch":
        import torch

        return torch.matmul(a, b)
    return ops.matmul(a, b)


def match_shape(t: Any, like: Any) -> Any:
    """``t`` with ``like``'s static shape (TensorFlow's graph-mode custom gradients
    hand the upstream gradient over with its shape forgotten)."""
    if backend_name() == "tensorflow":
        import tensorflow as tf

        t = tf.reshape(t, tf.shape(like))
        t.set_shape(like.shape)
    return t


def is_traced(x: Any) -> bool:
    """True when ``x`` is symbolic (a TF graph being built, a JAX tracer): its value
    cannot be read by Python."""
    name = backend_name()
    if name == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if name == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    return False


def _chunk_length(T: int) -> int:
    """About ``√T``: the two sequential loops then take ``√T`` steps each, and the graph
    holds O(√T) operations."""
    return max(1, math.isqrt(T))


def _chunked_reverse_scan(a: Any, b: Any, T: int) -> Any:
    """``u_t = a_t u_{t+1} + b_t`` along axis 0 (static length ``T``, ``u_T = 0``) in chunks.

    The first ``n = C·L`` steps are ``C`` chunks of ``L``; the ``T - n`` left over at the
    end run first, sequentially, and give the carry ``u_n``. Then:

    1. within every chunk at once, from its end: ``v_j = a_j v_{j+1} + b_j`` (zero carry in)
       and ``P_j = a_j P_{j+1}`` (``P_L = 1``): ``L`` steps on ``(C, B, S)`` slices;
    2. across chunks, from the last: ``u`` at chunk ``c``'s first step is
       ``v_0 + P_0 ⊙ carry_c``, which is chunk ``c - 1``'s carry: ``C`` steps on ``(B, S)``;
    3. every step at once: ``u_j = v_j + P_j ⊙ carry_c``.

    O(T) work in ``2√T`` sequential steps, each over many lanes. ``P`` is a product of
    at most ``L`` gates and is only multiplied, never divided by: an underflow to zero
    is the value it stands for. ``a`` may broadcast against ``b`` (a (T, B, 1) mask)."""
    L = _chunk_length(T)
    C = T // L
    n = C * L
    carry = ops.zeros_like(b[0])
    tail = []
    for t in range(T - 1, n - 1, -1):
        carry = b[t] + a[t] * carry
        tail.append(carry)
    tail.reverse()
    a_c = ops.reshape(a[:n], (C, L, *ops.shape(a)[1:]))
    b_c = ops.reshape(b[:n], (C, L, *ops.shape(b)[1:]))
    v, p = [b_c[:, L - 1]], [a_c[:, L - 1]]
    for j in range(L - 2, -1, -1):
        v.append(b_c[:, j] + a_c[:, j] * v[-1])
        p.append(a_c[:, j] * p[-1])
    v = ops.stack(v[::-1], axis=1)
    p = ops.stack(p[::-1], axis=1)
    carries = [None] * C
    for c in range(C - 1, -1, -1):
        carries[c] = carry
        carry = v[c, 0] + p[c, 0] * carry
    u = ops.reshape(v + p * ops.expand_dims(ops.stack(carries), 1), (n, *ops.shape(b)[1:]))
    return ops.concatenate([u, ops.stack(tail)], axis=0) if tail else u


class KerasArrayOps:
    """``ArrayOps`` on Keras tensors, time on axis 0. ``traced`` selects the engine's
    graph-safe bookkeeping for ``tol`` (``hwbptt.engine``)."""

    def __init__(self, traced: bool = False):
        self.traced = traced

    @staticmethod
    def reverse_scan(a: Any, b: Any) -> Any:
        name = backend_name()
        if name == "torch":
            from hwbptt.torch.scan import linear_scan  # only this backend has torch

            return linear_scan(a, b, reverse=True, dim=0)
        T = b.shape[0]
        if T is not None:
            if T == 0:
                return b
            return _chunked_reverse_scan(a, b, T)
        a = ops.broadcast_to(a, ops.shape(b))

        def step(u_next, ab):
            a_t, b_t = ab
            u = b_t + a_t * u_next
            return u, u

        _, u = ops.scan(step, ops.zeros_like(b[0]), (a, b), reverse=True)
        return u

    @staticmethod
    def shift_next(u: Any) -> Any:
        return ops.concatenate([u[1:], ops.zeros_like(u[:1])], axis=0)

    def norm(self, x: Any) -> Any:
        n = ops.sqrt(ops.sum(ops.square(ops.cast(x, "float32") if x.dtype in ("float16", "bfloat16") else x)))
        return n if self.traced else float(n)

    @staticmethod
    def where(cond: Any, x: Any, y: Any) -> Any:
        return ops.where(cond, x, y)


def make_vjp(fn: Callable[..., Sequence[Any]], primals: Sequence[Any]) -> tuple[list[Any], Callable[[Sequence[Any]], list[Any]]]:
    """Run ``outs = fn(*primals)`` once and return ``(outs, vjp)`` where
    ``vjp(cotangents)`` gives ``Σ_o cot_o ∂out_o/∂p`` for every primal ``p`` (zeros where
    unconnected). ``vjp`` may be called many times (one forward, many backwards)."""
    name = backend_name()
    if name == "tensorflow":
        import tensorflow as tf

        primals = [tf.convert_to_tensor(p) for p in primals]
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            for p in primals:
                tape.watch(p)
            outs = list(fn(*primals))

        def vjp(cotangents: Sequence[Any]) -> list[Any]:
            return tape.gradient(
                outs, primals, output_gradients=list(cotangents),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        return [tf.stop_gradient(o) for o in outs], vjp
    if name == "torch":
        import torch

        leaves = [p.detach().requires_grad_(True) for p in primals]
        with torch.enable_grad():
            outs = list(fn(*leaves))

        def vjp(cotangents: Sequence[Any]) -> list[Any]:
            used = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
            if not used:
                return [torch.zeros_like(p) for p in leaves]
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    [o for o, _ in used], leaves, [c for _, c in used],
                    retain_graph=True, allow_unused=True,
                )
            return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]

        return [o.detach() for o in outs], vjp
    if name == "jax":
        import jax

        outs, pullback = jax.vjp(lambda *p: list(fn(*p)), *primals)
        return outs, lambda cotangents: list(pullback(list(cotangents)))
    raise NotImplementedError(f"HighwayRNN user cells need reverse-mode autodiff, which the {name!r} backend does not offer here")
