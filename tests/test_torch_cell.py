"""HighwayRNN (hwbptt.torch.cell) against autograd through a plain Python loop and
against a Highway-BP reference built here from per-step Jacobians.

The reference: for every step, the full Jacobian ``M_t = ∂s_t/∂s_{t-1}`` of the flattened
state (``torch.autograd.functional.jacobian``), the residual ``K_t = diag(a_t)`` with
``a_t`` computed here from the cell's weights (forget gate, update gate, 1, ...),
``J_t = M_t - K_t``, and the recursions of the design note run sequentially with dense
matrices. Parameter, input and initial-state gradients then follow from the adjoint
``w`` by one autograd call on ``Σ_t <w_t, F(x_t, s_{t-1})>``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from hwbptt.options import Diagnostics
from hwbptt.torch.cell import HighwayRNN

T, B, I = 7, 2, 3


# ----------------------------------------------------------------------------- cells


class ResidualCell(nn.Module):
    """s_t = s_{t-1} + tanh(W x_t + U s_{t-1}): residual "identity"."""

    def __init__(self, i, h):
        super().__init__()
        self.W = nn.Linear(i, h)
        self.U = nn.Linear(h, h, bias=False)
        self.hidden = h

    def forward(self, x, s):
        return s + torch.tanh(self.W(x) + self.U(s))

    def initial_state(self, batch, device, dtype):
        return torch.zeros(batch, self.hidden, device=device, dtype=dtype)


class GatedCell(nn.Module):
    """Tuple state (h, m) of different sizes: m_t = σ(V x_t) ⊙ m_{t-1} + tanh(W x_t + U h_{t-1}),
    h_t = tanh(P m_t). Residual: σ(V x_t) on m, none on h (a callable)."""

    def __init__(self, i, hh, hm):
        super().__init__()
        self.V = nn.Linear(i, hm)
        self.W = nn.Linear(i, hm)
        self.U = nn.Linear(hh, hm, bias=False)
        self.P = nn.Linear(hm, hh, bias=False)

    def forward(self, x, state):
        h, m = state
        m = torch.sigmoid(self.V(x)) * m + torch.tanh(self.W(x) + self.U(h))
        return (torch.tanh(self.P(m)), m)


def gated_residual(x, prev, new):
    return (None, torch.sigmoid(gated_residual.cell.V(x)))


def _lstm_a(cell, x, prev):
    h, c = prev
    w_f = cell.weight_ih.chunk(4)[1]
    u_f = cell.weight_hh.chunk(4)[1]
    f = torch.sigmoid(x @ w_f.T + h @ u_f.T + cell.bias_ih.chunk(4)[1] + cell.bias_hh.chunk(4)[1])
    return torch.cat([torch.zeros_like(h), f], -1)


def _gru_a(cell, x, prev):
    (h,) = prev
    z = torch.sigmoid(
        x @ cell.weight_ih.chunk(3)[1].T + h @ cell.weight_hh.chunk(3)[1].T
        + cell.bias_ih.chunk(3)[1] + cell.bias_hh.chunk(3)[1]
    )
    return z


def _identity_a(cell, x, prev):
    return torch.ones_like(prev[0])


def _gated_a(cell, x, prev):
    h, m = prev
    return torch.cat([torch.zeros_like(h), torch.sigmoid(cell.V(x))], -1)


def make_case(kind, dtype=torch.float64, seed=0):
    """(cell, residual option, a_fn, initial state as a tuple of components, is_tuple)."""
    torch.manual_seed(seed)
    if kind == "lstm":
        cell = nn.LSTMCell(I, 4)
        with torch.no_grad():
            cell.bias_ih.chunk(4)[1].add_(1.0)  # some memory on the highway
        res, a_fn, sizes, is_tuple = None, _lstm_a, [4, 4], True
    elif kind == "gru":
        cell = nn.GRUCell(I, 4)
        res, a_fn, sizes, is_tuple = None, _gru_a, [4], False
    elif kind == "identity":
        cell = ResidualCell(I, 4)
        with torch.no_grad():
            cell.U.weight.mul_(0.5)
        res, a_fn, sizes, is_tuple = "identity", _identity_a, [4], False
    elif kind == "callable":
        cell = GatedCell(I, 3, 5)
        gated_residual.cell = cell
        res, a_fn, sizes, is_tuple = gated_residual, _gated_a, [3, 5], True
    else:
        raise AssertionError(kind)
    cell = cell.to(dtype)
    s0 = tuple(0.5 * torch.randn(B, n, dtype=dtype) for n in sizes)
    return cell, res, a_fn, s0, is_tuple


KINDS = ["lstm", "gru", "identity", "callable"]


# ----------------------------------------------------------------------------- references


def pack(comps, is_tuple):
    return tuple(comps) if is_tuple else comps[0]


def comps_of(state):
    return tuple(state) if isinstance(state, tuple) else (state,)


def flat(comps):
    return torch.cat([c.reshape(c.shape[0], -1) for c in comps], -1)


def unflat(s, sizes):
    return list(torch.split(s, sizes, -1))


def plain_loop(cell, x, s0, is_tuple):
    """The BPTT reference: autograd through a Python loop. Returns stacked components."""
    state, hist = pack(s0, is_tuple), []
    for t in range(x.shape[0]):
        state = cell(x[t], state)
        hist.append(comps_of(state))
    return [torch.stack(h) for h in zip(*hist)]


def make_loss_weights(x, s0, seed=1):
    g = torch.Generator().manual_seed(seed)
    G_out = torch.randn(x.shape[0], *s0[0].shape, generator=g, dtype=x.dtype)
    G_fin = [torch.randn(c.shape, generator=g, dtype=x.dtype) for c in s0]
    return G_out, G_fin


def loss_of(outputs, final, G_out, G_fin):
    """Depends on every step's output and on every component of the final state."""
    return (G_out * outputs).sum() + sum((g * f).sum() for g, f in zip(G_fin, comps_of(final)))


