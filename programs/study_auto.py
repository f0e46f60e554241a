"""Study part ``auto``: fixed ``k`` against ``iterations="auto"`` in two regimes.

Two char-level language models on the same text (loss at every step), trained with Adam
and gradient clipping from the same initial weights and batches for every method:

- ``divergent``: a GRU whose recurrent weights are scaled up at initialisation
  (``recurrent_scale``): the block part of each step is large against the update gate's
  residual, the Highway path sum diverges (design note, "When it converges fast").
- ``convergent``: an LSTM at its default initialisation.

Methods: BPTT, fixed k in {1, 3, 10}, and ``"auto"`` (default ``fidelity=0.99``). For each
run: validation loss against training wall-clock time, the gradient cosine to BPTT over
training (off the clock), the mode auto chose at each probe, auto's probing overhead, and
whether a ``HighwayDivergenceWarning`` fired.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from hwbptt import HighwayDivergenceWarning

from .common import CharCorpus, CharModel, format_table, grad_cosine, load_corpus, plot_curves, set_highway

__all__ = ["auto_experiment", "auto_findings"]

METHODS = (("BPTT", None), ("k=1", 1), ("k=3", 3), ("k=10", 10), ("auto", "auto"))


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _valid_loss(model, corpus, B, seed, batches=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sum(float(_loss(model, *corpus.batch(B, g, "valid"))) for _ in range(batches)) / batches


def _train(base, corpus, mode, cfg, seed, label):
    """One method's training, a step per ``next()``; returns its record. ``_task`` runs the
    methods' steps in turn (interleaved), so that the machine's slow spells fall on every
    method alike instead of on whichever ran through them."""
    model = copy.deepcopy(base)
    set_highway(model, iterations=mode, probe_every=cfg["probe_every"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    g = torch.Generator().manual_seed(seed + 1)
    probe_batch = corpus.batch(cfg["batch"], torch.Generator().manual_seed(seed + 20_000))
    rec = {"label": label, "k": mode, "wall": [], "step_s": [], "probe_step": [], "eval_steps": [], "eval_wall": [],
           "valid": [], "cos_steps": [], "cosine": [], "warned": False, "choices": [], "remainders": []}
    elapsed = 0.0
    rnn = model.rnn

    def _step(step: int) -> bool:
        nonlocal elapsed
        if step % cfg["eval_every"] == 0:
            rec["eval_steps"].append(step), rec["eval_wall"].append(elapsed)
            rec["valid"].append(_valid_loss(model, corpus, cfg["batch"], seed + 30_000))
        if mode is not None and step % cfg["cos_every"] == 0:
            saved = rnn.iterations
            if mode == "auto":  # the mode auto uses now, without counting a training step
                rnn.iterations = rnn.highway_auto.choice if rnn.highway_auto.chosen else None
            rec["cos_steps"].append(step)
            rec["cosine"].append(grad_cosine(model, lambda m: _loss(m, *probe_batch)))
            rnn.iterations = saved
        x, y = corpus.batch(cfg["batch"], g)
        probing = mode == "auto" and (not rnn.highway_auto.chosen or step % cfg["probe_every"] == 0)
        t0 = time.perf_counter()
        loss = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        dt = time.perf_counter() - t0
        elapsed += dt
        rec["wall"].append(elapsed), rec["step_s"].append(dt), rec["probe_step"].append(probing)
        if isinstance(mode, int):  # the engine's estimate of how far this step's k stopped from exact
            rests = [d.remainder for d in rnn.last_diagnostics.values() if d.remainder is not None]
            if rests:
                rec["remainders"].append(max(rests))
        return math.isfinite(float(loss))

    for step in range(cfg["steps"]):
        with warnings.catch_warnings(record=True) as caught:  # this step's warnings (a run warns once)
            warnings.simplefilter("always", HighwayDivergenceWarning)
            finite = _step(step)
        rec["warned"] |= any(issubclass(w.category, HighwayDivergenceWarning) for w in caught)
        if not finite:
            break
        yield
    rec["eval_steps"].append(cfg["steps"]), rec["eval_wall"].append(elapsed)
    rec["valid"].append(_valid_loss(model, corpus, cfg["batch"], seed + 30_000))
    rec["final_valid"] = rec["valid"][-1]
    rec["total_s"] = elapsed
    if mode == "auto":
        rec["choices"] = [(e["step"], e["choice"]) for e in rnn.highway_auto.history if "choice" in e]
        rec["history"] = [{k: v for k, v in e.items()} for e in rnn.highway_auto.history]
        plain = [s for s, p in zip(rec["step_s"], rec["probe_step"]) if not p]
        probes = [s for s, p in zip(rec["step_s"], rec["probe_step"]) if p]
        typical = statistics.median(plain) if plain else 0.0
        rec["probe_overhead"] = max(0.0, sum(probes) - typical * len(probes)) / max(elapsed, 1e-12)
    return rec


def _interleaved(runs: list, steps: int, desc: str, progress: bool) -> list[dict]:
    """Step every generator of ``_train`` in turn until each returns its record, in a new
    (seeded) order each round, so that every method follows every other about equally
    often: a method's place in the round cannot favour or penalise it."""
    from tqdm.auto import tqdm

    records: list = [None] * len(runs)
    order, shuffle = list(range(len(runs))), random.Random(0).shuffle
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        while any(r is None for r in records):
            shuffle(order)
            for i in order:
                run = runs[i]
                if records[i] is None:
                    try:
                        next(run)
                    except StopIteration as done:
                        records[i] = done.value
            bar.update(1)
    return records


