"""A Keras model holding hwbptt.keras.HighwayRNN under tf.distribute.MirroredStrategy
with two logical CPU devices: the all-reduced gradient equals one device's gradient on
the whole batch, and model.fit runs. In a fresh process: logical devices must be set
before TensorFlow initialises its devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from hwbptt.keras import HighwayRNN

    def model():
        keras.utils.set_random_seed(0)
        inp = keras.Input((12, 3))
        h = HighwayRNN(keras.layers.LSTM(6, return_sequences=True), iterations=2)(inp)
        h = HighwayRNN(keras.layers.GRU(5), iterations=3)(h)
        return keras.Model(inp, keras.layers.Dense(1)(h))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 12, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")

    def grads_of(m, xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((m(xb, training=True) - yb) ** 2)
        return tape.gradient(loss, m.trainable_variables)

    single = [g.numpy() for g in grads_of(model(), x, y)]

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        m = model()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    dist = strategy.experimental_distribute_dataset(ds)
    xb, yb = next(iter(dist))
    per_replica = strategy.run(lambda a, b: grads_of(m, a, b), args=(xb, yb))
    reduced = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None).numpy()
               for g in per_replica]
    shards = [int(t.shape[0]) for t in strategy.experimental_local_results(xb)]
    errs = [float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) for a, b in zip(reduced, single)]

    with strategy.scope():
        m2 = model()
        m2.compile(optimizer="sgd", loss="mse")
    hist = m2.fit(x, y, batch_size=8, epochs=2, verbose=0)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "shards": shards, "errs": errs,
                      "losses": [float(v) for v in hist.history["loss"]]}))
    """
)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute needs the TensorFlow backend")
def test_mirrored_strategy_two_cpu_replicas_same_gradients():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["shards"] == [4, 4]  # the batch really was split over two replicas
    assert max(result["errs"]) <= 1e-5, result["errs"]
    assert all(v == v and v < 1e6 for v in result["losses"])  # fit ran, finite losses