def local_grads(G_out, G_fin):
    """ℓ_t of that loss, flattened like the state: (T, B, N)."""
    Tn = G_out.shape[0]
    ell = [torch.zeros(Tn, *g.shape, dtype=g.dtype) for g in G_fin]
    ell[0] = ell[0] + G_out
    for i, g in enumerate(G_fin):
        ell[i][-1] += g
    return torch.stack([flat([e[t] for e in ell]) for t in range(Tn)])


def step_jacobians(cell, x, s0, is_tuple):
    """Saved previous states (T, B, N) and per-row Jacobians M_t = ∂s_t/∂s_{t-1} (T, B, N, N)."""
    sizes = [c.shape[-1] for c in s0]
    with torch.no_grad():
        stacked = plain_loop(cell, x, s0, is_tuple)
    prev = torch.stack([flat(s0)] + [flat([s[t] for s in stacked]) for t in range(x.shape[0] - 1)])
    Ms = []
    for t in range(x.shape[0]):
        f = lambda s: flat(comps_of(cell(x[t], pack(unflat(s, sizes), is_tuple))))  # noqa: E731
        Jfull = torch.autograd.functional.jacobian(f, prev[t])  # (B, N, B, N)
        nb = Jfull.shape[0]
        # Rows are independent: no cross-row blocks (checks the reference's own assumption).
        for b in range(nb):
            for b2 in range(nb):
                if b != b2:
                    assert Jfull[b, :, b2, :].abs().max() == 0
        Ms.append(torch.stack([Jfull[b, :, b, :] for b in range(nb)]))
    return prev, torch.stack(Ms)


def residual_diag(cell, a_fn, x, prev, sizes):
    with torch.no_grad():
        return torch.stack([a_fn(cell, x[t], unflat(prev[t], sizes)) for t in range(x.shape[0])])


