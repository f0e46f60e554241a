"""The Triton scan kernel against the sequential reference, on CPU tensors under
``TRITON_INTERPRET=1`` (the interpreter must be chosen before Triton is imported, so the
check runs in a subprocess)."""

import os
import subprocess
import sys
import textwrap

import importlib.util

import pytest

# Only look for Triton here: importing it in this process after TensorFlow (which the
# Keras tests load) crashes the interpreter; the checks import it in their subprocess.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import torch
    from hwbptt.torch import triton_scan
    from hwbptt.torch.scan import linear_scan_reference
    assert triton_scan.available()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for T, M, K in ((1, 1, 5), (7, 2, 33), (20, 3, 16)):
            for reverse in (False, True):
                big = torch.rand(T, M, K + 4, generator=g, dtype=dtype)
                a = big[:, :, 2 : 2 + K]  # strided view
                b = torch.randn(M, T, K, generator=g, dtype=dtype).transpose(0, 1)  # non-contiguous
                got = triton_scan.scan_3d(a, b, reverse)
                ref = linear_scan_reference(a.contiguous(), b.contiguous(), reverse=reverse)
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    print("TRITON_SCAN_OK")
    """
)


def test_triton_scan_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "TRITON_SCAN_OK" in done.stdout, done.stderr[-3000:]
