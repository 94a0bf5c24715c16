"""Small Maros–Meszaros problems through the dQP layer (sparse), and the sweep as a slow test."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dqp import dQP
from dqp.io import load_maros_meszaros, maros_meszaros_dir

REPO = Path(__file__).resolve().parent.parent


def _sweep(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The maintained study on every problem with n, m ≤ 1000 (dqp only, no reference), CSV at ``out``."""
    args = ["--impl", "ours", "--max-n", "1000", "--max-m", "1000", "--timeout-per-problem", "300", "--no-reference"]
    cmd = [sys.executable, str(REPO / "experiments" / "maros_meszaros.py"), *args, *extra, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=3600)


def _rows(out: Path) -> list:
    with open(out.with_suffix(".csv")) as f:
        return list(csv.DictReader(f))


MM_DIR = REPO / "tests" / "data" / "maros_meszaros"  # a small subset shipped with the tests

# tiny problems covering: inequalities only (HS21, HS35, HS118), an equality (TAME, DUALC1),
# many more constraints than variables (DUALC1: n=9, 232 inequalities), equalities only (GENHS28)
TINY = ["HS21", "HS35", "HS118", "TAME", "DUALC1", "GENHS28"]


def _solve(qp, q=None, d=None, solver="clarabel"):
    (P, qt, C, dt, A, b), leaves = qp.to_torch(requires_grad=True, return_leaves=True)
    if q is not None:
        qt = torch.as_tensor(q, dtype=torch.float64)
    if d is not None:
        dt = torch.as_tensor(d, dtype=torch.float64)
    layer = dQP.dQP_layer(settings=dQP.build_settings(solve_type="sparse", qp_solver=solver, empty_batch=False))
    z, lam, mu, _, _ = layer(P, qt, C, dt, A, b)
    return layer, z, lam, mu, leaves


def _kkt(qp, z, lam, mu):
    """Independent relative KKT residuals (primal, stationarity, complementarity, dual sign)."""
    stat = qp.P @ z + qp.q
    prim = 0.0
    comp = dneg = 0.0
    if qp.n_ineq:
        s = qp.d - qp.C @ z
        prim = max(prim, float(np.max(np.maximum(-s, 0.0))))
        stat = stat + qp.C.T @ mu
        comp = float(np.max(np.abs(mu * s)))
        dneg = float(max(0.0, -mu.min()))
    if qp.n_eq:
        prim = max(prim, float(np.max(np.abs(qp.A @ z - qp.b))))
        stat = stat + qp.A.T @ lam
    scale = 1.0 + max(float(np.max(np.abs(qp.q))), float(np.max(np.abs(qp.d))) if qp.n_ineq else 0.0)
    return prim / scale, float(np.max(np.abs(stat))) / scale, comp / scale, dneg


@pytest.mark.parametrize("name", TINY)
def test_tiny_problem_forward_backward(name):
    qp = load_maros_meszaros(MM_DIR / f"{name}.mat").to_qp()
    layer, z, lam, mu, leaves = _solve(qp)
    assert z.shape == (qp.n,) and mu.shape == (qp.n_ineq,)
    zn, mun = z.detach().numpy(), mu.detach().numpy()
    lamn = lam.detach().numpy() if qp.n_eq else None
    prim, dual, comp, dneg = _kkt(qp, zn, lamn, mun)
    assert prim < 1e-8 and dual < 1e-8 and comp < 1e-8 and dneg < 1e-10, (prim, dual, comp, dneg)
    # objective matches an independent high-accuracy solve of the original two-sided problem
    qpsolvers = pytest.importorskip("qpsolvers")
    ref = qpsolvers.solve_qp(
        qp.P,
        qp.q,
        qp.C if qp.n_ineq else None,
        qp.d if qp.n_ineq else None,
        qp.A,
        qp.b,
        solver="clarabel",
        tol_gap_abs=1e-12,
        tol_gap_rel=1e-12,
        tol_feas=1e-12,
    )
    assert qp.objective(zn) == pytest.approx(qp.objective(ref), rel=1e-8, abs=1e-8)

    w = torch.as_tensor(np.random.default_rng(0).standard_normal(qp.n))
    (w * z).sum().backward()
    for key, leaf in leaves.items():
        if leaf.numel() == 0:  # GENHS28 has no inequalities: C and d are empty
            continue
        assert leaf.grad is not None, f"no gradient reached {key}"
        assert torch.isfinite(leaf.grad).all(), f"non-finite gradient for {key}"
    # the gradient is not trivially zero: wᵀz depends on q unless every direction is pinned
    pinned = qp.n_eq + int(np.sum(mun > 0)) >= qp.n
    assert pinned or leaves["q"].grad.abs().max() > 0


