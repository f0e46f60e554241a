"""Smoke run of ``python -m hwbptt bench`` with minimal sizes: table, JSON and plot."""

import json

from hwbptt.programs import bench


def test_bench_smoke(tmp_path, capsys):
    rc = bench.main(["--suites", "lstm,gru", "--T", "12", "--B", "2", "--H", "4", "--k", "0,1,exact",
                     "--repeats", "1", "--warmup", "0", "--ops-T", "4,8", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "kernels: " in out and "GPU projection" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    rows = data["rows"]
    assert {(r["suite"], r["k"]) for r in rows} == {(s, k) for s in ("lstm", "gru") for k in ("0", "1", "exact")}
    for r in rows:
        for key in ("speedup", "bwd_speedup", "step_ms", "base_step_ms", "floor_multiple", "gpu_model_speedup"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r)
        assert -1.0001 <= r["cosine"] <= 1.0001
    assert next(r for r in rows if r["k"] == "exact")["cosine"] > 0.9999
    assert data["op_counts"] and all(o["ops_T1"] > 0 for o in data["op_counts"])
    assert [(c["T"], c["B"], c["H"]) for c in data["scan_bandwidth"]] == [(12, 2, 4), (4096, 32, 128)]
    assert all(c["scan_GBps"] > 0 and c["copy_GBps"] > 0 for c in data["scan_bandwidth"])
    from hwbptt.torch import reserve

    if reserve.available():  # the forward that keeps the gates is timed against the one that rebuilds them
        assert {(c["suite"], c["k"]) for c in data["forward_choice"]} == {("lstm", 1), ("gru", 1)}
        assert all(c["keep_ms"] > 0 and c["rebuild_ms"] > 0 for c in data["forward_choice"])
        assert "keeping is" in out


def test_bench_rejects_bad_flags(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--k", "x"])
    with pytest.raises(SystemExit):
        bench.main(["--suites", "nope"])


def test_bench_grid_suite_prints_ratios_and_verdicts(tmp_path, capsys):
    """``--suites grid`` on a tiny grid: one row per model, depth and shape, positive ratios,
    a verdict line per target computed from those ratios, JSON and PNG written."""
    rc = bench.main(["--suites", "grid", "--grid-shapes", "6x2x4,5x3x8", "--repeats", "1", "--warmup", "0",
                     "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "grid.json").read_text())
    rows = data["rows"]
    assert {(r["model"], r["layers"], r["T"], r["B"], r["H"]) for r in rows} == {
        (m, L, T, B, H) for m in ("lstm", "gru") for L in (1, 2) for T, B, H in ((6, 2, 4), (5, 3, 8))}
    for r in rows:
        assert r["exact"] > 0 and r["k1"] > 0
        assert abs(r["exact"] - r["parent_ms"] / r["exact_ms"]) < 1e-9
    worst_exact = min(r["exact"] for r in rows)
    line = next(v for v in data["verdicts"] if "exact mode never slower" in v)
    assert line.startswith("MET" if worst_exact >= 1.0 else "MISSED") and f"{worst_exact:.2f}x" in line
    assert all(v in out for v in data["verdicts"])
    # The parent against itself, per row and as the grid's resolution line.
    selfs = [r["self"] for r in rows]
    assert all(s > 0 for s in selfs)
    res = next(v for v in data["verdicts"] if v.startswith("resolution"))
    assert f"{min(selfs):.2f}-{max(selfs):.2f}x" in res
    assert "self: the parent timed twice" in out
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_bench_grid_marks_where_exact_mode_runs_the_parent(tmp_path, capsys, monkeypatch):
    """Rows where exact mode runs the parent's own kernel (``dispatch.plan``) are marked, with a
    footnote, and the exact verdict adds the lowest ratio where this project's adjoint runs."""
    from hwbptt.torch import dispatch, reserve

    if not reserve.available():
        import pytest

        pytest.skip("without the compiled kernels exact mode always runs the parent")
    monkeypatch.setattr(dispatch, "EXACT_LSTM_MAX_H", 4)  # the LSTM at H = 8 takes the parent's kernel
    assert bench.main(["--suites", "grid", "--grid-shapes", "6x2x4,5x3x8", "--repeats", "1", "--warmup", "0",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "grid.json").read_text())["rows"]
    assert {(r["model"], r["H"], r["exact_path"]) for r in rows} == {
        ("lstm", 4, "ours"), ("lstm", 8, "parent"), ("gru", 4, "ours"), ("gru", 8, "ours")}
    assert "* exact mode runs the parent's own kernel" in out
    ours = min(r["exact"] for r in rows if r["exact_path"] == "ours")
    assert f"where this project's adjoint runs: lowest {ours:.2f}x" in out


def test_bench_grid_shapes_are_checked():
    import pytest

    from hwbptt.programs.bench_grid import GRID, MEDIAN, parse_shapes

    assert parse_shapes("128x8x64,512x32x256") == [(128, 8, 64), (512, 32, 256)]
    with pytest.raises(ValueError, match="'12x3'"):
        parse_shapes("12x3")
    assert MEDIAN in GRID and all(T * B * H <= 2**24 for T, B, H in GRID)
