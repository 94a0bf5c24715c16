"""Smoke tests of the simplex scaling study, the bilevel warm-start study and their examples.

Each runs in a subprocess in its short mode (seconds, dqp only: no peer venv needed) and the test
checks what it prints and writes against exact answers: the closed-form simplex projection and its
Jacobian, a QP built around a known solution, and equal losses with and without warm starts.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SHORT_ENV = {**os.environ, "DQP_EXAMPLES_SHORT": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(args, timeout=180, **kw):
    out = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=SHORT_ENV,
        cwd=REPO,
        **kw,
    )
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout[-2000:]}\nstderr:\n{out.stderr[-2000:]}"
    return out.stdout


def test_simplex_closed_form_reference():
    """The study's own reference: the sort-based projection and its Jacobian, checked independently."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import numpy as np
        import simplex_scaling as ss
    finally:
        sys.path.pop(0)
    for n, frac in [(1, 0.0), (7, 0.4), (500, 0.9)]:
        inst = ss.make_instance(n, frac, seed=3)
        z = ss.project_simplex(inst["x"])
        assert abs(z.sum() - 1) < 1e-12 and z.min() >= 0
        assert int((z > 0).sum()) == int(inst["k"])
        np.testing.assert_allclose(z, inst["z_constructed"], atol=1e-12)
        # Jacobian-vector product against central differences (the support does not change)
        w = inst["w"]
        g = ss.exact_grad(z, w)
        h = 1e-7 / max(n, 1)
        fd = np.array(
            [
                (w @ ss.project_simplex(inst["x"] + h * e) - w @ ss.project_simplex(inst["x"] - h * e)) / (2 * h)
                for e in np.eye(n)[: min(n, 40)]
            ]
        )
        np.testing.assert_allclose(g[: len(fd)], fd, atol=1e-6 * max(1.0, np.abs(g).max()))


def test_simplex_scaling_short(tmp_path):
    out = _run([REPO / "experiments" / "simplex_scaling.py", "--short", "--out-dir", tmp_path])
    rows = list(csv.DictReader(open(tmp_path / "simplex_scaling_short.csv")))
    ok = [r for r in rows if r["status"] == "ok"]
    methods = {r["method"] for r in ok}
    assert {"dqp-sparse:osqp", "dqp-sparse:clarabel", "dqp-ipm"} <= methods, methods
    assert len(ok) == len(rows), [r for r in rows if r["status"] != "ok"]
    for r in ok:
        assert float(r["z_err"]) < 1e-8, r
        assert float(r["grad_err"]) < 1e-8, r
        assert float(r["t_forward"]) > 0 and float(r["t_backward"]) > 0
    assert "## Forward + backward time" in out
    assert (tmp_path / "simplex_scaling_short.md").read_text().count("| dqp-") >= 2 * len(methods)


def test_parallel_batches_short(tmp_path):
    """The thread-pool study: every mode (sequential, pool, auto) gives the sequential answers."""
    _run([REPO / "experiments" / "parallel_batches.py", "--short", "--out", tmp_path])
    rows = [
        r
        for r in (tmp_path / "parallel_batches.md").read_text().splitlines()
        if r.startswith("| grid") or r.startswith("| dense")
    ]
    assert len(rows) == 2
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[4:7]), r  # times
        assert float(cells[-1]) <= 1e-12, r  # z and ∇q of every mode


def test_cpu_small_load_short(tmp_path):
    """The small-batch load study: a row per cell and load, and the same answers at 1 and 2 threads."""
    _run([REPO / "experiments" / "cpu_small_load.py", "--short", "--out", tmp_path / "load"])
    rows = [
        r for r in (tmp_path / "load.md").read_text().splitlines() if r.startswith("| 1x10") or r.startswith("| 4x10")
    ]
    assert len(rows) == 4
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0, r
        assert float(cells[6]) <= 1e-12, r


def test_bilevel_warmstart_short(tmp_path):
    out = _run([REPO / "experiments" / "bilevel_warmstart.py", "--short", "--no-plot", "--out-dir", tmp_path])
    results = re.findall(
        r"RESULT solver=(\S+) loss_cold=(\S+) loss_warm=(\S+) solve_speedup=(\S+) "
        r"theta_max_diff=(\S+)",
        out,
    )
    assert {r[0] for r in results} >= {"osqp", "clarabel"}, out
    for solver, cold, warm, speedup, dtheta in results:
        cold, warm = float(cold), float(warm)
        assert cold > 0 and abs(cold - warm) <= 1e-10 * cold, (solver, cold, warm)
        assert float(dtheta) < 1e-8
    rows = list(csv.DictReader(open(tmp_path / "bilevel_warmstart_short.csv")))
    osqp_steps = [r for r in rows if r["solver"] == "osqp"]
    assert len(osqp_steps) == 2 * 10
    assert all(r["iterations"] not in ("", "None") for r in osqp_steps)  # OSQP reports its iterations
    losses = [float(r["loss"]) for r in osqp_steps if r["warm"] == "False"]
    assert losses[-1] < losses[0]  # the outer loop makes progress


def test_all_solvers_example():
    out = _run([REPO / "examples" / "all_solvers.py"])
    m = re.search(r"(\d+) of (\d+) installed solvers ran; worst error over z and gradients: (\S+)", out)
    assert m, out
    assert int(m.group(1)) == int(m.group(2)) >= 2
    assert float(m.group(3)) < 1e-8
    assert "NOT verified" not in out


def test_bilevel_warmstart_example():
    out = _run([REPO / "examples" / "bilevel_warmstart.py"])
    m = re.search(r"largest loss difference cold vs warm: (\S+)", out)
    assert m, out
    assert float(m.group(1)) < 1e-10
    m = re.search(r"loss (\S+) -> (\S+)", out)
    assert m and float(m.group(2)) < float(m.group(1))
