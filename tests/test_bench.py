"""Smoke tests of the benchmark harnesses: `python -m bench --quick` and `bench/gpu_check.py --quick --interpret`."""

import csv
import json
import math
import os
import subprocess
import sys
import time

import jax
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
        assert float(r["ys_rel_err"]) < 1e-3, r
        assert r["mode"] == "forward" or float(r["grad_rel_err"]) < 1e-3, r
        assert float(r["median_ms"]) > 0 and not math.isnan(float(r["median_ms"]))
        assert r["device"] and r["jax"] and r["diffrax"]
    assert {(r["mode"], r["method"]) for r in rows if r["mode"] == "forward"} == {
        ("forward", "diffrax-rca"), ("forward", "fusedrk-jax")}  # a forward solve: no adjoints
    assert "| seed | grad | 2250 | 800 | fusedrk-jax |" in run.stdout  # the table is printed last
    assert "| seed | forward | 2250 | 800 | fusedrk-jax |" in run.stdout


@pytest.mark.parametrize("peer", ["torchode", "torchdiffeq", "gradsolve"])
@pytest.mark.parametrize("workload", ["seed-nl", "lorenz"])
def test_peer_runners_agree_with_diffrax(peer, workload):
    # The peers' rows are only worth printing if they solve the same problem: their torch
    # fields are written out again in bench/peers.py, so check them on a tiny case.
    from bench import peers
    from fusedrk import problems
    from fusedrk._measure import rel_err
    import diffrax
    import jax
    import jax.numpy as jnp

    if peers.missing(peer):
        pytest.skip(peers.missing(peer))
    p = problems.PROBLEMS[workload]
    y0, rho = p.make(8, jnp.float32)
    t1, ts = (p.t0 + 20 * p.dt0, None) if workload == "seed-nl" else (p.t0 + 50 * p.dt0, jnp.linspace(0.01, 0.05, 5))
    params = rho if workload == "lorenz" else y0
    def loss(ys):  # the peers' loss takes their own arrays (torch tensors for torch peers)
        return sum((leaf ** 2).mean() for leaf in jax.tree_util.tree_leaves(ys)) if workload == "lorenz" else ys.sum()

    run = peers.run(peer, peers.Spec(workload, y0 if workload == "lorenz" else (y0,), p.t0, t1, p.dt0, ts, loss))

    def oracle(params):
        def one(y, a):
            save = diffrax.SaveAt(ts=ts) if ts is not None else diffrax.SaveAt(t1=True)
            return diffrax.diffeqsolve(diffrax.ODETerm(p.field), diffrax.Tsit5(), p.t0, t1, p.dt0, y, a,
                                       saveat=save).ys

        if workload == "lorenz":
            ys = jax.vmap(one)(y0, params)
            return sum(jnp.mean(leaf ** 2) for leaf in ys), ys
        ys = one(params, None)[0]
        return jnp.sum(ys), ys

    grad = jax.grad(lambda x: oracle(x)[0])(params)
    # Float32, a few dozen steps; torchdiffeq's RK4 differs from Tsit5 by its truncation error.
    assert rel_err(run.forward(params), oracle(params)[1]) < 1e-4
    assert rel_err(run.grad(params), grad) < 1e-4


def _results(out):
    with open(out / "results.jsonl") as fh:
        return [json.loads(line) for line in fh]


# One correctness check per branch of gpu_check.check_case's tolerances (float64 with a lane
# out of steps, float32 fixed, float32 adaptive with the rounding envelope, the seed) and a
# ring that replays. The other checks run the same code on configurations that
# tests/test_kernels.py covers in interpret mode; all of them run on a GPU.
QUICK_CHECKS = ["f64-max-steps-lane", "f32-fixed-t1", "f32-adaptive-t1", "seed-80000-steps", "f32-ring-5-fixed-t1"]


