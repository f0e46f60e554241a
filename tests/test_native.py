"""The kernel loader: it loads only the build this CPU runs, only from a file and folder
nobody else can write, and each build it may load gives the eager reference's results."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwbptt.torch import kernels_status, native

needs_kernels = pytest.mark.skipif(native.ops() is None, reason="the compiled kernels are not built here")


def _planted(tmp_path: Path) -> Path:
    """A copy of the loaded build in a fresh private folder (as the loader would find it)."""
    folder = tmp_path / "pkg"
    folder.mkdir(mode=0o700)
    src = Path(native._state["path"])
    dst = folder / src.name
    shutil.copy2(src, dst)
    os.chmod(dst, 0o755)
    return dst


@needs_kernels
def test_loader_accepts_a_private_copy(tmp_path):
    dst = _planted(tmp_path)
    level, path, why = native.select(dst.parent)
    assert (level, path, why) == (native._state["level"], dst, "")


@needs_kernels
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_loader_refuses_a_file_or_folder_owned_by_someone_else(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    dst = _planted(tmp_path)
    os.chown(dst, nobody, -1)
    level, path, why = native.select(dst.parent)
    assert path is None and f"owned by uid {nobody}" in why and dst.name in why
    os.chown(dst, 0, -1)
    os.chown(dst.parent, nobody, -1)
    level, path, why = native.select(dst.parent)
    assert path is None and f"folder {dst.parent} is owned by uid {nobody}" in why


@needs_kernels
@pytest.mark.parametrize("target", ["file", "folder"])
def test_loader_refuses_what_others_can_write(tmp_path, target):
    dst = _planted(tmp_path)
    os.chmod(dst if target == "file" else dst.parent, 0o777)
    level, path, why = native.select(dst.parent)
    assert path is None and "writable by group or others (mode 777)" in why and f"kernel {target}" in why


@needs_kernels
def test_loader_refuses_a_link(tmp_path):
    real = _planted(tmp_path)
    folder = tmp_path / "linked"
    folder.mkdir(mode=0o700)
    (folder / real.name).symlink_to(real)
    level, path, why = native.select(folder)
    assert path is None and "not a regular file" in why


def test_loader_without_builds_says_why(tmp_path):
    level, path, why = native.select(tmp_path)
    assert path is None and "no compiled kernels were built" in why


_CHECK_LEVEL = r"""
import torch
from hwbptt.torch import native
ops = native.ops()
assert native._state["level"] == "{level}", native.status()
assert int(ops.build_info()) == {info}
g = torch.Generator().manual_seed(0)
for H in (7, 16, 17, 64):
    pre = torch.randn(3, 2, 4 * H, generator=g) * 50
    pre[0, 0, :H] = -1e30
    pre[1, 1, H:] = float("nan")
    c0 = torch.randn(2, H, generator=g)
    got = pre.clone()
    c, tc, gain = (torch.empty(3, 2, H) for _ in range(3))
    ops.lstm_gates_(got, c0, c, tc, gain)
    i, f, gg, o = pre.split(H, -1)
    want = torch.cat([torch.sigmoid(i), torch.sigmoid(f), torch.tanh(gg), torch.sigmoid(o)], -1)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=4e-6, atol=2e-7)
