"""``python -m hwbptt bench``: time Highway-BP against the baselines, in one process.

Every row is a ratio to a baseline timed in the same process, interleaved with it
(baseline, variant 1, variant 2, ..., baseline, ...), as the median of the repeats after
warm-up: this machine is shared and noisy, absolute milliseconds are not comparable
across runs, ratios from one run are. ``speed-up`` > 1 means Highway-BP is faster; rows
where it is slower are printed like the others.

Suites (``--suites``):

- ``lstm``, ``gru``: ``HighwayLSTM``/``HighwayGRU`` (iterations ``k``, and ``exact``)
  against ``nn.LSTM``/``nn.GRU`` BPTT (fused kernels) over the ``--T/--B/--H`` grid;
- ``packed``: both on the same ``PackedSequence`` (lengths uniform in [T/2, T]);
- ``cell``: ``HighwayRNN`` on a small user cell against autograd through a Python loop;
- ``lstmcell``: ``HighwayRNN(nn.LSTMCell)`` against the ``nn.LSTMCell`` Python loop;
- ``keras-tf``, ``keras-torch``: ``hwbptt.keras.HighwayRNN(keras.layers.LSTM)`` against
  the Keras LSTM, on TensorFlow and on Keras' torch backend (each in a subprocess with
  ``KERAS_BACKEND`` set).

Per row: full training step (forward + backward) and backward alone; peak memory of the
step against the baseline's (the process's resident-memory high-water mark); the gradient's
cosine to the baseline's (exact) gradient; and the row's floor: its matmul FLOPs at this
machine's large-matmul throughput plus its elementwise bytes at this machine's copy
bandwidth (both measured at start; the FLOP/byte counts are this file's cost model), with
the measured time as a multiple of it. Separately: backward operator calls (aten ops plus
compiled-kernel calls) at two sequence lengths, and a GPU projection that prices the same
counts with an H100's published figures: a model, labelled as one, not a measurement.

Writes ``bench.json`` and ``bench.png`` (speed-up against k, one line per T, the exact
gradient as a square at the right) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from .arguments import iteration_list as _ks, positive_ints as _ints

__all__ = ["main", "build_parser"]

H100 = {  # published figures (SXM5): a price list for the model, not a measurement
    "name": "H100 SXM5 (published figures; a model, not a measurement)",
    "hbm_bytes_per_s": 3.35e12,
    "fp32_flops_per_s": 67e12,
    "launch_s": 4e-6,
    "scan_step_s": 0.5e-6,  # assumed: one dependent step of a sequential scan kernel
}


# ----------------------------------------------------------------------------- arguments


SUITES = ("lstm", "gru", "packed", "cell", "lstmcell", "keras-tf", "keras-torch", "grid")
# ``grid`` (programs/bench_grid.py: exact and k=1 over the shapes users train at) runs only when named.
DEFAULT_SUITES = [s for s in SUITES if s != "grid"]


def _suites(text: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in out if s not in SUITES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hwbptt bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the acceptance run (< 5 min on 2 cores): T=1024, B=32, H=128, k=0,1,3,exact, every suite at reduced sizes")
    p.add_argument("--T", type=_ints, default=None, help="sequence lengths (default 256,1024; quick 1024)")
    p.add_argument("--B", type=_ints, default=None, help="batch sizes (default 32)")
    p.add_argument("--H", type=_ints, default=None, help="hidden sizes (default 128)")
    p.add_argument("--k", type=_ks, default=None, help="iterations, integers or 'exact' (default 0,1,3,10,exact; quick 0,1,3,exact)")
    p.add_argument("--suites", type=_suites, default=list(DEFAULT_SUITES),
                   help=f"comma-separated subset of {','.join(SUITES)} (default: all but grid)")
    p.add_argument("--grid-shapes", default=None, help="the grid suite's shapes, TxBxH,... (default: programs/bench_grid.GRID)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default 1)")
    p.add_argument("--ops-T", type=_ints, default=[256, 4096], help="the two sequence lengths of the operator count (default 256,4096)")
    p.add_argument("--no-extras", action="store_true", help="skip memory, cosine, operator counts (timing only)")
    p.add_argument("--out", default=os.path.join("results", "bench"), help="output folder (default results/bench)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--seed", type=int, default=0)
    return p


# ----------------------------------------------------------------------------- machine


def _median_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_machine() -> dict[str, float]:
    """Large-matmul throughput (FLOP/s: the faster of ``torch.mm`` and the GEMM the tapes
    use, ``hwbptt.torch.gemm``) and copy bandwidth (bytes/s, read + write)."""
    from hwbptt.torch import gemm

    a, b = torch.randn(4096, 512), torch.randn(512, 1024)
    b_t = b.t().contiguous()
    t = min(_median_time(lambda: a @ b), _median_time(lambda: gemm.linear_t(a, b_t)))
    x = torch.randn(16 * 1024 * 1024)  # 64 MiB
    y = torch.empty_like(x)
    c = _median_time(lambda: y.copy_(x))
    return {"matmul_flops_per_s": 2 * 4096 * 512 * 1024 / t, "copy_bytes_per_s": 2 * x.numel() * 4 / c}


def scan_bandwidth(shapes: list[tuple[int, int, int]], repeats: int = 7) -> list[dict]:
    """The linear scan's bandwidth against a plain copy on the same tensors: for each
    (T, B, H), the reverse scan of ``a``, ``b`` into ``u`` (reads ``a``, ``b``, writes
    ``u``; the compiled kernel writes into the preallocated ``u``, as in the Highway
    iteration) and ``u.copy_(b)``, timed interleaved; bandwidth = bytes moved / median time.
    Both write into memory already touched, so no page faults are timed."""
    from hwbptt.torch.cpu_scan import scan_3d
    from hwbptt.torch.scan import linear_scan, scan_backend

    out = []
    for T, B, H in shapes:
        a, b, u = torch.rand(T, B, H), torch.randn(T, B, H), torch.zeros(T, B, H)
        if scan_backend(a, b) == "cpu-kernel":
            scan = lambda: scan_3d(a, b, True, out=u)  # noqa: E731
        else:
            scan = lambda: linear_scan(a, b, reverse=True, dim=0)  # noqa: E731
        times = interleaved({"scan": _timed(scan), "copy": _timed(lambda: u.copy_(b))}, 1, repeats)
        t_scan, t_copy = times["scan"]["step"], times["copy"]["step"]
        size = b.numel() * b.element_size()
        out.append({"T": T, "B": B, "H": H, "backend": scan_backend(a, b), "MB_per_tensor": size / 1e6,
                    "scan_GBps": 3 * size / t_scan / 1e9, "copy_GBps": 2 * size / t_copy / 1e9,
                    "ratio": (3 * size / t_scan) / (2 * size / t_copy)})
    return out


# ----------------------------------------------------------------------------- cost model


def _keeps_gates() -> bool:
    from hwbptt.torch import reserve

    return reserve.available() and reserve.enabled()


def cost_model(model: str, T: int, B: int, H: int, k: int | None, keep_gates: bool = False) -> dict[str, float]:
    """Matmul FLOPs, elementwise bytes and kernel launches of one training step (float32,
    input size = hidden size), as this implementation does it. ``k=None``: BPTT.
    ``keep_gates``: the forward keeps the gates (``hwbptt.torch.reserve``, CPU) and the
    backward does not rebuild them."""
    N, e = T * B, 4
    G = 4 if model == "lstm" else 3  # gates
    proj = 2 * N * (2 * H) * (G * H)  # all gate pre-activations, x and h parts
    if k is None:  # fused BPTT: forward, then dW, dx and the per-step dh
        flops = proj + proj + 2 * N * G * H * H + 2 * N * G * H * H
        byts = (G + 2) * H * e * N * 2 + (2 * G + 4) * H * e * N
        return {"flops": flops, "bytes": byts, "launches": 4 * T, "scans": 0, "steps": 2 * T}
    # Highway: forward (no graph), rebuild the gates (unless kept), k block VJPs, the final batched VJP
    flops = proj + (0 if keep_gates else proj) + k * 2 * N * G * H * H + 2 * N * G * H * H + proj
    gates = (2 * G + 3) * H * e * N  # activation kernel: read + write the gates, write c-like outputs
    dpre = (2 * G + 4) * H * e * N  # one block-VJP pass
    scan = 3 * H * e * N
    per_iter = dpre + scan + 9 * H * e * N
    byts = 3 * H * e * N + gates + scan + 6 * H * e * N + k * per_iter + dpre + G * H * e * N
    scans = (2 if model == "lstm" else 1) + k
    return {"flops": flops, "bytes": byts, "launches": 14 + 8 * k, "scans": scans, "steps": 0}


def gpu_projection(cost: dict[str, float], T: int, launches: float | None = None) -> float:
    """Seconds on an H100 by the price list ``H100``: a model, not a measurement."""
    n = cost["launches"] if launches is None else launches
    t = cost["flops"] / H100["fp32_flops_per_s"] + cost["bytes"] / H100["hbm_bytes_per_s"] + n * H100["launch_s"]
    return t + cost["scans"] * T * H100["scan_step_s"]


# ----------------------------------------------------------------------------- timing


def interleaved(runs: dict[str, Callable[[], tuple[float, float]]], warmup: int, repeats: int, bar: Any = None) -> dict[str, dict[str, float]]:
    """Median (forward, backward, step) seconds per run; runs are interleaved so slow
    phases of a shared machine hit them alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
            if bar is not None:
                bar.update(1)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(fn())
            if bar is not None:
                bar.update(1)
    out = {}
    for name, s in samples.items():
        out[name] = {
            "fwd": statistics.median(f for f, _ in s),
            "bwd": statistics.median(b for _, b in s),
            "step": statistics.median(f + b for f, b in s),
        }
    return out


