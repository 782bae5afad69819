"""The benchmark's smallest setting, end to end (no timing assertions): it cannot rot."""
import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402


def test_bench_smoke(tmp_path, capsys, monkeypatch):
    rate = 1e-4  # GFLOP/s: torch.mm's rate stands in so small that the smoke rows' "of mm" are far above rounding
    monkeypatch.setattr(bench, "mm_rate", lambda device, dtype: rate)
    rows = bench.main(["--smoke", "--device", "cpu", "--no-memory", "--out", str(tmp_path)])
    assert {(r["cell"], r["mode"]) for r in rows} == {(c, m) for c in bench.CELLS for m in bench.MODES}
    for r in rows:
        assert r["rnnext ms"] > 0 and r["torch.nn ms"] > 0 and r["reference ms"] > 0
    with open(tmp_path / "cpu-float32-smoke.csv") as f:
        header = f.readline()
        assert header.startswith("# rnnext benchmark:")
        table = list(csv.DictReader(f))
        assert len(table) == len(rows)
    assert "of mm = rnnext GFLOP/s / torch.mm 2048^3's 0.0 GFLOP/s in float32" in header
    for t, r in zip(table, rows):  # the row's GEMM GFLOP/s over the rate, up to the rounding of its time (4 places)
        of_mm = [bench.flops(r["cell"], r["T"], r["B"], r["I"], r["H"], r["mode"]) / (ms / 1e3) / 1e9 / rate
                 for ms in (r["rnnext ms"] + 5e-5, r["rnnext ms"] - 5e-5)]
        assert float(t["of mm"]) == r["of mm"] and of_mm[0] - 1e-3 <= r["of mm"] <= of_mm[1] + 1e-3
    assert (tmp_path / "cpu-float32-smoke.png").stat().st_size > 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith(f"- {list(bench.CELLS)[-1]} {bench.MODES[-1]}: geometric-mean")


def test_mm_rate_is_a_rate():
    """torch.mm 2048^3's GFLOP/s, the "of mm" column's denominator: within what a CPU or GPU does."""
    assert 0.1 < bench.mm_rate("cpu", bench.torch.float32) < 1e6


def test_bench_rejects_unknown_cell(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--cells", "transformer", "--out", str(tmp_path)])


def test_peak_memory_child_runs():
    """The memory phase (not in --smoke) on a tiny config: what fwd+bwd adds, in bytes."""
    assert bench.peak_memory_child("lstm", "rnnext", 5, 2, 4, 8, "cpu", "float32") >= 0