@pytest.mark.parametrize("name", ["HS21", "HS35", "HS118", "DUALC1"])
def test_tiny_problem_directional_fd(name):
    """Central FD of wᵀz in (q, d) against the backward (these problems are strictly complementary)."""
    qp = load_maros_meszaros(MM_DIR / f"{name}.mat").to_qp()
    layer, z, lam, mu, leaves = _solve(qp)
    s = qp.d - qp.C @ z.detach().numpy()
    mun = mu.detach().numpy()
    assert np.all((s > 1e-6) | (mun > 1e-6)), "test problem must be strictly complementary"
    rng = np.random.default_rng(1)
    w = rng.standard_normal(qp.n)
    (torch.as_tensor(w) * z).sum().backward()
    dq, dd = rng.standard_normal(qp.n), rng.standard_normal(qp.n_ineq)
    an = float(leaves["q"].grad.numpy() @ dq + leaves["d"].grad.numpy() @ dd)
    h = 1e-6
    zp = _solve(qp, qp.q + h * dq, qp.d + h * dd)[1].detach().numpy()
    zm = _solve(qp, qp.q - h * dq, qp.d - h * dd)[1].detach().numpy()
    fd = float(w @ (zp - zm)) / (2 * h)
    assert fd == pytest.approx(an, rel=1e-5, abs=1e-8)


@pytest.mark.slow
@pytest.mark.skipif(
    maros_meszaros_dir() is None,
    reason="the full Maros–Meszaros collection is not present "
    "(set DQP_MAROS_MESZAROS_DIR or put it in ../shared/data/maros_meszaros)",
)
def test_small_sweep_has_no_silent_nan(tmp_path):
    """All n, m ≤ 1000 problems: each goes through or raises a typed dqp error; no silent NaN."""
    out = tmp_path / "mm"
    proc = _sweep(out)
    assert out.with_suffix(".csv").exists(), proc.stderr[-2000:]
    rows = _rows(out)
    assert len(rows) == 62
    bad = [
        (r["name"], r["status"], r["error_class"], r["error_msg"][:200])
        for r in rows
        if r["status"] in ("nan", "crash", "timeout") or (r["status"] == "error" and r["typed"] != "True")
    ]
    assert not bad, bad
    assert proc.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(maros_meszaros_dir() is None, reason="the full Maros–Meszaros collection is not present")
@pytest.mark.skipif("piqp" not in __import__("dqp").solvers.available_solvers(), reason="piqp not installed")
def test_small_set_with_piqp_is_solved_or_flagged(tmp_path):
    """n, m ≤ 1000 with qp_solver='piqp' and its fallback chain: all 62 answered (verified, or flagged
    unverified); a solver's unverified infeasibility claim (Clarabel's on PRIMALC2) no longer ends the chain."""
    out = tmp_path / "mm_piqp"
    proc = _sweep(out, "--solver", "piqp")
    rows = _rows(out)
    assert len(rows) == 62, proc.stderr[-2000:]
    bad = [(r["name"], r["status"], r["error_msg"][:200]) for r in rows if r["status"] != "ok"]
    assert not bad, bad  # unverified answers are flagged (info_verified False, UnverifiedSolutionWarning)
