"""First-order linear recurrences along one dimension (design note, section 5).

Forward:  ``u_t = a_t ⊙ u_{t-1} + b_t``  for ``t = 0 .. T-1``, with ``u_{-1} = 0``.
Reverse:  ``u_t = a_t ⊙ u_{t+1} + b_t``  for ``t = T-1 .. 0``, with ``u_T = 0``.

In the reverse form ``a_t`` is the multiplier that carries ``u_{t+1}`` into ``u_t``:
for the Highway-BP adjoint ``w_t = ℓ_t + a_{t+1} w_{t+1}`` the caller passes the
residual multipliers shifted by one step.

``linear_scan_reference`` is the sequential loop, kept as the obviously correct twin of
``linear_scan``. ``linear_scan`` runs the same recurrence on the fastest implementation
available for its inputs (none changes the result beyond rounding; ``scan_backend``
says which one a call takes):

- ``"cpu-kernel"``: CPU float32/float64 tensors that need no autograd graph: one compiled
  pass, sequential over time and vectorised across lanes (``hwbptt.torch.cpu_scan``, the compiled ``hwbptt::scan_out`` operator);
  reads ``a`` and ``b`` once and writes ``u`` once. Measured on a 2-core CPU it is 5-20x
  faster than the reduction below, whose many small strided ops dominate there.
- ``"triton"``: CUDA tensors that need no autograd graph, when Triton is installed
  (``hwbptt.torch.triton_scan``): one program per block of lanes, sequential over time.
- ``"torch"`` (everything else, and the autograd path): an odd-even reduction: pairs of
  steps are combined into one step of a recurrence half as long, solved recursively, and
  the skipped steps are filled in afterwards. Work O(T), depth O(log T);
  ``linear_scan_torch`` calls it directly.

All only multiply and add gates (never divide by cumulative products, which underflow
over long sequences). The torch path is differentiable by autograd; the kernels are used
only where no graph is recorded. Half-precision inputs are accumulated in float32 and the
result is returned in the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["linear_scan", "linear_scan_reference", "linear_scan_torch", "reverse_scan_sum", "scan_backend"]

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


def _needs_graph(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def scan_backend(a: torch.Tensor, b: torch.Tensor) -> str:
    """Which implementation ``linear_scan(a, b)`` uses: ``"cpu-kernel"``, ``"triton"`` or
    ``"torch"`` (module docstring)."""
    if _needs_graph(a, b):
        return "torch"
    dtype = torch.float32 if b.dtype in _LOW_PRECISION else b.dtype
    if b.device.type == "cpu" and dtype in (torch.float32, torch.float64) and a.device == b.device:
        from . import cpu_scan

        if cpu_scan.available():
            return "cpu-kernel"
    if b.device.type == "cuda" and dtype in (torch.float32, torch.float64) and a.device == b.device:
        from . import triton_scan

        if triton_scan.available():
            return "triton"
    return "torch"


def _lanes_3d(x: torch.Tensor) -> torch.Tensor:
    """View a time-major tensor as (T, M, K) with stride 1 on K (copying only if needed)."""
    T = x.shape[0]
    if x.dim() == 1:
        return x.reshape(T, 1, 1)
    K = x.shape[-1]
    if x.stride(-1) != 1 and K > 1:
        x = x.contiguous()
    try:
        return x.view(T, -1, K)
    except RuntimeError:
        return x.contiguous().view(T, -1, K)


def _kernel_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool, backend: str) -> torch.Tensor:
    a3, b3 = _lanes_3d(a), _lanes_3d(b)
    T, M, K = b3.shape
    # Few rows of lanes: split K into more rows when both are contiguous across lanes.
    if M < 8 and K >= 128 and a3.stride(1) == K and b3.stride(1) == K:
        parts = next((p for p in (16, 8, 4, 2) if K % p == 0 and K // p >= 32), 1)
        a3, b3 = a3.view(T, M * parts, K // parts), b3.view(T, M * parts, K // parts)
    if backend == "cpu-kernel":
        from .cpu_scan import scan_3d
    else:
        from .triton_scan import scan_3d
    return scan_3d(a3, b3, reverse).view(b.shape)


def reverse_scan_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_scan(a, b + c, reverse=True)`` along dim 0 without forming ``b + c``, written
    into ``out`` (a contiguous tensor of ``b``'s shape and dtype overlapping no input) where
    the compiled CPU kernel runs; elsewhere ``out`` is not used. ``a`` broadcasts to ``b``."""
    a, b, _ = _check(a, b, 0)
    if (
        c.shape == b.shape and c.dtype == b.dtype and c.device == b.device and b.shape[0] > 0
        and not _needs_graph(a, b) and not _needs_graph(c, c) and scan_backend(a, b) == "cpu-kernel"
        and a.dtype == b.dtype and b.dtype not in _LOW_PRECISION
    ):
        from .cpu_scan import scan_3d

        a3, b3, c3 = _lanes_3d(a), _lanes_3d(b), _lanes_3d(c)
        if out is None or out.shape != b.shape or out.dtype != b.dtype or not out.is_contiguous():
            out = None
        u = scan_3d(a3, b3, True, out=None if out is None else out.view(b3.shape), c=c3)
        return u.view(b.shape)
    return linear_scan(a, b + c, reverse=True)


def linear_scan_torch(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, dim: int = 0) -> torch.Tensor:
    """``linear_scan`` on the plain-torch odd-even reduction, whatever the inputs."""
    return _linear_scan(a, b, reverse, dim, force_torch=True)


def linear_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, dim: int = 0) -> torch.Tensor:
    """Solve the linear recurrence of the module docstring along ``dim``.

    ``a`` broadcasts to ``b``'s shape. Returns ``u`` with ``b``'s shape and dtype.
    """
    return _linear_scan(a, b, reverse, dim, force_torch=False)


def _linear_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool, dim: int, force_torch: bool) -> torch.Tensor:
    a, b, dim = _check(a, b, dim)
    if b.shape[dim] == 0:
        return b.clone()
    out_dtype = b.dtype
    backend = "torch" if force_torch else scan_backend(a, b)
    if b.dtype in _LOW_PRECISION:
        a, b = a.float(), b.float()
    if a.dtype != b.dtype:
        a = a.to(b.dtype)
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    if backend != "torch":
        u = _kernel_scan(a, b, reverse, backend)
        return u.movedim(0, dim).to(out_dtype)
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
    def reverse_scan_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return reverse_scan_sum(a, b, c, out)

    @staticmethod
    def shift_next(u: torch.Tensor) -> torch.Tensor:
        return torch.cat([u[1:], torch.zeros_like(u[:1])])

    @staticmethod
    def norm(x: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(x.float() if x.dtype in _LOW_PRECISION else x))

    @staticmethod
    def dist(x: torch.Tensor, y: torch.Tensor) -> float:
        if x.dtype in _LOW_PRECISION:
            x, y = x.float(), y.float()
        return float(torch.dist(x, y))


TORCH_OPS = _TorchArrayOps()
