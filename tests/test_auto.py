"""Divergence detection and ``iterations="auto"`` (issue 16).

The divergent case is a GRU whose recurrent weights are scaled up (x6 of the default
initialisation: the block part of each step is large against the update gate's residual);
the contractive case is the default initialisation. References are autograd BPTT through
``nn.GRU``/``nn.LSTM`` or through the cell's Python loop, never the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hwbptt
from hwbptt import AutoController, HighwayDivergenceWarning, highway_adjoint
from hwbptt.torch import HighwayGRU, HighwayLSTM, HighwayRNN

T, B, I, H = 48, 4, 8, 32
DIVERGENT = 6.0


def cheap_highway(probe):
    """Injected timings: ``k`` iterations cost ``1 + k``, exact 100 (a parallel device)."""
    return {k: 1.0 + k for k in probe["cosines"]}, 100.0


def make(cls, scale=1.0, seed=0, **options):
    torch.manual_seed(seed)
    m = cls(I, H, **options)
    with torch.no_grad():
        m.weight_hh_l0.mul_(scale)
    return m


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, I, generator=g), torch.randn(T, B, H, generator=g)


def grads(m, x, target):
    m.zero_grad()
    y, _ = m(x)
    (y * target).sum().backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def bptt_grads(m, x, target):
    ref = (nn.LSTM if isinstance(m, nn.LSTM) else nn.GRU)(I, H, num_layers=m.num_layers)
    ref.load_state_dict(m.state_dict())
    return grads(ref, x, target)


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


# ----------------------------------------------------------------------------- the engine


class NumpyOps:
    @staticmethod
    def reverse_scan(a, b):
        u = np.zeros_like(b)
        acc = np.zeros_like(b[0])
        for t in range(len(b) - 1, -1, -1):
            acc = b[t] + a[t] * acc
            u[t] = acc
        return u

    @staticmethod
    def shift_next(u):
        return np.concatenate([u[1:], np.zeros_like(u[:1])])

    @staticmethod
    def norm(x):
        return float(np.linalg.norm(x))


def _linear_problem(gain, steps=40, n=6, seed=0):
    """``w_t = ℓ_t + w_{t+1} (J + K)``, ``K = 0.5 I``, ``J = gain · M`` (M orthogonal)."""
    rng = np.random.default_rng(seed)
    M, _ = np.linalg.qr(rng.standard_normal((n, n)))
    J = gain * M
    a = np.full((steps, n), 0.5)
    a[-1] = 0.0  # the engine's a_t = K_{t+1}, zero after the last step
    local = rng.standard_normal((steps, n))

    def block(u):
        return NumpyOps.shift_next(u @ J.T)

    exact = np.zeros_like(local)
    acc = np.zeros(n)
    for t in range(steps - 1, -1, -1):
        acc = local[t] + (acc @ J.T + 0.5 * acc if t < steps - 1 else 0.0)
        exact[t] = acc
    return a, local, block, exact


def test_engine_flags_growth_and_keeps_the_best_iterate():
    a, local, block, _ = _linear_problem(gain=1.5)  # ρ = 1.5 / (1 - 0.5) = 3: the path sum diverges
    u5, d5 = highway_adjoint(a, local, block, iterations=5, ops=NumpyOps)
    assert d5.diverged and d5.growth > 1.0 and d5.iterations == 5
    # the iterate kept is the one the engine would have returned had it stopped there
    u_used, d_used = highway_adjoint(a, local, block, iterations=d5.used, ops=NumpyOps)
    assert not d_used.diverged
    np.testing.assert_array_equal(u5, u_used)


def test_engine_contractive_no_flag_and_exact_at_T():
    a, local, block, exact = _linear_problem(gain=0.2)  # ρ = 0.4
    u, d = highway_adjoint(a, local, block, iterations=40, ops=NumpyOps)
    assert not d.diverged and d.used == 40 and d.growth < 1.0
    np.testing.assert_allclose(u, exact, rtol=1e-10, atol=1e-10)


def test_engine_tol_also_stops_on_divergence():
    a, local, block, _ = _linear_problem(gain=1.5)
    _, d = highway_adjoint(a, local, block, iterations=30, ops=NumpyOps, tol=1e-12)
    assert d.diverged and d.iterations < 30


@pytest.mark.parametrize("c, k", [(0.9, 1), (0.9, 3), (0.5, 1), (0.5, 3), (0.2, 10)])
def test_engine_remainder_is_the_rest_of_a_geometric_series(c, k):
    """No residual, block ``u -> c u``: ``u^k = ℓ Σ_{j<=k} c^j``, every update ``c`` times the
    last, exact ``ℓ / (1 - c)``. The remainder estimate is then exact:
    ``||u* - u^k|| / ||u^k|| = c^{k+1} / (1 - c^{k+1})``."""
    local = np.random.default_rng(0).standard_normal((12, 5))
    u, d = highway_adjoint(np.zeros_like(local), local, lambda v: c * v, iterations=k, ops=NumpyOps)
    expected = c ** (k + 1) / (1 - c ** (k + 1))
    true_rest = np.linalg.norm(local / (1 - c) - u) / np.linalg.norm(u)
    assert d.rate == pytest.approx(c, rel=1e-9)
    assert d.remainder == pytest.approx(expected, rel=1e-9) and true_rest == pytest.approx(expected, rel=1e-9)
    assert d.unconverged == (expected > 1.0) and not d.diverged


def test_engine_slow_linear_problem_is_unconverged_and_more_iterations_fix_it():
    a, local, block, exact = _linear_problem(gain=0.48)  # ρ = 0.48 / (1 - 0.5) = 0.96
    u1, d1 = highway_adjoint(a, local, block, iterations=1, ops=NumpyOps)
    assert d1.unconverged and not d1.diverged and d1.remainder > 1.0
    assert np.linalg.norm(u1 - exact) > 0.5 * np.linalg.norm(u1)  # and the estimate really is far off
    u40, d40 = highway_adjoint(a, local, block, iterations=40, ops=NumpyOps)  # T iterations: exact
    assert not d40.unconverged and d40.remainder < 0.1
    np.testing.assert_allclose(u40, exact, rtol=1e-10, atol=1e-10)


class TracedNumpyOps(NumpyOps):
    """The engine's symbolic-array contract on NumPy: norms are 0-d arrays, no Python branch
    reads a value (``traced``), selects by ``where``."""

    traced = True

    @staticmethod
    def norm(x):
        return np.asarray(np.linalg.norm(x))

    @staticmethod
    def where(cond, x, y):
        return np.where(cond, x, y)


@pytest.mark.parametrize("gain, k, tol", [(0.48, 1, None), (0.48, 3, None), (0.2, 3, None), (0.48, 40, None),
                                          (0.2, 30, 1e-3), (1.5, 5, None)])
def test_traced_loop_reports_what_the_eager_loop_does(gain, k, tol):
    a, local, block, _ = _linear_problem(gain=gain)
    u, d = highway_adjoint(a, local, block, iterations=k, ops=NumpyOps, tol=tol)
    ut, dt = highway_adjoint(a, local, block, iterations=k, ops=TracedNumpyOps, tol=tol)
    np.testing.assert_allclose(ut, u, rtol=1e-12, atol=1e-12)
    assert bool(dt.diverged) == d.diverged and bool(dt.unconverged) == d.unconverged and int(dt.used) == d.used
    if not d.diverged:
        assert float(dt.rate) == pytest.approx(d.rate, rel=1e-9, abs=1e-12)
        assert float(dt.remainder) == pytest.approx(d.remainder, rel=1e-9, abs=1e-12)


def test_engine_k0_and_fpi_report_no_remainder():
    a, local, block, _ = _linear_problem(gain=0.48)
    _, d0 = highway_adjoint(a, local, block, iterations=0, ops=NumpyOps)
    _, fpi = highway_adjoint(a, local, block, iterations=3, ops=NumpyOps, gamma=1.0)
    assert d0.remainder is None and not d0.unconverged
    assert fpi.remainder is None and not fpi.unconverged


# ----------------------------------------------------------------------------- the controller


def _probe(cos, secs, exact_s):
    return {"cosines": dict(cos), "seconds": dict(secs), "exact_seconds": exact_s}


def test_controller_choice_rules():
    ctl = AutoController(fidelity=0.99, noise=0.1)
    # the smallest faithful k, when it is faster than exact
    e = ctl.decide({(0, 0): _probe({0: 0.9, 1: 0.995, 2: 0.999}, {0: 1, 1: 2, 2: 3}, 10.0)})
    assert e["choice"] == 1
    # the minimum over directions decides faithfulness
    e = ctl.decide({(0, 0): _probe({0: 0.9, 1: 0.995}, {0: 1, 1: 2}, 10.0), (0, 1): _probe({0: 0.9, 1: 0.98}, {0: 1, 1: 2}, 10.0)})
    assert e["choice"] is None and "no k" in e["reason"]
    # exact when it is faster by more than the noise band
    e = ctl.decide({0: _probe({0: 0.999}, {0: 5.0}, 1.0)})
    assert e["choice"] is None
    # within the noise band the previous choice stands (here: exact), else the Highway k
    e = ctl.decide({0: _probe({0: 0.999}, {0: 1.0}, 0.97)})
    assert e["choice"] is None and "kept" in e["reason"]
    fresh = AutoController(fidelity=0.99, noise=0.1)
    assert fresh.decide({0: _probe({0: 0.999}, {0: 1.0}, 0.97)})["choice"] == 0


def test_costlier_than_exact_is_the_rule_decide_applies():
    from hwbptt.auto import NOISE, costlier_than_exact

    assert costlier_than_exact(2.0, 1.0) and not costlier_than_exact(1.0, 1.0)
    assert not costlier_than_exact(1.0 / (1 - NOISE) * 0.999, 1.0) and costlier_than_exact(1.0 / (1 - NOISE) * 1.001, 1.0)
    # the pass's stop and the decision agree: a k that stops the pass loses to exact
    ctl = AutoController(noise=NOISE)
    assert ctl.decide({0: _probe({0: 0.999}, {0: 1.12}, 1.0)})["choice"] is None


def test_controller_probe_stops_on_cost_only_on_measured_times():
    from hwbptt import HighwayOptions

    opts = HighwayOptions(iterations="auto")
    assert AutoController().plan(opts, steps=8).probe_stops_on_cost
    modelled = AutoController(timing=cheap_highway)
    assert not modelled.plan(opts, steps=8).probe_stops_on_cost  # the model's times, not this machine's
    assert not AutoController(noise=0.3).plan(opts, steps=8).probe_stops_on_cost  # a wider band than the stop's
    assert AutoController(noise=0.05).plan(opts, steps=8).probe_stops_on_cost


def _fake_pass(per_iteration_s, cosines):
    """``iterate(observe)`` of a fake engine: sleeps per iteration, returns the iterations run."""
    import time

    ran = []

    def iterate(observe):
        for k, c in enumerate(cosines):
            time.sleep(per_iteration_s)
            ran.append(k)
            if observe(k, lambda c=c: torch.tensor([c, (1 - c * c) ** 0.5], dtype=torch.float64), True):
                break
    return iterate, ran


@pytest.mark.parametrize("stops_on_cost", [True, False])
def test_probe_pass_stops_once_iterations_cost_more_than_exact(stops_on_cost):
    from hwbptt import HighwayOptions
    from hwbptt.torch.auto import probe_adjoint

    ref = torch.tensor([1.0, 0.0], dtype=torch.float64)
    iterate, ran = _fake_pass(0.02, [0.1, 0.2, 0.3, 0.4, 0.5])  # never faithful, each iteration >> exact
    opts = HighwayOptions(iterations=4, probe=(0, 1, 2, 3, 4), probe_stops_on_cost=stops_on_cost)
    got, probe = probe_adjoint(lambda: ref, iterate, lambda w: w, opts, ref)
    assert got is ref
    if stops_on_cost:
        assert ran == [0] and probe["stopped"] == "cost" and set(probe["cosines"]) == {0}
    else:
        assert ran == [0, 1, 2, 3, 4] and probe["stopped"] is None and set(probe["cosines"]) == {0, 1, 2, 3, 4}
    assert probe["cosines"][0] == pytest.approx(0.1)


def test_probe_pass_stops_at_a_faithful_rung_before_its_cost_does():
    import time

    from hwbptt import HighwayOptions
    from hwbptt.torch.auto import probe_adjoint

    ref = torch.tensor([1.0, 0.0], dtype=torch.float64)
    iterate, ran = _fake_pass(0.0, [0.5, 0.9, 0.995, 0.999])
    opts = HighwayOptions(iterations=3, probe=(0, 1, 2, 3))
    _, probe = probe_adjoint(lambda: (time.sleep(0.05), ref)[1], iterate, lambda w: w, opts, ref)
    assert ran == [0, 1, 2] and probe["stopped"] == "faithful" and set(probe["cosines"]) == {0, 1, 2}


def test_probe_says_which_exact_path_its_exact_time_stands_for(monkeypatch):
    """An LSTM wider than ``EXACT_LSTM_MAX_H``, where exact mode runs oneDNN's LSTM
    (``dispatch.plan``): the probe reports ``exact_path="parent"`` (its exact time is this
    project's adjoint standing in); up to that width, and for the GRU, exact mode is the
    tape's own adjoint."""
    from hwbptt.torch import dispatch

    x, target = data()
    monkeypatch.setattr(dispatch, "EXACT_LSTM_MAX_H", H - 1)  # this width is above the bar
    paths = {}
    for name, cls in (("lstm", HighwayLSTM), ("gru", HighwayGRU)):
        m = make(cls, iterations="auto", probe_every=100)
        grads(m, x, target)
        paths[name] = m.last_diagnostics[(0, 0)].probe["exact_path"]
    monkeypatch.setattr(dispatch, "EXACT_LSTM_MAX_H", H)  # this width is within the bar: the tape's adjoint
    m = make(HighwayLSTM, iterations="auto", probe_every=100)
    grads(m, x, target)
    assert paths == {"lstm": "parent", "gru": "tape"} and m.last_diagnostics[(0, 0)].probe["exact_path"] == "tape"


def test_decide_says_when_the_pass_stopped_on_cost():
    ctl = AutoController()
    e = ctl.decide({0: dict(_probe({0: 0.3, 1: 0.4}, {0: 1.0, 1: 2.0}, 1.5), stopped="cost")})
    assert e["choice"] is None and "cost more than exact" in e["reason"]


def test_decide_carries_a_direction_that_stopped_faithful_to_the_larger_k_another_needs():
    """Layer 1 stopped at its faithful k=1; layer 0 needs k=2. k=2 is faithful for both,
    layer 1's time there extrapolated from its last two rungs (1 s per iteration)."""
    ctl = AutoController(fidelity=0.99)
    first = dict(_probe({0: 0.98, 1: 0.999}, {0: 1.0, 1: 2.0}, 50.0), stopped="faithful")
    second = dict(_probe({0: 0.9, 1: 0.97, 2: 0.995}, {0: 1.0, 1: 2.0, 2: 3.0}, 50.0), stopped="faithful")
    e = ctl.decide({(1, 0): first, (0, 0): second})
    assert e["choice"] == 2 and e["seconds"][2] == pytest.approx(3.0 + 3.0) and e["cosines"][2] == pytest.approx(0.995)
    # a direction that stopped for another reason is not carried: k=2 was never measured there
    stopped_on_cost = dict(first, stopped="cost")
    e = AutoController(fidelity=0.99).decide({(1, 0): stopped_on_cost, (0, 0): second})
    assert e["choice"] is None and 2 not in e["cosines"]
    # where the pass's own times are kept beside re-timed ones, the slope is theirs
    retimed = dict(first, seconds={1: 10.0}, pass_seconds={0: 1.0, 1: 1.5})
    e = AutoController(fidelity=0.99).decide({(1, 0): retimed, (0, 0): second})
    assert e["seconds"][2] == pytest.approx(10.5 + 3.0)


def test_probe_pass_measures_two_rungs_before_a_faithful_stop():
    from hwbptt import HighwayOptions
    from hwbptt.torch.auto import probe_adjoint

    ref = torch.tensor([1.0, 0.0], dtype=torch.float64)
    iterate, ran = _fake_pass(0.0, [0.999, 0.9995, 0.9999])
    _, probe = probe_adjoint(lambda: ref, iterate, lambda w: w, HighwayOptions(iterations=2, probe=(0, 1, 2), probe_stops_on_cost=False), ref)
    assert ran == [0, 1] and probe["stopped"] == "faithful" and set(probe["seconds"]) == {0, 1}


def test_two_layers_needing_different_k_choose_the_larger():
    """Recurrent weights x2: layer 0 needs k=2, layer 1 k=1. auto takes k=2 (a cost model
    where Highway is cheap), which is faithful for the whole model against BPTT."""
    m = make(HighwayLSTM, 2.0, seed=3, iterations="auto", probe_every=100, num_layers=2)
    m.highway_auto.timing = cheap_highway
    x, target = data(seed=0)
    grads(m, x, target)
    needed = {key: min(k for k, c in d.probe["cosines"].items() if c >= 0.99) for key, d in m.last_diagnostics.items()}
    assert len(set(needed.values())) == 2  # the layers differ
    choice = m.highway_auto.history[0]["choice"]
    assert choice == max(needed.values())
    fixed = make(HighwayLSTM, 2.0, seed=3, iterations=choice, num_layers=2)
    assert cosine(grads(fixed, x, target), bptt_grads(fixed, x, target)) >= 0.99


def test_controller_probe_schedule():
    from hwbptt import HighwayOptions

    ctl = AutoController()
    opts = HighwayOptions(iterations="auto", probe_every=3)
    plans = []
    for step in range(7):
        p = ctl.plan(opts, steps=8)
        plans.append(p.probe)
        if p.probe is not None:
            ctl.report(0, hwbptt.Diagnostics(probe=_probe({0: 0.5, 1: 0.995}, {0: 1, 1: 2}, 50.0)))
    assert [p is not None for p in plans] == [True, False, False, True, False, False, True]
    assert plans[0] == (0, 1, 2, 3, 5)  # rungs below T = 8
    assert ctl.choice == 1 and [e["step"] for e in ctl.history] == [0, 3, 6]


@pytest.mark.parametrize("event", ["diverged", "unconverged"])
def test_controller_probes_again_after_a_bad_backward(event):
    from hwbptt import HighwayOptions

    ctl = AutoController()
    opts = HighwayOptions(iterations="auto", probe_every=100)
    assert ctl.plan(opts, steps=8).probe is not None
    ctl.report(0, hwbptt.Diagnostics(probe=_probe({0: 0.5, 1: 0.995}, {0: 1, 1: 2}, 50.0)))
    assert ctl.plan(opts, steps=8).iterations == 1  # the choice, no probe
    bad = hwbptt.Diagnostics(iterations=1, used=1, diverged=event == "diverged", growth=2.0,
                             unconverged=event == "unconverged", rate=0.9, remainder=3.0)
    ctl.report(0, bad)
    assert ctl.plan(opts, steps=8).probe is not None  # the regime changed: probe at the next step
    events = [e for e in ctl.history if "event" in e]
    assert [e["event"] for e in events] == [event] and events[0]["step"] == 1
    assert events[0].get("growth" if event == "diverged" else "remainder") in (2.0, 3.0)


# ----------------------------------------------------------------------------- torch layers


def test_divergent_gru_fixed_k_warns_once_and_keeps_best():
    m = make(HighwayGRU, DIVERGENT, iterations=3)
    x, target = data()
    with pytest.warns(HighwayDivergenceWarning, match="iterations='auto'") as caught:
        grads(m, x, target)
    assert len([w for w in caught if issubclass(w.category, HighwayDivergenceWarning)]) == 1
    d = m.last_diagnostics[(0, 0)]
    assert d.diverged and d.growth > 1.0 and d.used < 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighwayDivergenceWarning)
        g3 = grads(m, x, target)  # once per layer: no second warning
    m.iterations = d.used
    np.testing.assert_allclose(grads(m, x, target), g3, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [HighwayGRU, HighwayLSTM])
