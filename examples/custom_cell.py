"""A user-defined recurrent cell trained with ``hwbptt.torch.HighwayRNN``.

The cell is a layer-normalised minimal gated unit:

    f_t = sigmoid(U_x x_t + U_h h_{t-1} + b_f)
    h_t = f_t * h_{t-1} + (1 - f_t) * tanh(W_x x_t + W_h LayerNorm(h_{t-1}))

Its residual is ``diag(f_t)`` (the ``f_t * h_{t-1}`` term), handed to ``HighwayRNN`` as a
callable; everything else is the block, whose VJP comes from one autograd call over all
``T·B`` rows. Trained on the recall task (name the symbol shown at step 0 after ``T``
steps; loss at the last step) with Highway-BP and, for comparison, with exact BPTT
through the Python loop (``iterations=None``).

    python examples/custom_cell.py --seq-len 256 --iterations 5 --steps 300
"""

from __future__ import annotations

import argparse
import copy
import math
import sys

import torch
from torch import nn

from hwbptt.programs.common import ArgumentParser, RecallTask, RunRecord, positive_float, positive_int, run_cli, train

PROG = "custom_cell.py"


class MinimalGatedCell(nn.Module):
    """``cell(x_t, h) -> h``: a layer-normalised minimal gated unit."""

    def __init__(self, inputs: int, hidden: int, max_len: int = 100):
        super().__init__()
        self.hidden_size = hidden
        self.gate = nn.Linear(inputs + hidden, hidden)
        self.cand_x = nn.Linear(inputs, hidden)
        self.cand_h = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        with torch.no_grad():  # chrono-style forget biases: memory time scales up to max_len
            self.gate.bias.copy_(torch.log(torch.rand(hidden) * max(max_len - 2, 1) + 1))

    def forget(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(torch.cat([x, h], dim=-1)))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        f = self.forget(x, h)
        return f * h + (1 - f) * torch.tanh(self.cand_x(x) + self.cand_h(self.norm(h)))

    def initial_state(self, batch: int, device, dtype) -> torch.Tensor:
        return torch.zeros(batch, self.hidden_size, device=device, dtype=dtype)


class Classifier(nn.Module):
    def __init__(self, task: RecallTask, hidden: int, iterations):
        super().__init__()
        from hwbptt.torch import HighwayRNN

        cell = MinimalGatedCell(task.inputs, hidden, task.seq_len)
        # the residual: d h_t / d h_{t-1} along the f_t * h_{t-1} path, f_t held fixed
        self.rnn = HighwayRNN(cell, residual=lambda x, h_prev, h_new: cell.forget(x, h_prev), iterations=iterations)
        self.head = nn.Linear(hidden, task.outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[-1:])


def iterations_arg(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {k}")
    return k


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--hidden", type=positive_int, default=32)
    p.add_argument("--iterations", type=iterations_arg, default=5, help="Highway-BP iterations k (default 5)")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=1e-2)
    p.add_argument("--no-compare", action="store_true", help="skip the exact BPTT run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    task = RecallTask(args.seq_len)
    torch.manual_seed(args.seed)
    base = Classifier(task, args.hidden, args.iterations)
    test_x, test_y = task.batch(256, torch.Generator().manual_seed(args.seed + 10_000))
    print(f"MinimalGatedCell H={args.hidden} under HighwayRNN; recall task T={args.seq_len} (loss at the last step)")
    runs = [("Highway k=%d" % args.iterations, args.iterations)] + ([] if args.no_compare else [("BPTT (Python loop)", None)])
    results = []
    for label, k in runs:
        model = copy.deepcopy(base)
        model.rnn.iterations = k
        g = torch.Generator().manual_seed(args.seed + 1)

        def step_loss(m, step, g=g):
            x, y = task.batch(args.batch, g)
            out = m(x)
            return task.loss(out, y), task.accuracy(out, y)

        rec = train(model, step_loss, args.steps, RunRecord(label, "custom", k), lr=args.lr, progress=not args.no_progress)
        with torch.no_grad():
            out = model(test_x)
        results.append((label, rec.median_step, float(task.loss(out, test_y)), task.accuracy(out, test_y)))
    for label, step, loss, acc in results:
        print(f"{label:<20} {1000 * step:7.1f} ms/step   test loss {loss:.3f} (chance {math.log(4):.3f}), accuracy {100 * acc:.1f}%")
    if len(results) == 2:
        print(f"speed-up of Highway-BP against BPTT through the Python loop: {results[1][1] / results[0][1]:.2f}x")
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
