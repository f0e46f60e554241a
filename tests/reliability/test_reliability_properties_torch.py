"""Property-based tests of HighwayLSTM/HighwayGRU against autograd BPTT of nn.LSTM/nn.GRU.

Random cell type, layers, directions, batch_first, proj_size, T in 1..300, batch in 1..9,
hidden sizes, packed sequences of random lengths, losses at every step / at the end only /
at a few steps, float32 and float64."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _oracle import assert_grads_close, layer_cases, scaled, make_inputs, make_modules, rtol_for, run_and_grad, time_major


@given(case=layer_cases())
def test_exact_mode_matches_bptt(case):
    ours, parent = make_modules(case, iterations=None)
    x, hx = make_inputs(case)
    y_o, h_o, g_o = run_and_grad(case, ours, x, hx)
    y_p, h_p, g_p = run_and_grad(case, parent, x, hx)
    out_o = y_o.data if hasattr(y_o, "batch_sizes") else y_o
    out_p = y_p.data if hasattr(y_p, "batch_sizes") else y_p
    torch.testing.assert_close(out_o, out_p, rtol=rtol_for(case.dtype), atol=rtol_for(case.dtype))
    for a, b in zip(h_o, h_p):
        torch.testing.assert_close(a, b, rtol=rtol_for(case.dtype), atol=rtol_for(case.dtype))
    assert_grads_close(g_o, g_p, rtol_for(case.dtype, case.T))


@given(case=layer_cases(T_max=120), extra=st.integers(0, 3), gamma=st.sampled_from([0.0, 0.3, 1.0]),
       split=st.sampled_from(["gates", "step"]))
def test_T_iterations_are_exact(case, extra, gamma, split):
    """The estimate's error reaches zero by k = T (and stays there beyond)."""
    ours, parent = make_modules(case, iterations=case.T + extra, gamma=gamma, split=split, diagnostics="debug")
    x, hx = make_inputs(case)
    _, _, g_o = run_and_grad(case, ours, x, hx)
    _, _, g_p = run_and_grad(case, parent, x, hx)
    assert_grads_close(g_o, g_p, rtol_for(case.dtype, case.T))
    # the diagnostics agree: every layer and direction ran T iterations (capped there) and
    # its estimate's cosine to the exact adjoint is 1
    steps = case.T if case.lengths is None else max(case.lengths)
    assert sorted(ours.last_diagnostics) == [(l, d) for l in range(case.num_layers) for d in range(case.D)]
    for key, diag in ours.last_diagnostics.items():
        assert diag.iterations == steps, key
        if diag.cosine == diag.cosine:  # NaN only for an all-zero adjoint
            assert diag.cosine >= 1 - (1e-9 if case.dtype == torch.float64 else 1e-5), (key, diag.cosine)


@given(case=layer_cases(unidirectional=True), k=st.integers(0, 12), gamma=st.sampled_from([0.0, 0.5, 1.0]),
       split=st.sampled_from(["gates", "step"]))
def test_last_k_plus_one_positions_exact(case, k, gamma, split):
    """After k iterations, the input gradient at step t is exact for t >= length-1-k
    (unidirectional layers, any loss: every path from a later loss to t crosses at most k
    blocks)."""
    ours, parent = make_modules(case, iterations=k, gamma=gamma, split=split)
    x, hx = make_inputs(case)
    _, _, g_o = run_and_grad(case, ours, x, hx)
    _, _, g_p = run_and_grad(case, parent, x, hx)
    gx_o, gx_p = time_major(case, g_o["x"]).double(), time_major(case, g_p["x"]).double()
    scale = max(float(gx_p.norm()), 1e-300)
    rtol = 1e-9 if case.dtype == torch.float64 else 2e-4
    # Where a layer's path sum grew, the engine returns an earlier iterate (diagnostics.used):
    # exact on that many more steps.
    k_eff = min([d.used for d in ours.last_diagnostics.values() if d.diverged] + [k])
    for b in range(case.B):
        L = case.valid_length(b)
        lo = max(0, L - 1 - k_eff)
        err = float((gx_o[lo:L, b] - gx_p[lo:L, b]).norm())
        assert err <= rtol * scale, f"row {b}: steps {lo}..{L - 1} off by {err / scale:.3g} (relative)"
        # padded steps of a packed batch get exactly zero
        if L < case.T:
            assert float(gx_o[L:, b].abs().max()) == 0.0
    if k >= case.T:
        assert_grads_close(g_o, g_p, rtol_for(case.dtype, case.T))


@settings(max_examples=scaled(2 / 3))
@given(case=layer_cases(T_max=40, dtypes=(torch.float64,)))
def test_highway_forward_equals_parent(case):
    """The outputs and final states (the forward) are the parent's, in any mode."""
    ours, parent = make_modules(case, iterations=1)
    x, hx = make_inputs(case)
    y_o, h_o, _ = run_and_grad(case, ours, x, hx)
    y_p, h_p, _ = run_and_grad(case, parent, x, hx)
    out_o = y_o.data if hasattr(y_o, "batch_sizes") else y_o
    out_p = y_p.data if hasattr(y_p, "batch_sizes") else y_p
    torch.testing.assert_close(out_o, out_p, rtol=1e-12, atol=1e-12)
    for a, b in zip(h_o, h_p):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
