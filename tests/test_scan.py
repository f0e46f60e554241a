"""The linear scan against its sequential reference."""

import pytest
import torch

from hwbptt.torch.scan import linear_scan, linear_scan_reference


def _gates(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=dtype)
    b = torch.randn(shape, generator=g, dtype=dtype)
    return a, b


@pytest.mark.parametrize("T", [1, 2, 3, 7, 8, 9, 31, 64, 257])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_reference(T, reverse):
    a, b = _gates((T, 3, 4))
    torch.testing.assert_close(linear_scan(a, b, reverse=reverse), linear_scan_reference(a, b, reverse=reverse), rtol=1e-12, atol=1e-12)


def test_recurrence_holds_elementwise():
    a, b = _gates((50, 2))
    u = linear_scan(a, b)
    torch.testing.assert_close(u[0], b[0])
    torch.testing.assert_close(u[1:], a[1:] * u[:-1] + b[1:])
    r = linear_scan(a, b, reverse=True)
    torch.testing.assert_close(r[-1], b[-1])
    torch.testing.assert_close(r[:-1], a[:-1] * r[1:] + b[:-1])


@pytest.mark.parametrize("dim", [1, -1])
def test_other_dims_and_noncontiguous(dim):
    a, b = _gates((4, 37, 5))
    a_t, b_t = a.transpose(0, 2), b.transpose(0, 2)  # non-contiguous views
    d = dim if dim >= 0 else b_t.dim() + dim
    got = linear_scan(a_t, b_t, dim=d)
    ref = linear_scan_reference(a_t.contiguous(), b_t.contiguous(), dim=d)
    torch.testing.assert_close(got, ref)


def test_broadcast_a():
    a = torch.full((1,), 0.5, dtype=torch.float64)
    b = torch.ones(10, 2, dtype=torch.float64)
    u = linear_scan(a, b)
    expected = torch.tensor([sum(0.5**j for j in range(t + 1)) for t in range(10)], dtype=torch.float64)
    torch.testing.assert_close(u[:, 0], expected)


def test_long_sequence_stable():
    T = 100_000
    a, b = _gates((T, 2), dtype=torch.float32, seed=1)
    u = linear_scan(a, b)
    assert torch.isfinite(u).all()
    ref = linear_scan_reference(a.double(), b.double())
    torch.testing.assert_close(u.double(), ref, rtol=1e-4, atol=1e-4)
    r = linear_scan(a, b, reverse=True)
    torch.testing.assert_close(r.double(), linear_scan_reference(a.double(), b.double(), reverse=True), rtol=1e-4, atol=1e-4)