def test_slowly_converging_fixed_k_warns_once(cls):
    """Recurrent weights x4: the updates still shrink (no divergence) but only by about 0.75
    per iteration, so at k = 1 the estimated rest outweighs the estimate; the warning says
    so, and the gradient really is far from BPTT's."""
    m = make(cls, 4.0, iterations=1)
    x, target = data()
    with pytest.warns(HighwayDivergenceWarning, match="shrank by only") as caught:
        g = grads(m, x, target)
    assert len([w for w in caught if issubclass(w.category, HighwayDivergenceWarning)]) == 1
    d = m.last_diagnostics[(0, 0)]
    assert d.unconverged and not d.diverged and d.remainder > 1.0 and 0.5 < d.rate < 1.0
    assert cosine(g, bptt_grads(m, x, target)) < 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighwayDivergenceWarning)
        grads(m, x, target)  # once per layer


def test_divergent_lstm_gates_split_keeps_the_matching_hidden_adjoint():
    # the "gates" block carries wh between iterations: the kept estimate must bring its own wh
    m = make(HighwayLSTM, 8.0, iterations=6)
    x, target = data()
    with pytest.warns(HighwayDivergenceWarning):
        g6 = grads(m, x, target)
    used = m.last_diagnostics[(0, 0)].used
    assert used < 6
    m.iterations = used
    np.testing.assert_allclose(grads(m, x, target), g6, rtol=1e-5, atol=1e-6)


