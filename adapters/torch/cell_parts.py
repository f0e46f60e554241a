"""The pieces of ``HighwayRNN`` (``hwbptt.torch.cell``) around the cell: its state as
components, the forward loop, the residual multipliers ``a_t`` and the checks that refuse
cells whose batch rows are not independent.

A state is a tensor or a tuple of tensors; for the math it is the concatenation of its
components flattened per batch row (``_flat``, ``_unflat``). Residuals: ``nn.LSTMCell``
``a_t = f_t`` on ``c``; ``nn.GRUCell`` ``a_t = z_t`` on ``h``; ``"identity"``; a callable;
``"none"`` (the design note, section 3, and ``hwbptt.torch.cell``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

_RESIDUAL_NAMES = ("identity", "none")


# ----------------------------------------------------------------------------- state helpers


def _components(state: Any) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def _pack(components: Sequence[torch.Tensor], is_tuple: bool) -> Any:
    return tuple(components) if is_tuple else components[0]


def _describe(state: Any) -> str:
    if isinstance(state, torch.Tensor):
        return f"tensor of shape {tuple(state.shape)} and dtype {state.dtype}"
    if isinstance(state, (tuple, list)):
        return f"{type(state).__name__} of {len(state)} (" + ", ".join(_describe(s) for s in state) + ")"
    return f"{type(state).__name__}"


def _check_new_state(new: Any, old: tuple[torch.Tensor, ...], is_tuple: bool, step: int) -> tuple[torch.Tensor, ...]:
    """The cell's output state must have the structure, shapes and dtypes of its input state."""
    bad = None
    if is_tuple:
        if not isinstance(new, (tuple, list)) or len(new) != len(old):
            bad = "structure"
    elif not isinstance(new, torch.Tensor):
        bad = "structure"
    if bad is None:
        comps = _components(new)
        for n, o in zip(comps, old):
            if not isinstance(n, torch.Tensor) or n.shape != o.shape or n.dtype != o.dtype:
                bad = "shape or dtype"
                break
    if bad is not None:
        expected = _describe(_pack(old, is_tuple))
        raise ValueError(
            f"HighwayRNN: the cell's output state does not match its input state ({bad}) at step {step}: "
            f"the cell was given a {expected} and returned a {_describe(new)}. "
            "A recurrent cell must return a state of the same structure, shapes and dtypes."
        )
    return comps


def _loop(cell: Callable, x: torch.Tensor, s0: tuple[torch.Tensor, ...], is_tuple: bool) -> list[torch.Tensor]:
    """Run the cell over ``x`` (T, B, ...); return each state component stacked (T, B, ...)."""
    state = s0
    history: list[tuple[torch.Tensor, ...]] = []
    for t in range(x.shape[0]):
        state = _check_new_state(cell(x[t], _pack(state, is_tuple)), state, is_tuple, t)
        history.append(state)
    return [torch.stack(steps) for steps in zip(*history)]


