"""Hostile and unusual input for the Keras adapter (hwbptt.keras.HighwayRNN) on
TensorFlow: each case behaves as the unwrapped Keras layer does (its outputs, and
tf.GradientTape BPTT through it for the gradients) or raises an error that names the
problem."""

from __future__ import annotations

import copy

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="these cases run on TensorFlow")
tf = pytest.importorskip("tensorflow")

from hwbptt.keras import HighwayRNN  # noqa: E402

from _keras_cells import ResidualCell  # noqa: E402


KINDS = {
    "lstm": lambda H, **kw: keras.layers.LSTM(H, **kw),
    "gru": lambda H, **kw: keras.layers.GRU(H, **kw),
    "gru_before": lambda H, **kw: keras.layers.GRU(H, reset_after=False, **kw),
    "simple": lambda H, **kw: keras.layers.SimpleRNN(H, **kw),
    "user": lambda H, dtype="float32", **kw: keras.layers.RNN(ResidualCell(H, dtype=dtype), dtype=dtype, **kw),
}


def extra(kind):
    return {"residual": "identity"} if kind == "user" else {}


def make(kind, H=4, D=3, dtype="float64", seed=0, **kw):
    """A built layer with random weights of scale 0.5 (float64 unless asked: exact comparisons)."""
    keras.utils.set_random_seed(seed)
    layer = KINDS[kind](H, dtype=dtype, **kw)
    layer.build((None, None, D))
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.normal(scale=0.5, size=tuple(v.shape)).astype(v.dtype))
    return layer


def run(module, layer, x, w, **call):
    """Outputs (a list) and the gradients of ``sum(outputs[0] * w)`` wrt the input (if
    floating) and the layer's trainable variables, by tf.GradientTape."""
    xt = tf.convert_to_tensor(x)
    watch = xt.dtype.is_floating
    with tf.GradientTape() as tape:
        if watch:
            tape.watch(xt)
        out = module(xt, **call)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        loss = tf.reduce_sum(tf.cast(out[0], tf.float64) * w)
    targets = ([xt] if watch else []) + [v.value for v in layer.trainable_variables]
    g = tape.gradient(loss, targets, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [np.asarray(o) for o in out], [np.asarray(a) for a in g]


def assert_same(got, ref, rtol):
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * max(1.0, float(np.abs(r).max(initial=0.0))))


# ----------------------------------------------------------------------------- shapes at the edges


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("iterations", [0, 1, None])
@pytest.mark.parametrize("return_sequences,return_state", [(True, True), (False, False)])
def test_keras_one_step_as_bptt(kind, iterations, return_sequences, return_state):
    """T = 1: outputs are the layer's; with one step every iteration count is exact."""
    layer = make(kind, return_sequences=return_sequences, return_state=return_state)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 1, 3))
    w = rng.normal(size=(3, 1, 4) if return_sequences else (3, 4))
    out_ref, g_ref = run(layer, layer, x, w)
    out, g = run(HighwayRNN(layer, iterations=iterations, **extra(kind)), layer, x, w)
    assert len(out) == len(out_ref)
    assert_same(out, out_ref, 1e-12)
    assert_same(g, g_ref, 1e-9)


@pytest.mark.parametrize("kind", ["lstm", "user"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_keras_zero_steps_raise_clearly(kind, return_sequences):
    """T = 0: the layer itself fails inside TensorFlow (an out-of-bounds slice); the
    wrapper raises a ValueError that says why."""
    layer = make(kind, return_sequences=return_sequences)
    x = np.zeros((2, 0, 3))
    with pytest.raises(Exception):
        layer(x)
    with pytest.raises(ValueError, match=r"HighwayRNN: sequences must have at least one time step, got shape \(2, 0, 3\)"):
        HighwayRNN(layer, **extra(kind))(x)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("B,H", [(1, 4), (3, 1), (1, 1)])
def test_keras_batch_one_and_units_one(kind, B, H):
    """Batch 1 and/or units = 1: outputs as the layer's; exact and k = T equal BPTT; after
    k = 2 the last 3 steps' input gradient is exact."""
    T = 7
    layer = make(kind, H=H, return_sequences=True)
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(B, T, 3)), rng.normal(size=(B, T, H))
    out_ref, g_ref = run(layer, layer, x, w)
    for iterations in (None, T):
        out, g = run(HighwayRNN(layer, iterations=iterations, **extra(kind)), layer, x, w)
        assert_same(out, out_ref, 1e-12)
        assert_same(g, g_ref, 1e-9)
    _, g = run(HighwayRNN(layer, iterations=2, **extra(kind)), layer, x, w)
    np.testing.assert_allclose(g[0][:, T - 3 :], g_ref[0][:, T - 3 :], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- masks and NaN


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("return_sequences", [True, False])
def test_keras_mask_all_false_rows_as_bptt(kind, return_sequences):
    """Rows whose mask is all False (and a batch whose every row is): outputs as the
    layer's (zeros, the initial state); gradients as BPTT's (zero for those rows)."""
    T = 6
    layer = make(kind, return_sequences=return_sequences, return_state=True)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, T, 3))
    w = rng.normal(size=(4, T, 4) if return_sequences else (4, 4))
    masks = [np.arange(T)[None, :] < np.array([[4], [0], [6], [0]]), np.zeros((4, T), bool)]
    for mask in masks:
        out_ref, g_ref = run(layer, layer, x, w, mask=mask)
        for iterations in (None, 2, T):
            out, g = run(HighwayRNN(layer, iterations=iterations, **extra(kind)), layer, x, w, mask=mask)
            assert_same(out, out_ref, 1e-12)
            if iterations == 2:  # the all-False rows: no gradient, as in BPTT
                assert not np.any(g[0][~mask.any(1)]) and not np.any(g_ref[0][~mask.any(1)])
            else:
                assert_same(g, g_ref, 1e-9)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple", "user"])
