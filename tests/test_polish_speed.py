"""The polish's common case (one factorization), symbolic-analysis reuse, OSQP workspace reuse, and the
black-box overhead study's short mode."""

from __future__ import annotations

import csv
import json
import warnings
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dqp import dQP
from dqp.io import maros_meszaros_dir
from dqp.kkt import assemble_kkt
from dqp.linsolve import get_linsolver
from dqp.solvers import get_solver
from dqp.sparse_helper import csc_scipy_to_torch

from conftest import random_qp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("solver,solve_type", [("clarabel", "dense"), ("clarabel", "sparse"), ("daqp", "dense")])
def test_converged_solver_needs_one_factorization(solver, solve_type):
    """A converged solver's detected set is right: one factorization, verified, and it serves the backward."""
    pytest.importorskip(solver)
    P, q, C, d, *_ = random_qp(8, 10, 0, seed=3)
    if solve_type == "sparse":
        P, C = P.to_sparse_csc(), C.to_sparse_csc()
    qq = q.clone().requires_grad_()
    layer = dQP.dQP_layer(qp_solver=solver, solve_type=solve_type)
    z = layer(P, qq, C, d)[0]
    assert layer.info.verified == [True]
    assert layer.info.polish_path == ["quick"] and layer.info.factorizations == [1]
    z.sum().backward()
    # the same KKT system by hand: ∇q = −y_z with K y = (1, 0)
    J = np.flatnonzero(layer.info.active[0])
    Pd = P.to_dense().numpy() if solve_type == "sparse" else P.numpy()
    Cd = (C.to_dense().numpy() if solve_type == "sparse" else C.numpy())[J]
    K = assemble_kkt(Pd, None, Cd, False)
    y = np.linalg.solve(K, np.concatenate([np.ones(8), np.zeros(len(J))]))
    np.testing.assert_allclose(qq.grad.numpy(), -y[:8], rtol=1e-9, atol=1e-11)


def test_failed_quick_check_goes_down_the_ladder():
    """OSQP stopped early mislabels rows: the repairs or the ladder still verify, and the path says so."""
    P, q, C, d, *_ = random_qp(10, 15, 0, seed=5)
    layer = dQP.dQP_layer(qp_solver="osqp", eps_abs=1e-3, eps_rel=1e-3, fallback_solver=None)
    layer(P, q, C, d)
    ref = dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d)[0]
    assert layer.info.verified == [True]
    assert layer.info.factorizations[0] >= 1 and layer.info.polish_path[0] in ("quick", "ladder")
    assert torch.allclose(layer(P, q, C, d)[0], ref, atol=1e-8)


def _kkt(seed: int, scale: float = 1.0):
    g = np.random.default_rng(seed)
    L = g.standard_normal((6, 6))
    P = sp.csc_matrix(L @ L.T + np.eye(6))
    G = sp.csc_matrix(np.where(g.random((3, 6)) < 0.6, g.standard_normal((3, 6)), 0.0) + np.eye(3, 6))
    return assemble_kkt(P * scale, None, G, True, reg=1e-2)  # quasi-definite, well conditioned


def test_qdldl_refactorization_keeps_older_factors_valid():
    """A same-pattern refactorization reuses the symbolic analysis; the older factorization still solves
    its own matrix (it refactorizes its values back when asked)."""
    lin = get_linsolver("qdldl")
    K1 = _kkt(0)
    D = sp.diags(np.linspace(1.0, 2.0, K1.shape[0]))
    K2 = sp.csc_matrix(D @ K1 @ D)  # new values, same (symmetric) pattern
    K2.sort_indices()
    F1 = lin.refactor(K1, None)
    F2 = lin.refactor(K2, F1)
    assert F2.shared is F1.shared  # one ordering for both
    r = np.arange(K1.shape[0], dtype=float)
    for _ in range(2):
        np.testing.assert_allclose(K2 @ F2.solve(r), r, atol=1e-9)
        np.testing.assert_allclose(K1 @ F1.solve(r), r, atol=1e-9)
    # another pattern: a fresh analysis
    K3 = _kkt(1)
    F3 = lin.refactor(K3, F1)
    assert F3.shared is not F1.shared
    np.testing.assert_allclose(K3 @ F3.solve(r), r, atol=1e-9)


