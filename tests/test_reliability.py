"""Issue 23's reliability items: nothing silently wrong, nothing mutated.

Each test reproduces one reported failure (the behaviour before the fix is in its docstring) and
checks the fix through the public API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import dqp
from dqp import dQP
from dqp.certificates import kkt_distance, primal_infeasibility_verified, unboundedness_verified
from dqp.errors import (
    InfeasibleError,
    LayoutError,
    MaxIterationsError,
    NonFiniteError,
    NotPSDError,
    SettingsError,
    SolveError,
    Status,
    UnboundedError,
)
from dqp.ipm_layer import solve_qp_batch
from dqp.qpth import QPFunction
from dqp.solvers import get_solver
from dqp.solvers.base import SOLVERS, ForwardSolver, RawSolution, register_solver

from conftest import ALL_SOLVERS, SPARSE_SOLVERS, SOLVER_TABLE, inputs_unchanged, installed, random_qp

F64 = torch.float64
ELEMENTWISE = [installed(c) for c in SOLVER_TABLE if c.name != "dqp_ipm"]
MM_DIR = Path(__file__).resolve().parent / "data" / "maros_meszaros"  # a small subset shipped with the tests


def _box(n=2, scale=1.0):
    C = torch.cat([torch.eye(n, dtype=F64), -torch.eye(n, dtype=F64)]) * scale
    return C, torch.ones(2 * n, dtype=F64) * scale


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- 1. the caller's tensors are never written into ------------------------------------------------
@pytest.mark.parametrize("case", SPARSE_SOLVERS)
def test_duplicate_and_unsorted_csc_entries_are_summed_on_a_copy(case):
    """Before: P's values were rewritten in place (z off by 23 %, verified); SCS crashed (bus error)."""
    # P = [[2, 0.5], [0.5, 3]] stored with P₀₀ split into duplicates (1.5 + 0.5) and column 1 unsorted
    vals = torch.tensor([1.5, 0.5, 0.5, 3.0, 0.5], dtype=F64, requires_grad=True)
    ccol, row = torch.tensor([0, 3, 5]), torch.tensor([0, 0, 1, 1, 0])
    P = dqp.sparse_csc_tensor(ccol, row, vals, (2, 2))
    C = torch.tensor([[1.0, 1.0]], dtype=F64).to_sparse_csc()
    q = torch.tensor([-4.0, -6.0], dtype=F64, requires_grad=True)
    d = torch.tensor([1.5], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver=case.name, solve_type="sparse")
    with _quiet(), inputs_unchanged(P, vals, q, C, d):
        z = layer(P, q, C, d)[0]
        (z * torch.tensor([1.0, 2.0], dtype=F64)).sum().backward()
    Pd = torch.tensor([[2.0, 0.5], [0.5, 3.0]], dtype=F64, requires_grad=True)
    qd = q.detach().clone().requires_grad_()
    zr = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")(Pd, qd, C.to_dense(), d)[0]
    (zr * torch.tensor([1.0, 2.0], dtype=F64)).sum().backward()
    assert torch.allclose(z.detach(), zr.detach(), atol=1e-7)
    assert torch.allclose(q.grad, qd.grad, atol=1e-6)
    # each stored entry (duplicates included) gets the gradient of the matrix entry it adds to
    g = Pd.grad.detach()
    assert torch.allclose(vals.grad, torch.stack([g[0, 0], g[0, 0], g[1, 0], g[1, 1], g[0, 1]]), atol=1e-6)


@pytest.mark.parametrize("case", ALL_SOLVERS)
def test_inputs_are_unchanged_after_forward_and_backward(case):
    """Every solver of the table, dense batch (and sparse where it takes it), with equalities."""
    P, q, C, d, A, b, *_ = random_qp(5, 6, 1, seed=3, batch=2)
    args = [t.clone().requires_grad_() for t in (P, q, C, d, A, b)]
    layer = dQP.dQP_layer(empty_batch=False, qp_solver=case.name)
    with _quiet(), inputs_unchanged(*args):
        z, lam, mu, _, _ = layer(*args)
        (z.sum() + mu.sum() + lam.sum()).backward()
    if case.sparse:
        sargs = [P[0].to_sparse_csc(), q[0], C[0].to_sparse_csc(), d[0], A[0].to_sparse_csc(), b[0]]
        with _quiet(), inputs_unchanged(*sargs):
            dQP.dQP_layer(empty_batch=False, qp_solver=case.name, solve_type="sparse")(*sargs)