def reference_adjoints(M, A, ell, k, gamma=0.0):
    """w^0 .. w^k of the design note (section 2), sequentially, with dense matrices."""
    Tn = ell.shape[0]
    Kp = (1.0 - gamma) * A
    Jp = M - torch.diag_embed(Kp)

    def scan(b):
        w = [None] * Tn
        w[Tn - 1] = b[Tn - 1]
        for t in range(Tn - 2, -1, -1):
            w[t] = b[t] + w[t + 1] * Kp[t + 1]
        return torch.stack(w)

    ws = [scan(ell)]
    for _ in range(k):
        prev_w = ws[-1]
        v = torch.zeros_like(ell)
        v[:-1] = torch.einsum("tbi,tbij->tbj", prev_w[1:], Jp[1:])
        ws.append(scan(ell + v))
    return ws


def exact_adjoint(M, ell):
    """BPTT: w_{T-1} = ℓ_{T-1}, w_t = ℓ_t + w_{t+1} M_{t+1}."""
    w = [None] * ell.shape[0]
    w[-1] = ell[-1]
    for t in range(ell.shape[0] - 2, -1, -1):
        w[t] = ell[t] + torch.einsum("bi,bij->bj", w[t + 1], M[t + 1])
    return torch.stack(w)


def grads_from_adjoint(cell, x, s0, prev, w, is_tuple):
    """Σ_t w_t ∂F/∂θ, w_t ∂F/∂x_t, w_0 ∂F/∂s_{-1}, by autograd on Σ_t <w_t, F(x_t, s_{t-1})>."""
    sizes = [c.shape[-1] for c in s0]
    xl = x.detach().clone().requires_grad_(True)
    s0l = [c.detach().clone().requires_grad_(True) for c in s0]
    total = 0.0
    for t in range(x.shape[0]):
        p = s0l if t == 0 else unflat(prev[t].detach(), sizes)
        total = total + (w[t].detach() * flat(comps_of(cell(xl[t], pack(p, is_tuple))))).sum()
    params = [p for p in cell.parameters() if p.requires_grad]
    g = torch.autograd.grad(total, params + [xl] + s0l)
    return list(g)


def module_grads(m, x, s0, is_tuple, G_out, G_fin):
    xl = x.detach().clone().requires_grad_(True)
    s0l = [c.detach().clone().requires_grad_(True) for c in s0]
    out, fin = m(xl, pack(s0l, is_tuple))
    loss = loss_of(out, fin, G_out, G_fin)
    params = [p for p in m.cell.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params + [xl] + s0l)), out, fin


def loop_grads(cell, x, s0, is_tuple, G_out, G_fin):
    xl = x.detach().clone().requires_grad_(True)
    s0l = [c.detach().clone().requires_grad_(True) for c in s0]
    stacked = plain_loop(cell, xl, s0l, is_tuple)
    final = pack([s[-1] for s in stacked], is_tuple)
    loss = loss_of(stacked[0], final, G_out, G_fin)
    params = [p for p in cell.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params + [xl] + s0l)), stacked


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def max_rel(ga, gb):
    return max(rel(a, b) for a, b in zip(ga, gb))


def setup(kind, dtype=torch.float64, seed=0, steps=T):
    cell, res, a_fn, s0, is_tuple = make_case(kind, dtype, seed)
    x = torch.randn(steps, B, I, dtype=dtype)
    G_out, G_fin = make_loss_weights(x, s0)
    return cell, res, a_fn, s0, is_tuple, x, G_out, G_fin


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("iterations", [None, 2])
def test_outputs_equal_the_loop(kind, iterations):
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup(kind)
    m = HighwayRNN(cell, residual=res, iterations=iterations)
    xl = x.clone().requires_grad_(True)
    out, fin = m(xl, pack(s0, is_tuple))
    with torch.no_grad():
        ref = plain_loop(cell, x, s0, is_tuple)
    assert out.shape == ref[0].shape
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
    assert isinstance(fin, tuple) == is_tuple
    for f, r in zip(comps_of(fin), ref):
        torch.testing.assert_close(f, r[-1], rtol=0, atol=0)
    assert out.requires_grad
    with torch.no_grad():
        out2, fin2 = m(xl, pack(s0, is_tuple))
    assert out2.grad_fn is None
    torch.testing.assert_close(out2, ref[0], rtol=0, atol=0)


