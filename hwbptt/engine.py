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

__all__ = ["ArrayOps", "highway_adjoint", "one_iteration_diagnostics"]


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
# first iteration that meets ``tol`` (or diverges): the same estimate as stopping there,
# computed without a data-dependent branch. Ops without ``traced`` behave as before.
#
# Optional: dist(x, y) -> float      ``norm(x - y)`` without forming ``x - y``.


# Divergence (design note, "When it converges fast, and when not"). The update
# ``d_k = ||u^k - u^{k-1}||`` is the sum over the paths through exactly ``k`` blocks; it
# shrinks roughly like ``ρ^k`` with ``ρ ≈ ||J|| / (1 - ||K||)`` and grows when ``ρ > 1``,
# where more iterations give a worse gradient. The loop measures ``d_k`` at every
# iteration (one norm), returns the iterate with the smallest ``d_k`` (``k >= 1``) and
# flags growth: an update over ``GROWTH_MARGIN`` times the smallest earlier one (a bump of a
# few percent in a converging series is not divergence; geometric growth passes the margin
# within a few iterations). Updates under ``GROWTH_FLOOR ||u^0||`` (1%) are noise around a
# converged estimate (at that size the estimate is within 1% anyway), never growth.
GROWTH_FLOOR = 1e-2
GROWTH_MARGIN = 1.25

# Slow convergence. While the updates shrink, the iterate ``u^k`` is still off by the rest
# of the series, ``Σ_{j>k} d_j``. With the mean rate ``ρ = (d_k / d_0)^{1/k}`` (``d_0 =
# ||u^0||``, the paths through no block) that rest is about ``d_k ρ / (1 - ρ)``; as a
# fraction of ``||u^k||`` it is ``Diagnostics.remainder``. Above ``REMAINDER_LIMIT`` the
# estimated rest is larger than the estimate itself: ``k`` is far too small for this
# regime (``ρ`` near 1, the edge of divergence) and the gradient may point anywhere.
# Measured on a char LM (docs/results.md, section 4, "remainder"): a GRU whose cosines to
# BPTT were near 0.02 at k = 1, 3 and 10 had median remainders of 4.3, 1.6 and 0.19, each
# run past 1 at some step; a healthy LSTM stayed at 0.61 or below at every k (cosine 0.97
# at k = 1).
REMAINDER_LIMIT = 1.0


def _scalar_where(cond: Any, x: Any, y: Any) -> Any:
    return x if cond else y


