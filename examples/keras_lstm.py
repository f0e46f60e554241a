"""Keras: a long-range task trained with ``model.fit`` through ``hwbptt.keras.HighwayRNN``.

The recall task of the demo (name the symbol shown at step 0 after ``T`` steps of
distractors; the loss sits at the last step) with a Keras LSTM wrapped by
``HighwayRNN(keras.layers.LSTM(...), iterations=k)``, compiled and trained with
``model.fit``, then the same model with the exact gradient (``iterations=None``) for
comparison. Runs on the TensorFlow backend by default; ``KERAS_BACKEND=torch`` works too.

    python examples/keras_lstm.py --seq-len 256 --iterations 5 --epochs 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hwbptt.programs.common import ArgumentParser, RecallTask, UsageError, positive_int, run_cli  # noqa: E402

PROG = "keras_lstm.py"


def iterations_arg(text: str) -> int | None:
    if text == "exact":
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'exact', got {text!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'exact', got {k}")
    return k


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=positive_int, default=256, help="sequence length T (default 256)")
    p.add_argument("--hidden", type=positive_int, default=32)
    p.add_argument("--iterations", type=iterations_arg, default=5, help="Highway-BP k, or 'exact' (default 5)")
    p.add_argument("--samples", type=positive_int, default=2048, help="training sequences (default 2048)")
    p.add_argument("--epochs", type=positive_int, default=4)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--no-compare", action="store_true", help="skip the exact-gradient run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no Keras progress bars")
    return p


def make_data(task: RecallTask, n: int, seed: int):
    import torch

    x, y = task.batch(n, torch.Generator().manual_seed(seed))
    return x.permute(1, 0, 2).numpy(), y[0].numpy()  # Keras: (batch, time, features)


def build_model(task: RecallTask, hidden: int, iterations, seed: int):
    import keras
    import numpy as np

    from hwbptt.keras import HighwayRNN

    keras.utils.set_random_seed(seed)
    lstm = keras.layers.LSTM(hidden, unit_forget_bias=True)
    model = keras.Sequential(
        [
            keras.Input((task.seq_len, task.inputs)),
            HighwayRNN(lstm, iterations=iterations),
            keras.layers.Dense(task.outputs),
        ]
    )
    # chrono initialisation of the forget/input gate biases (Keras gate order i, f, c, o)
    bias = lstm.cell.bias
    H = hidden
    scale = np.log(np.random.default_rng(seed).uniform(1, max(task.seq_len - 1, 2), H)).astype("float32")
    b = np.zeros(4 * H, dtype="float32")
    b[:H], b[H : 2 * H] = -scale, scale
    bias.assign(b)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def run(args) -> int:
    try:
        import keras
    except ImportError:
        raise UsageError("keras is not installed: pip install 'hwbptt[keras]'") from None
    task = RecallTask(args.seq_len)
    x, y = make_data(task, args.samples, args.seed)
    xt, yt = make_data(task, 512, args.seed + 10_000)
    print(f"Keras {keras.__version__} ({keras.backend.backend()} backend): recall task, T={args.seq_len}, {args.samples} sequences")
    runs = [args.iterations] + ([] if args.no_compare or args.iterations is None else [None])
    results = []
    for k in runs:
        name = "exact gradient" if k is None else f"Highway k={k}"
        print(f"-- {name}")
        model = build_model(task, args.hidden, k, args.seed)
        t0 = time.perf_counter()
        model.fit(x, y, epochs=args.epochs, batch_size=args.batch, verbose=0 if args.quiet else 2)
        seconds = time.perf_counter() - t0
        loss, acc = model.evaluate(xt, yt, verbose=0)
        results.append((name, seconds, loss, acc))
    for name, seconds, loss, acc in results:
        print(f"{name:<16} fit {seconds:6.1f} s   test loss {loss:.3f}, accuracy {100 * acc:.1f}% (chance 25%)")
    return 0


def _main(argv):
    return run(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(_main, argv, PROG)
    except SystemExit as exc:
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