def test_tol_stops_on_divergence_torch():
    m = make(HighwayGRU, DIVERGENT, iterations=20, tol=1e-9)
    x, target = data()
    with pytest.warns(HighwayDivergenceWarning):
        grads(m, x, target)
    d = m.last_diagnostics[(0, 0)]
    assert d.diverged and d.iterations < 20


@pytest.mark.parametrize("cls", [HighwayGRU, HighwayLSTM])
def test_contractive_no_warning_and_auto_picks_k_below_T(cls):
    x, target = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighwayDivergenceWarning)
        for k in (1, 3):  # k = 1 too: its estimate is near BPTT's here (remainder ~0.05)
            fixed = make(cls, iterations=k)
            grads(fixed, x, target)
            assert fixed.last_diagnostics[(0, 0)].remainder < 0.2
        m = make(cls, iterations="auto", probe_every=4)
        m.highway_auto.timing = cheap_highway
        for _ in range(3):
            g = grads(m, x, target)
    choice = m.highway_auto.choice
    assert isinstance(choice, int) and choice < T
    assert cosine(g, bptt_grads(m, x, target)) >= 0.99
    entry = m.highway_auto.history[0]
    assert entry["cosines"][choice] >= 0.99 and all(c < 0.99 for k, c in entry["cosines"].items() if k < choice)


