"""Registry of linear solvers for the backward pass (and the active-set polish).

The backward pass solves the symmetric, indefinite reduced KKT system
``K = [[P, Aᵀ, C_Jᵀ], [A, 0, 0], [C_J, 0, 0]]``. A :class:`LinearSolver` factorizes ``K`` once
(:meth:`LinearSolver.factor`) and the returned :class:`Factorization` solves with it as often as
needed, so the forward polish and the backward share one factorization.

Element-wise solvers take ``K`` as a NumPy array (dense) or a SciPy CSC matrix (sparse), float64.
Batched solvers (``batched = True``) work on torch tensors on any device; see
:mod:`dqp.linsolve.torch_batched`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Optional, Union

import numpy as np
import scipy.sparse as sp

from dqp.errors import SettingsError
from dqp.registry import Plugin, Registry

Matrix = Union[np.ndarray, sp.csc_matrix]


class Factorization(ABC):
    """A factorized matrix: call :meth:`solve` with one right-hand side or a matrix of them."""

    @abstractmethod
    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Return ``K⁻¹ rhs``."""

    def negative_eigenvalues(self) -> Optional[int]:
        """The number of negative eigenvalues of ``K`` (its inertia, from an LDLᵀ), or ``None``
        when the factorization does not reveal it."""
        return None

    def determinant_sign(self) -> Optional[int]:
        """``sign(det K)`` (+1 or −1) when the factorization reveals it cheaply, else ``None``."""
        return None

    def reciprocal_condition(self) -> Optional[float]:
        """An estimate of ``1 / cond₁(K)`` from a backward-stable factorization (LAPACK's ``gecon``
        after a pivoting LU), or ``None`` when the factorization does not give one cheaply."""
        return None


class LinearSolver(Plugin, ABC):
    """Base class of backward linear solvers (see the module docstring).

    Class attributes mirror :class:`dqp.solvers.ForwardSolver`: ``name``, ``aliases``, ``modules``
    (imports that decide availability), ``extra`` (pip extra), ``dense``/``sparse`` (accepted
    formats), ``batched`` and ``description``.
    """

    #: False for solvers that may crash (not just fail) on an exactly singular matrix; dqp then only
    #: gives them the nonsingular quasi-definite regularization ``K + diag(δI, −δI)``.
    safe_on_singular: ClassVar[bool] = True
    #: True for solvers that factorize only quasi-definite matrices (QDLDL): a KKT matrix with a zero
    #: (2,2) block then goes straight to the regularized form ``K + diag(δ₀I, −δ₀I)``.
    quasi_definite_only: ClassVar[bool] = False

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:  # pragma: no cover - interface
        """Factorize the symmetric KKT matrix ``K``; ``n`` is the size of its (1,1) block (the primal
        variables), which block-structured solvers such as the Cholesky Schur complement need."""
        raise SettingsError(f"lin_solver={self.name!r} is batched; use its batched interface")

    def refactor(self, K: Matrix, previous=None, n: Optional[int] = None) -> Factorization:
        """Factorize ``K``, reusing the symbolic analysis (ordering, elimination tree) of ``previous``
        (a factorization or a list of them, ``None`` entries allowed) when this solver made it and
        ``K`` has the same sparsity pattern; ``previous`` stays valid.

        The default factorizes from scratch; solvers with a separate numeric phase override it.
        """
        return self.factor(K, n=n)


#: The linear-solver registry.
LINSOLVERS: Registry[LinearSolver] = Registry("lin_solver", "linear solver")

register_linsolver = LINSOLVERS.register
registered_linsolvers = LINSOLVERS.classes
available_linsolvers = LINSOLVERS.available
resolve_linsolver_name = LINSOLVERS.resolve
get_linsolver = LINSOLVERS.get


def linsolver_table() -> str:
    """Markdown table of registered linear solvers (docs and diagnostics)."""
    return LINSOLVERS.table(("description", "description"))
