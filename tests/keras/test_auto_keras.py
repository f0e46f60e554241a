"""``iterations="auto"`` and the divergence warning on the Keras wrapper: eager execution
(both backends), and model.fit's traced ``tf.function`` on TensorFlow."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from hwbptt import HighwayDivergenceWarning  # noqa: E402
from hwbptt.keras import HighwayRNN  # noqa: E402

T, B, I, H = 32, 4, 6, 16


def _model(scale, iterations, seed=0, **options):
    keras.utils.set_random_seed(seed)
    inner = keras.layers.GRU(H, return_sequences=True)
    layer = HighwayRNN(inner, iterations=iterations, **options)
    inp = keras.Input((T, I))
    model = keras.Model(inp, layer(inp))
    kernel = inner.cell.recurrent_kernel
    kernel.assign(kernel.numpy() * scale)
    return model, layer, inner


def _grad(model, x, y):
    """The gradient of sum(output * y) by the backend's autodiff, in eager mode."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.sum(model(x, training=True) * y)
        grads = tape.gradient(loss, model.trainable_variables)
        return np.concatenate([np.ravel(g.numpy()) for g in grads])
    if backend == "torch":
        import torch

        for v in model.trainable_variables:
            v.value.grad = None
        loss = keras.ops.sum(model(x, training=True) * keras.ops.convert_to_tensor(y))
        loss.backward()
        return np.concatenate([v.value.grad.cpu().numpy().ravel() for v in model.trainable_variables])
    pytest.skip(f"no eager gradient helper for {backend}")


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _data(seed=1, steps=T):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, steps, I)).astype("float32"), rng.standard_normal((B, steps, H)).astype("float32")


def test_keras_fixed_k_divergence_warns_once():
    """On the keras.ops path (the TensorFlow route for LSTM/GRU runs its adjoint compiled
    and reports no diagnostics yet, so it is switched off here)."""
    from hwbptt.keras import tf_kernels

    model, layer, _ = _model(6.0, 3)
    x, y = _data()
    with tf_kernels.use(False):
        with pytest.warns(HighwayDivergenceWarning, match="iterations='auto'"):
            _grad(model, x, y)
        assert layer.last_diagnostics.diverged
        with warnings.catch_warnings():
            warnings.simplefilter("error", HighwayDivergenceWarning)
            _grad(model, x, y)


def test_keras_slow_convergence_warns():
    """Recurrent kernel x4: the updates shrink too slowly for k = 1 (keras.ops path)."""
    from hwbptt.keras import tf_kernels

    model, layer, _ = _model(4.0, 1)
    exact_model, _, _ = _model(4.0, None)
    x, y = _data()
    with tf_kernels.use(False):
        with pytest.warns(HighwayDivergenceWarning, match="shrank by only"):
            g = _grad(model, x, y)
    d = layer.last_diagnostics
    assert d.unconverged and not d.diverged and d.remainder > 1.0
    assert _cos(g, _grad(exact_model, x, y)) < 0.95


@pytest.mark.parametrize("scale, faithful_k", [(1.0, True), (6.0, False)])
def test_keras_auto_meets_fidelity(scale, faithful_k):
    model, layer, _ = _model(scale, "auto", probe_every=2)
    exact_model, _, _ = _model(scale, None)
    x, y = _data()
    cheap = lambda probe: ({k: 1.0 + k for k in probe["cosines"]}, 100.0)  # noqa: E731
    layer.highway_auto.timing = cheap
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighwayDivergenceWarning)
        for _ in range(4):
            g = _grad(model, x, y)
    assert _cos(g, _grad(exact_model, x, y)) >= 0.99
    assert isinstance(layer.highway_auto.choice, int) == faithful_k
    assert [e["step"] for e in layer.highway_auto.history] == [0, 2]


def test_keras_auto_fit_run_eagerly():
    """model.fit in eager execution (the torch backend runs eagerly anyway)."""
    model, layer, _ = _model(1.0, "auto", probe_every=2)
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    x, y = _data()
    model.fit(x, y, epochs=1, batch_size=B, verbose=0)
    assert [e["step"] for e in layer.highway_auto.history] == [0]


def test_keras_auto_options_validated_and_serialised():
    with pytest.raises(ValueError, match="fidelity=2"):
        HighwayRNN(keras.layers.GRU(H), iterations="auto", fidelity=2)
    with pytest.raises(ValueError, match="probe_every=0"):
        HighwayRNN(keras.layers.GRU(H), iterations="auto", probe_every=0)
    layer = HighwayRNN(keras.layers.GRU(H), iterations="auto", fidelity=0.9, probe_every=7)
    again = HighwayRNN.from_config(layer.get_config())
    assert (again.iterations, again.fidelity, again.probe_every) == ("auto", 0.9, 7)