def test_lstm_outputs_are_h_and_final_is_h_c():
    cell, res, _, s0, is_tuple, x, _, _ = setup("lstm")
    out, (h, c) = HighwayRNN(cell)(x, s0)
    with torch.no_grad():
        hs, cs = plain_loop(cell, x, s0, True)
    torch.testing.assert_close(out, hs, rtol=0, atol=0)
    torch.testing.assert_close(h, hs[-1], rtol=0, atol=0)
    torch.testing.assert_close(c, cs[-1], rtol=0, atol=0)
    assert not torch.equal(h, c)


@pytest.mark.parametrize("kind", ["lstm", "gru", "identity"])
def test_default_initial_state_is_zeros(kind):
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup(kind)
    zeros = tuple(torch.zeros_like(c) for c in s0)
    m = HighwayRNN(cell, residual=res, iterations=T)
    xl = x.clone().requires_grad_(True)
    out, _ = m(xl)
    ref = plain_loop(cell, x, zeros, is_tuple)
    torch.testing.assert_close(out, ref[0].detach(), rtol=0, atol=0)
    # Gradients with the default state (nothing to return for it).
    gx = torch.autograd.grad((G_out * out).sum(), xl)[0]
    xr = x.clone().requires_grad_(True)
    gr = torch.autograd.grad((G_out * plain_loop(cell, xr, zeros, is_tuple)[0]).sum(), xr)[0]
    assert rel(gx, gr) <= 1e-10


def test_batch_first_and_unbatched():
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup("gru")
    m = HighwayRNN(cell, iterations=T)
    ref_out, ref_fin = HighwayRNN(cell, iterations=T)(x, s0[0])

    mb = HighwayRNN(cell, batch_first=True, iterations=T)
    xb = x.transpose(0, 1).clone().requires_grad_(True)
    out_b, fin_b = mb(xb, s0[0])
    assert out_b.shape == (B, T, 4) and fin_b.shape == (B, 4)
    torch.testing.assert_close(out_b, ref_out.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(fin_b, ref_fin, rtol=0, atol=0)
    g_b = torch.autograd.grad((G_out.transpose(0, 1) * out_b).sum(), xb)[0]
    xt = x.clone().requires_grad_(True)
    g_t = torch.autograd.grad((G_out * m(xt, s0[0])[0]).sum(), xt)[0]
    assert rel(g_b, g_t.transpose(0, 1)) <= 1e-12

    # Unbatched (T, I) with an unbatched state (H,): same as batch row 0; batch_first ignored.
    for layer in (m, mb):
        xu = x[:, 0].clone().requires_grad_(True)
        out_u, fin_u = layer(xu, s0[0][0])
        assert out_u.shape == (T, 4) and fin_u.shape == (4,)
        torch.testing.assert_close(out_u, ref_out[:, 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fin_u, ref_fin[0], rtol=1e-12, atol=1e-12)
        g_u = torch.autograd.grad((G_out[:, 0] * out_u).sum(), xu)[0]
        assert rel(g_u, g_t[:, 0]) <= 1e-10
    out_u0, fin_u0 = m(x[:, 0])  # default zero state, unbatched
    assert out_u0.shape == (T, 4) and fin_u0.shape == (4,)


# ----------------------------------------------------------------------------- exact gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_exact_mode_equals_loop_bptt(kind, dtype, tol):
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup(kind, dtype)
    ref, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
    got, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=None), x, s0, is_tuple, G_out, G_fin)
    assert len(got) == len(ref)
    assert max_rel(got, ref) <= tol


