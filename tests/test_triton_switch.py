"""The way out of a Triton that cannot run on the user's GPU, checked on the CPU:
``HWBPTT_TRITON=0`` turns both Triton modules off (so CUDA tensors take the eager torch
paths: ``fused.supports`` and ``scan_backend`` decline them), and a kernel that fails to
compile raises a ``RuntimeError`` naming the kernel and that switch, with Triton's error
chained. Stand-ins play the CUDA tensors and the failing kernel; no kernel runs.
(Triton is imported in this process: ``tests/conftest.py`` imports it before any test
can load TensorFlow.)"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from hwbptt.torch import triton_scan  # noqa: E402
from hwbptt.torch.scan import scan_backend  # noqa: E402
from hwbptt.torch import fused, triton_cells  # noqa: E402


def _cuda_standin(dtype=torch.float32):
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, requires_grad=False)


@pytest.fixture
def interpreter(monkeypatch):
    """``available()`` true without a GPU: the interpreter counts as somewhere to run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("HWBPTT_TRITON", raising=False)
    monkeypatch.delenv("HWBPTT_KERNELS", raising=False)


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_hwbptt_triton_0_switches_both_modules_off(interpreter, monkeypatch, value):
    a, b = _cuda_standin(), _cuda_standin()
    assert triton_cells.available() and triton_scan.available()
    assert fused.supports(a, b) and scan_backend(a, b) == "triton"
    monkeypatch.setenv("HWBPTT_TRITON", value)
    assert not triton_cells.available() and not triton_scan.available()
    assert not fused.supports(a, b)
    assert scan_backend(a, b) == "torch"
    monkeypatch.setenv("HWBPTT_TRITON", "1")
    assert triton_cells.available() and triton_scan.available()


class _FailsToCompile:
    """Launching it fails as a kernel Triton cannot compile for this GPU does."""

    def __getitem__(self, grid):
        def launch(*args, **meta):
            raise ValueError("simulated: ptxas fatal: unsupported architecture\nsecond line")

        return launch


@pytest.mark.parametrize("name", ["_lstm_gates_kernel", "_lstm_dpre_kernel", "_gru_gates_kernel", "_gru_dgates_kernel"])
def test_a_gate_kernel_that_does_not_compile_is_named(interpreter, monkeypatch, name):
    monkeypatch.setattr(triton_cells, name, _FailsToCompile())
    T, B, H = 2, 3, 4
    g4, g3, h = torch.rand(T, B, 4 * H), torch.rand(T, B, 3 * H), torch.rand(T, B, H)
    calls = {
        "_lstm_gates_kernel": lambda: triton_cells.lstm_gates(g4, h[0]),
        "_lstm_dpre_kernel": lambda: triton_cells.lstm_dpre(h, h, g4, h, h[0], h),
        "_gru_gates_kernel": lambda: triton_cells.gru_gates(g3, g3.clone()),
        "_gru_dgates_kernel": lambda: triton_cells.gru_dgates(h, g3, g3, h[0], h, True),
    }
    with pytest.raises(RuntimeError) as info:
        calls[name]()
    text = str(info.value)
    assert name in text and "hwbptt.torch.triton_cells" in text
    assert "HWBPTT_TRITON=0" in text and "eager torch path" in text
    assert "ValueError: simulated: ptxas fatal: unsupported architecture" in text and "second line" not in text
    assert isinstance(info.value.__cause__, ValueError)


def test_the_scan_kernel_that_does_not_compile_is_named(interpreter, monkeypatch):
    monkeypatch.setattr(triton_scan, "_scan_kernel", _FailsToCompile())
    with pytest.raises(RuntimeError, match=r"_scan_kernel \(hwbptt\.torch\.triton_scan\).*HWBPTT_TRITON=0"):
        triton_scan.scan_3d(torch.rand(3, 1, 4), torch.rand(3, 1, 4), True)


def test_out_of_memory_is_not_relabelled(interpreter, monkeypatch):
    class OutOfMemory:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise torch.cuda.OutOfMemoryError("simulated")

            return launch

    monkeypatch.setattr(triton_scan, "_scan_kernel", OutOfMemory())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        triton_scan.scan_3d(torch.rand(3, 1, 4), torch.rand(3, 1, 4), False)


def test_the_scan_refuses_offsets_past_32_bits():
    """``_scan_kernel``'s offsets are int32 products: a scan reaching past 2^31 elements
    is refused with the way out, not run on wrapped offsets."""
    T, M, K = 4096, 128, 512  # the bench's largest: 2^28 elements
    assert triton_scan.offsets_fit(T, M, K, M * K, K, M * K, K)
    assert triton_scan.offsets_fit(2**31 // (M * K), M, K, M * K, K, M * K, K)  # exactly 2^31 elements: last offset 2^31 - 1
    assert not triton_scan.offsets_fit(2**31 // (M * K) + 1, M, K, M * K, K, M * K, K)
    assert not triton_scan.offsets_fit(3, 1, 4, 2**30, 0, 4, 4)  # a strided input alone
    a = torch.rand(3, 1, 4).as_strided((3, 1, 4), (4, 4, 1))
    assert triton_scan.offsets_fit(3, 1, 4, *a.stride()[:2], *a.stride()[:2])
