"""Registry of forward QP solvers.

A forward solver maps problem data to a primal-dual solution. Two kinds exist:

* element-wise solvers (``batched = False``) receive one problem at a time as NumPy / SciPy
  arrays in float64 on the CPU (every :mod:`qpsolvers` backend);
* batched solvers (``batched = True``) receive the whole batch as torch tensors on the data's
  device (the built-in interior-point method).

Register a solver by subclassing :class:`ForwardSolver` and decorating it with
:func:`register_solver`. Availability is derived from imports, and error messages and docs list
what is registered, so nothing is kept by hand in several places.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

import numpy as np

from dqp.errors import SettingsError, Status
from dqp.registry import Plugin, Registry


@dataclass
class RawSolution:
    """What an element-wise forward solver returns for one problem.

    Attributes
    ----------
    x : ndarray or None
        Primal solution ``(n,)``; ``None`` when the solver found none.
    y : ndarray or None
        Equality duals ``(p,)`` (sign convention of qpsolvers: ``Px + q + Aᵀy + Cᵀz = 0``).
    z : ndarray or None
        Inequality duals ``(m,)``.
    status : Status
        Outcome.
    iterations : int or None
        Iterations taken, when the solver reports it.
    info : dict
        Solver-specific extras (raw status string, ...).
    """

    x: Optional[np.ndarray]
    y: Optional[np.ndarray]
    z: Optional[np.ndarray]
    status: Status = Status.SOLVED
    iterations: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def error(cls, exc: BaseException, elapsed: float) -> "RawSolution":
        """The answer of a solver call that raised ``exc`` after ``elapsed`` seconds (no point)."""
        return cls(
            None, None, None, Status.SOLVER_ERROR, info={"error": f"{type(exc).__name__}: {exc}", "time": elapsed}
        )


class ForwardSolver(Plugin, ABC):
    """Base class of forward solvers.

    Class attributes
    ----------------
    name : str
        Registry name (what ``qp_solver=`` takes).
    aliases : tuple of str
        Other accepted names.
    modules : tuple of str
        Python modules that must be importable for the solver to be available.
    extra : str
        The pip extra of ``dqp`` that installs it (for the install hint).
    dense, sparse : bool
        Which matrix formats it accepts natively.
    batched : bool
        Whether it solves a whole batch of torch tensors at once.
    duals : bool
        Whether it returns dual variables.
    warm_starts : bool
        Whether it uses starting values (``warm_start_from_previous`` has no effect otherwise).
    gil_free : bool
        Whether its solve runs without holding Python's GIL, so that the elements of a batch gain from
        a thread pool (``omp_parallel="auto"`` uses one only then).
    reads_deferred_checks : bool
        Whether its ``solve_batch`` reads a batch's deferred value checks
        (:class:`dqp.problem.DeferredChecks`) with its own first host read; the layer reads them
        before calling any other solver.
    description : str
        One line for docs and error messages.
    """

    duals: ClassVar[bool] = True
    #: whether the solver starts from ``initvals`` / ``warm_duals`` (``warm_start_from_previous``)
    warm_starts: ClassVar[bool] = False
    #: whether its solve runs without the GIL (``omp_parallel="auto"``)
    gil_free: ClassVar[bool] = False
    #: whether ``solve_batch`` reads ``batch.deferred`` itself (see the class docstring)
    reads_deferred_checks: ClassVar[bool] = False

    def tolerance_keywords(self, eps_abs: float, eps_rel: float) -> Dict[str, Any]:
        """Translate dqp's ``eps_abs``/``eps_rel`` to this solver's own keywords."""
        return {}

    def time_limit_keywords(self, seconds: float) -> Dict[str, Any]:
        """This solver's keywords for a wall-clock limit, or ``{}`` when it has none."""
        return {}

    # Element-wise solvers implement solve(); batched solvers implement solve_batch().
    def solve(
        self, P, q, C, d, A, b, *, initvals=None, warm_duals=None, keywords=None, slot=None
    ) -> RawSolution:  # pragma: no cover - interface
        """Solve one problem given as NumPy/SciPy float64 data (``None`` for absent constraints).

        ``initvals`` / ``warm_duals`` = ``(lam, mu)`` warm-start the solve when the solver can use
        them; ``slot`` identifies the batch element so a solver may keep a workspace per element.
        """
        raise SettingsError(f"qp_solver={self.name!r} is a batched solver; it has no element-wise solve")

    def solve_batch(self, batch, settings):  # pragma: no cover - interface
        """Solve a validated dense batch (:class:`dqp.problem.QPBatch`, torch tensors on the data's
        device) differentiably with ``settings`` (:class:`dqp.settings.Settings`); returns
        ``(z, lam, mu, info)`` with ``info`` a filled :class:`dqp.result.SolveInfo` (batched solvers
        only). Settings the engine cannot honour raise or warn, never pass silently."""
        raise SettingsError(f"qp_solver={self.name!r} is an element-wise solver; it has no batched solve")


#: The forward-solver registry.
SOLVERS: Registry[ForwardSolver] = Registry("qp_solver", "solver")

register_solver = SOLVERS.register
registered_solvers = SOLVERS.classes
available_solvers = SOLVERS.available
resolve_solver_name = SOLVERS.resolve
get_solver = SOLVERS.get


def solver_table() -> str:
    """Markdown table of registered forward solvers (docs and ``python -m dqp.diagnose``)."""
    return SOLVERS.table(("install", "install_hint"), flags=(("parallel", "gil_free"),))