@pytest.mark.parametrize("kind", KINDS)
def test_iterations_T_equals_exact(kind):
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup(kind)
    ref, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
    m = HighwayRNN(cell, residual=res, iterations=T, diagnostics=True)
    got, _, _ = module_grads(m, x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got, ref) <= 1e-10
    assert m.last_diagnostics.iterations == T
    # More than T is capped at T (T iterations already give the exact gradient).
    m.iterations = 10 * T
    got, _, _ = module_grads(m, x, s0, is_tuple, G_out, G_fin)
    assert m.last_diagnostics.iterations == T
    assert max_rel(got, ref) <= 1e-10
    # And fewer is not exact (the check above can fail).
    m.iterations = 1
    got, _, _ = module_grads(m, x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got, ref) > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_iterations_T_float32(kind):
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup(kind, torch.float32)
    ref, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
    got, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=T), x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got, ref) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_last_k_plus_1_positions_exact(kind, seed):
    Tn = 9
    k = random.Random(f"{kind}-{seed}").randrange(0, Tn - 1)  # k < T - 1: something is inexact
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup(kind, seed=seed, steps=Tn)
    ref, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
    got, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=k), x, s0, is_tuple, G_out, G_fin)
    n_params = len(list(cell.parameters()))
    gx, rx = got[n_params], ref[n_params]
    for t in range(Tn - 1 - k, Tn):
        assert rel(gx[t], rx[t]) <= 1e-10, (k, t)
    assert rel(gx[Tn - 2 - k], rx[Tn - 2 - k]) > 1e-8, k
    # The initial state's gradient w_0 ∂F/∂s_{-1} needs w_0: exact at k = T-1, not at T-2.
    got_a, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=Tn - 1), x, s0, is_tuple, G_out, G_fin)
    got_b, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=Tn - 2), x, s0, is_tuple, G_out, G_fin)
    for i in range(len(s0)):
        assert rel(got_a[n_params + 1 + i], ref[n_params + 1 + i]) <= 1e-10
    assert max(rel(got_b[n_params + 1 + i], ref[n_params + 1 + i]) for i in range(len(s0))) > 1e-8


# ----------------------------------------------------------------------------- against the Jacobian reference


def _reference_case(kind, k, gamma, seed=0):
    cell, res, a_fn, s0, is_tuple, x, G_out, G_fin = setup(kind, seed=seed)
    sizes = [c.shape[-1] for c in s0]
    prev, M = step_jacobians(cell, x, s0, is_tuple)
    A = residual_diag(cell, a_fn, x, prev, sizes)
    ell = local_grads(G_out, G_fin)
    ws = reference_adjoints(M, A, ell, k, gamma)
    return cell, res, s0, is_tuple, x, G_out, G_fin, prev, M, A, ell, ws


def test_reference_is_sound():
    """The reference's own checks: T iterations give BPTT's adjoint, whose gradients equal
    autograd through the loop; the LSTM forget gate is the c -> c block of the Jacobian."""
    for kind in KINDS:
        cell, res, s0, is_tuple, x, G_out, G_fin, prev, M, A, ell, ws = _reference_case(kind, T, 0.0)
        w_exact = exact_adjoint(M, ell)
        assert rel(ws[T], w_exact) <= 1e-12
        ref, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
        assert max_rel(grads_from_adjoint(cell, x, s0, prev, w_exact, is_tuple), ref) <= 1e-10
        if kind == "lstm":
            torch.testing.assert_close(M[..., 4:, 4:], torch.diag_embed(A[..., 4:]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_k0_equals_residual_only_reference(kind):
    cell, res, s0, is_tuple, x, G_out, G_fin, prev, M, A, ell, ws = _reference_case(kind, 0, 0.0)
    ref = grads_from_adjoint(cell, x, s0, prev, ws[0], is_tuple)
    got, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=0), x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got, ref) <= 1e-10
    exact, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got, exact) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_gamma_1_equals_fpi_reference(kind):
    k = 2
    cell, res, s0, is_tuple, x, G_out, G_fin, prev, M, A, ell, _ = _reference_case(kind, k, 1.0)
    # FPI, written out separately: w^0 = ℓ, w^{k+1}_t = ℓ_t + w^k_{t+1} M_{t+1}.
    w = ell.clone()
    for _ in range(k):
        nxt = ell.clone()
        nxt[:-1] += torch.einsum("tbi,tbij->tbj", w[1:], M[1:])
        w = nxt
    ref = grads_from_adjoint(cell, x, s0, prev, w, is_tuple)
    got, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=k, gamma=1.0), x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got, ref) <= 1e-10
    # residual="none" is the same algorithm.
    got_none, _, _ = module_grads(HighwayRNN(cell, residual="none", iterations=k), x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got_none, ref) <= 1e-10
    if kind != "identity":  # differs from Highway-BP with the residual
        got_hw, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=k), x, s0, is_tuple, G_out, G_fin)
        assert max_rel(got_hw, ref) > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_k_and_gamma_equal_reference(kind):
    rng = random.Random(kind)
    k, gamma = rng.randrange(1, T - 1), rng.choice([0.0, 0.3, 0.7])
    cell, res, s0, is_tuple, x, G_out, G_fin, prev, M, A, ell, ws = _reference_case(kind, k, gamma)
    ref = grads_from_adjoint(cell, x, s0, prev, ws[k], is_tuple)
    got, _, _ = module_grads(HighwayRNN(cell, residual=res, iterations=k, gamma=gamma), x, s0, is_tuple, G_out, G_fin)
    assert max_rel(got, ref) <= 1e-10


