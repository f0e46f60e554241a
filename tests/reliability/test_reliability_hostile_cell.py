"""Hostile and unusual input for HighwayRNN(cell): behaves as the loop over the cell
(its BPTT) does, or raises an error that names the problem."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from hwbptt.torch import HighwayRNN


def loop_grads(cell, x, w):
    x = x.detach().clone().requires_grad_(True)
    cell.zero_grad()
    s, outs = None, []
    for t in range(x.shape[0]):
        s = cell(x[t], s)
        outs.append(s[0] if isinstance(s, tuple) else s)
    (torch.stack(outs) * w).sum().backward()
    return [x.grad] + [p.grad for p in cell.parameters()]


def highway_grads(module, x, w):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad()
    (module(x)[0] * w).sum().backward()
    return [x.grad] + [p.grad for p in module.cell.parameters()]


def pair(kind="lstm", **options):
    torch.manual_seed(0)
    cell = (nn.LSTMCell if kind == "lstm" else nn.GRUCell)(3, 4, dtype=torch.float64)
    return HighwayRNN(cell, **options), cell


def test_T0_raises_clear_error():
    m, _ = pair(iterations=2)
    with pytest.raises(ValueError, match=r"at least one time step, got shape \(0, 2, 3\)"):
        m(torch.randn(0, 2, 3, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("iterations", [None, 2])
def test_dtype_mismatch_raises_as_the_cell(iterations):
    m, cell = pair(iterations=iterations)
    x = torch.randn(5, 2, 3, dtype=torch.float32, requires_grad=True)
    with pytest.raises(RuntimeError) as expected:
        cell(x[0])
    with pytest.raises(RuntimeError) as got:
        m(x)
    assert str(got.value).splitlines()[0] == str(expected.value).splitlines()[0]


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_non_contiguous_and_expanded_inputs(layout):
    T = 8
    m, cell = pair(iterations=T)
    base = torch.randn((2, T, 3) if layout == "transposed" else (1, 2, 3), dtype=torch.float64)
    x = base.transpose(0, 1) if layout == "transposed" else base.expand(T, 2, 3)
    w = torch.randn(T, 2, 4, dtype=torch.float64)
    for a, b in zip(highway_grads(m, x, w), loop_grads(cell, x, w)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_frozen_cell_parameters_and_input_without_grad():
    T = 8
    m, cell = pair(iterations=T)
    cell.weight_hh.requires_grad_(False)
    x, w = torch.randn(T, 2, 3, dtype=torch.float64), torch.randn(T, 2, 4, dtype=torch.float64)
    got, exp = highway_grads(m, x, w), loop_grads(cell, x, w)
    assert cell.weight_hh.grad is None
    for a, b in zip(got, exp):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    m.zero_grad()
    (m(x)[0] * w).sum().backward()  # input without grad
    torch.testing.assert_close(cell.weight_ih.grad, exp[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_options_and_gradients(how):
    m, _ = pair(iterations=3, gamma=0.5)
    if how == "deepcopy":
        dup = copy.deepcopy(m)
    elif how == "pickle":
        dup = pickle.loads(pickle.dumps(m))
    else:
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        dup = torch.load(buf, weights_only=False)
    assert dup.highway_options == m.highway_options
    x, w = torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(6, 2, 4, dtype=torch.float64)
    for a, b in zip(highway_grads(m, x, w), highway_grads(dup, x, w)):
        assert torch.equal(a, b)
    assert all(p is not q for p, q in zip(m.parameters(), dup.parameters()))


_COMPILE_SCRIPT = """
import json, warnings
warnings.filterwarnings("ignore")
import torch
from torch import nn
from hwbptt.torch import HighwayRNN
torch.manual_seed(0)
cell = nn.GRUCell(3, 4, dtype=torch.float64)
m = HighwayRNN(cell, iterations=2)
x, w = torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(6, 2, 4, dtype=torch.float64)
def grads(fn):
    xx = x.clone().requires_grad_(True)
    m.zero_grad()
    (fn(xx)[0] * w).sum().backward()
    return [xx.grad] + [p.grad for p in cell.parameters()]
