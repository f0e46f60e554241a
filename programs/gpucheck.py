"""``python -m hwbptt gpucheck --out DIR``: the one command that measures the CUDA paths
against cuDNN on a GPU, and writes every result into ``DIR``.

It runs on whatever Python starts it (no virtual environment, no pinned versions, no
network), also from a source checkout that was never installed: ``python3
programs/gpucheck.py`` maps the checkout's folders onto the package names first
(``map_checkout``); ``make gpu-check`` runs that. Three steps, each written to
``gpucheck.json`` as soon as it has a result (after every bench row), so a run cut short
still leaves its data:

1. tests: ``pytest -m cuda tests/cuda`` in a fresh interpreter: every Triton kernel and
   the layers' CUDA paths against their references (float32, float16, bfloat16; T=1, odd
   T, non-contiguous inputs), ``iterations >= T`` against cuDNN's BPTT, packed sequences,
   ``HWBPTT_TRITON=0``, and a ``torch.compile`` smoke test (``tests.log``, ``tests.xml``);
2. bench: ``HighwayLSTM``/``HighwayGRU`` against ``nn.LSTM``/``nn.GRU`` (cuDNN BPTT) in
   this process, timed with CUDA events, interleaved (baseline, k=0, k=1, ..., baseline,
   ...), medians after warm-up: a full training step (forward + backward) and the backward
   alone, peak device memory against cuDNN's, the gradient's cosine to cuDNN's; LSTM and
   GRU over T, B, H and k, plus packed sequences; the ratio table, ``bench.png``;
3. verdicts: one line per target: is Highway-BP faster than cuDNN at every k <= 3 for
   every T >= 1024?

``--budget`` bounds the whole run (default 450 s: inside 8 minutes with the interpreter's
start): the tests get at most ``--tests-timeout`` seconds, and the bench starts no row
it does not expect to finish in the time left (each row's cost is estimated from the
nearest finished row) and lists the rows it left out.

``--dry-run`` runs every step at tiny sizes on the CPU: the tests with
``HWBPTT_GPUCHECK_DEVICE=cpu`` and ``TRITON_INTERPRET=1`` (Triton's interpreter runs the
kernels on CPU tensors), the bench on CPU tensors through the same timing code with
``time.perf_counter`` in place of CUDA events, and the same JSON, table, plot and verdict
lines, each marked as a dry run. The test suite runs it, so the one device run cannot fail
on a typo. Without a GPU and without ``--dry-run`` it says so in one line and exits 1.

Exit status: 0 when the tests passed and every bench row that ran was measured (a verdict
that is not met is a result, not a failure), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["main", "build_parser", "map_checkout", "verdicts", "format_table"]

#: The checkout holding this file (``programs/..``), when it is one.
ROOT = Path(__file__).resolve().parents[1]

# The package names the project installs from folders of other names (pyproject.toml's
# package-dir): without an install, only ``hwbptt`` itself is importable from the root.
_CHECKOUT_PACKAGES = {"hwbptt.torch": "adapters/torch", "hwbptt.keras": "adapters/keras", "hwbptt.programs": "programs"}


# ----------------------------------------------------------------------------- checkout


def is_checkout(root: Path = ROOT) -> bool:
    return (root / "hwbptt" / "__init__.py").is_file() and all(
        (root / rel / "__init__.py").is_file() for rel in _CHECKOUT_PACKAGES.values()
    )


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``hwbptt.torch``, ``hwbptt.keras`` and ``hwbptt.programs`` in their folders of a
    checkout; their submodules then come from the package's ``__path__`` as usual."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        rel = _CHECKOUT_PACKAGES.get(fullname)
        if rel is None:
            return None
        folder = self.root / rel
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def map_checkout(root: Path = ROOT) -> bool:
    """Make ``hwbptt`` and its three mapped packages import from the checkout at ``root``,
    ahead of any installed copy (call it before anything imports ``hwbptt``). False, and
    nothing changed, where ``root`` is no checkout (an installed copy of this file)."""
    if not is_checkout(root):
        return False
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        # ``python3 programs/gpucheck.py`` puts programs/ on the path: bench, cli, common ...
        # would import as top-level modules of those names.
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root / "programs"]
        sys.path.insert(0, str(root))
        sys.meta_path.insert(0, _CheckoutFinder(root))
    return True


# The interpreter the tests run in: this file loaded by path (the name it has here is
# unknown there), the checkout mapped, then pytest.
_PYTEST_CHILD = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_hwbptt_gpucheck_boot", sys.argv[1])
boot = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = boot
spec.loader.exec_module(boot)
boot.map_checkout()
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


# ----------------------------------------------------------------------------- arguments


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _count(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (the programs' convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from hwbptt.programs.arguments import iteration_list as _ks, positive_ints as _ints

    p = _Parser(prog="python -m hwbptt gpucheck", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("results", "gpucheck"), help="output folder (default results/gpucheck)")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU (Triton's interpreter for the kernels)")
    p.add_argument("--budget", type=_seconds, default=None, help="wall-clock seconds for the whole run (default 450; dry run 300)")
    p.add_argument("--tests-timeout", type=_seconds, default=None, help="seconds the tests may take at most (default 210; dry run 240)")
    p.add_argument("--skip-tests", action="store_true", help="bench only (e.g. a second run after the tests passed)")
    p.add_argument("--skip-bench", action="store_true", help="tests only")
    p.add_argument("--T", type=_ints, default=None, help="bench sequence lengths (default 1024,4096,256, in that order)")
    p.add_argument("--B", type=_ints, default=None, help="bench batch sizes (default 32,128)")
    p.add_argument("--H", type=_ints, default=None, help="bench hidden sizes (default 128,512)")
    p.add_argument("--k", type=_ks, default=None, help="bench iterations, integers or 'exact' (default 0,1,3,10,exact)")
    p.add_argument("--no-packed", action="store_true", help="leave out the packed-sequence rows")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="bench dtype (default float32)")
    p.add_argument("--tf32", action="store_true",
                   help="let cuBLAS use TF32 for the Highway tapes' float32 matmuls in the bench (cuDNN's RNNs may use it by default)")
    p.add_argument("--repeats", type=_count(1), default=None, help="timed repeats per variant (default 5; dry run 2)")
    p.add_argument("--warmup", type=_count(0), default=None, help="untimed runs per variant first (default 2; dry run 1)")
    p.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    p.add_argument("--seed", type=int, default=0)
    return p


# ----------------------------------------------------------------------------- report


class Report:
    """``gpucheck.json``, rewritten whole (to a temporary file, then renamed) at every
    ``save``, so that a reader never sees half a file."""

    def __init__(self, out: Path, data: dict):
        self.path = out / "gpucheck.json"
        self.data = data

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _clock_text(t0: float) -> str:
    s = int(time.monotonic() - t0)
    return f"{s // 60}:{s % 60:02d}"


def _environment(torch: Any, dry_run: bool) -> dict:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    import hwbptt.torch

    package = Path(hwbptt.torch.__file__).resolve().parent
    from_checkout = is_checkout() and package == (ROOT / "adapters" / "torch").resolve()
    env = {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": version("triton"),
        "pytest": version("pytest"), "matplotlib": version("matplotlib"),
        "hwbptt_from": str(ROOT if from_checkout else package.parent),
        "hwbptt_source": "checkout" if from_checkout else "installed",
        "git_commit": _git_commit(),
        "variables": {k: os.environ.get(k) for k in ("HWBPTT_TRITON", "HWBPTT_KERNELS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")},
    }
    if dry_run:
        n = torch.get_num_threads()
        env["device"] = f"CPU (dry run): {platform.processor() or platform.machine()}, {n} thread{'' if n == 1 else 's'}"
    else:
        props = torch.cuda.get_device_properties(0)
        env.update({
            "device": torch.cuda.get_device_name(0), "capability": f"sm_{props.major}{props.minor}",
            "device_memory_GiB": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
            "tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32},
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        })
    return env


def _git_commit() -> str | None:
    if not (ROOT / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


# ----------------------------------------------------------------------------- step 1: tests


_TEST_WORKERS = 4


def run_tests(out: Path, dry_run: bool, timeout: float) -> dict:
    """``pytest -m cuda tests/cuda`` in a fresh interpreter (Triton's interpreter mode is
    chosen before Triton is imported; the bench's process stays clean), its output shown
    as it comes and kept in ``tests.log``, its results read from ``tests.xml``."""
    tests = ROOT / "tests" / "cuda"
    result: dict[str, Any] = {"status": "not run", "log": "tests.log", "seconds": 0.0}
    if not tests.is_dir():
        result["reason"] = f"no tests/cuda next to this program ({ROOT}): run it from a source checkout"
        return result
    if importlib.util.find_spec("pytest") is None:
        result["reason"] = f"pytest is not installed for {sys.executable}"
        return result
    xml, log = out / "tests.xml", out / "tests.log"
    if xml.exists():
        xml.unlink()
    args = ["-p", "no:cacheprovider", "-m", "cuda", "-v", "--tb=short", "-rfEs", f"--junitxml={xml}", str(tests)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args[:0] = ["--timeout", str(int(max(30, timeout / 2)))]  # one hung test does not take the rest with it
    if not dry_run and importlib.util.find_spec("xdist") is not None:
        # Most of the tests' time is Triton and inductor compiling kernels on the CPU: a few
        # workers compile in parallel (the GPU work itself is small).
        args[:0] = ["-n", str(_TEST_WORKERS)]
    env = {k: v for k, v in os.environ.items() if k not in ("HWBPTT_TRITON", "HWBPTT_KERNELS", "TRITON_INTERPRET", "HWBPTT_GPUCHECK_DEVICE")}
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        # One CPU thread: the dry run checks code, not speed, and threaded CPU kernels stall
        # on a loaded shared machine.
        env.update(TRITON_INTERPRET="1", HWBPTT_GPUCHECK_DEVICE="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _PYTEST_CHILD, str(Path(__file__).resolve()), *args]
    result["command"] = "pytest " + " ".join(args)
    t0 = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                print("  | " + line.rstrip(), flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: pytest and any compile workers it started
            proc.wait()
            rc = None
        reader.join(timeout=10)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result.update(_read_junit(xml) if xml.exists() else _read_log(log))
    if rc is None:
        result["status"] = "timed out"
        result["reason"] = f"stopped after {timeout:.0f} s (--tests-timeout); the counts are those of the tests that finished"
    elif result["failed"] or result["errors"] or rc not in (0, 5):
        result["status"] = "failed"
        if not (result["failed"] or result["errors"]):
            result["reason"] = f"pytest exited with status {rc}; see tests.log"
    elif result["passed"] == 0:
        result["status"] = "no test ran"
    else:
        result["status"] = "passed"
    return result


def _read_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".replace("tests.cuda.", "")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = (outcome.get("message") or "").strip()
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "kind": outcome.tag, "message": (outcome.get("message") or "").strip()[:600]})
    return {**counts, "failures": failures, "skip_reasons": skips}


def _read_log(path: Path) -> dict:
    """The counts from ``pytest -v`` lines, for a run that ended before writing its XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    words = {" PASSED": "passed", " FAILED": "failed", " ERROR": "errors", " SKIPPED": "skipped"}
    for line in path.read_text(errors="replace").splitlines():
        if "::" not in line:
            continue
        for word, key in words.items():
            if word in line:
                counts[key] += 1
                if key in ("failed", "errors"):
                    failures.append({"test": line.split(" ")[0], "kind": key, "message": ""})
                break
    return {**counts, "failures": failures, "skip_reasons": {}}


# ----------------------------------------------------------------------------- step 2: bench


class Clock:
    """CUDA events on a GPU (the device's own timeline; read after one synchronisation per
    step), ``time.perf_counter`` on the CPU: the same marks, the same arithmetic."""

    def __init__(self, torch: Any, device: Any):
        self.torch = torch
        self.cuda = device.type == "cuda"
        self.name = "CUDA events" if self.cuda else "time.perf_counter (CPU)"

    def mark(self) -> Any:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


SUITES = ("lstm", "gru", "lstm-packed", "gru-packed")
TARGETS = {
    "lstm": ("HighwayLSTM", "nn.LSTM BPTT"),
    "gru": ("HighwayGRU", "nn.GRU BPTT"),
    "lstm-packed": ("HighwayLSTM on a PackedSequence", "nn.LSTM BPTT on the PackedSequence"),
    "gru-packed": ("HighwayGRU on a PackedSequence", "nn.GRU BPTT on the PackedSequence"),
}


def _fmt_k(k: int | None) -> str:
    return "exact" if k is None else str(k)


def bench_plan(args: argparse.Namespace) -> tuple[list[tuple[str, int, int, int, list]], int]:
    """The rows in the order they run (what the verdicts need first: T=1024, then the
    packed rows, then T=4096, then the rest) and the verdicts' shortest T."""
    dry = args.dry_run
    Ts = args.T or ([5, 16] if dry else [1024, 4096, 256])
    Bs = args.B or ([2] if dry else [32, 128])
    Hs = args.H or ([8] if dry else [128, 512])
    ks = args.k or [0, 1, 3, 10, None]
    verdict_T = 16 if dry and not args.T else 1024
    first = [T for T in Ts if T == verdict_T] or Ts[:1]
    rest = [T for T in Ts if T not in first]
    ordered = first + [T for T in rest if T >= verdict_T] + [T for T in rest if T < verdict_T]
    packed_ks = [k for k in ks if k is None or k <= 3] or ks
    plan = []
    for i, T in enumerate(ordered):
        plan += [(suite, T, B, H, ks) for suite in ("lstm", "gru") for B in Bs for H in Hs]
        if i == 0 and not args.no_packed:
            shapes = sorted({(min(Bs), min(Hs)), (max(Bs), max(Hs))})
            plan += [(f"{m}-packed", T, B, H, packed_ks) for m in ("lstm", "gru") for B, H in shapes]
    return plan, verdict_T


def _variants(torch: Any, suite: str, T: int, B: int, H: int, ks: list, device: Any, dtype: Any, seed: int):
    """``{"bptt": (module, loss fn), "k=...": ...}`` on one input, the Highway layers
    holding the baseline's weights; the input is the first leaf of every variant."""
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from hwbptt.torch import HighwayGRU, HighwayLSTM

    model, packed = suite.split("-")[0], suite.endswith("-packed")
    Base, High = (nn.LSTM, HighwayLSTM) if model == "lstm" else (nn.GRU, HighwayGRU)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = Base(H, H, device=device, dtype=dtype)
    x = torch.randn(T, B, H, generator=gen).to(device, dtype).requires_grad_()
    proj = torch.randn(T, B, H, generator=gen).to(device, dtype)
    lengths = None
    if packed:  # lengths uniform in [T/2, T], one of them T
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        lengths[0] = T
        proj = proj * (torch.arange(T)[:, None] < lengths[None]).to(device, dtype).unsqueeze(-1)

    def loss_of(m):
        if packed:
            def f():
                y, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
                y, _ = pad_packed_sequence(y, total_length=T)
                return (y * proj).sum()
        else:
            def f():
                y, _ = m(x)
                return (y * proj).sum()
        return f

    variants = {"bptt": (base, loss_of(base))}
    for k in ks:
        high = High(H, H, iterations=k, device=device, dtype=dtype)
        high.load_state_dict(base.state_dict())
        variants[f"k={_fmt_k(k)}"] = (high, loss_of(high))
    return variants, x


def _step_run(clock: Clock, loss_fn: Callable, leaves: list) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        for p in leaves:
            p.grad = None
        start = clock.mark()
        loss = loss_fn()
        mid = clock.mark()
        loss.backward()
        end = clock.mark()
        clock.sync()
        return clock.seconds(start, mid), clock.seconds(mid, end)

    return run


def _cuda_peak_and_grads(torch: Any, loss_fn: Callable, leaves: list) -> tuple[float, list]:
    """Bytes the step allocates above what was allocated before it (the gradients
    included: every variant allocates the same ones), and the gradients."""
    for p in leaves:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_fn().backward()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before), [p.grad for p in leaves]


