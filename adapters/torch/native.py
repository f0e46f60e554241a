"""Loads the compiled CPU kernels (``hwbptt::*`` operators) built when the package was
installed (``setup.py``, sources in ``adapters/torch/csrc``).

Three builds of the same sources may lie beside this file, one per ATen CPU capability
level (``_kernels_default``, ``_kernels_avx2``, ``_kernels_avx512``). ``load()`` picks the
widest one that both PyTorch's own dispatch (``torch.backends.cpu.get_cpu_capability()``,
which honours ``ATEN_CPU_CAPABILITY``) and the processor's flags allow, checks the file
before loading it, and registers the operators' fake implementations for
``torch.compile``. Nothing is compiled at run time and nothing is loaded from a folder
another user can write:

- the file must be a regular file (not a link), owned by this user or root, and not
  writable by group or others; so must the folder holding it;
- a file that fails the check is refused with the reason in ``status()``, and the
  package runs its plain-PyTorch paths.

``HWBPTT_KERNELS=0`` turns the compiled kernels off. Without a build (no compiler or no
PyTorch at install time) ``ops()`` is ``None`` and the callers use their eager twins.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import torch

__all__ = ["ops", "load", "select", "status", "kernels_enabled", "check_trusted", "LEVELS"]

# (file stem, what PyTorch's get_cpu_capability() calls it, /proc/cpuinfo flags the build needs)
LEVELS = (
    ("avx512", "AVX512", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c")),
    ("avx2", "AVX2", ("avx2", "fma", "f16c")),
    ("default", "DEFAULT", ()),
)
_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
_BUILD_INFO = {"default": 0, "avx2": 1, "avx512": 2}
_lock = threading.Lock()
_state: dict = {"loaded": False, "ops": None, "level": None, "path": None, "why": ""}


def kernels_enabled() -> bool:
    return os.environ.get("HWBPTT_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def check_trusted(path: Path) -> str | None:
    """Why ``path`` must not be loaded, or ``None`` if it may: a regular file (not a link)
    in a folder, both owned by this user or root and writable by nobody else."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for p, kind in ((path, "file"), (path.parent, "folder")):
        try:
            st = os.lstat(p)
        except OSError as exc:
            return f"cannot stat the kernel {kind} {p}: {exc.strerror}"
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            return f"the kernel file {p} is not a regular file (a link or special file)"
        if kind == "folder" and not stat.S_ISDIR(st.st_mode):
            return f"the kernel folder {p} is not a directory"
        if st.st_uid not in (uid, 0):
            return f"the kernel {kind} {p} is owned by uid {st.st_uid}, not by this user ({uid}) or root"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"the kernel {kind} {p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _candidates(folder: Path) -> list[tuple[str, Path]]:
    """The builds this CPU may run, widest first, that exist beside this file."""
    capability = torch.backends.cpu.get_cpu_capability()
    allowed = _RANK.get(capability, 0)  # other architectures' levels: the portable build
    flags = _cpu_flags()
    out = []
    for stem, level, needs in LEVELS:
        if _RANK[level] > allowed:
            continue
        if needs and (flags is None or not set(needs) <= flags):
            continue
        found = sorted(folder.glob(f"_kernels_{stem}.*.so")) + sorted(folder.glob(f"_kernels_{stem}.so"))
        if found:
            out.append((stem, found[0]))
    return out


def select(folder: Path) -> tuple[str | None, Path | None, str]:
    """``(level, path, "")`` of the build to load from ``folder``, or ``(None, None, why)``
    when there is none this CPU can run or the widest one fails ``check_trusted``."""
    candidates = _candidates(folder)
    if not candidates:
        return None, None, ("no compiled kernels were built at install (plain PyTorch); reinstall with a C++ "
                            "compiler and `pip install --no-build-isolation`")
    stem, path = candidates[0]
    why = check_trusted(path)
    if why is not None:
        return None, None, f"refused to load: {why} (plain PyTorch)"
    return stem, path, ""


def load():
    """Load the best build once: ``torch.ops.hwbptt``, or ``None`` (reason in ``status()``)."""
    if _state["loaded"]:
        return _state["ops"]
    with _lock:
        if _state["loaded"]:
            return _state["ops"]
        if not kernels_enabled():
            _state.update(loaded=True, why="disabled by HWBPTT_KERNELS=0 (plain PyTorch)")
            return None
        stem, path, why = select(Path(__file__).resolve().parent)
        if path is None:
            _state.update(loaded=True, why=why)
            return None
        torch.ops.load_library(str(path))
        ops = torch.ops.hwbptt
        if int(ops.build_info()) != _BUILD_INFO[stem]:
            raise RuntimeError(f"hwbptt: the kernel file {path.name} reports another instruction set than its name")
        from . import fakes  # noqa: F401  the operators' shapes for torch.compile

        _state.update(loaded=True, ops=ops, level=stem, path=str(path), why="")
        return ops


ops = load


def status() -> dict[str, str]:
    """``{"kernels": what runs, "build": the instruction-set level or None, "why": ...}``."""
    load()
    if _state["ops"] is None:
        return {"kernels": "plain PyTorch", "build": "none", "why": _state["why"]}
    return {"kernels": f"compiled C++ operators ({_state['level'].upper()} build, built at install)",
            "build": _state["level"], "why": ""}
