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

import importlib.util
from abc import ABC, abstractmethod
from typing import ClassVar, Dict, List, Optional, Type, Union

import numpy as np
import scipy.sparse as sp

from dqp.errors import SettingsError, SolverNotAvailableError

Matrix = Union[np.ndarray, sp.csc_matrix]


class Factorization(ABC):
    """A factorized matrix: call :meth:`solve` with one right-hand side or a matrix of them."""

    @abstractmethod
    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Return ``K⁻¹ rhs``."""


class LinearSolver(ABC):
    """Base class of backward linear solvers (see the module docstring).

    Class attributes mirror :class:`dqp.solvers.ForwardSolver`: ``name``, ``aliases``, ``modules``
    (imports that decide availability), ``extra`` (pip extra), ``dense``/``sparse`` (accepted
    formats), ``batched`` and ``description``.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()
    modules: ClassVar[tuple] = ()
    extra: ClassVar[str] = ""
    dense: ClassVar[bool] = True
    sparse: ClassVar[bool] = True
    batched: ClassVar[bool] = False
    description: ClassVar[str] = ""
    #: False for solvers that may crash (not just fail) on an exactly singular matrix; dqp then only
    #: gives them the nonsingular quasi-definite regularization ``K + diag(δI, −δI)``.
    safe_on_singular: ClassVar[bool] = True

    @classmethod
    def is_available(cls) -> bool:
        """Whether every module in ``modules`` is importable (nothing is imported)."""
        return all(importlib.util.find_spec(m) is not None for m in cls.modules)

    @classmethod
    def install_hint(cls) -> str:
        """The pip command that installs this linear solver (``"(built in)"`` when nothing is needed)."""
        return f"pip install {' '.join(cls.modules)}" if cls.modules else "(built in)"

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:  # pragma: no cover - interface
        """Factorize the symmetric KKT matrix ``K``; ``n`` is the size of its (1,1) block (the primal
        variables), which block-structured solvers such as the Cholesky Schur complement need."""
        raise SettingsError(f"lin_solver={self.name!r} is batched; use its batched interface")


_LINSOLVERS: Dict[str, Type[LinearSolver]] = {}
_ALIASES: Dict[str, str] = {}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register_linsolver(cls: Type[LinearSolver]) -> Type[LinearSolver]:
    """Class decorator that adds a :class:`LinearSolver` to the registry."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
    _LINSOLVERS[cls.name] = cls
    for a in (cls.name, *cls.aliases):
        _ALIASES[_norm(a)] = cls.name
    return cls


def registered_linsolvers() -> Dict[str, Type[LinearSolver]]:
    """All registered linear solvers by name."""
    return dict(_LINSOLVERS)


def available_linsolvers() -> List[str]:
    """Names of the registered linear solvers whose packages are importable."""
    return [n for n, c in _LINSOLVERS.items() if c.is_available()]


def resolve_linsolver_name(name: str) -> str:
    """Map a name or alias (e.g. ``"scipy SPLU"``) to the registry name."""
    if not isinstance(name, str):
        raise SettingsError(f"lin_solver must be a string, got {type(name).__name__}. "
                            f"Valid choices: {', '.join(sorted(_LINSOLVERS))}.")
    key = _norm(name)
    if key not in _ALIASES:
        raise SettingsError(
            f"lin_solver={name!r} is not a known linear solver. Registered: "
            f"{', '.join(sorted(_LINSOLVERS))} (aliases: {', '.join(sorted(a for a in _ALIASES if a not in _LINSOLVERS))}).")
    return _ALIASES[key]


def get_linsolver(name: str) -> LinearSolver:
    """Instantiate the registered linear solver ``name``; raise if unknown or not installed."""
    cls = _LINSOLVERS[resolve_linsolver_name(name)]
    if not cls.is_available():
        raise SolverNotAvailableError(
            f"lin_solver={cls.name!r} is registered but not installed. Install it with: "
            f"{cls.install_hint()}. Installed: {', '.join(available_linsolvers())}.")
    return cls()


def linsolver_table() -> str:
    """Markdown table of registered linear solvers (docs and diagnostics)."""
    rows = ["| name | aliases | dense | sparse | batched | installed | description |",
            "|---|---|---|---|---|---|---|"]
    for n, c in sorted(_LINSOLVERS.items()):
        rows.append(f"| `{n}` | {', '.join(c.aliases) or '-'} | {'yes' if c.dense else 'no'} | "
                    f"{'yes' if c.sparse else 'no'} | {'yes' if c.batched else 'no'} | "
                    f"{'yes' if c.is_available() else 'no'} | {c.description} |")
    return "\n".join(rows)
