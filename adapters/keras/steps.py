"""What every cell's math provides, and the forward loop they share.

Arrays are time-major. ``s`` is the state after each step, ``(T, B, S)``, with the
cell's states (Keras order) concatenated on the last axis; ``s_prev`` is the state before
each step (``s_0`` then ``s[:-1]``). A ``cache`` is a pair ``(steps, shared)``:
``steps`` a tuple of ``(T, B, ...)`` arrays recomputed in one batch from ``x``,
``s_prev`` and ``s`` (no step-by-step replay), ``shared`` the weights they need. Every
function of a cache and a cotangent also works on one step's slice
(``(tuple(a[t] for a in steps), shared)``), which is how the exact (sequential) adjoint
reuses them.

For a cotangent ``λ`` on the state after a step, ``∂s_t/∂s_{t-1} = J_t + K_t`` with
``K_t = diag(residual)``:

    residual(cache)            the diagonal of K_t, (T, B, S)
    block(cache, λ)            λ J_t      (the expensive part, a VJP)
    prev(cache, λ)             λ (J_t + K_t)
    grads(cache, λ)            (∂L/∂x_t for every t, [∂L/∂θ for each weight])
    fold(cache, b)             a linear map applied to the scan's right-hand side at
                               the state's own step (identity but for the LSTM "gates"
                               split, which feeds the c_t -> h_t readout there)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from keras import ops

__all__ = ["StepMath", "scan_states", "weight_grad"]


class StepMath:
    """Base class: the identity ``fold`` and ``prev = block + K λ``."""

    state_sizes: Sequence[int] = ()
    # Per-gate dropout masks (``gate_dropout``): (B, G, D) on the input, (B, G, H) on
    # h_{t-1}, or None. Set by the layer for one call.
    in_gates: Any = None
    rec_gates: Any = None

    def fold(self, cache: tuple, b: Any) -> Any:
        return b

    def prev(self, cache: tuple, lam: Any) -> Any:
        return self.block(cache, lam) + self.residual(cache) * lam

    def step_prev(self, cache: tuple, lam: Any) -> Any:
        """``prev`` for the plain adjoint ``w`` (the ``"step"`` split's meaning of the
        state adjoint), whatever this object's split."""
        return self.prev(cache, lam)

    def residual(self, cache: tuple) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def block(self, cache: tuple, lam: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def scan_states(step: Callable[[list, tuple], list], s0: list, xs: tuple, mask: Any) -> Any:
    """Run ``s_t = step(s_{t-1}, xs_t)`` over axis 0 of ``xs``; a masked step
    (``mask[t]`` false, shape ``(T, B, 1)``) keeps ``s_{t-1}``. Returns the states after
    every step, concatenated: ``(T, B, S)``."""

    def f(carry, inputs):
        if mask is None:
            new = step(list(carry), inputs)
        else:
            *xs_t, m_t = inputs
            new = step(list(carry), tuple(xs_t))
            new = [ops.where(m_t, n, c) for n, c in zip(new, carry)]
        return list(new), list(new)

    seq_in = xs if mask is None else (*xs, mask)
    _, seq = ops.scan(f, list(s0), seq_in)
    return ops.concatenate(list(seq), axis=-1) if len(seq) > 1 else seq[0]


def weight_grad(a: Any, b: Any) -> Any:
    """``Σ_{t,b} a[t,b]ᵀ b[t,b]``: the gradient of a weight used as ``a @ W`` at every
    step, for output cotangent ``b``."""
    return ops.einsum("tbi,tbj->ij", a, b)


def step_slice(cache: tuple, t: int) -> tuple:
    steps, shared = cache
    return tuple(a[t] for a in steps), shared


class AnalyticLinearization:
    """One backward's view of an analytic cell (LSTM, GRU, SimpleRNN): the cache is
    recomputed once, in one batch, and every VJP below is closed-form."""

    has_output = False

    def __init__(self, math: StepMath, params: list, x: Any, s_prev: Any, s: Any):
        self.math, self.params, self.x, self.s_prev = math, params, x, s_prev
        self.cache = math.prepare(params, x, s_prev, s)

    def residual(self) -> Any:
        return self.math.residual(self.cache)

    def block(self, lam: Any) -> Any:
        return self.math.block(self.cache, lam)

    def fold(self, b: Any) -> Any:
        return self.math.fold(self.cache, b)

    def route(self, gy: Any) -> Any:  # the output is the state: nothing to route
        return None

    def grads(self, lam: Any, gy: Any) -> tuple[Any, list, Any]:
        """``(∂L/∂x, [∂L/∂θ], λ_0 (J_0 + K_0))`` for the adjoint ``lam`` of every step."""
        dx, dparams = self.math.grads(self.params, self.x, self.s_prev, self.cache, lam)
        return dx, dparams, self.math.prev(step_slice(self.cache, 0), lam[0])

    def exact_adjoint(self, local: Any, mask: Any) -> tuple[Any, Any]:
        """The sequential adjoint ``w_{t-1} = ℓ_{t-1} + w_t (J_t + K_t)`` as one reverse
        scan of per-step VJPs (a masked step passes ``w`` through). Returns
        ``(fold(w), w_{-1})``: the adjoint in this split's representation (``fold(w)``
        is what Highway-BP converges to), and the initial state's gradient."""
        steps, shared = self.cache

        def f(carry, xs):
            if mask is None:
                st, l_t = xs[:-1], xs[-1]
            else:
                st, l_t, m_t = xs[:-2], xs[-2], xs[-1]
            w_t = l_t + carry
            back = self.math.step_prev((tuple(st), shared), w_t)
            if mask is not None:
                back = m_t * back + (1 - m_t) * w_t
            return back, w_t

        xs = (*steps, local) if mask is None else (*steps, local, mask)
        w_init, w = ops.scan(f, ops.zeros_like(local[0]), xs, reverse=True)
        return self.fold(w), w_init