# -- 2. malformed CSC structure ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "ccol,row,size,words",
    [
        ([0, 1, 2], [0, -1], (2, 2), "row_indices must lie in"),  # before: SIGABRT
        ([0, 1, 2], [0, 2], (2, 2), "row_indices must lie in"),
        ([0, 1, 1], [0, 1], (2, 2), "end at nnz"),  # before: a silently wrong z
        ([0, 2, 1, 2], [0, 1], (2, 3), "nondecreasing"),  # before: an untyped ValueError
        ([1, 1, 2], [0, 1], (2, 2), "start at 0"),
        ([0, 1], [0], (2, 2), "3 entries"),
    ],
)
def test_malformed_csc_is_a_layout_error(ccol, row, size, words):
    vals = torch.ones(len(row), dtype=F64)
    M = torch.sparse_csc_tensor(torch.tensor(ccol), torch.tensor(row), vals, size=size)
    n = size[1]
    P = M if size == (2, 2) else torch.eye(n, dtype=F64).to_sparse_csc()
    C = None if size == (2, 2) else M
    layer = dQP.dQP_layer(empty_batch=False, solve_type="sparse")
    with pytest.raises(LayoutError, match=words):
        layer(P, torch.ones(n, dtype=F64), C, None if C is None else torch.ones(size[0], dtype=F64))


def test_malformed_csr_and_coo_are_layout_errors():
    csr = torch.sparse_csr_tensor(torch.tensor([0, 1, 2]), torch.tensor([0, 5]), torch.ones(2, dtype=F64), size=(2, 2))
    with pytest.raises(LayoutError, match="col_indices must lie in"):
        dQP.dQP_layer(empty_batch=False, solve_type="sparse")(csr, torch.ones(2, dtype=F64))
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 3], [0, 1]]), torch.ones(2, dtype=F64), size=(2, 2))
    with pytest.raises(LayoutError, match="COO indices"):
        dQP.dQP_layer(empty_batch=False, solve_type="sparse")(coo, torch.ones(2, dtype=F64))


# -- 4. non-convex P --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ELEMENTWISE)
def test_indefinite_P_is_not_psd_error(case):
    """Before: every black-box solver returned the saddle point z = 0 as a verified solution."""
    C, d = _box()
    P = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    with _quiet(), pytest.raises(NotPSDError, match="not positive semidefinite"):
        dQP.dQP_layer(empty_batch=False, qp_solver=case.name)(P, torch.zeros(2, dtype=F64), C, d)


@pytest.mark.parametrize("lin", ["qdldl", "scipy_ldl", "scipy_lu"])
def test_negative_curvature_read_from_the_factorization(lin):
    """Sparse (QDLDL's D), dense LDLᵀ (its blocks) and LU (sign of det K); batched: the element is named."""
    C, d = _box(3)
    P = torch.stack([torch.eye(3, dtype=F64), torch.diag(torch.tensor([2.0, -0.5, 1.0], dtype=F64))])
    sparse = lin == "qdldl"
    with _quiet(), pytest.raises(NotPSDError, match=r"batch elements \[1\]"):
        if sparse:
            dQP.dQP_layer(empty_batch=False, solve_type="sparse", lin_solver=lin)(
                [p.to_sparse_csc() for p in P], torch.zeros(2, 3, dtype=F64), C.to_sparse_csc(), d
            )
        else:
            dQP.dQP_layer(empty_batch=False, lin_solver=lin)(P, torch.zeros(2, 3, dtype=F64), C, d)