def test_divergent_gru_auto_meets_fidelity_against_bptt():
    m = make(HighwayGRU, DIVERGENT, iterations="auto", probe_every=3)
    m.highway_auto.timing = cheap_highway  # even where Highway is cheaper, no k is faithful
    x, target = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighwayDivergenceWarning)  # auto handles it: no warning
        for step in range(4):
            x, target = data(seed=10 + step)
            assert cosine(grads(m, x, target), bptt_grads(m, x, target)) >= 0.99
    assert m.highway_auto.choice is None
    assert all(e["choice"] is None for e in m.highway_auto.history if "choice" in e)


def test_auto_choice_follows_a_regime_change():
    m = make(HighwayGRU, iterations="auto", probe_every=2)
    m.highway_auto.timing = cheap_highway
    x, target = data()
    for _ in range(2):
        grads(m, x, target)
    before = m.highway_auto.choice
    with torch.no_grad():
        m.weight_hh_l0.mul_(DIVERGENT)  # between probes: the next probe sees the new regime
    for _ in range(2):
        g = grads(m, x, target)
    after = m.highway_auto.choice
    assert isinstance(before, int) and after != before
    assert cosine(g, bptt_grads(m, x, target)) >= 0.99


def test_auto_is_deterministic_for_given_seeds():
    def history():
        m = make(HighwayLSTM, 2.0, seed=3, iterations="auto", probe_every=2, num_layers=2)
        m.highway_auto.timing = cheap_highway
        for step in range(5):
            grads(m, *data(seed=step))
        return [(e["step"], e["choice"], e["cosines"]) for e in m.highway_auto.history]

    first, second = history(), history()
    assert first == second and len(first) == 3