def _timed(fn: Callable[[], Any]) -> Callable[[], tuple[float, float]]:
    """``fn`` as a run for ``interleaved``: its seconds as the forward, none as the backward."""

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, 0.0

    return run


def _timed_step(forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return run


def _grads(forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    for p in params:
        p.grad = None
    forward().backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


class PeakMemory:
    """Peak resident memory of one step above the level before it (Linux: the kernel's
    high-water mark, reset through ``/proc/self/clear_refs``). Large allocations are
    forced onto ``mmap`` (``mallopt``) so freed tensors leave the resident set at once,
    and free heap memory is returned (``malloc_trim``) before each measurement;
    that changes allocation speed, so the benchmark measures memory after all timings."""

    def __init__(self) -> None:
        self.ok = False
        if sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs"):
            try:
                import ctypes

                self._libc = ctypes.CDLL("libc.so.6")
                self._libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
                self.ok = True
            except OSError:
                pass

    @staticmethod
    def _kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise OSError(key)

    def __call__(self, forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> float | None:
        if not self.ok:
            return None
        import gc

        for p in params:
            p.grad = None
        gc.collect()
        # The Highway layers' workspace keeps buffers between steps: drop them, so that the
        # step's own allocations count in its peak.
        from hwbptt.torch import workspace

        workspace.clear()
        # Free heap memory goes back to the system first: otherwise a step made of many
        # small allocations (a per-step loop) reuses it and its peak reads as zero.
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._kib("VmRSS")
        forward().backward()
        peak = self._kib("VmHWM")
        for p in params:
            p.grad = None
        return float(peak - before) * 1024


def backward_op_count(forward: Callable[[], torch.Tensor]) -> int:
    """Operator calls in one backward pass: top-level ``aten::`` and ``hwbptt::`` operators
    (the compiled kernels are registered operators, so the profiler sees them too)."""
    # Kineto logs every profiler start and stop to stderr at its default level; 6 keeps it
    # quiet (read when the profiler first starts, so setting it here is in time).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    loss = forward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    ours = ("aten::", "hwbptt::")
    count = 0
    for ev in prof.events():
        if not ev.name.startswith(ours):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith(ours):
            parent = parent.cpu_parent
        count += parent is None
    return count


# ----------------------------------------------------------------------------- suites


def _fmt_k(k: int | None) -> str:
    return "exact" if k is None else str(k)


def _rnn_pair(model: str, T: int, B: int, H: int, ks: list[int | None], seed: int, packed: bool = False):
    from torch.nn.utils.rnn import pack_padded_sequence

    from hwbptt.torch import HighwayGRU, HighwayLSTM

    torch.manual_seed(seed)
    Base, High = (nn.LSTM, HighwayLSTM) if model == "lstm" else (nn.GRU, HighwayGRU)
    base = Base(H, H)
    x = torch.randn(T, B, H, requires_grad=True)
    proj = torch.randn(T, B, H)
    if packed:
        lengths = torch.randint(T // 2, T + 1, (B,))
        lengths[0] = T
        mask = (torch.arange(T)[:, None] < lengths[None]).float().unsqueeze(-1)
        proj = proj * mask

    def fwd_of(m: nn.Module) -> Callable[[], torch.Tensor]:
        if packed:
            def f() -> torch.Tensor:
                y, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
                from torch.nn.utils.rnn import pad_packed_sequence

                y, _ = pad_packed_sequence(y, total_length=T)
                return (y * proj).sum()
        else:
            def f() -> torch.Tensor:
                y, _ = m(x)
                return (y * proj).sum()
        return f

    variants = {"bptt": (base, fwd_of(base))}
    for k in ks:
        m = High(H, H, iterations=k)
        m.load_state_dict(base.state_dict())
        variants[f"k={_fmt_k(k)}"] = (m, fwd_of(m))
    return variants, x


def _cell_pair(kind: str, T: int, B: int, H: int, ks: list[int | None], seed: int):
    from hwbptt.torch import HighwayRNN

    torch.manual_seed(seed)
    if kind == "cell":
        cell: nn.Module = _SmallCell(H, H)
        residual: Any = lambda x_t, s_prev, s_new: cell.forget(x_t)  # noqa: E731
    else:
        cell, residual = nn.LSTMCell(H, H), None
    x = torch.randn(T, B, H, requires_grad=True)
    proj = torch.randn(T, B, H)

    def loop() -> torch.Tensor:
        s: Any = torch.zeros(B, H) if kind == "cell" else (torch.zeros(B, H), torch.zeros(B, H))
        total = x.new_zeros(())
        for t in range(T):
            s = cell(x[t], s)
            h = s if kind == "cell" else s[0]
            total = total + (h * proj[t]).sum()
        return total

    variants: dict[str, tuple[nn.Module, Callable[[], torch.Tensor]]] = {"bptt": (cell, loop)}
    for k in ks:
        m = HighwayRNN(cell, residual=residual, iterations=k) if residual else HighwayRNN(cell, iterations=k)

        def f(m: nn.Module = m) -> torch.Tensor:
            y, _ = m(x)
            y = y if isinstance(y, torch.Tensor) else y[0]
            return (y * proj).sum()

        variants[f"k={_fmt_k(k)}"] = (m, f)
    return variants, x


class _SmallCell(nn.Module):
    """A small user cell with a gated residual: ``f = σ(V x_t + 2)``,
    ``s_t = f ⊙ s_{t-1} + (1 - f) ⊙ tanh(W x_t + U s_{t-1})``; its residual multiplier
    ``f`` is given to ``HighwayRNN`` as a callable. ``U`` starts at half the default scale
    (a contractive block, the regime Highway-BP is for)."""

    def __init__(self, i: int, h: int):
        super().__init__()
        self.V = nn.Linear(i, h)
        self.W = nn.Linear(i, h)
        self.U = nn.Linear(h, h, bias=False)
        with torch.no_grad():
            self.V.bias.fill_(2.0)
            self.U.weight.mul_(0.5)
        self.hidden = h

    def forget(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.V(x))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        f = self.forget(x)
        return f * s + (1 - f) * torch.tanh(self.W(x) + self.U(s))

    def initial_state(self, batch: int, device: Any, dtype: Any) -> torch.Tensor:
        return torch.zeros(batch, self.hidden, device=device, dtype=dtype)


def _rebuild_variant(suite: str, ks: list[int | None]) -> int | None:
    """The ``k`` at which the LSTM/GRU suites also time the forward that rebuilds the gates
    in the backward (``hwbptt.torch.reserve`` off): 1 if run, else the smallest ``k``."""
    if suite not in ("lstm", "gru") or not _keeps_gates():
        return None
    ints = [k for k in ks if k is not None]
    return (1 if 1 in ints else min(ints)) if ints else None


def _without_reserve(f: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    from hwbptt.torch import reserve

    def g() -> torch.Tensor:
        with reserve.use(False):
            return f()

    return g


def run_torch_suite(suite: str, T: int, B: int, H: int, ks: list[int | None], args: Any, machine: dict, bar: Any) -> list[dict]:
    if suite in ("lstm", "gru"):
        variants, x = _rnn_pair(suite, T, B, H, ks, args.seed)
        model, baseline = suite, f"nn.{suite.upper()} BPTT (fused)"
    elif suite == "packed":
        variants, x = _rnn_pair(args._packed_model, T, B, H, ks, args.seed, packed=True)
        model, baseline = f"{args._packed_model}-packed", f"nn.{args._packed_model.upper()} BPTT on the PackedSequence"
    else:
        variants, x = _cell_pair(suite, T, B, H, ks, args.seed)
        model = "small user cell" if suite == "cell" else "nn.LSTMCell"
        baseline = "Python-loop BPTT"
    params = {name: [x, *m.parameters()] for name, (m, _) in variants.items()}
    runs = {name: _timed_step(f, params[name]) for name, (_, f) in variants.items()}
    rebuild_k = _rebuild_variant(suite, ks)
    if rebuild_k is not None:
        # The same layer with the forward that does not keep the gates (timed alongside, not a row).
        _, f = variants[f"k={rebuild_k}"]
        runs["rebuild"] = _timed_step(_without_reserve(f), params[f"k={rebuild_k}"])
    repeats = args._repeats_for(suite)
    times = interleaved(runs, args.warmup, repeats, bar)
    if rebuild_k is not None:
        keep, rebuild = times[f"k={rebuild_k}"]["step"], times.pop("rebuild")["step"]
        args._forward_choice.append({"suite": suite, "T": T, "B": B, "H": H, "k": rebuild_k,
                                     "keep_ms": keep * 1e3, "rebuild_ms": rebuild * 1e3})
    rows = []
    base_t = times["bptt"]
    extras = not args.no_extras
    exact = _grads(variants["bptt"][1], params["bptt"]) if extras else None
    for name, (m, f) in variants.items():
        if name == "bptt":
            continue
        k = None if name == "k=exact" else int(name[2:])
        t = times[name]
        row = {
            "suite": suite, "model": model, "baseline": baseline, "T": T, "B": B, "H": H, "k": _fmt_k(k),
            "step_ms": t["step"] * 1e3, "base_step_ms": base_t["step"] * 1e3,
            "speedup": base_t["step"] / t["step"],
            "bwd_ms": t["bwd"] * 1e3, "base_bwd_ms": base_t["bwd"] * 1e3, "bwd_speedup": base_t["bwd"] / t["bwd"],
            "repeats": repeats,
        }
        if extras:
            row["cosine"] = _cosine(_grads(f, params[name]), exact)
            # Measured at the end (PeakMemory changes allocation speed): keep what it needs.
            if suite in ("lstm", "gru") or not args.quick:
                args._memory_jobs.append((row, variants["bptt"][1], params["bptt"], f, params[name]))
        if suite in ("lstm", "gru"):
            cost = cost_model(suite, T, B, H, k, keep_gates=_keeps_gates())
            floor = cost["flops"] / machine["matmul_flops_per_s"] + cost["bytes"] / machine["copy_bytes_per_s"]
            row["floor_ms"] = floor * 1e3
            row["floor_multiple"] = t["step"] / floor
            # On a GPU the forward is cuDNN's and the backward rebuilds the gates.
            gpu_h, gpu_b = gpu_projection(cost_model(suite, T, B, H, k), T), gpu_projection(cost_model(suite, T, B, H, None), T)
            row["gpu_model_ms"], row["gpu_model_bptt_ms"], row["gpu_model_speedup"] = gpu_h * 1e3, gpu_b * 1e3, gpu_b / gpu_h
        rows.append(row)
    return rows


def op_counts(args: Any, bar: Any) -> list[dict]:
    """Backward operator calls at the two ``--ops-T`` lengths (B=4, H=16: counts do not
    depend on sizes)."""
    out = []
    T1, T2 = args.ops_T[0], args.ops_T[-1]
    k_list = [k for k in args.k if k is not None][:1] + [3]
    for suite in ("lstm", "gru", "lstmcell"):
        counts: dict[str, dict[int, int]] = {}
        for T in (T1, T2):
            if suite == "lstmcell":
                variants, _ = _cell_pair("lstmcell", T, 4, 16, [3], args.seed)
            else:
                variants, _ = _rnn_pair(suite, T, 4, 16, sorted(set(k_list)), args.seed)
            for name, (_, f) in variants.items():
                counts.setdefault(name, {})[T] = backward_op_count(f)
                if bar is not None:
                    bar.update(1)
        for name, c in counts.items():
            out.append({"model": suite, "variant": name, "T1": T1, "T2": T2, "ops_T1": c[T1], "ops_T2": c[T2],
                        "growth": c[T2] / max(c[T1], 1)})
    return out


# ----------------------------------------------------------------------------- keras


_KERAS_WORKER = r"""
import json, os, statistics, sys, time
cfg = json.loads(sys.argv[1])
os.environ.setdefault("KERAS_BACKEND", cfg["backend"])
import numpy as np
import keras
from hwbptt.keras import HighwayRNN
backend = keras.backend.backend()
T, B, H = cfg["T"], cfg["B"], cfg["H"]
rng = np.random.default_rng(0)
x_np = rng.standard_normal((B, T, H)).astype("float32")
p_np = rng.standard_normal((B, T, H)).astype("float32")
base = keras.layers.LSTM(H, return_sequences=True)
base.build((B, T, H))
layers = {"bptt": base}
for k in cfg["ks"]:
    layers["k=" + ("exact" if k is None else str(k))] = HighwayRNN(base, iterations=k)
if backend == "torch":  # keras-tf runs in programs/bench_keras.py
    import torch
    x, p = torch.tensor(x_np), torch.tensor(p_np)
    vars_ = [v.value for v in base.trainable_variables]
    def make(layer):
        def step():
            loss = (layer(x, training=True) * p).sum()
            return torch.autograd.grad(loss, vars_)
        return step
    def run(step):
        t0 = time.perf_counter(); g = step(); return time.perf_counter() - t0, g
    flat = lambda g: np.concatenate([v.detach().numpy().ravel() for v in g])
else:
    raise SystemExit(f"unsupported backend {backend}")
steps = {n: make(l) for n, l in layers.items()}
grads = {}
for n, s in steps.items():
    for _ in range(cfg["warmup"]):
        _, grads[n] = run(s)
times = {n: [] for n in steps}
for _ in range(cfg["repeats"]):
    for n, s in steps.items():
        t, grads[n] = run(s)
        times[n].append(t)
ref = flat(grads["bptt"])
out = []
b = statistics.median(times["bptt"])
for n in steps:
    if n == "bptt":
        continue
    g = flat(grads[n]); t = statistics.median(times[n])
    cos = float(np.dot(g, ref) / (np.linalg.norm(g) * np.linalg.norm(ref) + 1e-30))
    out.append({"k": n[2:], "step_ms": t * 1e3, "base_step_ms": b * 1e3, "speedup": b / t, "cosine": cos})
print("HWBPTT_JSON " + json.dumps(out))
"""


def run_keras_suite(suite: str, T: int, B: int, H: int, ks: list[int | None], repeats: int, warmup: int) -> tuple[list[dict], str | None]:
    """The keras-torch suite in a subprocess (keras-tf: ``programs/bench_keras.py``)."""
    backend = "torch"
    cfg = {"backend": backend, "T": T, "B": B, "H": H, "ks": ks, "repeats": repeats, "warmup": warmup}
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        done = subprocess.run([sys.executable, "-c", _KERAS_WORKER, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return [], f"{suite}: not measured (timed out)"
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("HWBPTT_JSON ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return [], f"{suite}: not measured ({tail[0][:200]})"
    rows = []
    for r in json.loads(line[len("HWBPTT_JSON "):]):
        rows.append({"suite": suite, "model": f"Keras LSTM ({backend})", "baseline": f"Keras LSTM BPTT ({backend})",
                     "T": T, "B": B, "H": H, "repeats": repeats, **r})
    return rows, None


# ----------------------------------------------------------------------------- output


def format_table(rows: list[dict], last: tuple[str, str] = ("floor x", "floor_multiple"), ms: str = ".0f") -> str:
    """The ratio table; ``last`` is the final column's (title, row key), ``ms`` the format
    of the times (the GPU check prints a model column and finer times)."""
    head = ["suite", "T", "B", "H", "k", "ms", "base ms", "speed-up", "bwd x", "mem x", "cosine", last[0]]
    lines = [head]
    for r in rows:
        def g(key: str, fmt: str) -> str:
            v = r.get(key)
            return "-" if v is None else format(v, fmt)
        lines.append([r["suite"], str(r["T"]), str(r["B"]), str(r["H"]), r["k"], g("step_ms", ms), g("base_step_ms", ms),
                      g("speedup", ".2f") + "x", g("bwd_speedup", ".2f"), g("mem_ratio", ".2f"), g("cosine", ".4f"), g(last[1], ".2f")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in SUITES if any(r["suite"] == s for r in rows)]
    cols = min(4, max(1, len(suites)))
    nrows = -(-max(1, len(suites)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(suites):]:
        ax.axis("off")
    for ax, suite in zip(axes.flat, suites):
        sel = [r for r in rows if r["suite"] == suite]
        ks = sorted({int(r["k"]) for r in sel if r["k"] != "exact"})
        x_exact = (ks[-1] + 1) if ks else 0  # the exact gradient, at the right of the k axis
        for T in sorted({r["T"] for r in sel}):
            pts = sorted((int(r["k"]), r["speedup"]) for r in sel if r["T"] == T and r["k"] != "exact")
            color = None
            if pts:
                color = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"T={T}")[0].get_color()
            exact = [r["speedup"] for r in sel if r["T"] == T and r["k"] == "exact"]
            if exact:  # one legend entry per T: the square carries it only where no line does
                ax.plot([x_exact], exact, marker="s", ls="none", color=color, label=None if pts else f"T={T}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, max(1.2, 1.1 * max(r["speedup"] for r in sel)))  # from zero, 1x always in view
        has_exact = any(r["k"] == "exact" for r in sel)
        ax.set_xticks(ks + ([x_exact] if has_exact else []), [str(k) for k in ks] + (["exact"] if has_exact else []))
        ax.set_title(suite)
        ax.set_xlabel("iterations k")
        ax.set_ylabel("speed-up vs baseline (x)")
        ax.legend(fontsize=8)
    fig.suptitle("Highway-BP training step: speed-up against the baseline timed in the same process", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from hwbptt.torch import gemm, kernels_status

    quick = args.quick
    args.T = args.T or ([1024] if quick else [256, 1024])
    args.B = args.B or [32]
    args.H = args.H or [128]
    args.k = args.k or ([0, 1, 3, None] if quick else [0, 1, 3, 10, None])
    repeats = args.repeats or 7
    if repeats < 1 or args.warmup < 0:
        print("bench: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    # Baselines that take seconds per step run fewer repeats (said in each row).
    args._repeats_for = lambda suite: repeats if suite in ("lstm", "gru") else (1 if quick else max(1, min(repeats, 2)))
    args._packed_model = "lstm"
    args._memory_jobs = []
    args._forward_choice = []
    kernel_status = kernels_status()
    if "grid" in args.suites:
        from .bench_grid import main_grid

        print(f"hwbptt bench grid: torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
        print("kernels_status(): " + "; ".join(f"{k}: {v}" for k, v in kernel_status.items()))
        with tqdm(desc="grid", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
            main_grid(args, bar)
        args.suites = [s for s in args.suites if s != "grid"]
        if not args.suites:
            return 0
    print(f"hwbptt bench: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"repeats {repeats} (interleaved medians after {args.warmup} warm-up)")
    print("kernels_status(): " + "; ".join(f"{k}: {v}" for k, v in kernel_status.items()))
    print("LSTM/GRU forward: " + ("keeps the gates (hwbptt.torch.reserve: compiled time loop + PyTorch's BLAS)" if _keeps_gates()
          else "the fused kernel; the backward rebuilds the gates (reserve path unavailable)"))
    print("tape GEMMs: " + gemm.status())
    print("torch.compile: not used (the fused paths are compiled operators built at install; without them the eager torch paths run, as listed above)")
    machine = measure_machine()
    print(f"machine: large matmul {machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, copy {machine['copy_bytes_per_s'] / 1e9:.1f} GB/s")

    # The work plan, for the progress bar.
    plan: list[tuple[str, int, int, int]] = []
    for suite in args.suites:
        if suite in ("lstm", "gru"):
            plan += [(suite, T, B, H) for T in args.T for B in args.B for H in args.H]
        elif suite == "packed":
            Tp = 128 if quick else max(args.T)
            plan += [("packed", Tp, 32, 128)]
        elif suite == "cell":
            plan += [("cell", 1024 if quick else 4096, 8, 32)]
        elif suite == "lstmcell":
            plan += [("lstmcell", 128 if quick else 1024, 32, 128)]
    total = sum((len(args.k) + 1 + (_rebuild_variant(s, args.k) is not None)) * (args.warmup + args._repeats_for(s)) for s, *_ in plan)
    rows: list[dict] = []
    notes: list[str] = []
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for suite, T, B, H in plan:
            bar.set_postfix_str(f"{suite} T={T} B={B} H={H}")
            ks = args.k if suite in ("lstm", "gru") else [k for k in args.k if k in (None, 3)] or [3]
            if suite == "cell":
                ks = [3]
            rows += run_torch_suite(suite, T, B, H, ks, args, machine, bar)
    for suite in [s for s in args.suites if s.startswith("keras")]:
        if suite == "keras-tf":  # model.fit against Keras' LSTM and GRU: programs/bench_keras.py
            from .bench_keras import main_rows

            krows, knotes = main_rows(quick, args.repeats)
            rows, notes = rows + krows, notes + knotes
            continue
        T, ks = (64 if quick else 1024), [None, 3]  # keras-torch (keras-tf continued above)
        print(f"{suite}: T={T}, B=32, H=128, k={ks} in a subprocess ...", file=sys.stderr)
        krows, note = run_keras_suite(suite, T, 32, 128, ks, repeats=1 if quick else max(1, min(repeats, 2)), warmup=1)
        rows += krows
        if note:
            notes.append(note)
    if args._memory_jobs:
        meter = PeakMemory()
        base_cache: dict[int, float | None] = {}
        for row, bf, bp, f, p in tqdm(args._memory_jobs, desc="peak memory", unit="row", file=sys.stderr, dynamic_ncols=True):
            if id(bf) not in base_cache:
                base_cache[id(bf)] = meter(bf, bp)
            mine, base = meter(f, p), base_cache[id(bf)]
            if mine is not None and base:
                row["mem_ratio"] = mine / base
        if not meter.ok:
            notes.append("peak memory not measured (needs Linux /proc)")
    args._memory_jobs.clear()
    ops, scans = [], []
    if not args.no_extras:
        scans = scan_bandwidth(sorted({(T, B, H) for T in args.T for B in args.B for H in args.H}) + [(4096, 32, 128)])
        with tqdm(total=2 * (3 + 3 + 2), desc="operator counts", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
            ops = op_counts(args, bar)

    print()
    print(format_table(rows))
    print("speed-up = baseline step time / Highway step time (>1: Highway faster); bwd x: the same for the backward alone;")
    print("mem x: peak memory of the step / baseline's; cosine: gradient vs the exact (baseline) gradient;")
    print("floor x: step time / (matmul FLOPs at the measured matmul rate + elementwise bytes at the measured copy rate).")
    for n in notes:
        print("note: " + n)
    if args._forward_choice:
        print()
        print("LSTM/GRU forward, timed in the same run: keeping the gates (hwbptt.torch.reserve) vs the fused kernel")
        print("with the gates rebuilt in the backward, full training step:")
        for c in args._forward_choice:
            print(f"  {c['suite']:<4} T={c['T']:<5} B={c['B']:<3} H={c['H']:<4} k={c['k']}: keep {c['keep_ms']:.1f} ms, "
                  f"rebuild {c['rebuild_ms']:.1f} ms -> keeping is {c['rebuild_ms'] / c['keep_ms']:.2f}x as fast")
    if ops:
        print()
        print(f"backward operator calls (aten ops + compiled-kernel calls), T={ops[0]['T1']} -> T={ops[0]['T2']}:")
        for o in ops:
            print(f"  {o['model']:<9} {o['variant']:<8} {o['ops_T1']:>7} -> {o['ops_T2']:>7}  ({o['growth']:.2f}x)")
    if scans:
        print()
        print("linear scan vs a copy on the same tensors (bandwidth = bytes moved / time; scan: a, b read, u written):")
        for c in scans:
            print(f"  T={c['T']:<5} B={c['B']:<3} H={c['H']:<4} ({c['MB_per_tensor']:.0f} MB per tensor, {c['backend']}): "
                  f"scan {c['scan_GBps']:.1f} GB/s, copy {c['copy_GBps']:.1f} GB/s -> {100 * c['ratio']:.0f}% of the copy's")
    gpu = [r for r in rows if "gpu_model_speedup" in r]
    if gpu:
        print()
        print(f"GPU projection ({H100['name']}; launch {H100['launch_s'] * 1e6:.0f} us, scan step {H100['scan_step_s'] * 1e6:.1f} us assumed):")
        for r in gpu:
            print(f"  {r['suite']:<4} T={r['T']:<5} k={r['k']:<5} model: Highway {r['gpu_model_ms']:.2f} ms vs BPTT {r['gpu_model_bptt_ms']:.2f} ms"
                  f" -> {r['gpu_model_speedup']:.2f}x (modelled, unmeasured)")

    os.makedirs(args.out, exist_ok=True)
    result = {
        "command": "python -m hwbptt bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "kernels": kernel_status,
        "machine": machine, "gpu_model": H100, "rows": rows, "op_counts": ops, "notes": notes,
        "forward_choice": args._forward_choice, "scan_bandwidth": scans,
    }
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    written = [os.path.join(args.out, "bench.json")]
    if not args.no_plot and rows:
        plot(rows, os.path.join(args.out, "bench.png"))
        written.append(os.path.join(args.out, "bench.png"))
    print()
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
