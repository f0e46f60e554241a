"""The standard long-range tests for RNN training, at T >= 1000, with Highway-BP.

- ``adding``: the adding problem (Hochreiter & Schmidhuber 1997): two marked values in a
  sequence of T; predict their sum at the last step. Chance (predicting 1.0): MSE 0.167.
- ``copy``: copy memory (Arjovsky et al. 2016): remember 10 symbols across T blank steps
  and write them out after a delimiter. Chance: cross-entropy ln 8 = 2.079.
- ``recall``: name the symbol shown at step 0 after T steps of distractors (the demo's
  task). Chance: ln 4 = 1.386, accuracy 25%.

The loss sits at the end only. Trains one ``HighwayLSTM`` (or ``HighwayGRU``) with
chrono-initialised gates, optionally side by side with exact BPTT (``--compare``):

    python examples/long_range.py --task adding --seq-len 1000 --iterations 10 --compare
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from hwbptt.programs.common import (
    ArgumentParser,
    RunRecord,
    SequenceModel,
    make_task,
    positive_float,
    positive_int,
    run_cli,
    train,
)

PROG = "long_range.py"


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


def gamma_arg(text: str) -> float:
    try:
        g = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= g <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return g


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("adding", "copy", "recall"), default="adding", help="which task (default adding)")
    p.add_argument("--seq-len", type=positive_int, default=1000, help="sequence length / delay T (default 1000)")
    p.add_argument("--hidden", type=positive_int, default=64, help="hidden units (default 64)")
    p.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    p.add_argument("--iterations", type=iterations_arg, default=10, help="Highway-BP iterations k, or 'exact' (default 10)")
    p.add_argument("--gamma", type=gamma_arg, default=0.0, help="residual shift; 1 is the FPI baseline (default 0)")
    p.add_argument("--tol", type=positive_float, default=None, help="stop the iterations early at this relative change")
    p.add_argument("--compare", action="store_true", help="also train the same model with exact BPTT and compare")
    p.add_argument("--steps", type=positive_int, default=500, help="training steps (default 500)")
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    task = make_task(args.task, args.seq_len)
    torch.manual_seed(args.seed)
    base = SequenceModel(task, args.hidden, cell=args.cell, iterations=args.iterations, gamma=args.gamma, tol=args.tol)
    test_x, test_y = task.batch(256, torch.Generator().manual_seed(args.seed + 10_000))
    name = "BPTT" if args.iterations is None and args.tol is None else (
        f"Highway k={args.iterations}" + (f" gamma={args.gamma:g}" if args.gamma else "") + (f" tol={args.tol:g}" if args.tol else "")
    )
    runs = [(name, base)]
    if args.compare and name != "BPTT":
        exact = copy.deepcopy(base)
        exact.rnn.iterations, exact.rnn.tol = None, None
        runs.insert(0, ("BPTT", exact))
    print(
        f"{args.task}: T={task.seq_len}, {args.cell.upper()} H={args.hidden}, batch {args.batch}, "
        f"{args.steps} steps; chance loss {task.chance:.3f}"
    )
    results = []
    for label, model in runs:
        g = torch.Generator().manual_seed(args.seed + 1)

        def step_loss(m, step, g=g):
            x, y = task.batch(args.batch, g)
            out = m(x)
            return task.loss(out, y), task.accuracy(out, y)

        rec = train(model, step_loss, args.steps, RunRecord(label, label, args.iterations), lr=args.lr, progress=not args.no_progress)
        with torch.no_grad():
            out = model(test_x)
            loss = float(task.loss(out, test_y))
            acc = task.accuracy(out, test_y)
        results.append((label, rec.median_step, loss, acc))
    for label, step, loss, acc in results:
        extra = "" if acc is None else f", accuracy {100 * acc:.1f}%"
        print(f"{label:<24} {1000 * step:8.1f} ms/step   test loss {loss:.4f} (chance {task.chance:.3f}){extra}")
    if len(results) == 2:
        print(f"speed-up of {results[1][0]} against BPTT on this machine: {results[0][1] / results[1][1]:.2f}x")
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
