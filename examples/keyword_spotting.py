"""Keyword spotting: log-mel frames of a spoken word into a GRU trained with Highway-BP.

Each clip (one second at 16 kHz) becomes a sequence of log-mel frames with a short hop
(default 10 ms: 101 frames); a ``HighwayGRU`` reads them and the word is classified at the
last frame only, so the gradient has to travel back through the whole clip.

Data, offline:

- default: a small spoken-word set this script synthesises with ``espeak-ng`` (several
  voices, speeds and pitches; background noise added during training), cached on disk
  (``--cache``). Install the synthesiser with ``apt-get install espeak-ng``.
- real speech: ``--speech-commands ROOT``, a local copy of Google Speech Commands
  (``ROOT/SpeechCommands/speech_commands_v0.02/...``, as torchaudio lays it out); read
  with ``torchaudio.datasets.SPEECHCOMMANDS(ROOT, download=False)`` for the file list and
  ``soundfile`` for the audio.

    python examples/keyword_spotting.py                       # synthetic words, k=5
    python examples/keyword_spotting.py --iterations exact    # the same with BPTT
    python examples/keyword_spotting.py --speech-commands ~/data --steps 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from hwbptt.programs.common import (
    ArgumentParser,
    RunRecord,
    UsageError,
    positive_float,
    positive_int,
    run_cli,
    train,
)

PROG = "keyword_spotting.py"
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("", "+m3", "+f2", "+f4", "+klatt")
SPEEDS = (120, 150, 180, 210)
PITCHES = (25, 50, 75)
RATE = 16_000


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


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hwbptt", "spoken_words")


# ----------------------------------------------------------------------------- audio


def _read_wav(path: str) -> torch.Tensor:
    import soundfile as sf

    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:  # soundfile raises LibsndfileError (a RuntimeError)
        raise UsageError(f"cannot read audio file {path}: {str(exc).splitlines()[0]}") from None
    wave = torch.from_numpy(data.mean(axis=1))
    if rate != RATE:
        import torchaudio.functional as AF

        wave = AF.resample(wave, rate, RATE)
    return _fit(wave)


def _fit(wave: torch.Tensor, seconds: float = 1.0) -> torch.Tensor:
    """Centre the clip in a window of ``seconds`` (pad or crop)."""
    n = int(RATE * seconds)
    if wave.numel() >= n:
        start = (wave.numel() - n) // 2
        return wave[start : start + n]
    out = torch.zeros(n)
    start = (n - wave.numel()) // 2
    out[start : start + wave.numel()] = wave
    return out


def synthesise(cache: str, words=WORDS, progress: bool = True, per_word: int | None = None) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Speak every word in every voice, variant, speed and pitch (a subset: one pitch
    per (voice, variant, speed), cycled) with ``espeak-ng``; WAVs cached in ``cache``
    (a complete cache needs no synthesiser).
    Returns waves, labels and a speaker-style id (voice×variant) for a held-out split."""
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the cache folder {cache}: {exc.strerror or exc}") from None
    from tqdm.auto import tqdm

    jobs = []
    for vi, voice in enumerate(VOICES):
        for ri, variant in enumerate(VARIANTS):
            for si, speed in enumerate(SPEEDS):
                pitch = PITCHES[(vi + ri + si) % len(PITCHES)]
                for wi, word in enumerate(words):
                    name = f"{word}_{voice}{variant.replace('+', '_')}_s{speed}_p{pitch}.wav"
                    jobs.append((os.path.join(cache, name), voice + variant, speed, pitch, word, wi, vi * len(VARIANTS) + ri))
    if per_word is not None:  # an even spread over the voices and variants
        per = len(jobs) // len(words)
        keep = {round(i * per / per_word) for i in range(min(per_word, per))}
        jobs = [j for n, j in enumerate(jobs) if (n // len(words)) in keep]
    if shutil.which("espeak-ng") is None and not all(os.path.exists(job[0]) for job in jobs):
        raise UsageError(
            "espeak-ng is not installed: install it (apt-get install espeak-ng) to synthesise the spoken words, "
            "or point --speech-commands at a local copy of Speech Commands"
        )
    waves, labels, groups = [], [], []
    for path, voice, speed, pitch, word, wi, group in tqdm(jobs, desc="spoken words", unit="clip", disable=not progress):
        if not os.path.exists(path):
            tmp = path + ".tmp.wav"
            cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp, word]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not os.path.exists(tmp):
                raise UsageError(f"espeak-ng failed for voice {voice}: {(done.stderr or 'no output').strip().splitlines()[0]}")
            os.replace(tmp, path)
        waves.append(_read_wav(path))
        labels.append(wi)
        groups.append(group)
    return waves, labels, groups


def load_speech_commands(root: str, words=WORDS, limit: int = 400) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Up to ``limit`` clips per word from a local Speech Commands copy."""
    if not os.path.isdir(root):
        raise UsageError(f"Speech Commands folder not found: {root}")
    from torchaudio.datasets import SPEECHCOMMANDS

    try:
        ds = SPEECHCOMMANDS(root, download=False)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise UsageError(f"no Speech Commands data under {root}: {str(exc).splitlines()[0]}") from None
    counts = {w: 0 for w in words}
    waves, labels, groups = [], [], []
    speakers: dict[str, int] = {}
    for n in range(len(ds)):
        relpath, _, label, speaker, _ = ds.get_metadata(n)
        if label not in counts or counts[label] >= limit:
            continue
        counts[label] += 1
        waves.append(_read_wav(os.path.join(ds._archive, relpath)))
        labels.append(words.index(label))
        groups.append(speakers.setdefault(speaker, len(speakers)))
    if not waves:
        raise UsageError(f"no clips of the words {', '.join(words)} under {root}")
    return waves, labels, groups


class Features(nn.Module):
    """Log-mel (or MFCC) frames, normalised per coefficient."""

    def __init__(self, kind: str, hop_ms: float, n_mels: int = 40):
        super().__init__()
        import torchaudio.transforms as AT

        hop = max(1, int(RATE * hop_ms / 1000))
        if kind == "mfcc":
            self.tf = AT.MFCC(RATE, n_mfcc=n_mels // 2, melkwargs={"n_fft": 512, "hop_length": hop, "n_mels": n_mels})
            self.dim = n_mels // 2
        else:
            self.tf = AT.MelSpectrogram(RATE, n_fft=512, hop_length=hop, n_mels=n_mels)
            self.dim = n_mels
        self.kind = kind

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (B, N) -> (T, B, F)
        feats = self.tf(wave)
        if self.kind != "mfcc":
            feats = torch.log(feats + 1e-6)
        feats = (feats - feats.mean(dim=(0, 2), keepdim=True)) / (feats.std(dim=(0, 2), keepdim=True) + 1e-5)
        return feats.permute(2, 0, 1).contiguous()


class KeywordNet(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int, iterations):
        super().__init__()
        from hwbptt.torch import HighwayGRU

        self.rnn = HighwayGRU(features, hidden, iterations=iterations)
        self.head = nn.Linear(hidden, classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(feats)
        return self.head(y[-1])


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--speech-commands", metavar="ROOT", help="local Speech Commands root (default: synthesise words with espeak-ng)")
    p.add_argument("--cache", default=None, help="where synthesised clips are kept (default ~/.cache/hwbptt/spoken_words)")
    p.add_argument("--words", type=positive_int, default=len(WORDS), help=f"how many of the {len(WORDS)} words to use (default all)")
    p.add_argument(
        "--clips-per-word", type=positive_int, default=None, help="synthesise only this many clips per word (default all 100)"
    )
    p.add_argument("--features", choices=("mel", "mfcc"), default="mel", help="log-mel (default) or MFCC frames")
    p.add_argument("--hop-ms", type=positive_float, default=10.0, help="frame hop in ms (default 10: 101 frames per clip)")
    p.add_argument("--hidden", type=positive_int, default=64, help="GRU hidden units (default 64)")
    p.add_argument("--iterations", type=iterations_arg, default=5, help="Highway-BP iterations, or 'exact' for BPTT (default 5)")
    p.add_argument("--steps", type=positive_int, default=600, help="training steps (default 600)")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="Adam learning rate (default 0.003)")
    p.add_argument("--noise", type=float, default=0.02, help="std of the white noise added to training clips (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    if args.words > len(WORDS):
        raise UsageError(f"--words must be at most {len(WORDS)}, got {args.words}")
    if args.noise < 0:
        raise UsageError(f"--noise must be >= 0, got {args.noise}")
    words = WORDS[: args.words]
    progress = not args.no_progress
    if args.speech_commands:
        waves, labels, groups = load_speech_commands(args.speech_commands, words)
        source = f"Speech Commands at {args.speech_commands}"
    else:
        waves, labels, groups = synthesise(args.cache or default_cache(), words, progress, args.clips_per_word)
        source = "espeak-ng synthetic words"
    wave = torch.stack(waves)
    label = torch.tensor(labels)
    group = torch.tensor(groups)
    # hold out every 5th voice/speaker for testing
    test = group % 5 == 4
    if test.all() or (~test).all():
        test = torch.arange(len(label)) % 5 == 4
    feats = Features(args.features, args.hop_ms)
    train_w, train_y = wave[~test], label[~test]
    with torch.no_grad():
        test_x, test_y = feats(wave[test]), label[test]
    T = test_x.shape[0]
    print(
        f"{source}: {len(label)} clips of {len(words)} words ({int((~test).sum())} train, {int(test.sum())} test); "
        f"{T} {args.features} frames per clip; loss at the last frame; "
        f"{'BPTT' if args.iterations is None else f'Highway-BP k={args.iterations}'}"
    )
    torch.manual_seed(args.seed)
    model = KeywordNet(feats.dim, args.hidden, len(words), args.iterations)
    g = torch.Generator().manual_seed(args.seed + 1)

    def step_loss(m, step):
        idx = torch.randint(0, len(train_y), (args.batch,), generator=g)
        w = train_w[idx]
        gain = torch.exp(torch.randn(args.batch, 1, generator=g) * 0.3)
        w = w * gain + args.noise * torch.randn(w.shape, generator=g)
        shift = int(torch.randint(-1600, 1601, (1,), generator=g))
        w = torch.roll(w, shift, dims=1)
        with torch.no_grad():
            x = feats(w)
        out = m(x)
        y = train_y[idx]
        return F.cross_entropy(out, y), float((out.detach().argmax(-1) == y).float().mean())

    label_run = "BPTT" if args.iterations is None else f"Highway k={args.iterations}"
    rec = train(model, step_loss, args.steps, RunRecord(label_run, "kws", args.iterations), lr=args.lr, progress=progress)
    with torch.no_grad():
        out = model(test_x)
        acc = float((out.argmax(-1) == test_y).float().mean())
        loss = float(F.cross_entropy(out, test_y))
    print(
        f"{label_run}: {1000 * rec.median_step:.0f} ms/step, {rec.wall[-1]:.0f} s of training; held-out voices: "
        f"loss {loss:.3f}, accuracy {100 * acc:.1f}% (chance {100 / len(words):.0f}%)"
    )
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
