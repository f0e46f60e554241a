"""The layers' CUDA paths: ``HighwayLSTM``/``HighwayGRU`` (cuDNN forward, the fast tapes on
the Triton kernels in the backward), ``HighwayRNN`` on the Triton scan, packed sequences,
exactness against cuDNN's BPTT, the ``HWBPTT_TRITON=0`` way out, the error a kernel that
does not compile raises through ``backward``, and a ``torch.compile`` smoke test.

Gradients are compared relative to the largest entry of the reference: float32 against
float64 on the CPU (TF32 is off in these tests, see ``conftest.full_float32``) or, for the
exactness checks, against cuDNN's BPTT on the same device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from hwbptt.torch import HighwayGRU, HighwayLSTM, HighwayRNN

pytestmark = pytest.mark.cuda

MODELS = {"lstm": (nn.LSTM, HighwayLSTM), "gru": (nn.GRU, HighwayGRU)}
REL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
EXACT = 5e-5  # float32 k >= T against cuDNN: the same sums in another order
NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _rel(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    assert got is not None and want is not None, "a gradient is missing"
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all(), "non-finite gradient"
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _loss(module: nn.Module, x: torch.Tensor, proj: torch.Tensor, proj_h: torch.Tensor) -> torch.Tensor:
    y, state = module(x)
    h_n = state[0] if isinstance(state, tuple) else state
    return (y * proj).sum() + (h_n * proj_h).sum()


def _grads(module: nn.Module, leaf: torch.Tensor, loss_fn) -> dict[str, torch.Tensor]:
    leaf.grad = None
    module.zero_grad(set_to_none=True)
    loss_fn().backward()
    out = {"x": leaf.grad.clone()}
    out.update({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    return out


def _assert_match(got: dict, want: dict, tol: float, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    errors = {n: _rel(got[n], want[n]) for n in want}
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad}"


def _lengths(small: bool) -> tuple[int, ...]:
    return (1, 3) if small else (1, 17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_layer_against_float64(device, small, model, dtype):
    """Two layers, ``batch_first`` with a non-contiguous input, k=2, on the device against
    the same layer in float64 on the CPU; T=1 and an odd T; H above one 256-wide block."""
    Base, High = MODELS[model]
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("dry run: the half-precision layers are a GPU check (the CPU layers take float32/float64)")
    I, H, B = (4, 10, 3) if small else (24, 300, 5)
    try:  # cuDNN decides which dtypes its RNNs take; a refusal there is not ours
        with torch.no_grad():
            Base(I, H, batch_first=True, device=device, dtype=dtype)(torch.zeros(B, 2, I, device=device, dtype=dtype))
    except RuntimeError as exc:
        pytest.skip(f"nn.{Base.__name__} itself does not run in {NAME[dtype]} here: {str(exc)[:200]}")
    for T in _lengths(small):
        torch.manual_seed(T)
        ref = High(I, H, num_layers=2, batch_first=True, iterations=2, dtype=torch.float64)
        dut = High(I, H, num_layers=2, batch_first=True, iterations=2, device=device, dtype=dtype)
        dut.load_state_dict(ref.state_dict())
        x = torch.randn(T, B, I, dtype=torch.float64)
        proj, proj_h = torch.randn(B, T, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
        x_ref = x.clone().requires_grad_()
        x_dut = x.to(device, dtype).requires_grad_()
        args = [t.to(device, dtype) for t in (proj, proj_h)]
        # (T, B, I) leaves seen as (B, T, I): the layers get non-contiguous inputs
        want = _grads(ref, x_ref, lambda: _loss(ref, x_ref.transpose(0, 1), proj, proj_h))
        got = _grads(dut, x_dut, lambda: _loss(dut, x_dut.transpose(0, 1), *args))
        _assert_match(got, want, REL[dtype], f"{model} {NAME[dtype]} T={T}")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_k_at_least_T_equals_cudnn_bptt(device, small, model):
    """``iterations >= T`` gives BPTT's gradient, here against cuDNN's (two layers, both
    directions); ``iterations=None`` runs the parent's kernel and autograd."""
    Base, High = MODELS[model]
    I, H, B = (4, 10, 3) if small else (16, 96, 7)
    for T in _lengths(small):
        torch.manual_seed(10 + T)
        base = Base(I, H, num_layers=2, bidirectional=True, device=device)
        x = torch.randn(T, B, I, device=device, requires_grad=True)
        proj, proj_h = torch.randn(T, B, 2 * H, device=device), torch.randn(B, H, device=device)
        want = _grads(base, x, lambda: _loss(base, x, proj, proj_h))
        for k in ((T, None) if small else (T, T + 3, None)):  # the interpreter is slow: fewer in the dry run
            high = High(I, H, num_layers=2, bidirectional=True, iterations=k, device=device)
            high.load_state_dict(base.state_dict())
            got = _grads(high, x, lambda: _loss(high, x, proj, proj_h))
            _assert_match(got, want, 1e-6 if k is None else EXACT, f"{model} T={T} k={k}")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_packed_sequence(device, small, model):
    """A ``PackedSequence`` (unsorted lengths, one of them 1): ``iterations=T`` equals the
    parent's BPTT on the same packed input, and k=1 gives finite gradients everywhere."""
    Base, High = MODELS[model]
    I, H = (4, 10) if small else (16, 96)
    T = 5 if small else 17
    lengths = torch.tensor([T - 2, T, 1, T - 1])
    torch.manual_seed(20)
    base = Base(I, H, device=device)
    x = torch.randn(T, len(lengths), I, device=device, requires_grad=True)
    proj = torch.randn(T, len(lengths), H, device=device)
    proj_h = torch.randn(len(lengths), H, device=device)

    def loss(m):
        y, state = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
        y, _ = pad_packed_sequence(y, total_length=T)
        h_n = state[0] if isinstance(state, tuple) else state
        return (y * proj).sum() + (h_n[-1] * proj_h).sum()

    want = _grads(base, x, lambda: loss(base))
    for k in (T, None):
        high = High(I, H, iterations=k, device=device)
        high.load_state_dict(base.state_dict())
        _assert_match(_grads(high, x, lambda: loss(high)), want, 1e-6 if k is None else EXACT, f"packed {model} k={k}")
    high = High(I, H, iterations=1, device=device)
    high.load_state_dict(base.state_dict())
    got = _grads(high, x, lambda: loss(high))
    assert all(torch.isfinite(g).all() for g in got.values())
    # padded steps get no gradient
    pad = torch.arange(T)[:, None] >= lengths[None, :]
    assert float(got["x"].cpu()[pad].abs().max()) == 0.0