def _grads(loss_fn: Callable, leaves: list) -> list:
    for p in leaves:
        p.grad = None
    loss_fn().backward()
    return [p.grad for p in leaves]


def _cosine(torch: Any, a: list, b: list) -> float:
    dot = na = nb = 0.0
    for u, v in zip(a, b):
        if u is None or v is None:
            continue
        u, v = u.double(), v.double()
        dot += float((u * v).sum())
        na += float((u * u).sum())
        nb += float((v * v).sum())
    return dot / max((na * nb) ** 0.5, 1e-300)


def run_row(torch: Any, suite: str, T: int, B: int, H: int, ks: list, cfg: dict) -> list[dict]:
    from hwbptt.programs import bench

    device, dtype, clock = cfg["device"], cfg["dtype"], cfg["clock"]
    variants, x = _variants(torch, suite, T, B, H, ks, device, dtype, cfg["seed"])
    leaves = {name: [x, *m.parameters()] for name, (m, _) in variants.items()}
    runs = {name: _step_run(clock, f, leaves[name]) for name, (_, f) in variants.items()}
    times = bench.interleaved(runs, cfg["warmup"], cfg["repeats"])
    # After the timings: one more step per variant for its memory and gradient.
    memory: dict[str, float | None] = {}
    grads: dict[str, list] = {}
    meter = None if clock.cuda else bench.PeakMemory()
    for name, (_, f) in variants.items():
        if clock.cuda:
            memory[name], grads[name] = _cuda_peak_and_grads(torch, f, leaves[name])
        else:
            memory[name] = meter(f, leaves[name]) if meter.ok else None
            grads[name] = _grads(f, leaves[name])
    model = suite.split("-")[0]
    label, baseline = TARGETS[suite]
    base_t = times["bptt"]
    triton_on = _triton_state()
    rows = []
    for name in variants:
        if name == "bptt":
            continue
        k = None if name == "k=exact" else int(name[2:])
        t = times[name]
        row = {
            "suite": suite, "model": label, "baseline": f"{baseline} ({cfg['baseline_kernel']})", "T": T, "B": B, "H": H,
            "k": _fmt_k(k), "dtype": cfg["dtype_name"], "triton": triton_on,
            "step_ms": t["step"] * 1e3, "base_step_ms": base_t["step"] * 1e3, "speedup": base_t["step"] / t["step"],
            "fwd_ms": t["fwd"] * 1e3, "bwd_ms": t["bwd"] * 1e3, "base_bwd_ms": base_t["bwd"] * 1e3,
            "bwd_speedup": base_t["bwd"] / t["bwd"],
            "mem_bytes": memory[name], "base_mem_bytes": memory["bptt"],
            "mem_ratio": memory[name] / memory["bptt"] if memory[name] and memory["bptt"] else None,
            "cosine": _cosine(torch, grads[name], grads["bptt"]),
            "repeats": cfg["repeats"], "warmup": cfg["warmup"], "timer": clock.name,
        }
        if suite in ("lstm", "gru"):  # the bench's H100 price-list model, to hold against the measurement
            model_h = bench.gpu_projection(bench.cost_model(model, T, B, H, k), T)
            model_b = bench.gpu_projection(bench.cost_model(model, T, B, H, None), T)
            row["model_speedup"] = model_b / model_h
        rows.append(row)
    del variants, runs, grads, leaves, x
    if clock.cuda:
        torch.cuda.empty_cache()
    return rows


