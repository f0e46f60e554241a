"""The Highway-BP options every adapter exposes, and their validation.

``iterations``  int >= 0, ``None`` for the exact (BPTT) gradient, or ``"auto"``: the layer
                measures, every ``probe_every`` training steps, the cosine of each ``k`` of a
                small ladder to the exact gradient and the time of each mode, and uses the
                fastest mode (exact included) whose cosine is at least ``fidelity``
                (``hwbptt.auto``).
``fidelity``    float in (0, 1] (``"auto"`` only, default 0.99): the cosine to the exact
                adjoint a mode must reach to be chosen.
``probe_every`` int >= 1 (``"auto"`` only, default 50): training steps between probes.
``tol``         float > 0 or ``None``: stop once an iteration changes the adjoint estimate
                by less than ``tol * ||w||`` (relative), capped by ``iterations``.
``gamma``       float in [0, 1]: the share of the residual moved into the block
                (design note, section 2). ``gamma = 1`` is fixed-point iteration (FPI).
``split``       ``"gates"`` or ``"step"`` (LSTM only): what counts as a block. ``"step"``
                is the paper's split (the whole step but the cell-state residual);
                ``"gates"`` counts only the ``h_{t-1} -> gates`` crossing and feeds the
                ``c_t -> h_t`` readout into the cell-state scan within the iteration.
``diagnostics`` ``False``, ``True`` (iterations used and per-iteration update norms) or
                ``"debug"`` (also the cosine of the estimate to the exact gradient).

A layer may also offer ``check_finite`` (``CheckFiniteMixin``; ``False`` by default): a
safety check, not part of the algorithm, so not in ``HighwayOptions``. When ``True``, a
non-finite value (NaN, +-Inf) in the inputs or outputs of the forward, or in the upstream
gradient in the backward, raises ``FloatingPointError`` naming the tensor and the first
time step where it appears. When ``False`` non-finite values propagate as BPTT
propagates them.

The options are plain attributes of the layers (``layer.iterations = 5``); the
``HighwayOptionsMixin`` descriptors validate every assignment, so a bad value fails where
it is set, with the argument's name and value in the message.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "HighwayOptions",
    "HighwayOptionsMixin",
    "Diagnostics",
    "check_iterations",
    "check_tol",
    "check_gamma",
    "check_split",
    "check_diagnostics",
    "check_check_finite",
    "check_fidelity",
    "check_probe_every",
    "CheckFiniteMixin",
    "HighwayDivergenceWarning",
    "effective_iterations",
]

SPLITS = ("gates", "step")
DIAGNOSTICS = (False, True, "debug")


AUTO = "auto"


class HighwayDivergenceWarning(UserWarning):
    """The Highway iteration's updates grew instead of shrinking (the path sum diverges:
    the block part ``J`` is large against ``1 - ||K||``, a near-chaotic regime), so more
    iterations give a worse gradient; or they shrank so slowly that the estimated rest of
    the series outweighs the estimate (the edge of that regime: the gradient may point
    anywhere). Raised once per layer and direction; the layer's diagnostics record every
    occurrence (``Diagnostics.diverged``, ``growth``; ``unconverged``, ``remainder``)."""


def divergence_warning(who: str, diagnostics: "Diagnostics", iterations: Any) -> HighwayDivergenceWarning:
    """The warning for one backward whose diagnostics show ``diverged`` or ``unconverged``
    (``who`` names the layer, and the direction where there are several)."""
    d = diagnostics
    if d.diverged:
        what = (
            f"the Highway-BP updates grew {d.growth:.3g}x over {d.iterations} iterations (iterations={iterations}): "
            "the path sum diverges (the recurrent block is large against the residual, a near-chaotic regime), "
            f"so more iterations give a worse gradient; the estimate of iteration {d.used} was kept"
        )
    else:
        rest = "the rest is unbounded" if d.remainder == float("inf") else f"the rest is about {d.remainder:.3g}x the estimate"
        what = (
            f"the Highway-BP updates shrank by only {d.rate:.3g} per iteration over {d.used} iterations "
            f"(iterations={iterations}): {rest}, so this gradient may be far from BPTT's (the edge of the "
            "near-chaotic regime, where the recurrent block is large against the residual)"
        )
    return HighwayDivergenceWarning(
        f"{who}: {what}. Use iterations='auto' (measures the cosine to the exact gradient and picks a faithful "
        "mode, exact included), or iterations=None (exact BPTT). Warned once per layer; every occurrence is in "
        "last_diagnostics (diverged and growth, unconverged and remainder)."
    )


def check_iterations(value: Any) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, str) and value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"iterations must be an int >= 0, None (exact) or 'auto', got {value!r} of type {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"iterations must be >= 0, None (exact) or 'auto', got iterations={value}")
    return int(value)


def check_fidelity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fidelity must be a float in (0, 1], got fidelity={value!r} of type {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"fidelity must be in (0, 1] (a cosine to the exact gradient), got fidelity={value}")
    return float(value)


def check_probe_every(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"probe_every must be an int >= 1, got probe_every={value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"probe_every must be an int >= 1 (training steps between probes), got probe_every={value}")
    return int(value)


def check_tol(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"tol must be a float > 0 or None, got {value!r} of type {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"tol must be a finite float > 0 or None, got tol={value}")
    return float(value)


def check_gamma(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"gamma must be a float in [0, 1], got {value!r} of type {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got gamma={value}")
    return float(value)


def check_split(value: Any) -> str:
    if value not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got split={value!r}")
    return value


def check_diagnostics(value: Any) -> bool | str:
    if not any(value is d or (isinstance(d, str) and value == d) for d in DIAGNOSTICS):
        raise ValueError(f"diagnostics must be one of {DIAGNOSTICS}, got diagnostics={value!r}")
    return value


def check_check_finite(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"check_finite must be a bool, got check_finite={value!r} of type {type(value).__name__}")
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "iterations": check_iterations,
    "tol": check_tol,
    "gamma": check_gamma,
    "split": check_split,
    "diagnostics": check_diagnostics,
    "fidelity": check_fidelity,
    "probe_every": check_probe_every,
}


@dataclass(frozen=True)
class HighwayOptions:
    """A validated snapshot of the options, taken at each forward pass."""

    iterations: int | None = 3
    tol: float | None = None
    gamma: float = 0.0
    split: str = "gates"
    diagnostics: bool | str = False
    fidelity: float = 0.99
    probe_every: int = 50
    # Set by an ``"auto"`` controller, never by users: this backward is a probe. It returns
    # the exact adjoint and measures the cosine and time of the estimates ``k = 0 .. max(probe)``
    # (``hwbptt.auto``); ``iterations`` then holds ``max(probe)``.
    probe: tuple[int, ...] | None = None
    # Whether the probe pass may stop once its iterations cost more than the exact adjoint
    # (``hwbptt.auto.costlier_than_exact``); off where a cost model replaces the measured times.
    probe_stops_on_cost: bool = True

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))
        if self.probe is not None:
            object.__setattr__(self, "probe", tuple(int(k) for k in self.probe))

    @property
    def exact(self) -> bool:
        return self.iterations is None and self.tol is None

    @property
    def auto(self) -> bool:
        return self.iterations == AUTO


def effective_iterations(options: HighwayOptions, steps: int) -> int:
    """The iteration cap: ``iterations`` (``steps`` when only ``tol`` is set), never more
    than ``steps``, since ``steps`` iterations already give the exact gradient."""
    if options.iterations == AUTO:
        raise ValueError(
            "iterations='auto' must be resolved to a mode by the layer's auto controller before the backward "
            "(hwbptt.auto.AutoController.plan)"
        )
    cap = steps if options.iterations is None else options.iterations
    return max(0, min(cap, steps))


class _ValidatedOption:
    """Data descriptor: stores the checked value in the instance's ``__dict__``."""

    def __init__(self, name: str):
        self.name = name
        self.slot = "_highway_" + name
        self.check = _CHECKS[name]

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.slot, getattr(HighwayOptions, self.name))

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = self.check(value)


