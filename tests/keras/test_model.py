"""Models: fit/evaluate/predict, Bidirectional, masks, jit_compile, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import keras

from hwbptt.keras import HighwayRNN

from helpers import BACKEND, D, H, T, ResidualCell

rng = np.random.default_rng(3)
N = 64
X = rng.normal(size=(N, T, D)).astype("float32")
Y = X[:, :, :2].sum(axis=1).astype("float32")  # a linear function of the sequence
TOKENS = rng.integers(1, 9, size=(N, T))
TOKENS[: N // 2, T // 2 :] = 0  # padded half of the batch: Embedding(mask_zero=True) masks it


def _sequential(rnn, **hw):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((T, D)), HighwayRNN(rnn, **hw), keras.layers.Dense(2)])


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: _sequential(keras.layers.LSTM(H), iterations=2),
        lambda: _sequential(keras.layers.GRU(H), iterations=None),
        lambda: _sequential(keras.layers.RNN(ResidualCell(H)), iterations=1, residual="identity"),
    ],
    ids=["lstm", "gru-exact", "user"],
)
def test_fit_two_epochs_lowers_the_loss(make_model):
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    before = model.evaluate(X, Y, verbose=0)
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    after = model.evaluate(X, Y, verbose=0)
    assert after < before
    assert model.predict(X[:5], verbose=0).shape == (5, 2)


def test_functional_bidirectional_with_embedding_mask_trains():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((T,), dtype="int32")
    e = keras.layers.Embedding(10, D, mask_zero=True)(tokens)
    h = keras.layers.Bidirectional(HighwayRNN(keras.layers.LSTM(H, return_sequences=True), iterations=2))(e)
    out = keras.layers.Dense(1)(HighwayRNN(keras.layers.GRU(H), iterations=3)(h))
    model = keras.Model(tokens, out)
    target = (TOKENS > 4).sum(axis=1, keepdims=True).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    before = model.evaluate(TOKENS, target, verbose=0)
    model.fit(TOKENS, target, epochs=2, batch_size=16, verbose=0)
    assert model.evaluate(TOKENS, target, verbose=0) < before


def test_bidirectional_matches_unwrapped_bidirectional():
    keras.utils.set_random_seed(0)
    bi_hw = keras.layers.Bidirectional(HighwayRNN(keras.layers.GRU(H, return_sequences=True)))
    bi_ref = keras.layers.Bidirectional(keras.layers.GRU(H, return_sequences=True))
    x = X[:4]
    bi_hw(x), bi_ref(x)
    assert bi_hw.backward_layer.go_backwards and not bi_hw.forward_layer.go_backwards
    bi_ref.set_weights(bi_hw.get_weights())
    mask = np.arange(T)[None, :] < np.array([T, 2, 4, 1])[:, None]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bi_hw(x, mask=mask)), keras.ops.convert_to_numpy(bi_ref(x, mask=mask)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA compilation is a TensorFlow (or JAX) feature here")
def test_jit_compile_training_matches_eager_training():
    losses, weights = [], None
    for jit in (False, True):
        model = _sequential(keras.layers.LSTM(H), iterations=2, tol=1e-3)
        weights = weights or model.get_weights()
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=jit)
        history = model.fit(X, Y, epochs=2, batch_size=16, verbose=0, shuffle=False)
        losses.append(history.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert losses[1][1] < losses[1][0]


@pytest.mark.parametrize(
    "rnn,hw",
    [
        (lambda: keras.layers.LSTM(H, return_sequences=True, go_backwards=True), dict(iterations=4, tol=1e-4, gamma=0.25, split="step")),
        (lambda: keras.layers.RNN(ResidualCell(H)), dict(iterations=None, residual="identity", diagnostics=True)),
    ],
    ids=["lstm", "user"],
)
def test_save_load_round_trip(tmp_path, rnn, hw):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((T, D))
    model = keras.Model(inputs, HighwayRNN(rnn(), name="hw", **hw)(inputs))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(X[:8], verbose=0), loaded.predict(X[:8], verbose=0))
    layer = loaded.get_layer("hw")
    assert isinstance(layer, HighwayRNN)
    for name, value in hw.items():
        assert getattr(layer, name) == value, name
    assert layer.go_backwards == model.get_layer("hw").go_backwards