@pytest.mark.parametrize(
    "P", [torch.zeros(2, 2, dtype=F64), torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), torch.ones(2, 2, dtype=F64)]
)
def test_semidefinite_P_is_not_flagged(P):
    """LPs and rank-deficient P are convex: no NotPSDError, the verified solution is returned."""
    C, d = _box()
    layer = dQP.dQP_layer(empty_batch=False)
    with _quiet():
        z = layer(P, torch.tensor([-1.0, 0.5], dtype=F64), C, d)[0]
    assert layer.info.status == [Status.SOLVED]
    assert float(z[0]) == pytest.approx(1.0, abs=1e-7)


def test_inertia_of_the_linear_solvers():
    from dqp.linsolve import get_linsolver

    K = np.array([[2.0, 0, 1], [0, -1.0, 0], [1, 0, 0]])  # eigenvalues: two negative, one positive
    neg = int(np.sum(np.linalg.eigvalsh(K) < 0))
    assert get_linsolver("scipy_ldl").factor(K).negative_eigenvalues() == neg
    assert get_linsolver("scipy_lu").factor(K).determinant_sign() == int(np.sign(np.linalg.det(K)))
    Kq = np.array([[2.0, 0, 1], [0, -1.0, 0], [1, 0, -1.0]])  # quasi-definite-like, no pivoting needed
    assert get_linsolver("qdldl").factor(sp.csc_matrix(Kq)).negative_eigenvalues() == int(
        np.sum(np.linalg.eigvalsh(Kq) < 0)
    )


def test_lu_reports_its_condition():
    """The dense LU's condition estimate (LAPACK gecon) is within a small factor of 1/cond₁(K), and 0 for
    an exactly singular K; the solvers that do not estimate it say so with None."""
    from dqp.linsolve import get_linsolver

    g = np.random.default_rng(3)
    for scale in (1.0, 1e-6, 1e-11):
        K = g.standard_normal((8, 8))
        U, s, Vt = np.linalg.svd(K)
        K = U @ np.diag(np.linspace(1.0, scale, 8)) @ Vt
        exact = 1.0 / np.linalg.cond(K, 1)
        est = get_linsolver("scipy_lu").factor(K).reciprocal_condition()
        assert exact / 10 <= est <= exact * 10, (scale, est, exact)
    singular = np.array([[1.0, 2.0], [2.0, 4.0]])
    assert get_linsolver("scipy_lu").factor(singular).reciprocal_condition() == 0.0
    assert get_linsolver("scipy_lu").factor(np.zeros((3, 3))).reciprocal_condition() == 0.0
    for bad in (np.nan, np.inf):
        M = np.eye(3)
        M[1, 2] = bad
        assert get_linsolver("scipy_lu").factor(M).reciprocal_condition() == 0.0
    Kq = np.array([[2.0, 0, 1], [0, -1.0, 0], [1, 0, -1.0]])
    assert get_linsolver("qdldl").factor(sp.csc_matrix(Kq)).reciprocal_condition() is None


# -- 5. certificates, verified before they are believed ---------------------------------------------
def test_certificate_checks_are_scale_invariant():
    A = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([1.0, 2.0])
    for s in (1e-8, 1.0, 1e8):
        assert primal_infeasibility_verified(None, None, A * s, b * s, None, np.array([1.0, -1.0]))
        assert not primal_infeasibility_verified(None, None, A * s, b * s, None, np.array([1.0, 1.0]))
    P = np.diag([1.0, 0.0])
    q = np.array([0.0, -1.0])
    C = np.array([[0.0, -1.0]])
    for s in (1e-8, 1.0, 1e8):
        assert unboundedness_verified(P * s, q * s, C * s, None, np.array([0.0, 1.0]))
        assert not unboundedness_verified(P * s, q * s, C * s, None, np.array([1.0, 1.0]))  # Pv ≠ 0
        assert not unboundedness_verified(P * s, q * s, -C * s, None, np.array([0.0, 1.0]))  # Cv > 0


def _infeasible_eq():
    C, d = _box()
    return (
        torch.eye(2, dtype=F64),
        torch.zeros(2, dtype=F64),
        C,
        d,
        torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64),
        torch.tensor([1.0, 2.0], dtype=F64),
    )


def _infeasible_ineq():
    C = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    return torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), C, torch.tensor([-1.0, -1.0], dtype=F64)


