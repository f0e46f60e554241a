"""Shared pieces of the reliability suite: random layer configurations, the autograd
BPTT oracle (``nn.LSTM``/``nn.GRU``/a Python loop over a cell) and gradient comparison."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from hwbptt.torch import HighwayGRU, HighwayLSTM

def scaled(fraction: float) -> int:
    """A share of the active profile's ``max_examples`` (for the slower properties)."""
    return max(4, int(settings.default.max_examples * fraction))


PARENT = {"lstm": nn.LSTM, "gru": nn.GRU}
HIGHWAY = {"lstm": HighwayLSTM, "gru": HighwayGRU}
LOSSES = ("every", "end", "sparse", "every+end")


@dataclass
class LayerCase:
    kind: str
    num_layers: int
    bidirectional: bool
    batch_first: bool
    proj_size: int
    T: int
    B: int
    I: int
    H: int
    lengths: list[int] | None
    loss: str
    dtype: torch.dtype
    hx: bool
    bias: bool
    seed: int
    options: dict = field(default_factory=dict)

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    def valid_length(self, b: int) -> int:
        return self.T if self.lengths is None else self.lengths[b]


@st.composite
def layer_cases(draw, *, T_max=300, unidirectional=False, dtypes=(torch.float32, torch.float64), kinds=("lstm", "gru")):
    kind = draw(st.sampled_from(kinds))
    T = draw(st.integers(1, T_max))
    B = draw(st.integers(1, 9))
    H = draw(st.integers(1, 8))
    proj = draw(st.integers(0, H - 1)) if kind == "lstm" and H > 1 else 0
    packed = draw(st.booleans())
    lengths = None
    if packed:
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return LayerCase(
        kind=kind,
        num_layers=draw(st.integers(1, 2)),
        bidirectional=False if unidirectional else draw(st.booleans()),
        batch_first=draw(st.booleans()),
        proj_size=proj,
        T=T,
        B=B,
        I=draw(st.integers(1, 6)),
        H=H,
        lengths=lengths,
        loss=draw(st.sampled_from(LOSSES)),
        dtype=draw(st.sampled_from(dtypes)),
        hx=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_modules(case: LayerCase, **options):
    """The parent (oracle) and the Highway twin holding equal parameters."""
    torch.manual_seed(case.seed)
    kw = dict(num_layers=case.num_layers, bidirectional=case.bidirectional, batch_first=case.batch_first,
              bias=case.bias, dtype=case.dtype)
    if case.kind == "lstm":
        kw["proj_size"] = case.proj_size
    parent = PARENT[case.kind](case.I, case.H, **kw)
    ours = HIGHWAY[case.kind](case.I, case.H, **kw, **options)
    ours.load_state_dict(parent.state_dict())
    return ours, parent


def make_inputs(case: LayerCase):
    g = torch.Generator().manual_seed(case.seed + 1)
    shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype)
    hx = None
    if case.hx:
        P = case.proj_size or case.H
        h0 = (0.5 * torch.randn(case.num_layers * case.D, case.B, P, generator=g, dtype=torch.float64)).to(case.dtype)
        hx = (h0,)
        if case.kind == "lstm":
            hx += ((0.5 * torch.randn(case.num_layers * case.D, case.B, case.H, generator=g, dtype=torch.float64)).to(case.dtype),)
    return x, hx


def _weights(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def loss_of(case: LayerCase, y, finals) -> torch.Tensor:
    """A random linear loss on the outputs: at every step, at the end only (final states),
    at a few steps (sparse), or both every step and the end."""
    out = y.data if isinstance(y, PackedSequence) else y
    total = out.new_zeros(())
    if case.loss in ("every", "every+end", "sparse"):
        w = _weights(out.shape, case.seed + 2, out.dtype)
        if case.loss == "sparse":
            g = torch.Generator().manual_seed(case.seed + 3)
            keep = torch.rand(out.shape[:-1], generator=g) < 0.1
            keep.view(-1)[torch.randint(keep.numel(), (1,), generator=g)] = True
            w = w * keep.unsqueeze(-1).to(w.dtype)
        total = total + (out * w).sum()
    if case.loss in ("end", "every+end"):
        for i, s in enumerate(finals):
            total = total + (s * _weights(s.shape, case.seed + 10 + i, s.dtype)).sum()
    return total


def run_and_grad(case: LayerCase, module: nn.Module, x: torch.Tensor, hx):
    """Forward ``module`` on the case's input and return (outputs, finals, named grads)."""
    x = x.detach().clone().requires_grad_(True)
    hx_leaf = None if hx is None else tuple(s.detach().clone().requires_grad_(True) for s in hx)
    inp = x
    if case.lengths is not None:
        inp = pack_padded_sequence(x, torch.tensor(case.lengths), batch_first=case.batch_first, enforce_sorted=False)
    arg = None if hx_leaf is None else (hx_leaf if case.kind == "lstm" else hx_leaf[0])
    y, h = module(inp, arg)
    finals = tuple(h) if isinstance(h, tuple) else (h,)
    loss = loss_of(case, y, finals)
    names = ["x"] + [f"hx{i}" for i in range(len(hx_leaf or ()))] + [n for n, _ in module.named_parameters()]
    wrt = [x, *(hx_leaf or ()), *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    return y, finals, dict(zip(names, grads))


def rtol_for(dtype: torch.dtype, T: int = 1) -> float:
    """Relative tolerance against BPTT in the same dtype."""
    if dtype == torch.float64:
        return 1e-9
    return 2e-4 if T > 64 else 5e-5


def assert_grads_close(ours: dict, ref: dict, rtol: float, what: str = "") -> None:
    scale = max(float(g.double().norm()) for g in ref.values())
    for name, r in ref.items():
        o = ours[name]
        assert o.shape == r.shape, f"{what}{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"{what}{name}: non-finite gradient"
        err = float((o.double() - r.double()).norm())
        den = max(float(r.double().norm()), 1e-3 * scale, 1e-300)
        assert err <= rtol * den, f"{what}{name}: relative error {err / den:.3g} > {rtol:g}"


def time_major(case: LayerCase, g: torch.Tensor) -> torch.Tensor:
    return g.transpose(0, 1) if case.batch_first else g
