"""The element-wise engine: black-box forward, active-set polish, and the KKT backward.

For each batch element (NumPy float64 on the CPU):

1. the forward solver returns an approximate primal-dual point;
2. :func:`detect_active` classifies the inequalities from the slack *and* the dual, each scaled;
3. :func:`polish` solves the reduced KKT system on that set and verifies the result (primal
   feasible, duals nonnegative); with ``refine_active`` it repairs the set until the check holds.
   A verified point satisfies the KKT conditions of the convex QP, so it is the exact solution
   whatever the forward solver's accuracy;
4. the same factorization serves :func:`backward_element`.
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import scipy.sparse as sp

from dqp.certificates import check_keyword_failure, inf_norm, finalize, unverified_distance, verified_status
from dqp.errors import NotPSDError, Status
from dqp.problem import drop_unbounded_rows, restore_rows
from dqp.kkt import REGULARIZED, FactorPool, RobustKKT, auto_linsolver, warn_singular_once
from dqp.linsolve import get_linsolver
from dqp.settings import Settings
from dqp.solvers.base import ForwardSolver, RawSolution

logger = logging.getLogger("dqp")


@dataclass
class ElementResult:
    """Forward result of one element (kept for its backward)."""

    z: np.ndarray
    lam: np.ndarray
    mu: np.ndarray
    active: np.ndarray
    status: Status
    kkt: Optional[RobustKKT] = None
    verified: bool = False
    refine_iterations: int = 0
    n_weak: int = 0
    iterations: Optional[int] = None
    solve_time: float = 0.0
    message: str = ""
    residuals: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    margin: float = float("inf")
    polish_path: str = ""
    factorizations: int = 0
    nonconvex: bool = False
    #: the solver's own duals ``(y, z)`` of an unverified point (judging how far it is from the KKT conditions)
    raw_duals: Optional[Tuple[Optional[np.ndarray], Optional[np.ndarray]]] = None


@dataclass
class PolishTrace:
    """How the polish of one element went: ``path`` (``"quick"``: verified on the detected set or after
    at most three repairs, one factorization each; ``"ladder"``: equilibration, regularization,
    threshold ladder and repairs) and the numeric factorizations of the reduced KKT it made."""

    path: str = "quick"
    factorizations: int = 0
    #: a reduced KKT matrix of this element was singular: its later sets (of the same degenerate
    #: problem) go straight to the regularized factorization, skipping the tries a singular matrix fails
    singular: bool = False


_TINY = np.finfo(np.float64).tiny
#: allowance for round-off in a KKT residual, relative to the size of the terms summed
_ROUND = 1e3 * np.finfo(np.float64).eps


#: a sparse matrix of at most this many entries (rows × columns) is also kept dense for the checks'
#: products (the reduced KKT systems are still assembled from the sparse one): on a small problem a
#: SciPy sparse product costs about 5 µs and a derived SciPy matrix (``|M|``, ``Mᵀ``) 25 µs of
#: overhead, a small dense product 1 µs
DENSE_CHECKS = 10_000


def _transpose(M):
    """``Mᵀ`` (CSR for a sparse ``M``: its rows are ``M``'s columns, for fast products)."""
    return M.T.tocsr() if sp.issparse(M) else M.T


class Derived:
    """Matrices derived from one element's data (``|M|``, ``Mᵀ``, ``|M|ᵀ``, CSR rows, ``|M|`` row sums)
    and products with its points (``M x``, ``|M||x|``), each made once and shared by the detection,
    every polish round and the result: building a SciPy sparse object costs tens of microseconds, more
    than the arithmetic on a small problem."""

    def __init__(self) -> None:
        self._memo: dict = {}
        #: polish rounds by set (see :func:`_polish_round`)
        self.rounds: dict = {}

    def _get(self, op: str, M, make):
        key = (op, id(M))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = (M, make(M))  # M kept alive, so its id stays its own
        return hit[1]

    def op(self, M):
        """``M`` for products and the checks' derived matrices: a dense copy of a small sparse matrix
        (made once), else ``M`` itself (see :data:`DENSE_CHECKS`)."""
        if isinstance(M, np.ndarray) or not sp.issparse(M) or M.shape[0] * M.shape[1] > DENSE_CHECKS:
            return M
        return self._get("op", M, lambda X: X.toarray())

    def abs(self, M):
        return self._get("abs", M, lambda X: abs(self.op(X)))

    def T(self, M):
        return self._get("T", M, lambda X: _transpose(self.op(X)))

    def absT(self, M):
        return self._get("absT", M, lambda X: self.T(self.abs(X)))

    def rows(self, M):
        return self._get("rows", M, lambda X: X.tocsr() if sp.issparse(X) else X)

    def abs_row_sums(self, M) -> np.ndarray:
        return self._get("rowsum", M, lambda X: np.asarray(self.abs(X).sum(axis=1)).ravel())

    def _pair(self, op: str, M, x: np.ndarray, make):
        key = (op, id(M), id(x))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = (M, x, make())  # M and x kept alive, so their ids stay their own
        return hit[2]

    def times(self, M, x: np.ndarray) -> np.ndarray:
        """``M x``, once per (matrix, point): detection, the checks and the result read it repeatedly
        (``x`` is never written to after it is made)."""
        return self._pair("Mx", M, x, lambda: self.op(M) @ x)

    def abs_times(self, M, x: np.ndarray) -> np.ndarray:
        """``|M| |x|``, once per (matrix, point)."""
        return self._pair("|M||x|", M, x, lambda: self.abs(M) @ np.abs(x))


def _abs_rows(C, x: np.ndarray, mats: Optional[Derived] = None) -> np.ndarray:
    """``|C| |x|`` row by row: the natural size of ``C x`` (for scale-invariant tolerances)."""
    return abs(C) @ np.abs(x) if mats is None else mats.abs_times(C, x)


def _row_sizes(C, d: np.ndarray, x: np.ndarray, mats: Derived) -> np.ndarray:
    """``max(|d_i|, |C_i||x|)`` (at least tiny): the natural size of row ``i``'s slack at ``x``."""
    return np.maximum(np.maximum(np.abs(d), mats.abs_times(C, x)), _TINY)


def _point_sizes(C, x: np.ndarray, mats: Derived) -> np.ndarray:
    """``‖C_i‖₁‖x‖∞``: the size of ``C_i x`` at the scale of the whole point."""
    return mats.abs_row_sums(C) * inf_norm(x)


def detect_active(
    C, d: np.ndarray, x: np.ndarray, mu: Optional[np.ndarray], eps: float, mats: Optional[Derived] = None
) -> Tuple[np.ndarray, int]:
    """Active inequalities from the slack and (when given) the dual, each relative to its own scale.

    Constraint ``i`` is active when ``d_i − C_i x ≤ eps·max(|d_i|, |C_i||x|)`` or
    ``μ_i > eps·‖μ‖∞``: multiplying C and d (or P and q) by any factor leaves the set unchanged.
    A row whose slack is small only at the scale of the whole point, ``d_i − C_i x ≤ eps·‖C_i‖₁‖x‖∞``
    (a bound ``x_j ≥ 0`` where an interior-point method left ``x_j ≈ 1e-4`` next to entries of 1e3),
    is active when its dual is not negligible either, ``μ_i > 1e-2·eps·‖μ‖∞``: on Maros–Meszaros
    such rows with duals of 1e-7·‖μ‖∞ belong to the verified set (they pin a non-unique solution),
    while slack rows at that scale carry duals below 1e-8·‖μ‖∞.
    Returns the mask and the number of weakly active constraints (small slack *and* small dual).
    """
    mats = Derived() if mats is None else mats
    slack = d - mats.times(C, x)
    near = slack <= eps * _row_sizes(C, d, x, mats)
    if mu is None:
        return near, 0
    mu_max = max(float(np.abs(mu).max(initial=0.0)), _TINY)
    big = mu > eps * mu_max
    near |= (slack <= eps * _point_sizes(C, x, mats)) & (mu > 1e-2 * eps * mu_max)
    weak = int(np.count_nonzero(near & ~big))
    return near | big, weak


def _cpu_timed(fn, i):
    """``(fn(i), the CPU time the calling thread spent in it)``."""
    t0 = time.thread_time()
    out = fn(i)
    return out, time.thread_time() - t0


def _row_block(Cr, J: np.ndarray):
    """Rows ``J`` of a CSR matrix (or ndarray) in that order: ``Cr[J]``, without the 90 µs of SciPy's
    fancy indexing on a small matrix (the same arrays: a CSR matrix with sorted indices)."""
    if not sp.issparse(Cr):
        return Cr[J]
    starts = Cr.indptr[J]
    counts = Cr.indptr[J + 1] - starts
    indptr = np.zeros(len(J) + 1, dtype=Cr.indptr.dtype)
    np.cumsum(counts, out=indptr[1:])
    pos = np.repeat(starts - indptr[:-1], counts) + np.arange(indptr[-1], dtype=Cr.indptr.dtype)
    return sp.csr_matrix((Cr.data[pos], Cr.indices[pos], indptr), shape=(len(J), Cr.shape[1]))


@dataclass
class _Round:
    """One polish round: the reduced KKT solve on a set and its check (see :func:`polish`)."""

    z: np.ndarray
    lam: np.ndarray
    mu: np.ndarray
    kkt: RobustKKT
    verified: bool
    score: float
    bad_primal: bool
    viol: np.ndarray
    neg: np.ndarray
    J: np.ndarray


def _polish_round(P, q, C, d, A, b, active, solver, sparse, tol, start, quick, trace, pool, mats) -> Optional[_Round]:
    """Solve the reduced KKT system on ``active`` and check the point; ``None`` if not finite.

    Memoized per element (in ``mats``): the ladder's thresholds and repair chains meet the same sets
    again, and a round is a function of its set (and of the start point and factorization mode).
    """
    hint = trace is not None and trace.singular
    # (after a singular system the quick and the ladder's factorizations are the same regularized one)
    key = (active.tobytes(), quick and not hint, hint, id(start))
    hit = mats.rounds.get(key)
    if hit is not None:
        return hit[1]
    n = P.shape[0]
    p = 0 if A is None else A.shape[0]
    m = 0 if C is None else C.shape[0]
    J = np.flatnonzero(active)
    kkt = _reduced_kkt(P, A, C, J, solver, sparse, quick, hint, pool, mats)
    if trace is not None:
        trace.factorizations += kkt.factorizations
        trace.singular = trace.singular or kkt.path == REGULARIZED
    rhs = np.concatenate([-q, b if b is not None else np.zeros(0), d[J] if m else np.zeros(0)])
    x0 = None
    if start is not None:
        sx, sy, sz = start
        x0 = np.concatenate(
            [sx, sy if (p and sy is not None) else np.zeros(p), sz[J] if (m and sz is not None) else np.zeros(len(J))]
        )
    sol = kkt.solve(rhs, x0=x0)
    if not np.isfinite(sol).all():
        mats.rounds[key] = (start, None)
        return None
    z, lam, muJ = sol[:n], sol[n : n + p], sol[n + p :]
    out = _checked(P, q, C, d, A, b, z, lam, muJ, J, kkt, tol, mats)
    mats.rounds[key] = (start, out)  # (start kept alive: its id stays its own)
    return out


def _reduced_kkt(P, A, C, J: np.ndarray, solver, sparse: bool, quick: bool, hint: bool, pool, mats) -> RobustKKT:
    """The factorized reduced KKT system of the rows ``J`` of ``C`` (symbolic analyses from ``pool``)."""
    CJ = None if C is None else _row_block(mats.rows(C), J)
    return RobustKKT(P, A, CJ, sparse, solver, quick=quick, reuse=pool, singular_hint=hint)


def _checked(P, q, C, d, A, b, z, lam, muJ, J: np.ndarray, kkt: RobustKKT, tol: float, mats) -> _Round:
    """The polished point ``(z, λ, μ_J)`` of a round and its check (see :func:`polish`)."""
    p = len(lam)
    m = 0 if C is None else C.shape[0]
    mu = np.zeros(m)
    mu[J] = muJ
    Pz = mats.times(P, z)
    # stationarity and the equality-type rows (A, C_J) hold to tol relative to their terms
    terms = [_abs_rows(P, z, mats), q]  # |P||z|, not Pz: the terms' size survives cancellation
    r_stat = Pz + q
    r_prim = 0.0
    scale_p = _TINY
    if p:
        ATl = mats.T(A) @ lam
        r_stat = r_stat + ATl
        terms.append(mats.absT(A) @ np.abs(lam))
        r_prim = inf_norm(mats.times(A, z) - b)
        scale_p = max(scale_p, inf_norm(b), inf_norm(_abs_rows(A, z, mats)))  # |A||z|: the size of the terms of Az
    viol = np.zeros(m)
    neg = np.zeros(0, bool)
    mu_scale = _TINY
    if m:
        # the layer returns max(μ, 0): check stationarity for that point, so a negative μ_J within
        # the sign tolerance cannot hide a residual that its clipping creates
        mu_pos = np.maximum(mu, 0.0)
        CTm = mats.T(C) @ mu_pos
        r_stat = r_stat + CTm
        terms.append(mats.absT(C) @ mu_pos)
        Cz = mats.times(C, z)
        row_size = _row_sizes(C, d, z, mats)
        viol = (Cz - d) - tol * row_size
        if len(J):
            r_prim = max(r_prim, inf_norm(Cz[J] - d[J]))
            scale_p = max(scale_p, inf_norm(row_size[J]))
            viol[J] = -np.inf
            row_norm = inf_norm(mats.abs_row_sums(C)[J])
            mu_scale = tol * max(inf_norm(muJ), (inf_norm(Pz) + inf_norm(q)) / max(row_norm, _TINY), _TINY)
            neg = muJ < -mu_scale
    # stationarity to tol relative to the size of its *vectors* (Pz, q, Aᵀλ, Cᵀμ), plus the
    # round-off that summing the terms leaves (relative to the terms, |P||z| + |A|ᵀ|λ| + ...):
    # measuring it against the terms alone accepted points whose huge, cancelling multipliers
    # hid a real residual (LISWET8: ‖Pz+q+Cᵀμ‖∞ = 4.6e-3 with ‖Cᵀμ‖∞ = 1.2, |C|ᵀ|μ| = 6.8e6)
    vec_scale = max(inf_norm(Pz), inf_norm(q), inf_norm(ATl) if p else 0.0, inf_norm(CTm) if m else 0.0, _TINY)
    scale_d = tol * vec_scale + _ROUND * max(inf_norm(t) for t in terms)
    consistent = inf_norm(r_stat) <= scale_d and r_prim <= tol * scale_p
    bad_primal = bool(m) and bool((viol > 0).any())
    verified = consistent and not bad_primal and not neg.any()
    score = (
        max(float(viol.max(initial=0.0)), 0.0)
        + float(np.maximum(-muJ - mu_scale, 0.0).sum())
        + (0.0 if consistent else 1.0)
    )
    return _Round(z, lam, mu, kkt, verified, score, bad_primal, viol, neg, J)


def polish(
    P,
    q,
    C,
    d,
    A,
    b,
    active: np.ndarray,
    solver,
    sparse: bool,
    eps: float,
    refine: bool,
    max_iter: int,
    start: Optional[Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]] = None,
    quick: bool = False,
    trace: Optional[PolishTrace] = None,
    reuse=None,
    mats: Optional[Derived] = None,
):
    """Solve the reduced KKT on ``active`` and verify; repair the set when ``refine``.

    The check is scale-invariant, with tolerance ``tol = 1e-2·eps`` relative to each quantity's own
    size: inactive rows satisfy ``C_i z − d_i ≤ tol·max(|d_i|, |C_i||z|)``, active duals
    ``μ_J ≥ −tol·max(‖μ_J‖∞, (‖Pz‖∞+‖q‖∞)/‖C_J‖∞)``, and the equalities, active rows and
    stationarity hold to ``tol`` relative to the norms of their terms. A point that passes satisfies
    the KKT conditions of the (convex) QP, so it is the solution, whatever the solver's accuracy.

    ``start`` = the forward solver's ``(x, y, z)``: the refinement starts there, so when the reduced
    system is singular (a non-unique solution) the polished point stays next to the solver's.
    ``quick`` tries one unscaled factorization per set before :class:`RobustKKT`'s ladder; ``reuse``
    is a :class:`FactorPool` (or one factorization) whose symbolic analyses same-pattern systems
    reuse, and which receives this polish's factorizations; ``trace``
    counts the factorizations; ``mats`` holds the element's derived matrices.

    Returns ``(z, lam, mu_full, active, kkt, verified, iterations)``, or ``None`` if the solve is
    not finite.
    """
    tol = max(1e-2 * eps, 1e-13)
    active = active.copy()
    mats = Derived() if mats is None else mats
    best = None
    pool = reuse if isinstance(reuse, FactorPool) else FactorPool([reuse])
    for it in range(max_iter + 1):
        r = _polish_round(P, q, C, d, A, b, active, solver, sparse, tol, start, quick, trace, pool, mats)
        if r is None:
            return None
        z, lam, mu, kkt, verified, score = r.z, r.lam, r.mu, r.kkt, r.verified, r.score
        if best is None or score < best[0]:
            best = (score, z, lam, mu, active.copy(), kkt, verified, it)
        if verified or not refine or it == max_iter:
            break
        if r.bad_primal:
            active[r.viol > 0] = True
        elif r.neg.any():
            active[r.J[r.neg]] = False
        else:  # inconsistent reduced system (dependent rows with incompatible right-hand sides)
            break
    _, z, lam, mu, active, kkt, verified, it = best
    return z, lam, mu, active, kkt, verified, it


