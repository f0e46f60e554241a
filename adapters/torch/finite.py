"""``check_finite``: locating the first non-finite value and the error that names it.

Shared by ``HighwayLSTM``/``HighwayGRU`` (``rnn.py``) and ``HighwayRNN(cell)`` (``cell.py``):
with ``check_finite=True`` a NaN/Inf in a checked tensor raises ``FloatingPointError``
naming the layer, the tensor, the phase (forward or backward) and the first index along
the tensor's time dimension (or, for a tensor without one, the index it is read along).
"""

from __future__ import annotations

import torch

__all__ = ["nonfinite_at", "nonfinite_at_step", "raise_nonfinite"]


def nonfinite_at(t: torch.Tensor, time_dim: int) -> tuple[int, float] | None:
    """``(first index along time_dim, a bad value)`` of a non-finite entry of ``t``, or ``None``."""
    t = t.detach()
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    per_step = bad.movedim(time_dim, 0).reshape(t.shape[time_dim], -1)
    step = int(per_step.any(1).nonzero()[0, 0])
    value = float(t.movedim(time_dim, 0)[step].reshape(-1)[per_step[step]][0])
    return step, value


def nonfinite_at_step(t: torch.Tensor, step: int) -> tuple[int, float] | None:
    """``(step, a bad value)`` if ``t``, all of it read at time ``step`` (a final state and
    its gradient: the last step), has a non-finite entry; else ``None``."""
    found = nonfinite_at(t.unsqueeze(0), 0)
    return None if found is None else (step, found[1])


def raise_nonfinite(layer: str, what: str, found: tuple[int, float] | None, phase: str, step_name: str = "step") -> None:
    """Raise ``FloatingPointError`` for ``found`` (``nonfinite_at``'s result); nothing if ``None``."""
    if found is None:
        return
    step, value = found
    raise FloatingPointError(
        f"{layer} (check_finite=True): {what} has a non-finite value ({value}) in the {phase}, "
        f"first at {step_name} {step}"
    )
