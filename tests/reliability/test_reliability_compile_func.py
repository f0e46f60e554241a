"""``HighwayLSTM``/``HighwayGRU`` under ``torch.compile``, ``torch.func``, batched gradients,
forward-mode AD and ``torch.save``: the registered operators (``hwbptt.torch.ops``) and the
Functions around them (``hwbptt.torch.layer``).

Exact mode is compared with the parent (``nn.LSTM``/``nn.GRU``) at float64 tolerance, or,
where the parent has no batching rule (``vmap`` of its forward), with the parent run once
per sample. Highway mode is compared with its own per-sample result: a batched call must
give each sample the estimate it gets alone.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from hwbptt.torch import HighwayGRU, HighwayLSTM, HighwayRNN

PAIRS = [(HighwayLSTM, nn.LSTM), (HighwayGRU, nn.GRU)]
IDS = ["lstm", "gru"]
T, B, I, H = 5, 2, 3, 4
D = torch.float64


def twins(cls, parent, iterations, **kw):
    torch.manual_seed(0)
    ref = parent(I, H, dtype=D, **kw)
    ours = cls(I, H, dtype=D, iterations=iterations, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def data(*shape, seed=1):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def vjps(module, x, cotangents):
    """``(x.grad, *param grads)`` for each cotangent of the output, one backward each."""
    rows = []
    for v in cotangents:
        xx = x.clone().requires_grad_(True)
        rows.append(torch.autograd.grad(module(xx)[0], [xx, *module.parameters()], v))
    return [torch.stack(parts) for parts in zip(*rows)]


def assert_near(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- torch.compile

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    warnings.filterwarnings("ignore")
    import torch, torch._dynamo
    from torch import nn
    from torch._dynamo.backends.common import aot_autograd
    from hwbptt.torch import HighwayGRU, HighwayLSTM

    # Dynamo refuses every nn.LSTM/nn.GRU instance (subclasses too) unless this is set.
    torch._dynamo.config.allow_rnn = True

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.lstm = HighwayLSTM(8, 8, iterations=3, diagnostics=True)
            self.gru = HighwayGRU(8, 8, iterations=None)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            y = self.lstm(torch.tanh(self.inp(x)))[0]
            return self.head(self.gru(y)[0]).pow(2).mean()

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(12, 3, 3)
    breaks = torch._dynamo.explain(net)(x).graph_break_count
    torch._dynamo.reset()

    graphs = []
    def keep(gm, inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def grads(model):
        net.zero_grad()
        model(x).backward()
        return [p.grad.clone() for p in net.parameters()]

    eager = grads(net)
    net.lstm.last_diagnostics.clear()
    compiled_model = torch.compile(net, backend=backend)
    compiled = grads(compiled_model)
    diagnostics = {str(k): v.iterations for k, v in net.lstm.last_diagnostics.items()}
    net.lstm.iterations = None
    exact = grads(net)
    print(json.dumps({
        "breaks": breaks,
        "err": max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(compiled, eager)),
        "highway_vs_exact": max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(compiled, exact)),
        "diagnostics": diagnostics,
        "forward_ops": [op for op in ("hwbptt.lstm_forward", "hwbptt.gru_forward") if op in graphs[0]],
        "backward_ops": [op for op in ("hwbptt.lstm_backward", "hwbptt.gru_backward") if op in graphs[-1]],
    }))
    """
)


def test_compile_no_graph_break_and_highway_in_the_compiled_step():
    """With ``allow_rnn`` set, Dynamo traces a model holding both layers with no graph
    break; the compiled forward and backward graphs call the layers' operators (Highway-BP
    runs in the compiled backward: its diagnostics show 3 iterations, its gradient is not
    the exact one) and the gradients are eager's. In a fresh interpreter: importing Triton
    after TensorFlow segfaults here (docs/reliability.md, environment note)."""
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["breaks"] == 0
    assert result["forward_ops"] == ["hwbptt.lstm_forward", "hwbptt.gru_forward"]
    assert result["backward_ops"] == ["hwbptt.lstm_backward", "hwbptt.gru_backward"]
    assert result["diagnostics"] == {"(0, 0)": 3}
    assert result["err"] <= 1e-6
    assert result["highway_vs_exact"] > 1e-4


