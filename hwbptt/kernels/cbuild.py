"""Build a C source with the system compiler at first use and load it with ``ctypes``.

The shared object is cached under the temporary directory, keyed by a hash of the
source, the flags and the CPU model (the code is built for the host CPU). A missing
compiler or a failed build is not an error: ``load`` returns ``None``, the caller uses
its plain-torch path, and ``status()`` records the reason (the benchmark prints it).
``HWBPTT_KERNELS=0`` disables every compiled kernel.

Kernels are called from Python threads on disjoint slices of the work: ``ctypes``
releases the GIL during a foreign call, so ``run_parallel`` spreads one call over
``torch.get_num_threads()`` cores without a second OpenMP runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

__all__ = ["load", "status", "kernels_enabled", "run_parallel", "ptr", "FLAGS", "CALLS"]

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=c99"]
_LIBS = ["-lmvec", "-lm"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_status: dict[str, str] = {}
_pool: ThreadPoolExecutor | None = None
CALLS = [0]  # compiled-kernel calls so far (the benchmark counts them as operator calls)


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


def _compile(name: str, source: str) -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (set CC or install gcc)")
    key = hashlib.sha256("\0".join([source, cc, *FLAGS, *_LIBS, _cpu_tag()]).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"hwbptt-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{name}-{key}.so")
    if not os.path.exists(target):
        src = os.path.join(folder, f"{name}-{key}-{os.getpid()}.c")
        tmp = target + f".{os.getpid()}.tmp"
        with open(src, "w") as f:
            f.write(source)
        done = subprocess.run([cc, *FLAGS, src, "-o", tmp, *_LIBS], capture_output=True, text=True)
        if done.returncode != 0:
            # Retry without the vector maths library (older C libraries lack it).
            done = subprocess.run([cc, *FLAGS, src, "-o", tmp, "-lm"], capture_output=True, text=True)
        os.unlink(src)
        if done.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cc)} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
    return ctypes.CDLL(target)


def load(name: str, source: str) -> ctypes.CDLL | None:
    """The loaded library, or ``None`` (and the reason in ``status()``)."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if not kernels_enabled():
            _status[name] = "disabled by HWBPTT_KERNELS=0 (plain torch)"
        else:
            try:
                lib = _compile(name, source)
                _status[name] = "compiled C (cc, ctypes)"
            except Exception as exc:  # no compiler, failed build: plain torch instead
                _status[name] = f"unavailable, plain torch used: {exc}"
        _loaded[name] = lib
        return lib


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def run_parallel(fn: Callable[[int, int], None], n: int, work: int, min_work: int = 1 << 15) -> None:
    """Call ``fn(lo, hi)`` over a split of ``range(n)`` on up to ``torch.get_num_threads()``
    threads (one call when ``work`` elements are too few to be worth it)."""
    global _pool
    CALLS[0] += 1
    threads = min(torch.get_num_threads(), n, max(1, work // min_work))
    if threads <= 1:
        fn(0, n)
        return
    if _pool is None or _pool._max_workers < threads:  # noqa: SLF001
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hwbptt")
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    fn(bounds[0], bounds[1])
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
