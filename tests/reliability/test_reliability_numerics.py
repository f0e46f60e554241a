"""Numerics at the edges: very long sequences (finite, memory linear in T), saturated
gates, huge and tiny inputs, bfloat16 autocast, non-finite values, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hwbptt.torch import HighwayGRU, HighwayLSTM

PAIRS = [(HighwayLSTM, nn.LSTM), (HighwayGRU, nn.GRU)]
IDS = ["lstm", "gru"]


def twins(cls, parent, I, H, dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    ref = parent(I, H, dtype=dtype)
    ours = cls(I, H, dtype=dtype, **options)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def grads(module, x, weight, hx=None):
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y, _ = module(x, hx)
    (y * weight).sum().backward()
    return [x.grad] + [p.grad for p in module.parameters()]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- long sequences


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_T_100000_forward_backward_finite(cls, parent, torch_threads):
    """T = 100,000 (B = 2, H = 4): outputs and every gradient finite, the forward equal to
    the parent's, and the last k+1 input-gradient steps exact (k = 3)."""
    T, B, I, H, k = 100_000, 2, 3, 4, 3
    ours, ref = twins(cls, parent, I, H, dtype=torch.float32, iterations=k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g)
    w = torch.randn(T, B, H, generator=g)
    with torch_threads(1):  # oneDNN's threaded RNN kernels stall on a loaded 2-core machine
        x_o = x.clone().requires_grad_(True)
        y, _ = ours(x_o)
        (y * w).sum().backward()
        with torch.no_grad():
            y_ref, _ = ref(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x_o.grad).all()
    assert x_o.grad.abs().sum() > 0
    for name, p in ours.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # the last k+1 steps against BPTT on just the tail (the state entering the tail is the
    # forward's own state there, so the tail's BPTT is the full BPTT on those steps)
    tail = 50
    with torch.no_grad():
        _, h_before = ref(x[: T - tail])
    x_t = x[T - tail :].clone().requires_grad_(True)
    y_t, _ = ref(x_t, h_before)
    (y_t * w[T - tail :]).sum().backward()
    torch.testing.assert_close(x_o.grad[T - k - 1 :], x_t.grad[tail - k - 1 :], rtol=1e-4, atol=1e-5)


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    warnings.filterwarnings("ignore")
    from hwbptt.torch import HighwayGRU, HighwayLSTM
    torch.set_num_threads(1)
    cls = {"lstm": HighwayLSTM, "gru": HighwayGRU}[sys.argv[1]]
    T = int(sys.argv[2])
    torch.manual_seed(0)
    m = cls(4, 16, iterations=3)
    def step(T):
        x = torch.randn(T, 4, 4, requires_grad=True)
        y, _ = m(x)
        (y * y.detach()).sum().backward()
        assert torch.isfinite(x.grad).all()
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    step(500)  # libraries and kernels loaded
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = status("VmRSS")
    step(T)
    print(json.dumps({"peak_kib": status("VmHWM") - before}))
    """
)


def _peak_kib(kind: str, T: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, kind, str(T)], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_peak_memory_linear_in_T(kind):
    """Peak resident memory of one forward+backward (each length in a fresh process, peak
    RSS reset after a warm-up) grows 4x from T = 25,000 to T = 100,000: linear, not T log T
    or quadratic (a quadratic scan would give 16x)."""
    small, large = _peak_kib(kind, 25_000), _peak_kib(kind, 100_000)
    assert small > 1000, f"peak {small} KiB at T=25000: too small to measure"
    ratio = large / small
    assert 2.5 <= ratio <= 6.0, f"peak memory {small} KiB -> {large} KiB, ratio {ratio:.2f} (linear: 4)"


# ----------------------------------------------------------------------------- saturation, scale


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("bias", [40.0, -40.0, 12.0])
def test_saturated_gates(cls, parent, bias):
    """Gates pinned at 1 or 0 (biases of +-40, or 12: f = 1 - 6e-6): every gradient finite
    and, after T iterations, BPTT's; the cell state grows to ~T without overflow."""
    T, B, I, H = 60, 3, 3, 5
    ours, ref = twins(cls, parent, I, H, iterations=T)
    with torch.no_grad():
        for m in (ours, ref):
            m.bias_ih_l0.fill_(bias)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(T, B, I, generator=g, dtype=torch.float64), torch.randn(T, B, H, generator=g, dtype=torch.float64)
    for a, b in zip(grads(ours, x, w), grads(ref, x, w)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    ours.iterations = 2  # a truncated estimate stays finite too
    assert all(torch.isfinite(a).all() for a in grads(ours, x, w))


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-42], ids=["huge", "tiny", "subnormal"])
def test_huge_and_tiny_inputs(cls, parent, dtype, scale):
    """Inputs of magnitude 1e30 (saturating every gate), 1e-30 and 1e-42 (subnormal in
    float32): outputs and gradients finite and equal to BPTT's after T iterations."""
    T, B, I, H = 40, 2, 3, 4
    ours, ref = twins(cls, parent, I, H, dtype=dtype, iterations=T)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(T, B, I, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(dtype)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for a, b in zip(grads(ours, x, w), grads(ref, x, w)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_bfloat16_autocast_within_tolerance_of_float64(cls, parent):
    """Under ``torch.autocast("cpu", bfloat16)`` the exact-after-T Highway gradients are
    float32, finite, within 2e-2 (relative, per tensor) of a float64 BPTT reference, and
    within 5x of bfloat16's own rounding error: the float64 BPTT gradient of the same layer
    with its weights and input rounded to bfloat16 (measured: 1.3-2.2e-3 for the LSTM, ours
    1.7-6.5e-3). Whether the parent has a bfloat16 kernel depends on the CPU (oneDNN's LSTM
    has none without AVX-512 BF16 and raises), so the parent's own autocast run is no
    reference here."""
    T, B, I, H = 50, 3, 4, 6
    ours, ref32 = twins(cls, parent, I, H, dtype=torch.float32, iterations=T)
    ref64 = parent(I, H, dtype=torch.float64)
    ref64.load_state_dict(ref32.state_dict())
    rounded = parent(I, H, dtype=torch.float64)
    rounded.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in ref32.state_dict().items()})
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(T, B, I, generator=g), torch.randn(T, B, H, generator=g)
    exact = grads(ref64, x.double(), w.double())
    floor = grads(rounded, x.to(torch.bfloat16).double(), w.double())
    g_ours = autocast_grads(ours, x, w, torch.bfloat16)
    for a, r, e in zip(g_ours, floor, exact):
        assert a.dtype == torch.float32
        assert torch.isfinite(a).all()
        assert rel(a, e) <= 2e-2
        assert rel(a, e) <= 5 * rel(r, e) + 1e-6, (rel(a, e), rel(r, e))


