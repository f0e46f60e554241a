"""Property-based tests of HighwayRNN(cell) against autograd BPTT through a Python loop
over the same cell: nn.LSTMCell, nn.GRUCell (known residuals), nn.RNNCell (no residual:
fixed-point iteration) and a user cell with an identity residual."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hwbptt.torch import HighwayRNN


class ResidualTanhCell(nn.Module):
    """s_t = s_{t-1} + 0.3 tanh(W x_t + U s_{t-1}): residual="identity"."""

    def __init__(self, I, H, dtype):
        super().__init__()
        self.lin = nn.Linear(I + H, H, dtype=dtype)

    def forward(self, x, s):
        return s + 0.3 * torch.tanh(self.lin(torch.cat([x, s], -1)))

    def initial_state(self, batch, device, dtype):
        return torch.zeros(batch, self.lin.out_features, device=device, dtype=dtype)


def make_cell(kind, I, H, dtype):
    if kind == "lstm":
        return nn.LSTMCell(I, H, dtype=dtype)
    if kind == "gru":
        return nn.GRUCell(I, H, dtype=dtype)
    if kind == "rnn":
        return nn.RNNCell(I, H, dtype=dtype)
    return ResidualTanhCell(I, H, dtype)


@st.composite
def cell_cases(draw, T_max=150):
    kind = draw(st.sampled_from(["lstm", "gru", "rnn", "residual"]))
    return dict(
        kind=kind,
        T=draw(st.integers(1, T_max)),
        B=draw(st.integers(1, 9)),
        I=draw(st.integers(1, 5)),
        H=draw(st.integers(1, 8)),
        batch_first=draw(st.booleans()),
        unbatched=draw(st.booleans()),
        state=draw(st.booleans()),
        loss=draw(st.sampled_from(["every", "end", "sparse"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def setup(case, **options):
    torch.manual_seed(case["seed"])
    cell = make_cell(case["kind"], case["I"], case["H"], case["dtype"])
    residual = "identity" if case["kind"] == "residual" else None
    module = HighwayRNN(cell, residual=residual, batch_first=case["batch_first"], **options)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    T, B, I, H, dt = case["T"], case["B"], case["I"], case["H"], case["dtype"]
    B_eff = 1 if case["unbatched"] else B
    x = torch.randn(T, B_eff, I, generator=g, dtype=torch.float64).to(dt)
    state = None
    if case["state"]:
        comps = [0.5 * torch.randn(B_eff, H, generator=g, dtype=torch.float64).to(dt) for _ in range(2 if case["kind"] == "lstm" else 1)]
        state = comps
    w_out = torch.randn(T, B_eff, H, generator=g, dtype=torch.float64).to(dt)
    if case["loss"] == "sparse":
        keep = torch.rand(T, B_eff, 1, generator=g) < 0.1
        keep[torch.randint(T, (1,), generator=g)] = True
        w_out = w_out * keep
    w_end = [torch.randn(B_eff, H, generator=g, dtype=torch.float64).to(dt) for _ in range(2)]
    return module, cell, x, state, w_out, w_end


def loop_bptt(case, cell, x, state, w_out, w_end):
    """The oracle: autograd through a Python loop over the cell, time-major, batched."""
    x = x.clone().requires_grad_(True)
    s0 = None if state is None else [c.clone().requires_grad_(True) for c in state]
    if s0 is None:
        zeros = torch.zeros(x.shape[1], case["H"], dtype=x.dtype)
        s = (zeros, zeros.clone()) if case["kind"] == "lstm" else zeros
    else:
        s = tuple(s0) if case["kind"] == "lstm" else s0[0]
    outs = []
    for t in range(x.shape[0]):
        s = cell(x[t], s)
        outs.append(s[0] if isinstance(s, tuple) else s)
    loss = _loss(case, torch.stack(outs), s, w_out, w_end)
    wrt = [x, *(s0 or []), *cell.parameters()]
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def _loss(case, outputs, final, w_out, w_end):
    finals = final if isinstance(final, tuple) else (final,)
    if case["loss"] == "end":
        return sum((f * w).sum() for f, w in zip(finals, w_end))
    return (outputs * w_out).sum()


def highway(case, module, cell, x, state, w_out, w_end):
    x = x.clone().requires_grad_(True)
    s0 = None if state is None else [c.clone().requires_grad_(True) for c in state]
    inp = x
    arg = None if s0 is None else (tuple(s0) if case["kind"] == "lstm" else s0[0])
    if case["unbatched"]:
        inp = x[:, 0]
        if arg is not None:
            arg = tuple(c[0] for c in arg) if isinstance(arg, tuple) else arg[0]
    elif case["batch_first"]:
        inp = x.transpose(0, 1)
    outputs, final = module(inp, arg)
    if case["unbatched"]:
        outputs = outputs.unsqueeze(1)
        final = tuple(c.unsqueeze(0) for c in final) if isinstance(final, tuple) else final.unsqueeze(0)
    elif case["batch_first"]:
        outputs = outputs.transpose(0, 1)
    loss = _loss(case, outputs, final, w_out, w_end)
    wrt = [x, *(s0 or []), *cell.parameters()]
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def _assert_close(a_list, b_list, dtype, T):
    rtol = 1e-9 if dtype == torch.float64 else (2e-4 if T > 64 else 5e-5)
    scale = max(float(b.double().norm()) for b in b_list if b is not None)
    for a, b in zip(a_list, b_list):
        a = torch.zeros_like(b) if a is None and b is not None else a
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        err = float((a.double() - b.double()).norm())
        assert err <= rtol * max(float(b.double().norm()), 1e-3 * scale, 1e-300), err


@given(case=cell_cases())
def test_cell_exact_mode_matches_loop_bptt(case):
    module, cell, *rest = setup(case, iterations=None)
    _assert_close(highway(case, module, cell, *rest), loop_bptt(case, cell, *rest), case["dtype"], case["T"])


@given(case=cell_cases(T_max=60), extra=st.integers(0, 2), gamma=st.sampled_from([0.0, 0.5, 1.0]))
def test_cell_T_iterations_are_exact(case, extra, gamma):
    module, cell, *rest = setup(case, iterations=case["T"] + extra, gamma=gamma)
    _assert_close(highway(case, module, cell, *rest), loop_bptt(case, cell, *rest), case["dtype"], case["T"])


@given(case=cell_cases(), k=st.integers(0, 8), gamma=st.sampled_from([0.0, 0.5, 1.0]))
def test_cell_last_k_plus_one_positions_exact(case, k, gamma):
    module, cell, *rest = setup(case, iterations=k, gamma=gamma, diagnostics=True)
    gx_o = highway(case, module, cell, *rest)[0].double()
    gx_p = loop_bptt(case, cell, *rest)[0].double()
    T = case["T"]
    # Where the path sum grew, the engine returns an earlier iterate (diagnostics.used).
    d = module.last_diagnostics
    lo = max(0, T - 1 - (d.used if d.diverged else k))
    rtol = 1e-9 if case["dtype"] == torch.float64 else 2e-4
    err = float((gx_o[lo:] - gx_p[lo:]).norm())
    assert err <= rtol * max(float(gx_p.norm()), 1e-300), f"steps {lo}..{T - 1}: {err}"


def test_cell_double_backward_raises_or_is_right():
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4, dtype=torch.float64)
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    w = torch.randn(8, 2, 4, dtype=torch.float64)

    def penalised(module_or_none):
        xx = x.clone().requires_grad_(True)
        if module_or_none is None:
            s, outs = None, []
            for t in range(8):
                s = cell(xx[t], s)
                outs.append(s[0])
            y = torch.stack(outs)
        else:
            y = module_or_none(xx)[0]
        loss = (y * w).sum()
        g, = torch.autograd.grad(loss, cell.weight_ih, create_graph=True)
        return torch.autograd.grad(loss + g.pow(2).sum(), xx)[0]

    exact = penalised(None)
    try:
        got = penalised(HighwayRNN(cell, iterations=8))
    except RuntimeError as e:
        assert "create_graph" in str(e) or "double backward" in str(e)
    else:
        torch.testing.assert_close(got, exact)
