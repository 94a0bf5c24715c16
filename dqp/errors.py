"""Exceptions raised by dqp.

Every error dqp raises derives from :class:`DQPError`, so ``except dqp.DQPError`` catches them
all. The subclasses also derive from the matching builtin (``ValueError``, ``ImportError``,
``RuntimeError``) so code written against those keeps working.

Messages follow one pattern: *what* is wrong (naming the argument), *expected vs. actual*, and
*how to fix it*.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from enum import IntEnum
from typing import Iterator, Sequence


class Status(IntEnum):
    """Per-element outcome of a forward solve."""

    SOLVED = 0
    MAX_ITER = 1
    PRIMAL_INFEASIBLE = 2
    DUAL_INFEASIBLE = 3
    NUMERICAL = 4
    SOLVER_ERROR = 5
    NOT_PSD = 6

    def describe(self) -> str:
        """What the status means, as a sentence fragment ("is primal infeasible (...)")."""
        return _STATUS_TEXT[self]


_STATUS_TEXT = {
    Status.SOLVED: "solved",
    Status.MAX_ITER: "reached the iteration limit before converging",
    Status.PRIMAL_INFEASIBLE: "is primal infeasible (no z satisfies Cz <= d, Az = b)",
    Status.DUAL_INFEASIBLE: "is dual infeasible (the objective is unbounded below)",
    Status.NUMERICAL: "ran into numerical trouble (ill-conditioning or non-finite iterates)",
    Status.SOLVER_ERROR: "failed inside the solver (no solution returned)",
    Status.NOT_PSD: "has a P that is not positive semidefinite (a negative eigenvalue: the QP is not convex)",
}


class DQPError(Exception):
    """Root of every exception raised by dqp."""


class SettingsError(DQPError, ValueError):
    """An option passed to :func:`dqp.dQP.build_settings` is unknown or has a bad value."""


class SolverNotAvailableError(DQPError, ImportError):
    """The requested forward or linear solver is known but its package is not installed."""


class InputError(DQPError, ValueError):
    """Problem data (P, q, C, d, A, b) is malformed."""


class ShapeError(InputError):
    """An argument has the wrong number of dimensions, size or batch size."""


class NonFiniteError(InputError):
    """An argument contains NaN or Inf."""


class NotSymmetricError(InputError):
    """P is not symmetric."""


class NotPSDError(InputError):
    """P is not positive semidefinite: tested up front with ``check_PSD=True``; otherwise found by
    the solve (negative curvature in a factorization, confirmed by P's smallest eigenvalue).

    Attributes
    ----------
    batch_indices : list of int
        The elements whose P is not PSD, where known (``[0]`` for an unbatched problem).
    """

    def __init__(self, message: str, batch_indices: Sequence[int] = ()):
        super().__init__(message)
        self.batch_indices = list(batch_indices)


class LayoutError(InputError):
    """A tensor layout, dtype or device combination dqp cannot use."""


class NotSupportedError(DQPError, NotImplementedError):
    """A feature dqp does not provide: a PyTorch feature the layer cannot take part in (``torch.func``
    transforms, second derivatives) or qpth's ``SpQPFunction``; the message says what to use instead."""


class SolveError(DQPError, RuntimeError):
    """The forward solve failed for one or more batch elements.

    Attributes
    ----------
    batch_indices : list of int
        The failed batch elements (``[0]`` for an unbatched problem).
    statuses : list of Status
        The status of each failed element, aligned with ``batch_indices``.
    """

    def __init__(self, message: str, batch_indices: Sequence[int] = (), statuses: Sequence[Status] = ()):
        super().__init__(message)
        self.batch_indices = list(batch_indices)
        self.statuses = list(statuses)


class InfeasibleError(SolveError):
    """The QP has no feasible point."""


class UnboundedError(SolveError):
    """The QP objective is unbounded below on the feasible set."""


class MaxIterationsError(SolveError):
    """The solver stopped at its iteration limit."""


class SolverFailedError(SolveError):
    """The solver failed (numerical trouble or an internal error)."""


class SolverKeywordWarning(UserWarning):
    """A solver raised while ``qp_solver_keywords`` were given: a keyword may be the cause."""


_STATUS_ERROR = {
    Status.MAX_ITER: MaxIterationsError,
    Status.PRIMAL_INFEASIBLE: InfeasibleError,
    Status.DUAL_INFEASIBLE: UnboundedError,
    Status.NUMERICAL: SolverFailedError,
    Status.SOLVER_ERROR: SolverFailedError,
}

_STATUS_FIX = {
    Status.MAX_ITER: "raise the iteration limit (qp_solver_keywords) or loosen eps_abs/eps_rel",
    Status.PRIMAL_INFEASIBLE: "check that the constraints can be satisfied together",
    Status.DUAL_INFEASIBLE: "make P positive definite on the feasible directions or add bounds",
    Status.NUMERICAL: "rescale the data (normalize_constraints=True) or try another qp_solver",
    Status.SOLVER_ERROR: "try another qp_solver",
    Status.NOT_PSD: "build P as L @ L.T (+ eps*I); check_PSD=True tests every P before solving",
}


def error_for_statuses(
    statuses: Sequence[Status], solver: str, details: Sequence[str] | None = None
) -> SolveError | NotPSDError | None:
    """Build the exception describing every failed element of a batch, or ``None`` if all solved.

    The exception class follows the first failure; the message lists every failed element. Elements
    whose P is not positive semidefinite (``Status.NOT_PSD``) give a :class:`NotPSDError` naming them.
    """
    failed = [(i, Status(s)) for i, s in enumerate(statuses) if s != Status.SOLVED]
    if not failed:
        return None
    batched = len(statuses) > 1
    bad = [i for i, s in failed if s == Status.NOT_PSD]
    if bad:  # an input error: it explains the other failures too, so it is raised first
        where = f" (batch elements {bad[:10]}{'...' if len(bad) > 10 else ''})" if batched else ""
        return NotPSDError(
            f"Argument P is not positive semidefinite{where}: it has a negative eigenvalue (seen as negative "
            f"curvature in the factorization of qp_solver={solver!r}, or after its solve failed, and confirmed by P's smallest "
            f"eigenvalue), so the QP is not convex and no point returned is its minimum. Fix: "
            f"{_STATUS_FIX[Status.NOT_PSD]}. With on_failure='mask' these elements get status NOT_PSD.",
            bad,
        )
    lines = []
    for i, s in failed[:20]:
        who = f"batch element {i}" if batched else "the problem"
        extra = f" ({details[i]})" if details and details[i] else ""
        lines.append(f"  - {who} {s.describe()}{extra}; fix: {_STATUS_FIX[s]}")
    if len(failed) > 20:
        lines.append(f"  - ... and {len(failed) - 20} more")
    cls = _STATUS_ERROR[failed[0][1]]
    head = (
        f"qp_solver={solver!r} failed on {len(failed)} of {len(statuses)} batch elements:"
        if batched
        else f"qp_solver={solver!r} failed:"
    )
    msg = (
        head
        + "\n"
        + "\n".join(lines)
        + ("\nTo keep training instead of raising, build the settings with on_failure='mask'.")
    )
    return cls(msg, [i for i, _ in failed], [s for _, s in failed])


@contextlib.contextmanager
def numerics_quiet() -> Iterator[None]:
    """Silence third-party numerics' warnings (conversions, singular factorizations) meanwhile.

    ``warnings.catch_warnings`` swaps process-wide state and restores it on exit, so entered on a
    worker thread (``omp_parallel``) it would undo filters that another thread set in between, a
    caller's ``pytest.warns`` or ``catch_warnings`` among them. It is entered on the main thread
    only; on worker threads such warnings pass through.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
