"""libdqp's solver diagnostic entry point, ``benchmark``, routed to :func:`dqp.diagnose.diagnose`.

libdqp's ``examples/running_diagnostic.py`` runs::

    from dqp import benchmark
    benchmark("random", Q, q, G, h, A, b, "gurobi")

and the same call works on dqp: every installed ``qp_solver`` × ``lin_solver`` pair solves and
differentiates the problem, and the ranked :class:`dqp.diagnose.DiagnosisReport` is returned (and
its figure saved as ``<save_name>_qp.pdf`` in the working directory, libdqp's file name). This
module is itself callable (``dqp.benchmark(...)`` is ``dqp.benchmark.benchmark(...)``), so
``from dqp import benchmark`` gives a callable as in libdqp.

Differences from libdqp: correctness is judged against the consensus of all solvers, not one
reference solver (``ref_qp_solver`` is checked and included in the run, and a warning says so);
the backward linear solvers are timed as well; nothing is printed (log level INFO on
``dqp.diagnose`` shows progress; ``report.to_markdown()`` gives the table).
"""

from __future__ import annotations

import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dqp.errors import InputError

__all__ = ["benchmark"]

logger = logging.getLogger("dqp.diagnose")


def _flat(v: Any) -> Any:
    if v is None or not isinstance(v, np.ndarray):
        return v
    return v.reshape(-1) if v.ndim == 2 and v.shape[1] == 1 else v


def benchmark(
    save_name: str,
    Q=None,
    q=None,
    G=None,
    h=None,
    A=None,
    b=None,
    ref_qp_solver: Optional[str] = None,
    plot: bool = True,
    **diagnose_options: Any,
):
    """Diagnose one QP across the installed solvers (libdqp's ``benchmark``).

    Parameters
    ----------
    save_name : str
        Name of the problem in the report and of the figure ``<save_name>_qp.pdf``. With ``Q=None``
        it is a path to an ``.npz`` problem file (read with ``allow_pickle=True``).
    Q, q, G, h, A, b
        The problem (NumPy arrays or SciPy sparse matrices; vectors may be columns). ``A``/``b``
        optional.
    ref_qp_solver : str, optional
        libdqp's reference solver. dqp compares every solver with the consensus instead; a given
        name is validated and included in the run.
    plot : bool
        Save the figure (needs matplotlib).
    **diagnose_options
        Passed to :func:`dqp.diagnose.diagnose` (``repeat``, ``solvers``, ``lin_solvers``, ...).

    Returns
    -------
    dqp.diagnose.DiagnosisReport

    Raises
    ------
    InputError
        ``Q=None`` and ``save_name`` is not an existing ``.npz`` file.
    SettingsError, SolverNotAvailableError
        An unknown or uninstalled ``ref_qp_solver``; invalid diagnose options.
    """
    from dqp.diagnose import diagnose, diagnose_problem
    from dqp.io import load_problem

    if ref_qp_solver is not None:
        from dqp.solvers import get_solver, resolve_solver_name

        ref_qp_solver = resolve_solver_name(ref_qp_solver)
        get_solver(ref_qp_solver)  # SolverNotAvailableError with the pip command
        if diagnose_options.get("solvers") is not None and ref_qp_solver not in diagnose_options["solvers"]:
            diagnose_options["solvers"] = [*diagnose_options["solvers"], ref_qp_solver]
        warnings.warn(
            f"dqp.benchmark: ref_qp_solver={ref_qp_solver!r} is run like every other solver; "
            f"correctness is judged against the consensus of all solvers, not this one.",
            UserWarning,
            stacklevel=2,
        )
    diagnose_options.setdefault("progress", False)
    if Q is None:
        path = Path(save_name)
        if path.suffix.lower() != ".npz" or not path.is_file():
            raise InputError(
                f"benchmark({save_name!r}) without data needs save_name to be an existing .npz "
                f"problem file; pass the problem (Q, q, G, h, A, b) otherwise."
            )
        report = diagnose_problem(load_problem(path, allow_pickle=True), **diagnose_options)
        name = path.with_suffix("").as_posix()
    else:
        report = diagnose(Q, _flat(q), G, _flat(h), A, _flat(b), name=save_name, **diagnose_options)
        name = save_name
    if plot:
        report.plot(f"{name}_qp.pdf")
    logger.info("dqp.benchmark(%r): %s", save_name, report.recommendation())
    return report


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`benchmark` (``from dqp import benchmark`` is a function in libdqp)."""

    def __call__(self, *args: Any, **kwargs: Any):
        return benchmark(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
