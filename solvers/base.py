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

import importlib.util
from abc import ABC
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Type

import numpy as np

from dqp.errors import SettingsError, SolverNotAvailableError, Status


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


class ForwardSolver(ABC):
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
    description : str
        One line for docs and error messages.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()
    modules: ClassVar[tuple] = ()
    extra: ClassVar[str] = ""
    dense: ClassVar[bool] = True
    sparse: ClassVar[bool] = True
    batched: ClassVar[bool] = False
    duals: ClassVar[bool] = True
    description: ClassVar[str] = ""

    @classmethod
    def is_available(cls) -> bool:
        """Whether every module in ``modules`` is importable (nothing is imported)."""
        return all(importlib.util.find_spec(m) is not None for m in cls.modules)

    @classmethod
    def install_hint(cls) -> str:
        """The pip command that installs this solver."""
        pkgs = " ".join(cls.modules)
        if cls.extra:
            return f"pip install 'dqp[{cls.extra}]'  (or: pip install {pkgs})"
        return f"pip install {pkgs}"

    def tolerance_keywords(self, eps_abs: float, eps_rel: float) -> Dict[str, Any]:
        """Translate dqp's ``eps_abs``/``eps_rel`` to this solver's own keywords."""
        return {}

    # Element-wise solvers implement solve(); batched solvers implement solve_batch().
    def solve(self, P, q, C, d, A, b, *, initvals=None, warm_duals=None, keywords=None,
              slot=None) -> RawSolution:  # pragma: no cover - interface
        """Solve one problem given as NumPy/SciPy float64 data (``None`` for absent constraints).

        ``initvals`` / ``warm_duals`` = ``(lam, mu)`` warm-start the solve when the solver can use
        them; ``slot`` identifies the batch element so a solver may keep a workspace per element.
        """
        raise SettingsError(f"qp_solver={self.name!r} is a batched solver; it has no element-wise solve")

    def solve_batch(self, problem, *, keywords=None, warm=None):  # pragma: no cover - interface
        """Solve a whole batch given as torch tensors (batched solvers only)."""
        raise SettingsError(f"qp_solver={self.name!r} is an element-wise solver; it has no batched solve")


_SOLVERS: Dict[str, Type[ForwardSolver]] = {}
_ALIASES: Dict[str, str] = {}


def register_solver(cls: Type[ForwardSolver]) -> Type[ForwardSolver]:
    """Class decorator that adds a :class:`ForwardSolver` to the registry."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
    _SOLVERS[cls.name] = cls
    for a in (cls.name, *cls.aliases):
        _ALIASES[_norm(a)] = cls.name
    return cls


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def registered_solvers() -> Dict[str, Type[ForwardSolver]]:
    """All registered forward solvers by name (available or not)."""
    return dict(_SOLVERS)


def available_solvers() -> List[str]:
    """Names of the registered forward solvers whose packages are importable."""
    return [n for n, c in _SOLVERS.items() if c.is_available()]


def resolve_solver_name(name: str) -> str:
    """Map a name or alias to the registry name; raise a helpful error when unknown."""
    if not isinstance(name, str):
        raise SettingsError(f"qp_solver must be a string, got {type(name).__name__}. "
                            f"Valid choices: {', '.join(sorted(_SOLVERS))}.")
    key = _norm(name)
    if key not in _ALIASES:
        raise SettingsError(
            f"qp_solver={name!r} is not a known solver. Registered: {', '.join(sorted(_SOLVERS))} "
            f"(installed: {', '.join(available_solvers()) or 'none'}).")
    return _ALIASES[key]


def get_solver(name: str) -> ForwardSolver:
    """Instantiate the registered solver ``name``; raise if it is unknown or not installed."""
    cls = _SOLVERS[resolve_solver_name(name)]
    if not cls.is_available():
        raise SolverNotAvailableError(
            f"qp_solver={cls.name!r} is registered but not installed. Install it with: "
            f"{cls.install_hint()}. Installed solvers: {', '.join(available_solvers()) or 'none'}.")
    return cls()


def solver_table() -> str:
    """Markdown table of registered solvers (used by the docs and ``python -m dqp.diagnose``)."""
    rows = ["| name | aliases | dense | sparse | batched | installed | install |",
            "|---|---|---|---|---|---|---|"]
    for n, c in sorted(_SOLVERS.items()):
        rows.append(f"| `{n}` | {', '.join(c.aliases) or '-'} | {'yes' if c.dense else 'no'} | "
                    f"{'yes' if c.sparse else 'no'} | {'yes' if c.batched else 'no'} | "
                    f"{'yes' if c.is_available() else 'no'} | `{c.install_hint()}` |")
    return "\n".join(rows)
