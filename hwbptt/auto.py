"""``iterations="auto"``: the fastest gradient that stays within a fidelity target.

Every ``probe_every`` training steps (and at the first), a layer in auto mode runs a
*probe* backward: it computes the exact adjoint ``w*`` of that step (the gradient it
returns for the step) and one pass of the Highway iteration, reading off after every
rung ``k`` of a small ladder (``LADDER``, capped below ``T``) the cosine
``cos(ŵ^k, w*)`` of the estimate a fixed ``k`` would return and the time it took to
compute it. One pass serves the whole ladder: the estimates after each ``k`` come for
free. Until the next probe the layer uses the fastest faithful mode:

    faithful = {k : min over the layer's directions of cos(ŵ^k, w*) >= fidelity} ∪ {exact}
    choice   = argmin over faithful of the measured time

(each direction's pass stops at its own first faithful rung; one that stopped below a ``k``
another direction needs counts as faithful there, its time extrapolated: ``_carried``).

Because the cost of ``k`` iterations grows with ``k``, the only Highway candidate is the
smallest faithful ``k``; it is compared with the exact adjoint's measured time. Exact
wins only when it is faster by more than ``noise`` (relative): within the noise band the
previous choice stands (the first time, the Highway ``k``), so timing jitter does not
flip the mode from probe to probe. Choosing exact is a documented outcome, recorded in
``history`` (on a CPU the compiled sequential adjoint can beat ``k`` batched iterations).

The probe pass stops at the first rung that is faithful (larger ``k`` only cost more; two
rungs are measured at least, so that the iterations' cost per ``k`` is known), at
the first iteration whose update grew (``hwbptt.engine``: a diverging path sum; the
estimates of larger ``k`` would be the kept, earlier one), or once the iterations so far
took longer than the exact adjoint by more than the noise band (``costlier_than_exact``:
every larger ``k`` costs at least that much, so exact, faithful by definition, would be
chosen over it). The last one bounds a probe at about twice the exact backward where no
small ``k`` is faithful (the divergent regime), instead of running the whole ladder.

A Highway backward between probes that diverges, or converges far too slowly
(``Diagnostics.unconverged``), asks for a probe at the next step: the regime changed.

This module holds the decision only (no framework); the adapters run the probes
(``hwbptt.torch.auto``, ``hwbptt.keras``) and call ``plan`` at every forward pass that
needs a gradient and ``report`` from every backward.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Hashable

from .options import Diagnostics, HighwayOptions, check_fidelity, check_probe_every

__all__ = ["AutoController", "ProbePass", "LADDER", "NOISE", "ladder_for", "costlier_than_exact", "EXACT"]

LADDER = (0, 1, 2, 3, 5, 10, 20)
NOISE = 0.1  # relative timing difference below which the previous choice stands
EXACT = None  # the exact mode in ``choice`` and ``history`` (as ``iterations=None``)
_UNSET = object()


def costlier_than_exact(seconds: float, exact_seconds: float, noise: float = NOISE) -> bool:
    """Whether ``k`` iterations that took ``seconds`` lose to the exact adjoint
    (``exact_seconds``) by more than the noise band: ``exact_seconds < (1 - noise) seconds``,
    the rule of ``AutoController.decide``. The iterations' cost grows with ``k``, so once
    it holds for some ``k`` it holds for every larger one, and a probe can stop there."""
    return exact_seconds < (1.0 - noise) * seconds


def ladder_for(steps: int, ladder: tuple[int, ...] = LADDER) -> tuple[int, ...]:
    """The rungs below ``steps``: ``k >= T`` is the exact adjoint, a candidate of its own."""
    rungs = tuple(k for k in ladder if k < steps)
    return rungs or (0,)


class ProbePass:
    """The clock and the stops of one probe pass, for the adapters' ``observe`` callbacks.

    ``ProbePass(options, exact_seconds)`` after the exact adjoint was timed; ``start()``
    right before the iteration; ``observe(k, best, cosine)`` after each iteration (the
    adapter has waited for the device), ``cosine()`` computing the estimate's cosine to
    the exact adjoint off the clock, called for the rungs only. Returns whether the pass
    stops: a diverging update (``best`` false), a faithful rung, or iterations that cost
    more than exact (``costlier_than_exact``, where ``options.probe_stops_on_cost``).
    ``result()`` is ``Diagnostics.probe``."""

    def __init__(self, options: HighwayOptions, exact_seconds: float):
        self.options, self.exact_seconds = options, float(exact_seconds)
        self.rungs = frozenset(options.probe or ())
        self.cosines: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.stopped: str | None = None
        self._start, self._off = 0.0, 0.0

    def start(self) -> None:
        self._start, self._off = time.perf_counter(), 0.0

    def observe(self, k: int, best: bool, cosine: Callable[[], float]) -> bool:
        now = time.perf_counter()
        if not best:  # diverged: larger k would return the kept, earlier estimate
            self.stopped = "diverged"
            return True
        spent = now - self._start - self._off
        if k in self.rungs:
            self.seconds[k] = spent
            self.cosines[k] = float(cosine())
            self._off += time.perf_counter() - now
            # a faithful stop after two rungs at least: their times give _carried its slope
            if self.cosines[k] >= self.options.fidelity and (len(self.cosines) >= 2 or len(self.rungs) == 1):
                self.stopped = "faithful"
                return True
        if self.options.probe_stops_on_cost and costlier_than_exact(spent, self.exact_seconds):
            self.stopped = "cost"
            return True
        return False

    def result(self) -> dict:
        return {"cosines": dict(self.cosines), "seconds": dict(self.seconds), "exact_seconds": self.exact_seconds,
                "stopped": self.stopped}


def _carried(probe: dict, rungs: list[int]) -> tuple[dict, dict]:
    """A direction's ``(cosines, seconds)`` over ``rungs`` (every direction's). A direction
    whose pass stopped at a faithful rung ``r`` did not run the larger ``k`` another
    direction needed; it is taken as faithful there too, with its cosine at ``r`` (the
    iteration converges there: its updates did not grow) and a time extrapolated from its
    last two timed rungs, ``t(k) = t(r) + (k - r) slope`` (``pass_seconds``, the pass's own
    times, where the probe was re-timed; slope 0, a lower bound, where fewer than two were
    timed). Other directions' rungs are as measured."""
    cos, sec = dict(probe["cosines"]), dict(probe["seconds"])
    if probe.get("stopped") != "faithful" or not cos:
        return cos, sec
    r = max(cos)
    timed = probe.get("pass_seconds", sec)
    pts = sorted(k for k in timed if k <= r)[-2:]
    slope = max(0.0, (timed[pts[1]] - timed[pts[0]]) / (pts[1] - pts[0])) if len(pts) == 2 else 0.0
    for k in rungs:
        if k > r:
            cos[k] = cos[r]
            if r in sec:
                sec[k] = sec[r] + (k - r) * slope
    return cos, sec


