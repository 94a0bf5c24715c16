"""Outputs and diagnostics of a dQP layer call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import numpy as np
import torch

from dqp.errors import Status


class _Outputs(NamedTuple):
    z: torch.Tensor
    lam: torch.Tensor
    mu: torch.Tensor
    solve_time: Optional[float]
    forward_time: Optional[float]


class QPOutput(_Outputs):
    """What ``layer(P, q, C, d, A, b)`` returns; unpacks as ``z, lam, mu, solve_time, forward_time``.

    The call's own diagnostics travel with it (``out.info``, ``out.active``), so callers that share
    a layer between threads each read their own; ``layer.info`` / ``layer.active`` are the last
    call's.

    Attributes
    ----------
    z : Tensor
        Primal solution ``(n,)`` or ``(B, n)``.
    lam : Tensor
        Equality duals ``(p,)`` / ``(B, p)`` (empty when there are no equalities).
    mu : Tensor
        Inequality duals ``(m,)`` / ``(B, m)``, zero on inactive constraints.
    solve_time : float or None
        Seconds spent in the forward solver (summed over the batch), when ``time=True``.
    forward_time : float or None
        Seconds for the whole forward pass, when ``time=True``.
    info : SolveInfo or None
        This call's per-element diagnostics (``backward_residual`` is filled by its backward).
    active : Tensor or None
        This call's active inequality constraints (bool, ``(m,)`` or ``(B, m)``).
    """

    info: Optional["SolveInfo"] = None
    active: Optional[torch.Tensor] = None

    def __new__(
        cls,
        z,
        lam,
        mu,
        solve_time=None,
        forward_time=None,
        *,
        info: Optional["SolveInfo"] = None,
        active: Optional[torch.Tensor] = None,
    ):
        self = super().__new__(cls, z, lam, mu, solve_time, forward_time)
        self.info, self.active = info, active
        return self

    def __repr__(self) -> str:
        return (
            f"QPOutput(z={self.z!r}, lam={self.lam!r}, mu={self.mu!r}, solve_time={self.solve_time!r}, "
            f"forward_time={self.forward_time!r})"
        )


@dataclass
class SolveInfo:
    """Per-batch-element diagnostics of the last call (``layer.info``).

    Attributes
    ----------
    qp_solver, lin_solver : str
        The solvers actually used (``auto`` resolved).
    status : list of Status
        Outcome per element.
    active : list of ndarray of bool
        Active inequality constraints per element (``layer.active``).
    n_weakly_active : list of int
        Constraints at the boundary with a (near) zero dual: the solution map is not differentiable
        there; dqp treats them as active (a one-sided derivative) and counts them here.
    verified : list of bool
        Whether the polished solution passed the KKT check (primal feasible, duals of the right sign).
        ``True`` means z, λ, μ are exact up to the linear solve.
    refine_iterations : list of int
        Active-set repairs made by ``refine_active``.
    complementarity_margin : list of float
        ``min(min_{i∈J} μ_i, min_{i∉J} (d − Cz)_i)``: distance to a change of active set (small:
        the derivative may jump nearby; ``inf`` without inequalities).
    primal_residual, dual_residual, complementarity : list of float
        ``max(‖Az−b‖∞, ‖max(Cz−d, 0)‖∞)``, ``‖Pz+q+Aᵀλ+Cᵀμ‖∞`` and ``max |μ_i (d−Cz)_i|``.
    kkt_path : list of str
        ``"direct"`` or ``"regularized"`` (singular reduced KKT: dependent active rows or a
        semidefinite P) for the factorization used by the polish and the backward.
    polish_path : list of str
        How the polish verified the point: ``"quick"`` (the detected set, one factorization of the
        reduced KKT in the common case, at most a few repairs) or ``"ladder"`` (equilibration,
        regularization, other thresholds and repairs after the quick try failed).
    factorizations : list of int
        Numeric factorizations of reduced KKT systems made by the polish (the last one serves the
        backward).
    backward_residual : list of float or None
        Relative residual of the backward solve (filled after ``backward``): an error estimate.
    iterations : list of int or None
        Solver iterations when reported.
    solve_time : list of float
        Forward solver seconds per element.
    messages : list of str
        Human-readable notes per element (empty string when nothing to say).
    """

    qp_solver: str
    lin_solver: str
    status: List[Status] = field(default_factory=list)
    active: List[np.ndarray] = field(default_factory=list)
    n_weakly_active: List[int] = field(default_factory=list)
    verified: List[bool] = field(default_factory=list)
    refine_iterations: List[int] = field(default_factory=list)
    primal_residual: List[float] = field(default_factory=list)
    dual_residual: List[float] = field(default_factory=list)
    complementarity: List[float] = field(default_factory=list)
    complementarity_margin: List[float] = field(default_factory=list)
    kkt_path: List[str] = field(default_factory=list)
    polish_path: List[str] = field(default_factory=list)
    factorizations: List[int] = field(default_factory=list)
    backward_residual: List[Optional[float]] = field(default_factory=list)
    iterations: List[Optional[int]] = field(default_factory=list)
    solve_time: List[float] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)

    def active_mask(self, m: int) -> torch.Tensor:
        """``active`` as one (B, m) bool tensor."""
        if m and self.active:
            return torch.as_tensor(np.stack(self.active))
        return torch.zeros(len(self.status), 0, dtype=torch.bool)

    @property
    def failed(self) -> List[int]:
        """Indices of elements whose status is not SOLVED."""
        return [i for i, s in enumerate(self.status) if s != Status.SOLVED]

    @property
    def ok(self) -> bool:
        """True when every element solved."""
        return not self.failed

    def summary(self) -> str:
        """A few lines for logs."""
        B = len(self.status)
        return (
            f"qp_solver={self.qp_solver}, lin_solver={self.lin_solver}, {B - len(self.failed)}/{B} solved, "
            f"max primal residual {max(self.primal_residual, default=0):.2e}, max dual residual "
            f"{max(self.dual_residual, default=0):.2e}, weakly active {sum(self.n_weakly_active)}, "
            f"regularized KKT {self.kkt_path.count('regularized')}"
        )
