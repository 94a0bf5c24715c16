"""The reference-compatible front door: ``from dqp import dQP``.

>>> from dqp import dQP
>>> settings = dQP.build_settings(qp_solver="clarabel", lin_solver="qdldl")
>>> layer = dQP.dQP_layer(settings=settings)

Besides the layer and its settings, this module has the two helpers libdqp's scripts call from it:
:func:`call_single_qpsolvers` (one forward solve through :mod:`qpsolvers`, no gradient) and
:func:`set_solver_tolerance` (a backend's own tolerance keywords).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np
import scipy.sparse as sp

from dqp.errors import SolverFailedError
from dqp.layer import dQP_layer  # noqa: F401
from dqp.settings import Settings, build_settings, options_table  # noqa: F401

__all__ = ["build_settings", "dQP_layer", "Settings", "options_table", "call_single_qpsolvers", "set_solver_tolerance"]


def _vec(v: Any):
    return None if v is None else np.asarray(v, dtype=np.float64).reshape(-1)


def call_single_qpsolvers(Q, q, G, h, A, b, kwargs: Mapping[str, Any]):
    """Solve one QP with :func:`qpsolvers.solve_problem`, as libdqp's helper of this name.

    ``min ½xᵀQx + qᵀx  s.t.  Gx ≤ h,  Ax = b`` with NumPy/SciPy data; vectors may be columns
    ``(k, 1)``. ``kwargs`` are ``solve_problem``'s keywords (``solver``, ``verbose``, ``initvals``,
    backend options). No gradient: use :class:`dQP_layer` for that.

    Returns
    -------
    qpsolvers.Solution
        ``x``, ``y`` (equality duals), ``z`` (inequality duals), ...

    Raises
    ------
    SolverFailedError
        The solver returned no solution, or reported that it did not find one (``found`` is
        False, e.g. an infeasible problem: some backends still fill ``x``). libdqp raised a bare
        ``Exception("Exiting")`` on a missing ``x`` only.
    """
    import qpsolvers

    def mat(M):
        return None if M is None else (M if sp.issparse(M) else np.asarray(M, dtype=np.float64))

    problem = qpsolvers.Problem(P=mat(Q), q=_vec(q), G=mat(G), h=_vec(h), A=mat(A), b=_vec(b))
    solution = qpsolvers.solve_problem(problem, **dict(kwargs))
    if solution.x is None or solution.found is False:
        raise SolverFailedError(
            f"qpsolvers solver {dict(kwargs).get('solver')!r} did not find a solution "
            f"(found={solution.found!r}); check that the problem is feasible and bounded, or try "
            f"another solver.",
            [0],
        )
    return solution


def set_solver_tolerance(
    qp_solver_keywords: Dict[str, Any], qp_solver: str, eps_abs: float, eps_rel: float
) -> Dict[str, Any]:
    """``qp_solver_keywords`` updated with ``qp_solver``'s own keywords for ``eps_abs``/``eps_rel``.

    The translation is dqp's (the one :func:`build_settings` applies); backends without tolerance
    keywords leave the dict unchanged. Returns the same dict, as libdqp's helper does.
    """
    from dqp.solvers.qpsolvers_backend import tolerance_keywords

    qp_solver_keywords.update(tolerance_keywords(qp_solver, float(eps_abs), float(eps_rel)))
    return qp_solver_keywords
