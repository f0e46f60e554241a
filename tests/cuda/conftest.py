"""The CUDA tests: every Triton kernel and the layers' CUDA paths on real CUDA tensors.

Every test here carries the ``cuda`` marker and runs on a GPU; without one it is skipped,
with the reason. ``python -m hwbptt gpucheck`` runs them on the GPU it is lent. Its
``--dry-run`` rehearses them on the CPU so that the one device run cannot fail on a typo:
it sets ``HWBPTT_GPUCHECK_DEVICE=cpu`` and ``TRITON_INTERPRET=1`` (Triton's interpreter
runs the kernels on CPU tensors), and the tests take their small sizes. In a dry run the
CPU takes the route CUDA tensors take (``cuda_route``): the fused forward with the gates
rebuilt in the backward, the fast tapes on the Triton gate kernels, the Triton scan. It
checks the test code and that route, not the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent

DRY_RUN = os.environ.get("HWBPTT_GPUCHECK_DEVICE", "").strip().lower() == "cpu"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _skip_reason() -> str | None:
    if DRY_RUN:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "HWBPTT_GPUCHECK_DEVICE=cpu (the dry run) needs TRITON_INTERPRET=1 set before Triton is imported"
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU (python -m hwbptt gpucheck runs these on one; --dry-run rehearses them on the CPU)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    for item in items:
        if HERE not in pathlib.Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.cuda)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cpu" if DRY_RUN else "cuda")


@pytest.fixture(scope="session")
def small() -> bool:
    """The dry run's sizes (Triton's interpreter runs a kernel in NumPy, step by step)."""
    return DRY_RUN


@pytest.fixture(scope="session")
def checks():
    """``tests/triton_cells_checks.py``: the eager references of the gate kernels and their
    inputs, shared with the interpreter checks (loaded by path: ``tests`` is no package)."""
    spec = importlib.util.spec_from_file_location("_hwbptt_triton_cells_checks", HERE.parent / "triton_cells_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def triton_kernels():
    """``(triton_cells, triton_scan)``, or a skip where Triton is not installed."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    from hwbptt.torch import triton_scan
    from hwbptt.torch import triton_cells

    return triton_cells, triton_scan


@pytest.fixture(autouse=True)
def cuda_route(monkeypatch):
    """Dry run only: CPU float32 tensors take CUDA's route through the layers. ``fused``'s
    four functions become the Triton kernels (as its CUDA dispatch does), the scan takes the
    Triton kernel where it would take the C one, and the forward that keeps the gates (CPU
    only) is off, so the backward rebuilds them as on CUDA."""
    if not (DRY_RUN and HAVE_TRITON):
        yield
        return
    import hwbptt.torch.scan as scan
    from hwbptt.torch import fused, reserve, triton_cells

    for name in ("lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates"):
        monkeypatch.setattr(fused, name, getattr(triton_cells, name))
    backend = scan.scan_backend
    monkeypatch.setattr(scan, "scan_backend", lambda a, b: "triton" if backend(a, b) == "cpu-kernel" else backend(a, b))
    with reserve.use(False):
        yield


@pytest.fixture(autouse=True)
def full_float32(monkeypatch):
    """Float32 tests compare against float64 references: TF32 (which cuDNN and cuBLAS may use
    for float32 on this GPU) would round the matmul inputs to 10 mantissa bits. The bench,
    not these tests, measures the default settings. ``HWBPTT_TRITON`` and
    ``HWBPTT_KERNELS`` are cleared so that the tests see the Triton kernels."""
    monkeypatch.delenv("HWBPTT_TRITON", raising=False)
    monkeypatch.delenv("HWBPTT_KERNELS", raising=False)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