def _include_weakly_active(
    P,
    q,
    C,
    d,
    A,
    b,
    out,
    linsolver,
    sparse: bool,
    eps: float,
    trace: Optional[PolishTrace] = None,
    mats: Optional[Derived] = None,
    pool: Optional[FactorPool] = None,
):
    """Canonical treatment of weakly active rows: every row at its bound joins the active set.

    At a weakly active row (zero slack *and* zero multiplier) the solution map has a kink, and
    whether the solver's point put the row in or out of the set is an accident of its iterates. dqp
    always takes it *in* (the one-sided derivative of keeping the constraint tight), so the gradient
    does not depend on which solver, tolerance or warm start produced the point.
    """
    z, lam, mu, active, kkt, verified, it = out
    mats = Derived() if mats is None else mats
    slack = d - mats.times(C, z)
    at_bound = (~active) & (slack <= eps * _row_sizes(C, d, z, mats))
    if not at_bound.any():
        return out
    cand = polish(
        P,
        q,
        C,
        d,
        A,
        b,
        active | at_bound,
        linsolver,
        sparse,
        eps,
        False,
        0,
        start=(z, lam, mu),
        quick=True,
        trace=trace,
        reuse=pool if pool is not None else (None if kkt is None else kkt.factor),
        mats=mats,
    )
    if cand is not None and cand[5]:
        return cand[:6] + (it,)
    return out


