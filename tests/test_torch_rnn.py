"""HighwayLSTM/HighwayGRU against the parents' autograd BPTT and against separately
computed Highway references."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from hwbptt.torch import HighwayGRU, HighwayLSTM, convert

TWINS = {HighwayLSTM: nn.LSTM, HighwayGRU: nn.GRU}
T, B, I, H = 9, 3, 4, 5


def make_pair(cls, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = {k: kwargs.pop(k) for k in ("iterations", "tol", "gamma", "split", "diagnostics") if k in kwargs}
    ref = TWINS[cls](I, H, dtype=dtype, **kwargs)
    ours = cls(I, H, dtype=dtype, **kwargs, **options)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def states_of(h):
    return list(h) if isinstance(h, tuple) else [h]


def run(module, x, hx, lengths, loss_at):
    """Forward and a loss that reads every output step or only the final state."""
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
    y, h = module(inp, hx)
    out = y.data if isinstance(y, PackedSequence) else y
    finals = states_of(h)
    g = torch.Generator().manual_seed(123)
    if loss_at == "every":
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    else:
        loss = sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in finals)
    return y, h, loss


def grads(module, x, hx, lengths, loss_at):
    x = x.clone().requires_grad_(True)
    hx_leaf = None if hx is None else tuple(s.clone().requires_grad_(True) for s in hx)
    arg = None if hx_leaf is None else (hx_leaf if isinstance(module, nn.LSTM) else hx_leaf[0])
    y, h, loss = run(module, x, arg, lengths, loss_at)
    wrt = [x, *(hx_leaf or ()), *module.parameters()]
    return y, h, torch.autograd.grad(loss, wrt)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def initial_state(cls, layers, D, proj, dtype):
    g = torch.Generator().manual_seed(7)
    P = proj or H
    h0 = torch.randn(layers * D, B, P, generator=g, dtype=dtype)
    if cls is HighwayLSTM:
        return (h0, torch.randn(layers * D, B, H, generator=g, dtype=dtype))
    return (h0,)


CASES = [
    dict(cls=cls, num_layers=L, batch_first=bf, bidirectional=bd, proj_size=p, hx=hx, packed=pk, loss_at=la)
    for cls, L, bf, bd, p, hx, pk, la in itertools.product(
        [HighwayLSTM, HighwayGRU], [1, 2], [False, True], [False, True], [0, 3], [False, True], [False, True], ["every", "end"]
    )
    if not (cls is HighwayGRU and p)
]


def _case_id(c):
    return "-".join(
        [c["cls"].__name__[7:], f"L{c['num_layers']}", "bf" if c["batch_first"] else "tm", "bi" if c["bidirectional"] else "uni",
         f"p{c['proj_size']}", "hx" if c["hx"] else "nohx", "packed" if c["packed"] else "padded", c["loss_at"]]
    )


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("mode", ["exact", "highway-T"])
def test_matches_bptt(case, mode):
    """Exact mode and Highway-BP with T iterations equal the parent's BPTT (float64)."""
    cls = case["cls"]
    kwargs = dict(num_layers=case["num_layers"], batch_first=case["batch_first"], bidirectional=case["bidirectional"])
    if cls is HighwayLSTM:
        kwargs["proj_size"] = case["proj_size"]
    iterations = None if mode == "exact" else T
    ours, ref = make_pair(cls, iterations=iterations, **kwargs)
    D = 2 if case["bidirectional"] else 1
    hx = initial_state(cls, case["num_layers"], D, case["proj_size"], torch.float64) if case["hx"] else None
    x = torch.randn((B, T, I) if case["batch_first"] else (T, B, I), dtype=torch.float64)
    lengths = torch.tensor([T, 4, 7]) if case["packed"] else None
    y1, h1, g1 = grads(ours, x, hx, lengths, case["loss_at"])
    y2, h2, g2 = grads(ref, x, hx, lengths, case["loss_at"])
    out1 = y1.data if isinstance(y1, PackedSequence) else y1
    out2 = y2.data if isinstance(y2, PackedSequence) else y2
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=1e-12)
    if case["packed"]:
        assert torch.equal(y1.batch_sizes, y2.batch_sizes)
        assert torch.equal(y1.sorted_indices, y2.sorted_indices)
    for s1, s2 in zip(states_of(h1), states_of(h2)):
        torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-12)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("packed", [False, True])