eager = grads(m)
compiled = grads(torch.compile(m, backend="aot_eager"))
print(json.dumps({"err": max(float((a - b).abs().max()) for a, b in zip(compiled, eager))}))
"""


def test_torch_compile_same_gradients():
    """In a fresh interpreter (Triton after TensorFlow segfaults here; see the docs)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["err"] <= 1e-12


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("iterations", [None, 2])
def test_empty_batch_as_the_loop(kind, iterations):
    m, cell = pair(kind, iterations=iterations)
    x, w = torch.randn(5, 0, 3, dtype=torch.float64), torch.randn(5, 0, 4, dtype=torch.float64)
    y, final = m(x.clone().requires_grad_(True))
    assert y.shape == (5, 0, 4)
    for f in final if isinstance(final, tuple) else (final,):
        assert f.shape == (0, 4)
    got, exp = highway_grads(m, x, w), loop_grads(cell, x, w)
    assert got[0].shape == x.shape
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("iterations", [None, 2, 10])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_input_propagates_as_the_loop(kind, iterations, bad):
    """Exactly the entries BPTT makes non-finite are non-finite; the finite ones agree
    (exact mode and k = T; the pattern only at k = 2)."""
    T = 10
    m, cell = pair(kind, iterations=iterations)
    x, w = torch.randn(T, 2, 3, dtype=torch.float64), torch.randn(T, 2, 4, dtype=torch.float64)
    x[4, 1, 0] = bad
    with torch.no_grad():
        y_loop = torch.stack([s[0] if isinstance(s, tuple) else s for s in _states(cell, x)])
    torch.testing.assert_close(m(x.clone().requires_grad_(True))[0], y_loop, rtol=0, atol=0, equal_nan=True)
    got, exp = highway_grads(m, x, w), loop_grads(cell, x, w)
    if bad != bad:  # NaN reaches row 1's whole input gradient, not row 0's
        assert not torch.isfinite(exp[0][:, 1]).any() and torch.isfinite(exp[0][:, 0]).all()
    for a, b in zip(got, exp):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        if iterations != 2:
            fin = torch.isfinite(b)
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-9, atol=1e-12)


def _states(cell, x):
    s, out = None, []
    for t in range(x.shape[0]):
        s = cell(x[t], s)
        out.append(s)
    return out


class _BatchMeanCell(nn.Module):
    """Mixes batch rows (adds the batch mean of the input): a NaN in one row reaches
    every row of its step in the loop, and every row of every step in one T·B call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4, dtype=torch.float64)

    def forward(self, x, s):
        return torch.tanh(self.lin(x + x.mean(0, keepdim=True)) + s)

    def initial_state(self, batch, device, dtype):
        return torch.zeros(batch, 4, device=device, dtype=dtype)


def test_nan_in_a_row_mixing_cell_still_refused():
    """A NaN does not hide a cell that mixes batch rows: the non-finite entries differ."""
    m = HighwayRNN(_BatchMeanCell(), iterations=3)
    bad = torch.randn(6, 2, 3, dtype=torch.float64)
    bad[3, 1, 0] = float("nan")
    y, _ = m(bad.requires_grad_(True))
    with pytest.raises(RuntimeError, match=r"non-finite \(NaN/Inf\) in one and finite in the other.*mixes batch rows"):
        y.sum().backward()


def test_jit_script_raises_clearly():
    m, _ = pair(iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for target in (m, nn.Sequential(m, nn.Linear(4, 2, dtype=torch.float64))):
            with pytest.raises(RuntimeError, match="HighwayRNN cannot be compiled by torch.jit.script"):
                torch.jit.script(target)


def test_jit_trace_raises_clearly():
    """Highway path: a clear error. Under no_grad or with iterations=None: the trace
    records the loop; its outputs (and, exact, its gradients) are the loop's."""
    m, cell = pair(iterations=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="HighwayRNN: torch.jit.trace cannot record Highway-BP"):
            torch.jit.trace(m, (x,))
        with torch.no_grad():
            traced = torch.jit.trace(m, (x,))
        m.iterations = None
        traced_exact = torch.jit.trace(m, (x,))
    x2, w = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        y_loop = torch.stack([s[0] for s in _states(cell, x2)])
        torch.testing.assert_close(traced(x2)[0], y_loop, rtol=1e-12, atol=1e-12)
    for a, b in zip(highway_grads(traced_exact, x2, w), loop_grads(cell, x2, w)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- check_finite


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("iterations", [None, 3])
@pytest.mark.parametrize("batch_first", [False, True])
def test_cell_check_finite_forward_names_step(kind, iterations, batch_first):
    torch.manual_seed(0)
    cell = (nn.LSTMCell if kind == "lstm" else nn.GRUCell)(3, 4, dtype=torch.float64)
    m = HighwayRNN(cell, iterations=iterations, batch_first=batch_first, check_finite=True)
    x = torch.randn(30, 2, 3, dtype=torch.float64)
    w = torch.randn(30, 2, 4, dtype=torch.float64)
    lay = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
    checked = highway_grads(m, lay(x), lay(w))  # finite: no error, and the hooks change nothing
    m.check_finite = False
    for a, b in zip(checked, highway_grads(m, lay(x), lay(w))):
        assert torch.equal(a, b)
    m.check_finite = True
    bad = x.clone()
    bad[13, 1, 0] = float("nan")
    bad[21, 0, 2] = float("inf")
    with pytest.raises(FloatingPointError, match=r"HighwayRNN \(check_finite=True\): input has a non-finite value \(nan\) in the forward, first at step 13$"):
        m(lay(bad))
    with pytest.raises(FloatingPointError, match=r"input has a non-finite value \(nan\) in the forward, first at step 13$"):
        m(bad[:, 1])  # unbatched (T, I)
    h = torch.zeros(2, 4, dtype=torch.float64)
    h[1, 3] = float("-inf")
    state, name = ((h, torch.zeros_like(h)), r"initial state\[0\]") if kind == "lstm" else (h, "initial state")
    with pytest.raises(FloatingPointError, match=name + r" has a non-finite value \(-inf\) in the forward, first at batch row 1$"):
        m(lay(x), state)
    # off: nothing raises, and the NaN propagates as loop BPTT propagates it
    m.check_finite = False
    got, exp = highway_grads(m, lay(bad), lay(w)), loop_grads(cell, bad, w)
    got[0] = lay(got[0])  # the input gradient, back to (T, B, I)
    assert not torch.isfinite(got[0]).all()
    for a, b in zip(got, exp):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))