def _unbounded():
    C = torch.tensor([[0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    return (
        torch.diag(torch.tensor([1.0, 0.0], dtype=F64)),
        torch.tensor([0.0, -1.0], dtype=F64),
        C,
        torch.tensor([0.0, 1.0, 1.0], dtype=F64),
    )


@pytest.mark.parametrize("case", ELEMENTWISE)
@pytest.mark.parametrize(
    "make,exc", [(_infeasible_eq, InfeasibleError), (_infeasible_ineq, InfeasibleError), (_unbounded, UnboundedError)]
)
def test_failures_are_classified_from_verified_certificates(case, make, exc):
    """Before: daqp returned z₁ = 1 for z₁ = 1, z₁ = 2 with a warning; daqp, quadprog, HiGHS, CVXOPT
    and ECOS with fallback_solver=None raised SolverFailedError for infeasible/unbounded problems."""
    layer = dQP.dQP_layer(empty_batch=False, qp_solver=case.name, fallback_solver=None)
    with _quiet(), pytest.raises(exc, match="verified|primal infeasible|unbounded"):
        layer(*make())


def _claims_unbounded(direction):
    class Claim(ForwardSolver):
        name, modules, dense, sparse = "test_claims_unbounded", (), True, True
        description = "claims dual infeasibility with a given direction"

        def solve(self, P, q, C, d, A, b, **kw):
            return RawSolution(direction(P), None, None, Status.DUAL_INFEASIBLE)

    return Claim


class _Crash(ForwardSolver):
    name, modules, dense, sparse, description = "test_crash", (), True, True, "always fails"

    def solve(self, P, q, C, d, A, b, **kw):
        return RawSolution(None, None, None, Status.SOLVER_ERROR, info={"error": "boom"})


@pytest.fixture
def claim_solvers():
    def install(direction):
        register_solver(_claims_unbounded(direction))
        register_solver(_Crash)

    yield install
    for name in ("test_claims_unbounded", "test_crash"):
        if name in SOLVERS.classes():
            SOLVERS.unregister(name)


def test_false_unboundedness_claim_does_not_end_the_chain(claim_solvers):
    """PRIMALC2 (bounded, optimum −3551.3): a solver's "dual infeasible" (Clarabel's, in the report)
    ended the fallback chain with a false UnboundedError; HiGHS solves it. Now the claim's direction is
    checked (Pv = 0, Cv ≤ 0, qᵀv < 0), fails, and the chain goes on."""
    from dqp.io import load_maros_meszaros

    claim_solvers(lambda P: -np.ones(P.shape[0]))
    qp = load_maros_meszaros(MM_DIR / "PRIMALC2.mat").to_qp()
    P, q, C, d, A, b = qp.to_torch()
    layer = dQP.dQP_layer(
        empty_batch=False,
        solve_type="sparse",
        qp_solver="test_crash",
        fallback_solver=("test_claims_unbounded", "highs"),
    )
    with _quiet():
        z = layer(P, q, C, d, A, b)[0].numpy()
    assert layer.info.status == [Status.SOLVED] and layer.info.verified == [True]
    assert 0.5 * z @ (qp.P @ z) + qp.q @ z == pytest.approx(-3551.3077, rel=1e-6)


def test_true_unboundedness_claim_ends_the_chain(claim_solvers):
    claim_solvers(lambda P: np.array([0.0, 1.0]))
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="test_crash", fallback_solver=("test_claims_unbounded", "highs"))
    with pytest.raises(UnboundedError, match="unbounded"):
        layer(*_unbounded())
    assert "highs" not in layer.info.messages[0]


# -- 6. HiGHS without a solution; unverified points far from KKT ------------------------------------
@pytest.mark.skipif("highs" not in dqp.solvers.available_solvers(), reason="highspy not installed")
def test_highs_empty_solution_is_a_typed_failure():
    """Before: ValueError: matmul ... size 0 is different from 4 (HiGHS answers failure with x = [])."""
    C = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    C[0] *= 1e16
    args = (torch.eye(4, dtype=F64), -torch.ones(4, dtype=F64), C, torch.ones(3, dtype=F64))
    with _quiet(), pytest.raises(SolveError):
        dQP.dQP_layer(empty_batch=False, qp_solver="highs", fallback_solver=None)(*args)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="highs")
    with _quiet():
        z = layer(*args)[0]
    assert layer.info.status == [Status.SOLVED] and torch.isfinite(z).all()


def test_unverified_point_far_from_kkt_honours_on_failure_raise():
    """P, q × 1e-20: the solver's unverified point came back SOLVED with only a warning."""
    C, d = _box()
    args = (
        torch.eye(2, dtype=F64) * 1e-20,
        -3e-20 * torch.ones(2, dtype=F64),
        C,
        d,
        torch.ones(1, 2, dtype=F64),
        torch.tensor([0.5], dtype=F64),
    )
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel", fallback_solver=None)
    try:
        with _quiet():
            z = layer(*args)[0]
    except SolveError as err:  # the point was far from the KKT conditions: a typed failure
        assert "far from the KKT" in str(err)
    else:  # or it was verified, and then it is the solution
        assert layer.info.verified == [True] and torch.allclose(z, torch.full((2,), 0.25, dtype=F64))


def test_kkt_distance_is_relative():
    P, q = np.eye(2), np.array([-3.0, 0.0])
    C, d = np.array([[1.0, 0.0]]), np.array([2.0])
    data = (P, q, C, d, None, None)
    for s in (1e-12, 1.0, 1e12):
        sdata = (P * s, q * s, C, d, None, None)
        assert kkt_distance(sdata, np.array([2.0, 0.0]), None, np.array([s])) < 1e-12
        assert kkt_distance(sdata, np.array([1.5, 0.0]), None, np.array([s])) > 0.1
    assert kkt_distance(data, np.array([2.0 - 1e-6, 0.0]), None, np.array([1.0])) < 1e-5


# -- 8. infinite and huge bounds --------------------------------------------------------------------
def _with_absent_rows(bound):
    P, q, C, d, A, b, *_ = random_qp(6, 5, 1, seed=1, batch=4)
    extra = torch.randn(4, 2, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    dx = torch.full((4, 2), bound, dtype=F64)
    dx[0, 1] = 50.0  # element 0 bounds the second extra row (far away: inactive, but finite)
    return (P, q, torch.cat([C, extra], 1), torch.cat([d, dx], 1), A, b), (P, q, C, d, A, b)


@pytest.mark.parametrize("solver", ["clarabel", "dqp_ipm", "osqp"])
@pytest.mark.parametrize("bound", [float("inf"), 1e20, 1e30])
def test_infinite_bounds_are_inactive_rows(solver, bound):
    """Before: +inf in d was rejected as non-finite, and 1e20 made the IPM fail ("numerical trouble")."""
    full, ref = _with_absent_rows(bound)
    leaves = [t.clone().requires_grad_() for t in full]
    layer = dQP.dQP_layer(empty_batch=False, qp_solver=solver)
    with _quiet(), inputs_unchanged(*leaves):
        z, lam, mu, _, _ = layer(*leaves)
        (z.sum() + mu.sum()).backward()
    rleaves = [t.clone().requires_grad_() for t in ref]
    with _quiet():
        zr, _, mur, _, _ = dQP.dQP_layer(empty_batch=False, qp_solver=solver)(*rleaves)
        (zr.sum() + mur.sum()).backward()
    assert all(s == Status.SOLVED for s in layer.info.status)
    assert torch.allclose(z, zr, atol=1e-7) and torch.allclose(mu[:, :5], mur, atol=1e-7)
    assert torch.equal(mu[:, 5:], torch.zeros(4, 2, dtype=F64))
    assert torch.allclose(leaves[1].grad, rleaves[1].grad, atol=1e-6)
    assert torch.allclose(leaves[3].grad[:, :5], rleaves[3].grad, atol=1e-6)
    assert torch.equal(leaves[3].grad[:, 5:], torch.zeros(4, 2, dtype=F64))  # the absent rows' gradient is 0
    assert torch.equal(leaves[2].grad[:, 5:], torch.zeros(4, 2, 6, dtype=F64))
    assert np.isfinite(layer.info.complementarity).all()


def test_infinite_bounds_sparse_and_qpth():
    C, d = _box(2)
    d = torch.tensor([1.0, float("inf"), 1.0, 1e25], dtype=F64)
    q = torch.tensor([-3.0, -3.0], dtype=F64)
    z = dQP.dQP_layer(empty_batch=False, solve_type="sparse")(
        torch.eye(2, dtype=F64).to_sparse_csc(), q, C.to_sparse_csc(), d
    )[0]
    assert torch.allclose(z, torch.tensor([1.0, 3.0], dtype=F64), atol=1e-8)
    zq = QPFunction()(torch.eye(2, dtype=F64), q, C, d, torch.Tensor(), torch.Tensor())
    assert torch.allclose(zq[0], torch.tensor([1.0, 3.0], dtype=F64), atol=1e-8)


def test_rows_scaled_with_the_data_are_kept():
    """The bound is huge *relative to its row*: C, d scaled together by 1e20 keep their rows."""
    C, d = _box(2, scale=1e20)
    z = dQP.dQP_layer(empty_batch=False)(torch.eye(2, dtype=F64), torch.tensor([-3.0, 0.0], dtype=F64), C, d)[0]
    assert torch.allclose(z, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-8)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_nan_and_minus_inf_in_d_stay_errors(bad):
    C, d = _box()
    d[1] = bad
    with pytest.raises(NonFiniteError, match="d"):
        dQP.dQP_layer(empty_batch=False)(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), C, d)
    with pytest.raises(NonFiniteError, match="h"):
        QPFunction()(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), C, d, torch.Tensor(), torch.Tensor())


