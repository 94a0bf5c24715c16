"""Smoke tests of experiments/bench_qpth.py: its reference, its skip estimate, its short mode."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_qpth.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_qpth", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_qpth"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_gradient_matches_finite_differences(bench, seed):
    """The independent reference (Clarabel + active-set KKT adjoint) is a true derivative."""
    pytest.importorskip("clarabel", reason="the reference needs clarabel (a dqp dependency)")
    ps = bench.make_problems(1, 12, 12, seed=seed, device="cpu")
    Q, p, G, h, w = (getattr(ps, k)[0].numpy() for k in ("Q", "p", "G", "h", "w"))
    z, grads, degenerate = bench.reference_one(Q, p, G, h, w)
    assert not degenerate
    assert np.all(G @ z <= h + 1e-9)
    rng = np.random.default_rng(seed)
    data = {"Q": Q, "p": p, "G": G, "h": h}
    eps = 1e-6
    for name in bench.PARAMS:
        D = rng.standard_normal(data[name].shape)
        if name == "Q":
            D = D + D.T
        plus, minus = dict(data), dict(data)
        plus[name] = data[name] + eps * D
        minus[name] = data[name] - eps * D
        zp = bench.reference_one(plus["Q"], plus["p"], plus["G"], plus["h"], w)[0]
        zm = bench.reference_one(minus["Q"], minus["p"], minus["G"], minus["h"], w)[0]
        fd = w @ (zp - zm) / (2 * eps)
        an = float(np.sum(grads[name] * D))
        assert abs(fd - an) <= 1e-5 * (1 + abs(fd)), (name, fd, an)


def test_estimate_scales_from_smaller_cells(bench):
    done = [
        bench.Cell("cpu", "float64", 128, 100, 100, "qpth", time_median_s=0.5),
        bench.Cell("cpu", "float64", 1, 500, 500, "qpth", time_median_s=0.1),
    ]
    # one point at the same B: cubic on the CPU; same n, B 1 -> 128: linear; the smaller one wins
    assert bench.estimate_time(done, "qpth", "float64", 128, 200) == pytest.approx(4.0)
    assert bench.estimate_time(done, "qpth", "float64", 128, 500) == pytest.approx(12.8)
    assert bench.estimate_time(done, "qpth", "float32", 128, 200) is None
    assert bench.estimate_time(done, "dqp", "float64", 128, 200) is None
    # two points: the measured exponent (here 1: 0.1 s at n=50, 0.2 s at n=100) extrapolates
    gpu = [
        bench.Cell("cuda", "float64", 128, 50, 50, "qpth", time_median_s=0.1),
        bench.Cell("cuda", "float64", 128, 100, 100, "qpth", time_median_s=0.2),
    ]
    assert bench.estimate_time(gpu, "qpth", "float64", 128, 500) == pytest.approx(1.0)
    # the exponent is clamped to [0.5, 3]
    steep = [
        bench.Cell("cpu", "float64", 1, 10, 10, "dqp", time_median_s=0.001),
        bench.Cell("cpu", "float64", 1, 20, 20, "dqp", time_median_s=0.1),
    ]
    assert bench.estimate_time(steep, "dqp", "float64", 1, 40) == pytest.approx(0.8)


def test_short_mode_runs_and_dqp_gradients_are_accurate(tmp_path):
    """`--short` runs in seconds and dqp's gradients meet the acceptance tolerances."""
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--short",
            "--device",
            "cpu",
            "--methods",
            "dqp,qpth",
            "--out",
            str(tmp_path),
            "--no-plot",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "qpth_cpu.csv")))
    dqp_rows = [r for r in rows if r["method"] == "dqp"]
    # 2 sizes x 2 batches x 2 dtypes
    assert len(dqp_rows) == 8
    for r in dqp_rows:
        assert r["status"] == "ok", r
        assert float(r["time_median_s"]) > 0 and int(r["reps"]) >= 1
        assert r["nonfinite"] == "False"
        tol = 1e-6 if r["dtype"] == "float64" else 1e-3
        err = float(r["grad_rel_err"])
        assert math.isfinite(err) and err < tol, r
        assert int(r["ref_problems"]) >= 1
    md = (tmp_path / "qpth_cpu.md").read_text()
    assert "#### float64" in md and "#### float32" in md