# ----------------------------------------------------------------------------- batched gradients


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("iterations", [None, 2], ids=["exact", "highway"])
def test_is_grads_batched(cls, parent, iterations):
    """``torch.autograd.grad(..., is_grads_batched=True)``: exact mode equals the parent's
    batched gradient; Highway mode equals its own gradient for each cotangent alone."""
    ours, ref = twins(cls, parent, iterations)
    x, V = data(T, B, I), data(4, T, B, H, seed=2)
    xx = x.clone().requires_grad_(True)
    got = torch.autograd.grad(ours(xx)[0], [xx, *ours.parameters()], V, is_grads_batched=True)
    if iterations is None:
        xr = x.clone().requires_grad_(True)
        expected = torch.autograd.grad(ref(xr)[0], [xr, *ref.parameters()], V, is_grads_batched=True)
    else:
        expected = vjps(ours, x, V)
    for a, b in zip(got, expected):
        assert_near(a, b)


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("iterations", [None, T], ids=["exact", "highway-T"])
def test_gradcheck_with_batched_grad(cls, parent, iterations):
    """``gradcheck(check_batched_grad=True)`` in float64, weights included (Highway with
    ``iterations=T`` is exact, so the numerical Jacobian checks it too)."""
    ours, _ = twins(cls, parent, iterations)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in ours.parameters()]

    def f(x, *w):
        return functional_call(ours, dict(zip(names, w)), (x,))[0]

    assert torch.autograd.gradcheck(f, (data(3, 2, I).requires_grad_(True), *params), check_batched_grad=True)


# ----------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_jacrev(cls, parent):
    """Exact: ``jacrev`` wrt the input and wrt the parameters equals the parent's. Highway:
    each row of the Jacobian is the layer's own VJP for that cotangent."""
    ours, ref = twins(cls, parent, None)
    x = data(T, B, I)
    assert_near(jacrev(lambda x: ours(x)[0])(x), jacrev(lambda x: ref(x)[0])(x))
    j1 = jacrev(lambda p: functional_call(ours, p, (x,))[0])(dict(ours.named_parameters()))
    j2 = jacrev(lambda p: functional_call(ref, p, (x,))[0])(dict(ref.named_parameters()))
    for k in j1:
        assert_near(j1[k], j2[k])
    hw, _ = twins(cls, parent, 2)
    J = jacrev(lambda x: hw(x)[0])(x)
    eye = torch.eye(T * B * H, dtype=D).view(-1, T, B, H)
    assert_near(J, vjps(hw, x, eye)[0].view(T, B, H, T, B, I))


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("iterations", [None, 2], ids=["exact", "highway"])
def test_vmap(cls, parent, iterations):
    """``vmap`` of the forward and of ``grad``: the parent run once per sample (its kernels
    have no batching rule) in exact mode, the layer's own per-sample gradient in Highway
    mode."""
    ours, ref = twins(cls, parent, iterations)
    xs = data(3, T, B, I)
    assert_near(vmap(lambda x: ours(x)[0])(xs), torch.stack([ref(x)[0] for x in xs]))
    got = vmap(grad(lambda x: ours(x)[0].sin().sum()))(xs)
    per_sample = ref if iterations is None else ours
    expected = []
    for x in xs:
        x = x.clone().requires_grad_(True)
        expected.append(torch.autograd.grad(per_sample(x)[0].sin().sum(), x)[0])
    assert_near(got, torch.stack(expected))


