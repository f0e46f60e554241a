"""``python -m hwbptt bench --suites keras-tf``: ``HighwayRNN`` against Keras' own layer
under ``model.fit`` on TensorFlow.

Each model is ``Input((T, H)) -> LSTM/GRU(H, return_sequences=True)`` (plain, or wrapped in
``HighwayRNN``) with ``compile(optimizer="adam", loss="mse")``, Keras' defaults otherwise
(on a CPU-only machine ``jit_compile="auto"`` resolves to no XLA for the model; the route's
own compiled pieces are XLA whatever the model says). A step is one batch of ``fit``,
timed from ``on_train_batch_begin`` to ``on_train_batch_end``. The models run interleaved
in one process (plain, k=1, k=3, exact, plain, ...), ``repeats`` rounds of ``steps``
batches after one warm-up round that traces and compiles; a row is the median over all its
timed steps, and the ratio is the plain layer's median over the row's (> 1: HighwayRNN is
faster). The levers of the TensorFlow route (``hwbptt.keras.tf_kernels``) are timed in the
same run, at ``k=1`` and exact for the LSTM: the ``keras.ops`` path it replaces, the
forward compiled by XLA, and the backward without XLA. ``cosine`` compares the variant's
gradient with the plain layer's (BPTT) on one batch at the initial weights.

The worker runs in a subprocess with ``KERAS_BACKEND=tensorflow``; it imports no torch.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["run_keras_tf_suite", "format_rows", "worker"]

LEVERS = {  # variant -> (route on, forward XLA, backward XLA)
    "": (True, False, True),
    "keras.ops path": (False, False, True),
    "forward XLA": (True, True, True),
    "backward no XLA": (True, False, False),
}


def _plan(T_list: list[int], ks: list[int | None], levers: bool) -> list[dict]:
    plan = []
    for T in T_list:
        for kind in ("lstm", "gru"):
            plan.append({"kind": kind, "T": T, "k": "plain", "lever": ""})
            for k in ks:
                plan.append({"kind": kind, "T": T, "k": k, "lever": ""})
            if levers and kind == "lstm" and T == T_list[0]:
                for lever in LEVERS:
                    if lever:
                        plan += [{"kind": kind, "T": T, "k": k, "lever": lever} for k in ks if k in (1, None)]
    return plan


def worker(cfg: dict) -> list[dict]:
    """Time the plan in this process (``KERAS_BACKEND=tensorflow``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import keras
    import tensorflow as tf

    from hwbptt.keras import HighwayRNN, tf_kernels

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(f"bench_keras: needs KERAS_BACKEND=tensorflow, got {keras.backend.backend()}")
    B, H, steps = cfg["B"], cfg["H"], cfg["steps"]
    rng = np.random.default_rng(cfg["seed"])
    data = {}
    entries = []
    for item in _plan(cfg["T"], cfg["ks"], cfg["levers"]):
        T, kind = item["T"], item["kind"]
        if T not in data:
            data[T] = (rng.standard_normal((B * steps, T, H)).astype("float32"),
                       rng.standard_normal((B * steps, T, H)).astype("float32"))
        keras.utils.set_random_seed(cfg["seed"])
        rnn = (keras.layers.LSTM if kind == "lstm" else keras.layers.GRU)(H, return_sequences=True)
        layer = rnn if item["k"] == "plain" else HighwayRNN(rnn, iterations=item["k"])
        model = keras.Sequential([keras.Input((T, H)), layer])
        model.compile(optimizer="adam", loss="mse")
        entries.append({**item, "model": model, "rnn": rnn, "times": []})

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.out: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.out.append(time.perf_counter() - self.t0)

    def fit(e: dict) -> list[float]:
        x, y = data[e["T"]]
        timer = Timer()
        on, fwd_xla, bwd_xla = LEVERS[e["lever"]]
        tf_kernels.levers(forward_xla=fwd_xla, backward_xla=bwd_xla)
        with tf_kernels.use(on):  # read when the train step is traced (the warm-up round)
            e["model"].fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
        return timer.out

    # Gradients at the initial weights, before any training step moves them.
    for e in entries:
        x, y = data[e["T"]]
        xb, yb = tf.constant(x[:B]), tf.constant(y[:B])
        on, fwd_xla, bwd_xla = LEVERS[e["lever"]]
        tf_kernels.levers(forward_xla=fwd_xla, backward_xla=bwd_xla)
        with tf_kernels.use(on), tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(e["model"](xb, training=True) - yb))
        g = tape.gradient(loss, e["rnn"].trainable_variables)
        e["grad"] = np.concatenate([np.asarray(v).ravel() for v in g])
    for e in entries:  # warm-up: trace, compile
        fit(e)
    for _ in range(cfg["repeats"]):
        for e in entries:
            e["times"] += fit(e)

    rows = []
    for e in entries:
        if e["k"] == "plain":
            continue
        base = next(b for b in entries if b["kind"] == e["kind"] and b["T"] == e["T"] and b["k"] == "plain")
        ms, base_ms = statistics.median(e["times"]) * 1e3, statistics.median(base["times"]) * 1e3
        g, r = e["grad"], base["grad"]
        rows.append({
            "suite": f"keras-tf {e['kind'].upper()}", "model": f"HighwayRNN(keras.layers.{e['kind'].upper()}) (tensorflow)",
            "baseline": f"keras.layers.{e['kind'].upper()} (tensorflow, BPTT)", "lever": e["lever"],
            "T": e["T"], "B": B, "H": H, "k": "exact" if e["k"] is None else str(e["k"]),
            "step_ms": ms, "base_step_ms": base_ms, "speedup": base_ms / ms,
            "cosine": float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r) + 1e-30)),
            "repeats": cfg["repeats"], "steps": len(e["times"]),
        })
    return rows