# ----------------------------------------------------------------------------- tol and diagnostics


@pytest.mark.parametrize("kind", KINDS)
def test_diagnostics_match_reference(kind):
    k = 3
    cell, res, s0, is_tuple, x, G_out, G_fin, prev, M, A, ell, ws = _reference_case(kind, k, 0.0)
    m = HighwayRNN(cell, residual=res, iterations=k, diagnostics="debug")
    assert m.last_diagnostics is None
    module_grads(m, x, s0, is_tuple, G_out, G_fin)
    d = m.last_diagnostics
    assert isinstance(d, Diagnostics)
    assert d.iterations == k
    expected = [rel(ws[j], ws[j - 1]) * float(ws[j - 1].norm()) / float(ws[j].norm()) for j in range(1, k + 1)]
    assert len(d.update_norms) == k
    for a, b in zip(d.update_norms, expected):
        assert math.isclose(a, b, rel_tol=1e-8)
    w_exact = exact_adjoint(M, ell)
    cos = float((ws[k] * w_exact).sum() / (ws[k].norm() * w_exact.norm()))
    assert math.isclose(d.cosine, cos, rel_tol=1e-10)
    assert d.cosine < 1 - 1e-12

    m2 = HighwayRNN(cell, residual=res, iterations=k, diagnostics=True)
    module_grads(m2, x, s0, is_tuple, G_out, G_fin)
    assert m2.last_diagnostics.cosine is None and len(m2.last_diagnostics.update_norms) == k


def test_tol_stops_early():
    Tn = 16
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup("gru", steps=Tn)
    exact, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
    tol = 1e-4
    m = HighwayRNN(cell, iterations=None, tol=tol, diagnostics=True)
    got, _, _ = module_grads(m, x, s0, is_tuple, G_out, G_fin)
    d = m.last_diagnostics
    assert 0 < d.iterations < Tn
    assert len(d.update_norms) == d.iterations
    assert d.update_norms[-1] <= tol
    assert all(u > tol for u in d.update_norms[:-1])
    assert max_rel(got, exact) <= 1e-2
    # tol with an iteration cap below the stopping point: stops at the cap.
    m.iterations = 1
    module_grads(m, x, s0, is_tuple, G_out, G_fin)
    assert m.last_diagnostics.iterations == 1 and m.last_diagnostics.update_norms[0] > tol


def test_options_are_validated_attributes():
    cell = nn.GRUCell(I, 4)
    with pytest.raises(ValueError, match="iterations"):
        HighwayRNN(cell, iterations=-1)
    with pytest.raises(TypeError, match="iterations"):
        HighwayRNN(cell, iterations=1.5)
    with pytest.raises(ValueError, match="tol"):
        HighwayRNN(cell, tol=0.0)
    with pytest.raises(ValueError, match="gamma"):
        HighwayRNN(cell, gamma=1.5)
    with pytest.raises(ValueError, match="diagnostics"):
        HighwayRNN(cell, diagnostics="verbose")
    with pytest.raises(TypeError, match="batch_first"):
        HighwayRNN(cell, batch_first="yes")
    with pytest.raises(TypeError, match="cell"):
        HighwayRNN(42)
    m = HighwayRNN(cell)
    m.iterations = 5
    assert m.iterations == 5
    with pytest.raises(ValueError, match="iterations=-2"):
        m.iterations = -2
    assert m.iterations == 5
    assert list(m.state_dict()) == ["cell." + k for k in cell.state_dict()]


