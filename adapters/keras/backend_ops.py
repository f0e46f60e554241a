"""The backend-specific pieces, kept in one place.

``KerasArrayOps`` is ``hwbptt.engine.ArrayOps`` written with ``keras.ops``:

    reverse_scan(a, b):  u_t = a_t ⊙ u_{t+1} + b_t along axis 0, u_T = 0
    shift_next(u):       u_{t+1} at step t, 0 at the last step
    norm(x):             ||x||_2 (a Python float, or a scalar tensor when traced)

The scan is the core's odd-even reduction on the torch backend
(``hwbptt.scan.linear_scan``), the same reduction written with ``keras.ops`` elsewhere
when the length is static (it compiles under XLA, where Keras's TensorFlow
``associative_scan`` does not for odd lengths), and ``keras.ops.scan`` (a sequential
loop) when it is not. None of them divides
by cumulative products of gates, which underflow on long sequences.

``make_vjp`` is the backend's reverse-mode autodiff, used only for user cells.
"""

from __future__ import annotations

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


_SEQUENTIAL_BELOW = 8


def _forward_scan(a: Any, b: Any, T: int) -> Any:
    """``u_t = a_t u_{t-1} + b_t`` along axis 0 (static length ``T``), by the odd-even
    reduction of ``hwbptt.scan``: O(T) work, O(log T) depth, no division."""
    if T < _SEQUENTIAL_BELOW:
        rows = [b[0]]
        for t in range(1, T):
            rows.append(b[t] + a[t] * rows[-1])
        return ops.stack(rows)
    n = T // 2
    a_even, a_odd = a[0 : 2 * n : 2], a[1 : 2 * n : 2]
    b_even, b_odd = b[0 : 2 * n : 2], b[1 : 2 * n : 2]
    # Steps (2j, 2j+1) compose into one: u_{2j+1} = (a_{2j+1} a_{2j}) u_{2j-1} + (a_{2j+1} b_{2j} + b_{2j+1}).
    u_odd = _forward_scan(a_odd * a_even, b_odd + a_odd * b_even, n)
    m = (T + 1) // 2 - 1  # even steps 2, 4, ... below T follow from the odd step before them
    u_even = ops.concatenate([b[:1], b[2::2][:m] + a[2::2][:m] * u_odd[:m]], axis=0)
    paired = ops.reshape(ops.stack([u_even[:n], u_odd], axis=1), (2 * n, *ops.shape(b)[1:]))
    return ops.concatenate([paired, u_even[n:]], axis=0) if T % 2 else paired


class KerasArrayOps:
    """``ArrayOps`` on Keras tensors, time on axis 0. ``traced`` selects the engine's
    graph-safe bookkeeping for ``tol`` (``hwbptt.engine``)."""

    def __init__(self, traced: bool = False):
        self.traced = traced

    @staticmethod
    def reverse_scan(a: Any, b: Any) -> Any:
        name = backend_name()
        if name == "torch":
            from hwbptt.scan import linear_scan

            return linear_scan(a, b, reverse=True, dim=0)
        a = ops.broadcast_to(a, ops.shape(b))
        T = b.shape[0]
        if T is not None:
            if T == 0:
                return b
            return ops.flip(_forward_scan(ops.flip(a, 0), ops.flip(b, 0), T), 0)

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
