"""``python -m hwbptt study``: does Highway-BP train as well as BPTT, and how much sooner?

Three experiments, every number measured in this process on this machine:

1. ``recall`` (loss at the end of a long sequence): exact BPTT, Highway-BP at k = 1, 3, 10,
   FPI (``gamma=1``) at k = 10 and truncated BPTT whose window has the same sequential
   depth as k = 10 (k + 1 steps; on a parallel device each Highway iteration is one
   batched VJP, so k + 1 sequential VJPs either way). Test accuracy, curves, and the
   gradient's cosine to exact BPTT over training (the paper's Figure 6).
2. ``charlm`` (character-level language model on the Python documentation topics, loss at
   every step): validation bits per character against k = 0, 1, 3, 5, 10 and exact, and
   the gradient cosine over training.
3. ``schedule``: the ``tol`` mode and an ``IterationSchedule`` (k from 1 to 10) against
   fixed k on the char LM: wall-clock time to reach BPTT's final training loss.

Writes ``results.md`` (a Markdown summary with the tables), ``results.json`` and PNG
figures under ``OUT/figures``. ``--quick`` runs a small version of everything (CI).
``python -m hwbptt study --out docs`` regenerates the project's docs/results.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time

import torch
from torch.nn import functional as F

from hwbptt import IterationSchedule

from .common import (
    ArgumentParser,
    CharCorpus,
    CharModel,
    RecallTask,
    RunRecord,
    SequenceModel,
    UsageError,
    _finite,
    ensure_out_dir,
    format_table,
    load_corpus,
    nonneg_int,
    plot_curves,
    positive_int,
    run_cli,
    save_json,
    smooth,
    tbptt_loss,
    train,
)

PROG = "python -m hwbptt study"
PARTS = ("recall", "charlm", "schedule", "auto")

FULL = dict(recall_T=512, recall_H=32, recall_steps=500, recall_seeds=3, char_T=256, char_H=128, char_steps=300, batch=32, cos_every=50)
QUICK = dict(recall_T=96, recall_H=16, recall_steps=30, recall_seeds=1, char_T=48, char_H=32, char_steps=12, batch=16, cos_every=10)
# Part 4 (programs/study_auto.py): a divergent GRU (recurrent weights scaled up) and a convergent LSTM.
AUTO_FULL = dict(T=128, hidden=64, batch=32, steps=400, lr=3e-3, clip=1.0, probe_every=50, eval_every=25, cos_every=50, gru_scale=6.0)
AUTO_QUICK = dict(T=32, hidden=24, batch=8, steps=12, lr=3e-3, clip=1.0, probe_every=5, eval_every=4, cos_every=4, gru_scale=6.0)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--quick", action="store_true", help="a small version of every experiment (about a minute)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default all)")
    p.add_argument("--recall-steps", type=positive_int, default=None, help="override the recall experiment's training steps")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds for the recall experiment (default 3; --quick 1)")
    p.add_argument("--char-steps", type=positive_int, default=None, help="override the char LM's training steps")
    p.add_argument("--auto-steps", type=positive_int, default=None, help="override the auto experiment's training steps")
    p.add_argument("--corpus", default=None, help="text file for the char LM (default: the Python documentation topics)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=nonneg_int, default=1, help="torch CPU threads (default 1; 0: torch's choice)")
    p.add_argument("--out", default=os.path.join("results", "study"), help="output folder (default results/study)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", metavar="JSON", default=None, help="only rewrite OUT/results.md from a saved results.json")
    return p


# ----------------------------------------------------------------------------- experiment 1


def recall_experiment(cfg: dict, args, figures: str, progress: bool) -> dict:
    task = RecallTask(cfg["recall_T"])
    steps, B, K = cfg["recall_steps"], cfg["batch"], 10
    torch.manual_seed(args.seed)
    base = SequenceModel(task, cfg["recall_H"], iterations=None)
    test_x, test_y = task.batch(512, torch.Generator().manual_seed(args.seed + 10_000))
    probe_x, probe_y = task.batch(B, torch.Generator().manual_seed(args.seed + 20_000))

    def probe(m):
        return task.loss(m(probe_x), probe_y)

    methods = [
        ("BPTT", "bptt", None, 0.0, None),
        ("Highway k=1", "highway", 1, 0.0, None),
        ("Highway k=3", "highway", 3, 0.0, None),
        (f"Highway k={K}", "highway", K, 0.0, None),
        (f"FPI k={K}", "fpi", K, 1.0, None),
        (f"truncated BPTT, window {K + 1}", "tbptt", None, 0.0, K + 1),
    ]
    seeds = [args.seed + i for i in range(cfg["recall_seeds"])]
    records = []
    accs: dict[str, list[float]] = {m[0]: [] for m in methods}
    for seed in seeds:
        first = seed == seeds[0]
        if not first:  # a fresh initialisation and batch stream; accuracy only
            torch.manual_seed(seed)
            base = SequenceModel(task, cfg["recall_H"], iterations=None)
        for label, method, k, gamma, window in methods:
            model = copy.deepcopy(base)
            model.rnn.iterations, model.rnn.gamma = k, gamma
            g = torch.Generator().manual_seed(seed + 1)

            def step_loss(m, step, g=g, window=window):
                x, y = task.batch(B, g)
                out = tbptt_loss(m, x, window) if window else m(x)
                return task.loss(out, y), task.accuracy(out, y)

            rec = RunRecord(label if first else f"{label} (seed {seed})", method, k)
            use_probe = probe if (first and k is not None) else None
            train(model, step_loss, steps, rec, probe=use_probe, cos_every=cfg["cos_every"], progress=progress)
            with torch.no_grad():
                out = model(test_x)
            rec.eval = {"test_loss": float(task.loss(out, test_y)), "test_acc": float(task.accuracy(out, test_y)), "seed": seed}
            accs[label].append(rec.eval["test_acc"])
            if first:
                records.append(rec)

    bptt = records[0]
    rows = [
        [
            r.label,
            f"{100 * r.eval['test_acc']:.1f}%",
            f"{r.eval['test_loss']:.3f}",
            f"{1000 * r.median_step:.1f}",
            f"{bptt.median_step / r.median_step:.2f}x",
            f"{r.cosine[-1]:.3f}" if r.cosine else "-",
            " / ".join(f"{100 * a:.0f}" for a in accs[r.label]),
            f"{sum(a >= 0.95 for a in accs[r.label])} of {len(seeds)}",
        ]
        for r in records
    ]
    header = [
        "method",
        "test accuracy",
        "test loss",
        "ms/step",
        "speed-up vs BPTT",
        "grad cosine at end",
        f"test accuracy % (seeds {seeds[0]}..{seeds[-1]})",
        "solved (>= 95%)",
    ]
    plot_curves(
        os.path.join(figures, "recall_accuracy.png"),
        [(r.label, r.steps, smooth(r.acc, 25)) for r in records],
        "training step",
        "training accuracy (25-step mean)",
        f"Recall at T={task.seq_len}, loss at the last step (chance 25%)",
        hline=(0.25, "chance"),
        ylim=(0, 1.02),
    )
    plot_curves(
        os.path.join(figures, "recall_loss_vs_time.png"),
        [(r.label, r.wall, smooth(r.loss, 25)) for r in records],
        "training wall-clock time (s)",
        "training loss (25-step mean)",
        f"Recall at T={task.seq_len}: loss against time (this machine, CPU)",
        hline=(task.chance, "chance"),
    )
    cos_runs = [r for r in records if r.cosine]
    plot_curves(
        os.path.join(figures, "recall_cosine.png"),
        [(r.label, r.cos_steps, r.cosine) for r in cos_runs],
        "training step",
        "cosine of the gradient to exact BPTT",
        f"Recall at T={task.seq_len}: gradient cosine over training",
        ylim=(min(0.0, *(min(r.cosine) for r in cos_runs)) if cos_runs else 0.0, 1.02),
    )
    return {
        "config": {"T": task.seq_len, "hidden": cfg["recall_H"], "batch": B, "steps": steps, "k": K, "seeds": seeds},
        "accuracy_by_seed": accs,
        "header": header,
        "rows": rows,
        "runs": [r.to_json() for r in records],
        "figures": ["recall_accuracy.png", "recall_loss_vs_time.png", "recall_cosine.png"],
    }


# ----------------------------------------------------------------------------- experiments 2 and 3


def _bpc(model, corpus: CharCorpus, B: int, seed: int, batches: int = 4) -> float:
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = corpus.batch(B, g, "valid")
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return total / batches / math.log(2)


class CharSetup:
    def __init__(self, cfg: dict, args):
        text, source = load_corpus(args.corpus)
        self.corpus = CharCorpus(text, cfg["char_T"], source)
        self.cfg, self.args = cfg, args
        torch.manual_seed(args.seed)
        self.base = CharModel(self.corpus.vocab, cfg["char_H"], iterations=None)
        px, py = self.corpus.batch(cfg["batch"], torch.Generator().manual_seed(args.seed + 20_000))
        self.probe_batch = (px, py)
        self.cache: dict[str, RunRecord] = {}

    def probe(self, m):
        x, y = self.probe_batch
        logits = m(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def run(self, label: str, k, progress: bool, tol=None, schedule: bool = False, cos: bool = True) -> RunRecord:
        if label in self.cache:
            return self.cache[label]
        cfg, corpus = self.cfg, self.corpus
        model = copy.deepcopy(self.base)
        model.rnn.iterations, model.rnn.tol = k, tol
        if tol is not None:
            model.rnn.diagnostics = True
        g = torch.Generator().manual_seed(self.args.seed + 1)

        def step_loss(m, step):
            x, y = corpus.batch(cfg["batch"], g)
            logits = m(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), None

        on_step = None
        if schedule:
            sched = IterationSchedule(model, start=1, end=10, steps=max(1, cfg["char_steps"] * 2 // 3))
            on_step = lambda step: sched.step()  # noqa: E731
        rec = RunRecord(label, "schedule" if schedule else ("tol" if tol else ("bptt" if k is None else "highway")), k)
        train(
            model,
            step_loss,
            cfg["char_steps"],
            rec,
            lr=3e-3,
            probe=self.probe if (cos and (k is not None or tol is not None)) else None,
            cos_every=cfg["cos_every"],
            on_step=on_step,
            progress=progress,
        )
        rec.eval = {"valid_bpc": _bpc(model, corpus, cfg["batch"], self.args.seed + 30_000)}
        self.cache[label] = rec
        return rec


def charlm_experiment(setup: CharSetup, figures: str, progress: bool) -> dict:
    ks = [0, 1, 3, 5, 10]
    bptt = setup.run("BPTT", None, progress)
    records = [bptt] + [setup.run(f"Highway k={k}", k, progress) for k in ks]
    header = ["k", "validation bits/char", "ms/step", "speed-up vs BPTT", "grad cosine (mean over training)"]
    rows = []
    for r in records:
        mean_cos = f"{sum(r.cosine) / len(r.cosine):.4f}" if r.cosine else "-"
        rows.append(
            [
                "exact (BPTT)" if r.k is None else r.k,
                f"{r.eval['valid_bpc']:.3f}",
                f"{1000 * r.median_step:.1f}",
                f"{bptt.median_step / r.median_step:.2f}x",
                mean_cos,
            ]
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    ax.plot(ks, [r.eval["valid_bpc"] for r in records[1:]], "o-", label="Highway-BP")
    ax.axhline(bptt.eval["valid_bpc"], color="k", linestyle="--", label="exact BPTT")
    ax.set_xlabel("Highway-BP iterations k")
    ax.set_ylabel("validation bits per character")
    ax.set_title(f"Char LM (T={setup.corpus.seq_len}, LSTM H={setup.cfg['char_H']}, {setup.cfg['char_steps']} steps)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(figures, "charlm_bpc_vs_k.png"))
    plt.close(fig)
    cos_runs = [r for r in records if r.cosine]
    plot_curves(
        os.path.join(figures, "charlm_cosine.png"),
        [(r.label, r.cos_steps, r.cosine) for r in cos_runs],
        "training step",
        "cosine of the gradient to exact BPTT",
        "Char LM: gradient cosine over training",
    )
    return {
        "config": {"T": setup.corpus.seq_len, "hidden": setup.cfg["char_H"], "steps": setup.cfg["char_steps"], "corpus": setup.corpus.source},
        "header": header,
        "rows": rows,
        "runs": [r.to_json() for r in records],
        "figures": ["charlm_bpc_vs_k.png", "charlm_cosine.png"],
    }


def _time_to_reach(rec: RunRecord, target: float, window: int) -> float | None:
    sm = smooth(rec.loss, window)
    for t, v in zip(rec.wall, sm):
        if v <= target:
            return t
    return None


def schedule_experiment(setup: CharSetup, figures: str, progress: bool) -> dict:
    bptt = setup.run("BPTT", None, progress)
    runs = [
        bptt,
        setup.run("Highway k=3", 3, progress),
        setup.run("Highway k=10", 10, progress),
        setup.run("tol=0.01 (cap 20)", 20, progress, tol=0.01),
        setup.run("schedule k=1..10", 1, progress, schedule=True),
    ]
    window = max(5, setup.cfg["char_steps"] // 15)
    target = smooth(bptt.loss, window)[-1]
    header = ["method", "time to BPTT's final loss (s)", "total training time (s)", "final loss", "mean k used", "validation bits/char"]
    rows = []
    for r in runs:
        reach = _time_to_reach(r, target, window)
        used = f"{sum(r.iters_used) / len(r.iters_used):.1f}" if r.iters_used else ("exact" if r.k is None else str(r.k) if r.method != "schedule" else "1→10")
        rows.append(
            [
                r.label,
                "not reached" if reach is None else f"{reach:.1f}",
                f"{r.wall[-1]:.1f}",
                f"{smooth(r.loss, window)[-1]:.3f}",
                used,
                f"{r.eval['valid_bpc']:.3f}",
            ]
        )
    plot_curves(
        os.path.join(figures, "schedule_loss_vs_time.png"),
        [(r.label, r.wall, smooth(r.loss, window)) for r in runs],
        "training wall-clock time (s)",
        f"training loss ({window}-step mean)",
        "Char LM: fixed k, tol mode and a k schedule against BPTT",
        hline=(target, "BPTT's final loss"),
    )
    return {
        "target_loss": target,
        "window": window,
        "header": header,
        "rows": rows,
        "runs": [r.to_json() for r in runs if r.label not in ("BPTT", "Highway k=3", "Highway k=10")],
        "figures": ["schedule_loss_vs_time.png"],
    }


# ----------------------------------------------------------------------------- report


def _findings(results: dict) -> list[str]:
    """Plain sentences computed from the numbers of this run."""
    out = []
    if "recall" in results:
        runs = {r["label"]: r for r in results["recall"]["runs"]}
        bptt = results["recall"]["runs"][0]
        b_acc = bptt["eval"]["test_acc"]
        parts = []
        for r in results["recall"]["runs"][1:]:
            acc = r["eval"]["test_acc"]
            verdict = "matches" if abs(acc - b_acc) <= 0.05 else ("beats" if acc > b_acc else "falls short of")
            parts.append(f"{r['label']} {100 * acc:.1f}% ({verdict} BPTT)")
        out.append(f"Recall (loss at the end): BPTT reached {100 * b_acc:.1f}% test accuracy; " + "; ".join(parts) + ".")
        by_seed = results["recall"].get("accuracy_by_seed", {})
        if by_seed and len(next(iter(by_seed.values()))) > 1:
            n = len(next(iter(by_seed.values())))
            out.append(
                f"Over {n} seeds, runs that solved recall (test accuracy >= 95%): "
                + ", ".join(f"{lab} {sum(a >= 0.95 for a in accs)}/{n}" for lab, accs in by_seed.items())
                + "."
            )
        cos = [(lab, sum(r["cosine"]) / len(r["cosine"])) for lab, r in runs.items() if r["cosine"]]
        if cos:
            out.append("Mean gradient cosine to exact over training: " + ", ".join(f"{lab} {c:.3f}" for lab, c in cos) + ".")
    if "charlm" in results:
        runs = results["charlm"]["runs"]
        b = runs[0]["eval"]["valid_bpc"]
        close = [r["k"] for r in runs[1:] if r["eval"]["valid_bpc"] <= b + 0.02]
        out.append(
            f"Char LM: BPTT {b:.3f} bits/char; "
            + ", ".join(f"k={r['k']} {r['eval']['valid_bpc']:.3f}" for r in runs[1:])
            + (f"; the smallest k within 0.02 bits/char of BPTT is {min(close)}." if close else "; no k came within 0.02 bits/char of BPTT.")
        )
    if "schedule" in results:
        rows = results["schedule"]["rows"]
        reached = [(float(r[1]), r[0]) for r in rows[1:] if r[1] != "not reached"]
        if reached:
            t, lab = min(reached)
            out.append(f"Time to BPTT's final char-LM loss: BPTT {rows[0][1]} s; the fastest Highway variant was {lab} ({t:.1f} s).")
        else:
            out.append(f"No Highway variant reached BPTT's final char-LM loss within the run (BPTT: {rows[0][1]} s).")
    speeds = []
    for key in ("recall", "charlm"):
        if key in results:
            base = results[key]["runs"][0]["median_step_s"]
            speeds += [base / r["median_step_s"] for r in results[key]["runs"][1:] if r["method"] in ("highway", "fpi")]
    if speeds:
        out.append(
            f"Speed on this CPU: Highway-BP steps ran at {min(speeds):.2f}x to {max(speeds):.2f}x BPTT's speed "
            "(above 1 is faster); the fused CPU BPTT kernel is hard to beat on 2 cores (design note, section 6)."
        )
    return out


def render_markdown(data: dict) -> str:
    """The Markdown summary of a study's JSON (``results.json``)."""
    results, quick, seconds = data["results"], data.get("quick", False), data.get("seconds", 0.0)
    env = data.get("environment", {})
    machine = env.get("machine", platform.machine())
    cores = env.get("cores", os.cpu_count())
    threads = env.get("threads", torch.get_num_threads())
    lines = [
        "# Study: Highway-BP against BPTT, FPI and truncated BPTT",
        "",
        f"Measured on {machine} CPU, {cores} cores, torch {data.get('torch', torch.__version__)}, "
        f"{threads} torch thread(s), float32; {data.get('processes', 1)} process(es), {seconds / 60:.1f} minutes"
        + (" (**quick mode: small sizes, few steps; the numbers only show the pipeline works**)" if quick else "")
        + ".",
        "",
        *([data["note"], ""] if data.get("note") else []),
        f"Regenerate: `python -m hwbptt study{' --quick' if quick else ''} --out docs` (writes this file, `results.json` and `figures/`).",
        "Time per step is the median over a run of forward + backward + optimiser update; speed-ups",
        "are BPTT's median over this run's, in the same process. Highway-BP's backward on a CPU does",
        "more arithmetic than the fused BPTT kernel (design note, section 6), so speed-ups below 1",
        "are expected here; the paper's speed-ups come from parallel devices. Gradient cosines are",
        "over the recurrent layer's parameters, on a fixed batch, against a copy of the model with",
        "`iterations=None` (exact BPTT).",
        "",
        "## Findings (computed from the numbers below)",
        "",
        *[f"- {line}" for line in _findings(results)],
        "",
    ]
    if "recall" in results:
        r = results["recall"]
        c = r["config"]
        lines += [
            f"## 1. Loss at the end of a long sequence (recall, T={c['T']})",
            "",
            f"LSTM H={c['hidden']}, chrono-initialised gates, batch {c['batch']}, {c['steps']} Adam steps, the same",
            "initial weights and batches for every method. Test set: 512 sequences. FPI is `gamma=1`;",
            f"truncated BPTT keeps the last {c['k'] + 1} steps of the graph (the same sequential depth as k={c['k']}).",
            f"Columns 2-6 and the figures are from seed {c.get('seeds', [0])[0]}; the last two columns repeat the whole",
            "training from fresh initial weights and batches for each seed.",
            "",
            format_table(r["header"], r["rows"], markdown=True),
            "",
            "![recall accuracy](figures/recall_accuracy.png)",
            "![recall loss against time](figures/recall_loss_vs_time.png)",
            "![recall gradient cosine](figures/recall_cosine.png)",
            "",
        ]
    if "charlm" in results:
        r = results["charlm"]
        c = r["config"]
        lines += [
            f"## 2. Character-level language model (T={c['T']}, loss at every step)",
            "",
            f"LSTM H={c['hidden']}, {c['steps']} Adam steps on {c['corpus']}; validation bits per character on",
            "held-out text (the last 10%).",
            "",
            format_table(r["header"], r["rows"], markdown=True),
            "",
            "![bits per character against k](figures/charlm_bpc_vs_k.png)",
            "![char LM gradient cosine](figures/charlm_cosine.png)",
            "",
        ]
    if "schedule" in results:
        r = results["schedule"]
        lines += [
            "## 3. `tol` mode and an iteration schedule against fixed k",
            "",
            f"The char LM of section 2. Target: BPTT's final training loss ({r['target_loss']:.3f}, {r['window']}-step mean);",
            "time is training wall-clock time until the same running mean first reaches it.",
            "",
            format_table(r["header"], r["rows"], markdown=True),
            "",
            "![loss against time](figures/schedule_loss_vs_time.png)",
            "",
        ]
    if "auto" in results:
        from .study_auto import auto_findings

        r = results["auto"]
        c = r["config"]
        lines += [
            "## 4. `iterations=\"auto\"` against fixed k, in a divergent and a convergent regime",
            "",
            f"Char LMs on {c['corpus']} (T={c['T']}, H={c['hidden']}, batch {c['batch']}, {c['steps']} Adam steps, lr "
            f"{c['lr']}, clipping {c['clip']}): a GRU with its recurrent weights scaled x{c['gru_scale']:g} at initialisation",
            "(divergent: the block part is large against the residual) and an LSTM at its default initialisation",
            f"(convergent). auto: `fidelity=0.99`, `probe_every={c['probe_every']}`. Validation loss every {c['eval_every']} steps,",
            f"gradient cosine to BPTT every {c['cos_every']} steps (both off the clock). Probe overhead: the probe steps' time",
            "beyond the median plain step, over the whole training time. The methods of a task train in turn, one",
            "step each in a new seeded order every round (interleaved), so that the machine's slow spells fall on",
            "all of them alike. Probes stop once their iterations cost more than the exact adjoint. Remainder:",
            "`Diagnostics.remainder` over a fixed-k run's steps, the engine's estimate of the rest of the series as a",
            "fraction of the estimate (infinite where the updates stopped shrinking; above 1 the layer warns).",
            "",
            *[f"- {line}" for line in auto_findings(r)],
            "",
            format_table(r["header"], r["rows"], markdown=True),
            "",
            *[f"![{name}](figures/{name})" for name in r["figures"]],
            "",
        ]
    return "\n".join(lines)


