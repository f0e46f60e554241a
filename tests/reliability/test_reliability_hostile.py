"""Hostile and unusual input for HighwayLSTM/HighwayGRU (and convert): each case behaves
as the parent nn.LSTM/nn.GRU does, or raises an error that names the problem."""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from hwbptt.torch import HighwayGRU, HighwayLSTM, convert

PAIRS = [(HighwayLSTM, nn.LSTM), (HighwayGRU, nn.GRU)]
IDS = ["lstm", "gru"]


def twins(cls, parent, I=3, H=4, dtype=torch.float64, seed=0, parent_kwargs=None, **options):
    torch.manual_seed(seed)
    ref = parent(I, H, dtype=dtype, **(parent_kwargs or {}))
    ours = cls(I, H, dtype=dtype, **(parent_kwargs or {}), **options)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def grads_of(module, x, w, hx=None, wrt_x=True):
    for p in module.parameters():
        p.grad = None
    leaf = x
    if wrt_x:
        leaf = x.detach().clone().requires_grad_(True)
    y, _ = module(leaf, hx)
    (y * w).sum().backward()
    return ([leaf.grad] if wrt_x else []) + [p.grad for p in module.parameters()]


def assert_same(a_list, b_list, rtol=1e-9, atol=1e-12):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def parent_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value).splitlines()[0]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_as_parent(cls, parent, batch_first):
    ours, ref = twins(cls, parent, parent_kwargs=dict(batch_first=batch_first), iterations=2)
    x = torch.randn((0, 7, 3) if batch_first else (7, 0, 3), dtype=torch.float64)
    w = torch.randn((0, 7, 4) if batch_first else (7, 0, 4), dtype=torch.float64)
    y_o, h_o = ours(x)
    y_p, h_p = ref(x)
    assert y_o.shape == y_p.shape
    assert_same(grads_of(ours, x, w), grads_of(ref, x, w))
    assert all(float(p.grad.abs().sum()) == 0 for p in ours.parameters())


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("iterations", [None, 2])
def test_T0_raises_as_parent(cls, parent, iterations):
    ours, ref = twins(cls, parent, iterations=iterations)
    x = torch.randn(0, 2, 3, dtype=torch.float64, requires_grad=True)
    etype, msg = parent_error(lambda: ref(x))
    with pytest.raises(etype, match="sequence length"):
        ours(x)
    assert "sequence length" in msg


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_hidden_and_input_size_one(cls, parent):
    T = 25
    ours, ref = twins(cls, parent, I=1, H=1, iterations=T)
    x, w = torch.randn(T, 2, 1, dtype=torch.float64), torch.randn(T, 2, 1, dtype=torch.float64)
    assert_same(grads_of(ours, x, w), grads_of(ref, x, w))


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_unbatched_input(cls, parent):
    T = 12
    ours, ref = twins(cls, parent, iterations=T)
    x, w = torch.randn(T, 3, dtype=torch.float64), torch.randn(T, 4, dtype=torch.float64)
    assert_same(grads_of(ours, x, w), grads_of(ref, x, w))


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded", "channels-sliced"])
def test_non_contiguous_and_expanded_inputs(cls, parent, layout):
    """Views with odd strides (and stride 0): same outputs and gradients as the parent,
    gradient reaching the base tensor."""
    T, B = 10, 3
    ours, ref = twins(cls, parent, iterations=T)
    g = torch.Generator().manual_seed(0)
    shapes = {"transposed": (B, T, 3), "strided": (2 * T, B, 3), "expanded": (1, B, 3), "channels-sliced": (T, B, 7)}
    w = torch.randn(T, B, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, 1, 4, generator=g, dtype=torch.float64).transpose(0, 1)  # non-contiguous state
    results = []
    for module in (ours, ref):
        base = torch.randn(shapes[layout], generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        x = {"transposed": lambda: base.transpose(0, 1), "strided": lambda: base[::2],
             "expanded": lambda: base.expand(T, B, 3), "channels-sliced": lambda: base[..., 1:7:2]}[layout]()
        assert not x.is_contiguous()
        hx = (h0, torch.zeros(1, B, 4, dtype=torch.float64)) if module.__class__ in (nn.LSTM, HighwayLSTM) else h0
        module.zero_grad()
        y, _ = module(x, hx)
        (y * w).sum().backward()
        results.append([y.detach(), base.grad] + [p.grad for p in module.parameters()])
    assert_same(*results)


# ----------------------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("iterations", [None, 2])
def test_mismatched_input_dtype_raises_as_parent(cls, parent, iterations):
    ours, ref = twins(cls, parent, dtype=torch.float32, iterations=iterations)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    etype, msg = parent_error(lambda: ref(x))
    with pytest.raises(etype) as info:
        ours(x)
    assert str(info.value).splitlines()[0] == msg
    assert "dtype" in msg


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("iterations", [None, 2])
def test_mismatched_state_dtype_raises_as_parent(cls, parent, iterations):
    ours, ref = twins(cls, parent, iterations=iterations)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.zeros(1, 2, 4)  # float32 state, float64 input and layer
    hx = (h, h.clone()) if parent is nn.LSTM else h
    etype, msg = parent_error(lambda: ref(x, hx))
    with pytest.raises(etype) as info:
        ours(x, hx)
    assert str(info.value).splitlines()[0] == msg


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("iterations", [None, 2])
@pytest.mark.parametrize("what", ["input", "state"])
def test_mismatched_device_raises_as_parent(cls, parent, iterations, what):
    """An input or state on another device (``meta`` stands in for an accelerator here)."""
    ours, ref = twins(cls, parent, iterations=iterations)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    hx = None
    if what == "input":
        x = torch.empty(5, 2, 3, dtype=torch.float64, device="meta", requires_grad=True)
    else:
        h = torch.empty(1, 2, 4, dtype=torch.float64, device="meta")
        hx = (h, h) if parent is nn.LSTM else h
    etype, msg = parent_error(lambda: ref(x, hx))
    with pytest.raises(etype) as info:
        ours(x, hx)
    assert str(info.value).splitlines()[0] == msg


# ----------------------------------------------------------------------------- requires_grad


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("frozen", ["weight_hh_l0", "bias_ih_l0", "all"])
def test_frozen_parameters(cls, parent, frozen):
    T = 15
    ours, ref = twins(cls, parent, iterations=T)
    for m in (ours, ref):
        for name, p in m.named_parameters():
            if frozen == "all" or name == frozen:
                p.requires_grad_(False)
    x, w = torch.randn(T, 2, 3, dtype=torch.float64), torch.randn(T, 2, 4, dtype=torch.float64)
    g_o, g_p = grads_of(ours, x, w), grads_of(ref, x, w)
    assert_same(g_o, g_p)
    assert sum(g is None for g in g_o) == (4 if frozen == "all" else 1)


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_input_without_grad(cls, parent):
    T = 15
    ours, ref = twins(cls, parent, iterations=T)
    x, w = torch.randn(T, 2, 3, dtype=torch.float64), torch.randn(T, 2, 4, dtype=torch.float64)
    assert_same(grads_of(ours, x, w, wrt_x=False), grads_of(ref, x, w, wrt_x=False))


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_nothing_requires_grad(cls, parent):
    ours, ref = twins(cls, parent, iterations=2)
    for p in ours.parameters():
        p.requires_grad_(False)
    y, _ = ours(torch.randn(6, 2, 3, dtype=torch.float64))
    assert not y.requires_grad and y.grad_fn is None


# ----------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("penalty_on", ["weights", "input"])
def test_double_backward_raises_on_highway_path(cls, parent, penalty_on):
    """A gradient penalty (create_graph=True) through Highway-BP raises a clear error
    instead of returning a second derivative that silently misses the layer's part."""
    ours, _ = twins(cls, parent, iterations=3)
    x = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 2, 4, dtype=torch.float64)
    loss = (ours(x)[0] * w).sum()  # linear in y: the upstream gradient needs no graph
    wrt = ours.weight_ih_l0 if penalty_on == "weights" else x
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\).*iterations=None"):
        torch.autograd.grad(loss, wrt, create_graph=True)
    # without create_graph the same call is fine
    loss = (ours(x)[0] * w).sum()
    assert torch.autograd.grad(loss, wrt)[0].shape == wrt.shape


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("packed", [False, True])
def test_double_backward_exact_mode_matches_parent(cls, parent, packed):
    from torch.nn.utils.rnn import pack_padded_sequence

    ours, ref = twins(cls, parent, iterations=None)
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    w = torch.randn(8, 2, 4, dtype=torch.float64)
    out = []
    for m in (ours, ref):
        xx = x.clone().requires_grad_(True)
        if packed:
            y = m(pack_padded_sequence(xx, torch.tensor([8, 5])))[0].data
            loss = (y * w.reshape(-1, 4)[: y.shape[0]]).sum()
        else:
            loss = (m(xx)[0] * w).sum()
        g, = torch.autograd.grad(loss, m.weight_ih_l0, create_graph=True)
        out.append(torch.autograd.grad(loss + g.pow(2).sum(), [xx, m.weight_hh_l0]))
    assert_same(*out)


