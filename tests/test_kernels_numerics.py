"""The compiled operators against plain eager-torch expressions of the same formulas, at
widths that run the vector bodies and their remainders (H = 1, 7, 8, 16, 17, 64, 257), on
ordinary, saturated, huge (±1e30), infinite and NaN inputs, float32 and float64: every
output equal to the reference within rounding, NaN exactly where the reference has NaN,
and never NaN from a finite input."""

import subprocess
import sys

import pytest
import torch

from hwbptt.torch import native

needs_kernels = pytest.mark.skipif(native.ops() is None, reason="the compiled kernels are not built here")
WIDTHS = [1, 7, 8, 16, 17, 64, 257]
DTYPES = [torch.float32, torch.float64]
SPECIAL = [0.0, 1.0, -1.0, 12.0, -12.0, 40.0, -40.0, 88.5, -88.8, -100.0, 200.0, -1e30, 1e30]
NONFINITE = [float("inf"), float("-inf"), float("nan")]


def tol(dtype):
    return dict(rtol=4e-6, atol=2e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)


def values(shape, dtype, g, nonfinite=True):
    """Random normals scaled up, with every special value planted at many places."""
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 6).to(dtype)
    flat = x.view(-1)
    pool = SPECIAL + (NONFINITE if nonfinite else [])
    idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 3)]
    flat[idx] = torch.tensor(pool, dtype=dtype)[torch.arange(len(idx)) % len(pool)]
    return x


def assert_near(got, want, dtype):
    torch.testing.assert_close(got, want, equal_nan=True, **tol(dtype))


def ref_lstm_gates(pre, c0):
    T, B, H4 = pre.shape
    H = H4 // 4
    i, f, g, o = torch.sigmoid(pre[..., :H]), torch.sigmoid(pre[..., H:2 * H]), torch.tanh(pre[..., 2 * H:3 * H]), torch.sigmoid(pre[..., 3 * H:])
    cs, c = [], c0
    for t in range(T):
        c = f[t] * c + i[t] * g[t]
        cs.append(c)
    c = torch.stack(cs)
    th = torch.tanh(c)
    return torch.cat([i, f, g, o], -1), c, th, o * (1 - th * th)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", WIDTHS)
def test_lstm_gates_match_eager(H, dtype):
    g = torch.Generator().manual_seed(H)
    T, B = 5, 3
    pre, c0 = values((T, B, 4 * H), dtype, g), values((B, H), dtype, g, nonfinite=False)
    want = ref_lstm_gates(pre, c0)
    got_pre = pre.clone()
    c, tc, gain = (torch.empty(T, B, H, dtype=dtype) for _ in range(3))
    native.ops().lstm_gates_(got_pre, c0, c, tc, gain)
    for got, ref in zip((got_pre, c, tc, gain), want):
        assert_near(got, ref, dtype)


