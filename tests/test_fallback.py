"""The fallback_solver chain: when qp_solver fails on an element, other solvers are tried in turn."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from dqp import dQP
from dqp.errors import InfeasibleError, SettingsError, SolverFailedError, SolverNotAvailableError, Status
from dqp.settings import AUTO_FALLBACKS
from dqp.solvers import available_solvers, get_solver
from dqp.solvers.base import SOLVERS, ForwardSolver, RawSolution, register_solver

CALLS: List[str] = []


def _double(name: str, description: str, answer):
    """A registered-able test solver that logs its call in CALLS and returns ``answer(P, q, C, d, A, b)``."""

    class Double(ForwardSolver):
        modules = ()
        dense = sparse = True
        batched = False

        def solve(self, P, q, C, d, A, b, **kw) -> RawSolution:
            CALLS.append(self.name)
            return answer(P, q, C, d, A, b)

    Double.name, Double.description = name, f"test double: {description}"
    return Double


# no solution (like a solver that crashed); Clarabel with a call log; an inaccurate "solved" point
_Failing = _double(
    "test_failing",
    "always fails",
    lambda *data: RawSolution(None, None, None, Status.SOLVER_ERROR, info={"raw_status": "boom"}),
)
_Counting = _double("test_counting", "Clarabel with a call log", lambda *data: get_solver("clarabel").solve(*data))
_Sloppy = _double(
    "test_sloppy",
    "an inaccurate 'solved' point",
    lambda *data: RawSolution(np.array([1.5, 0.0]), None, None, Status.SOLVED),
)


DOUBLES = (_Failing, _Counting, _Sloppy)


@pytest.fixture(autouse=True)
def _doubles():
    for cls in DOUBLES:
        register_solver(cls)
    CALLS.clear()
    yield
    for cls in DOUBLES:
        SOLVERS.unregister(cls.name)


def _qp():
    """min ½‖z‖² − z₁ s.t. z₂ ≤ 0, z₁ ≤ 2 → z = (1, 0)."""
    P = torch.eye(2, dtype=torch.float64)
    q = torch.tensor([-1.0, 0.0], dtype=torch.float64, requires_grad=True)
    C = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([0.0, 2.0], dtype=torch.float64)
    return P, q, C, d


def test_failed_solver_is_rescued_by_the_chain_in_order():
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(
            empty_batch=False, qp_solver="test_failing", fallback_solver=("test_failing", "test_counting")
        )
    )
    P, q, C, d = _qp()
    z = layer(P, q, C, d)[0]
    assert torch.allclose(z.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-8)
    assert CALLS == ["test_failing", "test_counting"]  # the primary is not retried
    assert layer.info.verified == [True]
    assert any("test_counting" in msg for msg in layer.info.messages)
    (g,) = torch.autograd.grad(z[0], q)
    assert torch.allclose(g, torch.tensor([-1.0, 0.0], dtype=torch.float64), atol=1e-8)


def _qp_strong():
    """min ½‖z‖² − 3 z₁ s.t. z₁ ≤ 2 → z = (2, 0), μ = 1 (strictly active)."""
    P = torch.eye(2, dtype=torch.float64)
    q = torch.tensor([-3.0, 0.0], dtype=torch.float64, requires_grad=True)
    C = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    return P, q, C, d


@pytest.mark.parametrize("on_unverified", [True, False])
def test_unverified_answer_triggers_the_chain(on_unverified):
    # the sloppy point (1.5, 0) puts the row z₁ ≤ 2 out of the active set; without repairs its polish
    # (z = (3, 0)) fails the KKT check, so the answer is unverified, and too far from the KKT
    # conditions to be returned: without the chain it is a failure
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(
            empty_batch=False,
            qp_solver="test_sloppy",
            refine_active=False,
            on_failure="mask",
            fallback_solver=("test_counting",),
            fallback_on_unverified=on_unverified,
        )
    )
    P, q, C, d = _qp_strong()
    if on_unverified:
        z = layer(P, q, C, d)[0]
        assert CALLS == ["test_sloppy", "test_counting"]
        assert layer.info.verified == [True]
        assert torch.allclose(z.detach(), torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-8)
        assert any(
            "could not be verified; solved by fallback_solver 'test_counting'" in msg for msg in layer.info.messages
        )
        (gd,) = torch.autograd.grad(z[0], d)
        assert torch.allclose(gd, torch.ones(1, dtype=torch.float64), atol=1e-8)
    else:
        layer(P, q, C, d)
        assert CALLS == ["test_sloppy"]
        assert layer.info.verified == [False] and layer.info.status == [Status.NUMERICAL]


def test_unverified_answer_is_judged_when_no_fallback_verifies():
    """The chain's note survives; the far-off point is then a failure (issue 23 #6), not a warned answer."""
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(
            empty_batch=False,
            qp_solver="test_sloppy",
            refine_active=False,
            fallback_solver=("test_failing",),
            on_failure="mask",
        )
    )
    layer(*_qp_strong())
    assert CALLS == ["test_sloppy", "test_failing"]
    assert layer.info.verified == [False]
    assert layer.info.status == [Status.NUMERICAL]
    assert any(
        "no fallback verified it (test_failing: SOLVER_ERROR)" in msg and "far from the KKT" in msg
        for msg in layer.info.messages
    )
    with pytest.raises(SolverFailedError, match="far from the KKT conditions"):
        dQP.dQP_layer(settings=dQP.build_settings(qp_solver="test_sloppy", refine_active=False, fallback_solver=None))(
            *_qp_strong()
        )


