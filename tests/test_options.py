"""Option validation, attributes, the engine's contract and the iteration schedule."""

import pytest
import torch

from hwbptt import HighwayOptions, IterationSchedule, highway_adjoint
from hwbptt.torch.scan import TORCH_OPS
from hwbptt.torch import HighwayGRU, HighwayLSTM


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(iterations=-1), ValueError, "iterations=-1"),
        (dict(iterations=2.5), TypeError, "2.5"),
        (dict(iterations="3"), TypeError, "'3'"),
        (dict(iterations=True), TypeError, "True"),
        (dict(tol=0.0), ValueError, "tol=0.0"),
        (dict(tol=-1e-3), ValueError, "tol=-0.001"),
        (dict(tol=float("nan")), ValueError, "tol=nan"),
        (dict(gamma=1.5), ValueError, "gamma=1.5"),
        (dict(gamma=-0.1), ValueError, "gamma=-0.1"),
        (dict(split="cell"), ValueError, "split='cell'"),
        (dict(diagnostics="yes"), ValueError, "diagnostics='yes'"),
    ],
)
@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
def test_bad_options_raise_at_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(3, 4, **kwargs)
    with pytest.raises(error, match=match):
        HighwayOptions(**kwargs)


def test_options_are_validated_attributes():
    m = HighwayLSTM(3, 4, iterations=2)
    m.iterations = 5
    m.tol = 1e-3
    m.gamma = 0.25
    assert m.highway_options == HighwayOptions(iterations=5, tol=1e-3, gamma=0.25)
    with pytest.raises(ValueError, match="iterations=-2"):
        m.iterations = -2
    assert m.iterations == 5  # a rejected value leaves the old one
    m.iterations = None
    assert m.highway_options.iterations is None


def test_options_do_not_enter_state_dict():
    m = HighwayGRU(3, 4, iterations=7)
    ref = torch.nn.GRU(3, 4)
    assert list(m.state_dict()) == list(ref.state_dict())


def test_schedule_ramps_iterations():
    model = torch.nn.Sequential(HighwayLSTM(3, 4), HighwayGRU(4, 4))
    schedule = IterationSchedule(model, start=1, end=5, steps=4)
    seen = [model[0].iterations]
    for _ in range(6):
        schedule.step()
        seen.append(model[1].iterations)
    assert seen == [1, 2, 3, 4, 5, 5, 5]
    state = schedule.state_dict()
    other = IterationSchedule(model, start=1, end=5, steps=4)
    other.load_state_dict(state)
    assert model[0].iterations == 5


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="no Highway layer"):
        IterationSchedule(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="steps=0"):
        IterationSchedule(HighwayLSTM(2, 2), steps=0)


def _problem(T=40, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(T, D, generator=g, dtype=torch.float64)
    M = torch.randn(T, D, D, generator=g, dtype=torch.float64) * 0.3
    local = torch.randn(T, D, generator=g, dtype=torch.float64)

    def block(u):  # v_t = u_{t+1} M_{t+1}
        return TORCH_OPS.shift_next(torch.einsum("td,tde->te", u, M))

    exact = torch.zeros(T, D, dtype=torch.float64)
    nxt = torch.zeros(D, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            nxt = exact[t + 1] @ M[t + 1] + a[t] * exact[t + 1]
        exact[t] = local[t] + (nxt if t < T - 1 else 0)
    return a, local, block, exact


def test_engine_last_k_plus_one_exact_and_exact_at_T():
    a, local, block, exact = _problem()
    T = local.shape[0]
    for k in (0, 1, 4, 11):
        u, diag = highway_adjoint(a, local, block, iterations=k, ops=TORCH_OPS)
        assert diag.iterations == k
        torch.testing.assert_close(u[T - 1 - k :], exact[T - 1 - k :], rtol=1e-12, atol=1e-12)
        assert (u[T - 2 - k] - exact[T - 2 - k]).abs().max() > 1e-9
    u, _ = highway_adjoint(a, local, block, iterations=T, ops=TORCH_OPS)
    torch.testing.assert_close(u, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_engine_gamma_keeps_the_fixed_point(gamma):
    a, local, block, exact = _problem(T=20)
    u, _ = highway_adjoint(a, local, block, iterations=20, ops=TORCH_OPS, gamma=gamma)
    torch.testing.assert_close(u, exact, rtol=1e-10, atol=1e-10)


def test_engine_tol_stops_early_and_records():
    a, local, block, exact = _problem(T=60)
    u, diag = highway_adjoint(a, local, block, iterations=60, ops=TORCH_OPS, tol=1e-6)
    assert 0 < diag.iterations < 60
    assert diag.update_norms[-1] <= 1e-6 < diag.update_norms[0]
    assert ((u - exact).norm() / exact.norm()).item() < 1e-4