def _kernel_tanh(x):
    """tanh of ``x`` (float32/64, 1-D, length a multiple of 256) by the compiled kernels'
    tanh: the GRU gate pass with ``gh = -0`` writes ``n = tanh(gi_n + r·(-0)) = tanh(gi_n)``
    (``-0`` keeps ``gi_n = -0`` negative, which ``+0`` would not)."""
    H = 256
    gi = torch.zeros(1, x.numel() // H, 3 * H, dtype=x.dtype)
    gi[..., 2 * H:] = x.view(1, -1, H)
    native.ops().gru_gates_(gi, torch.full_like(gi, -0.0))
    return gi[..., 2 * H:].reshape(-1)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tanh_within_1_5_ulp_over_every_magnitude(dtype):
    """Against float64 (float32; the kernels' own Cephes-form tanh) or torch's tanh (float64:
    Sleef's, the function the kernels call there): every magnitude from the subnormals to
    past saturation, both signs, the branch point 0.625 and its neighbours, ±0, ±Inf, NaN."""
    import numpy as np

    ftype = np.float32 if dtype == torch.float32 else np.float64
    tiny = 1e-45 if dtype == torch.float32 else 5e-324
    mags = np.concatenate([np.logspace(np.log10(tiny), np.log10(30), 2_000_000), np.linspace(0, 10, 1_000_000),
                           [0.625, np.nextafter(ftype(0.625), ftype(0)), np.nextafter(ftype(0.625), ftype(1)),
                            9.0, 9.01, 19.1, 44.0, 89.0, 1e30]]).astype(ftype)
    vals = np.concatenate([mags, -mags])
    vals = np.concatenate([vals, np.zeros((-len(vals)) % 256, ftype)])
    got = _kernel_tanh(torch.from_numpy(vals)).numpy()
    if dtype == torch.float32:
        want = np.tanh(vals.astype(np.float64))
        ulps = np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        assert ulps.max() <= 1.5, (ulps.max(), vals[ulps.argmax()])
    else:
        want = torch.tanh(torch.from_numpy(vals)).numpy()
        ulps = np.abs(got - want) / np.spacing(np.abs(want))
        assert ulps.max() <= 2.0, (ulps.max(), vals[ulps.argmax()])
    assert np.array_equal(np.signbit(got), np.signbit(vals))  # -0 -> -0, odd everywhere
    assert np.all(np.abs(got) <= 1.0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0] + [0.0] * 251, dtype=dtype)
    out = _kernel_tanh(special)[:5]
    assert torch.isnan(out[0]) and out[1] == 1.0 and out[2] == -1.0
    assert out[3] == 0.0 and not torch.signbit(out[3]) and out[4] == 0.0 and torch.signbit(out[4])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", WIDTHS)
def test_gates_saturate_without_nan_from_finite_input(H, dtype):
    """Pre-activations far below -88.7 (where exp(-x) overflows in float32): the gates are
    0, 1 or ±1 exactly as eager torch gives, and nothing is NaN."""
    g = torch.Generator().manual_seed(100 + H)
    T, B = 3, 2
    pre = values((T, B, 4 * H), dtype, g, nonfinite=False)
    pre[0] = -1e30
    pre[1] = torch.where(pre[1] > 0, torch.full_like(pre[1], 1e4), torch.full_like(pre[1], -1e4))
    c0 = torch.zeros(B, H, dtype=dtype)
    out = [pre.clone()] + [torch.empty(T, B, H, dtype=dtype) for _ in range(3)]
    native.ops().lstm_gates_(out[0], c0, *out[1:])
    for got, ref in zip(out, ref_lstm_gates(pre, c0)):
        assert not torch.isnan(got).any()
        assert_near(got, ref, dtype)
    gi, gh = values((T, B, 3 * H), dtype, g, nonfinite=False), values((T, B, 3 * H), dtype, g, nonfinite=False)
    gi[0] = -1e30
    got = gi.clone()
    native.ops().gru_gates_(got, gh)
    assert not torch.isnan(got).any()
    assert_near(got, ref_gru_gates(gi, gh), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", WIDTHS)
def test_lstm_dpre_matches_eager(H, dtype):
    g = torch.Generator().manual_seed(200 + H)
    T, B = 4, 3
    gates = torch.rand(T, B, 4 * H, generator=g, dtype=torch.float64).to(dtype)
    dc, m, c, tc = (values((T, B, H), dtype, g) for _ in range(4))
    c0 = values((B, H), dtype, g)
    out = torch.empty_like(gates)
    native.ops().lstm_dpre_out(dc, m, gates, c, c0, tc, out)
    i, f, gg, o = gates.split(H, -1)
    cp = torch.cat([c0.unsqueeze(0), c[:-1]])
    want = torch.cat([dc * gg * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - gg * gg), m * tc * o * (1 - o)], -1)
    assert_near(out, want, dtype)


def ref_gru_gates(gi, gh):
    H = gi.shape[-1] // 3
    r = torch.sigmoid(gi[..., :H] + gh[..., :H])
    z = torch.sigmoid(gi[..., H:2 * H] + gh[..., H:2 * H])
    n = torch.tanh(gi[..., 2 * H:] + r * gh[..., 2 * H:])
    return torch.cat([r, z, n], -1)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", WIDTHS)
