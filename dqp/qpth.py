"""Drop-in replacement for ``qpth.qp.QPFunction`` on dqp's batched interior-point method.

Change one import and existing qpth code runs::

    # from qpth.qp import QPFunction, QPSolvers
    from dqp.qpth import QPFunction, QPSolvers

    z = QPFunction(verbose=-1)(Q, p, G, h, A, b)        # min ½zᵀQz + pᵀz  s.t. Gz ≤ h, Az = b

What is the same as qpth
    Constructor arguments and defaults, the call ``(Q, p, G, h, A, b)``, batched ``(B, ·)`` or
    unbatched arguments in any mix, empty tensors (``torch.Tensor()``, any tensor with
    ``numel() == 0``) for absent constraints — G/h as well as A/b —, the result ``z`` of shape
    ``(B, n)`` (``(1, n)`` when no argument is batched, as qpth returns), float32 and float64, CPU
    and CUDA, and ``check_Q_spd`` (Q must be positive definite unless it is turned off).

What differs, on purpose
    * Broadcast gradients are **summed** over the batch (qpth averages them with ``mean(0)``):
      the sum is the gradient of the batch loss w.r.t. the shared tensor.
    * Failures are not silent: an infeasible, unbounded or unsolved element raises
      :class:`dqp.errors.InfeasibleError` / ``UnboundedError`` / ``MaxIterationsError`` /
      ``SolverFailedError`` naming the batch elements (qpth prints a warning and returns an
      inaccurate point). Opt in to qpth's keep-going behaviour with ``on_failure="mask"``: failed
      elements then return zeros (with zero gradients) and their statuses are in
      :attr:`QPFunction.status` — e.g. OptNet's ``cls optnet-eq``, whose first QPs are infeasible.
      ``check_Q_spd`` raises :class:`QNotSPDError`, a :class:`dqp.errors.NotPSDError` that is also
      a ``RuntimeError`` (qpth raises ``RuntimeError('Q is not SPD.')``), so either ``except``
      catches it.
    * ``SpQPFunction`` (qpth's sparse batched solver) is importable but not supported: calling it
      raises :class:`dqp.errors.NotSupportedError` (use ``QPFunction`` on dense tensors, or dqp's sparse layer
      ``dQP.dQP_layer(solve_type="sparse")``).
    * Degenerate problems qpth gets wrong are solved: an exactly zero starting slack (qpth's
      initial shift only fixes negative slacks), PSD Q with ``check_Q_spd=False`` (LPs; qpth
      LU-factorizes Q), no constraints at all (qpth asserts at least one), and m > n.
    * Gradients are exact for the active set at the solution (the solution is polished on its
      active set) instead of using the IPM's interior point with clamped slacks.

Parameter mapping
    ``eps``: qpth's eps bounds the *sum of absolute residual norms* and its default (1e-12) is
    below what float32 — and often float64 — can reach (qpth then stops on ``notImprovedLim``).
    dqp uses ``eps`` as its IPM's relative tolerance only when it is looser than dqp's default
    (1e-9 float64 / 1e-5 float32); otherwise dqp's own default for a polished solve (1e-8 in
    float64), and then polishes the point on its active set, so the answer is accurate to
    round-off whenever the active set is identified.
    ``maxIter``: dqp's IPM usually needs 8–20 iterations, about what qpth's default 20 allows,
    but an element that needs more must not fail where qpth would return *something*: the limit
    used is ``max(maxIter, 100)``.
    ``notImprovedLim``: ignored (convergence is decided per element by the stopping rule).
    ``verbose``: ≥ 1 logs one line per call at INFO level on logger ``dqp.qpth``.
    ``solver``: accepted for compatibility; both :class:`QPSolvers` values run dqp's IPM
    (``CVXPY`` would solve element by element on the CPU — use ``dqp``'s core layer with a
    qpsolvers backend for that).
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Optional

import torch

from dqp.errors import LayoutError, NonFiniteError, NotPSDError, NotSupportedError, SettingsError, ShapeError
from dqp.ipm_layer import solve_qp_batch
from dqp.solvers.ipm import default_eps
from dqp.transforms import graph_break, reject_functorch

logger = logging.getLogger(__name__)

__all__ = ["QPFunction", "QPSolvers", "SpQPFunction", "QNotSPDError", "NotSupportedError"]


class QNotSPDError(NotPSDError, RuntimeError):
    """``check_Q_spd`` found a Q that is not positive definite (also a ``RuntimeError``, as in qpth)."""


class SpQPFunction:
    """qpth's sparse batched QP solver: importable, not supported.

    Constructing it raises :class:`dqp.errors.NotSupportedError`, so code that only imports it (OptNet's sudoku
    ``models.py``) loads, and code that uses it learns what to use instead.
    """

    def __init__(self, *args, **kwargs):
        raise NotSupportedError(
            "dqp.qpth.SpQPFunction (qpth's sparse batched solver) is not supported. Use "
            "dqp.qpth.QPFunction with dense tensors (Q.to_dense(), G.to_dense(), A.to_dense()), or dqp's "
            "sparse layer: dqp.dQP.dQP_layer(solve_type='sparse') with torch sparse CSC matrices."
        )


class QPSolvers(Enum):
    """qpth's solver choice, accepted for compatibility (both run dqp's batched IPM)."""

    PDIPM_BATCHED = 1
    CVXPY = 2


def _present(x: Optional[torch.Tensor]) -> bool:
    return x is not None and x.numel() > 0


def _check_inputs(**args: Optional[torch.Tensor]) -> None:
    """float32/float64 tensors without NaN (``+inf`` in h is an absent bound): typed errors otherwise.

    One host read for all six arguments: a NaN or ±inf makes a tensor's sum non-finite (``+inf``
    in h is clamped away first), so one sum per tensor screens it; only a flagged batch (or a sum
    that overflowed) is looked at entry by entry.
    """
    present = {}
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"QPFunction: {name} must be a torch tensor, got {type(t).__name__}.")
        if not _present(t):
            continue
        if t.dtype not in (torch.float32, torch.float64):
            raise LayoutError(
                f"QPFunction: {name} has dtype {t.dtype}; dqp solves in float32 or float64. "
                f"Convert with {name}.float() or {name}.double()."
            )
        present[name] = t.detach()
    if not present:
        return
    with torch.no_grad():
        sums = torch.stack(
            [(t.clamp(max=0) if name == "h" else t).sum(dtype=torch.float64) for name, t in present.items()]
        )
        if bool(torch.isfinite(sums).all()):
            return
    for name, t in present.items():
        bad = torch.isnan(t) | (t == float("-inf") if name == "h" else ~torch.isfinite(t))
        if bool(bad.any()):
            where = ""
            if t.dim() >= 2 and t.dim() == (2 if name in ("p", "h", "b") else 3):
                where = f" (batch elements {bad.reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()[:10]})"
            raise NonFiniteError(
                f"QPFunction: {name} contains NaN or Inf{where}"
                + (" (+inf in h marks an absent bound; NaN and -inf are errors)" if name == "h" else "")
                + "; check the layer that produced it."
            )


class QPFunction:
    """qpth-compatible differentiable batched QP solve (see the module docstring).

    Parameters
    ----------
    eps : float
        Requested accuracy; used as the IPM's relative tolerance only when looser than dqp's
        default (module docstring).
    verbose : int
        ≥ 1 logs one line per call; 0 and -1 are quiet.
    notImprovedLim : int
        Ignored (kept for signature compatibility).
    maxIter : int
        Iteration limit; dqp uses ``max(maxIter, 100)``.
    solver : QPSolvers
        Ignored (kept for compatibility).
    check_Q_spd : bool
        Raise :class:`QNotSPDError` when Q is not positive definite.
    on_failure : {"raise", "mask"}
        dqp's addition. ``"raise"`` (default): an element that is infeasible, unbounded or unsolved
        raises a typed :class:`dqp.errors.SolveError` naming it. ``"mask"``: such elements return
        zeros (zero gradients) and the call goes on, like qpth; read :attr:`status`.

    Attributes
    ----------
    status : Tensor or None
        ``(B,)`` :class:`dqp.errors.Status` codes of the last call (0 = solved).
    """

    def __init__(
        self,
        eps: float = 1e-12,
        verbose: int = 0,
        notImprovedLim: int = 3,
        maxIter: int = 20,
        solver: QPSolvers = QPSolvers.PDIPM_BATCHED,
        check_Q_spd: bool = True,
        on_failure: str = "raise",
    ):
        if on_failure not in ("raise", "mask"):
            raise SettingsError(f"QPFunction: on_failure must be 'raise' or 'mask', got {on_failure!r}.")
        self.eps = eps
        self.verbose = verbose
        self.notImprovedLim = notImprovedLim
        self.maxIter = maxIter
        self.solver = solver
        self.check_Q_spd = check_Q_spd
        self.on_failure = on_failure
        self.status: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return (
            f"QPFunction(eps={self.eps}, verbose={self.verbose}, maxIter={self.maxIter}, "
            f"check_Q_spd={self.check_Q_spd}) [dqp batched IPM]"
        )

    @graph_break  # torch.compile: the solve runs eagerly, the model around it compiles
    def __call__(
        self, Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor, h: torch.Tensor, A: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """Solve ``min ½zᵀQz + pᵀz s.t. Gz ≤ h, Az = b``; returns z of shape (B, n)."""
        reject_functorch((Q, p, G, h, A, b), "dqp.qpth.QPFunction")
        if _present(G) != _present(h):
            raise ShapeError(
                "QPFunction: G and h must both be given or both be empty "
                f"(got G with {G.numel()} and h with {h.numel()} elements)."
            )
        if _present(A) != _present(b):
            raise ShapeError(
                "QPFunction: A and b must both be given or both be empty "
                f"(got A with {A.numel()} and b with {b.numel()} elements)."
            )
        _check_inputs(Q=Q, p=p, G=G, h=h, A=A, b=b)
        C, d = (G, h) if _present(G) else (None, None)
        Ae, be = (A, b) if _present(A) else (None, None)
        if self.check_Q_spd:
            _, info = torch.linalg.cholesky_ex(0.5 * (Q + Q.transpose(-1, -2)))
            info = info.reshape(-1)
            if bool((info != 0).any()):
                bad = torch.nonzero(info != 0).flatten().tolist()
                where = f" (batch elements {bad[:10]}{'...' if len(bad) > 10 else ''})" if Q.dim() == 3 else ""
                raise QNotSPDError(
                    f"QPFunction: Q is not symmetric positive definite{where}. qpth requires Q ≻ 0; "
                    "dqp's solver also handles positive semidefinite Q (e.g. LPs with Q = 0): pass "
                    "check_Q_spd=False to allow it, or add a small multiple of the identity to Q."
                )
        # qpth's eps below dqp's default means "as accurate as you can": dqp's default (None), which
        # with the polish is accurate to round-off
        eps = float(self.eps) if float(self.eps) > default_eps(Q.dtype) else None
        z, _, _, status, _ = solve_qp_batch(
            Q, p, C, d, Ae, be, eps=eps, max_iter=max(int(self.maxIter), 100), on_failure=self.on_failure
        )
        self.status = status
        if self.on_failure == "mask" and bool((status != 0).any()):
            bad = torch.nonzero(status != 0).flatten().tolist()
            logger.warning(
                "dqp.qpth.QPFunction: %d of %d batch elements failed (e.g. %s); their outputs and "
                "gradients are zero (on_failure='mask'; statuses in QPFunction.status).",
                len(bad),
                status.numel(),
                bad[:10],
            )
        if self.verbose >= 1:
            logger.info("dqp.qpth.QPFunction: solved a batch of %d QPs (n=%d)", z.shape[0], z.shape[1])
        return z
