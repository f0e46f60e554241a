"""The Triton LSTM/GRU gate kernels (``hwbptt.torch.triton_cells``) against the C kernels
of ``hwbptt.torch.fused`` and the eager torch references, on CPU tensors under
``TRITON_INTERPRET=1``.

The checks (``tests/triton_cells_checks.py``) run once, in a fresh interpreter: the
interpreter mode must be chosen before Triton is imported, and Triton must not be imported
in this process after TensorFlow (loaded by the Keras tests). Each check is reported as
its own test here. A second fresh interpreter compiles the kernels for a GPU (sm_90)
without running them.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

HERE = pathlib.Path(__file__).parent
CHECKS = [
    "check_fused_import_is_triton_free",
    "check_available",
    "check_activations",
    "check_lstm_gates",
    "check_lstm_dpre",
    "check_gru_gates",
    "check_gru_dgates",
    "check_out_contract_rejects",
    "check_half_precision",
    "check_empty",
    "check_fused_dispatch",
    "check_fast_tapes_on_triton_kernels",
    "check_fast_tapes_half_precision",
]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HWBPTT_KERNELS", None)
    done = subprocess.run([sys.executable, str(HERE / "triton_cells_checks.py")], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("TRITON_CELLS_RESULTS ")), None)
    assert done.returncode == 0 and line is not None, (done.stdout[-2000:], done.stderr[-3000:])
    return json.loads(line.split(" ", 1)[1])


def test_every_check_ran(results):
    assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_triton_cells(results, name):
    assert results.get(name) == "ok", results.get(name)


def test_kernels_compile_for_a_gpu(tmp_path):
    """Triton compiles every kernel to an sm_90 CUDA binary (no GPU needed; none is run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HWBPTT_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(HERE / "triton_cells_checks.py"), "compile"], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("TRITON_CELLS_COMPILE ")), None)
    assert done.returncode == 0 and line is not None, (done.stdout[-2000:], done.stderr[-3000:])
    result = json.loads(line.split(" ", 1)[1])
    if result.startswith("skip:"):
        pytest.skip(result)
    assert result == "ok", result