def _triton_state() -> str:
    from hwbptt.torch.triton_scan import enabled

    return "on" if enabled() else "off (HWBPTT_TRITON=0)"


def _estimate(done: list[tuple[int, float]], units: int) -> float:
    """Seconds for a row of ``units`` (T·B·H·variants), scaled from the finished row of the
    nearest size (0 when none has finished: then it runs)."""
    if not done:
        return 0.0
    u, s = min(done, key=lambda d: abs(math.log(d[0] / units)))
    return s * units / u


def run_bench(torch: Any, args: argparse.Namespace, report: Report, deadline: float, t0: float) -> None:
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = getattr(torch, args.dtype)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    clock = Clock(torch, device)
    cfg = {
        "device": device, "dtype": dtype, "dtype_name": args.dtype, "clock": clock, "seed": args.seed,
        "repeats": args.repeats or (2 if args.dry_run else 5), "warmup": args.warmup if args.warmup is not None else (1 if args.dry_run else 2),
        "baseline_kernel": "CPU, dry run" if args.dry_run else "cuDNN",
    }
    plan, verdict_T = bench_plan(args)
    bench_data = report.data["bench"]
    tf32 = None if args.dry_run else {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                                      "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    bench_data.update({"status": "running", "plan": [list(p[:4]) + [[_fmt_k(k) for k in p[4]]] for p in plan],
                       "verdict_T": verdict_T, "timer": clock.name, "repeats": cfg["repeats"], "warmup": cfg["warmup"],
                       "dtype": args.dtype, "tf32": tf32, "rows": [], "skipped": [], "errors": []})
    report.save()
    done: list[tuple[int, float]] = []
    for i, (suite, T, B, H, ks) in enumerate(plan, 1):
        what = f"{suite} T={T} B={B} H={H}"
        units = T * B * H * (len(ks) + 1)
        left = deadline - time.monotonic()
        need = _estimate(done, units)
        if need > left:
            bench_data["skipped"].append({"row": what, "reason": f"time budget: about {need:.0f} s needed, {max(left, 0):.0f} s left"})
            _say(f"[bench {i}/{len(plan)} {_clock_text(t0)}] {what}: left out (about {need:.0f} s needed, {max(left, 0):.0f} s left)")
            report.save()
            continue
        start = time.monotonic()
        for attempt in (1, 2):
            try:
                rows = run_row(torch, suite, T, B, H, ks, cfg)
                break
            except Exception as exc:  # recorded, and the bench goes on with the next row
                text = f"{type(exc).__name__}: {str(exc).strip()[:800]}"
                if clock.cuda:
                    torch.cuda.empty_cache()
                if attempt == 1 and "HWBPTT_TRITON=0" in text and _triton_state() == "on":
                    # The way out the error names: the rest of the bench on the eager torch path.
                    os.environ["HWBPTT_TRITON"] = "0"
                    report.data["notes"].append(f"{what}: a Triton kernel failed ({text[:300]}); the bench went on with HWBPTT_TRITON=0")
                    _say(f"[bench] {what}: a Triton kernel failed; going on with HWBPTT_TRITON=0 (eager torch): {text[:300]}")
                    continue
                rows = []
                bench_data["errors"].append({"row": what, "error": text})
                _say(f"[bench {i}/{len(plan)} {_clock_text(t0)}] {what}: FAILED: {text[:400]}")
                break
        seconds = time.monotonic() - start
        if rows:
            done.append((units, seconds))
            bench_data["rows"] += rows
            ratios = "  ".join(f"k={r['k']} {r['speedup']:.2f}x" for r in rows)
            _say(f"[bench {i}/{len(plan)} {_clock_text(t0)}] {what}: {cfg['baseline_kernel']} {rows[0]['base_step_ms']:.1f} ms; "
                 f"speed-up {ratios}  ({seconds:.1f} s)")
        report.save()
    bench_data["status"] = "errors" if bench_data["errors"] else ("partial" if bench_data["skipped"] else "done")
    report.save()


