"""Property-based tests of the Keras adapter (hwbptt.keras.HighwayRNN) on TensorFlow
against tf.GradientTape BPTT of the unwrapped layer: random layer type (LSTM, GRU with
both reset_after, SimpleRNN), T, batch, units, return_sequences, go_backwards, masks of
random lengths, losses, float32/float64, and a user cell with an identity residual."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="these properties run on TensorFlow")
tf = pytest.importorskip("tensorflow")

from hwbptt.keras import HighwayRNN  # noqa: E402

from _keras_cells import ResidualCell  # noqa: E402
from _oracle import scaled  # noqa: E402

FACTORIES = {
    "user": lambda H, dtype, **kw: keras.layers.RNN(ResidualCell(H, dtype=dtype), dtype=dtype, **kw),
    "lstm": lambda H, **kw: keras.layers.LSTM(H, **kw),
    "gru": lambda H, **kw: keras.layers.GRU(H, **kw),
    "gru_before": lambda H, **kw: keras.layers.GRU(H, reset_after=False, **kw),
    "simple": lambda H, **kw: keras.layers.SimpleRNN(H, **kw),
}


@st.composite
def keras_cases(draw, T_max=80, go_backwards=True):
    T = draw(st.integers(1, T_max))
    B = draw(st.integers(1, 9))
    masked = draw(st.booleans())
    return dict(
        kind=draw(st.sampled_from(sorted(FACTORIES))),
        T=T, B=B, D=draw(st.integers(1, 5)), H=draw(st.integers(1, 8)),
        return_sequences=draw(st.booleans()),
        go_backwards=draw(st.booleans()) if go_backwards else False,
        lengths=draw(st.lists(st.integers(1, T), min_size=B, max_size=B)) if masked else None,
        loss=draw(st.sampled_from(["every", "sparse"])),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def extra(case):
    return {"residual": "identity"} if case["kind"] == "user" else {}


def build(case, return_sequences=None):
    keras.utils.set_random_seed(case["seed"] % (2**31))
    rs = case["return_sequences"] if return_sequences is None else return_sequences
    layer = FACTORIES[case["kind"]](case["H"], dtype=case["dtype"], return_sequences=rs, go_backwards=case["go_backwards"])
    layer.build((None, None, case["D"]))
    rng = np.random.default_rng(case["seed"])
    for v in layer.weights:
        v.assign(rng.normal(scale=0.5, size=tuple(v.shape)).astype(case["dtype"]))
    x = rng.normal(size=(case["B"], case["T"], case["D"])).astype(case["dtype"])
    mask = None
    if case["lengths"] is not None:
        mask = np.arange(case["T"])[None, :] < np.array(case["lengths"])[:, None]
    out_shape = (case["B"], case["T"], case["H"]) if rs else (case["B"], case["H"])
    w = rng.normal(size=out_shape).astype(case["dtype"])
    if case["loss"] == "sparse" and rs:
        keep = rng.random(size=out_shape[:2]) < 0.1
        keep[:, -1] = True
        w = w * keep[..., None]
    return layer, x, mask, w


def grads(module, layer, x, mask, w):
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        kwargs = {} if mask is None else {"mask": tf.convert_to_tensor(mask)}
        out = module(xt, **kwargs)
        loss = tf.reduce_sum(out * w)
    variables = [v.value for v in layer.trainable_variables]
    return [np.asarray(g) for g in tape.gradient(loss, [xt] + variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)]


def assert_close(got, ref, dtype):
    rtol = 1e-9 if dtype == "float64" else 1e-4
    scale = max(np.linalg.norm(r) for r in ref)
    for g, r in zip(got, ref):
        assert np.all(np.isfinite(g))
        err = np.linalg.norm(g.astype(np.float64) - r.astype(np.float64))
        assert err <= rtol * max(np.linalg.norm(r), 1e-3 * scale, 1e-300), err


@settings(max_examples=scaled(2 / 3))
@given(case=keras_cases())
def test_keras_exact_mode_matches_bptt(case):
    layer, x, mask, w = build(case)
    ref = grads(layer, layer, x, mask, w)
    got = grads(HighwayRNN(layer, iterations=None, **extra(case)), layer, x, mask, w)
    assert_close(got, ref, case["dtype"])


@settings(max_examples=scaled(2 / 3))
@given(case=keras_cases(T_max=40), gamma=st.sampled_from([0.0, 0.5, 1.0]), split=st.sampled_from(["gates", "step"]))
def test_keras_T_iterations_are_exact(case, gamma, split):
    layer, x, mask, w = build(case)
    ref = grads(layer, layer, x, mask, w)
    got = grads(HighwayRNN(layer, iterations=case["T"], gamma=gamma, split=split, **extra(case)), layer, x, mask, w)
    assert_close(got, ref, case["dtype"])


@settings(max_examples=scaled(2 / 3))
@given(case=keras_cases(go_backwards=False), k=st.integers(0, 8))
def test_keras_last_k_plus_one_positions_exact(case, k):
    """Input gradient exact at steps t >= length-1-k after k iterations (masked steps
    carry the state: K = I, J = 0)."""
    layer, x, mask, w = build(case)
    ref = grads(layer, layer, x, mask, w)[0].astype(np.float64)
    wrapped = HighwayRNN(layer, iterations=k, **extra(case))
    got = grads(wrapped, layer, x, mask, w)[0].astype(np.float64)
    rtol = 1e-9 if case["dtype"] == "float64" else 1e-4
    scale = max(np.linalg.norm(ref), 1e-300)
    # Where the path sum grew, the engine returns an earlier iterate (diagnostics.used).
    d = getattr(wrapped, "last_diagnostics", None)
    k_eff = int(d.used) if d is not None and bool(d.diverged) else k
    for b in range(case["B"]):
        L = case["T"] if case["lengths"] is None else case["lengths"][b]
        lo = max(0, L - 1 - k_eff)
        assert np.linalg.norm(got[b, lo:L] - ref[b, lo:L]) <= rtol * scale, (b, lo, L)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple"])
@pytest.mark.parametrize("k", [None, 2, 10])
@pytest.mark.parametrize("where", ["input", "upstream"])
def test_keras_nonfinite_propagate_as_bptt(kind, k, where):
    """A NaN in the input or the upstream gradient: exactly the entries BPTT makes
    non-finite are non-finite."""
    case = dict(kind=kind, T=10, B=2, D=3, H=4, return_sequences=True, go_backwards=False, lengths=None,
                loss="every", dtype="float32", seed=3)
    layer, x, mask, w = build(case)
    if where == "input":
        x[1, 4, 0] = np.nan
    else:
        w[0, 6, 2] = np.nan
    ref = grads(layer, layer, x, mask, w)
    got = grads(HighwayRNN(layer, iterations=k), layer, x, mask, w)
    assert not np.isfinite(ref[0]).all()
    for g, r in zip(got, ref):
        assert np.array_equal(np.isfinite(g), np.isfinite(r))