# ----------------------------------------------------------------------------- forward-mode AD


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_forward_ad_exact_is_the_parents_and_highway_refuses(cls, parent):
    from torch.autograd import forward_ad

    ours, ref = twins(cls, parent, None)
    x, t = data(T, B, I), data(T, B, I, seed=3)
    assert_near(jvp(lambda x: ours(x)[0], (x,), (t,))[1], jvp(lambda x: ref(x)[0], (x,), (t,))[1])

    def dual_tangent(m):
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(m(forward_ad.make_dual(x, t))[0]).tangent

    assert_near(dual_tangent(ours), dual_tangent(ref))
    hw, _ = twins(cls, parent, 2)
    with pytest.raises(RuntimeError, match=r"forward-mode AD.*Highway-BP \(iterations=2\).*Use iterations=None"):
        jvp(lambda x: hw(x)[0], (x,), (t,))
    with pytest.raises(RuntimeError, match=r"forward-mode AD.*Use iterations=None"):
        dual_tangent(hw)


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_nested_func_gradients(cls, parent):
    """A derivative of a derivative under ``torch.func``: exact mode as the parent,
    Highway mode a clear error (not a silently zero second derivative)."""
    ours, ref = twins(cls, parent, None)
    x = data(T, B, I)

    def gg(m):
        return grad(lambda x: grad(lambda x: m(x)[0].sin().sum())(x).pow(2).sum())(x)

    assert_near(gg(ours), gg(ref))
    hw, _ = twins(cls, parent, 2)
    with pytest.raises(RuntimeError, match=r"derivative of a derivative.*Use iterations=None"):
        gg(hw)


# ----------------------------------------------------------------------------- operators


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_operators_schema_and_fake(kind):
    """``torch.library.opcheck``: each operator neither mutates nor aliases its inputs as
    its schema promises, and its fake implementation gives the real outputs' metadata."""
    torch.manual_seed(0)
    m = (nn.LSTM if kind == "lstm" else nn.GRU)(I, H, dtype=D)
    x, h0 = data(T, B, I), data(B, H, seed=2)
    w = [m.weight_ih_l0.detach(), m.weight_hh_l0.detach(), m.bias_ih_l0.detach(), m.bias_hh_l0.detach()]
    tests = ("test_schema", "test_faketensor")
    opts = (2, None, 0.0, "gates", "off", [], 0, [0])  # ops.option_args (no probe), handle, key
    if kind == "lstm":
        c0 = data(B, H, seed=3)
        args = (x, h0, c0, *w, None, None, None)
        result = torch.library.opcheck(torch.ops.hwbptt.lstm_forward.default, args, test_utils=tests)
        assert set(result.values()) == {"SUCCESS"}, result
        y, _, *kept = torch.ops.hwbptt.lstm_forward(*args)
        back = (data(T, B, H, seed=4), data(B, H, seed=5), x, y, h0, c0, *w, None, *kept, None, *opts, [True] * 7 + [False])
        result = torch.library.opcheck(torch.ops.hwbptt.lstm_backward.default, back, test_utils=tests)
        assert set(result.values()) == {"SUCCESS"}, result
    else:
        args = (x, h0, *w, None)
        result = torch.library.opcheck(torch.ops.hwbptt.gru_forward.default, args, test_utils=tests)
        assert set(result.values()) == {"SUCCESS"}, result
        y, *kept = torch.ops.hwbptt.gru_forward(*args)
        back = (data(T, B, H, seed=4), x, y, h0, *w, *kept, *opts, [True] * 6)
        result = torch.library.opcheck(torch.ops.hwbptt.gru_backward.default, back, test_utils=tests)
        assert set(result.values()) == {"SUCCESS"}, result


# ----------------------------------------------------------------------------- torch.save


def test_torch_save_then_weights_only_load_keeps_no_diagnostics():
    """``torch.save(model)`` after a backward that filled ``last_diagnostics``: nothing of the
    diagnostics is pickled; ``torch.load(weights_only=True)`` works after the documented
    ``add_safe_globals`` line; the loaded layers behave the same and have their own (empty)
    ``last_diagnostics``; so does a deep copy."""
    torch.serialization.add_safe_globals([HighwayLSTM, HighwayGRU, HighwayRNN])  # the line docs/reliability.md shows
    torch.manual_seed(0)
    lstm = HighwayLSTM(I, H, num_layers=2, iterations=2, diagnostics=True, dtype=D)
    gru = HighwayGRU(I, H, iterations=3, diagnostics=True, dtype=D)
    x = data(T, B, I)
    for m in (lstm, gru):
        m(x.clone().requires_grad_(True))[0].sum().backward()
        assert m.last_diagnostics
        buf = io.BytesIO()
        torch.save(m, buf)
        assert b"Diagnostics" not in buf.getvalue() and b"last_diagnostics" not in buf.getvalue()
        buf.seek(0)
        back = torch.load(buf, weights_only=True)
        dup = copy.deepcopy(m)
        for other in (back, dup):
            assert type(other) is type(m) and other.highway_options == m.highway_options
            assert other.last_diagnostics == {}
            a, b = vjps(m, x, [data(T, B, H, seed=4)]), vjps(other, x, [data(T, B, H, seed=4)])
            for p, q in zip(a, b):
                assert torch.equal(p, q)
            assert other.last_diagnostics and other.last_diagnostics is not m.last_diagnostics