def test_exact_float32(cls, packed):
    ours, ref = make_pair(cls, dtype=torch.float32, iterations=None, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I)
    lengths = torch.tensor([T, 4, 7]) if packed else None
    _, _, g1 = grads(ours, x, None, lengths, "every")
    _, _, g2 = grads(ref, x, None, lengths, "every")
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize(
    "cls, split, proj",
    [(HighwayLSTM, "gates", 0), (HighwayLSTM, "step", 0), (HighwayLSTM, "gates", 2), (HighwayLSTM, "step", 2), (HighwayGRU, "gates", 0)],
)
def test_last_k_plus_one_positions_exact(cls, split, proj):
    """After k iterations the gradient at the last k+1 steps is exact, and not before."""
    Tl = 16
    kw = dict(proj_size=proj) if proj else {}
    exact, _ = make_pair(cls, iterations=None, **kw)
    with torch.no_grad():  # strong recurrent weights: the truncation error stays far above rounding
        exact.weight_hh_l0.mul_(4.0)
    x = torch.randn(Tl, B, I, dtype=torch.float64)
    _, _, g_ref = grads(exact, x, None, None, "every")
    rng = torch.Generator().manual_seed(5)
    for k in torch.randint(0, 6, (3,), generator=rng).tolist():
        ours, _ = make_pair(cls, iterations=k, split=split, **kw)
        ours.load_state_dict(exact.state_dict())
        _, _, g = grads(ours, x, None, None, "every")
        dx, dx_ref = g[0], g_ref[0]
        torch.testing.assert_close(dx[Tl - 1 - k :], dx_ref[Tl - 1 - k :], rtol=1e-10, atol=1e-12)
        assert (dx[Tl - 2 - k] - dx_ref[Tl - 2 - k]).abs().max() > 1e-14


# -- separately computed references: dense per-step Jacobians from autograd -----------------