def _overflowing(x, s):
    """s_t = 1e100 s_{t-1} + x_t: finite inputs, the state overflows to Inf at step 2 from s_{-1} = 1e90."""
    return s * 1e100 + x


@pytest.mark.parametrize("iterations", [None, 3])
@pytest.mark.parametrize("batch_first", [False, True])
def test_cell_check_finite_outputs_and_upstream_gradient(iterations, batch_first):
    x = torch.rand(6, 2, 3, dtype=torch.float64, requires_grad=True)
    s0 = torch.full((2, 3), 1e90, dtype=torch.float64, requires_grad=True)
    m = HighwayRNN(_overflowing, residual="identity", iterations=iterations, check_finite=True)
    with torch.no_grad():
        expected_step = next(t for t, s in enumerate(_states(_overflowing_with_state(s0), x)) if not torch.isfinite(s).all())
    with pytest.raises(FloatingPointError, match=rf"output has a non-finite value \(inf\) in the forward, first at step {expected_step}$"):
        m(x, s0)

    torch.manual_seed(0)
    m = HighwayRNN(nn.LSTMCell(3, 4, dtype=torch.float64), iterations=iterations, check_finite=True, batch_first=batch_first)
    x = torch.randn((2, 20, 3) if batch_first else (20, 2, 3), dtype=torch.float64, requires_grad=True)
    y, (h, c) = m(x)
    w = torch.ones_like(y)
    w[(1, 9, 2) if batch_first else (9, 1, 2)] = float("nan")
    with pytest.raises(FloatingPointError, match=r"the upstream gradient of output has a non-finite value \(nan\) in the backward, first at step 9$"):
        (y * w).sum().backward()
    y, (h, c) = m(x)
    with pytest.raises(FloatingPointError, match=r"the upstream gradient of final state\[1\] has a non-finite value \(inf\) in the backward, first at step 19$"):
        (y.sum() + (c * float("inf")).sum()).backward()
    y, (h, c) = m(x)  # h_n is the last output: its own check names it, not the output's
    with pytest.raises(FloatingPointError, match=r"the upstream gradient of final state\[0\] has a non-finite value \(nan\) in the backward, first at step 19$"):
        (y.sum() + (h * float("nan")).sum()).backward()
    m.check_finite = False  # off: the backward runs; the NaN reaches the input gradient as in loop BPTT
    y, _ = m(x)
    x.grad = None
    (y * w).sum().backward()
    assert not torch.isfinite(x.grad).all()


def _overflowing_with_state(s0):
    """The loop reference for ``_overflowing`` from ``s0`` (``_states`` starts from None)."""
    def cell(x, s):
        return _overflowing(x, s0 if s is None else s)
    return cell


def test_cell_check_finite_option_validation_repr_and_copies():
    m = HighwayRNN(nn.GRUCell(3, 4))
    assert m.check_finite is False and "check_finite" not in repr(m)
    with pytest.raises(TypeError, match="check_finite=1"):
        HighwayRNN(nn.GRUCell(3, 4), check_finite=1)
    with pytest.raises(TypeError, match="check_finite='yes'"):
        m.check_finite = "yes"
    m.check_finite = True
    assert "check_finite=True" in repr(m)
    for dup in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert dup.check_finite is True
        with pytest.raises(FloatingPointError, match="first at step 2"):
            dup(torch.tensor([[[0.0, 0.0, 0.0]]] * 2 + [[[float("nan"), 0.0, 0.0]]]))
