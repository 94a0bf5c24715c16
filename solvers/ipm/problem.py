"""Problem preparation of the batched IPM: input checks, the batch, row scaling, the result type."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from dqp.errors import LayoutError, ShapeError

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass
class IPMResult:
    """Solution of a batch of QPs by :func:`ipm_solve`.

    Attributes
    ----------
    z : (B, n) primal solution.
    lam : (B, p) equality duals, or ``None`` without equalities.
    mu : (B, m) inequality duals (≥ 0), or ``None`` without inequalities.
    s : (B, m) slacks ``d − Cz`` as maintained by the IPM (> 0); ``(B, 0)`` without inequalities.
    status : (B,) int64, :class:`dqp.errors.Status` values.
    iterations : (B,) int64, iterations each instance ran.
    form : which elimination ran (``"primal"`` or ``"dual"``).
    fused : whether the fused kernel (:mod:`dqp.solvers.fused`) ran the iterations.
    factors : for the dual form, ``L`` (Cholesky factor of P, a :class:`CholeskyFactor`), ``PiAbt`` = P⁻¹[A; C]ᵀ and
        ``M`` = [A; C] P⁻¹ [A; C]ᵀ in the caller's scaling, for reuse by
        :class:`dqp.linsolve.torch_batched.BatchedKKT` (the polish and the backward).
    polish : when the fused kernel ran with ``polish_rounds > 0``: ``active`` (B, m) bool,
        ``polished`` (B,) bool (``z, lam, mu`` are then the polished point; ``s`` stays the IPM's
        slack), ``fallback`` (B,) bool (a round's reduced system failed the pivot test: the
        kernel left the IPM point, the caller polishes that element), ``ok`` (B,) bool (the first round's
        factorization passed) and ``LS`` (B, k, k), the lower Cholesky factor of the reduced
        system's Schur complement ``S = Ā_J P⁻¹ Ā_Jᵀ + diag(0, 1 − a)`` as BatchedKKT keeps it.
        Otherwise None.
    """

    z: Tensor
    lam: Optional[Tensor]
    mu: Optional[Tensor]
    s: Tensor
    status: Tensor
    iterations: Tensor
    form: str = "primal"
    factors: Optional[Dict[str, Any]] = None
    polish: Optional[Dict[str, Tensor]] = None
    fused: bool = False


def default_eps(dtype: torch.dtype) -> float:
    """Default relative stopping tolerance for ``dtype`` (1e-9 float64, 1e-5 float32/half)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# small batched helpers (work for shared (k, n) and batched (B, k, n) matrices)
# --------------------------------------------------------------------------------------------


def _amax(x: Tensor) -> Tensor:
    """Row-wise ∞-norm, 0 for empty rows."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    return torch.linalg.vector_norm(x, math.inf, dim=-1)  # one kernel (abs + amax: two); NaN propagates


def _max_step(v: Tensor, dv: Tensor, cap: float = 1e30) -> Tensor:
    """Largest α ≥ 0 with v + α dv ≥ 0 (v > 0), per row, capped at ``cap``."""
    if v.shape[-1] == 0:
        return v.new_full(v.shape[:-1], cap)
    # min over dv_i < 0 of v_i/(−dv_i) = −1/min_i(dv_i/v_i): 5 kernels, 3 of them on (B,)
    return (dv / v).amin(-1).clamp(max=-1.0 / cap).reciprocal().neg()


# --------------------------------------------------------------------------------------------
# input normalization
# --------------------------------------------------------------------------------------------


def _prepare(P, q, C, d, A, b):
    """Check shapes, find the batch size, drop 0-row constraints. Returns tensors + (B, n, m, p)."""
    if not isinstance(P, Tensor) or not isinstance(q, Tensor):
        raise LayoutError(f"ipm_solve: P and q must be torch tensors (got {type(P).__name__}, {type(q).__name__}).")
    dtype, device = P.dtype, P.device
    if not dtype.is_floating_point:
        raise LayoutError(
            f"ipm_solve: P must be a floating tensor (got dtype {dtype}); convert with P.double() or P.float()."
        )
    for name, t in (("q", q), ("C", C), ("d", d), ("A", A), ("b", b)):
        if t is not None and (t.dtype != dtype or t.device != device):
            raise LayoutError(
                f"ipm_solve: {name} has dtype {t.dtype} on {t.device}, but P has dtype "
                f"{dtype} on {device}; pass all data with one dtype on one device."
            )
    if q.dim() not in (1, 2):
        raise ShapeError(f"ipm_solve: q must be (n,) or (B, n), got shape {tuple(q.shape)}.")
    n = q.shape[-1]
    if P.dim() not in (2, 3) or P.shape[-2:] != (n, n):
        raise ShapeError(f"ipm_solve: P must be ({n}, {n}) or (B, {n}, {n}) to match q, got {tuple(P.shape)}.")
    if (C is None) != (d is None):
        raise ShapeError("ipm_solve: give both C and d, or neither.")
    if (A is None) != (b is None):
        raise ShapeError("ipm_solve: give both A and b, or neither.")

    batch = set()
    for name, t, nd in (("P", P, 3), ("q", q, 2), ("C", C, 3), ("d", d, 2), ("A", A, 3), ("b", b, 2)):
        if t is None:
            continue
        if t.dim() not in (nd - 1, nd):
            raise ShapeError(f"ipm_solve: {name} must have {nd - 1} or {nd} dimensions, got shape {tuple(t.shape)}.")
        if t.dim() == nd:
            batch.add(t.shape[0])
    if len(batch) > 1:
        raise ShapeError(f"ipm_solve: batched arguments disagree on the batch size: {sorted(batch)}.")
    B = batch.pop() if batch else 1

    def _rows(M, v, name):
        if M is None:
            return None, None, 0
        if M.shape[-1] != n:
            raise ShapeError(f"ipm_solve: {name} must have {n} columns, got shape {tuple(M.shape)}.")
        k = M.shape[-2]
        if v.shape[-1] != k:
            raise ShapeError(f"ipm_solve: {name} has {k} rows but its right-hand side has {v.shape[-1]}.")
        if k == 0:
            return None, None, 0
        return M, v, k

    C, d, m = _rows(C, d, "C")
    A, b, p = _rows(A, b, "A")
    q = q.expand(B, n)
    if d is not None:
        d = d.expand(B, m)
    if b is not None:
        b = b.expand(B, p)
    return P, q, C, d, A, b, B, n, m, p


def _row_normalize(M: Optional[Tensor], v: Optional[Tensor]):
    """Scale rows of ``M`` (and v) to unit 2-norm. Returns (M, v, scale) with scale (…, k)."""
    if M is None:
        return None, None, None
    nrm = torch.linalg.vector_norm(M, dim=-1)
    nrm = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    return M / nrm.unsqueeze(-1), v / nrm, nrm


# --------------------------------------------------------------------------------------------


def _row_scales(a_scale: Optional[Tensor], c_scale: Optional[Tensor], B: int) -> Tensor:
    """The row norms of ``[A; C]`` (B, k) from the scaling's per-block ones."""
    sc = [t.expand(B, t.shape[-1]) for t in (a_scale, c_scale) if t is not None]
    return torch.cat(sc, dim=-1) if len(sc) > 1 else sc[0]