def remainder_estimate(d0: Any, dk: Any, k: Any, norm_k: Any, where: Callable = _scalar_where) -> tuple[Any, Any]:
    """``(ρ, remainder)`` for the updates ``d_0 = ||u^0||`` and ``d_k`` after ``k >= 1``
    shrinking iterations and ``norm_k = ||u^k||`` (see ``REMAINDER_LIMIT``): ``(0, 0)``
    when an update is 0, an infinite remainder when ``ρ >= 1``. Python floats, or scalar
    arrays with their ``where`` (a traced loop: no branch reads a value)."""
    zero = 0.0 * d0  # 0 in the arrays' type
    moved = (d0 > 0.0) & (dk > 0.0)
    rho = where(moved, dk / where(d0 > 0.0, d0, 1.0 + zero), zero) ** (1.0 / k)
    slow = rho >= 1.0
    rest = dk * rho / where(slow, 1.0 + zero, 1.0 - rho) / where(norm_k > 0.0, norm_k, 1.0 + zero)
    return rho, where(slow, float("inf") + zero, rest)


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
    observe: Callable[[int, Any, bool], Any] | None = None,
    diverge: bool = True,
) -> tuple[Any, Diagnostics]:
    """Return the adjoint estimate after at most ``iterations`` iterations.

    ``residual`` (``a``), ``local`` (``ℓ``) and what ``block`` returns share one shape
    ``(T, ...)``. With ``tol`` the loop stops after the first iteration whose relative
    update ``||u^k - u^{k-1}|| / ||u^k||`` is at most ``tol``, or whose update grew (see
    ``GROWTH_FLOOR``). ``record`` fills the returned diagnostics' ``update_norms`` (it
    costs one more norm per iteration).

    The estimate returned is the last iterate ``u^j`` whose update did not grow above the
    smallest earlier one (``u^k`` itself while the updates shrink; ``u^0`` when
    ``iterations`` is 0): never one that grew out of a diverging path sum.
    ``diagnostics.used`` is ``j``. This is the optimal truncation of a divergent series
    (stop at its smallest term). ``diverge=False``, and ``gamma = 1``, turn it off: for
    FPI (no residual) the ``k``-th update is the product of ``k`` step Jacobians, which
    grows whenever they have norm above 1 without any harm to FPI's defining property
    (exact on the last ``k + 1`` steps), so FPI always returns ``u^k``.

    ``observe(k, u, best)``, if given, is called with ``u^0`` and after every iteration;
    ``best`` says whether ``u^k`` is now the estimate that would be returned. A true return
    value stops the loop. On traced arrays it is called after every iteration only, with
    ``best`` a scalar boolean array, and its return value is not read. A block with state between calls (the
    LSTM ``"gates"`` split) uses it to keep the state that belongs to the best iterate.
    """
    diagnostics = Diagnostics()
    traced = bool(getattr(ops, "traced", False))
    a = residual if gamma == 0.0 else residual * (1.0 - gamma)
    diverge = diverge and gamma < 1.0
    u = ops.reverse_scan(a, local)
    if traced:
        return _traced_loop(ops, a, residual, local, block, u, iterations, tol, gamma, record, diagnostics, diverge,
                            observe)
    scan_sum = getattr(ops, "reverse_scan_sum", None)
    dist = getattr(ops, "dist", None) or (lambda x, y: ops.norm(x - y))
    diagnostics.used = 0
    if observe is not None and observe(0, u, True):
        return u, diagnostics
    spare = None  # with scan_sum: the estimate two iterations back, free to overwrite
    best, best_d, floor, d0, last_d = u, None, 0.0, 0.0, 0.0
    for k in range(1, iterations + 1):
        v = block(u)
        if gamma != 0.0:
            # The part of K moved into J: γ a_t ⊙ u_{t+1}.
            v = v + ops.shift_next(u) * residual * gamma
        if scan_sum is None:
            u_next = ops.reverse_scan(a, local + v)
        else:
            u_next = scan_sum(a, local, v, None if spare is best else spare)
        d = dist(u_next, u)
        if k == 1:
            d0 = ops.norm(u)
            floor = GROWTH_FLOOR * d0
        diagnostics.iterations += 1
        change = None
        if tol is not None or record:
            change = d / max(ops.norm(u_next), 1e-30)
            diagnostics.update_norms.append(change)
        spare, u = u, u_next
        grew = False
        if best_d is not None:
            ratio = d / max(best_d, 1e-300)
            diagnostics.growth = ratio if diagnostics.growth is None else max(diagnostics.growth, ratio)
            grew = diverge and d > GROWTH_MARGIN * best_d and d > floor
        is_best = not grew  # an update that did not grow above rounding: the latest iterate stands
        if is_best:
            best, diagnostics.used, last_d = u, k, d
            best_d = d if best_d is None else min(best_d, d)
        else:
            diagnostics.diverged = True
        stop = observe is not None and observe(k, u, is_best)
        if tol is not None and (change <= tol or grew):
            break
        if stop:
            break
    if diverge and diagnostics.used and not diagnostics.diverged:
        diagnostics.rate, diagnostics.remainder = remainder_estimate(d0, last_d, diagnostics.used, ops.norm(best))
        diagnostics.unconverged = diagnostics.remainder > REMAINDER_LIMIT
    return best, diagnostics