@pytest.mark.parametrize("cell_type", ["LSTMCell", "GRUCell"])
def test_highway_rnn_cell_exact(device, small, cell_type):
    """``HighwayRNN`` over a torch cell (its backward's scans on the device: the Triton scan
    on CUDA) with ``iterations=T`` against autograd through the Python loop."""
    I, H, B = (4, 8, 3) if small else (16, 64, 6)
    for T in _lengths(small):
        torch.manual_seed(30 + T)
        cell = getattr(nn, cell_type)(I, H, device=device)
        x = torch.randn(T, B, I, device=device, requires_grad=True)
        proj = torch.randn(T, B, H, device=device)

        def loop():
            s = (torch.zeros(B, H, device=device), torch.zeros(B, H, device=device)) if cell_type == "LSTMCell" else torch.zeros(B, H, device=device)
            total = x.new_zeros(())
            for t in range(T):
                s = cell(x[t], s)
                total = total + ((s[0] if isinstance(s, tuple) else s) * proj[t]).sum()
            return total

        want = _grads(cell, x, loop)
        high = HighwayRNN(cell, iterations=T)

        def highway():
            y, _ = high(x)
            return (y * proj).sum()

        _assert_match(_grads(cell, x, highway), want, EXACT, f"HighwayRNN({cell_type}) T={T}")


def test_triton_switched_off_gives_the_same_gradient(device, small, monkeypatch):
    """``HWBPTT_TRITON=0``, the way out the compile error names: the CUDA tensors take the
    eager torch tapes, with the same gradient."""
    from hwbptt.torch import fused

    I, H, B, T = (4, 10, 3, 5) if small else (16, 96, 6, 33)
    torch.manual_seed(40)
    for High in (HighwayLSTM, HighwayGRU):
        layer = High(I, H, iterations=2, device=device)
        x = torch.randn(T, B, I, device=device, requires_grad=True)
        proj, proj_h = torch.randn(T, B, H, device=device), torch.randn(1, B, H, device=device)
        with_triton = _grads(layer, x, lambda: _loss(layer, x, proj, proj_h))
        monkeypatch.setenv("HWBPTT_TRITON", "0")
        if device.type == "cuda":
            assert not fused.supports(x.detach(), proj)
        eager = _grads(layer, x, lambda: _loss(layer, x, proj, proj_h))
        monkeypatch.delenv("HWBPTT_TRITON")
        _assert_match(eager, with_triton, 1e-4, f"{High.__name__} HWBPTT_TRITON=0")


def test_kernel_that_does_not_compile_fails_the_backward(device, triton_kernels, monkeypatch):
    """Through a layer: the backward raises the error naming the kernel and the way out
    (never a silent fallback)."""
    tc, _ = triton_kernels

    class Broken:
        def __getitem__(self, grid):
            def run(*args, **meta):
                raise RuntimeError("simulated: this Triton cannot compile for this GPU")

            return run

    monkeypatch.setattr(tc, "_lstm_dpre_kernel", Broken())
    layer = HighwayLSTM(4, 8, iterations=2, device=device)
    x = torch.randn(5, 2, 4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"_lstm_dpre_kernel.*HWBPTT_TRITON=0"):
        layer(x)[0].sum().backward()


def test_torch_compile_smoke(device, small):
    """``torch.compile`` of a model holding a ``HighwayLSTM``: the same loss and gradients as
    eager. Inductor on the GPU; the dry run uses the ``eager`` backend (dynamo only)."""
    import torch._dynamo

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = HighwayLSTM(4, 16, batch_first=True, iterations=2)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y).sum()

    torch.manual_seed(50)
    net = Net().to(device)
    x = torch.randn(3, 7, 4, device=device, requires_grad=True)
    want = _grads(net, x, lambda: net(x))
    with torch.no_grad():
        loss_eager = float(net(x))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(net, backend="eager" if device.type == "cpu" else "inductor")
        got = _grads(net, x, lambda: compiled(x))
        with torch.no_grad():
            loss_compiled = float(compiled(x))
    finally:
        torch._dynamo.reset()
    assert abs(loss_compiled - loss_eager) <= 1e-5 * max(1.0, abs(loss_eager))
    _assert_match(got, want, 1e-4, "torch.compile")