def run_keras_tf_suite(T: list[int], B: int, H: int, ks: list[int | None], repeats: int, steps: int = 3,
                       levers: bool = True, seed: int = 0, timeout: float = 1800) -> tuple[list[dict], str | None]:
    """Run ``worker`` in a subprocess with ``KERAS_BACKEND=tensorflow``; ``(rows, note)``."""
    cfg = {"T": T, "B": B, "H": H, "ks": ks, "repeats": repeats, "steps": steps, "levers": levers, "seed": seed}
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    code = "import json, sys; from hwbptt.programs.bench_keras import worker; print('HWBPTT_JSON ' + json.dumps(worker(json.loads(sys.argv[1]))))"
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], "keras-tf: not measured (timed out)"
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("HWBPTT_JSON ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return [], f"keras-tf: not measured ({tail[0][:300]})"
    return json.loads(line[len("HWBPTT_JSON "):]), None


def format_rows(rows: list[dict]) -> str:
    """The suite's own table: one line per layer, T, k and lever."""
    head = ["layer", "T", "k", "variant", "ms/step", "Keras ms/step", "ratio", "cosine"]
    lines = [head]
    for r in rows:
        lines.append([r["suite"].split()[-1], str(r["T"]), r["k"], r["lever"] or "route (default)", f"{r['step_ms']:.0f}",
                      f"{r['base_step_ms']:.0f}", f"{r['speedup']:.2f}x", f"{r['cosine']:.4f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main_rows(quick: bool, repeats: int | None) -> tuple[list[dict], list[str]]:
    """The hook ``bench.py`` calls: run the suite, print its table, return the rows for
    the main table (the default route only) and any notes."""
    T = [1024] if quick else [1024, 2048]
    reps = repeats if repeats is not None else (2 if quick else 5)
    print(f"keras-tf: model.fit, T={T}, B=32, H=128, k=1,3,exact, {reps} interleaved rounds of 3 steps "
          "in a subprocess ...", file=sys.stderr)
    rows, note = run_keras_tf_suite(T, 32, 128, [1, 3, None], repeats=reps, levers=not quick)
    if rows:
        print()
        print("keras-tf: HighwayRNN vs Keras' own layer under model.fit (TensorFlow, default compile(); "
              f"median of {rows[0]['steps']} steps each, interleaved; ratio > 1: HighwayRNN faster)")
        print(format_rows(rows))
    return [r for r in rows if not r["lever"]], [note] if note else []
