"""Infeasible/unbounded problems, masked failures, and degenerate active sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dqp
from dqp import dQP
from dqp.errors import Status, error_for_statuses
from conftest import ALL_SOLVERS, random_qp

F64 = torch.float64


def infeasible_batch():
    P = torch.eye(2, dtype=F64).expand(3, 2, 2).clone()
    q = torch.zeros(3, 2, dtype=F64)
    C = torch.tensor([[1.0, 0], [-1, 0]], dtype=F64).expand(3, 2, 2).clone()
    d = torch.tensor([[1.0, 1], [-1, -1], [1, 1]], dtype=F64)  # element 1: x1 <= -1 and x1 >= 1
    return P, q, C, d


@pytest.mark.parametrize("case", ALL_SOLVERS)
def test_infeasible_element_is_named(case):
    with pytest.raises(dqp.InfeasibleError) as e:
        dQP.dQP_layer(empty_batch=False, qp_solver=case.name)(*infeasible_batch())
    assert e.value.batch_indices == [1]
    assert "batch element 1" in str(e.value) and "on_failure='mask'" in str(e.value)


@pytest.mark.parametrize("solver", ["clarabel", "osqp", "piqp", "proxqp", "highs", "scs", "qpalm"])
def test_unbounded_is_reported(solver):
    P = torch.zeros(2, 2, dtype=F64)
    q = torch.tensor([-1.0, 0], dtype=F64)
    C = torch.tensor([[0.0, 1.0]], dtype=F64)
    d = torch.tensor([1.0], dtype=F64)
    with pytest.raises(dqp.UnboundedError, match="unbounded"):
        dQP.dQP_layer(empty_batch=False, qp_solver=solver)(P, q, C, d)


def test_mask_mode_returns_zeros_and_status():
    P, q, C, d = infeasible_batch()
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel", on_failure="mask")
    qq = q.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, lam, mu, _, _ = layer(P, qq, C, d)
    assert layer.info.status == [Status.SOLVED, Status.PRIMAL_INFEASIBLE, Status.SOLVED]
    assert layer.info.failed == [1] and not layer.info.ok
    z.sum().backward()
    assert torch.all(z[1] == 0) and torch.all(qq.grad[1] == 0)
    assert torch.isfinite(qq.grad).all() and torch.allclose(qq.grad[0], -torch.ones(2, dtype=F64))


def test_error_for_statuses_lists_all_failures():
    err = error_for_statuses([Status.SOLVED, Status.MAX_ITER, Status.NUMERICAL] + [Status.SOLVER_ERROR] * 25, "x")
    assert isinstance(err, dqp.MaxIterationsError) and err.batch_indices[0] == 1
    assert "and 7 more" in str(err)
    assert error_for_statuses([Status.SOLVED], "x") is None
    assert isinstance(error_for_statuses([Status.NUMERICAL], "x"), dqp.SolverFailedError)


def test_max_iterations_is_recovered_or_reported():
    """OSQP stopped after 2 iterations: dqp either certifies the polished point or raises."""
    P, q, C, d, *_ = random_qp(10, 15, 0, seed=3)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="osqp", qp_solver_keywords={"max_iter": 2}, refine_active=False)
    try:
        z = layer(P, q, C, d)[0]
    except dqp.SolveError as e:
        assert isinstance(e, (dqp.MaxIterationsError, dqp.SolverFailedError))
    else:
        ref = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")(P, q, C, d)[0]
        assert layer.info.verified == [True] and torch.allclose(z, ref, atol=1e-8)


def test_inaccurate_solver_is_repaired_by_refinement():
    """A loose OSQP tolerance mislabels constraints; refine_active repairs the set exactly."""
    P, q, C, d, *_ = random_qp(20, 40, 0, seed=8, frac_active=0.4)
    ref = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")(P, q, C, d)[0]
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="osqp", eps_abs=1e-3, eps_rel=1e-3, eps_active=1e-7)
    z = layer(P, q, C, d)[0]
    assert layer.info.verified == [True]
    assert torch.allclose(z, ref, atol=1e-9)


# ---------------------------------------------------------------- degenerate cases
def test_duplicate_active_rows_licq_failure():
    """The same active constraint twice: K is singular; gradients w.r.t. z stay finite and right."""
    n = 3
    P = torch.eye(n, dtype=F64)
    q = torch.tensor([-2.0, 0.5, 0.1], dtype=F64)
    C = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], dtype=F64)
    d = torch.tensor([1.0, 1.0, 5.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    qq = q.clone().requires_grad_()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        z, lam, mu, _, _ = layer(P, qq, C, d)
    assert torch.allclose(z, torch.tensor([1.0, -0.5, -0.1], dtype=F64), atol=1e-8)
    assert abs((mu[0] + mu[1]).item() - 1.0) < 1e-8  # the split of the dual is not unique
    assert layer.info.kkt_path == ["regularized"]
    z.sum().backward()
    assert torch.allclose(qq.grad, torch.tensor([0.0, -1.0, -1.0], dtype=F64), atol=1e-6)


def test_more_active_rows_than_variables():
    """Four constraints active at a vertex of a 2-D problem (LICQ fails)."""
    P = torch.eye(2, dtype=F64)
    q = torch.tensor([-3.0, -3.0], dtype=F64)
    C = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0], [2.0, 1.0]], dtype=F64)
    d = torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    qq = q.clone().requires_grad_()
    z = layer(P, qq, C, d)[0]
    z.sum().backward()
    assert torch.allclose(z, torch.ones(2, dtype=F64), atol=1e-8)
    assert torch.isfinite(qq.grad).all()
    assert torch.allclose(qq.grad, torch.zeros(2, dtype=F64), atol=1e-6)  # z is pinned at the vertex


def test_weakly_active_constraint_is_flagged():
    """min ½‖z − (1,0)‖² s.t. z1 <= 1: at the boundary with a zero multiplier."""
    P = torch.eye(2, dtype=F64)
    q = torch.tensor([-1.0, 0.0], dtype=F64)
    C = torch.tensor([[1.0, 0.0]], dtype=F64)
    d = torch.tensor([1.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    qq = q.clone().requires_grad_()
    z = layer(P, qq, C, d)[0]
    z.sum().backward()
    assert layer.info.n_weakly_active == [1]
    assert torch.isfinite(qq.grad).all()


def test_rank_deficient_equalities():
    P = torch.eye(3, dtype=F64)
    q = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    A = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]], dtype=F64)
    b = torch.tensor([1.0, 2.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    qq = q.clone().requires_grad_()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        z = layer(P, qq, None, None, A, b)[0]
    assert torch.allclose(z, torch.tensor([1.0, 0.0, -3.0], dtype=F64), atol=1e-7)
    z.sum().backward()
    assert torch.isfinite(qq.grad).all()
    assert torch.allclose(qq.grad, torch.tensor([0.0, 0.0, -1.0], dtype=F64), atol=1e-6)


def test_semidefinite_P_lp():
    """An LP (P = 0) with a unique vertex solution."""
    P = torch.zeros(2, 2, dtype=F64)
    q = torch.tensor([-1.0, -1.0], dtype=F64)
    C = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]], dtype=F64)
    d = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    dd = d.clone().requires_grad_()
    z = layer(P, q, C, dd)[0]
    assert torch.allclose(z, torch.tensor([1.0, 2.0], dtype=F64), atol=1e-8)
    z.sum().backward()
    assert torch.allclose(dd.grad, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64), atol=1e-8)


def test_unverified_solution_is_flagged_and_warned():
    """A solver that claims success with a wrong point: without refinement dqp cannot verify it, and
    a point that far from the KKT conditions is reported as a failure."""
    from dqp.solvers import ForwardSolver, RawSolution, register_solver
    from dqp.solvers import base as sb

    @register_solver
    class WrongSolver(ForwardSolver):
        name = "test_wrong_solver"
        modules = ("numpy",)

        def solve(self, P, q, C, d, A, b, **kw):
            return RawSolution(np.full(P.shape[0], 5.0), None, np.zeros(C.shape[0]), Status.SOLVED)

    try:
        P, q, C, d, *_ = random_qp(4, 6, 0, seed=2)
        layer = dQP.dQP_layer(
            empty_batch=False,
            qp_solver="test_wrong_solver",
            refine_active=False,
            fallback_solver=None,
            on_failure="mask",
        )
        z = layer(P, q, C, d)[0]
        # unverified and far from the KKT conditions: a failure (zeros, a status), not a warned answer
        assert layer.info.verified == [False] and layer.info.status == [Status.NUMERICAL]
        assert "far from the KKT conditions" in layer.info.messages[0]
        assert torch.equal(z, torch.zeros(4, dtype=F64))
        # with refinement the same wrong start is repaired into the true solution
        good = dQP.dQP_layer(empty_batch=False, qp_solver="test_wrong_solver")(P, q, C, d)[0]
        ref = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")(P, q, C, d)[0]
        assert torch.allclose(good, ref, atol=1e-8)
    finally:
        sb.SOLVERS.unregister("test_wrong_solver")


def test_complementarity_margin_reports_distance_to_active_set_change():
    P = torch.eye(2, dtype=F64)
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    d = torch.tensor([1.0, 1.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    layer(P, torch.tensor([-3.0, -0.25], dtype=F64), C, d)  # z = (1, 0.25): mu_1 = 2, slack_2 = 0.75
    assert abs(layer.info.complementarity_margin[0] - 0.75) < 1e-8
    layer(P, torch.tensor([-1.0, 0.0], dtype=F64), C, d)  # z1 = 1 exactly with mu_1 = 0: weakly active
    assert layer.info.complementarity_margin[0] < 1e-8


def test_non_unique_solution_lp_face():
    """min -z1 over the unit box: every z2 in [0, 1] is optimal. dqp returns a verified optimal point."""
    P = torch.zeros(2, 2, dtype=F64)
    q = torch.tensor([-1.0, 0.0], dtype=F64)
    C = torch.cat([torch.eye(2), -torch.eye(2)]).double()
    d = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    dd = d.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = layer(P, q, C, dd)[0]
    assert abs(z[0].item() - 1.0) < 1e-8 and -1e-8 <= z[1].item() <= 1 + 1e-8
    assert layer.info.verified == [True]
    z[0].backward()
    assert torch.isfinite(dd.grad).all() and abs(dd.grad[0].item() - 1.0) < 1e-6


def test_inaccurate_backward_solve_is_warned():
    """An inconsistent adjoint system (gradient w.r.t. a non-unique dual) cannot be solved: warn."""
    from dqp.autograd import GradientAccuracyWarning

    P = torch.eye(2, dtype=F64)
    q = torch.tensor([-2.0, 0.0], dtype=F64)
    C = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)  # the same constraint twice
    d = torch.tensor([1.0, 1.0], dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
    qq = q.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, lam, mu, _, _ = layer(P, qq, C, d)
    with pytest.warns(GradientAccuracyWarning, match="inaccurate"):
        mu[0].backward()  # mu_0 alone is not a function of the data (only mu_0 + mu_1 is)
    assert layer.info.backward_residual[0] > 1e-6


def test_double_backward_raises_instead_of_returning_wrong_numbers():
    P, q, C, d, *_ = random_qp(3, 2, 0, seed=1)
    qq = q.clone().requires_grad_()
    z = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")(P, qq, C, d)[0]
    with pytest.raises(dqp.NotSupportedError, match="second derivatives"):  # (tests/test_transforms.py)
        torch.autograd.grad((z**2).sum(), qq, create_graph=True)


def test_float32_inputs_built_as_LLt_are_accepted():
    torch.manual_seed(0)
    L = torch.randn(6, 6)
    P = L @ L.T + torch.eye(6)
    z = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")(P, torch.ones(6), torch.ones(1, 6), -torch.ones(1))[0]
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


@pytest.mark.parametrize("solve_type", ["dense", "sparse"])
def test_normalize_constraints_survives_huge_rows(solve_type):
    P = torch.eye(2, dtype=F64)
    q = torch.ones(2, dtype=F64)
    for s in (1.0, 1e160):
        C = torch.tensor([[s, s]], dtype=F64)
        d = torch.tensor([-3.0 * s], dtype=F64)
        layer = dQP.dQP_layer(
            empty_batch=False, qp_solver="clarabel", normalize_constraints=True, solve_type=solve_type
        )
        z = layer(
            P.to_sparse_csc() if solve_type == "sparse" else P, q, C.to_sparse_csc() if solve_type == "sparse" else C, d
        )[0]
        assert torch.allclose(z, torch.tensor([-1.5, -1.5], dtype=F64), atol=1e-8), (s, z)


def test_scale_invariance_of_the_verified_solution():
    """The same constraints in other units give the same verified solution (no looser check)."""
    P = torch.eye(2, dtype=F64)
    q = torch.tensor([-3.0, 0.0], dtype=F64)
    C = torch.tensor([[2.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    d = torch.tensor([2.0, 0.0, 2.0], dtype=F64)
    for s in (1.0, 1e-7, 1e7):
        layer = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel")
        z = layer(P, q, s * C, s * d)[0]
        assert layer.info.verified == [True]
        assert torch.allclose(z, torch.tensor([1.5, -1.5], dtype=F64), atol=1e-7), (s, z)


def test_unconstrained_problem_is_solved_without_a_solver():
    n = 300
    P = (
        torch.diag(torch.full((n,), 4.0, dtype=F64))
        - torch.diag(torch.ones(n - 1, dtype=F64), 1)
        - torch.diag(torch.ones(n - 1, dtype=F64), -1)
    )
    q = torch.ones(n, dtype=F64)
    layer = dQP.dQP_layer(empty_batch=False)
    z = layer(P, q)[0]
    assert torch.allclose(P @ z, -q, atol=1e-10) and "directly" in layer.info.messages[0]


def test_singular_fallback_does_not_depend_on_the_linear_solver():
    P = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    q = torch.tensor([-2.0, 0.0], dtype=F64)
    C = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)
    d = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)
    grads = []
    for lin in ("scipy_lu", "scipy_cholesky"):
        dd = d.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z = dQP.dQP_layer(empty_batch=False, qp_solver="clarabel", lin_solver=lin)(P, q, C, dd)[0]
            z[0].backward()
        grads.append(dd.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