def _flat(components: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], T: int, B: int) -> torch.Tensor:
    """Components (T·B, ...) -> one (T, B, N) tensor; ``None`` reads as zeros."""
    # Explicit sizes: with B = 0 (or an empty state) a -1 would be ambiguous.
    parts = [
        (torch.zeros_like(ref) if c is None else c).reshape(T, B, math.prod(ref.shape[1:]))
        for c, ref in zip(components, like)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _unflat(u: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(T, B, N) -> components shaped like ``like`` (T·B, ...)."""
    sizes = [math.prod(ref.shape[1:]) for ref in like]
    pieces = torch.split(u, sizes, dim=-1) if len(like) > 1 else (u,)
    return [p.reshape(ref.shape) for p, ref in zip(pieces, like)]


# ----------------------------------------------------------------------------- residuals


def _check_residual_option(residual: Any) -> Any:
    if residual is None or callable(residual):
        return residual
    if isinstance(residual, str):
        if residual in _RESIDUAL_NAMES:
            return residual
        raise ValueError(
            f"residual must be None, 'identity', 'none' or a callable (x_t, state_prev, state_new) -> multipliers, "
            f"got residual={residual!r}"
        )
    raise TypeError(
        f"residual must be None, 'identity', 'none' or a callable (x_t, state_prev, state_new) -> multipliers, "
        f"got residual={residual!r} of type {type(residual).__name__}"
    )


def _lstm_residual(cell: nn.LSTMCell, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple:
    """``(None, f_t)``: the forget gate carries ``c_{t-1}`` into ``c_t``; nothing on ``h``."""
    H = cell.hidden_size
    h = state[0]
    pre = x @ cell.weight_ih[H : 2 * H].T + h @ cell.weight_hh[H : 2 * H].T
    if cell.bias:
        pre = pre + cell.bias_ih[H : 2 * H] + cell.bias_hh[H : 2 * H]
    return (None, torch.sigmoid(pre))


def _gru_residual(cell: nn.GRUCell, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``z_t``: the update gate carries ``h_{t-1}`` into ``h_t`` (gate order r, z, n)."""
    H = cell.hidden_size
    pre = x @ cell.weight_ih[H : 2 * H].T + state @ cell.weight_hh[H : 2 * H].T
    if cell.bias:
        pre = pre + cell.bias_ih[H : 2 * H] + cell.bias_hh[H : 2 * H]
    return torch.sigmoid(pre)


class _Residual:
    """The residual multipliers ``a_t`` of one forward call, resolved from the option."""

    def __init__(self, option: Any, cell: Callable):
        self.kind = "none"
        self.fn: Callable | None = None
        if option is None:
            if isinstance(cell, nn.LSTMCell):
                self.kind = "lstm"
            elif isinstance(cell, nn.GRUCell):
                self.kind = "gru"
        elif callable(option):
            self.kind, self.fn = "callable", option
        else:
            self.kind = option
        self.cell = cell

    def multipliers(
        self, x: torch.Tensor, prev: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...], is_tuple: bool
    ) -> list[torch.Tensor | None]:
        """One multiplier per state component (``None``: no residual), each of that
        component's shape. Called without grad on any number of batch rows."""
        if self.kind == "none":
            return [None] * len(prev)
        if self.kind == "identity":
            return [torch.ones_like(p) for p in prev]
        if self.kind == "lstm":
            out = _lstm_residual(self.cell, x, prev)
        elif self.kind == "gru":
            out = _gru_residual(self.cell, x, prev[0])
        else:
            out = self.fn(x, _pack(prev, is_tuple), _pack(new, is_tuple))
        return self._validate(out, prev, is_tuple)

    @staticmethod
    def _validate(out: Any, prev: tuple[torch.Tensor, ...], is_tuple: bool) -> list[torch.Tensor | None]:
        where = "residual (the callable's return value)"
        if is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(prev):
                raise ValueError(
                    f"{where} must be a tuple of {len(prev)} multipliers (None for a component without residual) "
                    f"matching the state, a {_describe(tuple(prev))}; got a {_describe(out)}"
                )
            items = list(out)
        else:
            if isinstance(out, (tuple, list)):
                raise ValueError(
                    f"{where} must be one tensor for a tensor state of shape {tuple(prev[0].shape)}, got a {_describe(out)}"
                )
            items = [out]
        result: list[torch.Tensor | None] = []
        for i, (m, p) in enumerate(zip(items, prev)):
            if m is None:
                result.append(None)
                continue
            if isinstance(m, (int, float)) and not isinstance(m, bool):
                m = torch.tensor(float(m), dtype=p.dtype, device=p.device)
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{where}: component {i} must be a tensor, a number or None, got {type(m).__name__}")
            try:
                fits = torch.broadcast_shapes(m.shape, p.shape) == p.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"{where}: component {i} of shape {tuple(m.shape)} does not match the state component "
                    f"of shape {tuple(p.shape)} (it must broadcast to it)"
                )
            result.append(m.to(p.dtype).expand(p.shape))
        return result


# ----------------------------------------------------------------------------- refusals


def _row_mixing_modules(cell: Any) -> tuple[list[str], list[str]]:
    """Names of BatchNorm and dropout submodules in training mode."""
    norms, drops = [], []
    if isinstance(cell, nn.Module):
        for name, m in cell.named_modules():
            if not m.training:
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                norms.append(name or type(m).__name__)
            elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                drops.append(name or type(m).__name__)
    return norms, drops


_BATCHED_RECOMPUTE = (
    "Highway-BP's backward calls the cell once on all T·B rows (every step's input and previous state) "
    "and needs the same states as the step-by-step forward, so the cell must treat batch rows "
    "independently and deterministically. Put those modules in eval mode, or use iterations=None "
    "(exact BPTT through the Python loop)."
)


def _check_recompute(new: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """The batched recompute must give the forward's states: the same non-finite entries
    (a NaN/Inf input or state propagates the same way in both), and, where both are
    finite, the same values up to rounding."""
    for i, (n, s) in enumerate(zip(new, saved)):
        n = n.detach()
        finite = torch.isfinite(s)
        if not torch.equal(torch.isfinite(n), finite):
            moved = int((torch.isfinite(n) != finite).sum())
            raise RuntimeError(
                f"HighwayRNN: the cell gives different states when called on the flattened T·B batch than in the "
                f"step-by-step forward (state component {i}: {moved} entries are non-finite (NaN/Inf) in one and "
                "finite in the other). The cell mixes batch rows (e.g. batch statistics) or is random (e.g. dropout "
                "in training mode). " + _BATCHED_RECOMPUTE
            )
        eps = torch.finfo(s.dtype).eps if s.is_floating_point() else 0.0
        tol = 4 * math.sqrt(eps)  # one step's rounding is far below; a dropout mask or batch statistic far above
        s, n = s[finite], n[finite]
        scale = float(s.abs().max()) if s.numel() else 0.0
        diff = float((n - s).abs().max()) if s.numel() else 0.0
        if not diff <= tol * max(scale, 1.0):
            raise RuntimeError(
                f"HighwayRNN: the cell gives different states when called on the flattened T·B batch than in the "
                f"step-by-step forward (state component {i}: max difference {diff:.3g}, states up to {scale:.3g}). "
                "The cell mixes batch rows (e.g. batch statistics) or is random (e.g. dropout in training mode). "
                + _BATCHED_RECOMPUTE
            )