@pytest.mark.parametrize("iterations", [None, 2, 8])
def test_keras_nan_input_as_bptt(kind, iterations):
    """A NaN in the input at a valid step (masked batch): the outputs are the layer's
    (NaN where its are) and exactly the gradient entries BPTT makes non-finite are
    non-finite; the finite ones agree (exact, k = T)."""
    T = 8
    layer = make(kind, return_sequences=True)
    rng = np.random.default_rng(4)
    x, w = rng.normal(size=(3, T, 3)), rng.normal(size=(3, T, 4))
    mask = np.arange(T)[None, :] < np.array([[8], [5], [7]])
    x[1, 2, 0] = np.nan
    out_ref, g_ref = run(layer, layer, x, w, mask=mask)
    out, g = run(HighwayRNN(layer, iterations=iterations, **extra(kind)), layer, x, w, mask=mask)
    np.testing.assert_allclose(out[0], out_ref[0], rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isfinite(out_ref[0][[0, 2]]).all() and not np.isfinite(g_ref[0][1, :5]).all()
    # The input gradient at masked steps is exactly zero (their inputs never count; see
    # test_keras_nan_at_masked_steps_is_ignored), where BPTT has 0·NaN in the NaN row.
    assert not np.any(g[0][~mask])
    g[0], g_ref[0] = g[0][mask], g_ref[0][mask]
    for a, b in zip(g, g_ref):
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        if iterations != 2:
            fin = np.isfinite(b)
            np.testing.assert_allclose(a[fin], b[fin], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple", "user"])
@pytest.mark.parametrize("iterations", [None, 2, 8])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_keras_nan_at_masked_steps_is_ignored(kind, iterations, go_backwards):
    """NaN/Inf at masked (padding) steps never reach the outputs, and not the gradients
    either: they equal BPTT's with the padding zeroed (Keras' own BPTT turns them into
    NaN through 0·NaN in its masking)."""
    T = 8
    layer = make(kind, return_sequences=True, go_backwards=go_backwards)
    rng = np.random.default_rng(4)
    x, w = rng.normal(size=(3, T, 3)), rng.normal(size=(3, T, 4))
    mask = np.arange(T)[None, :] < np.array([[8], [5], [7]])
    clean = np.where(mask[..., None], x, 0.0)
    x[1, 6, 0], x[2, 7, 1] = np.nan, np.inf
    out_ref, g_ref = run(layer, layer, clean, w, mask=mask)
    out, g = run(HighwayRNN(layer, iterations=iterations, **extra(kind)), layer, x, w, mask=mask)
    np.testing.assert_allclose(out[0], out_ref[0], rtol=1e-12, atol=1e-12)
    out_parent, _ = run(layer, layer, x, w, mask=mask)
    np.testing.assert_array_equal(out_parent[0], out_ref[0])  # the layer's forward ignores the padding too
    assert all(np.isfinite(a).all() for a in g)
    if iterations == 2:  # from the last valid step back, the 3 steps the estimate has exactly
        for b, L in enumerate((8, 5, 7)):
            steps = slice(L - 3, L) if not go_backwards else slice(0, 3)  # the last 3 steps processed
            np.testing.assert_allclose(g[0][b, steps], g_ref[0][b, steps], rtol=1e-9, atol=1e-12)
    else:
        assert_same(g, g_ref, 1e-9)


# ----------------------------------------------------------------------------- dtypes and ranks


@pytest.mark.parametrize("kind", ["lstm", "gru", "user"])
@pytest.mark.parametrize(
    "layer_dtype,input_dtype", [("float32", "float64"), ("float32", "float16"), ("float32", "int32"), ("float64", "float32")]
)
def test_keras_mismatched_input_dtype_as_parent(kind, layer_dtype, input_dtype):
    """The input is cast to the layer's compute dtype, as the layer does: same output
    dtype and values; the gradient reaches the input in the input's dtype, as BPTT's."""
    layer = make(kind, dtype=layer_dtype, return_sequences=True)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, 3))
    x = (x * 3).astype(input_dtype) if input_dtype == "int32" else x.astype(input_dtype)
    w = rng.normal(size=(2, 5, 4))
    out_ref, g_ref = run(layer, layer, x, w)
    out, g = run(HighwayRNN(layer, iterations=5, **extra(kind)), layer, x, w)
    assert out[0].dtype == out_ref[0].dtype == np.dtype(layer_dtype)
    rtol = 1e-12 if layer_dtype == "float64" else 1e-5
    assert_same(out, out_ref, rtol)
    assert len(g) == len(g_ref)
    assert_same(g, g_ref, 1e-9 if layer_dtype == "float64" else 1e-4)


