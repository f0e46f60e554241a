"""Raise the number of Highway-BP iterations over training.

The gradient's cosine to the exact one falls slowly as a network trains (design note,
section 6), so a growing ``k`` is the natural schedule. ``IterationSchedule`` works like
a learning-rate scheduler: call ``step()`` once per optimisation step.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable

__all__ = ["IterationSchedule"]


def _highway_layers(targets: Any) -> list[Any]:
    """Every object with Highway options among ``targets``: a model (anything with a
    ``modules()`` method, such as a torch module), a layer, or an iterable of those."""
    if hasattr(targets, "modules") and callable(targets.modules):
        found = [m for m in targets.modules() if hasattr(m, "highway_options")]
    elif hasattr(targets, "highway_options"):
        found = [targets]
    elif isinstance(targets, Iterable):
        found = [layer for item in targets for layer in _highway_layers(item)]
    else:
        raise TypeError(f"targets must be a model, a Highway layer or an iterable of them, got {type(targets).__name__}")
    return found


class IterationSchedule:
    """Set ``iterations`` on every Highway layer of ``targets`` from a schedule.

    Either a linear ramp from ``start`` to ``end`` over ``steps`` optimisation steps
    (rounded down, then held at ``end``), or any ``fn(step) -> int``.

    >>> schedule = IterationSchedule(model, start=1, end=10, steps=5000)
    >>> for batch in data:
    ...     loss(model(batch)).backward(); optimizer.step(); schedule.step()
    """

    def __init__(
        self,
        targets: Any,
        start: int = 1,
        end: int = 10,
        steps: int = 1000,
        fn: Callable[[int], int] | None = None,
    ):
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got steps={steps!r}")
        self.layers = _highway_layers(targets)
        if not self.layers:
            raise ValueError("IterationSchedule: targets hold no Highway layer")
        self.start, self.end, self.steps, self.fn = int(start), int(end), int(steps), fn
        self.step_count = 0
        self._apply()

    def value(self, step: int) -> int:
        if self.fn is not None:
            return self.fn(step)
        frac = min(step, self.steps) / self.steps
        return int(self.start + (self.end - self.start) * frac)

    @property
    def iterations(self) -> int:
        return self.value(self.step_count)

    def _apply(self) -> None:
        k = self.value(self.step_count)
        for layer in self.layers:
            layer.iterations = k  # validated by the layer

    def step(self) -> int:
        """Advance one optimisation step; returns the iterations now set."""
        self.step_count += 1
        self._apply()
        return self.iterations

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