class HighwayOptionsMixin:
    """Gives a layer the Highway options as validated attributes."""

    iterations = _ValidatedOption("iterations")
    tol = _ValidatedOption("tol")
    gamma = _ValidatedOption("gamma")
    split = _ValidatedOption("split")
    diagnostics = _ValidatedOption("diagnostics")
    fidelity = _ValidatedOption("fidelity")
    probe_every = _ValidatedOption("probe_every")

    def _set_highway_options(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    @property
    def highway_options(self) -> HighwayOptions:
        return HighwayOptions(**{name: getattr(self, name) for name in _CHECKS})


class _CheckFiniteOption:
    """Data descriptor for ``check_finite`` (validated, default ``False``)."""

    slot = "_highway_check_finite"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.slot, False)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = check_check_finite(value)


class CheckFiniteMixin:
    """Gives a layer the ``check_finite`` attribute (see the module docstring). Only
    layers that implement the check inherit it, so setting it never does nothing."""

    check_finite = _CheckFiniteOption()


@dataclass
class Diagnostics:
    """What one Highway-BP backward did, for one layer and direction.

    ``iterations``    iterations run (after an early stop by ``tol``, fewer than the cap).
    ``update_norms``  ``||w^k - w^{k-1}|| / ||w^k||`` for each iteration ``k = 1, 2, ...``.
    ``cosine``        (``diagnostics="debug"``) cosine of the adjoint estimate ``w`` to the
                      exact adjoint, over all steps.
    ``diverged``      the absolute update ``d_k = ||w^k - w^{k-1}||`` grew above the smallest
                      earlier one (``k >= 2``, above rounding): the path sum diverges. Always
                      measured (one norm per iteration).
    ``growth``        ``max_k d_k / min_{j<k} d_j`` over the iterations run (``None`` before
                      two iterations); above 1 means the updates grew.
    ``used``          the iterate returned: the last one whose update did not grow (the
                      last one run unless ``diverged``).
    ``rate``          (updates shrinking, ``k >= 1``) the mean rate ``ρ = (d_k / d_0)^{1/k}``
                      at which they shrank, ``d_0 = ||w^0||``.
    ``remainder``     the estimated rest of the series, ``d_k ρ / (1 - ρ)``, as a fraction of
                      ``||w^k||`` (infinite for ``ρ >= 1``): how far the estimate may still be
                      from the exact adjoint.
    ``unconverged``   ``remainder`` above ``hwbptt.engine.REMAINDER_LIMIT`` (1): the estimated
                      rest outweighs the estimate, the iteration converges far too slowly
                      for this ``k``. Warned as divergence is.
    ``probe``         (a probe of ``iterations="auto"``) ``{"cosines": {k: cos}, "seconds":
                      {k: s}, "exact_seconds": s, "stopped": why}``: the cosine to the exact
                      adjoint of the estimate a fixed ``k`` would return, and the time to
                      compute it, for the rungs the pass reached; ``stopped`` is
                      ``"faithful"``, ``"diverged"``, ``"cost"`` (the iterations took longer
                      than exact) or None (the ladder ran out). Where Keras timed its
                      compiled TensorFlow route instead (``timed``), the pass's own times
                      are in ``pass_seconds``; torch adds ``exact_path``: ``"tape"``, or
                      ``"parent"`` where exact mode runs the parent's kernel, whose time
                      this project's exact adjoint stands in for.
    """

    iterations: int = 0
    update_norms: list[float] = field(default_factory=list)
    cosine: float | None = None
    diverged: bool = False
    growth: float | None = None
    used: int | None = None
    rate: float | None = None
    remainder: float | None = None
    unconverged: bool = False
    probe: dict | None = None