def test_gradient_matches_reference():
    a, b = _gates((13, 3))
    a.requires_grad_(True)
    b.requires_grad_(True)
    w = torch.randn(13, 3, dtype=torch.float64)
    ga = torch.autograd.grad((linear_scan(a, b, reverse=True) * w).sum(), (a, b))
    gr = torch.autograd.grad((linear_scan_reference(a, b, reverse=True) * w).sum(), (a, b))
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    a, b = _gates((4096, 4), dtype=torch.float32, seed=2)
    a = 0.999 + 0.001 * a  # long memory: rounding errors would pile up in half precision
    got = linear_scan(a.to(dtype), b.to(dtype))
    assert got.dtype == dtype
    ref = linear_scan_reference(a.to(dtype).double(), b.to(dtype).double())
    err = ((got.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err < 1e-2


def test_empty_time_axis():
    a, b = torch.zeros(0, 3), torch.zeros(0, 3)
    assert linear_scan(a, b).shape == (0, 3)


def test_bad_input():
    with pytest.raises(ValueError, match="does not broadcast"):
        linear_scan(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="dim=5"):
        linear_scan(torch.ones(3), torch.ones(3), dim=5)
    with pytest.raises(TypeError, match="tensors"):
        linear_scan([1.0], torch.ones(1))


# ----------------------------------------------------------------------------- scan of a sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 9, 40])
def test_reverse_scan_sum_matches_reference(dtype, T):
    from hwbptt.torch.scan import reverse_scan_sum

    g = torch.Generator().manual_seed(T)
    big = torch.rand(T, 3, 30, generator=g)
    a = big[:, :, 3:20].to(dtype)  # strided, as the tapes pass f_{t+1}
    b = torch.randn(3, T, 17, generator=g).transpose(0, 1).to(dtype)  # non-contiguous
    c = torch.randn(T, 3, 17, generator=g).to(dtype)
    ref = linear_scan_reference(a.float(), b.float() + c.float(), reverse=True)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reverse_scan_sum(a, b, c).float(), ref, **tol)
    out = torch.full((T, 3, 17), float("nan"), dtype=dtype)
    got = reverse_scan_sum(a, b, c, out)
    torch.testing.assert_close(got.float(), ref, **tol)
    assert got.dtype == dtype and got.shape == b.shape


def test_reverse_scan_sum_writes_into_out_on_the_cpu_kernel():
    from hwbptt.torch import cpu_scan
    from hwbptt.torch.scan import reverse_scan_sum

    if not cpu_scan.available():
        pytest.skip("no C compiler: kernels not built")
    a, b, c = torch.rand(6, 4, 5), torch.randn(6, 4, 5), torch.randn(6, 4, 5)
    out = torch.empty(6, 4, 5)
    assert reverse_scan_sum(a, b, c, out).data_ptr() == out.data_ptr()


class _OpsWithoutScanSum:
    """TORCH_OPS without the optional in-place method: the engine's plain path."""

    def __init__(self):
        from hwbptt.torch.scan import TORCH_OPS

        self.reverse_scan, self.shift_next, self.norm = TORCH_OPS.reverse_scan, TORCH_OPS.shift_next, TORCH_OPS.norm


@pytest.mark.parametrize("k", [0, 1, 2, 3, 6])
@pytest.mark.parametrize("mode", ["plain", "record", "tol", "gamma"])
def test_engine_in_place_scan_path_equals_plain_path(k, mode):
    """The engine reuses the estimate two iterations back as the scan's output: the
    iterates must be those of the path that allocates a new array each iteration."""
    from hwbptt import highway_adjoint
    from hwbptt.torch.scan import TORCH_OPS

    g = torch.Generator().manual_seed(k)
    T, N = 12, 7
    a = torch.rand(T, N, generator=g, dtype=torch.float64)
    local = torch.randn(T, N, generator=g, dtype=torch.float64)
    J = torch.randn(T, N, N, generator=g, dtype=torch.float64) * 0.3

    def block(u):  # v_t = u_{t+1} J_{t+1}; reads u only within the call
        v = torch.einsum("tn,tnm->tm", u[1:], J[1:])
        return torch.cat([v, torch.zeros_like(u[:1])])

    kw = {"plain": {}, "record": {"record": True}, "tol": {"tol": 1e-3}, "gamma": {"gamma": 0.5}}[mode]
    got, d1 = highway_adjoint(a, local, block, iterations=k, ops=TORCH_OPS, **kw)
    ref, d2 = highway_adjoint(a, local, block, iterations=k, ops=_OpsWithoutScanSum(), **kw)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert d1.iterations == d2.iterations and d1.update_norms == pytest.approx(d2.update_norms)


def test_core_reference_is_numpy_and_matches_torch_scan():
    """The core's reference (NumPy, no framework) and the torch scan solve one recurrence."""
    import numpy as np

    from hwbptt import linear_scan_reference as core_reference

    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(23, 4, 5, generator=g, dtype=torch.float64), torch.randn(23, 4, 5, generator=g, dtype=torch.float64)
    for reverse in (False, True):
        for axis in (0, 1):
            got = core_reference(a.numpy(), b.numpy(), reverse=reverse, axis=axis)
            assert isinstance(got, np.ndarray)
            np.testing.assert_allclose(got, linear_scan(a, b, reverse=reverse, dim=axis).numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="axis=3"):
        core_reference(a.numpy(), b.numpy(), axis=3)


def test_core_imports_no_framework():
    import subprocess
    import sys

    code = "import hwbptt, sys; assert 'torch' not in sys.modules and 'keras' not in sys.modules and 'tensorflow' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