def test_no_fallback_raises_with_the_solvers_message():
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(empty_batch=False, qp_solver="test_failing", fallback_solver=None)
    )
    with pytest.raises(SolverFailedError, match="boom"):
        layer(*_qp())
    assert CALLS == ["test_failing"]


def test_duplicates_and_the_primary_are_skipped():
    s = dQP.build_settings(qp_solver="test_failing", fallback_solver=["test_failing", "test_counting", "test_counting"])
    assert s.fallback_solver == ("test_failing", "test_counting")
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(empty_batch=False, qp_solver="test_failing", fallback_solver=["test_failing"])
    )
    with pytest.raises(SolverFailedError):
        layer(*_qp())
    assert CALLS == ["test_failing"]


def test_infeasibility_certificate_ends_the_chain():
    # z ≤ −1 and −z ≤ −1 (z ≥ 1): infeasible; Clarabel proves it, the next solver is never asked
    P = torch.eye(1, dtype=torch.float64)
    q = torch.zeros(1, dtype=torch.float64)
    C = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    d = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(
            empty_batch=False, qp_solver="test_failing", fallback_solver=("clarabel", "test_counting")
        )
    )
    with pytest.raises(InfeasibleError):
        layer(P, q, C, d)
    assert CALLS == ["test_failing"]


def test_auto_is_the_installed_subset_in_order():
    s = dQP.build_settings()
    have = set(available_solvers())
    assert s.fallback_solver == tuple(x for x in AUTO_FALLBACKS if x in have)
    assert s.fallback_solver[0] == "clarabel"  # a core dependency


@pytest.mark.parametrize("bad, err", [((3,), SettingsError), ("no_such_solver", SettingsError), (1.5, SettingsError)])
def test_bad_fallback_values(bad, err):
    with pytest.raises(err):
        dQP.build_settings(fallback_solver=bad)


def test_fallback_not_installed_names_the_install(monkeypatch):
    monkeypatch.setattr(_Counting, "modules", ("surely_not_a_module_xyz",))
    with pytest.raises(SolverNotAvailableError, match="test_counting"):
        dQP.build_settings(fallback_solver=("test_counting",))


MM_DIR = Path(__file__).resolve().parent / "data" / "maros_meszaros"  # a small subset shipped with the tests


@pytest.mark.parametrize("name", ["YAO", "GOULDQP3", "QSIERRA"])
def test_maros_meszaros_almostsolved_is_rescued(name):
    """Clarabel stops at 'almostsolved' on YAO and QSIERRA, and its point on GOULDQP3 does not verify;
    the auto chain (PIQP, HiGHS) gives verified points. On QSIERRA PIQP's point does not verify and
    HiGHS stops with a solve error: its point verifies after the ladder, which the chain's last solver
    gets (a solver with another fallback still to ask skips it)."""
    pytest.importorskip("piqp")
    pytest.importorskip("highspy")
    import dqp.io

    P, q, C, d, A, b = dqp.io.load_maros_meszaros(MM_DIR / f"{name}.mat").to_qp().to_torch(sparse=True)
    layer = dQP.dQP_layer(settings=dQP.build_settings(empty_batch=False, qp_solver="clarabel", solve_type="sparse"))
    z = layer(P, q, C, d, A, b)[0]
    assert torch.isfinite(z).all()
    assert layer.info.verified == [True]
    assert any("solved by fallback_solver" in msg for msg in layer.info.messages)
    assert np.isfinite(layer.info.primal_residual[0])
    if name == "QSIERRA":  # the chain's last solver, whose failed point verifies after the ladder
        assert "fallback_solver 'highs'" in layer.info.messages[0] and layer.info.polish_path == ["ladder"]


def test_time_limit_keywords_come_from_the_backend():
    assert get_solver("clarabel").time_limit_keywords(2.5) == {"time_limit": 2.5}
    assert get_solver("test_counting").time_limit_keywords(2.5) == {}  # no limit: nothing passed
    if "highs" in available_solvers():
        assert get_solver("highs").time_limit_keywords(1) == {"time_limit": 1.0}
