"""``python -m hwbptt bench --suites grid``: exact mode and k=1 against the parents over the
shapes a user trains at, from one run.

For LSTM and GRU, one and two layers, and each (T, B, H) of the grid, one process times
``nn.LSTM``/``nn.GRU`` BPTT, ``iterations=None`` (exact) and ``iterations=1``, interleaved
(parent, exact, k=1, parent, ...), as the median full training step (forward + backward)
after warm-up, and prints each ratio (parent time / ours: > 1 is faster). The targets
(issue "Kernels you can trust"): exact and k=1 never slower than the parent anywhere on the
grid, and the LSTM's exact mode at least 1.2x at the median shape. Their verdicts are
printed from the measured ratios, met or missed. A row where exact mode runs the parent's
own kernel (``dispatch.plan``: oneDNN's LSTM above ``H = 256``) is marked ``*``: its ratio is
the parent against itself, and the exact verdict adds the lowest ratio where this
project's adjoint runs.

The grid: T in {128, 512, 2048}, B in {8, 64}, H in {64, 512}, without the one corner
T·B·H > 2^24 (its single step takes minutes on a 2-core machine), plus the median shape
T=512, B=32, H=256. ``--grid-shapes TxBxH,...`` replaces it (the tests use a tiny one).
Writes ``grid.json`` and ``grid.png`` into ``--out``.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import torch
from torch import nn

__all__ = ["GRID", "MEDIAN", "parse_shapes", "run_grid", "format_grid", "verdicts"]

MEDIAN = (512, 32, 256)
GRID = [(T, B, H) for T in (128, 512, 2048) for B in (8, 64) for H in (64, 512) if T * B * H <= 2**24] + [MEDIAN]


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"128x8x64,512x32x256"`` -> ``[(128, 8, 64), (512, 32, 256)]``."""
    shapes = []
    for part in text.split(","):
        try:
            T, B, H = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--grid-shapes: {part!r} is not TxBxH (e.g. 512x32x256)") from None
        if min(T, B, H) < 1:
            raise ValueError(f"--grid-shapes: {part!r} has a size below 1")
        shapes.append((T, B, H))
    return shapes


def _step(model: nn.Module, x: torch.Tensor, w: torch.Tensor):
    params = list(model.parameters())

    def run() -> tuple[float, float]:
        import time

        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        y, _ = model(x)
        loss = (y * w).sum()
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1

    return run


def run_config(kind: str, layers: int, T: int, B: int, H: int, warmup: int, repeats: int, seed: int, bar: Any = None) -> dict:
    """One grid point: the parent, exact mode and k=1, interleaved; ratios of medians."""
    from hwbptt.programs.bench import interleaved
    from hwbptt.torch import HighwayGRU, HighwayLSTM

    torch.manual_seed(seed)
    parent_cls, cls = (nn.LSTM, HighwayLSTM) if kind == "lstm" else (nn.GRU, HighwayGRU)
    parent = parent_cls(H, H, num_layers=layers)
    ours = {}
    for name, k in (("exact", None), ("k=1", 1)):
        m = cls(H, H, num_layers=layers, iterations=k)
        m.load_state_dict(parent.state_dict())
        ours[name] = m
    x, w = torch.randn(T, B, H), torch.randn(T, B, H)
    # The parent is timed twice, first and last of each round: the ratio of the two is the
    # parent against itself, the resolution of this row's other ratios on this machine.
    runs = {"parent": _step(parent, x, w), **{n: _step(m, x, w) for n, m in ours.items()}, "parent again": _step(parent, x, w)}
    times = interleaved(runs, warmup, repeats, bar)
    base = times["parent"]["step"]
    return {"model": kind, "layers": layers, "T": T, "B": B, "H": H, "repeats": repeats,
            "parent_ms": base * 1e3, "exact_ms": times["exact"]["step"] * 1e3, "k1_ms": times["k=1"]["step"] * 1e3,
            "exact": base / times["exact"]["step"], "k1": base / times["k=1"]["step"],
            "self": base / times["parent again"]["step"],
            "exact_path": _exact_path(kind, parent, x)}


def _exact_path(kind: str, parent: nn.Module, x: torch.Tensor) -> str:
    """``"parent"`` where exact mode runs the parent's own kernel at this shape (``dispatch.plan``,
    the layers' own decision), else ``"ours"``."""
    from hwbptt.torch.dispatch import plan

    B, H = x.shape[1], parent.hidden_size
    states = (torch.zeros(B, H), torch.zeros(B, H)) if kind == "lstm" else (torch.zeros(B, H),)
    weights = (parent.weight_ih_l0.detach(), parent.weight_hh_l0.detach())
    decided = plan(kind, (x, *states, *weights), exact=True, has_proj=False, wants_grad=True)
    return "parent" if decided.backward == "parent" else "ours"