def _clear_slack(C, d: np.ndarray, x: np.ndarray, mu: np.ndarray, eps: float, mats: Derived) -> np.ndarray:
    """Rows whose slack is clearly larger than their dual, both relative: an interior-point point at
    1e-8 leaves duals of 1e-5·‖μ‖∞ on rows with a slack of 1e-2, which the dual alone calls active.

    The slack is measured against ``max(|d_i|, |C_i||x|, ‖C_i‖₁‖x‖∞)``: the last term keeps a bound
    ``−x_j ≤ 0`` at ``x_j ≈ 1e-12`` small (its own terms alone would make it look slack).
    """
    slack = d - mats.times(C, x)
    rel_slack = slack / np.maximum(_row_sizes(C, d, x, mats), _point_sizes(C, x, mats))
    rel_mu = mu / max(inf_norm(mu), _TINY)
    return (rel_slack > eps) & (rel_slack > rel_mu)


def _repaired(data, out, eps: float, mats: Derived) -> Tuple[Optional[np.ndarray], str]:
    """The set after one repair of an unverified polish outcome (:func:`polish`'s rule: add the
    violated inactive rows, else drop the active rows with negative duals) and which (``"add"``,
    ``"drop"``); ``(None, "")`` if neither applies."""
    P, q, C, d, A, b = data
    z, lam, mu, active, kkt, verified, it = out
    tol = max(1e-2 * eps, 1e-13)
    Cz = mats.times(C, z)
    viol = (Cz - d) - tol * _row_sizes(C, d, z, mats)
    viol[active] = -np.inf
    if (viol > 0).any():
        return active | (viol > 0), "add"
    J = np.flatnonzero(active)
    if not len(J):
        return None, ""
    row_norm = inf_norm(mats.abs_row_sums(C)[J])
    mu_scale = tol * max(inf_norm(mu[J]), (inf_norm(mats.times(P, z)) + inf_norm(q)) / max(row_norm, _TINY), _TINY)
    neg = mu[J] < -mu_scale
    if not neg.any():
        return None, ""
    fixed = active.copy()
    fixed[J[neg]] = False
    return fixed, "drop"