def test_repeated_calls_reuse_the_analysis_and_stay_exact():
    """Same pattern, new values: the layer's answers and gradients match a fresh layer's."""
    P, q, C, d, *_ = random_qp(8, 10, 0, seed=7)
    Ps, Cs = P.to_sparse_csc(), C.to_sparse_csc()
    layer = dQP.dQP_layer(qp_solver="clarabel", solve_type="sparse")
    for k in range(3):
        qk = (q * (1 + 0.1 * k)).clone().requires_grad_()
        z = layer(Ps, qk, Cs, d)[0]
        z.sum().backward()
        qf = qk.detach().clone().requires_grad_()
        zf = dQP.dQP_layer(qp_solver="clarabel", solve_type="sparse")(Ps, qf, Cs, d)[0]
        zf.sum().backward()
        assert torch.allclose(z, zf, atol=1e-12) and torch.allclose(qk.grad, qf.grad, atol=1e-10)


def test_osqp_reused_workspace_takes_no_more_iterations_than_a_fresh_one():
    k = 12
    T = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(k, k))
    Lap = (sp.kron(sp.eye(k), T) + sp.kron(T, sp.eye(k))).tocsc()
    n = k * k
    C = sp.eye(n, format="csc")
    solver = get_solver("osqp")
    kw = solver.tolerance_keywords(1e-8, 1e-8)
    for seed in range(4):
        g = np.random.default_rng(seed)
        q, d = g.standard_normal(n), 0.1 + 0.05 * g.random(n)
        fresh = get_solver("osqp").solve(Lap, q, C, d, None, None, keywords=kw)
        reused = solver.solve(Lap, q, C, d, None, None, keywords=kw, slot=0)
        assert reused.iterations <= fresh.iterations, (seed, reused.iterations, fresh.iterations)
        np.testing.assert_allclose(reused.x, fresh.x, atol=1e-5)