def run_grid(shapes: list[tuple[int, int, int]], warmup: int, repeats: int, seed: int, bar: Any = None) -> list[dict]:
    rows = []
    for T, B, H in shapes:
        for kind in ("lstm", "gru"):
            for layers in (1, 2):
                if bar is not None:
                    bar.set_postfix_str(f"grid {kind} L={layers} T={T} B={B} H={H}")
                rows.append(run_config(kind, layers, T, B, H, warmup, repeats, seed, bar))
    return rows


def verdicts(rows: list[dict], median: tuple[int, int, int] = MEDIAN) -> list[str]:
    """One line per target, from the measured ratios."""
    out = []
    for key, name in (("exact", "exact mode"), ("k1", "k=1")):
        worst = min(rows, key=lambda r: r[key])
        ok = worst[key] >= 1.0
        own = [r for r in rows if r.get("exact_path") == "ours"] if key == "exact" else rows
        where_ours = (f"; where this project's adjoint runs: lowest {min(r[key] for r in own):.2f}x"
                      if key == "exact" and own and len(own) < len(rows) else "")
        out.append(f"{'MET' if ok else 'MISSED'}: {name} never slower than the parent on the grid "
                   f"(lowest {worst[key]:.2f}x at {worst['model']} L={worst['layers']} T={worst['T']} "
                   f"B={worst['B']} H={worst['H']}; median over the grid {statistics.median(r[key] for r in rows):.2f}x"
                   f"{where_ours})")
    if all("self" in r for r in rows):
        lo, hi = min(r["self"] for r in rows), max(r["self"] for r in rows)
        out.append(f"resolution: the parent against itself read {lo:.2f}-{hi:.2f}x over the grid "
                   f"(median {statistics.median(r['self'] for r in rows):.2f}x); a ratio within that of 1.0 is a tie here")
    at_median = [r for r in rows if r["model"] == "lstm" and (r["T"], r["B"], r["H"]) == median]
    if at_median:
        low = min(r["exact"] for r in at_median)
        each = ", ".join(f"L={r['layers']}: {r['exact']:.2f}x" for r in at_median)
        out.append(f"{'MET' if low >= 1.2 else 'MISSED'}: LSTM exact mode >= 1.2x at the median shape "
                   f"T={median[0]} B={median[1]} H={median[2]} ({each})")
    return out


def format_grid(rows: list[dict]) -> str:
    head = f"{'model':<5} {'L':>1} {'T':>5} {'B':>3} {'H':>4} {'parent ms':>10} {'exact':>7} {'k=1':>7} {'self':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "*" if r.get("exact_path") == "parent" else " "
        lines.append(f"{r['model']:<5} {r['layers']:>1} {r['T']:>5} {r['B']:>3} {r['H']:>4} {r['parent_ms']:>10.2f} "
                     f"{r['exact']:>6.2f}x{mark}{r['k1']:>6.2f}x {r['self']:>5.2f}x")
    if any(r.get("exact_path") == "parent" for r in rows):
        lines.append("* exact mode runs the parent's own kernel at this shape (dispatch.plan): the parent against itself")
    lines.append("self: the parent timed twice in each round, first time / second time (1.00x: no noise)")
    return "\n".join(lines)


def plot_grid(rows: list[dict], path: str) -> bool:
    """Ratios per grid point (one panel per model and depth); ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(r["model"], r["layers"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (model, layers) in zip(axes[0], panels):
        sub = [r for r in rows if (r["model"], r["layers"]) == (model, layers)]
        pos = range(len(sub))
        ax.bar([p - 0.2 for p in pos], [r["exact"] for r in sub], 0.4, label="exact")
        ax.bar([p + 0.2 for p in pos], [r["k1"] for r in sub], 0.4, label="k=1")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(pos), [f"{r['T']}/{r['B']}/{r['H']}" for r in sub], rotation=70, fontsize=7)
        ax.set_title(f"{model.upper()}, {layers} layer{'s' if layers > 1 else ''}")
        ax.set_xlabel("T/B/H")
    axes[0][0].set_ylabel("speed-up over the parent (training step)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main_grid(args: Any, bar: Any) -> list[dict]:
    """The ``grid`` suite of ``python -m hwbptt bench``: run, print, write."""
    shapes = parse_shapes(args.grid_shapes) if args.grid_shapes else GRID
    repeats = args.repeats or (3 if args.quick else 5)
    rows = run_grid(shapes, args.warmup, repeats, args.seed, bar)
    print("\ngrid: full training step, parent BPTT time / ours (> 1: faster), one run, interleaved medians "
          f"of {repeats} after {args.warmup} warm-up")
    print(format_grid(rows))
    for line in verdicts(rows):
        print(line)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grid.json"), "w") as f:
        json.dump({"rows": rows, "verdicts": verdicts(rows), "torch": torch.__version__,
                   "threads": torch.get_num_threads()}, f, indent=1)
    if not plot_grid(rows, os.path.join(args.out, "grid.png")):
        print("grid: matplotlib is not installed, no grid.png")
    return rows