def strict_complementarity_margin(slack: np.ndarray, mu: np.ndarray, active: np.ndarray) -> float:
    """``min(min_{i∈J} μ_i, min_{i∉J} slack_i)``: how far the solution is from a change of active set.

    Small values mean the derivative may change abruptly nearby (``inf`` without inequalities).
    """
    vals = np.concatenate([mu[active], slack[~active]])
    return float(np.min(vals)) if vals.size else float("inf")


def residuals(P, q, C, d, A, b, z, lam, mu, mats: Optional[Derived] = None) -> Tuple[float, float, float]:
    """Primal infeasibility, dual (stationarity) residual, complementarity (all ∞-norms)."""
    mats = Derived() if mats is None else mats
    r_dual = mats.times(P, z) + q
    r_prim = 0.0
    comp = 0.0
    if A is not None:
        r_dual = r_dual + mats.T(A) @ lam
        r_prim = float(np.abs(mats.times(A, z) - b).max(initial=0.0))
    if C is not None:
        r_dual = r_dual + mats.T(C) @ mu
        s = d - mats.times(C, z)
        r_prim = max(r_prim, float((-s).max(initial=0.0)))
        comp = float(np.abs(mu * s).max(initial=0.0))
    return r_prim, float(np.abs(r_dual).max(initial=0.0)), comp