# ----------------------------------------------------------------------------- step 3: verdicts


def verdicts(rows: list[dict], min_T: int, dry_run: bool, max_k: int = 3, suites: tuple[str, ...] = SUITES) -> list[dict]:
    """One verdict per target: Highway-BP faster than the baseline (speed-up > 1) in every
    measured row with ``k <= max_k`` and ``T >= min_T``; ``met`` is None where no such row
    was measured."""
    out = []
    tag = "dry run on the CPU, not a GPU result: " if dry_run else ""
    base_word = "the CPU baseline" if dry_run else "cuDNN"
    for suite in suites:
        label, baseline = TARGETS[suite]
        sel = [r for r in rows if r["suite"] == suite and r["k"] != "exact" and int(r["k"]) <= max_k and r["T"] >= min_T]
        rule = f"faster than {base_word} at k <= {max_k} for T >= {min_T}"
        if not sel:
            v = {"met": None, "line": f"{label} vs {baseline}: {tag}UNMEASURED ({rule}): no such row was measured"}
        else:
            worst = min(sel, key=lambda r: r["speedup"])
            slower = [r for r in sel if not r["speedup"] > 1.0]
            at = f"{worst['speedup']:.2f}x at T={worst['T']} B={worst['B']} H={worst['H']} k={worst['k']}"
            if not slower:
                line = f"{label} vs {baseline}: {tag}MET, {rule} in all {len(sel)} rows (slowest {at})"
            else:
                line = f"{label} vs {baseline}: {tag}NOT MET, {rule}: slower in {len(slower)} of {len(sel)} rows (worst {at})"
            v = {"met": not slower, "line": line, "rows": len(sel), "slower": len(slower), "worst": {k: worst[k] for k in ("T", "B", "H", "k", "speedup")}}
        out.append({"suite": suite, "target": f"{label} vs {baseline}", "rule": rule, **v})
    return out