def test_gru_gates_and_dgates_match_eager(H, dtype):
    g = torch.Generator().manual_seed(300 + H)
    T, B = 4, 3
    gi, gh = values((T, B, 3 * H), dtype, g), values((T, B, 3 * H), dtype, g)
    got = gi.clone()
    native.ops().gru_gates_(got, gh)
    assert_near(got, ref_gru_gates(gi, gh), dtype)

    gates = torch.rand(T, B, 3 * H, generator=g, dtype=torch.float64).to(dtype)
    lam, y = values((T, B, H), dtype, g), values((T, B, H), dtype, g)
    h0 = values((B, H), dtype, g)
    dgh, dgi = torch.empty_like(gates), torch.empty_like(gates)
    native.ops().gru_dgates_out(lam, gates, gh, h0, y, dgh, dgi)
    r, z, n = gates.split(H, -1)
    hp = torch.cat([h0.unsqueeze(0), y[:-1]])
    dn = lam * (1 - z) * (1 - n * n)
    dz = lam * (hp - n) * z * (1 - z)
    dr = dn * gh[..., 2 * H:] * r * (1 - r)
    assert_near(dgh, torch.cat([dr, dz, dn * r], -1), dtype)
    assert_near(dgi, torch.cat([dr, dz, dn], -1), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", WIDTHS)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_sequential_loop(K, dtype, reverse):
    """``hwbptt::scan_out`` with strided ``a``/``b`` views and the optional second ``b``,
    against the step-by-step loop, non-finite values included."""
    from hwbptt.torch.scan import linear_scan_reference

    g = torch.Generator().manual_seed(400 + K)
    T, M = 37, 5
    a = torch.rand(T, M, 2 * K, generator=g, dtype=torch.float64).to(dtype)[..., ::2].contiguous()
    big = values((T, 2 * M, K), dtype, g)
    b = big[:, ::2]  # strided along the lanes
    c = values((T, M, K), dtype, g)
    u = torch.empty(T, M, K, dtype=dtype)
    native.ops().scan_out(a, b, c, reverse, u)
    # The documented order of the sums, u_t = (a_t u + b_t) + c_t: with ±1e30 entries a
    # different order rounds differently.
    want, prev = torch.empty_like(u), None
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        prev = b[t] + c[t] if prev is None else a[t] * prev + b[t] + c[t]
        want[t] = prev
    assert_near(u, want, dtype)
    u2 = torch.empty(T, M, K, dtype=dtype)
    native.ops().scan_out(a, b, None, reverse, u2)
    assert_near(u2, linear_scan_reference(a, b, reverse=reverse), dtype)


@needs_kernels
@pytest.mark.parametrize("product", ["own", "blas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [1, 7, 17, 64, 257])
def test_reserve_forward_and_exact_adjoint_match_eager(H, dtype, product):
    """The time loops (forward keeping the gates, exact LSTM adjoint) against the eager
    recurrence, across widths, with the per-step product on the compiled register-blocked
    kernel and on the BLAS; B = 5 runs its 4-row blocks and the remainder row."""
    from hwbptt.torch.reserve import step_product

    g = torch.Generator().manual_seed(500 + H)
    T, B = 6, 5
    with step_product(product):
        _assert_reserve_forward_and_adjoint(H, dtype, g, T, B)


def _assert_reserve_forward_and_adjoint(H, dtype, g, T, B):
    w_hh = torch.randn(4 * H, H, generator=g, dtype=dtype) / H ** 0.5
    x_proj = torch.randn(T, B, 4 * H, generator=g, dtype=dtype)
    h0, c0 = torch.randn(B, H, generator=g, dtype=dtype), torch.randn(B, H, generator=g, dtype=dtype)
    pre = x_proj.clone()
    y, c, tc, gain = (torch.empty(T, B, H, dtype=dtype) for _ in range(4))
    native.ops().lstm_forward_(pre, w_hh, w_hh.t().contiguous(), h0, c0, y, c, tc, gain)
    h, cc, ys = h0, c0, []
    for t in range(T):
        p = x_proj[t] + h @ w_hh.t()
        i, f, gg, o = torch.sigmoid(p[:, :H]), torch.sigmoid(p[:, H:2 * H]), torch.tanh(p[:, 2 * H:3 * H]), torch.sigmoid(p[:, 3 * H:])
        cc = f * cc + i * gg
        h = o * torch.tanh(cc)
        ys.append(h)
    if dtype == torch.float64:
        assert_near(y, torch.stack(ys), dtype)
    else:  # a K-term product rounds differently in another summation order
        torch.testing.assert_close(y, torch.stack(ys), rtol=1e-5, atol=5e-6)

    lh, lc = torch.randn(T, B, H, generator=g, dtype=dtype), torch.randn(T, B, H, generator=g, dtype=dtype)
    wh, dc, dpre = torch.empty(T, B, H, dtype=dtype), torch.empty(T, B, H, dtype=dtype), torch.empty(T, B, 4 * H, dtype=dtype)
    native.ops().lstm_adjoint_out(pre, c, c0, tc, gain, w_hh, w_hh.t().contiguous(), lh, lc, wh, dc, dpre)
    # Autograd through the eager recurrence: the gradient on the pre-activations.
    xp = x_proj.clone().requires_grad_(True)
    h, cc, hs, cs = h0, c0, [], []
    for t in range(T):
        p = xp[t] + h @ w_hh.t()
        i, f, gg, o = torch.sigmoid(p[:, :H]), torch.sigmoid(p[:, H:2 * H]), torch.tanh(p[:, 2 * H:3 * H]), torch.sigmoid(p[:, 3 * H:])
        cc = f * cc + i * gg
        h = o * torch.tanh(cc)
        hs.append(h)
        cs.append(cc)
    (want,) = torch.autograd.grad((torch.stack(hs) * lh).sum() + (torch.stack(cs) * lc).sum(), xp)
    assert_near(dpre, want, dtype) if dtype == torch.float64 else torch.testing.assert_close(dpre, want, rtol=1e-4, atol=1e-5)


def ref_lstm_highway1(gates, c, c0, tc, gain, w_hh, lh, lc):
    """One Highway iteration of the "gates" split, k = 1, in eager torch (the formulas of
    ``reserve.lstm_highway1``): ``(dc, wh, dpre, (||u0||, ||u1 - u0||, ||u1||))``."""
    from hwbptt.torch.scan import linear_scan_reference

    H = c.shape[-1]
    i, f, gg, o = gates.split(H, -1)
    cp = torch.cat([c0.unsqueeze(0), c[:-1]])
    f_next = torch.cat([f[1:], torch.zeros_like(f[:1])])

    def dpre(d, m):
        return torch.cat([d * gg * i * (1 - i), d * cp * f * (1 - f), d * i * (1 - gg * gg), m * tc * o * (1 - o)], -1)

    local = lc + lh * gain
    u0 = linear_scan_reference(f_next, local, reverse=True)
    p = dpre(u0, lh)
    q = torch.cat([p[1:] @ w_hh, torch.zeros_like(lh[:1])])
    wh = lh + q
    u1 = linear_scan_reference(f_next, local + q * gain, reverse=True)
    norms = [float(torch.linalg.vector_norm(v.double())) for v in (u0, u1 - u0, u1)]
    return u1, wh, dpre(u1, wh), norms


@needs_kernels
@pytest.mark.parametrize("product", ["own", "blas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", WIDTHS)
def test_lstm_highway1_matches_eager(H, dtype, product):
    """The compiled k = 1 time loop against the eager iteration, across widths, on gates
    from pre-activations with saturated, huge and non-finite values (NaN exactly where the
    eager iteration has NaN), with the per-step product on the compiled kernel and on the
    BLAS; B = 5 runs 4-row blocks and the remainder row."""
    from hwbptt.torch import reserve
    from hwbptt.torch.reserve import step_product

    g = torch.Generator().manual_seed(700 + H)
    T, B = 9, 5
    for nonfinite in (False, True):
        pre, c0 = values((T, B, 4 * H), dtype, g, nonfinite=nonfinite), torch.randn(B, H, generator=g, dtype=dtype)
        gates, c, tc, gain = ref_lstm_gates(pre, c0)
        w_hh = torch.randn(4 * H, H, generator=g, dtype=dtype) / H ** 0.5
        lh, lc = torch.randn(T, B, H, generator=g, dtype=dtype), torch.randn(T, B, H, generator=g, dtype=dtype)
        with step_product(product):
            got = reserve.lstm_highway1(gates, c, c0, tc, gain, w_hh, lh, lc)
        want = ref_lstm_highway1(gates, c, c0, tc, gain, w_hh, lh, lc)
        close = (lambda a, b: assert_near(a, b, dtype)) if dtype == torch.float64 else (
            lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True))  # K-term products
        for a, b in zip(got[:3], want[:3]):
            close(a, b)
        if not nonfinite:
            assert all(torch.isfinite(t).all() for t in got[:3])
        for a, b in zip(got[3], want[3]):
            assert (a != a and b != b) or a == pytest.approx(b, rel=1e-5, abs=1e-12)


@needs_kernels
def test_operators_refuse_bad_layouts_loudly():
    ops = native.ops()
    pre = torch.zeros(2, 3, 8)
    with pytest.raises(RuntimeError, match="c0"):
        ops.lstm_gates_(pre, torch.zeros(3, 3), *(torch.empty(2, 3, 2) for _ in range(3)))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.gru_gates_(torch.zeros(3, 2, 6).transpose(0, 1), torch.zeros(2, 3, 6))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.gru_gates_(torch.zeros(2, 3, 6, dtype=torch.float16), torch.zeros(2, 3, 6, dtype=torch.float16))
    gates, w = torch.zeros(2, 3, 8), torch.zeros(8, 2)
    states = [torch.zeros(2, 3, 2) for _ in range(7)]  # c, tanh_c, gain, lh, lc, wh, dc
    args = (gates, states[0], torch.zeros(3, 2), *states[1:3], w, w.t().contiguous(), *states[3:], torch.zeros(2, 3, 8))
    with pytest.raises(RuntimeError, match="sums must be a contiguous CPU float64"):
        ops.lstm_highway1_out(*args, torch.zeros(3))
    with pytest.raises(RuntimeError, match="lstm_highway1_out: c0"):
        ops.lstm_highway1_out(*args[:2], torch.zeros(2, 2), *args[3:], torch.zeros(3, dtype=torch.float64))


_FP_ENV = r"""
import numpy as np, torch
from hwbptt.torch import HighwayGRU, HighwayLSTM, native
assert native.ops() is not None, "kernels not loaded"
for cls in (HighwayLSTM, HighwayGRU):
    m = cls(17, 64, iterations=2)
    y, _ = m(torch.randn(9, 4, 17))
    y.sum().backward()
tiny = torch.tensor([1e-39]) * 1
assert tiny.item() != 0.0, "flush-to-zero is on in torch"
assert float(np.float32(1e-39) * np.float32(1)) != 0.0, "flush-to-zero is on in numpy"
print("subnormals survive")
"""


@needs_kernels
def test_training_step_leaves_the_floating_point_environment_alone():
    """A subnormal survives in torch and numpy after the kernels ran (a library built with
    fast-math would have set flush-to-zero for the whole process)."""
    out = subprocess.run([sys.executable, "-c", _FP_ENV], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "subnormals survive" in out.stdout


@pytest.mark.parametrize("H", [17, 64])
@pytest.mark.parametrize("iterations", [None, 2])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_layers_finite_where_the_parent_is_finite_at_vector_widths(kind, iterations, H):
    """float32 layers at widths with a vector body, pre-activations far below -88.7 (inputs
    of 1e4 through saturating weights, an Inf-free but huge step): outputs and gradients
    are finite wherever nn.LSTM/nn.GRU's are, and the outputs equal the parent's."""
    from torch import nn

    from hwbptt.torch import HighwayGRU, HighwayLSTM

    parent_cls, cls = (nn.LSTM, HighwayLSTM) if kind == "lstm" else (nn.GRU, HighwayGRU)
    torch.manual_seed(H)
    ours = cls(5, H, iterations=iterations)
    ref = parent_cls(5, H)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(12, 3, 5)
    x[4] = 1e4  # every gate pre-activation saturates far past float32's exp range
    x[7] = -1e4
    grads = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_(True)
        y, _ = m(xi)
        y.pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
        if m is ours:
            y_ours = y.detach()
        else:
            y_ref = y.detach()
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(y_ours).all()
    for g_ours, g_ref in zip(*grads):
        assert torch.isfinite(g_ref).all()
        assert torch.isfinite(g_ours).all()