# ----------------------------------------------------------------------------- refusals


class BNCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(I + 4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, s):
        return torch.tanh(self.bn(self.lin(torch.cat([x, s], -1))))


class DropoutCell(ResidualCell):
    def __init__(self):
        super().__init__(I, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, s):
        return s + self.drop(torch.tanh(self.W(x) + self.U(s)))


class BatchMeanCell(ResidualCell):
    """Mixes batch rows without a BatchNorm module: subtracts the batch mean."""

    def forward(self, x, s):
        z = self.W(x) + self.U(s)
        return s + torch.tanh(z - z.mean(0, keepdim=True))


class NoisyCell(ResidualCell):
    """Random without a dropout module."""

    def forward(self, x, s):
        return s + torch.tanh(self.W(x) + self.U(s)) + 0.1 * torch.randn_like(s)


def test_batchnorm_cell_refused_in_training_only():
    cell = BNCell().double()
    x = torch.randn(T, B + 2, I, dtype=torch.float64, requires_grad=True)
    s0 = torch.zeros(B + 2, 4, dtype=torch.float64)
    m = HighwayRNN(cell, iterations=2)
    with pytest.raises(RuntimeError, match="BatchNorm.*mixes batch rows"):
        m(x, s0)
    # Exact BPTT and inference are fine with it; in eval mode Highway-BP is too.
    m.iterations = None
    m(x, s0)[0].sum().backward()
    m.eval()
    m.iterations = T
    xl = x.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(m(xl, s0)[0].sum(), xl)[0]
    xr = x.detach().clone().requires_grad_(True)
    gr = torch.autograd.grad(plain_loop(cell, xr, (s0,), False)[0].sum(), xr)[0]
    assert rel(g, gr) <= 1e-10


def test_dropout_cell_refused():
    cell = DropoutCell().double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="dropout.*random"):
        HighwayRNN(cell, residual="identity")(x)


@pytest.mark.parametrize("cls", [BatchMeanCell, NoisyCell])
def test_recompute_mismatch_refused(cls):
    cell = cls(I, 4).double()
    x = torch.randn(T, 3, I, dtype=torch.float64, requires_grad=True)
    out, _ = HighwayRNN(cell, residual="identity", iterations=2)(x)
    with pytest.raises(RuntimeError, match="mixes batch rows .* or is random"):
        out.sum().backward()


class WrongShapeCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(I, 5)

    def forward(self, x, s):
        return torch.tanh(self.lin(x))  # (B, 5) for a (B, 4) state


class WrongStructureCell(GatedCell):
    def forward(self, x, state):
        return super().forward(x, state)[1]  # a tensor for a tuple state


@pytest.mark.parametrize("iterations", [None, 2])
def test_mismatched_state_refused(iterations):
    x = torch.randn(T, B, I, requires_grad=True)
    with pytest.raises(ValueError, match=r"output state does not match its input state \(shape"):
        HighwayRNN(WrongShapeCell(), iterations=iterations)(x, torch.zeros(B, 4))
    with pytest.raises(ValueError, match=r"output state does not match its input state \(structure"):
        HighwayRNN(WrongStructureCell(I, 3, 5), iterations=iterations)(x, (torch.zeros(B, 3), torch.zeros(B, 5)))
    with torch.no_grad():
        with pytest.raises(ValueError, match="does not match"):
            HighwayRNN(WrongShapeCell(), iterations=iterations)(x, torch.zeros(B, 4))