# ------------------------------------------------------------------ traced (TensorFlow graph)

tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow graph (tf.function)")
TG = 10  # a graph holds one branch per mode of the ladder below T (0, 1, 2, 3, 5 and exact here): short to trace


def _cheap(probe):
    """A timing model: each k costs 1 + k, exact 100 (the choice is the smallest faithful k)."""
    return {k: 1.0 + k for k in probe["cosines"]}, 100.0


def _auto_fit_model(kind, scale=1.0, seed=0, **options):
    """``HighwayRNN(kind, iterations="auto")`` compiled with compile()'s defaults (no
    run_eagerly, jit_compile="auto") and SGD(1): a step's gradient is the weight change."""
    keras.utils.set_random_seed(seed)
    inner = getattr(keras.layers, kind)(H, return_sequences=True)
    layer = HighwayRNN(inner, iterations="auto", **options)
    inp = keras.Input((TG, I))
    model = keras.Model(inp, layer(inp))
    kernel = inner.cell.recurrent_kernel
    kernel.assign(kernel.numpy() * scale)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model, layer, inner


def _flat(tensors):
    return np.concatenate([np.ravel(keras.ops.convert_to_numpy(t)) for t in tensors])


def _tape_grad(fn, x, y, variables):
    """The gradient of fit's loss (mse) of ``fn(x)``, eagerly by tf.GradientTape."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, fn(x))
    return _flat(tape.gradient(loss, variables))


def _fit_step(model, x, y):
    """One model.fit step (the traced train function); the gradient it applied."""
    before = _flat(model.trainable_variables)
    model.fit(x, y, epochs=1, batch_size=B, shuffle=False, verbose=0)
    return before - _flat(model.trainable_variables)  # SGD(1): w <- w - g


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@tf_only
@pytest.mark.parametrize("kind, route", [("LSTM", "tf"), ("GRU", "tf"), ("LSTM", "ops")])
def test_fit_auto_probes_on_schedule_and_applies_the_choice(kind, route):
    """Default compile: probes at steps 0 and 2 (probe_every=2, counted per executed step);
    a probe step's gradient is BPTT's; between probes the gradient is the chosen fixed k's
    (k < T, contractive case), on the TensorFlow route and on the keras.ops path."""
    from hwbptt.keras import tf_kernels

    model, layer, inner = _auto_fit_model(kind, probe_every=2)
    layer.highway_auto.timing = _cheap
    x, y = _data(steps=TG)
    variables = inner.trainable_variables
    with tf_kernels.use(route == "tf"):
        for step in range(4):
            exact = _tape_grad(lambda v: inner(v, training=True), x, y, variables)  # BPTT of the plain layer
            choice = layer.highway_auto.history[-1]["choice"] if step % 2 else None  # history settles
            fixed = HighwayRNN(inner, iterations=choice)
            expected = _tape_grad(lambda v: fixed(v, training=True), x, y, variables)
            got = _fit_step(model, x, y)
            assert _rel(got, expected) < 2e-3, (step, choice)
            if step % 2:  # the chosen k is not exact: the two references differ
                assert isinstance(choice, int) and 0 <= choice < TG
                assert _rel(expected, exact) > 1e-2
            else:
                assert _rel(got, exact) < 2e-3
    ctl = layer.highway_auto
    assert model.jit_compile is False
    assert ctl.step == 4
    assert [e["step"] for e in ctl.history] == [0, 2]
    assert all(isinstance(e["choice"], int) and e["choice"] < TG for e in ctl.history)
    assert layer.last_diagnostics.probe is not None  # the probe's report reached the layer


@tf_only
def test_fit_auto_divergent_gru_chooses_exact():
    """Recurrent kernel x6: no k of the ladder is faithful, so exact, whatever the timing;
    the non-probe steps' gradients are the plain GRU's BPTT (tf.GradientTape)."""
    model, layer, inner = _auto_fit_model("GRU", scale=6.0, probe_every=3)
    layer.highway_auto.timing = _cheap
    x, y = _data(steps=TG)
    for step in range(3):
        exact = _tape_grad(lambda v: inner(v, training=True), x, y, inner.trainable_variables)
        got = _fit_step(model, x, y)
        assert _rel(got, exact) < 2e-3, step
    ctl = layer.highway_auto
    assert [(e["step"], e["choice"]) for e in ctl.history] == [(0, None)]
    assert "no k of the ladder" in ctl.history[0]["reason"]


@tf_only
def test_fit_auto_same_seeds_same_choices():
    """Two fresh runs with the same seeds: the same probes, cosines and choices (the
    timing model makes the times deterministic; measured times are not)."""
    def run():
        model, layer, _ = _auto_fit_model("GRU", seed=3, probe_every=2)
        layer.highway_auto.timing = _cheap
        x, y = _data(seed=5, steps=TG)
        model.fit(np.concatenate([x, x, x]), np.concatenate([y, y, y]), epochs=1, batch_size=B, shuffle=False,
                  verbose=0)
        return layer.highway_auto.history

    first, second = run(), run()
    assert [(e["step"], e["choice"]) for e in first] == [(e["step"], e["choice"]) for e in second] == [(0, 1), (2, 1)]
    for a, b in zip(first, second):
        assert a["cosines"].keys() == b["cosines"].keys()
        np.testing.assert_allclose(list(a["cosines"].values()), list(b["cosines"].values()), rtol=1e-6)


@tf_only
def test_fit_auto_counts_executed_steps_in_one_trace():
    """steps_per_execution=2 runs two steps per call of the traced function, one trace in
    all: the controller still plans every executed step; evaluate and predict (exact, no
    backward) plan nothing."""
    model, layer, _ = _auto_fit_model("GRU", probe_every=2)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse", steps_per_execution=2)
    layer.highway_auto.timing = _cheap
    x, y = _data(steps=TG)
    model.fit(np.concatenate([x] * 6), np.concatenate([y] * 6), epochs=1, batch_size=B, shuffle=False, verbose=0)
    model.evaluate(x, y, batch_size=B, verbose=0)
    model.predict(x, batch_size=B, verbose=0)
    ctl = layer.highway_auto
    assert ctl.step == 6
    assert [e["step"] for e in ctl.history] == [0, 2, 4]


@tf_only
def test_auto_and_xla(monkeypatch):
    """compile()'s default resolves to no XLA for a model holding an auto layer, also where
    Keras would pick XLA (a GPU present); an explicit jit_compile=True, or the layer
    training inside tf.function(jit_compile=True), is a ValueError naming the way out. A
    fixed k keeps XLA."""
    import tensorflow as tf
    from keras.src.trainers.trainer import model_supports_jit

    model, layer, _ = _auto_fit_model("GRU")
    assert model_supports_jit(model) is False
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda *a: [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")])
    model.compile(optimizer="sgd", loss="mse")
    assert model.jit_compile is False
    monkeypatch.undo()
    for options in (dict(jit_compile=True), dict(jit_compile=True, run_eagerly=False)):
        with pytest.raises(ValueError, match=r"iterations='auto'.*jit_compile=False.*fixed iterations"):
            model.compile(optimizer="sgd", loss="mse", **options)
    x, y = _data(steps=TG)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    with pytest.raises(ValueError, match=r"iterations='auto'.*XLA cannot compile"):
        step(x)
    assert layer.highway_auto.step == 0
    layer.iterations = 2
    assert model_supports_jit(model) is True
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is True
    model.fit(x, y, epochs=1, batch_size=B, verbose=0)


# ------------------------------------------------ the divergence warning on every route and in graphs


def _fixed_fit_model(kind, scale, k, jit_compile="auto", mask=False):
    keras.utils.set_random_seed(0)
    inner = getattr(keras.layers, kind)(H, return_sequences=True)
    layer = HighwayRNN(inner, iterations=k)
    inp = keras.Input((T, I))
    out = layer(keras.layers.Masking()(inp) if mask else inp)
    model = keras.Model(inp, out)
    kernel = inner.cell.recurrent_kernel
    kernel.assign(kernel.numpy() * scale)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=jit_compile)
    return model, layer


@tf_only
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_tensorflow_route_detects_slow_convergence_and_divergence_eagerly(kind):
    """The compiled TensorFlow route (on by default for LSTM/GRU) reports what the engine
    measured: x4 at k=1 is unconverged, x6 at k=3 diverged, and it keeps the best iterate:
    its gradient is the keras.ops path's at ``k = used``. (The LSTM route measures the
    updates of the cell-state adjoint, as the torch layers' "gates" split does; the keras.ops
    path measures both halves, so the two may keep different iterates.)"""
    from hwbptt.keras import tf_kernels

    x, y = _data()
    for scale, k, flag in ((4.0, 1, "unconverged"), (6.0, 3, "diverged")):
        keras.utils.set_random_seed(0)
        inner = getattr(keras.layers, kind)(H, return_sequences=True)
        layer = HighwayRNN(inner, iterations=k)
        model = keras.Model(inp := keras.Input((T, I)), layer(inp))
        inner.cell.recurrent_kernel.assign(inner.cell.recurrent_kernel.numpy() * scale)
        assert tf_kernels.applies(inner.cell, keras.ops.zeros((T, B, I)), None, None, layer.highway_options)
        with pytest.warns(HighwayDivergenceWarning, match="shrank by only" if flag == "unconverged" else "grew"):
            g_route = _grad(model, x, y)
        d = layer.last_diagnostics
        assert getattr(d, flag) and d.used is not None and d.used <= k
        if flag == "diverged":
            assert d.used < k
        layer.iterations = d.used
        with tf_kernels.use(False), warnings.catch_warnings():
            warnings.simplefilter("ignore", HighwayDivergenceWarning)
            g_ops = _grad(model, x, y)
        assert not layer.last_diagnostics.diverged
        np.testing.assert_allclose(g_route, g_ops, rtol=2e-4, atol=2e-5)


@tf_only
@pytest.mark.parametrize("kind, mask", [("GRU", False), ("LSTM", False), ("GRU", True)])
def test_fit_warns_from_the_graph(kind, mask):
    """model.fit with compile()'s defaults runs a traced train function: the warning comes
    from the graph (a py_function), on the TensorFlow route and on the keras.ops path (a
    mask), once per layer; a healthy layer at default init does not warn."""
    x, y = _data()
    model, layer = _fixed_fit_model(kind, 4.0, 1, mask=mask)
    with pytest.warns(HighwayDivergenceWarning, match="shrank by only") as caught:
        model.fit(x, y, epochs=2, batch_size=B, verbose=0)
    assert len([w for w in caught if issubclass(w.category, HighwayDivergenceWarning)]) == 1
    assert layer.last_diagnostics.unconverged and layer.last_diagnostics.remainder > 1.0
    healthy, _ = _fixed_fit_model(kind, 1.0, 1, mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighwayDivergenceWarning)
        healthy.fit(x, y, epochs=2, batch_size=B, verbose=0)


@tf_only
def test_fit_under_xla_trains_without_reports():
    """Under jit_compile=True no host callback can run: the step trains (the same
    gradient as without XLA) and reports nothing, as docs/keras.md says."""
    x, y = _data()
    model, layer = _fixed_fit_model("GRU", 4.0, 1, jit_compile=True)
    plain, _ = _fixed_fit_model("GRU", 4.0, 1, jit_compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HighwayDivergenceWarning)
        model.fit(x, y, epochs=1, batch_size=B, verbose=0)
        plain.fit(x, y, epochs=1, batch_size=B, verbose=0)
    assert layer.last_diagnostics is None or not layer.last_diagnostics.unconverged
    np.testing.assert_allclose(_flat(model.trainable_variables), _flat(plain.trainable_variables), rtol=1e-4, atol=1e-6)


@tf_only
@pytest.mark.parametrize("route", ["tf", "ops"])
def test_fit_auto_probes_again_when_the_regime_changes_between_probes(route):
    """In the graph, a chosen k that diverges or stays unconverged after the recurrent
    kernel is scaled up reports it (py_function), and the next step probes (not the
    scheduled one, 100 steps later)."""
    from hwbptt.keras import tf_kernels

    model, layer, inner = _auto_fit_model("GRU", probe_every=100)
    layer.highway_auto.timing = _cheap
    x, y = _data(steps=TG)
    with tf_kernels.use(route == "tf"):
        model.fit(x, y, epochs=2, batch_size=B, shuffle=False, verbose=0)  # step 0 probes, step 1 runs the choice
        assert isinstance(layer.highway_auto.choice, int)
        kernel = inner.cell.recurrent_kernel
        kernel.assign(kernel.numpy() * 8.0)
        model.fit(x, y, epochs=2, batch_size=B, shuffle=False, verbose=0)  # step 2 goes wrong, step 3 probes
    history = layer.highway_auto.history
    events = [e for e in history if "event" in e]
    assert events and events[0]["step"] == 2 and events[0]["event"] in ("diverged", "unconverged")
    assert [e["step"] for e in history if "choice" in e] == [0, 3]


@pytest.mark.parametrize("stops_on_cost", [True, False])
def test_keras_probe_pass_stops_once_iterations_cost_more_than_exact(stops_on_cost):
    """The probe pass (``gradient._probe``) on a fake iteration whose every step takes far
    longer than the exact adjoint: it stops after the first rung, unless a cost model
    replaces the measured times (``probe_stops_on_cost=False``)."""
    import time

    from hwbptt import Diagnostics, HighwayOptions
    from hwbptt.keras import gradient

    ref = np.array([1.0, 0.0], dtype="float32")
    ran = []

    def iterate(observe):
        for k, c in enumerate([0.1, 0.2, 0.3, 0.4]):
            time.sleep(0.05)
            ran.append(k)
            if observe(k, keras.ops.convert_to_tensor(np.array([c, (1 - c * c) ** 0.5], "float32")), True):
                break
        return None, Diagnostics(iterations=len(ran))

    opts = HighwayOptions(iterations=3, probe=(0, 1, 2, 3), probe_stops_on_cost=stops_on_cost)
    exact = keras.ops.convert_to_tensor(ref)
    keras.ops.convert_to_numpy(exact)  # the backend's first-use costs off the exact adjoint's clock
    got, diag = gradient._probe(iterate, lambda: exact, opts, traced=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), ref)
    if stops_on_cost:
        assert ran == [0] and diag.probe["stopped"] == "cost" and set(diag.probe["cosines"]) == {0}
    else:
        assert ran == [0, 1, 2, 3] and diag.probe["stopped"] is None
    assert diag.probe["cosines"][0] == pytest.approx(0.1, abs=1e-6)


def test_retime_times_exact_and_the_rungs_up_to_the_first_faithful():
    """``auto_graph.retime`` on fake compiled adjoints: the times are theirs (each run once
    untimed the first time, then twice timed), only for exact and the rungs up to the first
    faithful one; every cosine stays."""
    import time

    from hwbptt import HighwayOptions
    from hwbptt.keras import auto_graph

    calls = {}

    def fake(delay, name):
        def fn(*args):
            calls[name] = calls.get(name, 0) + 1
            time.sleep(delay)
            return [keras.ops.convert_to_tensor(np.zeros(2, "float32"))]
        return fn

    fns = {k: fake(0.01 * (k + 1), k) for k in (0, 1, 2)} | {None: fake(0.05, "exact")}
    modes = {k: HighwayOptions(iterations=k) for k in (0, 1, 2, None)}
    route = lambda mode: (fns[mode.iterations], ())  # noqa: E731
    probe = {"cosines": {0: 0.5, 1: 0.995, 2: 0.999}, "seconds": {0: 9.0, 1: 9.0, 2: 9.0}, "exact_seconds": 9.0}
    auto_graph.retime(probe, route, modes, fidelity=0.99)
    assert set(probe["seconds"]) == {0, 1} and set(probe["cosines"]) == {0, 1, 2}
    assert 0.02 <= probe["seconds"][1] < 9.0 and 0.05 <= probe["exact_seconds"] < 9.0
    assert calls == {0: 3, 1: 3, "exact": 3} and probe["timed"] == "compiled TensorFlow route"
    none = {"cosines": {0: 0.5, 1: 0.6}, "seconds": {0: 9.0, 1: 9.0}, "exact_seconds": 9.0}
    auto_graph.retime(none, route, modes, fidelity=0.99)
    assert none["seconds"] == {} and calls["exact"] == 5  # warm now: two timed runs
    assert _choice_of(none) is None


def _choice_of(probe):
    from hwbptt import AutoController

    return AutoController().decide({0: probe})["choice"]


@tf_only
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_fit_auto_probe_times_the_compiled_route(kind):
    """On the TensorFlow route a probe's cosines come from the keras.ops pass, its times
    from the route's compiled adjoints (what runs between probes)."""
    from hwbptt.keras import tf_kernels

    model, layer, _ = _auto_fit_model(kind, probe_every=5)
    x, y = _data(steps=TG)
    with tf_kernels.use(True):
        _fit_step(model, x, y)
    probe = layer.last_diagnostics.probe
    assert probe["timed"] == "compiled TensorFlow route"
    first = min(k for k, c in probe["cosines"].items() if c >= 0.99)
    assert set(probe["seconds"]) == {k for k in probe["cosines"] if k <= first}
    assert all(s > 0 for s in probe["seconds"].values()) and probe["exact_seconds"] > 0
    entry = layer.highway_auto.history[0]
    assert entry["choice"] in (first, None) and entry["seconds"] == probe["seconds"]
