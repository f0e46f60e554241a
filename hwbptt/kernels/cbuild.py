"""Build a C source with the system compiler at first use and load it with ``ctypes``.

The shared object is cached under the temporary directory, keyed by a hash of the
source, the flags and the CPU model (the code is built for the host CPU). A missing
compiler or a failed build is not an error: ``load`` returns ``None``, the caller uses
its plain-torch path, and ``status()`` records the reason (the benchmark prints it).
``HWBPTT_KERNELS=0`` disables every compiled kernel.

Each kernel exports a *task*, ``NAME_task(lo, hi, args)``: its share ``[lo, hi)`` of the
work, with its other arguments unpacked from an ``int64`` array. ``run_parallel`` splits
one call over ``torch.get_num_threads()`` cores. It launches the tasks on PyTorch's own
OpenMP threads when it can: a small launcher built with ``-fopenmp`` joins the OpenMP
runtime already loaded by PyTorch (the loader reuses a library of the same name), so the
team PyTorch's last operator left spinning picks the work up at once. Otherwise (another
OpenMP runtime, no ``/proc``, the launcher failed to build) it calls the tasks from Python
threads (``ctypes`` releases the GIL); those compete with PyTorch's spinning threads for
the cores, and measured at about half the bandwidth right after a PyTorch operator.
``status()["threads"]`` says which one runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

__all__ = ["load", "status", "kernels_enabled", "run_parallel", "threading_mode", "task", "addr", "use_openmp", "FLAGS", "CALLS"]

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=c99"]
_LIBS = ["-lmvec", "-lm"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_status: dict[str, str] = {}
_pool: ThreadPoolExecutor | None = None
CALLS = [0]  # compiled-kernel calls so far (the benchmark counts them as operator calls)
_openmp_state = {"enabled": True}
_launcher: list = []  # [the OpenMP launch function or None] once looked up


def kernels_enabled() -> bool:
    return os.environ.get("HWBPTT_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def status() -> dict[str, str]:
    """``{kernel name: "compiled C (cc)" | "disabled ..." | "unavailable: reason"}``."""
    return dict(_status)


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(name: str, source: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (set CC or install gcc)")
    key = hashlib.sha256("\0".join([source, cc, *FLAGS, *flags, *_LIBS, _cpu_tag()]).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"hwbptt-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{name}-{key}.so")
    if not os.path.exists(target):
        src = os.path.join(folder, f"{name}-{key}-{os.getpid()}.c")
        tmp = target + f".{os.getpid()}.tmp"
        with open(src, "w") as f:
            f.write(source)
        done = subprocess.run([cc, *FLAGS, *flags, src, "-o", tmp, *_LIBS], capture_output=True, text=True)
        if done.returncode != 0:
            # Retry without the vector maths library (older C libraries lack it).
            done = subprocess.run([cc, *FLAGS, *flags, src, "-o", tmp, "-lm"], capture_output=True, text=True)
        os.unlink(src)
        if done.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cc)} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
    return ctypes.CDLL(target)


def load(name: str, source: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The loaded library, or ``None`` (and the reason in ``status()``); ``flags`` are
    added to ``FLAGS``."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if not kernels_enabled():
            _status[name] = "disabled by HWBPTT_KERNELS=0 (plain torch)"
        else:
            try:
                lib = _compile(name, source, flags)
                _status[name] = "compiled C (cc, ctypes)"
            except Exception as exc:  # no compiler, failed build: plain torch instead
                _status[name] = f"unavailable, plain torch used: {exc}"
        _loaded[name] = lib
        return lib


_LAUNCHER = r"""
#include <omp.h>
#include <stdint.h>
/* Each thread of the team runs its share of [0, n). */
typedef void (*task_t)(long lo, long hi, const int64_t* args);
void launch(task_t task, const int64_t* args, long n, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    long p = omp_get_num_threads(), i = omp_get_thread_num();
    task(n * i / p, n * (i + 1) / p, args);
  }
}
"""


def _openmp_runtimes() -> set[str] | None:
    """Files of OpenMP runtimes mapped into this process (``None`` without ``/proc``)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if re.search(r"/lib(g|i|)omp[^/]*\.so", line)}
    except OSError:
        return None