def render_only(path: str, out: str) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"results file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read results file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("program") != "hwbptt study" or "results" not in data:
        raise UsageError(f"{path} is not a results.json written by the study")
    md = os.path.join(ensure_out_dir(out), "results.md")
    with open(md, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(data))
    print(f"wrote {md}")
    return 0


def run(args) -> int:
    if args.render:
        return render_only(args.render, args.out)
    parts = [p for p in args.parts.replace(" ", "").split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UsageError(f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    if args.recall_steps:
        cfg["recall_steps"] = args.recall_steps
    if args.char_steps:
        cfg["char_steps"] = args.char_steps
    if args.seeds:
        cfg["recall_seeds"] = args.seeds
    out = ensure_out_dir(args.out)
    figures = ensure_out_dir(os.path.join(out, "figures"))
    progress = not args.no_progress
    setup = CharSetup(cfg, args) if ("charlm" in parts or "schedule" in parts) else None  # fails early on a bad corpus
    started = time.perf_counter()
    results: dict = {}
    print(f"study{' (quick)' if args.quick else ''}: parts {', '.join(parts)}; torch threads {torch.get_num_threads()}")
    if "recall" in parts:
        results["recall"] = recall_experiment(cfg, args, figures, progress)
        print("\nrecall:\n" + format_table(results["recall"]["header"], results["recall"]["rows"]))
    if "charlm" in parts:
        results["charlm"] = charlm_experiment(setup, figures, progress)
        print("\nchar LM:\n" + format_table(results["charlm"]["header"], results["charlm"]["rows"]))
    if "schedule" in parts:
        results["schedule"] = schedule_experiment(setup, figures, progress)
        print("\ntol and schedule:\n" + format_table(results["schedule"]["header"], results["schedule"]["rows"]))
    if "auto" in parts:
        from .study_auto import auto_experiment

        acfg = dict(AUTO_QUICK if args.quick else AUTO_FULL)
        if args.auto_steps:
            acfg["steps"] = args.auto_steps
        results["auto"] = auto_experiment(acfg, args, figures, progress)
        print("\nauto:\n" + format_table(results["auto"]["header"], results["auto"]["rows"]))
    seconds = time.perf_counter() - started
    md = os.path.join(out, "results.md")
    js = os.path.join(out, "results.json")
    data = {
        "program": "hwbptt study",
        "quick": args.quick,
        "config": cfg,
        "seconds": seconds,
        "torch": torch.__version__,
        "environment": {"machine": platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "results": results,
    }
    save_json(js, data)
    with open(md, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(json.loads(json.dumps(_finite(data), default=str))))
    print(f"\nwrote {md}\nwrote {js}\nwrote figures under {figures}\n(total {seconds:.0f} s)")
    return 0


def _main(argv):
    return run(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(_main, argv, PROG)
    except SystemExit as exc:
        return int(exc.code or 0)
