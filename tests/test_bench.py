"""The benchmark's smallest setting, end to end (no timing assertions): it cannot rot."""
import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402


def test_bench_smoke(tmp_path, capsys):
    rows = bench.main(["--smoke", "--device", "cpu", "--no-memory", "--out", str(tmp_path)])
    assert {(r["cell"], r["mode"]) for r in rows} == {(c, m) for c in bench.CELLS for m in bench.MODES}
    for r in rows:
        assert r["rnnext ms"] > 0 and r["torch.nn ms"] > 0 and r["reference ms"] > 0
    with open(tmp_path / "cpu-float32-smoke.csv") as f:
        assert f.readline().startswith("# rnnext benchmark:")
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "cpu-float32-smoke.png").stat().st_size > 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith(f"- {list(bench.CELLS)[-1]} {bench.MODES[-1]}: geometric-mean")


def test_bench_rejects_unknown_cell(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--cells", "transformer", "--out", str(tmp_path)])


def test_peak_memory_child_runs():
    """The memory phase (not in --smoke) on a tiny config: what fwd+bwd adds, in bytes."""
    assert bench.peak_memory_child("lstm", "rnnext", 5, 2, 4, 8, "cpu", "float32") >= 0
