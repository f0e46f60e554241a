"""Every fast path against its reference: the compiled CPU scan against the sequential
scan, the fused LSTM/GRU tapes against the eager tapes (values and gradients, odd
lengths, T=1, non-contiguous inputs), and the layers end to end with and without them."""

import shutil

import pytest
import torch

from hwbptt import HighwayOptions
from hwbptt.torch import cpu_scan
from hwbptt.torch.scan import linear_scan, linear_scan_reference, linear_scan_torch, scan_backend
from hwbptt.torch import HighwayGRU, HighwayLSTM, fused, gemm, reserve
from hwbptt.torch.gru_math import FastGRUTape, GRUTape, GRUWeights, make_gru_tape
from hwbptt.torch.lstm_math import FastLSTMTape, LSTMTape, LSTMWeights, make_lstm_tape

HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_kernels = pytest.mark.skipif(not (cpu_scan.available() and fused.available()), reason="the compiled kernels are not built here")


def test_kernels_build_where_a_compiler_exists():
    if HAVE_CC:
        assert cpu_scan.available() and fused.available()


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------------------- scan


@needs_kernels
@pytest.mark.parametrize("T", [1, 2, 7, 33, 257])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_scan_matches_reference(T, reverse, dtype):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(T, 3, 37, generator=g, dtype=dtype)
    b = torch.randn(T, 3, 37, generator=g, dtype=dtype)
    assert scan_backend(a, b) == "cpu-kernel"
    torch.testing.assert_close(linear_scan(a, b, reverse=reverse), linear_scan_reference(a, b, reverse=reverse), **_tol(dtype))


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_scan_noncontiguous_strided_broadcast(reverse):
    g = torch.Generator().manual_seed(1)
    big = torch.rand(21, 4, 40, generator=g, dtype=torch.float64)
    a = big[:, :, 5:15]  # strided view, as the tapes pass f_{t+1}
    b = torch.randn(10, 4, 21, generator=g, dtype=torch.float64).permute(2, 1, 0)  # non-contiguous
    torch.testing.assert_close(linear_scan(a, b, reverse=reverse), linear_scan_reference(a.contiguous(), b.contiguous(), reverse=reverse))
    s = torch.rand(1, 1, dtype=torch.float64)  # broadcast multiplier
    bb = torch.randn(50, 300, dtype=torch.float64)  # few rows of many lanes (split along lanes)
    torch.testing.assert_close(linear_scan(s, bb, reverse=reverse), linear_scan_reference(s.expand_as(bb), bb, reverse=reverse))
    # time on another dim
    x = torch.randn(6, 19, dtype=torch.float64)
    y = torch.rand(6, 19, dtype=torch.float64)
    torch.testing.assert_close(linear_scan(y, x, reverse=reverse, dim=1), linear_scan_reference(y, x, reverse=reverse, dim=1))


def test_scan_with_autograd_takes_the_differentiable_path():
    a = torch.rand(9, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert scan_backend(a, b) == "torch"
    assert torch.autograd.gradcheck(lambda a, b: linear_scan(a, b, reverse=True), (a, b))
    with torch.no_grad():
        torch.testing.assert_close(linear_scan(a, b), linear_scan_torch(a, b))


@needs_kernels
def test_cpu_scan_half_precision_accumulates_in_float32():
    a = torch.rand(40, 8).half()
    b = torch.randn(40, 8).half()
    out = linear_scan(a, b)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), linear_scan_reference(a.float(), b.float()), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- tapes


def _lstm_case(T, B, I, H, P, bias, dtype, seed=0, noncontig=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) * 0.5  # noqa: E731
    P_ = P or H
    w = LSTMWeights(r(4 * H, I), r(4 * H, P_), r(4 * H) if bias else None, r(4 * H) if bias else None, r(P, H) if P else None)
    x = r(B, T, I).transpose(0, 1) if noncontig else r(T, B, I)
    y = r(T, B, P_)
    h0, c0 = r(B, P_), r(B, H)
    return x, y, h0, c0, w