class AutoController:
    """The probe schedule, the ladder and the choice of one layer in auto mode.

    ``plan(options, steps)`` is called at every forward pass that needs a gradient (one
    training step) and returns the concrete options of that pass: a probe
    (``options.probe`` set) or the current choice. ``report(key, diagnostics)`` takes
    what each backward measured, per direction ``key``. The decision is made at the next
    ``plan`` from all the probe reports of the previous step.

    ``history`` is a list of dicts, one per probe: ``step``, ``cosines`` (``{k: cos}``,
    the minimum over the directions; the rungs the probe pass reached), ``seconds``
    (``{k: s}``, summed over the directions), ``exact_seconds``, ``choice`` (an int
    ``k``, or ``None`` for exact) and ``reason``; a divergence between probes adds ``{"step", "event": "diverged",
    "growth"}``, a far too slow convergence ``{"step", "event": "unconverged",
    "remainder"}``.

    ``timing`` (settable attribute): ``timing(probe) -> ({k: seconds}, exact_seconds)``
    replaces each probe's measured times, e.g. by a cost model of the target device.
    """

    def __init__(self, fidelity: float = 0.99, probe_every: int = 50, ladder: tuple[int, ...] = LADDER,
                 noise: float = NOISE, timing: Callable[[dict], tuple[dict, float]] | None = None):
        self.fidelity = check_fidelity(fidelity)
        self.probe_every = check_probe_every(probe_every)
        if not ladder or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in ladder):
            raise ValueError(f"ladder must be a non-empty tuple of ints >= 0, got ladder={ladder!r}")
        self.ladder = tuple(sorted(set(ladder)))
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got noise={noise}")
        self.noise = float(noise)
        # ``timing(probe) -> ({k: seconds}, exact_seconds)`` replaces a probe's measured times
        # (a cost model of another device, or fixed numbers in tests); None: as measured.
        self.timing = timing
        self.step = 0  # forward passes that needed a gradient
        self.choice: Any = _UNSET
        self._history: list[dict] = []
        self._pending: dict[Hashable, dict] = {}
        self._probe_step: int | None = None
        self._reprobe = False

    # -- the adapters' calls ----------------------------------------------------------------
    @property
    def chosen(self) -> bool:
        return self.choice is not _UNSET

    @property
    def history(self) -> list[dict]:
        """The probes so far (a probe's entry appears once its backward has reported)."""
        self.settle()
        return self._history

    def plan(self, options: HighwayOptions, steps: int) -> HighwayOptions:
        """The options of this training step's backward."""
        self.settle()
        self.fidelity, self.probe_every = options.fidelity, options.probe_every
        due = not self.chosen or self._reprobe or self.step % self.probe_every == 0
        if due:
            rungs = ladder_for(steps, self.ladder)
            planned = dataclasses.replace(options, iterations=max(rungs), tol=None, probe=rungs,
                                          # measured times decide, and a stop by NOISE's band is one by this band
                                          probe_stops_on_cost=self.timing is None and self.noise <= NOISE)
            self._probe_step, self._reprobe = self.step, False
        else:
            planned = dataclasses.replace(options, iterations=self.choice, probe=None)
        self.step += 1
        return planned

    def report(self, key: Hashable, diagnostics: Diagnostics) -> None:
        if diagnostics.probe is not None:
            self._pending[key] = diagnostics.probe
        elif (diagnostics.diverged or diagnostics.unconverged) and not self._reprobe:
            self._reprobe = True
            if diagnostics.diverged:
                event = {"event": "diverged", "growth": diagnostics.growth}
            else:
                event = {"event": "unconverged", "remainder": diagnostics.remainder}
            self._history.append({"step": self.step - 1, **event})

    def settle(self) -> None:
        """Decide from the probe reports received since the last decision, if any."""
        if not self._pending:
            return
        results, self._pending = self._pending, {}
        entry = self.decide(results)
        entry["step"] = self._probe_step
        self._history.append(entry)

    # -- the decision -----------------------------------------------------------------------
    def decide(self, results: dict[Hashable, dict]) -> dict:
        """Set ``choice`` from the probes of every direction; return the history entry.
        A function of ``results``, ``fidelity``, ``noise`` and the previous choice only."""
        probes = [results[key] for key in sorted(results, key=repr)]
        if self.timing is not None:
            # the model's times replace every measured one, the pass's own included
            probes = [{**{k: v for k, v in p.items() if k != "pass_seconds"},
                       **dict(zip(("seconds", "exact_seconds"), self.timing(p)))} for p in probes]
        rungs = sorted(set().union(*(p["cosines"] for p in probes)))
        filled = [_carried(p, rungs) for p in probes]
        common = set.intersection(*(set(cos) for cos, _ in filled))
        cosines = {k: min(cos[k] for cos, _ in filled) for k in sorted(common)}
        # A rung may carry a cosine without a time (a probe re-timed on another route keeps
        # the times of the rungs the choice compares only).
        seconds = {k: sum(sec[k] for _, sec in filled) for k in sorted(common) if all(k in sec for _, sec in filled)}
        exact_s = sum(p["exact_seconds"] for p in probes)
        faithful = [k for k, c in cosines.items() if c >= self.fidelity]
        previous = self.choice
        if not faithful:
            choice = EXACT
            best = f"best {max(cosines.values()):.4f}" if cosines else "no rung measured"
            reason = f"no k of the ladder reached cosine {self.fidelity} ({best})"
            if any(p.get("stopped") == "cost" for p in probes):
                reason += "; the pass stopped where the iterations cost more than exact"
        else:
            k = faithful[0]
            t_k = seconds[k]
            if costlier_than_exact(t_k, exact_s, self.noise):
                choice, reason = EXACT, f"exact ({exact_s:.4g} s) is faster than k={k} ({t_k:.4g} s)"
            elif t_k < (1.0 - self.noise) * exact_s:
                choice, reason = k, f"k={k} ({t_k:.4g} s) is faster than exact ({exact_s:.4g} s)"
            else:
                choice = previous if previous in (k, EXACT) else k
                what = "exact" if choice is EXACT else f"k={k}"
                reason = f"k={k} ({t_k:.4g} s) and exact ({exact_s:.4g} s) within {self.noise:.0%}: {what} kept"
        self.choice = choice
        return {"cosines": cosines, "seconds": seconds, "exact_seconds": exact_s, "choice": choice, "reason": reason}

    def state_dict(self) -> dict:
        return {"step": self.step, "choice": self.choice if self.chosen else "unset", "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.choice = _UNSET if state["choice"] == "unset" else state["choice"]
        self._history = list(state["history"])
