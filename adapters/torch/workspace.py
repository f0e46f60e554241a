"""Reused CPU buffers for the tapes' large temporaries (a workspace, as cuDNN keeps one).

A training step of ``HighwayLSTM``/``HighwayGRU`` allocates the same large temporaries at
every step: the gate buffer's companions, ``dpre``, the iterations' buffers. On CPU a fresh
tensor of tens of MB comes from ``mmap`` and costs one page fault per 4 KiB page when first
written: measured on this project's 2-core machine at about 17 ms for 64 MB, as much as
the arithmetic done in it. ``empty`` hands out buffers that earlier steps left behind.

A buffer is free when nothing but this pool refers to its storage: the tensor handed out
is a view of the pooled buffer, and as long as it or any view of it (one the user kept,
such as ``c_n``) is alive, the storage's use count is above the pool's own, and the buffer
is not handed out again. So a buffer is never shared; the only cost is memory kept between
steps (at most ``_CAP_BYTES``, 1 GiB, beyond what is in use; ``clear()`` gives it back). A
request takes the smallest free buffer between its size and twice its size, so that
steps of varying lengths reuse each other's buffers. Only CPU tensors of at least
``_MIN_BYTES`` are pooled (smaller ones come from ``malloc``'s heap, already touched);
CUDA has PyTorch's caching allocator. ``use(False)`` switches the pool off (for comparisons).
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

from .dispatch import switch

__all__ = ["empty", "clear", "use", "pooled_bytes", "pools"]

_MIN_BYTES = 1 << 20
_CAP_BYTES = 1 << 30
_state = {"enabled": True}
_lock = threading.Lock()
_pool: list[torch.Tensor] = []  # flat uint8 buffers, most recently used last


def _use_count(t: torch.Tensor) -> int | None:
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return None


# The use count of a storage held by one tensor, read the same way (the reading itself
# may hold a reference); ``None`` where PyTorch does not expose it: no pooling then.
_ALONE = _use_count(torch.empty(1))


def _free(buf: torch.Tensor) -> bool:
    return _use_count(buf) == _ALONE


def _pooled(nbytes: int, device: torch.device) -> bool:
    return _state["enabled"] and device.type == "cpu" and nbytes >= _MIN_BYTES and _ALONE is not None


def pools(shape: tuple[int, ...], like: torch.Tensor) -> bool:
    """Whether ``empty(shape, like)`` comes from the pool (and so, after the first step, is
    memory already touched)."""
    return _pooled(math.prod(shape) * like.element_size(), like.device)


def use(on: bool) -> contextlib.AbstractContextManager[None]:
    """Switch the pool on or off within a block (for comparisons)."""
    return switch(_state, on, "use")


def clear() -> None:
    """Drop every pooled buffer that is not in use (its memory goes back to the system)."""
    with _lock:
        _pool[:] = [b for b in _pool if not _free(b)]


def pooled_bytes() -> int:
    with _lock:
        return sum(b.numel() for b in _pool)


def empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` on ``like``'s device, in ``dtype`` (default
    ``like``'s): a pooled buffer where one is free, else a new one (pooled from then on)."""
    dtype = like.dtype if dtype is None else dtype
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not _pooled(nbytes, like.device):
        return like.new_empty(shape, dtype=dtype)
    with _lock:
        # The smallest free buffer that fits without wasting more than half of it, so that
        # steps of varying lengths reuse each other's buffers.
        fits = [(b.numel(), i) for i, b in enumerate(_pool) if nbytes <= b.numel() <= 2 * nbytes and _free(b)]
        if fits:
            buf = _pool.pop(min(fits)[1])
            _pool.append(buf)
            return buf[:nbytes].view(dtype).view(shape)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        _pool.append(buf)
        total = sum(b.numel() for b in _pool)
        kept = []
        for old in _pool[:-1]:  # over the cap: forget the least recently used free buffers
            if total > _CAP_BYTES and _free(old):
                total -= old.numel()
            else:
                kept.append(old)
        _pool[:-1] = kept
        return buf.view(dtype).view(shape)