NEEDS_ALL = {n: True for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")}


@needs_kernels
@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias,proj", [(True, 0), (False, 0), (True, 3)])
@pytest.mark.parametrize("split", ["gates", "step"])
def test_fast_lstm_tape_matches_reference(T, dtype, bias, proj, split):
    x, y, h0, c0, w = _lstm_case(T, 3, 5, 6, proj, bias, dtype, seed=T)
    ref, fast = LSTMTape(x, y, h0, c0, w), FastLSTMTape(x, y, h0, c0, w)
    tol = _tol(dtype)
    for name in ("gates", "c", "tanh_c", "readout_gain", "f_next", "c_prev", "h_prev"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), **tol)
    P = proj or 6
    lh = torch.randn(3, T, P, dtype=dtype).transpose(0, 1)  # non-contiguous cotangent
    lc = torch.zeros(T, 3, 6, dtype=dtype)
    lc[-1] = torch.randn(3, 6, dtype=dtype)
    for k in (0, 1, 3):
        opts = HighwayOptions(iterations=k, split=split)
        dc_r, wh_r, _ = ref.highway(lh, lc, opts)
        dc_f, wh_f, _ = fast.highway(lh, lc, opts)
        torch.testing.assert_close(dc_f, dc_r, **tol)
        torch.testing.assert_close(wh_f, wh_r, **tol)
        needs = dict(NEEDS_ALL, b_ih=bias, b_hh=bias, w_hr=bool(proj))
        g_r, g_f = ref.input_grads(dc_r, wh_r, needs), fast.input_grads(dc_f, wh_f, needs)
        for n in g_r:
            if g_r[n] is None:
                assert g_f[n] is None, n
            else:
                torch.testing.assert_close(g_f[n], g_r[n], **tol, msg=n)


@needs_kernels
@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_gru_tape_matches_reference(T, dtype, bias):
    g = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) * 0.5  # noqa: E731
    H, I, B = 6, 5, 3
    w = GRUWeights(r(3 * H, I), r(3 * H, H), r(3 * H) if bias else None, r(3 * H) if bias else None)
    x, y, h0 = r(B, T, I).transpose(0, 1), r(T, B, H), r(B, H)
    ref, fast = GRUTape(x, y, h0, w), FastGRUTape(x, y, h0, w)
    tol = _tol(dtype)
    for name in ("r", "z", "n", "gh_n", "z_next", "h_prev"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), **tol)
    lh = r(B, T, H).transpose(0, 1)
    torch.testing.assert_close(fast.block(lh), ref.block(lh), **tol)
    for k in (0, 1, 3):
        opts = HighwayOptions(iterations=k)
        w_r, _ = ref.highway(lh, opts)
        w_f, _ = fast.highway(lh, opts)
        torch.testing.assert_close(w_f, w_r, **tol)
        needs = dict(NEEDS_ALL, b_ih=bias, b_hh=bias, w_hr=False)
        g_r, g_f = ref.input_grads(w_r, needs), fast.input_grads(w_f, needs)
        for n in g_r:
            if g_r[n] is None:
                assert g_f[n] is None, n
            else:
                torch.testing.assert_close(g_f[n], g_r[n], **tol, msg=n)


@needs_kernels
def test_tape_choice():
    x, y, h0, c0, w = _lstm_case(4, 2, 3, 4, 0, True, torch.float32)
    assert type(make_lstm_tape(x, y, h0, c0, w)) is FastLSTMTape
    assert type(make_lstm_tape(x.half(), y.half(), h0.half(), c0.half(), LSTMWeights(*(t.half() for t in (w.w_ih, w.w_hh, w.b_ih, w.b_hh)), None))) is LSTMTape
    assert type(make_gru_tape(torch.randn(4, 2, 3), torch.randn(4, 2, 4), torch.randn(2, 4), GRUWeights(torch.randn(12, 3), torch.randn(12, 4), None, None))) is FastGRUTape
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        assert type(make_lstm_tape(xg, y, h0, c0, w)) is LSTMTape  # a graph wanted: eager path


# ----------------------------------------------------------------------------- end to end