def _remainders(run) -> str:
    """``Diagnostics.remainder`` over a fixed-k run's steps (the largest over directions at each step)."""
    r = run.get("remainders")
    return f"{statistics.median(r):.2g} / {max(r):.2g}" if r else "-"


def _task(name, cell, scale, corpus, cfg, seed, progress):
    torch.manual_seed(seed)
    base = CharModel(corpus.vocab, cfg["hidden"], cell=cell, iterations=None)
    with torch.no_grad():
        base.rnn.weight_hh_l0.mul_(scale)
    runs = _interleaved([_train(base, corpus, mode, cfg, seed, f"{name}: {label}") for label, mode in METHODS],
                        cfg["steps"], name, progress)
    return {"name": name, "cell": cell, "recurrent_scale": scale, "runs": runs}


def auto_experiment(cfg: dict, args, figures: str, progress: bool) -> dict:
    text, source = load_corpus(args.corpus)
    corpus = CharCorpus(text, cfg["T"], source)
    tasks = [
        _task("divergent", "gru", cfg["gru_scale"], corpus, cfg, args.seed, progress),
        _task("convergent", "lstm", 1.0, corpus, cfg, args.seed, progress),
    ]
    header = ["task", "method", "final validation loss", "vs BPTT", "training time (s)", "min grad cosine",
              "divergence warning", "remainder (median / max)", "auto's choices (step: k)", "probe overhead"]
    rows = []
    for task in tasks:
        bptt = task["runs"][0]
        for r in task["runs"]:
            choices = ", ".join(f"{s}: {'exact' if c is None else c}" for s, c in r["choices"]) if r["choices"] else "-"
            rows.append([
                task["name"], r["label"].split(": ")[1], f"{r['final_valid']:.4f}",
                f"{100 * (r['final_valid'] / bptt['final_valid'] - 1):+.2f}%", f"{r['total_s']:.1f}",
                f"{min(r['cosine']):.3f}" if r["cosine"] else "-", "yes" if r["warned"] else "no", _remainders(r), choices,
                f"{100 * r['probe_overhead']:.1f}%" if "probe_overhead" in r else "-",
            ])
        plot_curves(
            f"{figures}/auto_{task['name']}_valid_vs_time.png",
            [(r["label"].split(": ")[1], r["eval_wall"], r["valid"]) for r in task["runs"]],
            "training wall-clock time (s)", "validation loss (nats/char)",
            f"{task['name']} ({task['cell'].upper()}, recurrent weights x{task['recurrent_scale']:g}): validation loss",
        )
        cos_runs = [r for r in task["runs"] if r["cosine"]]
        plot_curves(
            f"{figures}/auto_{task['name']}_cosine.png",
            [(r["label"].split(": ")[1], r["cos_steps"], r["cosine"]) for r in cos_runs],
            "training step", "cosine of the gradient to BPTT",
            f"{task['name']}: gradient cosine over training (auto: the mode in use)",
        )
        auto = task["runs"][-1]
        ks = [(-1 if c is None else c) for _, c in auto["choices"]]
        plot_curves(
            f"{figures}/auto_{task['name']}_choice.png",
            [("auto's choice (-1 = exact)", [s for s, _ in auto["choices"]], ks)],
            "training step", "k chosen (-1: exact)", f"{task['name']}: the mode auto chose at each probe",
        )
    return {
        "config": dict(cfg, corpus=corpus.source),
        "header": header,
        "rows": rows,
        "tasks": tasks,
        "figures": [f"auto_{t['name']}_{what}.png" for t in tasks for what in ("valid_vs_time", "cosine", "choice")],
    }


def auto_findings(result: dict, fidelity: float = 0.99) -> list[str]:
    """The issue's targets, checked on this run's numbers."""
    out = []
    for task in result["tasks"]:
        runs = {r["label"].split(": ")[1]: r for r in task["runs"]}
        bptt, auto = runs["BPTT"], runs["auto"]
        gap = auto["final_valid"] / bptt["final_valid"] - 1
        faithful = [r for name, r in runs.items() if name not in ("auto",) and (not r["cosine"] or min(r["cosine"]) >= fidelity)]
        fastest = min(faithful, key=lambda r: r["total_s"])
        slower = auto["total_s"] / fastest["total_s"] - 1
        wrong = [n for n, r in runs.items() if n.startswith("k=") and (r["final_valid"] / bptt["final_valid"] - 1 > 0.02
                                                                     or (r["cosine"] and min(r["cosine"]) < fidelity))]
        warned = [n for n, r in runs.items() if r["warned"]]
        out.append(
            f"{task['name']} ({task['cell'].upper()}): auto's final validation loss is {100 * gap:+.2f}% from BPTT's "
            f"(target within 2%: {'met' if abs(gap) <= 0.02 else 'missed'}); its training time is {100 * slower:+.1f}% "
            f"against the fastest faithful fixed mode ({fastest['label'].split(': ')[1]}, target within 5%: "
            f"{'met' if slower <= 0.05 else 'missed'}); probing overhead {100 * auto['probe_overhead']:.1f}% "
            f"(target <= 5%: {'met' if auto['probe_overhead'] <= 0.05 else 'missed'}). Fixed-k runs that went wrong "
            f"(validation loss > 2% above BPTT's or a cosine below {fidelity}): {', '.join(wrong) or 'none'}; "
            f"runs that warned: {', '.join(warned) or 'none'}."
        )
    return out
