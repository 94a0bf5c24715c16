"""Every :mod:`qpsolvers` backend as a dqp forward solver.

One registry entry per backend qpsolvers knows (installed or not), so ``qp_solver="piqp"`` either
works or says exactly which package to install. Tolerances ``eps_abs``/``eps_rel`` are translated to
each backend's own keywords in :data:`TOLERANCE_KEYWORDS`.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any, Dict, Optional

import numpy as np
import scipy.sparse as sp

from dqp.errors import Status, numerics_quiet
from dqp.solvers.base import ForwardSolver, RawSolution, register_solver

logger = logging.getLogger("dqp")

#: backend name -> (python module deciding availability, dqp pip extra, formats, description)
BACKENDS: Dict[str, tuple] = {
    "clarabel": ("clarabel", "", "S", "Interior point (Rust); accurate, sparse; the default."),
    "osqp": ("osqp", "", "S", "ADMM (C); sparse; fast, moderately accurate (dqp polishes the result)."),
    "piqp": ("piqp", "piqp", "DS", "Proximal interior point (C++); dense and sparse."),
    "proxqp": ("proxsuite", "proxqp", "DS", "Proximal augmented Lagrangian (C++, ProxSuite); dense and sparse."),
    "daqp": ("daqp", "daqp", "D", "Dual active set (C); dense; exact on small problems."),
    "quadprog": ("quadprog", "quadprog", "D", "Goldfarb-Idnani active set; dense; needs P positive definite."),
    "highs": ("highspy", "highs", "S", "HiGHS (C++); sparse."),
    "cvxopt": ("cvxopt", "cvxopt", "DS", "Interior point (CVXOPT); dense and sparse."),
    "ecos": ("ecos", "ecos", "D", "Interior point for SOCPs (C); needs P positive definite."),
    "scs": ("scs", "scs", "S", "Splitting conic solver (C); sparse; low accuracy."),
    "qpalm": ("qpalm", "qpalm", "S", "Proximal augmented Lagrangian (C); sparse."),
    "gurobi": ("gurobipy", "", "S", "Gurobi (commercial)."),
    "mosek": ("mosek", "", "S", "MOSEK (commercial)."),
    "hpipm": ("hpipm_python", "", "D", "HPIPM interior point."),
    "kvxopt": ("kvxopt", "", "DS", "KVXOPT interior point."),
    "qpswift": ("qpSWIFT", "", "D", "qpSWIFT interior point."),
    "sip": ("sip_python", "", "S", "SIP interior point."),
}


#: backends whose qpsolvers wrapper passes ``initvals`` to the solver (the others ignore them)
WARM_START_BACKENDS = frozenset(
    {"osqp", "proxqp", "qpalm", "highs", "scs", "mosek", "sip", "pdhcg", "nppro", "pyqpmad"}
)


#: backends whose solve runs without the GIL: measured with 4 solves of a 2025-variable problem (dense
#: for daqp and quadprog) on 2 threads against one after another, 1.4–1.8x faster for these; PIQP,
#: ProxQP and CVXOPT hold it (0.74–0.9x), OSQP through qpsolvers sets up under it (1.1x; dqp's own
#: OSQP backend, which reuses its workspace, is 1.7x)
GIL_FREE_BACKENDS = frozenset({"clarabel", "highs", "daqp", "quadprog", "ecos", "scs", "qpalm"})


def _tol(eps_abs: float, eps_rel: float) -> Dict[str, Dict[str, Any]]:
    return {
        "clarabel": {"tol_gap_abs": eps_abs, "tol_gap_rel": eps_rel, "tol_feas": eps_abs},
        "osqp": {"eps_abs": eps_abs, "eps_rel": eps_rel, "max_iter": 20000},
        "piqp": {"eps_abs": eps_abs, "eps_rel": eps_rel},
        "proxqp": {"eps_abs": eps_abs, "eps_rel": eps_rel},
        "cvxopt": {"abstol": eps_abs, "reltol": eps_rel, "feastol": eps_abs},
        "ecos": {"abstol": eps_abs, "reltol": eps_rel, "feastol": eps_abs},
        "scs": {"eps_abs": eps_abs, "eps_rel": eps_rel},
        "qpalm": {"eps_abs": eps_abs, "eps_rel": eps_rel},
        "highs": {"primal_feasibility_tolerance": eps_abs, "dual_feasibility_tolerance": eps_abs},
    }


def tolerance_keywords(name: str, eps_abs: float, eps_rel: float) -> Dict[str, Any]:
    """The keywords that set ``eps_abs``/``eps_rel`` for backend ``name`` ({} when it has none)."""
    return dict(_tol(eps_abs, eps_rel).get(name, {}))


_INFEASIBLE_WORDS = ("primal infeasible", "primalinfeasible", "primal_infeasible", "infeasible")
_UNBOUNDED_WORDS = ("dual infeasible", "dualinfeasible", "dual_infeasible", "unbounded")
_MAXITER_WORDS = (
    "max_iter",
    "maximum iterations",
    "maxiterations",
    "max iter",
    "iteration limit",
    "time limit",
    "time_limit",
    "timelimit",
    "max_time",
    "max time",
    "maxtime",
)


def _status_text(extras: Dict[str, Any]) -> str:
    parts = []
    for key in ("status", "infostring", "info"):
        v = extras.get(key)
        if v is None:
            continue
        st = getattr(v, "status", None)
        parts.append(str(st if st is not None else v))
    return " ".join(parts).lower().replace("-", " ")


def _iterations(extras: Dict[str, Any]) -> Optional[int]:
    """Iteration count from a backend's raw output (``None`` when it does not report one)."""
    for key in ("iter", "iterations"):
        if isinstance(extras.get(key), (int, np.integer)):
            return int(extras[key])
    info = extras.get("info")
    for attr in ("iter", "iterations"):
        val = getattr(info, attr, None)
        if isinstance(val, (int, np.integer)):
            return int(val)
    return None


