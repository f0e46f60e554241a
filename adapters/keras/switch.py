"""The on/off switch of the fast routes (``torch_kernels.use``, ``tf_kernels.use``).

Kept here, free of any framework import, so that a TensorFlow-only installation never
imports torch to switch a route."""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["switch"]


@contextlib.contextmanager
def switch(state: dict, on: bool, what: str, key: str = "enabled") -> Iterator[None]:
    """Set ``state[key]`` to ``on`` within a block and restore it after. ``what`` names
    the caller in the error for a non-bool ``on``."""
    if not isinstance(on, bool):
        raise TypeError(f"{what}(on) takes a bool, got on={on!r}")
    before = state[key]
    state[key] = on
    try:
        yield
    finally:
        state[key] = before
