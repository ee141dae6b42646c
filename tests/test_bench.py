"""Smoke test of the benchmark harness: `python -m bench --quick --workloads seed`."""

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_seed_benchmark_writes_checked_results(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workloads", "seed", "--repeats", "2",
         "--methods", "diffrax-rca", "diffrax-direct", "fusedrk-jax", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"diffrax-rca", "diffrax-direct", "fusedrk-jax"}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["ys_rel_err"]) < 1e-3 and float(r["grad_rel_err"]) < 1e-3, r
        assert float(r["median_ms"]) > 0 and not math.isnan(float(r["median_ms"]))
        assert r["device"] and r["jax"] and r["diffrax"]
    assert "| seed | grad | 2250 | 800 | fusedrk-jax |" in run.stdout  # the table is printed last