# ----------------------------------------------------------------------------- output


def format_table(rows: list[dict]) -> str:
    """The bench's ratio table, with the H100 model's ratio as the last column."""
    from hwbptt.programs.bench import format_table as ratio_table

    return ratio_table(rows, last=("model x", "model_speedup"), ms=".1f")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up against k, one panel per suite and (B, H), one line per T; the k values
    evenly spaced, the exact gradient as a square at the right; 1x dashed."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in SUITES if any(r["suite"] == s for r in rows)]
    shapes = sorted({(r["B"], r["H"]) for r in rows})
    fig, axes = plt.subplots(len(suites), len(shapes), figsize=(3.8 * len(shapes), 2.9 * len(suites) + 0.4), squeeze=False)
    for i, suite in enumerate(suites):
        for j, (B, H) in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["suite"] == suite and (r["B"], r["H"]) == (B, H)]
            if not sel:
                ax.axis("off")
                continue
            ks = sorted({int(r["k"]) for r in sel if r["k"] != "exact"})
            pos = {k: n for n, k in enumerate(ks)}
            has_exact = any(r["k"] == "exact" for r in sel)
            for T in sorted({r["T"] for r in sel}):
                pts = sorted((pos[int(r["k"])], r["speedup"]) for r in sel if r["T"] == T and r["k"] != "exact")
                color = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"T={T}")[0].get_color() if pts else None
                exact = [r["speedup"] for r in sel if r["T"] == T and r["k"] == "exact"]
                if exact:
                    ax.plot([len(ks)], exact, marker="s", ls="none", color=color, label=None if pts else f"T={T}")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_ylim(0, max(1.2, 1.1 * max(r["speedup"] for r in sel)))
            ax.set_xticks(list(range(len(ks) + has_exact)), [str(k) for k in ks] + (["exact"] if has_exact else []))
            ax.set_title(f"{suite}, B={B}, H={H}", fontsize=9)
            ax.set_xlabel("iterations k", fontsize=8)
            ax.set_ylabel("speed-up (x)", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, width=int(45 * len(shapes))), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary(report: dict) -> str:
    env, tests, bench_data = report["environment"], report["tests"], report["bench"]
    lines = [f"hwbptt gpucheck{' (DRY RUN on the CPU: no GPU figure)' if report['dry_run'] else ''}",
             f"device: {env.get('device')} {env.get('capability', '')}".rstrip(),
             f"python {env['python']}, torch {env['torch']} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn', '-')}), triton {env.get('triton')}",
             f"hwbptt from {env['hwbptt_from']} ({env['hwbptt_source']}, commit {env.get('git_commit') or 'unknown'})"]
    if bench_data.get("tf32"):
        t32 = bench_data["tf32"]
        lines.append(f"TF32 in the bench: cuBLAS (the Highway tapes' matmuls) {t32['cuda.matmul.allow_tf32']}, "
                     f"cuDNN (the RNN kernels) {t32['cudnn.allow_tf32']}; the tests turn both off"
                     + ("" if t32["cuda.matmul.allow_tf32"] == t32["cudnn.allow_tf32"] else "; unequal: --tf32 lets the tapes use TF32 too"))
    lines.append("")
    t = tests
    lines.append(f"tests: {t['status']}" + (f" ({t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
                                             f"{t.get('skipped', 0)} skipped in {t.get('seconds', 0):.0f} s)" if "passed" in t else "")
                 + (f": {t['reason']}" if t.get("reason") else ""))
    for f in t.get("failures", [])[:20]:
        lines.append(f"  {f['kind']}: {f['test']}: {f['message'][:200]}")
    for reason, n in t.get("skip_reasons", {}).items():
        lines.append(f"  skipped ({n}): {reason[:200]}")
    rows = bench_data.get("rows", [])
    if rows:
        lines += ["", f"bench ({bench_data.get('dtype')}, {bench_data.get('timer')}, medians of {bench_data.get('repeats')} "
                      f"interleaved repeats after {bench_data.get('warmup')} warm-up):", format_table(rows),
                  "speed-up = baseline step time / Highway step time (> 1: Highway-BP faster), full training step; bwd x: the",
                  "same for the backward alone; mem x: peak memory of the step / the baseline's; cosine: gradient vs the",
                  "baseline's (exact) gradient; model x: the speed-up bench.py's H100 price-list model predicts (not a measurement).",
                  "k=exact on CUDA runs the parent's kernel and autograd: its ratio shows the timing noise."]
    elif bench_data.get("status") not in (None, "not run"):
        lines += ["", f"bench: {bench_data.get('status')}, no row measured"]
    for s in bench_data.get("skipped", []):
        lines.append(f"left out: {s['row']} ({s['reason']})")
    for e in bench_data.get("errors", []):
        lines.append(f"error: {e['row']}: {e['error'][:300]}")
    for n in report.get("notes", []):
        lines.append("note: " + n)
    if report.get("verdicts"):
        lines += ["", "verdicts:"] + ["  " + v["line"] for v in report["verdicts"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _fail(message: str, status: int = 1) -> int:
    print(f"gpucheck: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    if args.skip_tests and args.skip_bench:
        return _fail("--skip-tests and --skip-bench together leave nothing to run", 2)
    try:
        import torch
    except Exception as exc:  # a missing or broken torch: one line, not a traceback
        return _fail(f"PyTorch cannot be imported by {sys.executable} ({type(exc).__name__}: {exc}); the check needs torch with CUDA")
    if not args.dry_run and not torch.cuda.is_available():
        return _fail(f"no CUDA GPU: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no device, "
                     "so nothing was measured; --dry-run rehearses every step on the CPU")
    map_checkout()
    if args.dry_run:
        torch.set_num_threads(1)  # as the dry run's tests (run_tests)
    # The dry run's limits are loose: it takes about 30 s, more on a loaded shared CPU.
    budget = args.budget or (300.0 if args.dry_run else 450.0)
    tests_timeout = min(args.tests_timeout or (240.0 if args.dry_run else 210.0), budget)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"--out {args.out}: cannot create the folder ({exc.strerror or exc})", 2)
    try:
        env = _environment(torch, args.dry_run)
    except ImportError as exc:
        return _fail(f"hwbptt cannot be imported ({exc}); run this from a source checkout or install the package")
    report = Report(out, {
        "command": "python -m hwbptt gpucheck " + " ".join(sys.argv[1:] if argv is None else argv),
        "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget,
        "environment": env, "tests": {"status": "not run"}, "bench": {"status": "not run"}, "verdicts": [], "notes": [],
        "files": {"json": "gpucheck.json", "summary": "summary.txt", "tests_log": "tests.log", "tests_xml": "tests.xml", "plot": "bench.png"},
    })
    report.save()
    _say(f"hwbptt gpucheck{' --dry-run (CPU, tiny sizes)' if args.dry_run else ''}: {env['device']}; torch {env['torch']}, "
         f"triton {env['triton']}; hwbptt from {env['hwbptt_from']}; budget {budget:.0f} s; writing {out}")

    if not args.skip_tests:
        _say(f"[tests {_clock_text(t0)}] pytest -m cuda tests/cuda (at most {tests_timeout:.0f} s) ...")
        report.data["tests"] = run_tests(out, args.dry_run, tests_timeout)
        t = report.data["tests"]
        _say(f"[tests {_clock_text(t0)}] {t['status']}: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
             f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped" + (f"; {t['reason']}" if t.get("reason") else ""))
        report.save()
    else:
        report.data["tests"] = {"status": "skipped (--skip-tests)"}

    if not args.skip_bench:
        _say(f"[bench {_clock_text(t0)}] Highway-BP against {'the CPU baseline (dry run)' if args.dry_run else 'cuDNN'} ...")
        try:
            run_bench(torch, args, report, deadline=t0 + budget - 15.0, t0=t0)
        except KeyboardInterrupt:
            report.data["bench"]["status"] = "interrupted"
            report.data["notes"].append("the bench was interrupted; the rows above were measured")
        plan_T = report.data["bench"].get("verdict_T", 1024)
        report.data["verdicts"] = verdicts(report.data["bench"].get("rows", []), plan_T, args.dry_run,
                                           suites=tuple(s for s in SUITES if not (args.no_packed and s.endswith("packed"))))
        rows = report.data["bench"].get("rows", [])
        if rows and not args.no_plot:
            if importlib.util.find_spec("matplotlib") is None:
                report.data["notes"].append("bench.png not written: matplotlib is not installed for this Python")
            else:
                title = (f"Highway-BP training step against {'the CPU baseline (DRY RUN, not a GPU result)' if args.dry_run else 'cuDNN BPTT'}"
                         f", {env['device']}, {args.dtype}, same process")
                try:
                    plot(rows, out / "bench.png", title)
                except Exception as exc:  # the measurements are written already; a plot is not worth losing them
                    report.data["notes"].append(f"bench.png not written: {type(exc).__name__}: {exc}")
    else:
        report.data["bench"] = {"status": "skipped (--skip-bench)"}
    report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report.data["seconds"] = round(time.monotonic() - t0, 1)
    report.save()
    summary = _summary(report.data)
    (out / "summary.txt").write_text(summary + "\n")
    _say()
    _say(summary)
    _say()
    _say(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} into {out} in {_clock_text(t0)}")
    tests_ok = args.skip_tests or report.data["tests"]["status"] == "passed"
    bench_ok = args.skip_bench or report.data["bench"].get("status") in ("done", "partial")
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    map_checkout()
    raise SystemExit(main())
