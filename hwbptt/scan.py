"""First-order linear recurrences along one dimension (design note, section 5).

Forward:  ``u_t = a_t ⊙ u_{t-1} + b_t``  for ``t = 0 .. T-1``, with ``u_{-1} = 0``.
Reverse:  ``u_t = a_t ⊙ u_{t+1} + b_t``  for ``t = T-1 .. 0``, with ``u_T = 0``.

In the reverse form ``a_t`` is the multiplier that carries ``u_{t+1}`` into ``u_t``:
for the Highway-BP adjoint ``w_t = ℓ_t + a_{t+1} w_{t+1}`` the caller passes the
residual multipliers shifted by one step.

``linear_scan_reference`` is the sequential loop, kept as the obviously correct twin of
``linear_scan``, which runs an odd-even reduction: pairs of steps are combined into one
step of a recurrence half as long, solved recursively, and the skipped steps are filled
in afterwards. Work is O(T), depth O(log T), and it only multiplies and adds gates
(never divides by cumulative products, which underflow over long sequences). Both are
differentiable by autograd. Half-precision inputs are accumulated in float32 and the
result is returned in the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["linear_scan", "linear_scan_reference"]

# Below this length the reduction's per-level overhead outweighs a plain loop.
_SEQUENTIAL_BELOW = 8
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(
            f"linear_scan: a and b must be tensors, got a={type(a).__name__}, b={type(b).__name__}"
        )
    if b.dim() == 0:
        raise ValueError("linear_scan: b must have at least one dimension (the time axis)")
    if not -b.dim() <= dim < b.dim():
        raise ValueError(f"linear_scan: dim={dim} is out of range for b with {b.dim()} dimensions")
    try:
        a = a.expand_as(b) if a.shape != b.shape else a
    except RuntimeError:
        raise ValueError(
            f"linear_scan: a of shape {tuple(a.shape)} does not broadcast to b of shape {tuple(b.shape)}"
        ) from None
    return a, b, dim % b.dim()


def linear_scan_reference(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, dim: int = 0) -> torch.Tensor:
    """Sequential loop over ``dim``; see the module docstring for the recurrence."""
    a, b, dim = _check(a, b, dim)
    acc_dtype = torch.float32 if b.dtype in _LOW_PRECISION else b.dtype
    a_steps = a.to(acc_dtype).unbind(dim)
    b_steps = b.to(acc_dtype).unbind(dim)
    order = range(len(b_steps) - 1, -1, -1) if reverse else range(len(b_steps))
    out: list[torch.Tensor | None] = [None] * len(b_steps)
    u = None
    for t in order:
        u = b_steps[t] if u is None else a_steps[t] * u + b_steps[t]
        out[t] = u
    if not out:
        return b.clone()
    return torch.stack(out, dim).to(b.dtype)


def _forward_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Forward recurrence along dim 0 by odd-even reduction (no in-place writes)."""
    T = b.shape[0]
    if T < _SEQUENTIAL_BELOW:
        rows = [b[0]]
        for t in range(1, T):
            rows.append(torch.addcmul(b[t], a[t], rows[-1]))
        return torch.stack(rows)
    n = T // 2
    a_even, a_odd = a[0 : 2 * n : 2], a[1 : 2 * n : 2]
    b_even, b_odd = b[0 : 2 * n : 2], b[1 : 2 * n : 2]
    # Step pairs (2j, 2j+1) compose into one step: u_{2j+1} = (a_{2j+1} a_{2j}) u_{2j-1} + (a_{2j+1} b_{2j} + b_{2j+1}).
    u_odd = _forward_scan(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))
    # Even steps follow from the odd step before them: u_{2j} = a_{2j} u_{2j-1} + b_{2j}.
    m = (T + 1) // 2 - 1  # even indices 2, 4, ... below T
    u_even_rest = torch.addcmul(b[2::2][:m], a[2::2][:m], u_odd[:m])
    u_even = torch.cat([b[:1], u_even_rest])
    # Interleave: even rows at 0, 2, 4, ..., odd rows at 1, 3, ...
    paired = torch.stack([u_even[:n], u_odd], dim=1).reshape(2 * n, *b.shape[1:])
    return torch.cat([paired, u_even[n:]]) if T % 2 else paired


def linear_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, dim: int = 0) -> torch.Tensor:
    """Solve the linear recurrence of the module docstring along ``dim``.

    ``a`` broadcasts to ``b``'s shape. Returns ``u`` with ``b``'s shape and dtype.
    """
    a, b, dim = _check(a, b, dim)
    if b.shape[dim] == 0:
        return b.clone()
    out_dtype = b.dtype
    if b.dtype in _LOW_PRECISION:
        a, b = a.float(), b.float()
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    if reverse:
        a, b = a.flip(0), b.flip(0)
    u = _forward_scan(a, b)
    if reverse:
        u = u.flip(0)
    return u.movedim(0, dim).to(out_dtype)


class _TorchArrayOps:
    """``hwbptt.engine.ArrayOps`` for torch tensors (time on dim 0)."""

    @staticmethod
    def reverse_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return linear_scan(a, b, reverse=True, dim=0)

    @staticmethod
    def shift_next(u: torch.Tensor) -> torch.Tensor:
        return torch.cat([u[1:], torch.zeros_like(u[:1])])

    @staticmethod
    def norm(x: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(x.float() if x.dtype in _LOW_PRECISION else x))


TORCH_OPS = _TorchArrayOps()