# ----------------------------------------------------------------------------- HighwayRNN(cell)


def test_cell_transforms_exact_as_the_loop_and_highway_refuses_clearly():
    """``HighwayRNN(cell)``: exact mode is autograd through the loop, so ``jacrev``,
    ``grad``, forward AD and batched gradients work as they do for the cell (``vmap`` too,
    where the cell has a batching rule: ``nn.GRUCell`` has none). Highway mode
    raises ``RuntimeError`` naming ``iterations=None`` for each (its backward recomputes
    the cell under ``torch.autograd``, which ``torch.func`` does not allow)."""
    torch.manual_seed(0)
    cell = nn.GRUCell(I, H, dtype=D)
    exact, hw = HighwayRNN(cell, iterations=None), HighwayRNN(cell, iterations=2)
    x, V = data(T, B, I), data(3, T, B, H, seed=2)

    def loop(x):
        h, out = torch.zeros(B, H, dtype=D), []
        for t in range(T):
            h = cell(x[t], h)
            out.append(h)
        return torch.stack(out)

    assert_near(jacrev(lambda x: exact(x)[0])(x), jacrev(loop)(x))
    assert_near(grad(lambda x: exact(x)[0].sin().sum())(x), grad(lambda x: loop(x).sin().sum())(x))
    assert_near(jvp(lambda x: exact(x)[0], (x,), (x,))[1], jvp(loop, (x,), (x,))[1])
    xx = x.clone().requires_grad_(True)
    xl = x.clone().requires_grad_(True)
    assert_near(torch.autograd.grad(exact(xx)[0], xx, V, is_grads_batched=True)[0],
          torch.autograd.grad(loop(xl), xl, V, is_grads_batched=True)[0])
    for run in (lambda: jacrev(lambda x: hw(x)[0])(x), lambda: grad(lambda x: hw(x)[0].sum())(x),
                lambda: jvp(lambda x: hw(x)[0], (x,), (x,))):
        with pytest.raises(RuntimeError, match=r"HighwayRNN: .* not supported by Highway-BP \(iterations=2\).*Use iterations=None"):
            run()
    xx = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"batched gradients .* not supported by Highway-BP \(iterations=2\).*iterations=None"):
        torch.autograd.grad(hw(xx)[0], xx, V, is_grads_batched=True)


def test_cell_torch_save_keeps_no_diagnostics():
    """``torch.save(HighwayRNN)`` after a backward with diagnostics: no ``Diagnostics``
    pickled; ``weights_only=True`` loads it once the layer and its cell's class are
    allow-listed; the copy starts with ``last_diagnostics=None``."""
    torch.serialization.add_safe_globals([HighwayLSTM, HighwayGRU, HighwayRNN, nn.GRUCell])
    torch.manual_seed(0)
    m = HighwayRNN(nn.GRUCell(I, H, dtype=D), iterations=2, diagnostics=True)
    x = data(T, B, I)
    m(x.clone().requires_grad_(True))[0].sum().backward()
    assert m.last_diagnostics.iterations == 2
    buf = io.BytesIO()
    torch.save(m, buf)
    assert b"Diagnostics" not in buf.getvalue()
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert back.last_diagnostics is None and back.highway_options == m.highway_options
    cot = [data(T, B, H, seed=4)]
    for p, q in zip(vjps(m, x, cot), vjps(back, x, cot)):
        assert torch.equal(p, q)