def status_from_extras(extras: Dict[str, Any]) -> Optional[Status]:
    """Best-effort status from a backend's raw output; ``None`` when it does not say."""
    text = _status_text(extras)
    if not text:
        return None
    if any(w in text for w in _UNBOUNDED_WORDS):
        return Status.DUAL_INFEASIBLE
    if any(w in text for w in _INFEASIBLE_WORDS):
        return Status.PRIMAL_INFEASIBLE
    if any(w in text for w in _MAXITER_WORDS):
        return Status.MAX_ITER
    return None


class QPSolversBackend(ForwardSolver):
    """A :mod:`qpsolvers` backend; subclasses set ``name`` (created below for each backend) and may set
    ``qpsolvers_name`` when the registry name differs from qpsolvers' own."""

    duals = True
    qpsolvers_name: str = ""

    @classmethod
    def backend(cls) -> str:
        return cls.qpsolvers_name or cls.name

    @classmethod
    def is_available(cls) -> bool:
        import qpsolvers

        return cls.backend() in qpsolvers.available_solvers

    def tolerance_keywords(self, eps_abs: float, eps_rel: float) -> Dict[str, Any]:
        return tolerance_keywords(self.backend(), eps_abs, eps_rel)

    #: the backends' own time-limit settings (seconds), as qpsolvers passes them through
    _TIME_LIMIT = {
        "clarabel": "time_limit",
        "highs": "time_limit",
        "osqp": "time_limit",
        "scs": "time_limit_secs",
        "qpalm": "time_limit",
    }

    def time_limit_keywords(self, seconds: float) -> Dict[str, Any]:
        key = self._TIME_LIMIT.get(self.backend())
        return {key: float(seconds)} if key else {}

    def solve(self, P, q, C, d, A, b, *, initvals=None, warm_duals=None, keywords=None, slot=None) -> RawSolution:
        """Solve one problem (NumPy/SciPy float64; ``None`` for absent constraints).

        qpsolvers warm-starts the primal only (``initvals``); ``warm_duals`` and ``slot`` are ignored.
        """
        import qpsolvers

        if not self.sparse:  # dense-only backend
            P, C, A = (M.toarray() if sp.issparse(M) else M for M in (P, C, A))
        elif not self.dense:  # sparse-only backend
            P, C, A = (sp.csc_matrix(M) if M is not None and not sp.issparse(M) else M for M in (P, C, A))
        problem = qpsolvers.Problem(P, q, C, d, A, b)
        kw = dict(keywords or {})
        t0 = time.perf_counter()
        try:
            with numerics_quiet():
                sol = qpsolvers.solve_problem(problem, solver=self.backend(), initvals=initvals, **kw)
        except Exception as exc:  # solvers raise many different types; classify below
            return RawSolution.error(exc, time.perf_counter() - t0)
        elapsed = time.perf_counter() - t0
        return raw_solution(sol.found, sol.x, sol.y, sol.z, dict(sol.extras or {}), elapsed, P.shape[0], C, A)


def raw_solution(found: bool, x, y, z, extras: Dict[str, Any], elapsed: float, n: int, C, A) -> RawSolution:
    """A backend's answer (primal ``x``, duals ``y`` of ``A``, ``z`` of ``C``, raw ``extras``) as a
    :class:`RawSolution`: status from ``found`` and the extras, malformed vectors dropped."""
    x = None if x is None else np.asarray(x, dtype=np.float64)
    finite = x is not None and bool(np.isfinite(x).all())
    info = {"time": elapsed, "raw_status": _status_text(extras)[:200]}
    if found and finite:
        status = Status.SOLVED
    else:
        status = status_from_extras(extras) or Status.SOLVER_ERROR
    y = None if y is None or A is None else np.asarray(y, dtype=np.float64)
    z = None if z is None or C is None else np.asarray(z, dtype=np.float64)
    # HiGHS (through qpsolvers) answers a failure with an empty x, not None
    if x is not None and (x.shape != (n,) or not finite):
        x = None
        if status == Status.SOLVED:
            status = Status.SOLVER_ERROR
    y = y if y is not None and y.shape == (A.shape[0],) else None
    z = z if z is not None and z.shape == (C.shape[0],) else None
    return RawSolution(x, y, z, status, iterations=_iterations(extras), info=info)


def _make_backend(name: str, module: str, extra: str, formats: str, description: str):
    cls = type(
        f"QPSolvers_{name}",
        (QPSolversBackend,),
        {
            "name": name,
            "aliases": (),
            "modules": ("qpsolvers", module),
            "extra": extra,
            "dense": "D" in formats,
            "sparse": "S" in formats,
            "description": description,
            "warm_starts": name in WARM_START_BACKENDS,
            "gil_free": name in GIL_FREE_BACKENDS,
        },
    )
    return register_solver(cls)


def _register_all() -> None:
    if importlib.util.find_spec("qpsolvers") is None:  # pragma: no cover - core dependency
        return
    import qpsolvers

    names = list(BACKENDS) + [s for s in qpsolvers.available_solvers if s not in BACKENDS]
    for name in names:
        default = (
            name,
            "",
            ("D" if name in qpsolvers.dense_solvers else "") + ("S" if name in qpsolvers.sparse_solvers else ""),
            f"qpsolvers backend {name!r}.",
        )
        _make_backend(name, *BACKENDS.get(name, default))


_register_all()