# ----------------------------------------------------------------------------- copies


def _same_behaviour(a, b, T=12):
    D = 2 if a.bidirectional else 1
    x, w = torch.randn(T, 2, 3, dtype=torch.float64), torch.randn(T, 2, 4 * D, dtype=torch.float64)
    assert a.highway_options == b.highway_options and a.check_finite == b.check_finite
    assert_same(grads_of(a, x, w), grads_of(b, x, w), rtol=0, atol=0)


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_deepcopy(cls, parent):
    ours, _ = twins(cls, parent, iterations=2, tol=1e-4, gamma=0.25, check_finite=True)
    dup = copy.deepcopy(ours)
    _same_behaviour(ours, dup)
    assert all(p is not q for p, q in zip(ours.parameters(), dup.parameters()))
    assert all(p is q for p, q in zip(dup.parameters(), dup._flat_weights))  # the copy uses its own
    dup.iterations = 5
    with torch.no_grad():
        dup.weight_hh_l0.add_(1.0)
    assert ours.iterations == 2
    assert not torch.equal(ours.weight_hh_l0, dup.weight_hh_l0)


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickling(cls, parent, how):
    ours, _ = twins(cls, parent, iterations=4, gamma=0.5, diagnostics=True)
    ours(torch.randn(3, 1, 3, dtype=torch.float64, requires_grad=True))[0].sum().backward()  # diagnostics filled
    if how == "pickle":
        back = pickle.loads(pickle.dumps(ours))
    else:
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
    assert type(back) is cls
    _same_behaviour(ours, back)


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_state_dict_round_trips(cls, parent):
    ours, ref = twins(cls, parent, parent_kwargs=dict(num_layers=2, bidirectional=True), iterations=3)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh = cls(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, iterations=3)
    fresh.load_state_dict(ours.state_dict())
    _same_behaviour(ours, fresh)
    back = parent(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    back.load_state_dict(fresh.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    with pytest.raises(RuntimeError, match="Missing key"):
        cls(3, 4, num_layers=3, dtype=torch.float64).load_state_dict(ours.state_dict())


# ----------------------------------------------------------------------------- jit and compile


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_jit_script_raises_clearly(cls, parent):
    ours, ref = twins(cls, parent, iterations=2)
    torch.jit.script(ref)  # the parent scripts
    with pytest.raises(RuntimeError, match=f"{cls.__name__} cannot be compiled by torch.jit.script"):
        torch.jit.script(ours)
    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(nn.Sequential(nn.Linear(3, 3), ours))


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_jit_trace(cls, parent):
    """Tracing the Highway path raises; tracing exact mode or under no_grad gives the
    parent's traced behaviour."""
    ours, ref = twins(cls, parent, iterations=2)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="torch.jit.trace cannot record Highway-BP"):
            torch.jit.trace(ours, (x,))
        with torch.no_grad():
            traced = torch.jit.trace(ours, (x,))
        ours.iterations = None
        traced_exact = torch.jit.trace(ours, (x,))
    x2 = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x2)[0], ref(x2)[0])
    gx = torch.autograd.grad((traced_exact(x2)[0] * w).sum(), x2)[0]
    torch.testing.assert_close(gx, torch.autograd.grad((ref(x2)[0] * w).sum(), x2)[0])


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import copy, json, sys, time, warnings
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from hwbptt.torch import HighwayGRU, HighwayLSTM
    cls = {"HighwayLSTM": HighwayLSTM, "HighwayGRU": HighwayGRU}[sys.argv[1]]
    backend = sys.argv[2]

    class Net(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.inp = nn.Linear(3, 5)
            self.rnn = cls(5, 6, num_layers=layers, iterations=2, batch_first=True)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            return self.head(self.rnn(torch.tanh(self.inp(x)))[0]).pow(2).mean()

    torch.manual_seed(0)
    net = Net(2 if backend == "aot_eager" else 1)
    x = torch.randn(4, 20, 3)
    loss = net(x)
    loss.backward()
    eager = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    start = time.monotonic()
    compiled = torch.compile(net, backend=backend)
    loss_c = compiled(x)
    loss_c.backward()
    seconds = time.monotonic() - start
    errs = [float((loss_c - loss).abs())] + [float((p.grad - g).abs().max() / g.abs().max()) for p, g in zip(net.parameters(), eager)]
    # an option changed between steps takes effect in the compiled model too
    net.rnn.iterations = None
    net.zero_grad()
    compiled(x).backward()
    ref = copy.deepcopy(net)
    ref.zero_grad()
    ref(x).backward()
    errs_exact = [float((p.grad - q.grad).abs().max() / q.grad.abs().max()) for p, q in zip(net.parameters(), ref.parameters())]
    highway_vs_exact = max(float((g - q.grad).abs().max() / q.grad.abs().max()) for g, q in zip(eager, ref.parameters()))
    print(json.dumps({"seconds": seconds, "errs": errs, "errs_exact": errs_exact, "highway_vs_exact": highway_vs_exact}))
    """
)


# In a fresh interpreter: importing Triton (torch.compile does) after TensorFlow segfaults
# in this environment (docs/reliability.md), and the Keras tests import TensorFlow.
# inductor builds C++ kernels (about a minute on 2 cores): one model there, both via aot_eager.
@pytest.mark.parametrize("cls, backend", [(HighwayLSTM, "aot_eager"), (HighwayGRU, "aot_eager"), (HighwayLSTM, "inductor")],
                         ids=["lstm-aot_eager", "gru-aot_eager", "lstm-inductor"])
def test_torch_compile_same_gradients(cls, backend):
    """torch.compile of a model holding Highway layers (graph breaks allowed around the
    autograd.Function): same loss and gradients as eager, in bounded time; an option
    changed between steps takes effect."""
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, cls.__name__, backend],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["seconds"] < 300
    assert max(result["errs"]) <= 1e-4, result["errs"]
    assert max(result["errs_exact"]) <= 1e-4, result["errs_exact"]
    assert result["highway_vs_exact"] > 1e-4  # the option really switched the gradient


# ----------------------------------------------------------------------------- convert


def test_convert_keeps_hooks_and_warns_on_subclasses():
    from torch.nn.utils import parametrizations

    calls = []
    model = nn.Sequential(nn.LSTM(3, 4), nn.GRU(4, 4))
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model[1].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    convert(model, iterations=2)
    x = torch.randn(5, 2, 3)
    model[1](model[0](x)[0])
    assert calls == ["HighwayLSTM", "pre"]
    handle.remove()
    model[0](x)
    assert calls == ["HighwayLSTM", "pre"]

    sub = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4))
    parametrizations.weight_norm(sub[1], "weight_hh_l0")
    with pytest.warns(UserWarning, match=r"convert: 1 is a ParametrizedLSTM.*NOT converted"):
        convert(sub)
    assert not isinstance(sub[1], HighwayLSTM)
