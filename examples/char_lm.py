"""Character-level language model with ``HighwayLSTM``/``HighwayGRU`` (the paper's
character-level task, at CPU scale), reporting bits per character for BPTT and Highway-BP.

Any UTF-8 text file (``--corpus``); by default the Python documentation topics that
ship with the interpreter (``pydoc_data.topics``, about 0.5 MB of English), so it runs
offline. The same model is trained from the same initial weights on the same batches with
exact BPTT and with Highway-BP at each ``k`` in ``--iterations``; validation bits per
character and time per step are printed for each.

    python examples/char_lm.py                          # BPTT and k=5, 300 steps
    python examples/char_lm.py --corpus book.txt --iterations 1,3,10 --steps 2000
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from torch.nn import functional as F

from hwbptt.programs.common import (
    ArgumentParser,
    CharCorpus,
    CharModel,
    RunRecord,
    iterations_list,
    load_corpus,
    positive_float,
    positive_int,
    run_cli,
    train,
)

PROG = "char_lm.py"


def bits_per_char(model, corpus: CharCorpus, batches: int = 4, batch: int = 32, seed: int = 12345) -> float:
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = corpus.batch(batch, g, "valid")
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return total / batches / math.log(2)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: the Python documentation topics)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="characters per training sequence (default 256)")
    p.add_argument("--hidden", type=positive_int, default=128)
    p.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    p.add_argument("--iterations", type=iterations_list, default=["auto"],
                   help="Highway-BP k values, comma-separated, or 'auto' (the fastest faithful mode; default auto)")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    text, source = load_corpus(args.corpus)
    corpus = CharCorpus(text, args.seq_len, source)
    print(f"corpus: {source}, {len(text):,} characters, {corpus.vocab} distinct; sequences of {args.seq_len}")
    torch.manual_seed(args.seed)
    base = CharModel(corpus.vocab, args.hidden, cell=args.cell, iterations=None)
    rows = []
    for k in [None, *args.iterations]:
        model = copy.deepcopy(base)
        model.rnn.iterations = k
        label = "BPTT" if k is None else "Highway auto" if k == "auto" else f"Highway k={k}"
        g = torch.Generator().manual_seed(args.seed + 1)

        def step_loss(m, step, g=g):
            x, y = corpus.batch(args.batch, g)
            logits = m(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), None

        rec = train(model, step_loss, args.steps, RunRecord(label, "char_lm", k), lr=args.lr, progress=not args.no_progress)
        rows.append((label, rec.median_step, bits_per_char(model, corpus)))
    base_step = rows[0][1]
    for label, step, bpc in rows:
        print(f"{label:<14} validation {bpc:.3f} bits/char   {1000 * step:7.1f} ms/step   ({base_step / step:.2f}x BPTT's speed)")
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