# -- 10. solver keywords and qpth's dtypes ------------------------------------------------------------
@pytest.mark.skipif("osqp" not in dqp.solvers.available_solvers(), reason="osqp not installed")
def test_bad_solver_keyword_is_not_hidden_by_the_fallback_chain():
    """Before: OSQP failed on max_iter='ten' and Clarabel quietly answered."""
    C, d = _box()
    with pytest.raises(SettingsError, match="max_iter"):
        dQP.dQP_layer(empty_batch=False, qp_solver="osqp", qp_solver_keywords={"max_iter": "ten"})(
            torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), C, d
        )


def test_unknown_ipm_keyword_is_a_settings_error():
    """Before: an untyped TypeError from ipm_solve."""
    C, d = _box()
    with pytest.raises(SettingsError, match="max_iters.*did you mean 'max_iter'"):
        dQP.dQP_layer(empty_batch=False, qp_solver="dqp_ipm", qp_solver_keywords={"max_iters": 5})(
            torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), C, d
        )
    with pytest.raises(SettingsError, match="bogus"):
        solve_qp_batch(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), C, d, bogus=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qpth_half_precision_is_a_layout_error(dtype):
    C, d = _box()
    e = torch.Tensor()
    with pytest.raises(LayoutError, match="float32 or float64"):
        QPFunction()(torch.eye(2, dtype=dtype), torch.ones(2, dtype=dtype), C.to(dtype), d.to(dtype), e, e)


