"""``python -m hwbptt {demo,bench,study,gpucheck} [options]``.

Each subcommand lives in a module of its own with a ``main(argv) -> int``; this file only
dispatches, so a program's imports (matplotlib, keras, ...) load only when it runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "Train one LSTM with BPTT and with Highway-BP side by side; table, plot and JSON.",
    "bench": "Time Highway-BP against the fused baselines; ratio table, JSON and plot.",
    "study": "Training-quality study: Highway-BP vs BPTT, FPI and truncated BPTT.",
    "gpucheck": "On a GPU: the CUDA tests, the bench against cuDNN and the verdicts, into one folder (--dry-run: on the CPU).",
}


def _usage() -> str:
    lines = ["usage: python -m hwbptt COMMAND [options]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {text}" for name, text in COMMANDS.items()]
    lines += ["", "python -m hwbptt COMMAND --help for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hwbptt: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"hwbptt.programs.{command}")
    return int(module.main(rest) or 0)
