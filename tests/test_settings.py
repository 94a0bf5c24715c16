"""Settings validation, registries, and the layer's options (each with a behavioural check)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import dqp
from dqp import dQP
from dqp.linsolve import LinearSolver, linsolver_table, register_linsolver, registered_linsolvers
from dqp.solvers import ForwardSolver, register_solver, registered_solvers, solver_table
from conftest import random_qp


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(qp_sovler="osqp"), ["qp_sovler", "did you mean 'qp_solver'"]),
        (dict(qp_solver="nope"), ["not a known solver", "clarabel"]),
        (dict(lin_solver="nope"), ["not a known linear solver", "qdldl"]),
        (dict(qp_solver=3), ["expects str"]),
        (dict(lin_solver=3), ["expects str"]),
        (dict(solve_type="csc"), ["'dense', 'sparse'"]),
        (dict(eps_abs=-1.0), ["(0, 1)"]),
        (dict(eps_active="1e-6"), ["expects float"]),
        (dict(refine_active=1), ["expects bool"]),
        (dict(max_refine_iter=True), ["expects int, got bool"]),
        (dict(max_refine_iter=-1), [">= 0"]),
        (dict(n_cpu=0), ["positive"]),
        (dict(on_failure="ignore"), ["'raise', 'mask'"]),
        (dict(omp_parallel="yes"), ["omp_parallel", "True, False, 'auto'"]),
        (dict(omp_parallel=1), ["omp_parallel", "expects bool or str"]),
    ],
)
def test_bad_settings(kw, words):
    with pytest.raises(dqp.SettingsError) as e:
        dQP.build_settings(**kw)
    for w in words:
        assert w in str(e.value)


def test_registry_lookups_reject_non_strings():
    from dqp.linsolve import resolve_linsolver_name
    from dqp.solvers import resolve_solver_name

    with pytest.raises(dqp.SettingsError, match="must be a string"):
        resolve_solver_name(3)
    with pytest.raises(dqp.SettingsError, match="must be a string"):
        resolve_linsolver_name(3)


def test_reference_aliases_are_accepted():
    for alias, name in [
        ("qdldl", "qdldl"),
        ("pardiso", "pardiso"),
        ("scipy SPLU", "scipy_splu"),
        ("scipy LU", "scipy_lu"),
        ("scipy LDL", "scipy_ldl"),
    ]:
        assert dQP.build_settings(lin_solver=alias).lin_solver == name
    assert dQP.build_settings(qp_solver="OSQP").qp_solver == "osqp"


def test_missing_package_gives_install_hint():
    @register_solver
    class Missing(ForwardSolver):
        name = "missing_test_solver"
        modules = ("a_module_that_does_not_exist_xyz",)
        extra = "missing"

    @register_linsolver
    class MissingLin(LinearSolver):
        name = "missing_test_lin"
        modules = ("another_missing_module_xyz",)

    try:
        with pytest.raises(dqp.SolverNotAvailableError, match=r"pip install 'dqp-torch\[missing\]'"):
            dQP.build_settings(qp_solver="missing_test_solver")
        with pytest.raises(dqp.SolverNotAvailableError, match="pip install another_missing_module_xyz"):
            dQP.build_settings(lin_solver="missing_test_lin")
        assert "missing_test_solver" in solver_table() and "| no |" in solver_table()
    finally:
        from dqp.solvers import base as sb
        from dqp.linsolve import base as lb

        sb.SOLVERS.unregister("missing_test_solver")
        lb.LINSOLVERS.unregister("missing_test_lin")


def test_registry_rejects_nameless_classes():
    with pytest.raises(TypeError):
        register_solver(type("X", (ForwardSolver,), {}))
    with pytest.raises(TypeError):
        register_linsolver(type("Y", (LinearSolver,), {}))


def test_tables_list_everything():
    for name in registered_solvers():
        assert f"`{name}`" in solver_table()
    for name in registered_linsolvers():
        assert f"`{name}`" in linsolver_table()
    assert "eps_active" in dQP.options_table()


def test_layer_constructor_checks():
    with pytest.raises(dqp.SettingsError, match="either"):
        dQP.dQP_layer(settings=dQP.build_settings(), qp_solver="osqp")
    with pytest.raises(dqp.SettingsError, match="build_settings"):
        dQP.dQP_layer(settings=["qp_solver", "osqp"])
    layer = dQP.dQP_layer(qp_solver="osqp")
    assert layer.settings.qp_solver == "osqp" and "osqp" in repr(layer)
    s = layer.settings.replace(eps_active=1e-5)
    assert s.eps_active == 1e-5 and s.qp_solver == "osqp"


def test_solver_pairing_errors():
    P, q, C, d, *_ = random_qp(3, 2, 0, seed=0)
    with pytest.raises(dqp.SettingsError, match="dense batched solver"):
        dQP.dQP_layer(qp_solver="clarabel", lin_solver="torch", solve_type="sparse")(P.to_sparse_csc(), q)


def test_black_box_forward_with_batched_torch_backward():
    """Forward and backward solvers are independent: Clarabel forward, batched torch KKT backward."""
    P, q, C, d, A, b, *_ = random_qp(6, 8, 2, seed=3, batch=4)
    grads = []
    for lin in ("scipy_lu", "torch"):
        ts = [t.clone().requires_grad_() for t in (P, q, C, d, A, b)]
        z, lam, mu, _, _ = dQP.dQP_layer(qp_solver="clarabel", lin_solver=lin)(*ts)
        (z.sum() + mu.sum() + lam.sum()).backward()
        grads.append([t.grad for t in ts])
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("lin", ["qdldl", "pardiso", "scipy_splu", "scipy_lu", "scipy_ldl", "scipy_cholesky"])
@pytest.mark.parametrize("solve_type", ["dense", "sparse"])
def test_every_linear_solver_gives_the_same_gradient(lin, solve_type):
    P, q, C, d, A, b, *_ = random_qp(6, 8, 2, seed=3)
    ref_layer = dQP.dQP_layer(qp_solver="clarabel", lin_solver="scipy_lu")
    qq = q.clone().requires_grad_()
    ref_layer(P, qq, C, d, A, b)[0].sum().backward()
    layer = dQP.dQP_layer(qp_solver="clarabel", lin_solver=lin, solve_type=solve_type)
    q2 = q.clone().requires_grad_()
    mats = (P, C, A) if solve_type == "dense" else (P.to_sparse_csc(), C.to_sparse_csc(), A.to_sparse_csc())
    layer(mats[0], q2, mats[1], d, mats[2], b)[0].sum().backward()
    assert torch.allclose(q2.grad, qq.grad, atol=1e-10)
    assert layer.info.kkt_path == ["direct"]


def test_auto_reports_its_choice(caplog):
    P, q, C, d, *_ = random_qp(3, 2, 0, seed=0)
    layer = dQP.dQP_layer(verbose=True)
    with caplog.at_level(logging.INFO, logger="dqp"):
        layer(P, q, C, d)
    assert "picked 'clarabel'" in caplog.text
    assert layer.info.qp_solver == "clarabel" and layer.info.lin_solver.startswith("auto")


def test_time_option_and_empty_batch():
    P, q, C, d, *_ = random_qp(3, 2, 0, seed=0)
    out = dQP.dQP_layer(qp_solver="clarabel", empty_batch=False)(P, q, C, d)
    assert out.solve_time is None and out.forward_time is None and out.z.shape == (3,)
    out = dQP.dQP_layer(qp_solver="clarabel", time=True)(P, q, C, d)  # empty_batch=True is the default
    assert out.solve_time > 0 and out.forward_time >= out.solve_time and out.z.shape == (1, 3)
    assert out.mu.shape == (1, 2) and out.lam.shape == (1, 0)


def test_warm_start_uses_previous_solution(monkeypatch):
    P, q, C, d, *_ = random_qp(5, 6, 0, seed=1, batch=2)
    layer = dQP.dQP_layer(qp_solver="osqp", warm_start_from_previous=True)
    seen = []
    solver = layer._engine("osqp", "auto").solver
    orig = solver.solve

    def spy(*a, initvals=None, **k):
        seen.append(None if initvals is None else initvals.copy())
        return orig(*a, initvals=initvals, **k)

    monkeypatch.setattr(solver, "solve", spy)
    z1 = layer(P, q, C, d)[0]
    z2 = layer(P, q + 1e-3, C, d)[0]
    assert seen[0] is None and seen[1] is None
    np.testing.assert_allclose(seen[2], z1[0].numpy())
    np.testing.assert_allclose(seen[3], z1[1].numpy())
    assert not torch.allclose(z1, z2)


def test_omp_parallel_matches_serial():
    P, q, C, d, *_ = random_qp(8, 10, 0, seed=2, batch=6)
    serial = dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d)[0]
    layer = dQP.dQP_layer(qp_solver="clarabel", omp_parallel=True, n_cpu=2)
    par = layer(P, q, C, d)[0]
    pool = layer._engines[("clarabel", "auto")]._pool
    layer(P, q, C, d)
    assert layer._engines[("clarabel", "auto")]._pool is pool  # created once, reused
    assert torch.allclose(serial, par, atol=1e-12)


def _parallel_records(caplog, layer, *args):
    with caplog.at_level(logging.DEBUG, logger="dqp"):
        caplog.clear()
        out = layer(*args)
    return out, [r for r in caplog.records if "omp_parallel='auto'" in r.getMessage()]


def test_omp_parallel_auto_is_the_default_and_pools_only_long_elements_of_gil_free_solvers(caplog):
    """'auto': the pool only when an element takes PARALLEL_MIN_ELEMENT_S (4 ms) of CPU time, measured on
    the first element of a new problem shape and then taken from the last call of that shape, and only
    for solvers that run without the GIL; the answers are those of the sequential solve."""
    assert dQP.build_settings().omp_parallel == "auto"
    from dqp.engine import Engine
    from dqp.solvers import get_solver

    assert get_solver("clarabel").gil_free and not get_solver("piqp").gil_free
    long_ = random_qp(120, 120, 0, seed=3, batch=3)[:4]  # Clarabel: tens of ms per element
    short = random_qp(4, 5, 0, seed=3, batch=3)[:4]  # well under 1 ms
    serial = dQP.dQP_layer(qp_solver="clarabel", omp_parallel=False)(*long_)[0]
    auto = dQP.dQP_layer(qp_solver="clarabel", n_cpu=2)
    for call in range(2):  # a new shape (its first element measured), then the same shape again
        z, recs = _parallel_records(caplog, auto, *long_)
        assert len(recs) == 1 and "2 workers" in recs[0].getMessage(), call
        per_element = float(recs[0].getMessage().split(": ")[1].split(" ms")[0])
        assert per_element >= 1e3 * Engine.PARALLEL_MIN_ELEMENT_S
        assert torch.allclose(z[0], serial, atol=1e-12)
    for call in range(2):  # another shape on the same layer: its own measurement
        assert not _parallel_records(caplog, auto, *short)[1], call
    assert not _parallel_records(caplog, dQP.dQP_layer(qp_solver="piqp", n_cpu=2), *long_)[1]
    assert not _parallel_records(caplog, dQP.dQP_layer(qp_solver="clarabel", n_cpu=1), *long_)[1]


def test_solver_table_says_which_solvers_run_in_parallel():
    head, _, *body = solver_table().splitlines()
    col = [c.strip() for c in head.split("|")].index("parallel")
    cells = {line.split("|")[1].strip(): line.split("|")[col].strip() for line in body}
    assert cells["`clarabel`"] == "yes" and cells["`osqp`"] == "yes"
    assert cells["`piqp`"] == "no" and cells["`dqp_ipm`"] == "no"


def test_dual_available_false_gives_same_duals():
    P, q, C, d, A, b, *_ = random_qp(6, 8, 2, seed=4)
    a = dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d, A, b)
    b2 = dQP.dQP_layer(qp_solver="clarabel", dual_available=False)(P, q, C, d, A, b)
    for x, y in zip(a[:3], b2[:3]):
        assert torch.allclose(x, y, atol=1e-9)


@pytest.mark.parametrize("solve_type", ["dense", "sparse"])
def test_normalize_constraints_keeps_solution_duals_and_gradients(solve_type):
    P, q, C, d, A, b, *_ = random_qp(5, 6, 2, seed=6)
    C = C * torch.tensor([1e3, 1e-2, 1.0, 5.0, 1e2, 0.3], dtype=torch.float64).unsqueeze(1)
    d = d * torch.tensor([1e3, 1e-2, 1.0, 5.0, 1e2, 0.3], dtype=torch.float64)
    outs = []
    for norm in (False, True):
        layer = dQP.dQP_layer(qp_solver="clarabel", normalize_constraints=norm, solve_type=solve_type)
        Cv = C.clone().requires_grad_()
        dv = d.clone().requires_grad_()
        Cin = Cv.to_sparse_csc() if solve_type == "sparse" else Cv
        Pin, Ain = (P.to_sparse_csc(), A.to_sparse_csc()) if solve_type == "sparse" else (P, A)
        z, lam, mu, _, _ = layer(Pin, q, Cin, dv, Ain, b)
        (z.sum() + mu.sum() + lam.sum()).backward()
        outs.append((z.detach(), lam.detach(), mu.detach(), Cv.grad, dv.grad))
    for x, y in zip(*outs):
        assert torch.allclose(x, y, rtol=1e-7, atol=1e-9)


def test_verbose_logs_summary(caplog):
    P, q, C, d, *_ = random_qp(3, 2, 0, seed=0)
    with caplog.at_level(logging.INFO, logger="dqp"):
        dQP.dQP_layer(qp_solver="clarabel", verbose=True)(P, q, C, d)
    assert "1/1 solved" in caplog.text


def test_no_grad_path_skips_autograd():
    P, q, C, d, *_ = random_qp(3, 2, 0, seed=0)
    z = dQP.dQP_layer(qp_solver="clarabel")(P, q.requires_grad_(False), C, d)[0]
    assert z.grad_fn is None
    with torch.no_grad():
        z = dQP.dQP_layer(qp_solver="clarabel")(P, q.clone().requires_grad_(), C, d)[0]
    assert z.grad_fn is None


def test_osqp_warm_start_saves_iterations():
    """Primal-dual warm starts in a loop of nearby problems (the bilevel use case)."""
    P, q, C, d, A, b, *_ = random_qp(40, 60, 4, seed=1)
    totals = {}
    for warm in (False, True):
        layer = dQP.dQP_layer(qp_solver="osqp", warm_start_from_previous=warm)
        its = []
        for k in range(8):
            z = layer(P, q + 0.01 * k, C, d, A, b)[0]
            its.append(layer.info.iterations[0])
            assert layer.info.verified == [True]
        totals[warm] = sum(its[1:])
    ref = dQP.dQP_layer(qp_solver="clarabel")(P, q + 0.07, C, d, A, b)[0]
    assert torch.allclose(z, ref, atol=1e-9)
    assert totals[True] < totals[False]


def test_editing_the_output_leaves_the_warm_start_alone():
    """A one-problem call's outputs are the caller's own: editing z in place (here to NaN) does not
    reach the layer's warm start, so the next call starts from the previous solution and agrees."""
    P, q, C, d, A, b, *_ = random_qp(20, 30, 2, seed=3)
    layer = dQP.dQP_layer(qp_solver="osqp", warm_start_from_previous=True)
    with torch.no_grad():
        z, lam, mu = layer(P, q, C, d, A, b)[:3]
        first, first_iterations = z.clone(), layer.info.iterations[0]
        for t in (z, lam, mu):
            t.fill_(float("nan"))
        again = layer(P, q, C, d, A, b)[0]
    # OSQP itself solved it, from the previous solution (a NaN start fails and Clarabel steps in)
    assert layer.info.messages == [""] and layer.info.iterations[0] < first_iterations, layer.info
    assert layer.info.verified == [True] and torch.allclose(again, first, atol=1e-9)


def test_reference_defaults_are_accepted():
    """libdqp-style calls: None means 'choose', eps_rel may be 0."""
    s = dQP.build_settings(qp_solver=None, lin_solver=None, dual_available=None, eps_rel=0)
    assert (s.qp_solver, s.lin_solver, s.dual_available, s.eps_rel) == ("auto", "auto", True, 0.0)
    with pytest.raises(dqp.SettingsError, match=r"\[0, 1\)"):
        dQP.build_settings(eps_rel=-0.1)


def test_osqp_workspaces_follow_the_batch_size():
    P, q, C, d, *_ = random_qp(5, 6, 0, seed=2, batch=4)
    layer = dQP.dQP_layer(qp_solver="osqp")
    layer(P, q, C, d)
    solver = layer._engine("osqp", "auto").solver
    assert set(solver._workspaces) == {0, 1, 2, 3}
    z = layer(P[:2], q[:2], C[:2], d[:2])[0]
    assert set(solver._workspaces) == {0, 1}
    ref = dQP.dQP_layer(qp_solver="clarabel")(P[:2], q[:2], C[:2], d[:2])[0]
    assert torch.allclose(z, ref, atol=1e-9)