def _study(script: str, *args: str) -> subprocess.CompletedProcess:
    """``experiments/<script> --short *args`` in a subprocess, from the checkout."""
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--short", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_blackbox_overhead_short(tmp_path):
    out = tmp_path / "bbo"
    proc = _study("blackbox_overhead.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert rows and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert {r["family"] for r in rows} >= {"dense"}
    text = out.with_suffix(".md").read_text()
    assert "Small dense problems" in text and "Command:" in text


def test_polish_sweep_short(tmp_path):
    """The sweep's short mode: three tiny problems (shipped with the tests) verified with one or two
    factorizations each, and the report names its command."""
    pytest.importorskip("piqp")
    pytest.importorskip("clarabel")
    out = tmp_path / "ps"
    proc = _study("polish_sweep.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == 6 and all(r.get("verified") and r["factorizations"] <= 2 for r in rows), rows
    assert "Command: `python experiments/polish_sweep.py --short" in out.with_suffix(".md").read_text()


def test_polish_sweep_says_which_build_failed(tmp_path):
    """A compared build that cannot be imported stops the sweep with the worker's error."""
    broken = tmp_path / "build" / "dqp"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("this build is broken")\n')
    proc = _study("polish_sweep.py", "--out", str(tmp_path / "ps"), "--compare-path", str(broken.parent))
    assert proc.returncode != 0
    assert "compare worker failed" in proc.stderr and "this build is broken" in proc.stderr


def test_warm_start_without_effect_is_said_once():
    pytest.importorskip("piqp")
    P, q, C, d, *_ = random_qp(5, 6, 0, seed=2)
    layer = dQP.dQP_layer(qp_solver="piqp", warm_start_from_previous=True)
    with pytest.warns(UserWarning, match="warm_start_from_previous=True has no effect with qp_solver='piqp'"):
        layer(P, q, C, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(P, q + 0.01, C, d)  # said once
    assert get_solver("osqp").warm_starts and not get_solver("piqp").warm_starts


def _random_csc(rows: int, cols: int, density: float, seed: int) -> sp.csc_matrix:
    M = sp.random(rows, cols, density=density, format="csc", random_state=seed)
    M.sort_indices()
    return M


@pytest.mark.parametrize("reg", [0.0, 1e-3])
def test_kkt_layout_assembles_what_the_triplets_do(reg):
    """The per-pattern layout gives the matrix the COO assembly gives, bit for bit, on first use and on
    a later call with new values (CSC and CSR blocks; a P without some diagonal entries)."""
    from dqp.kkt import _assemble_coo

    for seed in range(4):
        L = _random_csc(7, 7, 0.3, seed)
        P = sp.csc_matrix(L + L.T)
        P.sort_indices()
        A = _random_csc(2, 7, 0.5, seed + 10)
        CJ = _random_csc(4, 7, 0.4, seed + 20).tocsr()
        for scale in (1.0, -3.0):  # the second call hits the cached layout
            Ps, As, Cs = P * scale, A * scale, CJ * scale
            K = assemble_kkt(Ps, As, Cs, True, reg=reg)
            ref = _assemble_coo(Ps, [As, Cs], reg)
            assert K.format == "csc" and K.has_sorted_indices
            np.testing.assert_array_equal(K.indptr, ref.indptr)
            np.testing.assert_array_equal(K.indices, ref.indices)
            np.testing.assert_array_equal(K.data, ref.data)
    # duplicate entries (not canonical): summed, as the triplet assembly does
    Pd = sp.csc_matrix((np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1]), np.array([0, 2, 3])), shape=(2, 2))
    K = assemble_kkt(Pd, None, None, True)
    np.testing.assert_array_equal(K.toarray(), [[3.0, 0.0], [0.0, 3.0]])


@pytest.mark.parametrize("sorted_rows", [True, False])
def test_sparse_symmetry_check_measures_the_asymmetry(sorted_rows):
    """P's symmetry is checked from its CSC arrays: an entry without its mirror counts in full."""
    from dqp.errors import NotSymmetricError
    from dqp.problem import validate

    rows = [0, 1, 0, 1] if sorted_rows else [1, 0, 1, 0]
    vals = [4.0, 1.0, 1.5, 3.0] if sorted_rows else [1.0, 4.0, 3.0, 1.5]
    P = torch.sparse_csc_tensor(torch.tensor([0, 2, 4]), torch.tensor(rows), torch.tensor(vals, dtype=torch.float64))
    q = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(NotSymmetricError, match=r"max \|P - Pᵀ\| = 0\.5"):
        validate(P, q, sparse=True)
    lone = torch.sparse_csc_tensor(
        torch.tensor([0, 1, 3]), torch.tensor([0, 0, 1]), torch.tensor([4.0, 2.0, 3.0], dtype=torch.float64)
    )
    with pytest.raises(NotSymmetricError, match=r"max \|P - Pᵀ\| = 2"):
        validate(lone, q, sparse=True)
    sym = torch.sparse_csc_tensor(
        torch.tensor([0, 2, 4]), torch.tensor([0, 1, 0, 1]), torch.tensor([4.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    )
    assert validate(sym, q, sparse=True).n == 2


def test_factor_pool_serves_each_pattern_its_own_analysis():
    """A pool keeps one factorization per symbolic analysis; a refactorization picks the one of its pattern."""
    from dqp.kkt import FactorPool, RobustKKT

    lin = get_linsolver("qdldl")
    K1, K3 = _kkt(0), _kkt(1)
    F1, F3 = lin.refactor(K1, None), lin.refactor(K3, None)
    pool = FactorPool([F1, F3])
    F = lin.refactor(sp.csc_matrix(K1 * 2.0), list(pool))
    assert F.analysis is F1.analysis
    F = lin.refactor(sp.csc_matrix(K3 * 2.0), list(pool))
    assert F.analysis is F3.analysis
    pool.add(F)
    assert len(list(pool)) == 2  # F replaced F3 (one analysis, one entry)
    # the reduced systems of two alternating active sets: after the first round, no new analysis
    P, q, C, d, *_ = random_qp(6, 8, 0, seed=1)
    Ps, Cr = sp.csc_matrix(P.numpy()), sp.csr_matrix(C.numpy())
    pool = FactorPool()
    seen = []
    for J in ([0, 2], [1, 3, 4], [0, 2], [1, 3, 4]):
        kkt = RobustKKT(Ps, None, Cr[J], True, lin, quick=True, reuse=pool)
        seen.append(kkt.factor.analysis)
    assert seen[2] is seen[0] and seen[3] is seen[1] and seen[0] is not seen[1]


@pytest.mark.skipif(maros_meszaros_dir() is None, reason="the full Maros–Meszaros collection is not present")
def test_degenerate_problems_polish_within_a_bounded_count():
    """PRIMALC8's reduced systems are singular and badly scaled: QDLDL's regularized solve is inaccurate
    and is redone with a pivoting LU, which verifies on the detected set. QBEACONF (Clarabel) needs
    repairs on the ladder; its singular sets skip the attempts a singular matrix fails. QPCSTAIR
    verifies after quick repairs."""
    from dqp.io import load_maros_meszaros

    cases = (("PRIMALC8", "piqp", "quick", 4), ("QBEACONF", "clarabel", "ladder", 30), ("QPCSTAIR", "piqp", "quick", 6))
    for name, solver, path, most in cases:
        qp = load_maros_meszaros(maros_meszaros_dir() / f"{name}.mat").to_qp()
        P, C, A = (None if M is None else csc_scipy_to_torch(M) for M in (qp.P, qp.C, qp.A))
        vec = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float64)
        layer = dQP.dQP_layer(qp_solver=solver, solve_type="sparse", eps_abs=1e-8, eps_rel=1e-8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(P, vec(qp.q), C, vec(qp.d), A, vec(qp.b))
        assert layer.info.verified == [True], name
        assert layer.info.polish_path == [path] and layer.info.factorizations[0] <= most, (name, layer.info)


@pytest.mark.skipif(maros_meszaros_dir() is None, reason="the full Maros–Meszaros collection is not present")
def test_degenerate_problems_keep_their_verdicts():
    """QISRAEL's detected sets give inconsistent reduced systems whose repairs do not converge: the
    answer stays flagged unverified, within the repair budget. QBRANDY (Clarabel) verifies after a
    repair. QBANDM verifies on the quick path: its first set holds the bounds that PIQP left at 1e-4
    next to entries of 1e3 (slack small at the point's scale, dual 1e-7 of the largest), which pin
    its non-unique solution; without them no repair chain verified it in 25 factorizations."""
    from dqp.io import load_maros_meszaros

    cases = (("QISRAEL", "piqp", False, 40), ("QBRANDY", "clarabel", True, 8), ("QBANDM", "piqp", True, 5))
    for name, solver, verified, most in cases:
        qp = load_maros_meszaros(maros_meszaros_dir() / f"{name}.mat").to_qp()
        P, C, A = (None if M is None else csc_scipy_to_torch(M) for M in (qp.P, qp.C, qp.A))
        vec = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float64)
        layer = dQP.dQP_layer(qp_solver=solver, solve_type="sparse", eps_abs=1e-8, eps_rel=1e-8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(P, vec(qp.q), C, vec(qp.d), A, vec(qp.b))
        assert layer.info.verified == [verified], name
        assert layer.info.factorizations[0] <= most, (name, layer.info.factorizations)


#: Small manufactured problems (equalities, every inequality inactive) whose first detected set gives
#: an inconsistent reduced system: the repairs go through more inconsistent sets before they verify.
#: A rule that stopped the chain at such a set failed both (with Clarabel and PIQP alike).
_REPAIRED = [
    (
        [[1.1973, 0.0357], [0.0357, 1.6667]],
        [0.2652, -0.2678],
        [[1.9155, 0.2781], [-0.4804, 2.3253], [1.1086, 0.2778]],
        [1.7062, 2.1189, 1.8894],
        [[-0.7433, 0.0373]],
        [-0.2556],
    ),
    (
        [[0.6478, 0.1052, -0.1373], [0.1052, 0.6429, -0.2083], [-0.1373, -0.2083, 1.5309]],
        [2.6642, 0.9789, -0.6124],
        [
            [-1.2654, -0.6233, 0.0413],
            [-2.3250, -0.2188, -1.2459],
            [-0.7323, -0.5443, -0.3163],
            [0.4116, 1.0425, -0.1285],
            [1.3665, -0.6652, 0.3515],
            [0.9035, 0.0940, -0.7435],
        ],
        [0.4662, -0.9390, 0.2796, 2.2032, 1.3301, 1.5663],
        [[-0.9217, -0.4577, 0.2202], [-1.0096, -0.2092, -0.1592]],
        [-0.5185, -0.6475],
    ),
]


@pytest.mark.parametrize("case", range(len(_REPAIRED)))
@pytest.mark.parametrize("solver", ["clarabel", "piqp"])
def test_sets_repaired_through_inconsistent_systems_verify(solver, case):
    """The repair chain goes on through inconsistent reduced systems and verifies the exact solution."""
    P, q, C, d, A, b = (torch.tensor(x, dtype=torch.float64) for x in _REPAIRED[case])
    layer = dQP.dQP_layer(qp_solver=solver, empty_batch=False, fallback_solver=[])
    z, lam, mu = layer(P, q, C, d, A, b)[:3]
    assert layer.info.verified == [True] and layer.info.status[0] == 0
    # the exact solution: the equalities' KKT system (no inequality is active)
    p = A.shape[0]
    K = torch.cat([torch.cat([P, A.T], 1), torch.cat([A, torch.zeros(p, p, dtype=torch.float64)], 1)])
    ref = torch.linalg.solve(K, torch.cat([-q, b]))
    assert torch.allclose(z, ref[:-p], atol=1e-9) and torch.allclose(lam, ref[-p:], atol=1e-9)
    assert torch.all(mu == 0)


def test_piqp_reused_workspace_matches_a_fresh_setup():
    """Sparse PIQP keeps one workspace per batch slot and updates its values: the same answers as a
    fresh setup (qpsolvers' path, taken without a slot), a fresh setup when the pattern changes."""
    pytest.importorskip("piqp")
    solver = get_solver("piqp")
    kw = solver.tolerance_keywords(1e-9, 1e-9)
    for seed in range(3):
        P, q, C, d, A, b, *_ = random_qp(12, 15, 3, seed=seed)
        Ps, Cs, As = (sp.csc_matrix(M.numpy()) for M in (P, C, A))
        qn, dn, bn = q.numpy(), d.numpy(), b.numpy()
        fresh = solver.solve(Ps, qn, Cs, dn, As, bn, keywords=kw)
        reused = solver.solve(Ps, qn, Cs, dn, As, bn, keywords=kw, slot=0)
        assert reused.status == fresh.status
        np.testing.assert_allclose(reused.x, fresh.x, atol=1e-8)
        np.testing.assert_allclose(reused.z, fresh.z, atol=1e-8)
        np.testing.assert_allclose(reused.y, fresh.y, atol=1e-8)
    # a sparser C: another pattern, set up afresh
    Cs2 = Cs.copy()
    Cs2.data[::2] = 0.0
    Cs2.eliminate_zeros()
    again = solver.solve(Ps, qn, Cs2, dn, As, bn, keywords=kw, slot=0)
    ref = solver.solve(Ps, qn, Cs2, dn, As, bn, keywords=kw)
    np.testing.assert_allclose(again.x, ref.x, atol=1e-8)
    # through the layer: repeated calls agree with a fresh layer's
    P, q, C, d, *_ = random_qp(8, 10, 0, seed=4)
    Ps, Cs = P.to_sparse_csc(), C.to_sparse_csc()
    layer = dQP.dQP_layer(qp_solver="piqp", solve_type="sparse")
    for k in range(3):
        qk = q * (1 + 0.1 * k)
        z = layer(Ps, qk, Cs, d)[0]
        zf = dQP.dQP_layer(qp_solver="piqp", solve_type="sparse")(Ps, qk, Cs, d)[0]
        assert torch.allclose(z, zf, atol=1e-10)


def test_detection_takes_bounds_at_the_point_scale_with_a_dual():
    """A bound ``−x_j ≤ 0`` at ``x_j = 1e-4`` next to ``‖x‖∞ = 1e3`` is active when its dual is
    1e-7 of the largest (an interior-point method's degenerate active row), not when it is 1e-10 (a
    slack row); a row's own-scale test (slack against ``|d_i|`` and ``|C_i||x|``) is unchanged."""
    from dqp.engine import detect_active

    x = np.array([1e3, 1e-4, 1e-4, 5.0])
    C = -np.eye(4)  # bounds x ≥ 0
    d = np.zeros(4)
    mu = np.array([0.0, 1e-7, 1e-10, 0.0])
    mu[0] = 1.0  # the largest dual (row 0 is far from its bound: the dual alone makes it active)
    active, _ = detect_active(C, d, x, mu, 1e-6)
    assert active.tolist() == [True, True, False, False]
    active_no_dual, _ = detect_active(C, d, x, None, 1e-6)
    assert active_no_dual.tolist() == [False, False, False, False]


@pytest.mark.skipif(maros_meszaros_dir() is None, reason="the full Maros–Meszaros collection is not present")
@pytest.mark.parametrize("name", ["QSCAGR7", "QSCFXM1", "QGROW15"])
def test_singular_polish_gradient_does_not_depend_on_earlier_calls(name):
    """On a singular reduced system the regularized derivative depends on the equilibration, so the
    equilibration must be a function of the matrix alone: a layer that first solved other data of the
    same pattern (its later calls start from the regularized form and reuse the slot's analyses)
    returns a fresh layer's gradient exactly."""
    from dqp.io import load_maros_meszaros

    qp = load_maros_meszaros(maros_meszaros_dir() / f"{name}.mat").to_qp()
    g = np.random.default_rng(0)
    q_other = qp.q * (1 + 1e-2 * g.standard_normal(len(qp.q)))

    def grad(layer, q_values):
        P, C, A = (None if M is None else csc_scipy_to_torch(M) for M in (qp.P, qp.C, qp.A))
        q, d, b = (
            None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for v in (q_values, qp.d, qp.b)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(P, q, C, d, A, b)[0].sum().backward()
        assert layer.info.verified == [True] and layer.info.kkt_path == ["regularized"], layer.info
        return torch.cat([v.grad for v in (q, d, b) if v is not None])

    settings = dict(qp_solver="piqp", solve_type="sparse", eps_abs=1e-8, eps_rel=1e-8)
    fresh = grad(dQP.dQP_layer(**settings), qp.q)
    used = dQP.dQP_layer(**settings)
    grad(used, q_other)
    assert torch.equal(grad(used, qp.q), fresh)
    assert torch.equal(grad(used, qp.q), fresh)
