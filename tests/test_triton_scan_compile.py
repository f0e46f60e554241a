"""The Triton scan kernel compiles to an sm_90 (H100/H200) CUDA binary, for each dtype and
direction, with Triton's own toolchain: no GPU needed, nothing run (the gate kernels' twin
of this is ``tests/test_triton_cells.py::test_kernels_compile_for_a_gpu``). Run in a
fresh interpreter without ``TRITON_INTERPRET`` (and so that Triton is not imported after
TensorFlow in this one)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def main():
        if "nvidia" not in backends:
            return "skip: Triton has no CUDA backend here"
        try:
            from triton import knobs
            if not knobs.nvidia.ptxas.path:
                return "skip: no ptxas found"
        except Exception as exc:  # depends on the Triton version and installation
            return f"skip: no ptxas found ({exc})"
        from hwbptt.torch import triton_scan as ts

        fn = ts._scan_kernel
        ints = ("T", "M", "K", "saT", "saM", "sbT", "sbM")
        for ty in ("fp32", "fp64"):
            for reverse in (False, True):
                const = {"REVERSE": reverse, "BLOCK": 1024}
                sig = {n: "constexpr" if n in const else "i32" if n in ints else "*" + ty for n in fn.arg_names}
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
                assert compiled.asm.get("cubin"), (ty, reverse)
        return "ok"

    print("TRITON_SCAN_COMPILE " + json.dumps(main()))
    """
)


def test_scan_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HWBPTT_KERNELS", "HWBPTT_TRITON")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("TRITON_SCAN_COMPILE ")), None)
    assert done.returncode == 0 and line is not None, (done.stdout[-2000:], done.stderr[-3000:])
    result = json.loads(line.split(" ", 1)[1])
    if result.startswith("skip:"):
        pytest.skip(result)
    assert result == "ok", result