def autocast_grads(module, x, w, dtype, backward_inside=False):
    """Forward under CPU autocast; backward outside it (PyTorch's recommended use) or
    inside it (common in training loops, and fine with the parent)."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=dtype):
        y, _ = module(x)
        loss = (y.float() * w).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_float16_autocast_within_tolerance_of_float64(cls, parent):
    """``torch.autocast("cpu", float16)``: the forward kernel runs in float16 where autocast
    would run the parent's in it (the LSTM; the CPU GRU is not on autocast's list and stays
    float32), the layer casting its inputs itself, so the result does not depend on whether
    this CPU's oneDNN has a float16 LSTM (where it has none, the parent's own call raises).
    The exact-after-T Highway gradients are float32 and within 1e-2 (relative, per tensor)
    of a float64 BPTT reference."""
    T, B, I, H = 30, 3, 4, 6
    ours, ref32 = twins(cls, parent, I, H, dtype=torch.float32, iterations=T)
    ref64 = parent(I, H, dtype=torch.float64)
    ref64.load_state_dict(ref32.state_dict())
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(T, B, I, generator=g), torch.randn(T, B, H, generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        y16 = ours(x.clone().requires_grad_(True))[0].detach()  # the Highway path (no grad: the parent's forward)
    assert y16.dtype == (torch.float16 if cls is HighwayLSTM else torch.float32)
    rel_y = rel(y16, ref64(x.double())[0])
    assert rel_y <= (5e-3 if cls is HighwayLSTM else 1e-6), rel_y
    exact = grads(ref64, x.double(), w.double())
    for a, e in zip(autocast_grads(ours, x, w, torch.float16), exact):
        assert a.dtype == torch.float32
        assert torch.isfinite(a).all()
        assert rel(a, e) <= 1e-2, rel(a, e)


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
def test_bfloat16_autocast_backward_inside_the_context(cls, parent):
    """``loss.backward()`` inside the ``torch.autocast`` block (common in training loops)
    gives the same gradients as a backward outside it."""
    T, B, I, H = 20, 2, 3, 4
    ours, _ = twins(cls, parent, I, H, dtype=torch.float32, iterations=T)
    x, w = torch.randn(T, B, I), torch.randn(T, B, H)
    inside = autocast_grads(ours, x, w, torch.bfloat16, backward_inside=True)
    outside = autocast_grads(ours, x, w, torch.bfloat16)
    for a, b in zip(inside, outside):
        assert rel(a, b) <= 1e-2


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_bfloat16_module_within_tolerance_of_float64(cls, parent, half):
    """A bfloat16 or float16 layer (parameters and input in half precision, the scan
    accumulating in float32): gradients within 5e-2 of float64 BPTT after T iterations."""
    T, B, I, H = 30, 3, 4, 6
    ours, ref32 = twins(cls, parent, I, H, dtype=torch.float32, iterations=T)
    ref64 = parent(I, H, dtype=torch.float64)
    ref64.load_state_dict(ref32.state_dict())
    ours = ours.to(half)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(T, B, I, generator=g), torch.randn(T, B, H, generator=g)
    exact = grads(ref64, x.double(), w.double())
    got = grads(ours, x.to(half), w.to(half))
    for a, e in zip(got, exact):
        assert a.dtype == half
        assert torch.isfinite(a).all()
        assert rel(a, e) <= 5e-2, rel(a, e)


# ----------------------------------------------------------------------------- non-finite values


def _nonfinite_grads(module, x, w):
    x = x.clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y, _ = module(x)
    (y * w).sum().backward()
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("cls, parent", PAIRS, ids=IDS)
@pytest.mark.parametrize("where", ["input-nan", "input-inf", "upstream-nan", "upstream-inf"])
@pytest.mark.parametrize("k", [None, 2, 40])
def test_nonfinite_propagate_as_bptt(cls, parent, where, k):
    """A NaN/Inf in the input or the upstream gradient makes exactly the gradient entries
    non-finite that BPTT makes non-finite (no crash, nothing hidden), and the finite
    entries agree (after T iterations; k=2 only the pattern)."""
    T, B, I, H = 40, 3, 3, 4
    ours, ref = twins(cls, parent, I, H, dtype=torch.float32, iterations=k)
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(T, B, I, generator=g), torch.randn(T, B, H, generator=g)
    bad = float("nan") if where.endswith("nan") else float("inf")
    if where.startswith("input"):
        x[17, 1, 2] = bad
    else:
        w[23, 2, 1] = bad
    got, exp = _nonfinite_grads(ours, x, w), _nonfinite_grads(ref, x, w)
    if where != "input-inf":  # an Inf input saturates gates: BPTT may keep x's gradient finite
        assert not torch.isfinite(exp[0]).all()
    for a, b in zip(got, exp):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        if k != 2:
            fin = torch.isfinite(b)
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("iterations", [None, 3])
def test_check_finite_forward_names_step(cls, iterations):
    m = cls(3, 4, iterations=iterations, check_finite=True, batch_first=True)
    x = torch.randn(2, 30, 3, requires_grad=True)
    m(x)[0].sum().backward()  # finite: no error
    bad = x.detach().clone()
    bad[1, 13, 0] = float("nan")
    bad[0, 21, 2] = float("inf")
    with pytest.raises(FloatingPointError, match=r"input has a non-finite value \(nan\).*first at step 13"):
        m(bad)
    with pytest.raises(FloatingPointError, match=r"initial state hx\[0\] has a non-finite value \(inf\).*layer/direction index 0"):
        h = torch.zeros(1, 2, 4)
        h[0, 1, 1] = float("inf")
        m(x, (h, torch.zeros(1, 2, 4)) if cls is HighwayLSTM else h)
    m.check_finite = False
    y, _ = m(bad)  # off: propagates like the parent
    assert not torch.isfinite(y[1, 13:]).all() and torch.isfinite(y[1, :13]).all()


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("iterations", [None, 3])
def test_check_finite_outputs_and_upstream_gradient(cls, iterations):
    m = cls(3, 4, iterations=iterations, check_finite=True)
    with torch.no_grad():
        m.weight_hh_l0[0, 0] = float("nan")  # finite inputs; the outputs go NaN from step 0
    x = torch.randn(20, 2, 3, requires_grad=True)
    with pytest.raises(FloatingPointError, match=r"output has a non-finite value \(nan\).*first at step 0"):
        m(x)
    m = cls(3, 4, iterations=iterations, check_finite=True)
    x = torch.randn(20, 2, 3, requires_grad=True)
    y, h = m(x)
    w = torch.ones_like(y)
    w[9, 1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"upstream gradient of output has a non-finite value \(nan\).*first at step 9"):
        (y * w).sum().backward()
    y, h = m(x)
    hn = h[0] if isinstance(h, tuple) else h
    with pytest.raises(FloatingPointError, match="upstream gradient of h_n.*first at step 19"):
        (hn * float("inf")).sum().backward()


def test_check_finite_packed_step_and_validation():
    from torch.nn.utils.rnn import pack_padded_sequence

    m = HighwayLSTM(2, 3, check_finite=True)
    x = torch.randn(12, 3, 2)
    x[7, 2, 1] = float("nan")  # row 2 has length 10: step 7 is inside it
    packed = pack_padded_sequence(x, torch.tensor([5, 12, 10]), enforce_sorted=False)
    with pytest.raises(FloatingPointError, match="first at step 7"):
        m(packed)
    x[7, 0, 1] = float("nan")  # step 7 of row 0 is padding (length 5): not part of the input
    x[7, 2, 1] = 0.0
    m(pack_padded_sequence(x, torch.tensor([5, 12, 10]), enforce_sorted=False))
    with pytest.raises(TypeError, match="check_finite=1"):
        HighwayLSTM(2, 3, check_finite=1)
    with pytest.raises(TypeError, match="check_finite='yes'"):
        m.check_finite = "yes"
    assert m.check_finite is True


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
@pytest.mark.parametrize("packed", [False, True])
def test_bit_identical_gradients_across_runs(cls, packed):
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    m = cls(5, 16, num_layers=2, bidirectional=True, iterations=3, tol=1e-6)
    x = torch.randn(200, 8, 5)
    lengths = torch.randint(1, 201, (8,))
    runs = []
    for _ in range(3):
        xx = x.clone().requires_grad_(True)
        m.zero_grad()
        inp = pack_padded_sequence(xx, lengths, enforce_sorted=False) if packed else xx
        y, _ = m(inp)
        out = y.data if packed else y
        (out * out.detach().cos()).sum().backward()
        runs.append([xx.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