def _cell_step(cls, module, x_t, state):
    """One step with a stock nn.LSTMCell/nn.GRUCell on ``module``'s weights (state flat)."""
    if cls is HighwayLSTM:
        cell = nn.LSTMCell(I, H, dtype=torch.float64)
        c_prev, h_prev = state[..., :H], state[..., H:]
    else:
        cell = nn.GRUCell(I, H, dtype=torch.float64)
        h_prev = state
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(module, name + "_l0"))
    params = {n: getattr(module, n + "_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    out = torch.func.functional_call(cell, params, (x_t, (h_prev, c_prev)) if cls is HighwayLSTM else (x_t, h_prev))
    if cls is HighwayLSTM:
        h, c = out
        return torch.cat([c, h], -1)
    return out


def _dense_reference(cls, module, x, split, k, gamma_one):
    """Gradients after k iterations of the Highway recursion, from dense per-step
    Jacobians split into K (residual) and J (block), for the loss sum_t <r_t, h_t>."""
    S = 2 * H if cls is HighwayLSTM else H
    states = [torch.zeros(B, S, dtype=torch.float64)]
    with torch.no_grad():
        for t in range(x.shape[0]):
            states.append(_cell_step(cls, module, x[t], states[-1]))
    Tn = x.shape[0]
    full, K = [], []
    for t in range(Tn):
        jac = torch.autograd.functional.jacobian(lambda s: _cell_step(cls, module, x[t], s), states[t])
        jac = torch.stack([jac[b, :, b, :] for b in range(B)])  # (B, S_out, S_in)
        if gamma_one:
            k_t = torch.zeros_like(jac)
        elif cls is HighwayGRU:
            pre = x[t] @ module.weight_ih_l0.T + module.bias_ih_l0 + states[t] @ module.weight_hh_l0.T + module.bias_hh_l0
            z = torch.sigmoid(pre[:, H : 2 * H])
            k_t = torch.diag_embed(z)
        elif split == "step":
            k_t = torch.zeros_like(jac)
            k_t[:, :H, :H] = jac[:, :H, :H]  # dc_t/dc_{t-1} = diag(f_t)
        else:  # "gates": every path leaving c_{t-1} is residual
            k_t = torch.zeros_like(jac)
            k_t[:, :, :H] = jac[:, :, :H]
        full.append(jac)
        K.append(k_t)
    g = torch.Generator().manual_seed(11)
    r = torch.randn(Tn, B, H, generator=g, dtype=torch.float64)
    local = torch.zeros(Tn, B, S, dtype=torch.float64)
    local[..., S - H :] = r  # the loss reads h_t, the last H entries of the state

    def vec_mat(w, m):  # row vector times matrix, per batch row
        return torch.einsum("bi,bij->bj", w, m)

    def scan(extra):
        w = [None] * Tn
        for t in range(Tn - 1, -1, -1):
            w[t] = local[t] + extra[t]
            if t + 1 < Tn:
                w[t] = w[t] + vec_mat(w[t + 1], K[t + 1])
        return w

    zero = [torch.zeros(B, S, dtype=torch.float64)] * Tn
    w = scan(zero)
    for _ in range(k):
        extra = [vec_mat(w[t + 1], full[t + 1] - K[t + 1]) if t + 1 < Tn else zero[t] for t in range(Tn)]
        w = scan(extra)
    # Parameter and input gradients: sum_t w_t df_t/d(theta, x_t), one autograd call.
    xs = x.clone().requires_grad_(True)
    surrogate = sum((w[t].detach() * _cell_step(cls, module, xs[t], states[t])).sum() for t in range(Tn))
    return torch.autograd.grad(surrogate, [xs, *module.parameters()]), r


@pytest.mark.parametrize("cls, split", [(HighwayLSTM, "gates"), (HighwayLSTM, "step"), (HighwayGRU, "gates")])
@pytest.mark.parametrize("k, gamma", [(0, 0.0), (2, 0.0), (0, 1.0), (3, 1.0)])
def test_against_dense_split_reference(cls, split, k, gamma):
    """k = 0 is the residual-only gradient; gamma = 1 is FPI; both from dense Jacobians."""
    ours, _ = make_pair(cls, iterations=k, split=split, gamma=gamma)
    x = torch.randn(7, B, I, dtype=torch.float64)
    expected, r = _dense_reference(cls, ours, x, split, k, gamma_one=gamma == 1.0)
    xg = x.clone().requires_grad_(True)
    y, _ = ours(xg)
    got = torch.autograd.grad((y * r).sum(), [xg, *ours.parameters()])
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
def test_outputs_equal_parent_and_unbatched(cls):
    ours, ref = make_pair(cls, iterations=2, num_layers=2)
    x = torch.randn(T, I, dtype=torch.float64, requires_grad=True)  # unbatched
    y1, h1 = ours(x)
    y2, h2 = ref(x)
    torch.testing.assert_close(y1, y2)
    for a, b in zip(states_of(h1), states_of(h2)):
        torch.testing.assert_close(a, b)
    assert y1.grad_fn is not None


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
def test_no_grad_runs_the_parent_forward(cls, monkeypatch):
    ours, _ = make_pair(cls, iterations=2)
    calls = []
    parent_forward = TWINS[cls].forward
    monkeypatch.setattr(TWINS[cls], "forward", lambda self, *a, **k: calls.append(1) or parent_forward(self, *a, **k))
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
    assert calls == [1]
    ours(x.requires_grad_(True))
    assert calls == [1]  # the Highway path does not call the parent's forward


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
def test_frozen_parameters_and_input_without_grad(cls):
    ours, ref = make_pair(cls, iterations=T)
    for p in (ours.weight_ih_l0, ref.weight_ih_l0):
        p.requires_grad_(False)
    x = torch.randn(T, B, I, dtype=torch.float64)
    y1, _ = ours(x)
    y2, _ = ref(x)
    p1 = [p for p in ours.parameters() if p.requires_grad]
    p2 = [p for p in ref.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(y1.sum(), p1), torch.autograd.grad(y2.sum(), p2)):
        assert rel_err(a, b) <= 1e-10


def test_diagnostics_and_tol():
    ours, _ = make_pair(HighwayLSTM, iterations=50, tol=1e-8, diagnostics="debug", num_layers=2)
    x = torch.randn(30, B, I, dtype=torch.float64, requires_grad=True)
    y, _ = ours(x)
    y.sum().backward()
    assert set(ours.last_diagnostics) == {(0, 0), (1, 0)}
    for d in ours.last_diagnostics.values():
        assert 0 < d.iterations < 30  # stopped early, below the cap of T
        assert d.update_norms[-1] <= 1e-8
        assert d.cosine == pytest.approx(1.0, abs=1e-9)
    low, _ = make_pair(HighwayLSTM, iterations=0, diagnostics="debug")
    y, _ = low(x)
    y.sum().backward()
    assert low.last_diagnostics[(0, 0)].cosine < 1.0 - 1e-6


def test_convert_keeps_parameters_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 5, num_layers=2), nn.Sequential(nn.GRU(5, 6, bidirectional=True)))
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    convert(model, iterations=4, gamma=0.5)
    assert type(model[1]) is HighwayLSTM and type(model[2][0]) is HighwayGRU
    assert model[1].iterations == 4 and model[2][0].gamma == 0.5
    assert list(model.state_dict()) == keys_before
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    twin = convert(nn.GRU(3, 3, batch_first=True), iterations=1)
    assert isinstance(twin, HighwayGRU) and twin.batch_first
    with pytest.raises(TypeError, match="nn.Module"):
        convert("not a module")


def test_state_dict_round_trip_between_parent_and_twin():
    ours = HighwayLSTM(I, H, num_layers=2, proj_size=2)
    ref = nn.LSTM(I, H, num_layers=2, proj_size=2)
    ref.load_state_dict(ours.state_dict())
    for (k1, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)
    fresh = HighwayLSTM(I, H, num_layers=2, proj_size=2)
    fresh.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ref.parameters()))


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
def test_bad_shapes_raise_like_parent(cls):
    ours, _ = make_pair(cls, iterations=2)
    x = torch.randn(T, B, I + 1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="input_size"):
        ours(x)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    bad = torch.zeros(1, B + 1, H, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="hidden"):
        ours(x, (bad, bad) if cls is HighwayLSTM else bad)
    with pytest.raises(ValueError, match="4D"):
        ours(torch.zeros(1, T, B, I, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="dtype"):
        ours(torch.randn(T, B, I, requires_grad=True))  # float32 input, float64 weights
