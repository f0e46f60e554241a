"""Checks of ``hwbptt.torch.triton_cells`` run by ``tests/test_triton_cells.py`` in a fresh
interpreter with ``TRITON_INTERPRET=1`` (the interpreter must be chosen before Triton is
imported, and Triton must not be imported after TensorFlow, which the Keras tests load).

Each check raises on failure; ``main`` runs them all and prints one JSON object
``{check name: "ok" | error text}``. Triton's interpreter runs the kernels on CPU tensors.
With the argument ``compile`` (and without ``TRITON_INTERPRET``), ``main`` instead compiles
the kernels for a GPU (``compile_for_gpu``).
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

TOL32 = dict(rtol=1e-5, atol=1e-6)


def _blocks(tc, tile: int, scan_tile: int, max_h: int) -> None:
    tc._TILE, tc._SCAN_TILE, tc._MAX_BLOCK_H = tile, scan_tile, max_h


def _sizes(tc):
    """Small blocks (many programs, ragged edges on both axes), then the defaults."""
    defaults = (tc._TILE, tc._SCAN_TILE, tc._MAX_BLOCK_H)
    for blocks in ((32, 32, 16), defaults):
        _blocks(tc, *blocks)
        yield blocks
    _blocks(tc, *defaults)


SHAPES = ((1, 1, 1), (3, 5, 37), (2, 3, 20), (4, 2, 17))  # (T, B, H); 37, 17: ragged vs 16


# ---------------------------------------------------------------------- eager references


def ref_lstm_gates(pre, c0):
    H = pre.shape[-1] // 4
    i, f, g, o = torch.sigmoid(pre[..., :H]), torch.sigmoid(pre[..., H : 2 * H]), torch.tanh(pre[..., 2 * H : 3 * H]), torch.sigmoid(pre[..., 3 * H :])
    cs, cp = [], c0
    for t in range(pre.shape[0]):
        cp = f[t] * cp + i[t] * g[t]
        cs.append(cp)
    c = torch.stack(cs)
    tc = torch.tanh(c)
    return torch.cat([i, f, g, o], -1), c, tc, o * (1 - tc * tc)


def ref_lstm_dpre(dc, m, gates, c, c0, tanh_c):
    H = gates.shape[-1] // 4
    i, f, g, o = gates.split(H, -1)
    cp = torch.cat([c0.unsqueeze(0), c[:-1]])
    return torch.cat([dc * g * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - g * g), m * tanh_c * o * (1 - o)], -1)


def ref_gru_gates(gi, gh):
    H = gi.shape[-1] // 3
    r = torch.sigmoid(gi[..., :H] + gh[..., :H])
    z = torch.sigmoid(gi[..., H : 2 * H] + gh[..., H : 2 * H])
    n = torch.tanh(gi[..., 2 * H :] + r * gh[..., 2 * H :])
    return torch.cat([r, z, n], -1)


def ref_gru_dgates(lam, gates, gh, h0, y):
    H = gates.shape[-1] // 3
    r, z, n = gates.split(H, -1)
    hp = torch.cat([h0.unsqueeze(0), y[:-1]])
    dn = lam * (1 - z) * (1 - n * n)
    dz = lam * (hp - n) * z * (1 - z)
    dr = dn * gh[..., 2 * H :] * r * (1 - r)
    return torch.cat([dr, dz, dn], -1), torch.cat([dr, dz, dn * r], -1)


# ---------------------------------------------------------------------- inputs


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lstm_inputs(T, B, H, seed, dtype=torch.float32):
    g = _gen(seed)
    pre = torch.randn(T, B, 4 * H, generator=g) * 2
    c0 = torch.randn(B, H, generator=g)
    gates, c, tanh_c, _ = ref_lstm_gates(pre, c0)
    dc = torch.randn(T, B, H, generator=g)
    m = torch.randn(T, B, H, generator=g)
    return [t.to(dtype) for t in (pre, c0, dc, m, gates, c, tanh_c)]


def _gru_inputs(T, B, H, seed, dtype=torch.float32):
    g = _gen(seed)
    gi = torch.randn(T, B, 3 * H, generator=g) * 2
    gh = torch.randn(T, B, 3 * H, generator=g) * 2
    h0 = torch.randn(B, H, generator=g)
    y = torch.randn(T, B, H, generator=g)
    lam = torch.randn(T, B, H, generator=g)
    gates = ref_gru_gates(gi, gh)
    return [t.to(dtype) for t in (gi, gh, h0, y, lam, gates)]


def _c_kernels():
    from hwbptt.torch import fused

    return fused if fused.available() else None


# ---------------------------------------------------------------------- checks


def check_fused_import_is_triton_free():
    """Importing the adapter and running the CPU kernels imports no Triton."""
    import hwbptt.torch  # noqa: F401
    from hwbptt.torch import fused, gru_math, lstm_math  # noqa: F401

    if fused.available():
        pre, c0 = _lstm_inputs(2, 2, 3, 0)[:2]
        fused.lstm_gates(pre.clone(), c0)
        assert fused.supports(pre, c0)
    assert "triton" not in sys.modules, "importing or running the CPU path imported Triton"


def check_available():
    from hwbptt.torch import fused, triton_cells as tc

    assert tc.available()
    assert fused._triton_cells() is tc


def check_activations():
    """σ and tanh of the kernels against float64 torch over the whole range."""
    from hwbptt.torch import triton_cells as tc

    x = torch.cat([torch.linspace(-30, 30, 1201), torch.logspace(-9, 1.5, 300), -torch.logspace(-9, 1.5, 300), torch.tensor([0.0, 0.25, -0.25, 0.2499999])])
    N = x.numel()
    gi = torch.zeros(1, N, 3)  # H = 1: r = σ(x), z = σ(0), n = tanh(x) (gh = 0)
    gi[0, :, 0] = x
    gi[0, :, 2] = x
    tc.gru_gates(gi, torch.zeros_like(gi))
    xd = x.double()
    sig, th = gi[0, :, 0].double(), gi[0, :, 2].double()
    eps = 2.0**-24
    assert ((sig - torch.sigmoid(xd)).abs() <= 4 * eps * torch.sigmoid(xd) + 1e-37).all(), "sigmoid"
    err = (th - torch.tanh(xd)).abs() / torch.tanh(xd).abs().clamp_min(1e-30)
    assert (err <= 8 * eps).all(), f"tanh: {err.max().item()}"
    assert torch.equal(th[x == 0], torch.zeros_like(th[x == 0]))
    ends = [-1e4, 1e4, float("inf"), -float("inf")]
    big = torch.tensor([[ends + [0.0] * 4 + ends]])  # H = 4: r = σ(ends), n = tanh(ends)
    tc.gru_gates(big, torch.zeros_like(big))
    assert big[0, 0, 8:].tolist() == [-1.0, 1.0, 1.0, -1.0] and big[0, 0, :2].tolist() == [0.0, 1.0]


def check_lstm_gates():
    from hwbptt.torch import triton_cells as tc

    C = _c_kernels()
    for blocks in _sizes(tc):
        for seed, (T, B, H) in enumerate(SHAPES):
            pre, c0 = _lstm_inputs(T, B, H, seed)[:2]
            c0_nc = torch.randn(H, B).t()  # non-contiguous c0
            for c0_ in (c0, c0_nc):
                got_pre = pre.clone()
                got = tc.lstm_gates(got_pre, c0_)
                ref = ref_lstm_gates(pre, c0_)
                torch.testing.assert_close(got_pre, ref[0], **TOL32, msg=f"gates {blocks} {T, B, H}")
                for a, b in zip(got, ref[1:]):
                    assert a.shape == (T, B, H) and a.is_contiguous() and a.device == pre.device
                    torch.testing.assert_close(a, b, **TOL32)
                if C is not None:
                    c_pre = pre.clone()
                    want = C.lstm_gates(c_pre, c0_)
                    torch.testing.assert_close(got_pre, c_pre, **TOL32)
                    for a, b in zip(got, want):
                        torch.testing.assert_close(a, b, **TOL32)


def check_lstm_dpre():
    from hwbptt.torch import triton_cells as tc

    C = _c_kernels()
    for blocks in _sizes(tc):
        for seed, (T, B, H) in enumerate(SHAPES):
            _, c0, dc, m, gates, c, tanh_c = _lstm_inputs(T, B, H, seed)
            ref = ref_lstm_dpre(dc, m, gates, c, c0, tanh_c)
            got = tc.lstm_dpre(dc, m, gates, c, c0, tanh_c)
            assert got.shape == gates.shape and got.is_contiguous()
            torch.testing.assert_close(got, ref, **TOL32, msg=f"{blocks} {T, B, H}")
            # out= is written and returned; non-contiguous dc/m are taken
            out = torch.full_like(gates, float("nan"))
            dc_nc = dc.transpose(0, 1).contiguous().transpose(0, 1)
            got2 = tc.lstm_dpre(dc_nc, m, gates, c, c0, tanh_c, out=out)
            assert got2 is out
            torch.testing.assert_close(out, ref, **TOL32)
            if C is not None:
                torch.testing.assert_close(got, C.lstm_dpre(dc, m, gates, c, c0, tanh_c), **TOL32)


def check_gru_gates():
    from hwbptt.torch import triton_cells as tc

    C = _c_kernels()
    for blocks in _sizes(tc):
        for seed, (T, B, H) in enumerate(SHAPES):
            gi, gh = _gru_inputs(T, B, H, seed)[:2]
            gh_before = gh.clone()
            got = gi.clone()
            assert tc.gru_gates(got, gh) is None
            assert torch.equal(gh, gh_before)
            torch.testing.assert_close(got, ref_gru_gates(gi, gh), **TOL32, msg=f"{blocks} {T, B, H}")
            if C is not None:
                want = gi.clone()
                C.gru_gates(want, gh)
                torch.testing.assert_close(got, want, **TOL32)


def check_gru_dgates():
    from hwbptt.torch import triton_cells as tc

    C = _c_kernels()
    for blocks in _sizes(tc):
        for seed, (T, B, H) in enumerate(SHAPES):
            _, gh, h0, y, lam, gates = _gru_inputs(T, B, H, seed)
            ref_i, ref_h = ref_gru_dgates(lam, gates, gh, h0, y)
            dgi, dgh = tc.gru_dgates(lam, gates, gh, h0, y, True)
            torch.testing.assert_close(dgi, ref_i, **TOL32, msg=f"{blocks} {T, B, H}")
            torch.testing.assert_close(dgh, ref_h, **TOL32)
            out = torch.full_like(gates, float("nan"))
            none, dgh2 = tc.gru_dgates(lam, gates, gh, h0, y, False, out=out)
            assert none is None and dgh2 is out
            torch.testing.assert_close(out, ref_h, **TOL32)
            out = torch.full_like(gates, float("nan"))
            dgi3, dgh3 = tc.gru_dgates(lam.transpose(0, 1).contiguous().transpose(0, 1), gates, gh, h0, y, True, out=out)
            assert dgh3 is out and dgi3 is not out
            torch.testing.assert_close(dgi3, ref_i, **TOL32)
            torch.testing.assert_close(dgh3, ref_h, **TOL32)
            if C is not None:
                want_i, want_h = C.gru_dgates(lam, gates, gh, h0, y, True)
                torch.testing.assert_close(dgi, want_i, **TOL32)
                torch.testing.assert_close(dgh, want_h, **TOL32)


def check_out_contract_rejects():
    """A wrong ``out`` (dtype, shape, not contiguous) is refused, as by the C kernels."""
    from hwbptt.torch import triton_cells as tc

    _, c0, dc, m, gates, c, tanh_c = _lstm_inputs(2, 2, 4, 0)
    _, gh, h0, y, lam, ggates = _gru_inputs(2, 2, 4, 0)
    bad = [gates.double(), gates[:1].clone(), torch.empty(2, 16, 2).transpose(1, 2)]
    for out in bad:
        try:
            tc.lstm_dpre(dc, m, gates, c, c0, tanh_c, out=out)
        except AssertionError:
            pass
        else:
            raise AssertionError(f"lstm_dpre took out={tuple(out.shape)} {out.dtype}")
    for out in (ggates.double(), ggates[:1].clone()):
        try:
            tc.gru_dgates(lam, ggates, gh, h0, y, True, out=out)
        except AssertionError:
            pass
        else:
            raise AssertionError("gru_dgates took a wrong out")


def check_half_precision():
    """float16/bfloat16 storage: results in the storage dtype, float32 arithmetic (within
    one rounding of the float32 result on the same rounded inputs)."""
    from hwbptt.torch import triton_cells as tc

    T, B, H = 3, 2, 19
    for dtype, tol in ((torch.float16, dict(rtol=2e-3, atol=2e-3)), (torch.bfloat16, dict(rtol=1.6e-2, atol=1.6e-2))):
        pre, c0, dc, m, gates, c, tanh_c = _lstm_inputs(T, B, H, 1, dtype)
        up = lambda *ts: [t.float() for t in ts]  # noqa: E731
        got_pre = pre.clone()
        got = tc.lstm_gates(got_pre, c0)
        ref = ref_lstm_gates(*up(pre, c0))
        assert got_pre.dtype == dtype and all(t.dtype == dtype for t in got)
        torch.testing.assert_close(got_pre.float(), ref[0], **tol)
        for a, b in zip(got, ref[1:]):
            torch.testing.assert_close(a.float(), b, **tol)
        d = tc.lstm_dpre(dc, m, gates, c, c0, tanh_c)
        assert d.dtype == dtype
        torch.testing.assert_close(d.float(), ref_lstm_dpre(*up(dc, m, gates, c, c0, tanh_c)), **tol)
        gi, gh, h0, y, lam, ggates = _gru_inputs(T, B, H, 2, dtype)
        got_gi = gi.clone()
        tc.gru_gates(got_gi, gh)
        torch.testing.assert_close(got_gi.float(), ref_gru_gates(*up(gi, gh)), **tol)
        dgi, dgh = tc.gru_dgates(lam, ggates, gh, h0, y, True)
        ri, rh = ref_gru_dgates(*up(lam, ggates, gh, h0, y))
        assert dgi.dtype == dgh.dtype == dtype
        torch.testing.assert_close(dgi.float(), ri, **tol)
        torch.testing.assert_close(dgh.float(), rh, **tol)


def check_empty():
    from hwbptt.torch import triton_cells as tc

    pre = torch.empty(0, 2, 12)
    c, t_, g = tc.lstm_gates(pre, torch.zeros(2, 3))
    assert c.shape == (0, 2, 3)
    gates = torch.empty(0, 2, 9)
    tc.gru_gates(gates, torch.empty(0, 2, 9))
    dgi, dgh = tc.gru_dgates(torch.empty(0, 2, 3), gates, gates, torch.zeros(2, 3), torch.empty(0, 2, 3), True)
    assert dgi.shape == dgh.shape == (0, 2, 9)


def check_fused_dispatch():
    """``fused`` on CUDA tensors: ``supports`` asks for the Triton kernels, and each of the
    four functions hands its arguments (``out=`` and ``with_input`` included) to its
    Triton twin. Stand-ins with a CUDA ``device`` play the tensors (there is no GPU here;
    ``supports`` and the dispatch read only ``device``, ``dtype`` and ``requires_grad``)."""
    import os
    from types import SimpleNamespace

    from hwbptt.torch import fused, triton_cells as tc

    def fake(dtype=torch.float32, index=0, grad=False):
        return SimpleNamespace(device=torch.device("cuda", index), dtype=dtype, requires_grad=grad)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert fused.supports(fake(dtype), fake(dtype)), dtype
    assert not fused.supports(fake(torch.float64), fake(torch.float64))
    assert not fused.supports(fake(), fake(torch.float16))
    assert not fused.supports(fake(), fake(index=1))
    assert not fused.supports(fake(), torch.zeros(1))
    with torch.enable_grad():
        assert not fused.supports(fake(), fake(grad=True))
    with torch.no_grad():
        assert fused.supports(fake(), fake(grad=True))
    os.environ["HWBPTT_KERNELS"] = "0"
    try:
        assert not fused.supports(fake(), fake())
    finally:
        del os.environ["HWBPTT_KERNELS"]
    assert not fused.supports(torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float16))  # CPU: C kernels only

    calls = []
    saved = {n: getattr(tc, n) for n in ("lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates")}
    try:
        for n in saved:
            setattr(tc, n, lambda *a, _n=n, **k: calls.append((_n, a, k)) or _n)
        x, o = fake(), fake()
        assert fused.lstm_gates(x, 1) == "lstm_gates"
        assert fused.lstm_dpre(x, 1, x, 2, 3, 4, out=o) == "lstm_dpre"
        assert fused.gru_gates(x, 5) == "gru_gates"
        assert fused.gru_dgates(x, x, 6, 7, 8, False, out=o) == "gru_dgates"
    finally:
        for n, f in saved.items():
            setattr(tc, n, f)
    assert calls == [
        ("lstm_gates", (x, 1), {}),
        ("lstm_dpre", (x, 1, x, 2, 3, 4), {"out": o}),
        ("gru_gates", (x, 5), {}),
        ("gru_dgates", (x, x, 6, 7, 8, False), {"out": o}),
    ], calls


def _swap_in(tc):
    """Point ``fused``'s four functions at the Triton kernels (the tapes call them through
    the module), as its CUDA dispatch does."""
    from hwbptt.torch import fused

    for name in ("lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates"):
        setattr(fused, name, getattr(tc, name))


def check_fast_tapes_on_triton_kernels():
    """The fast tapes with the Triton kernels in place of the C ones against the eager
    tapes: values, highway adjoints (both LSTM splits) and input gradients."""
    from hwbptt import HighwayOptions
    from hwbptt.torch import triton_cells as tc
    from hwbptt.torch.gru_math import FastGRUTape, GRUTape, GRUWeights
    from hwbptt.torch.lstm_math import FastLSTMTape, LSTMTape, LSTMWeights

    _swap_in(tc)
    _blocks(tc, 32, 32, 16)
    tol = dict(rtol=1e-4, atol=1e-5)
    needs = {n: True for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")}
    needs["w_hr"] = False
    g = _gen(7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    T, B, I, H = 5, 3, 4, 18
    w = LSTMWeights(r(4 * H, I), r(4 * H, H), r(4 * H), r(4 * H), None)
    x, y, h0, c0 = r(B, T, I).transpose(0, 1), r(T, B, H), r(B, H), r(B, H)
    ref, fast = LSTMTape(x, y, h0, c0, w), FastLSTMTape(x, y, h0, c0, w)
    for name in ("gates", "c", "tanh_c", "readout_gain", "f_next"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), **tol, msg=name)
    lh = r(B, T, H).transpose(0, 1)
    lc = torch.zeros(T, B, H)
    lc[-1] = r(B, H)
    for split in ("gates", "step"):
        opts = HighwayOptions(iterations=2, split=split)
        dc_r, wh_r, _ = ref.highway(lh, lc, opts)
        dc_f, wh_f, _ = fast.highway(lh, lc, opts)
        torch.testing.assert_close(dc_f, dc_r, **tol)
        torch.testing.assert_close(wh_f, wh_r, **tol)
        g_r, g_f = ref.input_grads(dc_r, wh_r, needs), fast.input_grads(dc_f, wh_f, needs)
        for n in g_r:
            if g_r[n] is not None:
                torch.testing.assert_close(g_f[n], g_r[n], **tol, msg=n)
    wg = GRUWeights(r(3 * H, I), r(3 * H, H), r(3 * H), r(3 * H))
    ref, fast = GRUTape(x, y, h0, wg), FastGRUTape(x, y, h0, wg)
    for name in ("r", "z", "n", "gh_n", "z_next"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), **tol, msg=name)
    w_r, _ = ref.highway(lh, HighwayOptions(iterations=2))
    w_f, _ = fast.highway(lh, HighwayOptions(iterations=2))
    torch.testing.assert_close(w_f, w_r, **tol)
    g_r, g_f = ref.input_grads(w_r, needs), fast.input_grads(w_f, needs)
    for n in g_r:
        if g_r[n] is not None:
            torch.testing.assert_close(g_f[n], g_r[n], **tol, msg=n)


def check_fast_tapes_half_precision():
    """The fast tapes on the Triton kernels with float16/bfloat16 tensors (the dtypes the
    CUDA dispatch adds) against the eager float32 tapes on the same inputs: adjoints and
    input gradients within the storage dtype's precision, relative to their largest
    entry (measured: about 1.5e-3 float16, 2e-2 bfloat16; the eager tapes in these
    dtypes are as far off)."""
    from hwbptt import HighwayOptions
    from hwbptt.torch import triton_cells as tc
    from hwbptt.torch.gru_math import FastGRUTape, GRUTape, GRUWeights
    from hwbptt.torch.lstm_math import FastLSTMTape, LSTMTape, LSTMWeights

    _swap_in(tc)
    needs = {n: True for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")}
    needs["w_hr"] = False
    g = _gen(8)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    T, B, I, H = 5, 3, 4, 18
    wl = LSTMWeights(r(4 * H, I), r(4 * H, H), r(4 * H), r(4 * H), None)
    wg = GRUWeights(r(3 * H, I), r(3 * H, H), r(3 * H), r(3 * H))
    x, y, h0, c0 = r(B, T, I).transpose(0, 1), r(T, B, H), r(B, H), r(B, H)
    lh = r(B, T, H).transpose(0, 1)
    lc = torch.zeros(T, B, H)
    lc[-1] = r(B, H)

    def close(got, want, rel, what):
        err = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err <= rel, f"{what}: {err}"

    for dtype, rel in ((torch.float16, 1e-2), (torch.bfloat16, 6e-2)):
        cv = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        for split in ("gates", "step"):
            opts = HighwayOptions(iterations=2, split=split)
            ref = LSTMTape(x, y, h0, c0, wl)
            dc_r, wh_r, _ = ref.highway(lh, lc, opts)
            g_r = ref.input_grads(dc_r, wh_r, needs)
            fast = FastLSTMTape(cv(x), cv(y), cv(h0), cv(c0), LSTMWeights(*(cv(t) for t in (wl.w_ih, wl.w_hh, wl.b_ih, wl.b_hh, wl.w_hr))))
            dc_f, wh_f, _ = fast.highway(cv(lh), cv(lc), opts)
            assert dc_f.dtype == wh_f.dtype == dtype
            close(dc_f, dc_r, rel, f"lstm dc {dtype} {split}")
            close(wh_f, wh_r, rel, f"lstm wh {dtype} {split}")
            g_f = fast.input_grads(dc_f, wh_f, needs)
            for n in g_r:
                if g_r[n] is not None:
                    close(g_f[n], g_r[n], rel, f"lstm {n} {dtype} {split}")
        opts = HighwayOptions(iterations=2)
        ref = GRUTape(x, y, h0, wg)
        w_r, _ = ref.highway(lh, opts)
        g_r = ref.input_grads(w_r, needs)
        fast = FastGRUTape(cv(x), cv(y), cv(h0), GRUWeights(*(cv(t) for t in (wg.w_ih, wg.w_hh, wg.b_ih, wg.b_hh))))
        w_f, _ = fast.highway(cv(lh), opts)
        close(w_f, w_r, rel, f"gru w {dtype}")
        g_f = fast.input_grads(w_f, needs)
        for n in g_r:
            if g_r[n] is not None:
                close(g_f[n], g_r[n], rel, f"gru {n} {dtype}")


CHECKS = [
    check_fused_import_is_triton_free,  # first: before anything imports Triton
    check_available,
    check_activations,
    check_lstm_gates,
    check_lstm_dpre,
    check_gru_gates,
    check_gru_dgates,
    check_out_contract_rejects,
    check_half_precision,
    check_empty,
    check_fused_dispatch,
    check_fast_tapes_on_triton_kernels,  # last ones: they rebind fused's functions
    check_fast_tapes_half_precision,
]


def compile_for_gpu() -> str:
    """Compile every kernel, for each storage dtype, to a CUDA binary for sm_90 (H100)
    with Triton's own toolchain: no GPU needed, nothing run. ``"ok"``, ``"skip: why"``
    when Triton has no CUDA backend or ``ptxas`` here; raises on a compilation error."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        return "skip: Triton has no CUDA backend here"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # depends on the Triton version and installation
        return f"skip: no ptxas found ({exc})"
    if not ptxas:
        return "skip: no ptxas found"
    from hwbptt.torch import triton_cells as tc

    row = {"BLOCK_R": 4, "BLOCK_H": 256}
    kernels = [
        (tc._lstm_gates_kernel, {"BLOCK_B": 2, "BLOCK_H": 128}),
        (tc._lstm_dpre_kernel, row),
        (tc._gru_gates_kernel, row),
        (tc._gru_dgates_kernel, dict(row, WITH_INPUT=True)),
        (tc._gru_dgates_kernel, dict(row, WITH_INPUT=False)),
    ]
    target = GPUTarget("cuda", 90, 32)
    for ty in ("fp32", "fp16", "bf16"):
        for fn, const in kernels:
            sig = {n: "constexpr" if n in const else "i32" if n in ("T", "B", "H", "R") else "*" + ty for n in fn.arg_names}
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
            assert compiled.asm.get("cubin"), (fn.__name__, ty)
    return "ok"


def main() -> None:
    if sys.argv[1:] == ["compile"]:
        try:
            result = compile_for_gpu()
        except Exception:
            result = traceback.format_exc()[-3000:]
        print("TRITON_CELLS_COMPILE " + json.dumps(result))
        return
    results = {}
    for check in CHECKS:
        try:
            check()
            results[check.__name__] = "ok"
        except Exception:
            results[check.__name__] = traceback.format_exc()[-3000:]
    print("TRITON_CELLS_RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