@needs_kernels
@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_layers_fast_equals_reference(monkeypatch, cls, T, packed):
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(T)
    m = cls(4, 5, num_layers=2, bidirectional=True, batch_first=True, iterations=2).double()
    x = torch.randn(3, T, 4, dtype=torch.float64, requires_grad=True)

    def grads():
        m.zero_grad()
        x.grad = None
        inp = pack_padded_sequence(x, torch.tensor([T, max(1, T - 3), max(1, T // 2)]), batch_first=True, enforce_sorted=False) if packed else x
        out, _ = m(inp)
        data = out.data if packed else out
        (data * torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view_as(data)).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    fast = grads()
    monkeypatch.setattr(fused, "supports", lambda *t: False)
    slow = grads()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- reserve forwards


needs_reserve = pytest.mark.skipif(not reserve.available(), reason="reserve forwards not built (no C compiler or no exported BLAS)")


@needs_reserve
@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_reserve_lstm_forward_matches_fused_kernel_and_tape(T, dtype, bias):
    x, _, h0, c0, w = _lstm_case(T, 3, 5, 7, 0, bias, dtype, seed=T)
    tape, y = FastLSTMTape.from_reserve(x, h0, c0, w)
    flat = [w.w_ih, w.w_hh] + ([w.b_ih, w.b_hh] if bias else [])
    y_ref, h_n, c_n = torch._VF.lstm(x, (h0[None], c0[None]), flat, bias, 1, 0.0, False, False, False)
    tol = _tol(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(tape.c[-1], c_n[0], **tol)
    ref = LSTMTape(x, y_ref, h0, c0, w)
    for name in ("gates", "c", "tanh_c", "readout_gain", "f_next", "c_prev", "h_prev"):
        torch.testing.assert_close(getattr(tape, name), getattr(ref, name), **tol, msg=name)


@needs_reserve
@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_reserve_gru_forward_matches_fused_kernel_and_tape(T, dtype, bias):
    g = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) * 0.5  # noqa: E731
    H, I, B = 7, 5, 3
    w = GRUWeights(r(3 * H, I), r(3 * H, H), r(3 * H) if bias else None, r(3 * H) if bias else None)
    x, h0 = r(B, T, I).transpose(0, 1), r(B, H)
    tape, y = FastGRUTape.from_reserve(x, h0, w)
    flat = [w.w_ih, w.w_hh] + ([w.b_ih, w.b_hh] if bias else [])
    y_ref, _ = torch._VF.gru(x, h0[None], flat, bias, 1, 0.0, False, False, False)
    tol = _tol(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    ref = GRUTape(x, y_ref, h0, w)
    for name in ("r", "z", "n", "gh_n", "z_next", "h_prev"):
        torch.testing.assert_close(getattr(tape, name), getattr(ref, name), **tol, msg=name)


@needs_reserve
@pytest.mark.parametrize("T", [1, 2, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reserve_gru_adjoint_matches_sequential_reference(T, dtype):
    """The C time loop's exact adjoint and its gate gradients equal ``GRUTape``'s
    sequential recurrence and ``gate_grads``."""
    g = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) * 0.5  # noqa: E731
    H, I, B = 7, 5, 6
    w = GRUWeights(r(3 * H, I), r(3 * H, H), r(3 * H), r(3 * H))
    x, h0, lh = r(T, B, I), r(B, H), r(T, B, H)
    tape, y = FastGRUTape.from_reserve(x, h0, w)
    ref = GRUTape(x, y, h0, w)
    w_ref = ref.exact_adjoint(lh)
    w_c, dgi, dgh = reserve.gru_adjoint(tape.gates, tape._gh, w.w_hh, h0, y, lh)
    tol = _tol(dtype)
    torch.testing.assert_close(w_c, w_ref, **tol)
    dgi_ref, dgh_ref = ref.gate_grads(w_ref)
    torch.testing.assert_close(dgi, dgi_ref, **tol)
    torch.testing.assert_close(dgh, dgh_ref, **tol)
    # The tape hands the loop's gate gradients out only for the adjoint it returned.
    tape.exact_adjoint(lh)
    for got, want in zip(tape.gate_grads(2 * w_ref), ref.gate_grads(2 * w_ref)):
        torch.testing.assert_close(got, want, **tol)


@needs_reserve
@pytest.mark.parametrize("T", [1, 2, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reserve_lstm_adjoint_matches_sequential_reference(T, dtype):
    """The C time loop's exact ``(dc, wh)`` and its ``dpre`` equal ``LSTMTape``'s
    sequential recurrence and ``dpre``."""
    x, _, h0, c0, w = _lstm_case(T, 6, 5, 7, 0, True, dtype, seed=T)
    g = torch.Generator().manual_seed(T + 1)
    lh, lc = (torch.randn(T, 6, 7, generator=g, dtype=dtype) for _ in range(2))
    tape, y = FastLSTMTape.from_reserve(x, h0, c0, w)
    ref = LSTMTape(x, y, h0, c0, w)
    dc_ref, wh_ref = ref.exact_adjoint(lh, lc)
    dc, wh, dpre = reserve.lstm_adjoint(tape.gates, tape.c, c0.contiguous(), tape.tanh_c, tape.readout_gain, w.w_hh, lh, lc)
    tol = _tol(dtype)
    torch.testing.assert_close(dc, dc_ref, **tol)
    torch.testing.assert_close(wh, wh_ref, **tol)
    torch.testing.assert_close(dpre, ref.dpre(dc_ref, wh_ref), **tol)
    # The tape hands the loop's dpre to input_grads only for the adjoint it returned.
    needs = dict.fromkeys(("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"), True) | {"w_hr": False}
    tape.exact_adjoint(lh, lc)
    other = tape.input_grads(2 * dc_ref, wh_ref, needs)
    expected = ref.input_grads(2 * dc_ref, wh_ref, needs)
    for key in ("x", "w_ih", "w_hh", "b_ih"):
        torch.testing.assert_close(other[key], expected[key], **tol, msg=key)


@needs_reserve
@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("packed", [False, True])
def test_exact_mode_runs_the_c_adjoint_and_equals_the_parent(monkeypatch, cls, packed):
    """``iterations=None`` on CPU float32/64 takes ``layer._LSTMExact``/``_GRUExact`` (the C
    adjoint on the kept gates), not the parent's autograd, with the parent's gradient, and
    with ``create_graph=True`` a differentiable one (second derivatives equal too)."""
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    from hwbptt.torch import layer

    name = "lstm_adjoint" if cls is HighwayLSTM else "gru_adjoint"
    calls = []
    real = getattr(reserve, name)
    monkeypatch.setattr(reserve, name, lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    parent = nn.LSTM if cls is HighwayLSTM else nn.GRU
    ref = parent(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = cls(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64, iterations=None)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(11, 3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([11, 5, 8])

    def loss(m):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        y, h = m(inp)
        out = y.data if packed else y
        states = h if isinstance(h, tuple) else (h,)
        return out.sin().sum() + sum(s.cos().sum() for s in states)

    g1 = torch.autograd.grad(loss(ours), [x, *ours.parameters()])
    assert len(calls) == 4  # two layers, two directions
    g2 = torch.autograd.grad(loss(ref), [x, *ref.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Second derivatives: the backward under create_graph is differentiable.
    gx1 = torch.autograd.grad(loss(ours), x, create_graph=True)[0]
    gx2 = torch.autograd.grad(loss(ref), x, create_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(gx1.pow(2).sum(), ours.weight_hh_l0)[0],
                               torch.autograd.grad(gx2.pow(2).sum(), ref.weight_hh_l0)[0], rtol=1e-10, atol=1e-12)
    # Without a gradient wanted, the parent's forward runs (no C adjoint, no Function).
    with torch.no_grad():
        assert not layer.exact_by_tape(x, *ours.parameters())


@needs_reserve
def test_exact_mode_with_projection_stays_autograd(monkeypatch):
    """``proj_size`` has no C forward: exact mode is the parent's autograd (no C adjoint)."""
    monkeypatch.setattr(reserve, "lstm_adjoint", lambda *a: pytest.fail("C adjoint used with proj_size"))
    ours = HighwayLSTM(4, 6, proj_size=3, iterations=None, dtype=torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    ours(x)[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_reserve
@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("packed", [False, True])
def test_layers_reserve_equals_recompute(cls, packed):
    """The forward that keeps the gates and the one that reruns the fused kernel give the
    same outputs and the same Highway gradients (and the reserve path is the one taken)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(3)
    m = cls(4, 5, num_layers=2, bidirectional=True, iterations=2).double()
    x = torch.randn(11, 3, 4, dtype=torch.float64, requires_grad=True)

    def run(on):
        m.zero_grad()
        x.grad = None
        inp = pack_padded_sequence(x, torch.tensor([11, 6, 2]), enforce_sorted=False) if packed else x
        calls = []
        real = reserve.lstm_forward if cls is HighwayLSTM else reserve.gru_forward
        name = real.__name__

        def spy(*a, **k):
            calls.append(1)
            return real(*a, **k)

        with reserve.use(on), pytest.MonkeyPatch.context() as mp:
            mp.setattr(reserve, name, spy)
            out, h = m(inp)
            data = out.data if packed else out
            hs = list(h) if isinstance(h, tuple) else [h]
            (data.sin().sum() + sum(s.cos().sum() for s in hs)).backward()
        assert bool(calls) == on
        return [data.detach().clone(), *(s.detach().clone() for s in hs), x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tol", [None, 1e-3])
@pytest.mark.parametrize("H", [7, 17, 64])
def test_lstm_k1_time_loop_equals_the_batched_iteration(H, tol, monkeypatch):
    """HighwayLSTM(iterations=1): the compiled time loop (``dispatch.highway_loop_pays``)
    gives the batched iteration's gradients and diagnostics (two layers, both directions)."""
    from hwbptt.torch import dispatch

    if not reserve.available():
        pytest.skip("the compiled kernels are not built here")
    calls = []
    real = reserve.lstm_highway1
    monkeypatch.setattr(reserve, "lstm_highway1", lambda *a: (calls.append(1), real(*a))[1])
    torch.manual_seed(H)
    m = HighwayLSTM(5, H, num_layers=2, bidirectional=True, iterations=1, tol=tol, diagnostics=True)
    x = torch.randn(19, 3, 5, requires_grad=True)

    def run(loop_max_h):
        monkeypatch.setattr(dispatch, "LOOP_MAX_H", loop_max_h)
        m.zero_grad()
        x.grad = None
        out, _ = m(x)
        (out.sin() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in m.parameters()], dict(m.last_diagnostics)

    loop, loop_diag = run(10**6)
    assert len(calls) == 4  # two layers, two directions
    batched, batched_diag = run(-1)
    assert len(calls) == 4
    for a, b in zip(loop, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert loop_diag.keys() == batched_diag.keys()
    for key, d in loop_diag.items():
        e = batched_diag[key]
        assert (d.iterations, d.used, d.diverged, d.unconverged, d.growth) == (e.iterations, e.used, e.diverged, e.unconverged, e.growth)
        assert d.update_norms == pytest.approx(e.update_norms, rel=1e-4)
        assert (d.rate, d.remainder) == pytest.approx((e.rate, e.remainder), rel=1e-4)


def test_one_iteration_diagnostics_equal_the_engines():
    """``one_iteration_diagnostics`` from the three norms is what ``highway_adjoint``
    reports after one iteration (eager torch arrays)."""
    from hwbptt import highway_adjoint
    from hwbptt.engine import one_iteration_diagnostics
    from hwbptt.torch.scan import TORCH_OPS

    g = torch.Generator().manual_seed(3)
    a, local = torch.rand(11, 4, 6, generator=g, dtype=torch.float64) * 0.9, torch.randn(11, 4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.4

    def block(u):
        return torch.cat([u[1:] @ w, torch.zeros_like(u[:1])])

    for record in (False, True):
        u1, want = highway_adjoint(a, local, block, iterations=1, ops=TORCH_OPS, record=record)
        u0 = TORCH_OPS.reverse_scan(a, local)
        got = one_iteration_diagnostics(TORCH_OPS.norm(u0), TORCH_OPS.dist(u1, u0), TORCH_OPS.norm(u1), record)
        assert got == want


# ----------------------------------------------------------------------------- GEMM backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided rows", "transposed"])
def test_gemm_linear_t_matches_matmul(dtype, layout):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 2, 37, generator=g, dtype=dtype)
    a = {"contiguous": base[:, 0].contiguous(), "strided rows": base[:, 1], "transposed": torch.randn(37, 40, generator=g, dtype=dtype).t()}[layout]
    w = torch.randn(19, 37, generator=g, dtype=dtype)
    expected_backend = "onednn" if dtype == torch.float32 and gemm._onednn_ok() else "torch.mm"
    assert gemm.backend(a, w) == expected_backend
    ref = (a.double() @ w.double().t()).to(dtype)
    torch.testing.assert_close(gemm.linear_t(a, w), ref, **_tol(dtype))
    bias = torch.randn(19, generator=g, dtype=dtype)
    with_bias = (a.double() @ w.double().t() + bias.double()).to(dtype)
    torch.testing.assert_close(gemm.linear_t(a, w, bias), with_bias, **_tol(dtype))
    with gemm.use_onednn(False):
        assert gemm.backend(a, w) == "torch.mm"
        torch.testing.assert_close(gemm.linear_t(a, w, bias), with_bias, **_tol(dtype))
    with torch.enable_grad():
        assert gemm.backend(a.clone().requires_grad_(True), w) == "torch.mm"  # a graph wanted: autograd's mm


def test_gemm_tn_choice_follows_its_measurement(monkeypatch):
    """The chunked path is chosen where it measured under ``_TN_WIN`` of torch.mm's time,
    once per process, and the status line says which and the two times."""
    if not (gemm._onednn_ok() and gemm._transpose() is not None):
        pytest.skip("no oneDNN linear or no compiled transpose: tn always takes torch.mm")
    monkeypatch.setitem(gemm._state, "chunked", None)
    monkeypatch.setitem(gemm._state, "tn_ms", None)
    chosen = gemm._chunked_pays()
    ms = gemm._state["tn_ms"]
    assert ms["chunked"] > 0 and ms["torch.mm"] > 0
    assert chosen == (ms["chunked"] < gemm._TN_WIN * ms["torch.mm"])
    gemm._state["tn_ms"] = {"chunked": -1.0, "torch.mm": -1.0}  # a second call does not measure again
    assert gemm._chunked_pays() == chosen
    assert ("chunked oneDNN (measured" in gemm.tn_status()) == chosen
    assert gemm.tn_status() in gemm.status()


def test_gemm_status_names_the_backend():
    assert ("oneDNN" in gemm.status()) == gemm._onednn_ok()
    with pytest.raises(TypeError, match="on=1"):
        with gemm.use_onednn(1):
            pass


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("chunked_tn", [False, True], ids=["tn-default", "tn-chunked"])
def test_layers_float32_same_gradients_with_either_gemm(cls, chunked_tn, monkeypatch):
    # The weight gradients through gemm.tn's chunked path (chunks that split steps) or
    # through torch.mm, whichever this machine measured faster.
    monkeypatch.setitem(gemm._state, "chunked", chunked_tn)
    if chunked_tn:
        monkeypatch.setattr(gemm, "_TN_MIN_K", 1)
        monkeypatch.setattr(gemm, "_TN_CHUNK", 7)
    torch.manual_seed(4)
    m = cls(6, 8, iterations=3)
    x = torch.randn(13, 5, 6, requires_grad=True)

    def grads():
        m.zero_grad()
        x.grad = None
        out, _ = m(x)
        out.sin().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    fast = grads()
    with gemm.use_onednn(False):
        slow = grads()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-chosen", "mm-chosen"])
@pytest.mark.parametrize("chunk", [7, 2048])
@pytest.mark.parametrize("widths", [(150, 131), (5,)])
def test_gemm_tn_matches_matmul_over_row_pieces(monkeypatch, chunk, widths, chunked):
    """``gemm.tn``: ``d.T @ z`` for blocks given as row pieces, on the chunked oneDNN path
    (wide blocks, chunks that end inside a piece, where this machine chose it) and on
    torch.mm (narrow blocks, or where torch.mm measured faster)."""
    monkeypatch.setattr(gemm, "_TN_CHUNK", chunk)
    monkeypatch.setitem(gemm._state, "chunked", chunked)
    calls = []
    real = gemm._transpose_into
    monkeypatch.setattr(gemm, "_transpose_into", lambda s, d: (calls.append(1), real(s, d)))
    g = torch.Generator().manual_seed(9)
    N, B = 61, 4
    d = torch.randn(N, 23, generator=g)
    zs = [torch.randn(N, k, generator=g) for k in widths]
    got = gemm.tn(d, [[z[:B], z[B:]] for z in zs])
    for out, z in zip(got, zs):
        torch.testing.assert_close(out, (d.double().t() @ z.double()).float(), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous()
    fast = chunked and sum(widths) >= gemm._TN_MIN_K and gemm.backend(d, d) == "onednn" and gemm._transpose() is not None
    assert bool(calls) == fast
    if fast and chunk == 7:
        # 9 chunks: d once each, every block once each plus once more where row 4 splits chunk 0
        assert len(calls) == 9 + len(widths) * (9 + 1)
