"""``python -m hwbptt gpucheck``: the dry run writes every result the device run writes
(this is how ``make test`` and CI rehearse the one GPU run), a machine without a GPU gets
one line and a non-zero status, and a checkout that was never installed imports from its
own folders. The GPU run itself happens only where a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hwbptt.programs import gpucheck

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: float = 400, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("HWBPTT_TRITON", "TRITON_INTERPRET", "HWBPTT_GPUCHECK_DEVICE")}
    environ.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=environ, timeout=timeout)


def test_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "gc"
    # A generous budget: on a loaded machine no row may be left out of what is checked here.
    done = _run(["-m", "hwbptt", "gpucheck", "--dry-run", "--budget", "600", "--tests-timeout", "500", "--out", str(out)], tmp_path, timeout=700)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stdout + done.stderr
    data = json.loads((out / "gpucheck.json").read_text())
    assert data["dry_run"] is True
    env = data["environment"]
    for key in ("python", "torch", "triton", "device", "hwbptt_from", "hwbptt_source"):
        assert key in env, key
    # step 1: the CUDA tests ran on the CPU, in the interpreter, and passed
    tests = data["tests"]
    assert tests["status"] == "passed", tests
    assert tests["failed"] == 0 and tests["errors"] == 0
    log = (out / "tests.log").read_text().replace("tests/cuda/", "")
    if importlib.util.find_spec("triton") is not None:  # the kernels' tests need Triton's interpreter
        assert tests["passed"] >= 30
        assert "test_kernels.py::test_lstm_gates[float32] PASSED" in log
    assert "test_layers.py::test_k_at_least_T_equals_cudnn_bptt[lstm] PASSED" in log
    assert (out / "tests.xml").stat().st_size > 0
    # step 2: every suite, every k, ratios against the baseline timed in the same run
    bench = data["bench"]
    assert bench["status"] == "done" and not bench["skipped"] and not bench["errors"], bench.get("errors")
    rows = bench["rows"]
    want = {(s, T, k) for s in ("lstm", "gru") for T in (5, 16) for k in ("0", "1", "3", "10", "exact")}
    want |= {(s, 16, k) for s in ("lstm-packed", "gru-packed") for k in ("0", "1", "3", "exact")}
    assert {(r["suite"], r["T"], r["k"]) for r in rows} == want
    for r in rows:
        for key in ("speedup", "bwd_speedup", "step_ms", "base_step_ms", "bwd_ms", "base_bwd_ms"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r)
        assert r["speedup"] == pytest.approx(r["base_step_ms"] / r["step_ms"])
        assert -1.0001 <= r["cosine"] <= 1.0001
        assert r["timer"].startswith("time.perf_counter") and r["triton"] == "on"
        assert "mem_ratio" in r and (r["mem_ratio"] is None or r["mem_ratio"] > 0)
    assert all(r["cosine"] > 0.9999 for r in rows if r["k"] in ("exact", "10"))
    assert all(r["model_speedup"] > 0 for r in rows if r["suite"] in ("lstm", "gru"))
    # step 3: one verdict per target, marked as a dry run
    verdicts = data["verdicts"]
    assert [v["suite"] for v in verdicts] == list(gpucheck.SUITES)
    for v in verdicts:
        assert v["met"] in (True, False) and v["rows"] == 3, v
        assert v["line"].startswith(v["target"]) and "dry run" in v["line"] and ("MET" in v["line"])
    summary = (out / "summary.txt").read_text()
    assert "verdicts:" in summary and "speed-up" in summary and "DRY RUN" in summary
    if data["environment"]["matplotlib"]:
        assert (out / "bench.png").stat().st_size > 0
    assert data["seconds"] < 300, "the dry run is meant to take well under a minute (more on a loaded machine)"


def test_without_a_gpu_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gc"
    done = _run(["-m", "hwbptt", "gpucheck", "--out", str(out)], tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpucheck: no CUDA GPU") and "--dry-run" in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists(), "nothing is written when nothing was measured"


def test_bad_arguments_are_one_line(tmp_path):
    done = _run(["-m", "hwbptt", "gpucheck", "--dry-run", "--k", "x", "--out", str(tmp_path / "o")], tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--k" in done.stderr
    assert gpucheck.main(["--dry-run", "--skip-tests", "--skip-bench", "--out", str(tmp_path / "o")]) == 2


def test_a_checkout_that_was_never_installed_imports_from_its_own_folders(tmp_path):
    """``python3 programs/gpucheck.py`` on a machine without the package installed (the
    device's image): the checkout's folders serve hwbptt, hwbptt.torch, hwbptt.keras and
    hwbptt.programs, ahead of any installed copy (here the editable install of this tree)."""
    copy = tmp_path / "checkout"
    for folder in ("hwbptt", "adapters", "programs"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("boot", {str(copy / "programs" / "gpucheck.py")!r})
        boot = importlib.util.module_from_spec(spec)
        sys.modules["boot"] = boot
        spec.loader.exec_module(boot)
        assert boot.map_checkout()
        import hwbptt, hwbptt.torch, hwbptt.torch.fused, hwbptt.programs.bench
        print(hwbptt.__file__, hwbptt.torch.__file__, hwbptt.torch.fused.__file__, hwbptt.programs.bench.__file__,
              importlib.util.find_spec("hwbptt.keras").origin)
    """)
    done = _run(["-c", code], tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = [Path(p) for p in done.stdout.split()]
    want = ["hwbptt/__init__.py", "adapters/torch/__init__.py", "adapters/torch/fused.py", "programs/bench.py", "adapters/keras/__init__.py"]
    assert [p.resolve() for p in paths] == [(copy / w).resolve() for w in want]
    assert not gpucheck.is_checkout(tmp_path)  # an installed copy of the program maps nothing
    assert gpucheck.map_checkout(tmp_path) is False


def test_cli_lists_gpucheck(capsys):
    from hwbptt.programs import cli

    assert cli.main(["--help"]) == 0
    assert "gpucheck" in capsys.readouterr().out


def _row(suite, T, k, speedup):
    return {"suite": suite, "T": T, "B": 32, "H": 128, "k": k, "speedup": speedup}


def test_verdicts():
    rows = [_row("lstm", 1024, "0", 2.0), _row("lstm", 1024, "3", 1.1), _row("lstm", 4096, "3", 1.5),
            _row("lstm", 256, "3", 0.5), _row("lstm", 1024, "10", 0.4), _row("lstm", 1024, "exact", 0.3),  # outside the rule
            _row("gru", 1024, "1", 1.3), _row("gru", 4096, "3", 0.9)]
    v = {x["suite"]: x for x in gpucheck.verdicts(rows, 1024, dry_run=False)}
    assert v["lstm"]["met"] is True and v["lstm"]["rows"] == 3 and "slowest 1.10x at T=1024" in v["lstm"]["line"]
    assert v["gru"]["met"] is False and v["gru"]["slower"] == 1 and "worst 0.90x at T=4096" in v["gru"]["line"]
    assert v["lstm-packed"]["met"] is None and "UNMEASURED" in v["lstm-packed"]["line"]
    assert all("dry run" not in x["line"] and "cuDNN" in x["line"] for x in v.values())


def test_bench_plan_puts_the_verdict_rows_first():
    args = gpucheck.build_parser().parse_args([])
    plan, verdict_T = gpucheck.bench_plan(args)
    assert verdict_T == 1024
    Ts = [p[1] for p in plan]
    assert Ts[0] == 1024 and Ts.index(4096) > max(i for i, p in enumerate(plan) if p[0].endswith("packed"))
    assert Ts[-1] == 256
    plain = [p for p in plan if p[0] in ("lstm", "gru")]
    assert len(plain) == 2 * 3 * 2 * 2 and all(p[4] == [0, 1, 3, 10, None] for p in plain)
    assert {p[0] for p in plan} == set(gpucheck.SUITES)
    assert gpucheck._estimate([], 10) == 0.0
    assert gpucheck._estimate([(100, 2.0), (10_000, 50.0)], 20_000) == pytest.approx(100.0)