def one_iteration_diagnostics(d0: float, d1: float, norm1: float, record: bool) -> Diagnostics:
    """What ``highway_adjoint`` reports after exactly one iteration with ``gamma = 0`` (and
    divergence checks on), from the three norms it measures: ``d0 = ||u^0||``, ``d1 =
    ||u^1 - u^0||`` and ``norm1 = ||u^1||``. For an adapter that runs that iteration as
    one fused loop (the LSTM's compiled ``k = 1``) and hands back only the norms;
    ``record`` as ``highway_adjoint``'s (or ``tol`` given). One iteration cannot grow above
    an earlier one, so ``u^1`` is the estimate (``used = 1``)."""
    diagnostics = Diagnostics(iterations=1, used=1)
    if record:
        diagnostics.update_norms.append(d1 / max(norm1, 1e-30))
    diagnostics.rate, diagnostics.remainder = remainder_estimate(d0, d1, 1, norm1)
    diagnostics.unconverged = diagnostics.remainder > REMAINDER_LIMIT
    return diagnostics


def _traced_loop(ops: Any, a: Any, residual: Any, local: Any, block: Callable, u: Any, iterations: int,
                 tol: float | None, gamma: float, record: bool, diagnostics: Diagnostics,
                 diverge: bool, observe: Callable | None = None) -> tuple[Any, Diagnostics]:
    """The loop on symbolic arrays (see the ``traced`` note above): every iteration runs;
    the best iterate, the stop by ``tol`` or growth, and the diagnostics are selects.
    ``diagnostics.iterations``, ``update_norms``, ``diverged``, ``growth``, ``used``, and
    (with ``diverge``) ``rate``, ``remainder`` and ``unconverged`` become scalar arrays; an
    iteration after the stop counts 0 and records a change of 0."""
    best, best_d, floor, stopped = u, None, None, None
    last_d, used = None, None  # the update and the index of the iterate kept (scalar arrays)
    diagnostics.used = None  # a scalar array once an iteration ran
    for k in range(1, iterations + 1):
        v = block(u)
        if gamma != 0.0:
            v = v + ops.shift_next(u) * residual * gamma
        u_next = ops.reverse_scan(a, local + v)
        d = ops.norm(u_next - u)
        if floor is None:
            d0 = ops.norm(u)
            floor = GROWTH_FLOOR * d0
        change = None
        if tol is not None or record:
            norm_next = ops.norm(u_next)
            change = d / ops.where(norm_next > 1e-30, norm_next, 1e-30)
        live = None if stopped is None else ~stopped  # this iteration counts
        if best_d is None:
            best, best_d, last_d, used = u_next, d, d, 1.0 + 0.0 * d
            diagnostics.diverged = d < 0.0  # a false scalar array
            diagnostics.growth = 0.0 * d
            grew = d < 0.0
            better = ~grew
        else:
            ratio = d / ops.where(best_d > 1e-30, best_d, 1e-30)
            grew = (d > GROWTH_MARGIN * best_d) & (d > floor)
            if not diverge:
                grew = grew & (d < 0.0)  # never
            better = ~grew
            if live is not None:
                grew, better, ratio = grew & live, better & live, ops.where(live, ratio, 0.0 * ratio)
            diagnostics.growth = ops.where(ratio > diagnostics.growth, ratio, diagnostics.growth)
            diagnostics.diverged = diagnostics.diverged | grew
            best = ops.where(better, u_next, best)
            best_d = ops.where(better & (d < best_d), d, best_d)
            last_d, used = ops.where(better, d, last_d), ops.where(better, float(k) + 0.0 * d, used)
        if observe is not None:
            observe(k, u_next, better)
        diagnostics.iterations = diagnostics.iterations + (1 if live is None else ops.where(live, 1, 0))
        if change is not None:
            diagnostics.update_norms.append(change if live is None else ops.where(live, change, 0.0 * change))
        u = u_next if live is None else ops.where(live, u_next, u)
        if tol is not None:
            done = (change <= tol) | grew
            stopped = done if stopped is None else stopped | done
    if used is not None:
        diagnostics.used = used
    if diverge and last_d is not None:
        diagnostics.rate, diagnostics.remainder = remainder_estimate(d0, last_d, used, ops.norm(best), ops.where)
        diagnostics.unconverged = ~diagnostics.diverged & (diagnostics.remainder > REMAINDER_LIMIT)
    return best, diagnostics
