"""Command-line value types the bench and the GPU check share (no framework imported, so
the GPU check can build its parser before it knows whether torch is there)."""

from __future__ import annotations

import argparse

__all__ = ["positive_ints", "iteration_list"]


def positive_ints(text: str) -> list[int]:
    """``"256,1024"`` -> ``[256, 1024]``; every value an integer > 0."""
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def iteration_list(text: str) -> list[int | None]:
    """``"0,1,exact"`` -> ``[0, 1, None]`` (``exact`` is ``iterations=None``)."""
    out: list[int | None] = []
    for v in (v.strip() for v in text.split(",")):
        if v == "exact":
            out.append(None)
        elif v.isdigit():
            out.append(int(v))
        elif v:
            raise argparse.ArgumentTypeError(f"k values are integers >= 0 or 'exact', got {v!r}")
    if not out:
        raise argparse.ArgumentTypeError("no k values given")
    return out
