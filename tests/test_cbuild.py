"""How the compiled kernels are split over the cores (``hwbptt.kernels.cbuild.run_parallel``):
on PyTorch's own OpenMP threads, on Python threads, or in one call, the results are the same."""

import os
import shutil

import pytest
import torch

from hwbptt.kernels import cbuild, cpu_scan
from hwbptt.scan import linear_scan_reference
from hwbptt.torch import fused, reserve
from hwbptt.torch.lstm_math import FastLSTMTape, LSTMWeights

HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_kernels = pytest.mark.skipif(not cpu_scan.available(), reason="no C compiler: kernels not built")


def _gomp_files():
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "/libgomp" in line}


@needs_kernels
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see the loaded runtimes")
def test_openmp_launcher_runs_on_pytorchs_runtime(torch_threads):
    """Where PyTorch brings GNU libgomp (its Linux wheels do), the launcher joins it: no
    second OpenMP runtime is loaded, and the status says OpenMP."""
    torch_gomp = _gomp_files()
    if not torch_gomp:
        pytest.skip("this PyTorch does not use GNU libgomp")
    with torch_threads(2):
        cpu_scan.scan_3d(torch.rand(64, 8, 128), torch.rand(64, 8, 128), True)  # large enough to split
    assert cbuild.status()["threads"] == cbuild.threading_mode() == "OpenMP (PyTorch's runtime)"
    assert _gomp_files() == torch_gomp


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_same_on_openmp_python_threads_and_one_call(reverse, torch_threads):
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(200, 9, 64, generator=g), torch.randn(200, 9, 64, generator=g)
    with torch_threads(2):
        calls = cbuild.CALLS[0]
        with cbuild.use_openmp(True):
            u_omp = cpu_scan.scan_3d(a, b, reverse)
        with cbuild.use_openmp(False):
            u_py = cpu_scan.scan_3d(a, b, reverse)
        assert cbuild.CALLS[0] == calls + 2
    with torch_threads(1):
        u_one = cpu_scan.scan_3d(a, b, reverse)
    # Each lane is computed by one thread in the same order whatever the split: bitwise equal.
    assert torch.equal(u_omp, u_one) and torch.equal(u_py, u_one)
    torch.testing.assert_close(u_one, linear_scan_reference(a, b, reverse=reverse, dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not reserve.available(), reason="reserve forwards not built (no C compiler or no exported BLAS)")
@pytest.mark.parametrize("openmp", [True, False])
def test_reserve_forward_split_over_the_batch_matches_fused_kernel(openmp, torch_threads):
    """The reserve forward splits the batch over the threads (each runs every step for its
    rows, with its own BLAS call); the states equal the fused kernel's, and one call's."""
    g = torch.Generator().manual_seed(5)
    T, B, I, H = 64, 9, 6, 32  # 64·9·4H elements: enough work for two threads; odd B splits 4/5
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    w = LSTMWeights(r(4 * H, I), r(4 * H, H), r(4 * H), r(4 * H), None)
    x, h0, c0 = r(T, B, I), r(B, H), r(B, H)
    with torch_threads(2), cbuild.use_openmp(openmp):
        tape, y = FastLSTMTape.from_reserve(x, h0, c0, w)
    with torch_threads(1):
        tape1, y1 = FastLSTMTape.from_reserve(x, h0, c0, w)
    y_ref, _, c_n = torch._VF.lstm(x, (h0[None], c0[None]), [w.w_ih, w.w_hh, w.b_ih, w.b_hh], True, 1, 0.0, False, False, False)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tape.c[-1], c_n[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tape.gates, tape1.gates, rtol=1e-6, atol=1e-6)


def test_use_openmp_names_a_bad_argument():
    with pytest.raises(TypeError, match=r"use_openmp\(on\) takes a bool, got on='yes'"):
        with cbuild.use_openmp("yes"):
            pass


@pytest.mark.skipif(not HAVE_CC or not fused.available(), reason="no C compiler")
def test_task_arguments_reach_the_kernel(torch_threads):
    """A task unpacks its int64 arguments: a GRU gate pass through ``run_parallel`` equals
    the eager expression, whether split or not."""
    g = torch.Generator().manual_seed(2)
    T, B, H = 40, 8, 48
    gi, gh = torch.randn(T, B, 3 * H, generator=g), torch.randn(T, B, 3 * H, generator=g)
    r = torch.sigmoid(gi[..., :H] + gh[..., :H])
    z = torch.sigmoid(gi[..., H : 2 * H] + gh[..., H : 2 * H])
    n = torch.tanh(gi[..., 2 * H :] + r * gh[..., 2 * H :])
    for threads in (1, 2):
        out = gi.clone()
        with torch_threads(threads):
            fused.gru_gates(out, gh)
        torch.testing.assert_close(out, torch.cat([r, z, n], -1), rtol=1e-5, atol=1e-5)
