"""Shared helpers of the programs (demo, study) and the examples.

- command-line plumbing: an ``ArgumentParser`` whose errors are one line, argument types
  that reject nonsense (zero steps, negative k), and ``run_cli`` that turns expected
  failures (bad input, missing data, missing tools) into a one-line message and exit 2;
- the long-range tasks (recall, adding problem, copy memory), generated from a seed, so
  nothing is downloaded;
- the character corpus for the char-level language model (the Python documentation
  topics that ship with the interpreter, or any text file);
- models (an LSTM/GRU sequence model built on ``HighwayLSTM``/``HighwayGRU``), a timed
  training loop with a tqdm bar, the gradient cosine to exact BPTT, and plotting.

The programs layer imports the adapters and the core, never the other way round.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "UsageError",
    "ArgumentParser",
    "run_cli",
    "positive_int",
    "nonneg_int",
    "positive_float",
    "iterations_list",
    "Task",
    "RecallTask",
    "AddingTask",
    "CopyTask",
    "make_task",
    "load_corpus",
    "CharCorpus",
    "SequenceModel",
    "CharModel",
    "chrono_init",
    "set_highway",
    "grad_cosine",
    "RunRecord",
    "train",
    "tbptt_loss",
    "format_table",
    "save_json",
    "plot_curves",
    "ensure_out_dir",
]


# ----------------------------------------------------------------------------- CLI plumbing


class UsageError(Exception):
    """An expected failure caused by the user's input: printed as one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with a one-line error: ``prog: error: message`` and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def iterations_list(text: str) -> list:
    """``"1,3,10,auto"`` (or one value) -> ``[1, 3, 10, "auto"]``; each an integer >= 0 or ``auto``."""
    values: list = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if part == "auto":
            values.append("auto")
            continue
        try:
            k = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"iterations must be integers >= 0, got {part!r}") from None
        if k < 0:
            raise argparse.ArgumentTypeError(f"iterations must be integers >= 0, got {k}")
        values.append(k)
    if not values:
        raise argparse.ArgumentTypeError("give at least one number of iterations, e.g. 1,3,10")
    return values


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None, prog: str) -> int:
    """Run ``main(argv)``; expected failures become ``prog: error: ...`` and exit 2."""
    try:
        return int(main(argv) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        print(f"{prog}: error: {_oserror_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _oserror_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror or exc}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def ensure_out_dir(path: str) -> str:
    """Create ``path`` (and parents); a clear error when that is impossible."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"the output folder {path} is not writable")
    return path


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """A long-sequence task with its loss at the end. ``batch(B, g)`` returns ``(x, y)``
    with ``x`` of shape (T, B, inputs); ``loss(out, y)`` takes the model's outputs at the
    last ``n_out`` steps, (n_out, B, outputs)."""

    name: str
    seq_len: int
    inputs: int
    outputs: int
    n_out: int = 1
    classify: bool = True
    chance: float = 0.0  # chance-level loss, to read the curves against

    def batch(self, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classify:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out.squeeze(-1), y)

    def accuracy(self, out: torch.Tensor, y: torch.Tensor) -> float | None:
        if not self.classify:
            return None
        return float((out.detach().argmax(-1) == y).float().mean())


class RecallTask(Task):
    """Recall the class shown at the first step after ``T - 1`` steps of distractors.

    Step 0 shows one of ``classes`` symbols (one-hot); every later step shows, with
    probability ``p``, one of ``distractors`` other symbols. The label is read at the
    last step only: the gradient must cross all ``T`` steps. Chance: ``1/classes``.
    """

    def __init__(self, seq_len: int, classes: int = 4, distractors: int = 4, p: float = 0.1):
        super().__init__("recall", seq_len, classes + distractors, classes, 1, True, math.log(classes))
        self.classes, self.distractors, self.p = classes, distractors, p

    def batch(self, batch_size, g):
        T, C, D = self.seq_len, self.classes, self.distractors
        label = torch.randint(0, C, (batch_size,), generator=g)
        x = torch.zeros(T, batch_size, C + D)
        x[0, torch.arange(batch_size), label] = 1.0
        shown = torch.rand(T, batch_size, generator=g) < self.p
        shown[0] = False
        sym = torch.randint(0, D, (T, batch_size), generator=g)
        x[..., C:] = F.one_hot(sym, D).float() * shown[..., None]
        return x, label[None]


class AddingTask(Task):
    """The adding problem (Hochreiter & Schmidhuber 1997): values in [0, 1) and two
    markers, one in each half; predict the sum of the two marked values at the last step.
    Predicting the mean (1.0) gives MSE 1/6 ≈ 0.167: the chance level."""

    def __init__(self, seq_len: int):
        super().__init__("adding", seq_len, 2, 1, 1, False, 1.0 / 6.0)

    def batch(self, batch_size, g):
        T = self.seq_len
        v = torch.rand(T, batch_size, generator=g)
        m = torch.zeros(T, batch_size)
        half = max(1, T // 2)
        i = torch.randint(0, half, (batch_size,), generator=g)
        j = torch.randint(half, T, (batch_size,), generator=g) if T > 1 else i
        cols = torch.arange(batch_size)
        m[i, cols] = 1.0
        m[j, cols] = 1.0
        return torch.stack([v, m], -1), (v * m).sum(0)[None]


class CopyTask(Task):
    """Copy memory (Arjovsky et al. 2016): ``n`` symbols out of ``symbols``, ``T`` blanks
    with a delimiter at the end, then reproduce the ``n`` symbols. The loss is on the last
    ``n`` steps only. Chance: ``log(symbols)`` per symbol."""

    def __init__(self, seq_len: int, symbols: int = 8, n: int = 10):
        # inputs: symbols, blank, delimiter
        super().__init__("copy", seq_len + 2 * n, symbols + 2, symbols, n, True, math.log(symbols))
        self.symbols, self.n, self.delay = symbols, n, seq_len

    def batch(self, batch_size, g):
        S, n = self.symbols, self.n
        seq = torch.randint(0, S, (n, batch_size), generator=g)
        T = self.seq_len
        codes = torch.full((T, batch_size), S, dtype=torch.long)  # blank
        codes[:n] = seq
        codes[n + self.delay - 1] = S + 1  # delimiter: "now recall"
        return F.one_hot(codes, S + 2).float(), seq


TASKS = {"recall": RecallTask, "adding": AddingTask, "copy": CopyTask}


def make_task(name: str, seq_len: int) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](seq_len)


# ----------------------------------------------------------------------------- char corpus


def load_corpus(path: str | None) -> tuple[str, str]:
    """The text and a description of where it came from. ``None``: the Python
    documentation topics that ship with the interpreter (``pydoc_data.topics``)."""
    if path is None:
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise UsageError(
                "this Python has no pydoc_data (the bundled documentation topics); pass a text file with --corpus"
            ) from None
        return "".join(topics[key] for key in sorted(topics)), "the Python documentation topics (pydoc_data.topics)"
    if not os.path.exists(path):
        raise UsageError(f"corpus file not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"corpus path is a folder, not a text file: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise UsageError(f"corpus file is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    return text, path


class CharCorpus:
    """Characters as integer ids, split 90/10 into training and validation text."""

    def __init__(self, text: str, seq_len: int, source: str = "text"):
        if not text.strip():
            raise UsageError(f"the corpus is empty: {source}")
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        split = int(len(data) * 0.9)
        self.train, self.valid = data[:split], data[split:]
        self.seq_len, self.source = seq_len, source
        need = seq_len + 1
        if len(self.train) < need or len(self.valid) < need:
            raise UsageError(
                f"the corpus ({len(text)} characters, {source}) is shorter than one sequence: "
                f"need at least {need} characters in each of the 90%/10% training/validation parts; "
                "use a longer text or a smaller --seq-len"
            )

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(self, batch_size: int, g: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.valid
        start = torch.randint(0, len(data) - self.seq_len - 1, (batch_size,), generator=g)
        idx = start[None, :] + torch.arange(self.seq_len + 1)[:, None]
        chunk = data[idx]  # (T+1, B)
        return chunk[:-1], chunk[1:]


# ----------------------------------------------------------------------------- models


def _rnn_class(cell: str):
    from hwbptt.torch import HighwayGRU, HighwayLSTM

    if cell == "lstm":
        return HighwayLSTM
    if cell == "gru":
        return HighwayGRU
    raise UsageError(f"unknown cell {cell!r}; choose lstm or gru")


def chrono_init(rnn: nn.Module, max_len: int, seed: int = 0) -> None:
    """Chrono initialisation (Tallec & Ollivier 2018) of an ``nn.LSTM``/``nn.GRU``:
    gate biases that give each unit a memory time scale between 1 and ``max_len`` steps,
    the standard way to make gated RNNs trainable on long dependencies from the start."""
    g = torch.Generator().manual_seed(seed)
    H = rnn.hidden_size
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            b_ih = getattr(rnn, f"bias_ih_l{layer}", None)
            b_hh = getattr(rnn, f"bias_hh_l{layer}", None)
            if b_ih is None:
                continue
            scale = torch.log(torch.rand(H, generator=g) * max(max_len - 2, 1) + 1)
            b_ih.zero_()
            b_hh.zero_()
            if isinstance(rnn, nn.LSTM):  # gates i, f, g, o
                b_ih[H : 2 * H] = scale
                b_ih[:H] = -scale
            else:  # GRU gates r, z, n: z carries h_{t-1}
                b_ih[H : 2 * H] = scale


class SequenceModel(nn.Module):
    """One ``HighwayLSTM``/``HighwayGRU`` layer and a linear read-out of the last
    ``n_out`` steps."""

    def __init__(self, task: Task, hidden: int, cell: str = "lstm", chrono: bool = True, **options: Any):
        super().__init__()
        self.rnn = _rnn_class(cell)(task.inputs, hidden, **options)
        if chrono:
            chrono_init(self.rnn, task.seq_len)
        self.head = nn.Linear(hidden, task.outputs)
        self.n_out = task.n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[-self.n_out :])


class CharModel(nn.Module):
    """Embedding, one ``HighwayLSTM``/``HighwayGRU`` layer, linear read-out at every step."""

    def __init__(self, vocab: int, hidden: int, cell: str = "lstm", embed: int = 32, **options: Any):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = _rnn_class(cell)(embed, hidden, **options)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.embed(x))
        return self.head(y)


def set_highway(model: nn.Module, **options: Any) -> None:
    """Set Highway options (``iterations``, ``tol``, ``gamma``, ...) on every Highway layer."""
    for m in model.modules():
        if hasattr(m, "highway_options"):
            for name, value in options.items():
                setattr(m, name, value)


def _recurrent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the Highway layers (all parameters when there is none)."""
    params = [p for m in model.modules() if hasattr(m, "highway_options") for p in m.parameters()]
    return params or list(model.parameters())


def grad_cosine(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> float:
    """Cosine between the gradient of the recurrent layers' parameters (with the model's
    current Highway options) and the exact BPTT gradient of a copy (``iterations=None``),
    on the same loss. Read-outs and embeddings are left out: the gradient reaching them
    is the same in both (it does not cross the recurrence) and would inflate the cosine.
    Leaves the model's ``.grad`` untouched."""
    saved = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    exact = copy.deepcopy(model)
    set_highway(exact, iterations=None, tol=None)
    # iterations="auto": measure the mode in use, without counting a training step
    autos = [m for m in model.modules() if getattr(m, "iterations", None) == "auto"]
    for m in autos:
        m.iterations = m.highway_auto.choice if m.highway_auto.chosen else None
    grads = []
    for m in (model, exact):
        m.zero_grad(set_to_none=True)
        loss_fn(m).backward()
        grads.append(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in _recurrent_parameters(m)])
        )
    for m in autos:
        m.iterations = "auto"
    for p, g in zip(model.parameters(), saved):
        p.grad = g
    a, b = grads
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


# ----------------------------------------------------------------------------- training


@dataclass
class RunRecord:
    """What one training run measured (all in this process)."""

    label: str
    method: str
    k: int | None
    steps: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # cumulative training seconds (no evaluation)
    loss: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)  # seconds per optimisation step
    cos_steps: list[int] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    iters_used: list[float] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    auto_choices: list[tuple[int, int | None]] = field(default_factory=list)  # iterations="auto": (step, k; None exact)

    @property
    def median_step(self) -> float:
        # skip the first step (allocations, first-call overheads) when there are others
        times = self.step_time[1:] if len(self.step_time) > 1 else self.step_time
        return statistics.median(times) if times else float("nan")

    def tail(self, values: Sequence[float], n: int = 20) -> float:
        vals = [v for v in values[-n:] if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    def to_json(self) -> dict:
        d = asdict(self)
        d["median_step_s"] = self.median_step
        return d


def train(
    model: nn.Module,
    step_loss: Callable[[nn.Module, int], tuple[torch.Tensor, float | None]],
    steps: int,
    record: RunRecord,
    lr: float = 1e-2,
    clip: float = 1.0,
    probe: Callable[[nn.Module], torch.Tensor] | None = None,
    cos_every: int = 0,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    stop: Callable[[RunRecord], bool] | None = None,
) -> RunRecord:
    """Adam with gradient clipping for ``steps`` steps, one tqdm bar. Each step's
    forward+backward+update is timed alone; the gradient cosine to exact on the ``probe``
    loss (every ``cos_every`` steps, and at the end) and the diagnostics run off the clock."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    highway = [m for m in model.modules() if hasattr(m, "highway_options")]
    elapsed = 0.0
    bar = tqdm(range(steps), desc=record.label, unit="step", disable=not progress, leave=True, dynamic_ncols=True)
    for step in bar:
        if probe is not None and cos_every and step % cos_every == 0 and record.k is not None:
            record.cos_steps.append(step)
            record.cosine.append(grad_cosine(model, probe))
        t0 = time.perf_counter()
        loss, acc = step_loss(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        dt = time.perf_counter() - t0
        elapsed += dt
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            raise UsageError(f"{record.label}: the loss became {value} at step {step}; try a smaller learning rate")
        record.steps.append(step + 1)
        record.wall.append(elapsed)
        record.loss.append(value)
        record.acc.append(acc if acc is not None else float("nan"))
        record.step_time.append(dt)
        for m in highway:
            diag = getattr(m, "last_diagnostics", None)
            if isinstance(diag, dict) and diag:
                record.iters_used.append(statistics.mean(d.iterations for d in diag.values()))
            elif diag is not None and hasattr(diag, "iterations"):
                record.iters_used.append(diag.iterations)
        if on_step is not None:
            on_step(step)
        post = {"loss": f"{record.tail(record.loss, 20):.3f}"}
        if acc is not None:
            post["acc"] = f"{record.tail(record.acc, 20):.2f}"
        bar.set_postfix(post, refresh=False)
        if stop is not None and stop(record):
            break
    bar.close()
    if probe is not None and record.k is not None:
        record.cos_steps.append(record.steps[-1] if record.steps else 0)
        record.cosine.append(grad_cosine(model, probe))
    return record


def tbptt_loss(model: SequenceModel, x: torch.Tensor, window: int) -> torch.Tensor:
    """Outputs of ``model`` with the gradient truncated to the last ``window`` steps:
    the first ``T - window`` steps run without a graph, their final state is detached."""
    T = x.shape[0]
    window = max(1, min(window, T))
    state = None
    if window < T:
        with torch.no_grad():
            _, state = model.rnn(x[: T - window])
    y, _ = model.rnn(x[T - window :], state)
    return model.head(y[-model.n_out :])


# ----------------------------------------------------------------------------- reporting


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], markdown: bool = False) -> str:
    rows = [[str(c) for c in r] for r in rows]
    header = [str(h) for h in header]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def _finite(obj: Any) -> Any:
    """NaN and infinities become ``null``: strict JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "to_json"):
        return _finite(obj.to_json())
    return obj


def save_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_finite(data), fh, indent=1, default=_json_default, allow_nan=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "to_json"):
        return obj.to_json()
    return str(obj)


def smooth(values: Sequence[float], n: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_curves(
    path: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    hline: tuple[float, str] | None = None,
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
) -> str:
    """One PNG with a line per (label, xs, ys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, linewidth=1.4)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", linewidth=1, label=hline[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