def _openmp_launcher():
    """The launch function on PyTorch's OpenMP runtime, or ``None`` (reason in ``status()``)."""
    if _launcher:
        return _launcher[0]
    fn, why = None, None
    before = _openmp_runtimes()
    if before is None:
        why = "no /proc/self/maps to check which OpenMP runtime PyTorch uses"
    elif not any(os.path.basename(f).startswith("libgomp") for f in before):
        why = "PyTorch's OpenMP runtime is not GNU libgomp"
    else:
        lib = load("openmp_launcher", _LAUNCHER, ("-fopenmp",))
        if lib is None:
            why = "the OpenMP launcher did not build"
        elif _openmp_runtimes() != before:
            # A second runtime would keep its own threads spinning against PyTorch's.
            why = "the launcher loaded an OpenMP runtime of its own"
        else:
            fn = lib.launch
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
            fn.restype = None
    _status["threads"] = "OpenMP (PyTorch's runtime)" if fn is not None else f"Python threads ({why})"
    _launcher.append(fn)
    return fn


def threading_mode() -> str:
    """How ``run_parallel`` splits a kernel over the cores, looked up now if not yet."""
    if kernels_enabled():
        _openmp_launcher()
    return _status.get("threads", "none (compiled kernels disabled)")


def use_openmp(on: bool = True):
    """Context manager: launch the kernels on PyTorch's OpenMP threads (``True``, the
    default where possible) or on Python threads (``False``); for comparisons."""
    return switch(_openmp_state, on, "use_openmp")


def task(lib: ctypes.CDLL, name: str):
    """The exported task ``name`` of ``lib`` (``void name(long lo, long hi, const int64_t*
    args)``), typed for ``run_parallel``."""
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p], None
    return fn


def addr(t: torch.Tensor | None) -> int:
    """A tensor's data address as an integer for a task's arguments (0 for ``None``)."""
    return 0 if t is None else t.data_ptr()


def run_parallel(fn, args: list[int], n: int, work: int, min_work: int = 1 << 15, openmp_only: bool = False) -> None:
    """Run the task ``fn`` (from ``task``) over a split of ``range(n)`` with the integer
    arguments ``args``, on up to ``torch.get_num_threads()`` threads (one call when
    ``work`` elements are too few to be worth it). ``openmp_only``: one call unless the
    OpenMP launcher runs, for tasks that call PyTorch's BLAS (inside an OpenMP team it runs
    on one thread; from Python threads it would start its own team in each)."""
    global _pool
    CALLS[0] += 1
    packed = (ctypes.c_int64 * len(args))(*args)
    threads = min(torch.get_num_threads(), n, max(1, work // min_work))
    launch = _openmp_launcher() if threads > 1 and _openmp_state["enabled"] else None
    if threads <= 1 or (openmp_only and launch is None):
        fn(0, n, packed)
        return
    if launch is not None:
        launch(ctypes.cast(fn, ctypes.c_void_p), packed, n, threads)
        return
    if _pool is None or _pool._max_workers < threads:  # noqa: SLF001
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hwbptt")
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(fn, bounds[i], bounds[i + 1], packed) for i in range(1, threads)]
    fn(bounds[0], bounds[1], packed)
    for f in futures:
        f.result()


@contextlib.contextmanager
def switch(state: dict, on: bool, what: str) -> Iterator[None]:
    """Set ``state["enabled"]`` to ``on`` within a block and restore it after: the
    on/off switches of the fast paths (for comparisons). ``what`` names the caller in the
    error for a non-bool ``on``."""
    if not isinstance(on, bool):
        raise TypeError(f"{what}(on) takes a bool, got on={on!r}")
    before = state["enabled"]
    state["enabled"] = on
    try:
        yield
    finally:
        state["enabled"] = before
