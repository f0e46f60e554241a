"""The Highway-BP iteration (design note, section 2), written once for every adapter.

Notation. A layer runs ``T`` steps; arrays are indexed by step ``t = 0 .. T-1`` and hold
the adjoint of the state *after* that step. The adjoint estimate ``u`` solves

    u_t = b_t + a_t ⊙ u_{t+1},        u_T = 0                       (reverse linear scan)

where ``a_t`` is the residual multiplier that carries ``u_{t+1}`` into ``u_t`` (the
residual of step ``t+1``, already shifted by the caller: ``diag(K_{t+1})``) and

    b^0_t     = ℓ_t                                                  (highway only)
    b^{k+1}_t = ℓ_t + v^{k+1}_t,   v^{k+1}_t = u^k_{t+1} J_{t+1}     (one batched VJP)

The caller supplies ``block(u) -> v``, the block VJP of every step applied to the current
estimate and aligned as above. It may keep state between calls (the LSTM ``"gates"``
split does), but it must not depend on anything but ``u`` and that state.

``gamma`` moves part of the residual into the block: ``K' = (1-γ) K``,
``J' = J + γ K``. The exact gradient is unchanged; ``γ = 1`` is FPI.

After ``k`` iterations ``u^k_t`` is exact for ``t >= T-1-k`` (the last ``k+1``
steps), so ``T`` iterations give the exact adjoint whatever ``J`` is.

The arithmetic runs on whatever arrays the caller uses: ``ops`` brings the three
operations that are not plain ``+`` and ``*``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from .options import Diagnostics

__all__ = ["ArrayOps", "highway_adjoint"]


class ArrayOps(Protocol):
    """The array operations the iteration needs, for one framework."""

    def reverse_scan(self, a: Any, b: Any) -> Any:
        """``u_t = a_t ⊙ u_{t+1} + b_t`` along axis 0."""

    def shift_next(self, u: Any) -> Any:
        """``u_{t+1}`` at step ``t``, zero at the last step (axis 0)."""

    def norm(self, x: Any) -> float:
        """Euclidean norm of the whole array, as a Python float (a scalar array when
        ``traced``)."""


# Optional, for ops whose arrays can be written in place:
#   reverse_scan_sum(a, b, c, out) -> array   reverse_scan(a, b + c) without forming b + c,
#                                             written into ``out`` where it can (else new).
# The loop then hands each iteration the array of the estimate two iterations back as
# ``out`` (nothing reads it any more): no new large array per iteration.


# Optional, for ops whose arrays are symbolic (a traced graph: TensorFlow's
# ``tf.function``, XLA), where a Python ``if`` cannot read an array's value:
#   traced: bool                      True: ``norm`` returns a scalar array, and
#   where(cond, x, y) -> array        elementwise select (scalars broadcast).
# With ``traced`` and ``tol`` the loop runs to the cap but freezes ``u`` after the
# first iteration that meets ``tol``: the same estimate as stopping there, computed
# without a data-dependent branch. Ops without ``traced`` behave as before.


def highway_adjoint(
    residual: Any,
    local: Any,
    block: Callable[[Any], Any],
    *,
    iterations: int,
    ops: ArrayOps,
    tol: float | None = None,
    gamma: float = 0.0,
    record: bool = False,
) -> tuple[Any, Diagnostics]:
    """Return the adjoint estimate ``u^k`` after at most ``iterations`` iterations.

    ``residual`` (``a``), ``local`` (``ℓ``) and what ``block`` returns share one shape
    ``(T, ...)``. With ``tol`` the loop stops after the first iteration whose relative
    update ``||u^k - u^{k-1}|| / ||u^k||`` is at most ``tol``. ``record`` fills the
    returned diagnostics' ``update_norms`` (it costs one norm per iteration).
    """
    diagnostics = Diagnostics()
    traced = bool(getattr(ops, "traced", False))
    a = residual if gamma == 0.0 else residual * (1.0 - gamma)
    u = ops.reverse_scan(a, local)
    scan_sum = None if traced else getattr(ops, "reverse_scan_sum", None)
    spare = None  # with scan_sum: the estimate two iterations back, free to overwrite
    stopped = None  # traced with tol: scalar boolean array, true once tol was met
    for _ in range(iterations):
        v = block(u)
        if gamma != 0.0:
            # The part of K moved into J: γ a_t ⊙ u_{t+1}.
            v = v + ops.shift_next(u) * residual * gamma
        u_next = ops.reverse_scan(a, local + v) if scan_sum is None else scan_sum(a, local, v, spare)
        if traced and (tol is not None or record):
            u, stopped = _traced_update(ops, u, u_next, tol, stopped, diagnostics)
            continue
        diagnostics.iterations += 1
        if tol is not None or record:
            change = ops.norm(u_next - u) / max(ops.norm(u_next), 1e-30)
            diagnostics.update_norms.append(change)
            spare, u = u, u_next
            if tol is not None and change <= tol:
                break
        else:
            spare, u = u, u_next
    return u, diagnostics


def _traced_update(ops: Any, u: Any, u_next: Any, tol: float | None, stopped: Any, diagnostics: Diagnostics) -> tuple[Any, Any]:
    """One iteration's bookkeeping on symbolic arrays (see the ``traced`` note above).

    ``diagnostics.iterations`` and each ``update_norms`` entry become scalar arrays; an
    iteration after the stop counts 0 and records a change of 0."""
    norm_next = ops.norm(u_next)
    change = ops.norm(u_next - u) / ops.where(norm_next > 1e-30, norm_next, 1e-30)
    if tol is None:
        diagnostics.iterations += 1
        diagnostics.update_norms.append(change)
        return u_next, None
    if stopped is None:  # the first iteration always runs
        diagnostics.iterations = diagnostics.iterations + ops.where(change <= tol, 1, 1)
        diagnostics.update_norms.append(change)
        return u_next, change <= tol
    diagnostics.iterations = diagnostics.iterations + ops.where(stopped, 0, 1)
    diagnostics.update_norms.append(ops.where(stopped, 0.0 * change, change))
    u = ops.where(stopped, u, u_next)
    return u, stopped | (change <= tol)