def test_auto_on_a_cell():
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(5))
    for scale, faithful_k in ((1.0, True), (DIVERGENT, False)):
        torch.manual_seed(0)
        cell = nn.GRUCell(I, H)
        with torch.no_grad():
            cell.weight_hh.mul_(scale)
        m = HighwayRNN(cell, iterations="auto", probe_every=2)
        m.highway_auto.timing = cheap_highway
        for _ in range(3):
            cell.zero_grad()
            y, _ = m(x)
            y.pow(2).sum().backward()
        g = torch.cat([p.grad.flatten() for p in cell.parameters()])
        cell.zero_grad()
        m.iterations = None  # autograd through the Python loop: BPTT
        y, _ = m(x)
        y.pow(2).sum().backward()
        ref = torch.cat([p.grad.flatten() for p in cell.parameters()])
        assert cosine(g, ref) >= 0.99
        assert isinstance(m.highway_auto.choice, int) == faithful_k


def test_cell_fixed_k_divergence_warns():
    torch.manual_seed(0)
    cell = nn.GRUCell(I, H)
    with torch.no_grad():
        cell.weight_hh.mul_(DIVERGENT)
    m = HighwayRNN(cell, iterations=4)
    with pytest.warns(HighwayDivergenceWarning, match="HighwayRNN"):
        y, _ = m(torch.randn(T, B, I))
        y.pow(2).sum().backward()


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(iterations="fast"), TypeError, "'fast'"),
        (dict(iterations="auto", fidelity=0.0), ValueError, "fidelity=0.0"),
        (dict(iterations="auto", fidelity=1.5), ValueError, "fidelity=1.5"),
        (dict(fidelity="high"), TypeError, "fidelity='high'"),
        (dict(probe_every=0), ValueError, "probe_every=0"),
        (dict(probe_every=2.5), TypeError, "probe_every=2.5"),
        (dict(probe_every=True), TypeError, "probe_every=True"),
    ],
)
@pytest.mark.parametrize("build", ["lstm", "gru", "cell"])
def test_auto_options_validated(kwargs, error, needle, build):
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(".", r"\.")):
        if build == "lstm":
            HighwayLSTM(I, H, **kwargs)
        elif build == "gru":
            HighwayGRU(I, H, **kwargs)
        else:
            HighwayRNN(nn.GRUCell(I, H), **kwargs)
    m = HighwayGRU(I, H)
    name, value = next(iter(kwargs.items())) if len(kwargs) == 1 else list(kwargs.items())[1]
    with pytest.raises(error, match=name):
        setattr(m, name, value)


def test_auto_repr_and_core_stays_framework_free():
    m = HighwayLSTM(I, H, iterations="auto", fidelity=0.95, probe_every=7)
    assert "iterations='auto'" in repr(m) and "fidelity=0.95" in repr(m) and "probe_every=7" in repr(m)
    import subprocess
    import sys

    code = "import hwbptt, hwbptt.auto, sys; assert 'torch' not in sys.modules and 'keras' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