def test_bad_residual_refused():
    cell = GatedCell(I, 3, 5)
    with pytest.raises(ValueError, match="residual='diagonal'"):
        HighwayRNN(cell, residual="diagonal")
    with pytest.raises(TypeError, match="residual=3"):
        HighwayRNN(cell, residual=3)
    x = torch.randn(T, B, I, requires_grad=True)
    s0 = (torch.zeros(B, 3), torch.zeros(B, 5))
    wrong_shape = lambda x, prev, new: (None, torch.ones(B, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"residual.*component 1 of shape \(2, 3\).*\(2, 5\)"):
        HighwayRNN(cell, residual=wrong_shape)(x, s0)
    not_a_tuple = lambda x, prev, new: torch.ones(B, 5)  # noqa: E731
    with pytest.raises(ValueError, match="residual.*tuple of 2"):
        HighwayRNN(cell, residual=not_a_tuple)(x, s0)
    cell2 = ResidualCell(I, 4)
    with pytest.raises(ValueError, match="residual.*one tensor"):
        HighwayRNN(cell2, residual=lambda x, p, n: (p,))(x)
    # A broadcastable multiplier is fine: per-feature 1s equal "identity".
    ok, _, _ = module_grads(HighwayRNN(cell2, residual=lambda x, p, n: torch.ones(4), iterations=1),
                            x, (torch.zeros(B, 4),), False, torch.ones(T, B, 4), [torch.ones(B, 4)])
    ident, _, _ = module_grads(HighwayRNN(cell2, residual="identity", iterations=1),
                               x, (torch.zeros(B, 4),), False, torch.ones(T, B, 4), [torch.ones(B, 4)])
    assert max_rel(ok, ident) <= 1e-6


class NoHookCell(nn.Module):
    """A user cell without an initial_state method."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(I + 4, 4)

    def forward(self, x, s):
        return torch.tanh(self.lin(torch.cat([x, s], -1)))


def test_bad_input_and_state_refused():
    with pytest.raises(ValueError, match="initial_state.*pass state"):
        HighwayRNN(NoHookCell())(torch.randn(T, B, I))
    out, _ = HighwayRNN(NoHookCell())(torch.randn(T, B, I), torch.zeros(B, 4))
    assert out.shape == (T, B, 4)
    m = HighwayRNN(nn.GRUCell(I, 4))
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(T))
    with pytest.raises(TypeError, match="input"):
        m([1.0, 2.0])
    with pytest.raises(ValueError, match="at least one time step"):
        m(torch.randn(0, B, I))
    with pytest.raises(ValueError, match="state.*batch size 2"):
        m(torch.randn(T, B, I), torch.zeros(B + 1, 4))
    with pytest.raises(TypeError, match="state"):
        m(torch.randn(T, B, I), "zeros")


def test_nothing_requires_grad_just_loops():
    cell, res, _, s0, is_tuple, x, _, _ = setup("lstm")
    for p in cell.parameters():
        p.requires_grad_(False)
    out, fin = HighwayRNN(cell, iterations=2)(x, s0)
    assert out.grad_fn is None
    with torch.no_grad():
        ref = plain_loop(cell, x, s0, True)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)


def test_frozen_parameters_and_plain_function_cell():
    """Only some parameters require grad; and a cell that is a plain function."""
    cell, res, _, s0, is_tuple, x, G_out, G_fin = setup("identity")
    cell.W.bias.requires_grad_(False)
    ref, _ = loop_grads(cell, x, s0, is_tuple, G_out, G_fin)
    got, _, _ = module_grads(HighwayRNN(cell, residual="identity", iterations=T), x, s0, is_tuple, G_out, G_fin)
    assert len(got) == len(ref) == 2 + 1 + 1  # W.weight, U.weight (not W.bias), x, s0
    assert max_rel(got, ref) <= 1e-10

    U = torch.randn(4, 4, dtype=torch.float64) * 0.3

    def fn_cell(x, s):
        return s + torch.tanh(x.sum(-1, keepdim=True) + s @ U)

    xl = x.clone().requires_grad_(True)
    out, _ = HighwayRNN(fn_cell, residual="identity", iterations=T)(xl, s0[0])
    g = torch.autograd.grad((G_out * out).sum(), xl)[0]
    xr = x.clone().requires_grad_(True)
    gr = torch.autograd.grad((G_out * plain_loop(fn_cell, xr, s0, False)[0]).sum(), xr)[0]
    assert rel(g, gr) <= 1e-10
