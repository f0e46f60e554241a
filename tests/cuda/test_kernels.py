"""Every Triton kernel on CUDA tensors against a float64 reference: the scan
(``hwbptt.torch.triton_scan``) and the four gate kernels (``hwbptt.torch.triton_cells``),
in float32, float16 and bfloat16, at T = 1, odd T and hidden sizes over several blocks,
with non-contiguous inputs; the ``fused`` dispatch and the fast tapes on those kernels;
``HWBPTT_TRITON=0``; and the error a kernel that does not compile raises.

References are computed in float64 from the inputs as stored (a float16 input is upcast,
not regenerated), so a tolerance only has to cover the kernel's float32 arithmetic (on
CUDA ``tl.exp`` is an approximate ``ex2``) and the one rounding of each result to its
storage dtype.
"""

from __future__ import annotations

import pytest
import torch

from hwbptt.torch.scan import linear_scan, linear_scan_reference, scan_backend

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _shapes(small: bool):
    """(T, B, H): one element; odd sizes; H above the 256-wide block (two column blocks);
    on the GPU also a long sequence and a batch of many row blocks."""
    if small:
        return ((1, 1, 1), (3, 5, 37), (4, 2, 300))
    return ((1, 1, 1), (7, 3, 37), (33, 5, 300), (129, 32, 128))


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, want {dtype}"
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _up(*ts):
    """float64 CPU copies of the inputs as stored."""
    return [t.double().cpu() for t in ts]


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a layout with the last two dimensions' strides swapped."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_available_and_the_switch(device, triton_kernels, monkeypatch):
    tc, ts = triton_kernels
    from hwbptt.torch import fused

    assert tc.available() and ts.available()
    a, b = torch.rand(4, 2, 8, device=device), torch.randn(4, 2, 8, device=device)
    if device.type == "cuda":
        assert scan_backend(a, b) == "triton"
        assert fused.supports(a, b) and fused._triton_cells() is tc
    monkeypatch.setenv("HWBPTT_TRITON", "0")
    assert not tc.available() and not ts.available()
    if device.type == "cuda":
        assert scan_backend(a, b) == "torch"
        assert not fused.supports(a, b)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_scan_kernel(device, small, triton_kernels, dtype, reverse):
    _, ts = triton_kernels
    g = torch.Generator().manual_seed(1)
    shapes = ((1, 1, 5), (7, 3, 33)) if small else ((1, 1, 5), (7, 3, 33), (1001, 2, 1030), (64, 40, 128))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for T, M, K in shapes:
        big = torch.rand(T, M, K + 4, generator=g, dtype=dtype).to(device)
        a = big[:, :, 2 : 2 + K]  # a strided view
        b = torch.randn(M, T, K, generator=g, dtype=dtype).to(device).transpose(0, 1)  # non-contiguous
        got = ts.scan_3d(a, b, reverse)
        assert got.shape == (T, M, K) and got.is_contiguous() and got.dtype == dtype and got.device == b.device
        want = linear_scan_reference(*_up(a, b), reverse=reverse)
        torch.testing.assert_close(got.double().cpu(), want, **tol, msg=lambda m: f"T={T} M={M} K={K}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_linear_scan_half_precision(device, small, triton_kernels, dtype):
    """``linear_scan`` on half-precision CUDA tensors takes the Triton kernel, accumulates in
    float32 and returns the input dtype; time on dim 1 as well as dim 0."""
    g = torch.Generator().manual_seed(2)
    T = 9 if small else 257
    for dim in (0, 1):
        shape = (T, 3, 40) if dim == 0 else (3, T, 40)
        a = torch.rand(*shape, generator=g).to(device, dtype)
        b = torch.randn(*shape, generator=g).to(device, dtype)
        if device.type == "cuda":
            assert scan_backend(a, b) == "triton"
        got = linear_scan(a, b, reverse=True, dim=dim)
        _close(got, linear_scan_reference(*_up(a, b), reverse=True, dim=dim), dtype, f"dim={dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=[NAME[d] for d in DTYPES])
def test_lstm_gates(device, small, checks, triton_kernels, dtype):
    tc, _ = triton_kernels
    for seed, (T, B, H) in enumerate(_shapes(small)):
        pre, c0 = (t.to(device, dtype) for t in checks._lstm_inputs(T, B, H, seed)[:2])
        gates_ref, c_ref, tanh_ref, gain_ref = checks.ref_lstm_gates(*_up(pre, c0))
        got = pre.clone()
        outs = tc.lstm_gates(got, _noncontig(c0))
        what = f"lstm_gates {NAME[dtype]} T={T} B={B} H={H}"
        _close(got, gates_ref, dtype, what + " gates")
        for name, out, want in zip(("c", "tanh_c", "gain"), outs, (c_ref, tanh_ref, gain_ref)):
            assert out.shape == (T, B, H) and out.is_contiguous() and out.device == pre.device, (what, name)
            _close(out, want, dtype, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=[NAME[d] for d in DTYPES])
def test_lstm_dpre(device, small, checks, triton_kernels, dtype):
    tc, _ = triton_kernels
    for seed, (T, B, H) in enumerate(_shapes(small)):
        _, c0, dc, m, gates, c, tanh_c = (t.to(device) for t in checks._lstm_inputs(T, B, H, seed, dtype))
        want = checks.ref_lstm_dpre(*_up(dc, m, gates, c, c0, tanh_c))
        what = f"lstm_dpre {NAME[dtype]} T={T} B={B} H={H}"
        got = tc.lstm_dpre(_noncontig(dc), _noncontig(m), gates, c, c0, tanh_c)
        assert got.shape == gates.shape and got.is_contiguous()
        _close(got, want, dtype, what)
        out = torch.full_like(gates, float("nan"))
        assert tc.lstm_dpre(dc, m, gates, c, c0, tanh_c, out=out) is out
        _close(out, want, dtype, what + " out=")


@pytest.mark.parametrize("dtype", DTYPES, ids=[NAME[d] for d in DTYPES])
def test_gru_gates(device, small, checks, triton_kernels, dtype):
    tc, _ = triton_kernels
    for seed, (T, B, H) in enumerate(_shapes(small)):
        gi, gh = (t.to(device, dtype) for t in checks._gru_inputs(T, B, H, seed)[:2])
        want = checks.ref_gru_gates(*_up(gi, gh))
        got, gh_before = gi.clone(), gh.clone()
        assert tc.gru_gates(got, gh) is None
        assert torch.equal(gh, gh_before), "gru_gates wrote into gh"
        _close(got, want, dtype, f"gru_gates {NAME[dtype]} T={T} B={B} H={H}")


@pytest.mark.parametrize("dtype", DTYPES, ids=[NAME[d] for d in DTYPES])
def test_gru_dgates(device, small, checks, triton_kernels, dtype):
    tc, _ = triton_kernels
    for seed, (T, B, H) in enumerate(_shapes(small)):
        _, gh, h0, y, lam, gates = (t.to(device) for t in checks._gru_inputs(T, B, H, seed, dtype))
        want_i, want_h = checks.ref_gru_dgates(*_up(lam, gates, gh, h0, y))
        what = f"gru_dgates {NAME[dtype]} T={T} B={B} H={H}"
        dgi, dgh = tc.gru_dgates(_noncontig(lam), gates, gh, _noncontig(h0), _noncontig(y), True)
        _close(dgi, want_i, dtype, what + " dgi")
        _close(dgh, want_h, dtype, what + " dgh")
        out = torch.full_like(gates, float("nan"))
        none, dgh2 = tc.gru_dgates(lam, gates, gh, h0, y, False, out=out)
        assert none is None and dgh2 is out
        _close(out, want_h, dtype, what + " out=")


def test_fused_dispatch_on_device(device, checks, triton_kernels):
    """``fused``'s four functions on these tensors give what the kernels give (on CUDA they
    are the Triton kernels; in the dry run the C kernels)."""
    tc, _ = triton_kernels
    from hwbptt.torch import fused

    T, B, H = 5, 3, 20
    pre, c0, dc, m, gates, c, tanh_c = (t.to(device) for t in checks._lstm_inputs(T, B, H, 3))
    gi, gh, h0, y, lam, ggates = (t.to(device) for t in checks._gru_inputs(T, B, H, 3))
    if device.type == "cuda":
        assert fused.supports(pre, c0)
    elif not fused.supports(pre, c0):
        pytest.skip("the compiled kernels are not built here (hwbptt.torch.kernels_status())")
    p1, p2 = pre.clone(), pre.clone()
    for a, b in zip(fused.lstm_gates(p1, c0), tc.lstm_gates(p2, c0)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    torch.testing.assert_close(p1, p2, **TOL[torch.float32])
    torch.testing.assert_close(fused.lstm_dpre(dc, m, gates, c, c0, tanh_c), tc.lstm_dpre(dc, m, gates, c, c0, tanh_c), **TOL[torch.float32])
    g1, g2 = gi.clone(), gi.clone()
    fused.gru_gates(g1, gh)
    tc.gru_gates(g2, gh)
    torch.testing.assert_close(g1, g2, **TOL[torch.float32])
    for a, b in zip(fused.gru_dgates(lam, ggates, gh, h0, y, True), tc.gru_dgates(lam, ggates, gh, h0, y, True)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES, ids=[NAME[d] for d in DTYPES])
def test_fast_tapes_on_device(device, small, triton_kernels, dtype, monkeypatch):
    """The fast tapes (on the Triton kernels) against the eager tapes in float64 on the same
    device: highway adjoints for both LSTM splits, and every input gradient, within the
    storage dtype's precision relative to the largest entry."""
    tc, _ = triton_kernels
    from hwbptt import HighwayOptions
    from hwbptt.torch import fused
    from hwbptt.torch.gru_math import FastGRUTape, GRUTape, GRUWeights
    from hwbptt.torch.lstm_math import FastLSTMTape, LSTMTape, LSTMWeights

    if device.type == "cpu":  # the dry run: route the tapes through the Triton kernels in the interpreter
        for name in ("lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates"):
            monkeypatch.setattr(fused, name, getattr(tc, name))
    rel = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    g = torch.Generator().manual_seed(8)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, dtype)  # noqa: E731
    T, B, I, H = (5, 3, 4, 18) if small else (37, 8, 24, 300)
    wl = LSTMWeights(r(4 * H, I), r(4 * H, H), r(4 * H), r(4 * H), None)
    wg = GRUWeights(r(3 * H, I), r(3 * H, H), r(3 * H), r(3 * H))
    x, y, h0, c0 = r(B, T, I).transpose(0, 1), r(T, B, H), r(B, H), r(B, H)
    lh = r(B, T, H).transpose(0, 1)
    lc = torch.zeros(T, B, H, device=device, dtype=dtype)
    lc[-1] = r(B, H)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    needs = {n: True for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")}
    needs["w_hr"] = False
    for split in ("gates", "step"):
        opts = HighwayOptions(iterations=2, split=split)
        ref = LSTMTape(d(x), d(y), d(h0), d(c0), LSTMWeights(*(d(t) for t in (wl.w_ih, wl.w_hh, wl.b_ih, wl.b_hh, wl.w_hr))))
        fast = FastLSTMTape(x, y, h0, c0, wl)
        dc_r, wh_r, _ = ref.highway(d(lh), d(lc), opts)
        dc_f, wh_f, _ = fast.highway(lh, lc, opts)
        assert dc_f.dtype == wh_f.dtype == dtype and dc_f.device == x.device
        assert _rel(dc_f, dc_r) <= rel, ("lstm dc", split, _rel(dc_f, dc_r))
        assert _rel(wh_f, wh_r) <= rel, ("lstm wh", split, _rel(wh_f, wh_r))
        g_r, g_f = ref.input_grads(dc_r, wh_r, needs), fast.input_grads(dc_f, wh_f, needs)
        for n in g_r:
            if g_r[n] is not None:
                assert _rel(g_f[n], g_r[n]) <= rel, ("lstm", n, split, _rel(g_f[n], g_r[n]))
    opts = HighwayOptions(iterations=2)
    ref = GRUTape(d(x), d(y), d(h0), GRUWeights(*(d(t) for t in (wg.w_ih, wg.w_hh, wg.b_ih, wg.b_hh))))
    fast = FastGRUTape(x, y, h0, wg)
    w_r, _ = ref.highway(d(lh), opts)
    w_f, _ = fast.highway(lh, opts)
    assert _rel(w_f, w_r) <= rel, ("gru w", _rel(w_f, w_r))
    g_r, g_f = ref.input_grads(w_r, needs), fast.input_grads(w_f, needs)
    for n in g_r:
        if g_r[n] is not None:
            assert _rel(g_f[n], g_r[n]) <= rel, ("gru", n, _rel(g_f[n], g_r[n]))


class _Broken:
    """A stand-in kernel that fails at launch, as one Triton cannot compile does."""

    def __getitem__(self, grid):
        def run(*args, **meta):
            raise RuntimeError("simulated: ptxas fatal error for this architecture")

        return run


def test_kernel_that_does_not_compile_is_named(device, checks, triton_kernels, monkeypatch):
    tc, ts = triton_kernels
    monkeypatch.setattr(tc, "_lstm_gates_kernel", _Broken())
    monkeypatch.setattr(ts, "_scan_kernel", _Broken())
    pre, c0 = (t.to(device) for t in checks._lstm_inputs(3, 2, 4, 0)[:2])
    with pytest.raises(RuntimeError, match=r"_lstm_gates_kernel.*HWBPTT_TRITON=0") as info:
        tc.lstm_gates(pre, c0)
    assert "simulated" in str(info.value.__cause__)
    with pytest.raises(RuntimeError, match=r"_scan_kernel.*HWBPTT_TRITON=0"):
        ts.scan_3d(torch.rand(3, 1, 4, device=device), torch.rand(3, 1, 4, device=device), True)