@pytest.mark.parametrize("shape", [(5, 3), (2, 5, 3, 1), (3,)])
@pytest.mark.parametrize("built", [True, False])
def test_keras_wrong_rank_raises_naming_sequences(shape, built):
    """The layer raises a ValueError (its input spec: ndim 3); so does the wrapper, naming
    the argument and the shape, whether or not it is built yet."""
    layer = make("lstm") if built else keras.layers.LSTM(4)
    x = np.zeros(shape, "float32")
    with pytest.raises(ValueError, match="expected ndim=3"):
        (make("lstm") if built else keras.layers.LSTM(4))(x)
    msg = rf"HighwayRNN: sequences must be 3-D \(batch, time, features\), got shape {re_shape(shape)}"
    with pytest.raises(ValueError, match=msg):
        HighwayRNN(layer)(x)


def re_shape(shape):
    return "\\(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + "\\)"


# ----------------------------------------------------------------------------- serialisation

OPTIONS = {
    "lstm": dict(iterations=4, tol=1e-4, gamma=0.25, split="step", diagnostics=True),
    "gru": dict(iterations=None),
    "gru_before": dict(iterations=2, gamma=1.0),
    "simple": dict(iterations=0),
    "user": dict(iterations=3, residual="identity"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("go_backwards", [False, True])
def test_keras_config_round_trip(kind, go_backwards):
    """get_config -> from_config (twice from one config, which it leaves unchanged) and
    keras.layers.serialize -> deserialize: the same options and wrapped-layer config;
    with the weights copied, the same outputs and gradients."""
    layer = make(kind, dtype="float32", return_sequences=True, go_backwards=go_backwards)
    hw = HighwayRNN(layer, **OPTIONS[kind])
    rng = np.random.default_rng(6)
    x, w = rng.normal(size=(2, 6, 3)).astype("float32"), rng.normal(size=(2, 6, 4))
    out, g = run(hw, layer, x, w)
    config = hw.get_config()
    kept = copy.deepcopy(config)
    copies = [HighwayRNN.from_config(config), HighwayRNN.from_config(config)]
    assert config == kept
    for dup in copies + [keras.layers.deserialize(keras.layers.serialize(hw))]:
        assert isinstance(dup, HighwayRNN) and dup.layer is not layer
        assert dup.highway_options == hw.highway_options and dup.residual == hw.residual
        dup.build((None, None, 3))
        dup.layer.set_weights(layer.get_weights())
        assert dup.layer.get_config() == layer.get_config()
        assert dup.get_config() == config
        out2, g2 = run(dup, dup.layer, x, w)
        for a, b in zip(out2 + g2, out + g):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_keras_saved_model_same_outputs_and_gradients(tmp_path, kind, bidirectional):
    """model.save(.keras) -> keras.models.load_model: the same outputs and Highway-BP
    gradients, the options kept."""
    keras.utils.set_random_seed(7)
    hw = HighwayRNN(KINDS[kind](4, return_sequences=True), name="hw", **OPTIONS[kind])
    inputs = keras.Input((6, 3))
    outputs = keras.layers.Bidirectional(hw, name="bi")(inputs) if bidirectional else hw(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(outputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    rng = np.random.default_rng(8)
    x, w = rng.normal(size=(3, 6, 3)).astype("float32"), rng.normal(size=(3, 6, 2))
    out, g = run(model, model, x, w)
    out2, g2 = run(loaded, loaded, x, w)
    assert len(g) == len(g2) == 1 + len(model.trainable_variables)
    for a, b in zip(out2 + g2, out + g):
        np.testing.assert_array_equal(a, b)
    if bidirectional:
        pairs = [(loaded.get_layer("bi").forward_layer, model.get_layer("bi").forward_layer),
                 (loaded.get_layer("bi").backward_layer, model.get_layer("bi").backward_layer)]
    else:
        pairs = [(loaded.get_layer("hw"), model.get_layer("hw"))]
    for new, old in pairs:
        assert isinstance(new, HighwayRNN)
        assert new.highway_options == old.highway_options and new.residual == old.residual
        assert new.go_backwards == old.go_backwards