@pytest.mark.slow
def test_gpu_check_quick_interpret_runs_every_target_and_each_kind_of_check(tmp_path):
    # The one GPU run's script, on the CPU at tiny sizes: every code path it takes on a GPU.
    from bench import gpu_check

    assert gpu_check.main(["--quick", "--interpret", "--out", str(tmp_path), "--checks", *QUICK_CHECKS]) == 0
    rows = _results(tmp_path)
    assert rows[0]["part"] == "versions" and rows[0]["jax"] == jax.__version__
    checks = [r for r in rows if r["part"] == "check"]
    assert [r["name"] for r in checks] == QUICK_CHECKS
    for r in checks:
        assert r["status"] == "PASS" and r["ys_rel_err"] <= r["tol_ys"] and r["grad_rel_err"] <= r["tol_grad"], r
    targets = {r["name"]: r for r in rows if r["part"] == "target"}
    assert set(targets) == {"seed", "seed-nl", "lorenz-grad", "lorenz-vector", "lorenz-forward", "tape-traffic",
                            "lorenz-adaptive-f64", "big-adaptive"}
    assert all(r["status"] == "n/a (quick)" for r in targets.values()), targets
    assert targets["lorenz-vector"]["grad_rel_err"] == 0.0  # one program for the [B, 3] and tuple forms
    assert {r["name"] for r in rows if r["part"] == "diffrax"} == set(targets) - {"tape-traffic", "big-adaptive",
                                                                                   "lorenz-vector"}
    compared = {r["name"]: r for r in rows if r["part"] == "compare"}
    launches = {f"launch {w} {t} lanes {n} warps" for w in ("seed", "seed-nl") for t, n in ((16, 1), (128, 4))}
    assert set(compared) == {"pipelined-sweep seed-nl", "pipelined-sweep lorenz-adaptive-f64",
                             "finished-rows lorenz-adaptive-f64", "finished-rows vdp", *launches}
    assert all(r["status"] == "ok" for r in compared.values()), compared
    # The same arithmetic both ways: equal gradients, but for the adaptive walk with and without
    # its prefetch, whose predicated loads (reverse.load_row's selects) XLA:CPU fuses, and so
    # contracts into multiply-adds, differently when they come from the previous iteration:
    # 2.3e-16 measured, exactly 0 with SKIP_FINISHED_ROWS off.
    assert all(r["grad_rel_diff"] == 0.0 for n, r in compared.items() if n != "pipelined-sweep lorenz-adaptive-f64")
    assert compared["pipelined-sweep lorenz-adaptive-f64"]["grad_rel_diff"] <= 4 * 2.0 ** -52
    log = (tmp_path / "log.txt").read_text()
    assert "-- target seed" in log and "| check | f32-fixed-t1 | PASS |" in (tmp_path / "table.md").read_text()


def test_gpu_check_survives_a_failing_part_and_its_budget(tmp_path, monkeypatch):
    from bench import gpu_check

    def boom():
        raise RuntimeError("a kernel failed")

    ran = []
    monkeypatch.setattr(gpu_check, "parts", lambda run: [("boom", boom), ("after", lambda: ran.append(1)),
                                                         ("late", lambda: time.sleep(0.2)), ("never", ran.clear)])
    assert gpu_check.main(["--interpret", "--out", str(tmp_path), "--budget-s", "0.1"]) == 1
    rows = _results(tmp_path)
    assert [(r["name"], r["status"]) for r in rows[1:]] == [("boom", "ERROR"), ("never", "skipped")], rows
    assert ran == [1]
    assert "RuntimeError: a kernel failed" in (tmp_path / "log.txt").read_text()


def test_demo_agreement_check_can_fail():
    # CI runs `python -m fusedrk --quick` and relies on its exit status; with an impossible
    # bar (errors below 0) the same run must exit 1 and say why.
    run = subprocess.run([sys.executable, "-m", "fusedrk", "--quick", "--agreement", "-1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "AGREEMENT CHECK FAILED: equal step counts True" in run.stdout


def _row(workload, method, B, ms, extrapolated=False):
    return dict(device="TestGPU", workload=workload, mode="grad", B=B, steps=10, method=method, median_ms=ms,
                extrapolated=extrapolated, ys_rel_err=0.0, grad_rel_err=0.0, status="ok",
                speedup_vs_diffrax_default=100.0 / ms)


def test_plot_shows_one_batch_size_and_names_device_and_workloads():
    # A workload measured at a single B (the seeds) must still appear in the left panel.
    pytest.importorskip("matplotlib")
    from bench.__main__ import figure

    fig = figure([_row("seed", "diffrax-rca", 2250, 100.0), _row("seed", "fusedrk-jax", 2250, 20.0)])
    ax_time, ax_speed = fig.axes[:2]
    assert len(ax_time.lines) == 2 and all(len(line.get_xdata()) == 1 for line in ax_time.lines)
    assert ax_time.get_legend() is not None
    assert ax_time.get_title() and ax_speed.get_title()
    assert "TestGPU" in fig._suptitle.get_text() and "seed" in fig._suptitle.get_text()
    assert "extrapolated" not in ax_speed.get_xlabel()


def test_markdown_footnote_only_for_extrapolated_rows():
    from bench.__main__ import markdown

    plain = [_row("lorenz", "fusedrk-jax", 64, 20.0)]
    assert "extrapolated" not in markdown(plain)
    assert "extrapolated" in markdown(plain + [_row("seed", "diffrax-rca", 2250, 90.0, extrapolated=True)])


def test_cli_help_names_the_module_and_shows_defaults(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m bench")
    assert "--out DIR" in text and "(default: bench/results)" in " ".join(text.split())
