"""The PyTorch side of ``iterations="auto"`` and of the divergence warning.

The layers reach this module through two hooks only (so that it does not depend on how
their autograd Functions are written):

- ``plan(module, options, steps)`` at a forward pass that needs a gradient: the concrete
  options of its backward (a probe, or the mode chosen by ``hwbptt.auto.AutoController``);
- ``after_backward(module, key, diagnostics)`` after every Highway backward: hands a
  probe's measurements to the controller, and warns (``HighwayDivergenceWarning``, once
  per layer and direction) when a fixed ``k`` diverged or converged far too slowly. ``Sink`` is the dict of a
  forward's diagnostics that calls it when the backward stores an entry.

``probe_adjoint`` is what a tape's ``highway()`` runs for a probe: the exact adjoint
(timed), then one pass of the iteration with the cosine and the time of each rung.
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Any, Callable, Hashable

import torch

from hwbptt.auto import AutoController, ProbePass
from hwbptt.options import Diagnostics, HighwayOptions, divergence_warning

__all__ = ["plan", "after_backward", "Sink", "probe_adjoint", "controller"]

_SLOT = "_highway_auto"
_WARNED = "_highway_divergence_warned"
# Module attributes this module keeps: transient (measurements of this process), not pickled.
TRANSIENT = (_SLOT, _WARNED)


def controller(module: Any) -> AutoController:
    """The module's controller, created at its first auto step."""
    ctl = module.__dict__.get(_SLOT)
    if ctl is None:
        ctl = AutoController(module.fidelity, module.probe_every)
        module.__dict__[_SLOT] = ctl
    return ctl


def plan(module: Any, options: HighwayOptions, steps: int) -> HighwayOptions:
    return controller(module).plan(options, steps)


def after_backward(module: Any, key: Hashable, diagnostics: Diagnostics) -> None:
    ctl = module.__dict__.get(_SLOT)
    if ctl is not None and module.iterations == "auto":
        ctl.report(key, diagnostics)  # auto reacts to a divergence by probing again; no warning
        return
    if not (diagnostics.diverged or diagnostics.unconverged):
        return
    warned = module.__dict__.setdefault(_WARNED, set())
    if key in warned:
        return
    warned.add(key)
    where = "" if key is None else f" (layer {key[0]}, direction {key[1]})" if isinstance(key, tuple) else f" ({key})"
    warnings.warn(divergence_warning(f"{type(module).__name__}{where}", diagnostics, module.iterations), stacklevel=2)


class Sink(dict):
    """``{key: Diagnostics}`` of one forward pass; storing an entry runs ``after_backward``."""

    def __init__(self, module: Any):
        super().__init__()
        self._module = weakref.ref(module)

    def __reduce__(self):
        # pickled and deep-copied as the plain dict: the link to the module is this forward's only
        return (dict, (dict(self),))

    def __setitem__(self, key: Hashable, value: Diagnostics) -> None:
        super().__setitem__(key, value)
        module = self._module()
        if module is not None:
            after_backward(module, key, value)


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    if den == 0.0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(torch.dot(a, b)) / den


def probe_adjoint(
    exact: Callable[[], Any],
    iterate: Callable[[Callable[[int, Callable[[], Any], bool], bool]], Any],
    flatten: Callable[[Any], torch.Tensor],
    options: HighwayOptions,
    like: torch.Tensor,
) -> tuple[Any, dict]:
    """Run a probe: ``(exact adjoint, Diagnostics.probe)``.

    ``exact()`` returns the exact adjoint (in the tape's own form); ``iterate(observe)``
    runs the Highway iteration with ``observe(k, current, best)`` called after each
    iteration (``current()`` gives the estimate in the exact adjoint's form);
    ``flatten`` turns either into one tensor for the cosine. The rungs' times count only
    the iteration (cosines are off the clock); where the pass stops: ``hwbptt.auto.ProbePass``.
    The exact time is this exact adjoint's, also where exact mode runs the parent's kernel
    instead (``exact_path``, set by the operator)."""
    _sync(like)
    t = time.perf_counter()
    ref = exact()
    _sync(like)
    clock = ProbePass(options, time.perf_counter() - t)
    ref_flat = flatten(ref)

    def observe(k: int, current: Callable[[], Any], best: bool) -> bool:
        _sync(like)
        return clock.observe(k, best, lambda: _cosine(flatten(current()), ref_flat))

    clock.start()
    iterate(observe)
    return ref, clock.result()
