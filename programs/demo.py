"""``python -m hwbptt demo``: one LSTM trained with exact BPTT and with Highway-BP at a
few ``k``, side by side, on a long-sequence task whose loss sits at the last step.

The task (``recall``): step 0 shows one of 4 symbols, the next ``T - 1`` steps show
random distractors now and then, and the network must name the first symbol at the last
step. The gradient has to cross all ``T`` steps; chance is 25% (loss ln 4 = 1.386).
Every run starts from the same weights and sees the same batches. Each step is timed
alone; the gradient cosine to exact BPTT is computed off the clock on a fixed batch.
Prints a table and writes ``loss_vs_time.png`` and ``demo.json`` under ``--out``.
"""

from __future__ import annotations

import copy
import os
import time

import torch

from .common import (
    ArgumentParser,
    RecallTask,
    RunRecord,
    SequenceModel,
    UsageError,
    ensure_out_dir,
    format_table,
    iterations_list,
    nonneg_int,
    plot_curves,
    positive_float,
    positive_int,
    run_cli,
    save_json,
    smooth,
    train,
)

PROG = "python -m hwbptt demo"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--steps", type=positive_int, default=400, help="training steps per run (default 400)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="sequence length T (default 512)")
    p.add_argument("--hidden", type=positive_int, default=32, help="hidden units (default 32)")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument(
        "--iterations", type=iterations_list, default=[0, 1, 3, 10, "auto"],
        help="Highway-BP iterations k, comma-separated; 'auto' picks the fastest mode whose gradient cosine to BPTT is >= 0.99 (default 0,1,3,10,auto)",
    )
    p.add_argument("--cell", choices=("lstm", "gru"), default="lstm", help="recurrent cell (default lstm)")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="Adam learning rate (default 0.01)")
    p.add_argument("--cos-every", type=positive_int, default=50, help="measure the gradient cosine every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--threads", type=nonneg_int, default=1, help="torch CPU threads (default 1: steadier timings on a busy machine; 0: torch's choice)"
    )
    p.add_argument("--out", default=os.path.join("results", "demo"), help="output folder (default results/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _evaluate(model, task, x, y) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
        return float(task.loss(out, y)), float(task.accuracy(out, y))


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = ensure_out_dir(args.out)
    task = RecallTask(args.seq_len)
    torch.manual_seed(args.seed)
    base = SequenceModel(task, args.hidden, cell=args.cell, iterations=None)
    test_x, test_y = task.batch(256, torch.Generator().manual_seed(args.seed + 10_000))
    probe_x, probe_y = task.batch(args.batch, torch.Generator().manual_seed(args.seed + 20_000))

    def probe(m):
        return task.loss(m(probe_x), probe_y)

    methods = [("BPTT (exact)", None)] + [("Highway auto" if k == "auto" else f"Highway k={k}", k) for k in args.iterations]
    print(
        f"demo: {args.cell.upper()} H={args.hidden}, recall task T={args.seq_len} (loss at the last step), "
        f"batch {args.batch}, {args.steps} steps per run, torch threads {torch.get_num_threads()}"
    )
    records: list[RunRecord] = []
    started = time.perf_counter()
    for label, k in methods:
        model = copy.deepcopy(base)
        model.rnn.iterations = k
        g = torch.Generator().manual_seed(args.seed + 1)

        def step_loss(m, step, g=g):
            x, y = task.batch(args.batch, g)
            out = m(x)
            return task.loss(out, y), task.accuracy(out, y)

        rec = RunRecord(label=label, method="bptt" if k is None else "highway", k=k)
        train(
            model,
            step_loss,
            args.steps,
            rec,
            lr=args.lr,
            probe=probe,
            cos_every=args.cos_every,
            progress=not args.no_progress,
        )
        rec.eval["test_loss"], rec.eval["test_acc"] = _evaluate(model, task, test_x, test_y)
        if k == "auto":  # what auto chose at each probe, for the recommendation below
            rec.auto_choices = [(e["step"], e["choice"]) for e in model.rnn.highway_auto.history if "choice" in e]
        records.append(rec)
    total = time.perf_counter() - started

    bptt = records[0]
    header = ["method", "k", "ms/step", "speed-up vs BPTT", "test loss", "test acc", "grad cos (end)", "grad cos (mean)"]
    rows = []
    for r in records:
        speed = bptt.median_step / r.median_step
        cos_end = f"{r.cosine[-1]:.4f}" if r.cosine else "1 (exact)"
        cos_mean = f"{sum(r.cosine) / len(r.cosine):.4f}" if r.cosine else "1 (exact)"
        rows.append(
            [
                "BPTT" if r.k is None else "Highway-BP",
                "exact" if r.k is None else r.k,
                f"{1000 * r.median_step:.1f}",
                f"{speed:.2f}x",
                f"{r.eval['test_loss']:.3f}",
                f"{100 * r.eval['test_acc']:.1f}%",
                cos_end,
                cos_mean,
            ]
        )
    print()
    print(format_table(header, rows))
    print(
        f"(time per step: median over the run, forward+backward+update, measured in this process; "
        f"speed-up = BPTT's / this run's; test set: 256 sequences; chance 25%, loss {task.chance:.3f})"
    )
    chosen = next((r.auto_choices for r in records if r.k == "auto"), None)
    if chosen is not None:
        picks = ", ".join(f"step {s}: {'exact' if c is None else f'k={c}'}" for s, c in chosen)
        print(
            'Not sure which k to use? iterations="auto" takes, at every probe, the fastest mode whose gradient '
            f"cosine to BPTT's is >= 0.99, exact included; in this run it chose {picks or 'nothing yet'}."
        )

    png = plot_curves(
        os.path.join(out_dir, "loss_vs_time.png"),
        [(r.label, r.wall, smooth(r.loss, 10)) for r in records],
        "training wall-clock time (s)",
        "training loss (10-step mean)",
        f"{args.cell.upper()} H={args.hidden}, recall at T={args.seq_len}: loss against time",
        hline=(task.chance, "chance"),
    )
    data = {
        "program": "hwbptt demo",
        "task": {"name": "recall", "seq_len": args.seq_len, "classes": task.classes, "chance_loss": task.chance},
        "config": {k: v for k, v in vars(args).items() if k not in ("no_progress",)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "total_seconds": total,
        "table": {"header": header, "rows": rows},
        "runs": [r.to_json() for r in records],
    }
    js = os.path.join(out_dir, "demo.json")
    save_json(js, data)
    print(f"\nwrote {png}\nwrote {js}\n(total {total:.0f} s)")
    return 0


def _main(argv):
    args = build_parser().parse_args(argv)
    return run(args)


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(_main, argv, PROG)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return int(exc.code or 0)
