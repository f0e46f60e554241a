"""Gradients: exact mode against the backend's BPTT, and the k-iteration exactness."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from hwbptt.keras import HighwayRNN

from helpers import B, D, H, KINDS, T, TOL, grads, make, n_states, rel, tensor

rng = np.random.default_rng(1)
X = rng.normal(size=(B, T, D))
LENGTHS = [T, 4, 2]  # unequal lengths, right-padded
MASK = np.arange(T)[None, :] < np.array(LENGTHS)[:, None]


def _loss(layer, n, return_sequences, return_state, with_mask, with_init, weights):
    """The loss ``Σ out ⊙ W (+ Σ final_states ⊙ V)`` of one call of ``layer``."""

    def loss(x, *init):
        kwargs = {}
        if with_mask:
            kwargs["mask"] = tensor(MASK, "bool")
        if with_init:
            kwargs["initial_state"] = list(init)
        out = layer(x, **kwargs)
        outs = list(out) if return_state else [out]
        total = 0.0
        for o, w in zip(outs, weights):
            total = total + ops.sum(o * ops.cast(tensor(w), o.dtype))
        return total

    return loss


CASES = [
    # (return_sequences, return_state, go_backwards, mask, initial_state)
    (True, False, False, False, False),
    (False, False, False, False, False),
    (True, True, True, False, True),
    (False, True, False, True, True),
    (True, False, True, True, False),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "seq{}-st{}-back{}-mask{}-init{}".format(*map(int, c)))
@pytest.mark.parametrize("kind", list(KINDS))
def test_exact_mode_equals_bptt(kind, case, dtype):
    return_sequences, return_state, go_backwards, with_mask, with_init = case
    layer, hw_kwargs = make(kind, dtype, return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards)
    hw = HighwayRNN(layer, iterations=None, **hw_kwargs)
    n = n_states(layer)
    out_dim = T if return_sequences else None
    weights = [rng.normal(size=(B, T, H) if out_dim else (B, H))] + [rng.normal(size=(B, H)) for _ in range(n if return_state else 0)]
    tensors = [tensor(X, dtype)] + ([tensor(rng.normal(size=(B, H)), dtype) for _ in range(n)] if with_init else [])
    variables = layer.trainable_variables
    ref = grads(_loss(layer, n, return_sequences, return_state, with_mask, with_init, weights), tensors, variables)
    got = grads(_loss(hw, n, return_sequences, return_state, with_mask, with_init, weights), tensors, variables)
    assert len(got) == len(ref) == len(tensors) + len(variables)
    for g, r in zip(got, ref):
        assert np.linalg.norm(r) > 0
        assert rel(g, r) <= TOL[dtype], (kind, case)


@pytest.mark.parametrize("split", ["gates", "step"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_k_iterations_exact_on_last_k_plus_1_steps(kind, split):
    """Loss on the final output only: after k iterations, ∂L/∂x_t is exact for the
    last k+1 steps and (for k+1 < T) not before them."""
    if split == "step" and kind != "lstm":
        pytest.skip("split only matters for the LSTM")
    layer, hw_kwargs = make(kind, "float64")
    weight = rng.normal(size=(B, H))
    loss = lambda lyr: (lambda x: ops.sum(lyr(x) * ops.cast(tensor(weight), "float64")))
    x = [tensor(X, "float64")]
    exact = grads(loss(HighwayRNN(layer, iterations=None, **hw_kwargs)), x, [])[0]
    for k in range(T + 1):
        hw = HighwayRNN(layer, iterations=k, split=split, **hw_kwargs)
        dx = grads(loss(hw), x, [])[0]
        first_exact = max(T - 1 - k, 0)
        assert rel(dx[:, first_exact:], exact[:, first_exact:]) <= 1e-10, (kind, k)
        # A user cell's output upstream enters through one exact step VJP (user_cell.py),
        # which makes one more step exact than the theorem promises.
        inexact_below = first_exact - (1 if kind.startswith("user") else 0)
        if inexact_below > 0:
            assert rel(dx[:, :inexact_below], exact[:, :inexact_below]) > 1e-8, (kind, k)


@pytest.mark.parametrize("kind", ["lstm", "gru", "user2"])
def test_truncated_modes_with_mask_and_gamma_reach_exact(kind):
    """With a mask, gamma and tol: T iterations (or a tiny tol) give the exact gradient,
    and a middle setting lies strictly between k=0 and exact."""
    layer, hw_kwargs = make(kind, "float64", return_sequences=True)
    weight = rng.normal(size=(B, T, H))
    m = tensor(MASK, "bool")
    loss = lambda lyr: (lambda x: ops.sum(lyr(x, mask=m) * ops.cast(tensor(weight), "float64")))
    x = [tensor(X, "float64")]
    variables = layer.trainable_variables
    exact = grads(loss(HighwayRNN(layer, iterations=None, **hw_kwargs)), x, variables)
    for options in [dict(iterations=T), dict(iterations=T, gamma=0.5), dict(iterations=None, tol=1e-14), dict(iterations=T, gamma=1.0)]:
        got = grads(loss(HighwayRNN(layer, **options, **hw_kwargs)), x, variables)
        for g, r in zip(got, exact):
            assert rel(g, r) <= 1e-10, options
    err0 = rel(grads(loss(HighwayRNN(layer, iterations=0, **hw_kwargs)), x, variables)[0], exact[0])
    err2 = rel(grads(loss(HighwayRNN(layer, iterations=2, **hw_kwargs)), x, variables)[0], exact[0])
    assert 0 < err2 < err0


def test_diagnostics_report_iterations_and_cosine():
    layer, _ = make("lstm", "float64", return_sequences=True)
    hw = HighwayRNN(layer, iterations=4, diagnostics="debug")
    weight = tensor(rng.normal(size=(B, T, H)), "float64")
    grads(lambda x: ops.sum(hw(x) * weight), [tensor(X, "float64")], [])
    diag = hw.last_diagnostics
    assert diag.iterations == 4 and len(diag.update_norms) == 4
    assert all(b < a for a, b in zip(diag.update_norms, diag.update_norms[1:]))
    assert 0.9 < diag.cosine <= 1.0 + 1e-12
    hw.iterations, hw.tol = T, 1e-3
    grads(lambda x: ops.sum(hw(x) * weight), [tensor(X, "float64")], [])
    assert hw.last_diagnostics.iterations < T
    assert hw.last_diagnostics.update_norms[-1] <= 1e-3 < hw.last_diagnostics.update_norms[-2]
