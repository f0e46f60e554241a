"""Smoke tests of the programs (demo, study --quick) and of every example, with tiny
flags, plus the bad-input exits: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_py(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


def assert_one_line_error(proc_or_err: subprocess.CompletedProcess | str, rc: int, needle: str) -> None:
    if isinstance(proc_or_err, subprocess.CompletedProcess):
        assert proc_or_err.returncode == 2, (proc_or_err.returncode, proc_or_err.stderr[-2000:])
        err = proc_or_err.stderr
    else:
        assert rc == 2
        err = proc_or_err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert "error" in lines[0] and needle in lines[0], lines[0]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


# ----------------------------------------------------------------------------- demo


def test_demo_tiny_run_writes_table_plot_and_json(tmp_path, capsys):
    from hwbptt.programs import demo

    out = tmp_path / "demo"
    rc = demo.main(
        ["--steps", "4", "--seq-len", "12", "--hidden", "8", "--batch", "4", "--iterations", "0,20",
         "--cos-every", "2", "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("method", "speed-up vs BPTT", "BPTT", "Highway-BP", "wrote"):
        assert word in text
    assert_png(out / "loss_vs_time.png")
    data = json.loads((out / "demo.json").read_text())
    runs = data["runs"]
    assert [r["k"] for r in runs] == [None, 0, 20]
    for r in runs:
        assert len(r["loss"]) == 4 and all(math.isfinite(v) for v in r["loss"])
        assert r["median_step_s"] > 0
        assert len(r["wall"]) == 4 and r["wall"] == sorted(r["wall"])
    # k=20 >= T=12 is exact: its gradient must equal BPTT's (cosine 1), measured each time
    assert runs[2]["cosine"] and min(runs[2]["cosine"]) > 0.99999
    assert all(-1.0 <= c <= 1.0 + 1e-6 for c in runs[1]["cosine"])
    # the same batches and start: step 1's loss is the same for every method
    assert len({round(r["loss"][0], 5) for r in runs}) == 1
    assert len(data["table"]["rows"]) == 3


def test_demo_recommends_auto_with_what_it_chose(tmp_path, capsys):
    from hwbptt.programs import demo

    out = tmp_path / "demo"
    rc = demo.main(["--steps", "3", "--seq-len", "12", "--hidden", "8", "--batch", "4", "--iterations", "1,auto",
                    "--cos-every", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    runs = json.loads((out / "demo.json").read_text())["runs"]
    choices = runs[-1]["auto_choices"]
    assert runs[-1]["k"] == "auto" and choices and choices[0][0] == 0  # probed at the first step
    first = "exact" if choices[0][1] is None else f"k={choices[0][1]}"
    assert 'iterations="auto"' in text and f"step 0: {first}" in text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "0"], "--steps"),
        (["--iterations", "-1"], "--iterations"),
        (["--iterations", "three"], "--iterations"),
        (["--cell", "rnn"], "--cell"),
        (["--seq-len", "-5"], "--seq-len"),
        (["--lr", "0"], "--lr"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_demo_bad_flags_exit_with_one_line(argv, needle, capsys):
    from hwbptt.programs import demo

    rc = demo.main(argv)
    assert_one_line_error(capsys.readouterr().err, rc, needle)


def test_demo_unwritable_out_is_a_clean_error(tmp_path, capsys):
    from hwbptt.programs import demo

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = demo.main(["--steps", "1", "--seq-len", "4", "--out", str(blocker / "sub"), "--no-progress"])
    assert_one_line_error(capsys.readouterr().err, rc, "output folder")


def test_cli_dispatch_bad_flag_no_traceback():
    proc = run_py(["-m", "hwbptt", "demo", "--steps", "0"])
    assert_one_line_error(proc, 2, "--steps")


# ----------------------------------------------------------------------------- study


def test_study_quick(tmp_path, capsys):
    from hwbptt.programs import study

    out = tmp_path / "study"
    rc = study.main(["--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    md = (out / "results.md").read_text()
    for section in ("## 1.", "## 2.", "## 3.", "figures/recall_accuracy.png", "python -m hwbptt study"):
        assert section in md
    for name in ("recall_accuracy", "recall_loss_vs_time", "recall_cosine", "charlm_bpc_vs_k", "charlm_cosine", "schedule_loss_vs_time"):
        assert_png(out / "figures" / f"{name}.png")
    data = json.loads((out / "results.json").read_text())["results"]
    labels = [r["label"] for r in data["recall"]["runs"]]
    assert labels[0] == "BPTT" and any(lab.startswith("FPI") for lab in labels) and any(lab.startswith("truncated") for lab in labels)
    bpc = {r["k"]: r["eval"]["valid_bpc"] for r in data["charlm"]["runs"]}
    assert set(bpc) == {None, 0, 1, 3, 5, 10}
    assert all(math.isfinite(v) and 0 < v < 10 for v in bpc.values())
    # k=10 iterations on T=48 are nearly exact at initialisation: cosine close to 1
    k10 = next(r for r in data["charlm"]["runs"] if r["k"] == 10)
    assert k10["cosine"][0] > 0.999
    # FPI at k=10 sees only the last 11 of 96 steps: its recall gradient differs from exact
    fpi = next(r for r in data["recall"]["runs"] if r["label"].startswith("FPI"))
    hw = next(r for r in data["recall"]["runs"] if r["label"] == "Highway k=10")
    assert fpi["cosine"][0] < hw["cosine"][0]
    assert len(data["schedule"]["rows"]) == 5
    # the findings are computed from this run's numbers, and --render rewrites the same file
    assert "## Findings" in md and f"BPTT reached {100 * data['recall']['runs'][0]['eval']['test_acc']:.1f}%" in md
    again = tmp_path / "again"
    assert study.main(["--render", str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "results.md").read_text() == md


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--parts", "nothing"], "unknown part"),
        (["--corpus", "/nonexistent/corpus.txt"], "not found"),
        (["--recall-steps", "0"], "--recall-steps"),
        (["--render", "/nonexistent/results.json"], "not found"),
    ],
)
def test_study_bad_input(argv, needle, tmp_path, capsys):
    from hwbptt.programs import study

    rc = study.main(["--quick", "--no-progress", "--out", str(tmp_path), *argv])
    assert_one_line_error(capsys.readouterr().err, rc, needle)


def test_study_empty_and_short_corpus(tmp_path, capsys):
    from hwbptt.programs import study

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = study.main(["--quick", "--no-progress", "--parts", "charlm", "--corpus", str(empty), "--out", str(tmp_path)])
    assert_one_line_error(capsys.readouterr().err, rc, "empty")
    short = tmp_path / "short.txt"
    short.write_text("a short text")
    rc = study.main(["--quick", "--no-progress", "--parts", "charlm", "--corpus", str(short), "--out", str(tmp_path)])
    assert_one_line_error(capsys.readouterr().err, rc, "shorter than one sequence")


# ----------------------------------------------------------------------------- examples


def test_char_lm_example_tiny():
    proc = run_py([str(EXAMPLES / "char_lm.py"), "--steps", "3", "--seq-len", "32", "--hidden", "16", "--iterations", "1,3", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "bits/char" in line]
    assert [line.split()[0] for line in lines] == ["BPTT", "Highway", "Highway"]
    for line in lines:
        bpc = float(line.split("validation")[1].split()[0])
        assert 0 < bpc < 8


def test_char_lm_bad_corpus(tmp_path):
    proc = run_py([str(EXAMPLES / "char_lm.py"), "--corpus", str(tmp_path / "missing.txt")])
    assert_one_line_error(proc, 2, "not found")
    short = tmp_path / "short.txt"
    short.write_text("hello world\n" * 3)
    proc = run_py([str(EXAMPLES / "char_lm.py"), "--corpus", str(short)])
    assert_one_line_error(proc, 2, "shorter than one sequence")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    proc = run_py([str(EXAMPLES / "char_lm.py"), "--corpus", str(binary)])
    assert_one_line_error(proc, 2, "UTF-8")
    proc = run_py([str(EXAMPLES / "char_lm.py"), "--corpus", str(tmp_path)])
    assert_one_line_error(proc, 2, "folder")


@pytest.mark.parametrize("task", ["adding", "copy", "recall"])
def test_long_range_example_tiny(task):
    proc = run_py(
        [str(EXAMPLES / "long_range.py"), "--task", task, "--seq-len", "20", "--steps", "3", "--hidden", "8",
         "--iterations", "2", "--compare", "--no-progress"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BPTT" in proc.stdout and "Highway k=2" in proc.stdout and "speed-up" in proc.stdout


def test_long_range_bad_flags():
    assert_one_line_error(run_py([str(EXAMPLES / "long_range.py"), "--gamma", "2"]), 2, "--gamma")
    assert_one_line_error(run_py([str(EXAMPLES / "long_range.py"), "--iterations", "-3"]), 2, "--iterations")
    assert_one_line_error(run_py([str(EXAMPLES / "long_range.py"), "--steps", "0"]), 2, "--steps")


def test_custom_cell_example_tiny():
    proc = run_py([str(EXAMPLES / "custom_cell.py"), "--seq-len", "16", "--steps", "3", "--hidden", "8", "--iterations", "2", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Highway k=2" in proc.stdout and "BPTT (Python loop)" in proc.stdout


def test_keras_example_tiny():
    pytest.importorskip("keras")
    proc = run_py(
        [str(EXAMPLES / "keras_lstm.py"), "--seq-len", "16", "--samples", "32", "--epochs", "1", "--hidden", "8", "--batch", "16", "--quiet"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Highway k=5" in proc.stdout and "exact gradient" in proc.stdout and "accuracy" in proc.stdout


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_keyword_spotting_example_tiny(tmp_path):
    pytest.importorskip("torchaudio")
    pytest.importorskip("soundfile")
    cache = tmp_path / "words"
    args = [str(EXAMPLES / "keyword_spotting.py"), "--words", "2", "--clips-per-word", "10", "--steps", "3", "--hidden", "8",
            "--batch", "4", "--hop-ms", "20", "--cache", str(cache), "--no-progress"]
    proc = run_py(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "20 clips of 2 words" in proc.stdout and "accuracy" in proc.stdout
    assert len(list(cache.glob("*.wav"))) == 20
    again = run_py(args, env={"PATH": str(tmp_path / "no-bin")})  # cached: no synthesiser needed
    assert again.returncode == 0, again.stderr[-3000:]


def test_keyword_spotting_without_espeak_says_how_to_install(tmp_path):
    pytest.importorskip("torchaudio")
    proc = run_py(
        [str(EXAMPLES / "keyword_spotting.py"), "--steps", "1", "--cache", str(tmp_path / "c")], env={"PATH": str(tmp_path / "no-bin")}
    )
    assert_one_line_error(proc, 2, "apt-get install espeak-ng")


def test_keyword_spotting_missing_speech_commands(tmp_path):
    pytest.importorskip("torchaudio")
    proc = run_py([str(EXAMPLES / "keyword_spotting.py"), "--speech-commands", str(tmp_path / "nothing-here")])
    assert_one_line_error(proc, 2, "not found")
    proc = run_py([str(EXAMPLES / "keyword_spotting.py"), "--speech-commands", str(tmp_path)])
    assert_one_line_error(proc, 2, "Speech Commands")


@pytest.mark.parametrize("script", ["char_lm.py", "keyword_spotting.py", "long_range.py", "keras_lstm.py", "custom_cell.py"])
def test_examples_have_help(script):
    proc = run_py([str(EXAMPLES / script), "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