def test_qpth_nan_is_a_nonfinite_error():
    C, d = _box()
    e = torch.Tensor()
    p = torch.ones(3, 2, dtype=F64)
    p[2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"p contains NaN.*batch elements \[2\]"):
        QPFunction(check_Q_spd=False)(torch.eye(2, dtype=F64), p, C, d, e, e)


# -- 12. time limits and Ctrl-C ---------------------------------------------------------------------
def test_time_limit_is_validated():
    with pytest.raises(SettingsError, match="positive"):
        dQP.build_settings(time_limit=-1.0)
    if "daqp" in dqp.solvers.available_solvers():
        with pytest.raises(SettingsError, match="'daqp' has no time-limit option"):
            dQP.build_settings(qp_solver="daqp", time_limit=1.0)
    s = dQP.build_settings(qp_solver="clarabel", time_limit=2)
    assert s.time_limit == 2.0
    assert all(get_solver(n).time_limit_keywords(1.0) for n in s.fallback_solver)  # 'auto' keeps those with one


def test_time_limit_reaches_the_solver():
    P, q, C, d, *_ = random_qp(150, 300, 0, seed=4)
    layer = dQP.dQP_layer(
        empty_batch=False, qp_solver="clarabel", time_limit=1e-9, fallback_solver=None, on_failure="mask"
    )
    with _quiet():
        layer(P, q, C, d)
    assert layer.info.status == [Status.MAX_ITER]
    with _quiet(), pytest.raises(MaxIterationsError):
        dQP.dQP_layer(empty_batch=False, qp_solver="clarabel", time_limit=1e-9, fallback_solver=None)(P, q, C, d)
    ok = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel", time_limit=60.0)
    ok(P, q, C, d)
    assert ok.info.status == [Status.SOLVED]