class Engine:
    """Runs the forward and backward of the element-wise (black-box solver) path."""

    def __init__(self, settings: Settings, solver: ForwardSolver, lin_solver_name: str):
        self.settings = settings
        self.solver = solver
        self.lin_solver_name = lin_solver_name
        self._pool: Optional[ThreadPoolExecutor] = None
        #: ``omp_parallel="auto"``: ``(problem shape, CPU time per element)`` of the last call
        self._element_cpu: Optional[Tuple[tuple, float]] = None
        self.warm: List[Optional[Tuple[np.ndarray, ...]]] = []
        #: per batch slot, the recent reduced-KKT factorizations (their symbolic analyses are reused)
        self._factors: dict = {}
        self._warned_warm = False
        self.used_linsolvers: set = set()

    # -- forward -----------------------------------------------------------------------------
    def _linsolver(self, sparse: bool, size: int):
        # the batched torch solver serves the backward only; the CPU polish then uses the auto choice
        name = self.lin_solver_name if self.lin_solver_name not in ("auto", "torch") else auto_linsolver(sparse, size)
        self.used_linsolvers.add(name)
        return get_linsolver(name)

    def solve_element(self, data, sparse: bool, warm=None, slot: Optional[int] = None) -> ElementResult:
        """Forward of one element, its failures classified from verified certificates.

        Inequality rows with ``d_i = +inf`` (or ``≥ 1e20``) are left out of the solve: they can never
        be active; their multipliers and gradients are zero.
        """
        data, keep, m_full = drop_unbounded_rows(data)
        if keep is not None and warm is not None and len(warm[2]) == m_full:
            warm = (warm[0], warm[1], warm[2][keep])
        res = finalize(data, self._solve_chain(data, sparse, warm, slot), self.settings.time_limit is None)
        return res if keep is None else restore_rows(res, keep, m_full)

    def _solve_chain(self, data, sparse: bool, warm=None, slot: Optional[int] = None) -> ElementResult:
        """Forward of one element: direct KKT solve without inequalities, else solver + polish.

        When the chosen solver fails, or (``fallback_on_unverified``) its point cannot be verified, the
        ``fallback_solver`` chain is tried in turn (:meth:`_fallbacks`).
        """
        s = self.settings
        P, q, C, d, A, b = data
        n, m, p = P.shape[0], 0 if C is None else C.shape[0], 0 if A is None else A.shape[0]
        linsolver = self._linsolver(sparse, n + p + m)
        mats = Derived()  # |C|, Cᵀ, ... of this element, made once
        if m == 0:  # no inequalities: the KKT system *is* the problem; no solver needed
            direct = self._solve_direct(data, sparse, linsolver, slot, mats)
            if direct is not None:
                return direct
        if warm is not None and (len(warm[0]), len(warm[1]), len(warm[2])) != (n, p, m):
            warm = None  # the problem changed size since the previous call
        chain = [fb for fb in s.fallback_solver if fb != self.solver.name]
        res = self._solve_with(self.solver, data, sparse, linsolver, warm, slot, mats=mats, more_to_ask=bool(chain))
        if res.status == Status.SOLVED and (res.verified or not s.fallback_on_unverified):
            return res
        return self._fallbacks(res, chain, data, sparse, linsolver, mats)

    def _solve_direct(
        self, data, sparse: bool, linsolver, slot: Optional[int], mats: Derived
    ) -> Optional[ElementResult]:
        """Without inequalities the KKT system is the problem: its verified solution, else ``None``."""
        P, q, C, d, A, b = data
        trace = PolishTrace()
        pool = self._factor_pool(slot)
        none = np.zeros(0, bool)
        eps = self.settings.eps_active
        out = polish(
            P, q, C, d, A, b, none, linsolver, sparse, eps, False, 0, quick=True, trace=trace, reuse=pool, mats=mats
        )
        if out is None or not out[5]:
            return None
        message = "no inequalities: solved the KKT system directly"
        return self._result(data, out, None, 0.0, message, trace, pool, mats)

    def _fallbacks(self, res: ElementResult, chain: List[str], data, sparse: bool, linsolver, mats) -> ElementResult:
        """The ``fallback_solver`` chain after the primary's answer ``res`` failed or did not verify.

        The first verified answer wins; a solved-but-unverified one (the primary's first) is kept if
        none verifies, an unverified primary getting one second opinion that solves, not the whole
        chain; a certificate of infeasibility stops a chain that started from a failure.
        """
        from dqp.solvers import get_solver

        kept: Optional[ElementResult] = res if res.status == Status.SOLVED else None
        tried = []
        for k, fb in enumerate(chain):
            fsolver = get_solver(fb)
            # a second opinion on a solved-but-unverified answer gets a time limit (10× the first solve,
            # at least 1 s) where the solver has one: HiGHS took minutes on QPILOTNO
            extra = fsolver.time_limit_keywords(max(10.0 * res.solve_time, 1.0)) if kept is res else {}
            res2 = self._solve_with(
                fsolver, data, sparse, linsolver, None, None, extra, mats=mats, more_to_ask=k + 1 < len(chain)
            )
            tried.append(
                f"{fb}: {res2.status.name}" + ("" if res2.status != Status.SOLVED or res2.verified else " (unverified)")
            )
            res.solve_time += res2.solve_time
            if res2.status == Status.SOLVED:
                why = (
                    "its point could not be verified"
                    if res.status == Status.SOLVED
                    else f"failed ({res.message or res.status.name})"
                )
                res2.message = (f"{self.solver.name} {why}; solved by fallback_solver {fb!r}. " + res2.message).strip()
                if res2.verified:
                    res2.solve_time = res.solve_time
                    return res2
                if kept is res:
                    # the point closer to the KKT conditions is kept (proxqp's can be far off where Clarabel's is not)
                    if unverified_distance(data, res2) < unverified_distance(data, res):
                        kept = res2
                    break
                kept = kept or res2
                continue
            if res.status == Status.SOLVED:
                continue  # the primary found a point: a fallback's failure changes nothing
            if res2.status in (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE):
                res.status = res2.status  # a certificate (Clarabel's, PIQP's, HiGHS's) names the failure
                break
            if res.status == Status.SOLVER_ERROR:
                res.status = res2.status
        if kept is None:
            if tried:
                res.message += "; fallback solvers: " + ", ".join(tried)
            return res
        if kept is not res:
            kept.solve_time = res.solve_time
        elif tried:
            kept.message = (
                (kept.message + "; " if kept.message else "") + "no fallback verified it (" + ", ".join(tried) + ")"
            )
        return kept

    def _solve_with(
        self,
        solver: ForwardSolver,
        data,
        sparse: bool,
        linsolver,
        warm,
        slot,
        extra: Optional[dict] = None,
        mats: Optional[Derived] = None,
        more_to_ask: bool = False,
    ) -> ElementResult:
        """One solver's answer, polished and verified. ``more_to_ask``: a fallback solver that has not
        been tried yet remains in the chain (then a failed solve's point skips the ladder)."""
        s = self.settings
        P, q, C, d, A, b = data
        n, m, p = P.shape[0], 0 if C is None else C.shape[0], 0 if A is None else A.shape[0]
        raw, solve_time = self._raw_answer(solver, data, warm, slot, extra)

        def failed(status: Status, message: str) -> ElementResult:
            return ElementResult(
                np.zeros(n),
                np.zeros(p),
                np.zeros(m),
                np.zeros(m, bool),
                status,
                solve_time=solve_time,
                message=message,
                iterations=raw.iterations,
            )

        if raw.x is None:
            return failed(
                raw.status,
                f"{solver.name}: " + (raw.info.get("error", "") or raw.info.get("raw_status", "") or raw.status.name),
            )
        mu0 = raw.z if (s.dual_available and raw.z is not None) else None
        pool = self._factor_pool(slot)
        trace = PolishTrace(singular=pool.singular)  # a slot whose last call met a singular system
        start = (raw.x, raw.y, raw.z)
        mats = Derived() if mats is None else mats
        out = self._polish_quick(data, sparse, linsolver, raw.x, mu0, start, pool, trace, mats)
        # a failed solve's point rarely polishes: with a fallback solver still to ask, the ladder is not worth
        # its cost; the chain's last solver gets it (HiGHS's failed point on QSIERRA verifies after the ladder)
        certified = raw.status in (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE)  # (checked: no KKT point)
        if (out is None or not out[5]) and (raw.status == Status.SOLVED or not (more_to_ask or certified)):
            trace.path = "ladder"
            out = self._polish_ladder(data, sparse, linsolver, raw.x, mu0, start, out, trace, mats, pool)
        if out is None:
            return failed(
                raw.status if raw.status != Status.SOLVED else Status.NUMERICAL,
                f"{solver.name}: non-finite polished solution",
            )
        verified = out[5]
        if verified and m:
            out = _include_weakly_active(P, q, C, d, A, b, out, linsolver, sparse, s.eps_active, trace, mats, pool)
        message = ""
        if raw.status != Status.SOLVED:
            if not verified:
                return failed(
                    raw.status,
                    f"{solver.name} reported {raw.info.get('raw_status') or raw.status.name!r}; "
                    f"no verified KKT point could be recovered from its output",
                )
            message = f"{solver.name} reported {raw.status.name}; the polished solution passed the KKT check"
        return self._result(data, out, raw, solve_time, message, trace, pool, mats)

    def _raw_answer(self, solver: ForwardSolver, data, warm, slot, extra: Optional[dict]) -> Tuple[RawSolution, float]:
        """The solver's own answer (with the settings' keywords and the warm start) and its solve time;
        an infeasibility claim whose certificate does not check out becomes a failure."""
        s = self.settings
        kw = {**solver.tolerance_keywords(s.eps_abs, s.eps_rel), **(extra or {})}
        if s.time_limit is not None:
            kw.update(solver.time_limit_keywords(s.time_limit))
        user_kw = s.qp_solver_keywords if solver is self.solver else {}
        kw.update(user_kw)
        if s.verbose:
            kw.setdefault("verbose", True)
        initvals = None if warm is None else warm[0]
        warm_duals = None if warm is None else (warm[1], warm[2])
        t0 = time.perf_counter()
        raw: RawSolution = solver.solve(*data, initvals=initvals, warm_duals=warm_duals, keywords=kw, slot=slot)
        solve_time = raw.info.get("time", time.perf_counter() - t0)
        check_keyword_failure(solver.name, raw, user_kw)
        if (
            raw.status in (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE)
            and verified_status(data, raw.status, raw.x, raw.y, raw.z) is None
        ):
            # a claim without a certificate that checks out is a failure, not a diagnosis (Clarabel
            # called PRIMALC2 unbounded; HiGHS solves it): the fallback chain goes on
            raw.info["raw_status"] = f"claimed {raw.status.name} but its certificate did not verify; " + str(
                raw.info.get("raw_status", "")
            )
            raw.status = Status.NUMERICAL
        return raw, solve_time

    def _factor_pool(self, slot: Optional[int]) -> FactorPool:
        """The factorizations kept for batch slot ``slot`` (a fresh pool for ``None``: a fallback solve)."""
        if slot is None:
            return FactorPool()
        pool = self._factors.get(slot)
        if pool is None:
            pool = self._factors[slot] = FactorPool()
        return pool

    #: repairs of the quick polish (each one factorization) before the ladder takes over
    QUICK_REPAIRS = 2

    def _polish_quick(
        self, data, sparse: bool, linsolver, x, mu0, start, pool: FactorPool, trace: PolishTrace, mats: Derived
    ):
        """The common case: the set detected at ``eps_active``, one unscaled factorization (reusing the
        symbolic analysis of this slot's earlier calls, kept in ``pool``), verified. When that fails: the set of a 100×
        stricter threshold and at most ``QUICK_REPAIRS`` repairs of the first set, in the order its
        failure suggests."""
        s = self.settings
        P, q, C, d, A, b = data
        m = 0 if C is None else C.shape[0]
        active = detect_active(C, d, x, mu0, s.eps_active, mats)[0] if m else np.zeros(0, bool)
        if m and mu0 is not None:
            active &= ~_clear_slack(C, d, x, mu0, s.eps_active, mats)
        run = lambda act, refine, repairs, reuse: polish(
            P,
            q,
            C,
            d,
            A,
            b,
            act,
            linsolver,
            sparse,
            s.eps_active,
            refine,
            repairs,
            start=start,
            quick=True,
            trace=trace,
            reuse=reuse,
            mats=mats,
        )
        out = run(active, False, 0, pool)
        if (out is not None and out[5]) or not (m and s.refine_active):
            return out
        # the first set failed: a negative dual (interior-point points leave duals of 1e-5 on inactive
        # rows) is repaired first; violated rows (a degenerate vertex's set missing rows: most of the
        # Maros–Meszaros LPs) are better found by the 100x stricter threshold's set, then repaired
        repairs = min(self.QUICK_REPAIRS, s.max_refine_iter)
        fixed, kind = (None, "") if (out is None or not repairs) else _repaired(data, out, s.eps_active, mats)
        tries = [(fixed, True)] if kind == "drop" else []
        strict = detect_active(C, d, x, mu0, 1e-2 * s.eps_active, mats)[0]
        if not np.array_equal(strict, active):
            tries.append((strict, False))
        if kind == "add":
            tries.append((fixed, True))
        for act, refine in tries:
            cand = run(act, refine, repairs - 1 if refine else 0, pool)
            if cand is not None and cand[5]:
                return cand
        return out

    def _polish_ladder(
        self, data, sparse: bool, linsolver, x, mu0, start, out, trace: PolishTrace, mats: Derived, pool=None
    ):
        """When the quick polish fails: equilibrated factorizations, the full repair budget, and stricter
        and looser thresholds (the solver's accuracy and ``eps_active`` may disagree, as on badly
        scaled problems): the check, not the threshold, decides. ``out`` is the quick polish's outcome."""
        s = self.settings
        P, q, C, d, A, b = data
        m = 0 if C is None else C.shape[0]
        if s.refine_active and m:
            # cheapest first (measured on Maros–Meszaros: the set as detected, the stricter thresholds' sets
            # after one repair, and only then the long repair chains); every old attempt is kept
            few = min(3, s.max_refine_iter)
            steps = [(1.0, 0), (1e-2, few), (1e-4, few), (1.0, s.max_refine_iter), (1e2, few)]
        else:
            steps = [(1.0, 0)]
        quick_out, out, first = out, None, None
        for f, repairs in steps:
            active = detect_active(C, d, x, mu0, f * s.eps_active, mats)[0] if m else np.zeros(0, bool)
            cand = polish(
                P,
                q,
                C,
                d,
                A,
                b,
                active,
                linsolver,
                sparse,
                s.eps_active,
                s.refine_active,
                repairs,
                start=start,
                trace=trace,
                reuse=pool,
                mats=mats,
            )
            if cand is not None and cand[5]:
                return cand
            if f == 1.0 and (first is None or repairs):
                first = cand if cand is not None else first  # unverified: the full repair chain's outcome
        out = first
        return out if out is not None else quick_out

    def _result(
        self,
        data,
        out,
        raw: Optional[RawSolution],
        solve_time: float,
        message: str,
        trace: Optional[PolishTrace] = None,
        pool: Optional[FactorPool] = None,
        mats: Optional[Derived] = None,
    ) -> ElementResult:
        """Assemble the element's result from a polish outcome (and the solver's point when unverified)."""
        s = self.settings
        P, q, C, d, A, b = data
        m = 0 if C is None else C.shape[0]
        mats = Derived() if mats is None else mats
        z, lam, mu, active, kkt, verified, it = out
        if not verified and raw is not None:
            # keep the solver's own primal-dual point: the set could not be made consistent
            z = raw.x
            lam = raw.y if raw.y is not None else lam
            mu = np.maximum(raw.z, 0.0) if raw.z is not None else mu
            message = (
                "active set could not be verified (degenerate problem or inaccurate solver); "
                "returned the solver's point, gradients use the detected active set"
            )
        mu = np.where(active, np.maximum(mu, 0.0), 0.0) if m else mu
        n_weak, margin = 0, float("inf")
        if m:  # weakly active: on the boundary with a (near) zero multiplier, after the polish
            slack = d - mats.times(C, z)
            at_bound = slack <= s.eps_active * _row_sizes(C, d, z, mats)
            zero_dual = mu <= s.eps_active * max(float(mu.max(initial=0.0)), _TINY)
            n_weak = int(np.count_nonzero(at_bound & zero_dual))
            margin = strict_complementarity_margin(slack, mu, active)
        res = residuals(P, q, C, d, A, b, z, lam, mu, mats)
        if kkt.path == REGULARIZED:
            warn_singular_once()
        if pool is not None:
            pool.add(kkt.factor)  # the factorization in use first: its analysis serves this slot's next call
            pool.singular = trace is not None and trace.singular
        trace = trace or PolishTrace()
        return ElementResult(
            z,
            lam,
            mu,
            active,
            Status.SOLVED,
            kkt,
            verified,
            it,
            n_weak,
            None if raw is None else raw.iterations,
            solve_time,
            message,
            res,
            margin,
            trace.path,
            trace.factorizations,
            raw_duals=None if verified or raw is None else (raw.y, raw.z),
        )

    def forward(self, batch) -> List[ElementResult]:
        self.used_linsolvers = set()
        nb = batch.numpy()
        B = batch.B
        if len(self.warm) != B:
            self.warm = [None] * B
            if hasattr(self.solver, "prune"):  # per-slot workspaces (OSQP) of a larger batch
                self.solver.prune(B)
            self._factors = {k: v for k, v in self._factors.items() if k < B}
        use_warm = self.settings.warm_start_from_previous
        if use_warm and not self.solver.warm_starts and not self._warned_warm:
            self._warned_warm = True
            from dqp.solvers import available_solvers, get_solver

            users = [k for k in available_solvers() if get_solver(k).warm_starts]
            warnings.warn(
                f"warm_start_from_previous=True has no effect with qp_solver={self.solver.name!r}: it does "
                f"not take starting values (solvers that do: {', '.join(users)}). Each call still reuses "
                f"the previous call's reduced-KKT analysis.",
                UserWarning,
                stacklevel=4,
            )

        def run(i):
            return self.solve_element(nb.element(i), batch.sparse, self.warm[i] if use_warm else None, slot=i)

        results = self._run_all(run, B, (batch.n, batch.m, batch.p, batch.sparse))
        bad = [i for i, r in enumerate(results) if r.nonconvex]
        if bad:
            raise NotPSDError(
                f"Argument P is not positive semidefinite{f' (batch elements {bad[:10]})' if batch.batched else ''}: "
                f"it has a negative eigenvalue (seen in the inertia of the reduced KKT factorization at the "
                f"solver's point, or after the solve failed, and confirmed by P's smallest eigenvalue), so the QP "
                f"is not convex and a solver's point is not its minimum. Build P as L @ L.T (+ eps*I); "
                f"check_PSD=True tests every P before solving."
            )
        if use_warm:
            self.warm = [(r.z, r.lam, r.mu) if r.status == Status.SOLVED else None for r in results]
        return results

    #: ``omp_parallel="auto"``: a batch goes to the thread pool when its elements take at least this much
    #: CPU time each. Measured on 2 cores (forward + backward, B = 4 to 32, two workers against one), with
    #: solvers that run without the GIL: 1.2–2.1x faster from 4.7 ms per element, 0.89–1.16x at 4.4 ms,
    #: 0.7–1.3x at 3.1 ms, 0.54–0.97x at 0.3–0.7 ms (the layer's own Python work holds the GIL).
    PARALLEL_MIN_ELEMENT_S = 4e-3

    def _run_all(self, run, B: int, shape: tuple) -> List[ElementResult]:
        """``run(i)`` for every element: in the thread pool (``omp_parallel``), or one after another.

        ``'auto'`` decides from the CPU time per element of the previous call when it had the same
        ``shape`` (a CPU time, not a wall time: a preemption by another process, or a wait for the GIL,
        does not count); otherwise the call solves its first element alone to measure it. A KeyboardInterrupt
        reaches Python between sequential elements; in the pool, the elements not started yet are dropped.
        """
        s = self.settings
        mode = s.omp_parallel
        if min(s.n_cpu, B) < 2 or mode is False or (mode == "auto" and not self.solver.gil_free):
            return [run(i) for i in range(B)]
        if mode is True:
            return self._pooled(run, range(B))
        timed = lambda i: _cpu_timed(run, i)  # noqa: E731
        done = []
        last = self._element_cpu
        per_element = last[1] if last is not None and last[0] == shape else None
        if per_element is None:
            done.append(timed(0))
            per_element = done[0][1]
        rest = range(len(done), B)
        if per_element >= self.PARALLEL_MIN_ELEMENT_S:
            logger.debug(
                "omp_parallel='auto': %.1f ms of CPU time per element; %d workers", per_element * 1e3, min(s.n_cpu, B)
            )
            done += self._pooled(timed, rest)
        else:
            done += [timed(i) for i in rest]
        self._element_cpu = (shape, float(np.median([t for _, t in done])))
        return [r for r, _ in done]

    def _pooled(self, fn, indices) -> list:
        """``fn(i)`` for each index on the thread pool (created once), in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.settings.n_cpu, thread_name_prefix="dqp")
        futures = [self._pool.submit(fn, i) for i in indices]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            raise

    # -- backward ----------------------------------------------------------------------------
    @staticmethod
    def backward_element(r: ElementResult, gz: np.ndarray, glam: np.ndarray, gmu: np.ndarray):
        """Adjoint solve ``K y = (ḡ_z, ḡ_λ, ḡ_μJ)``; returns ``(y_z, y_lam, y_mu_full, residual)``."""
        n, p, m = len(r.z), len(r.lam), len(r.mu)
        J = np.flatnonzero(r.active)
        rhs = np.concatenate([gz, glam, gmu[J]])
        y = r.kkt.solve(rhs)
        y_mu = np.zeros(m)
        y_mu[J] = y[n + p :]
        return y[:n], y[n : n + p], y_mu, r.kkt.residual
