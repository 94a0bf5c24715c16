"""libdqp's ``lin_solvers`` listing functions, over dqp's linear-solver registry.

:func:`get_dense_solvers` and :func:`get_sparse_solvers` return the installed ``lin_solver``
names that take dense and sparse (CSC) reduced KKT systems. They are dqp's registry names
(``"scipy_lu"``, ``"qdldl"``, ...); libdqp's spellings (``"scipy LU"``, ``"scipy SPLU"``) are
aliases of them and are accepted by :func:`dqp.dQP.build_settings` too.

libdqp's solve helpers (``dense_solve``, ``sparse_solve``, ``dense_LSQ``, ``sparse_LSQ``) are not
provided: use :func:`dqp.linsolve.get_linsolver` (``factor(K).solve(rhs)``).
"""

from __future__ import annotations

from typing import List

from dqp.linsolve import available_linsolvers, get_linsolver

__all__ = ["get_dense_solvers", "get_sparse_solvers"]


def get_dense_solvers() -> List[str]:
    """Installed linear solvers for ``solve_type="dense"`` (registry names, preferred first)."""
    return [name for name in available_linsolvers() if get_linsolver(name).dense]


def get_sparse_solvers() -> List[str]:
    """Installed linear solvers for ``solve_type="sparse"`` (registry names, preferred first)."""
    return [name for name in available_linsolvers() if get_linsolver(name).sparse and not get_linsolver(name).batched]