def test_time_limit_warns_on_the_batched_ipm():
    P, q, C, d, *_ = random_qp(4, 3, 0, seed=1, batch=20)
    with pytest.warns(UserWarning, match="time_limit"):
        dQP.dQP_layer(empty_batch=False, time_limit=5.0)(P, q, C, d)  # qp_solver='auto' picks the IPM for B > 16


@pytest.mark.parametrize("parallel", [False, True])
def test_keyboard_interrupt_stops_between_elements(parallel):
    P, q, C, d, *_ = random_qp(20, 30, 0, seed=5, batch=600)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel", omp_parallel=parallel, n_cpu=2)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    # Python's own Ctrl-C handler, whatever the runner left (a job started in the background of a
    # shell inherits an ignored SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            layer(P, q, C, d)
            # finished before the signal (a fast machine): wait for it here, in short sleeps, so that the
            # main thread looks at pending signals often (a signal taken by another thread does not
            # interrupt a long sleep) and a timer thread scheduled late on a loaded machine still counts
            for _ in range(2000):
                time.sleep(0.01)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t0 < 30


def test_solver_exception_with_keywords_warns():
    """An exception that does not name a keyword still is not hidden when keywords were given."""
    from dqp.errors import SolverKeywordWarning

    class Raises(ForwardSolver):
        name, modules, dense, sparse, description = "test_raises", (), True, True, "raises"

        def solve(self, P, q, C, d, A, b, **kw):
            return RawSolution(None, None, None, Status.SOLVER_ERROR, info={"error": "RuntimeError: numerics"})

    register_solver(Raises)
    try:
        C, d = _box()
        layer = dQP.dQP_layer(empty_batch=False, qp_solver="test_raises", qp_solver_keywords={"rho": 0.1})
        with pytest.warns(SolverKeywordWarning, match="rho"):
            z = layer(torch.eye(2, dtype=F64), torch.tensor([-3.0, 0.0], dtype=F64), C, d)[0]
        assert torch.allclose(z, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-8)  # the chain answered
    finally:
        SOLVERS.unregister("test_raises")


@pytest.mark.parametrize("case", [c for c in ALL_SOLVERS if c.values[0].name in ("clarabel", "osqp", "piqp")])
def test_solution_at_origin_with_zero_bounds_is_not_a_failure(case):
    """z* = 0 with d = 0 (nonnegativity-like rows): |C||z| is only the solver's round-off there, so
    the KKT distance must not be measured against it (it used to call the point far from KKT and
    fail the element)."""
    g = torch.Generator().manual_seed(7)
    P, q = torch.eye(3, dtype=F64), torch.randn(2, 3, dtype=F64, generator=g)[1]
    C, d = torch.randn(7, 3, dtype=F64, generator=g), torch.zeros(7, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = dQP.dQP_layer(qp_solver=case.name, empty_batch=False)(P, q, C, d)
    assert out.info.status == [dqp.Status.SOLVED]
    assert float(out[0].abs().max()) < 1e-6
    # the KKT distance of a point 1e-12 off the exact solution, with the exact multipliers, is small
    data = (P.numpy(), q.numpy(), C.numpy(), d.numpy(), None, None)
    mu = out[2].detach().numpy()
    assert kkt_distance(data, np.array([1e-12, -1e-12, 1e-12]), None, mu) < 1e-3