print("level ok")
"""


@needs_kernels
@pytest.mark.parametrize("level, info", [("default", 0), ("avx2", 1), ("avx512", 2)])
def test_every_build_this_cpu_runs_gives_the_reference_results(level, info):
    """Force each instruction-set level in a fresh process (``ATEN_CPU_CAPABILITY``, which
    the loader honours as PyTorch's own dispatch does): the loader picks that build and
    its gates equal eager torch's. Levels this CPU lacks, or not built here, are skipped."""
    folder = Path(native._state["path"]).parent
    if not list(folder.glob(f"_kernels_{level}.*so")):
        pytest.skip(f"no {level} build here")
    flags = native._cpu_flags() or set()
    needs = dict((s, n) for s, _, n in native.LEVELS)[level]
    if not set(needs) <= flags:
        pytest.skip(f"this CPU lacks {sorted(set(needs) - flags)}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level)
    out = subprocess.run([sys.executable, "-c", _CHECK_LEVEL.format(level=level, info=info)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "level ok" in out.stdout


def test_kernels_disabled_by_environment_runs_plain_torch():
    code = ("from hwbptt.torch import native, kernels_status, fused, reserve; "
            "assert native.ops() is None and not fused.available() and not reserve.available(); "
            "print(kernels_status()['kernels'], '|', native.status()['why'])")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, HWBPTT_KERNELS="0"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "plain PyTorch | disabled by HWBPTT_KERNELS=0 (plain PyTorch)"


@needs_kernels
def test_kernels_status_names_the_build():
    st = kernels_status()
    assert st["kernels"] == f"compiled C++ operators ({native._state['level'].upper()} build, built at install)"
    assert st["gate kernels (CPU)"] == "compiled"
    from hwbptt.torch import dispatch

    assert st["LSTM k=1 (CPU)"].startswith(f"one compiled time loop up to H = {dispatch.LOOP_MAX_H}")
    assert st["LSTM exact mode (CPU)"].startswith("compiled adjoint up to H = ")


def test_the_scan_splits_over_threads_with_one_threads_result(torch_threads):
    """The same scan on one thread and on two (the lanes split over PyTorch's pool)."""
    from hwbptt.torch.scan import linear_scan

    a, b = torch.rand(64, 8, 128), torch.randn(64, 8, 128)
    with torch_threads(1):
        one = linear_scan(a, b, reverse=True)
    with torch_threads(2):
        two = linear_scan(a, b, reverse=True)
    assert torch.equal(one, two)


@needs_kernels
def test_plan_is_the_one_decision(monkeypatch):
    """``dispatch.plan``: exact mode takes the compiled adjoint for the GRU at every size
    and for the LSTM up to H = 256 (wider, the parent's exact gradient, measured faster);
    no gradient wanted or an empty input: the parent; Highway mode keeps the gates. The
    layers ask the same question: a wide LSTM in exact mode runs the parent's autograd."""
    from hwbptt.torch import HighwayLSTM, dispatch
    from hwbptt.torch.dispatch import plan

    monkeypatch.setattr(dispatch, "EXACT_LSTM_MAX_H", 256)  # the suite raises it (conftest)

    def tensors(T, H, lstm=True):
        x, h0 = torch.randn(T, 2, 3), torch.randn(2, H)
        w = [torch.randn(4 * H if lstm else 3 * H, 3), torch.randn(4 * H if lstm else 3 * H, H)]
        return (x, h0, torch.randn(2, H), *w) if lstm else (x, h0, *w)

    for T in (2, 300):
        assert plan("lstm", tensors(T, 257), exact=True, has_proj=False, wants_grad=True).backward == "parent"
        assert plan("lstm", tensors(T, 256), exact=True, has_proj=False, wants_grad=True).backward == "exact-adjoint"
    assert plan("gru", tensors(8, 257, lstm=False), exact=True, has_proj=False, wants_grad=True).backward == "exact-adjoint"
    assert plan("lstm", tensors(8, 64), exact=True, has_proj=True, wants_grad=True).backward == "parent"
    p = plan("lstm", tensors(8, 64), exact=False, has_proj=False, wants_grad=True)
    assert (p.forward, p.backward) == ("reserve", "highway") and p.kernels.startswith("compiled C++")
    assert plan("lstm", tensors(8, 64), exact=False, has_proj=False, wants_grad=False).backward == "parent"

    x = torch.randn(5, 2, 3, requires_grad=True)
    y_wide, _ = HighwayLSTM(3, 257, iterations=None)(x)
    y_parent, _ = torch.nn.LSTM(3, 257)(x)
    assert type(y_wide.grad_fn).__name__ == type(y_parent.grad_fn).__name__  # the parent's own kernel and backward
    y_narrow, _ = HighwayLSTM(3, 8, iterations=None)(x)
    assert type(y_narrow.grad_fn).__name__ != type(y_parent.grad_fn).__name__  # the compiled adjoint's Function


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")
def test_tensorflow_first_then_a_training_step_imports_no_triton():
    """Eager training steps call the layers' operator implementations directly: no
    ``torch._dynamo`` import, so no Triton, which crashes a process that imported
    TensorFlow first (here: the process survives, and Triton stays unloaded)."""
    code = ("import tensorflow, sys, torch\n"
            "from hwbptt.torch import HighwayGRU, HighwayLSTM\n"
            "for m in (HighwayLSTM(3, 4), HighwayGRU(3, 4, iterations=None)):\n"
            "    y, _ = m(torch.randn(5, 2, 3)); y.sum().backward()\n"
            "print('triton' in sys.modules, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.strip().splitlines()[-1] == "False False"


@needs_kernels
def test_kernels_run_on_pytorchs_own_threads(torch_threads):
    """The operators' loops split over PyTorch's intra-op threads (the build has OpenMP),
    on the OpenMP runtime PyTorch loaded: no second runtime is mapped into the process."""
    def gomp_files():
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "gomp" in line}

    before = gomp_files()
    with torch_threads(2):
        assert int(native.ops().parallel_threads()) == 2
    with torch_threads(1):
        assert int(native.ops().parallel_threads()) == 1
    assert gomp_files() == before
