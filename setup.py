"""Builds the CPU kernels of ``hwbptt.torch`` when the package is installed.

The C++ sources in ``adapters/torch/csrc`` are compiled against the installed PyTorch
(``torch.utils.cpp_extension``; install with ``pip install --no-build-isolation`` so that
the build sees it, the usual convention for PyTorch extensions). On x86-64 the same
sources are built three times, for ATen's instruction-set levels DEFAULT, AVX2 and
AVX512, and ``hwbptt.torch.native`` loads the one the running CPU supports, so an
installation moved to another machine still runs. No fast-math: the numerics are IEEE.

Without PyTorch at build time, without a compiler, or with ``HWBPTT_BUILD_KERNELS=0``,
no kernel is built and the package installs all the same: ``hwbptt.torch`` then runs its
plain-PyTorch paths and ``hwbptt.torch.kernels_status()`` says why.
"""

import os
import platform
import sys

from setuptools import setup

SOURCES = ["adapters/torch/csrc/ops.cpp", "adapters/torch/csrc/loops.cpp"]
COMMON = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden"]
# (name suffix, macros, machine flags): ATen's CPU capability levels.
LEVELS = [("default", "DEFAULT", [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    LEVELS += [
        ("avx2", "AVX2", ["-mavx2", "-mfma", "-mf16c"]),
        ("avx512", "AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]),
    ]


def _levels():
    """``HWBPTT_KERNEL_LEVELS=avx512`` (comma-separated) builds only those levels, for a
    quicker rebuild while developing; the default builds every level."""
    wanted = os.environ.get("HWBPTT_KERNEL_LEVELS", "").strip().lower()
    if not wanted:
        return LEVELS
    names = {w.strip() for w in wanted.split(",")}
    unknown = names - {s for s, _, _ in LEVELS}
    if unknown:
        raise SystemExit(f"HWBPTT_KERNEL_LEVELS: unknown level(s) {sorted(unknown)}; known: {[s for s, _, _ in LEVELS]}")
    return [lv for lv in LEVELS if lv[0] in names]


def _extensions():
    if os.environ.get("HWBPTT_BUILD_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        print("hwbptt: HWBPTT_BUILD_KERNELS=0, building no CPU kernels", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("hwbptt: PyTorch is not importable at build time (install it first and use "
              "--no-build-isolation); building no CPU kernels", file=sys.stderr)
        return [], {}

    class LenientBuild(BuildExtension):
        """A kernel that fails to build is reported, not fatal: the package then uses its
        plain-PyTorch paths, and ``kernels_status()`` says which builds are missing."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing or failing: install without it
                print(f"hwbptt: could not build {ext.name}: {exc}", file=sys.stderr)

    exts = []
    for suffix, level, flags in _levels():
        macros = [("CPU_CAPABILITY", level), (f"CPU_CAPABILITY_{level}", None)]
        # -fopenmp: at::parallel_for is a header template whose OpenMP pragma is compiled into
        # this library; linked against libgomp.so.1, the loader reuses the runtime PyTorch
        # already loaded (same soname), so the kernels run on PyTorch's own thread team.
        exts.append(CppExtension(f"hwbptt.torch._kernels_{suffix}", SOURCES, define_macros=macros,
                                 extra_compile_args=COMMON + flags + ["-fopenmp"], extra_link_args=["-fopenmp"]))
    return exts, {"build_ext": LenientBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
