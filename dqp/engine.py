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
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from dqp.errors import Status
from dqp.kkt import REGULARIZED, RobustKKT, auto_linsolver, warn_singular_once
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


def _mv(M, x):
    return M @ x


def detect_active(C, d: np.ndarray, x: np.ndarray, mu: Optional[np.ndarray], eps: float) -> Tuple[np.ndarray, int]:
    """Active inequalities from the slack and (when given) the dual, each scaled.

    Constraint ``i`` is active when ``d_i − C_i x ≤ eps·(1+|d_i|)`` or ``μ_i > eps·max(1, ‖μ‖∞)``.
    Returns the mask and the number of weakly active constraints (small slack *and* small dual).
    """
    slack = d - _mv(C, x)
    near = slack <= eps * (1.0 + np.abs(d))
    if mu is None:
        return near, 0
    big = mu > eps * max(1.0, float(np.max(np.abs(mu), initial=0.0)))
    weak = int(np.count_nonzero(near & ~big))
    return near | big, weak


def polish(P, q, C, d, A, b, active: np.ndarray, solver, sparse: bool, eps: float, refine: bool,
           max_iter: int, start: Optional[Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]] = None):
    """Solve the reduced KKT on ``active`` and verify; repair the set when ``refine``.

    ``start`` = the forward solver's ``(x, y, z)``: the refinement starts there, so when the reduced
    system is singular (a non-unique solution) the polished point stays next to the solver's.

    Returns ``(z, lam, mu_full, active, kkt, verified, iterations)``.
    """
    n = P.shape[0]
    p = 0 if A is None else A.shape[0]
    m = 0 if C is None else C.shape[0]
    active = active.copy()
    best = None
    for it in range(max_iter + 1):
        J = np.flatnonzero(active)
        CJ = None if C is None else (C[J] if not sp.issparse(C) else C.tocsr()[J].tocsc())
        kkt = RobustKKT(P, A, CJ, sparse, solver)
        rhs = np.concatenate([-q, b if b is not None else np.zeros(0), d[J] if m else np.zeros(0)])
        x0 = None
        if start is not None:
            sx, sy, sz = start
            x0 = np.concatenate([sx, sy if (p and sy is not None) else np.zeros(p),
                                 sz[J] if (m and sz is not None) else np.zeros(len(J))])
        sol = kkt.solve(rhs, x0=x0)
        z, lam, muJ = sol[:n], sol[n:n + p], sol[n + p:]
        mu = np.zeros(m)
        mu[J] = muJ
        if not np.all(np.isfinite(sol)):
            return None
        viol = np.zeros(m) if m == 0 else (_mv(C, z) - d) - eps * (1.0 + np.abs(d))
        if m:
            viol[J] = -np.inf
        mu_scale = eps * max(1.0, float(np.max(np.abs(muJ), initial=0.0)))
        neg = muJ < -mu_scale
        bad_primal = m and np.any(viol > 0)
        # the reduced system itself must be solved (a singular, inconsistent K is not): check the
        # equalities, the active rows and stationarity too
        r_p, r_d, _ = residuals(P, q, C, d, A, b, z, lam, mu)
        scale_p = 1.0 + max(float(np.max(np.abs(d), initial=0.0)) if m else 0.0,
                            float(np.max(np.abs(b), initial=0.0)) if p else 0.0)
        scale_d = 1.0 + float(np.max(np.abs(q), initial=0.0))
        consistent = r_p <= eps * scale_p and r_d <= eps * scale_d
        verified = consistent and not bad_primal and not np.any(neg)
        score = (max(float(np.max(viol, initial=0.0)), 0.0) + float(np.sum(np.maximum(-muJ - mu_scale, 0.0))))
        if best is None or score < best[0]:
            best = (score, z, lam, mu, active.copy(), kkt, verified, it)
        if verified or not refine or it == max_iter:
            break
        if bad_primal:
            active[viol > 0] = True
        else:
            active[J[neg]] = False
    _, z, lam, mu, active, kkt, verified, it = best
    return z, lam, mu, active, kkt, verified, it


def strict_complementarity_margin(slack: np.ndarray, mu: np.ndarray, active: np.ndarray) -> float:
    """``min(min_{i∈J} μ_i, min_{i∉J} slack_i)``: how far the solution is from a change of active set.

    Small values mean the derivative may change abruptly nearby (``inf`` without inequalities).
    """
    vals = np.concatenate([mu[active], slack[~active]])
    return float(np.min(vals)) if vals.size else float("inf")


def residuals(P, q, C, d, A, b, z, lam, mu) -> Tuple[float, float, float]:
    """Primal infeasibility, dual (stationarity) residual, complementarity (all ∞-norms)."""
    r_dual = _mv(P, z) + q
    r_prim = 0.0
    comp = 0.0
    if A is not None:
        r_dual = r_dual + A.T @ lam
        r_prim = float(np.max(np.abs(_mv(A, z) - b), initial=0.0))
    if C is not None:
        r_dual = r_dual + C.T @ mu
        s = d - _mv(C, z)
        r_prim = max(r_prim, float(np.max(np.maximum(-s, 0.0), initial=0.0)))
        comp = float(np.max(np.abs(mu * s), initial=0.0))
    return r_prim, float(np.max(np.abs(r_dual), initial=0.0)), comp


def classify_failure(P, q, C, d, A, b) -> Status:
    """Decide primal/dual infeasibility with Clarabel when a solver failed without saying why."""
    try:
        from dqp.solvers import get_solver

        ref = get_solver("clarabel").solve(P, q, C, d, A, b)
    except Exception:  # pragma: no cover - clarabel is a core dependency
        return Status.SOLVER_ERROR
    if ref.status in (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE):
        return ref.status
    return Status.SOLVER_ERROR


class Engine:
    """Runs the forward and backward of the element-wise (black-box solver) path."""

    def __init__(self, settings: Settings, solver: ForwardSolver, lin_solver_name: str):
        self.settings = settings
        self.solver = solver
        self.lin_solver_name = lin_solver_name
        self._pool: Optional[ThreadPoolExecutor] = None
        self.warm: List[Optional[Tuple[np.ndarray, ...]]] = []
        self.used_linsolvers: set = set()

    # -- forward -----------------------------------------------------------------------------
    def _linsolver(self, sparse: bool, size: int):
        # the batched torch solver serves the backward only; the CPU polish then uses the auto choice
        name = self.lin_solver_name if self.lin_solver_name not in ("auto", "torch") else auto_linsolver(sparse, size)
        self.used_linsolvers.add(name)
        return get_linsolver(name)

    def solve_element(self, data, sparse: bool, warm=None, slot: Optional[int] = None) -> ElementResult:
        s = self.settings
        P, q, C, d, A, b = data
        n, m, p = P.shape[0], 0 if C is None else C.shape[0], 0 if A is None else A.shape[0]
        kw = {**self.solver.tolerance_keywords(s.eps_abs, s.eps_rel), **s.qp_solver_keywords}
        if s.verbose:
            kw.setdefault("verbose", True)
        initvals = None if warm is None else warm[0]
        warm_duals = None if warm is None else (warm[1], warm[2])
        t0 = time.perf_counter()
        raw: RawSolution = self.solver.solve(P, q, C, d, A, b, initvals=initvals, warm_duals=warm_duals,
                                             keywords=kw, slot=slot)
        solve_time = raw.info.get("time", time.perf_counter() - t0)
        if raw.x is None:
            status = raw.status
            if status == Status.SOLVER_ERROR:
                status = classify_failure(P, q, C, d, A, b)
            msg = raw.info.get("error", "") or raw.info.get("raw_status", "")
            return ElementResult(np.zeros(n), np.zeros(p), np.zeros(m), np.zeros(m, bool), status,
                                 solve_time=solve_time, message=msg, iterations=raw.iterations)
        mu0 = raw.z if (s.dual_available and raw.z is not None) else None
        linsolver = self._linsolver(sparse, n + p + m)
        out = None
        # The detection threshold is eps_active; when the set it gives cannot be verified (the solver's
        # accuracy and eps_active disagree, as on badly scaled problems), stricter and looser thresholds
        # are tried: the check, not the threshold, decides.
        thresholds = [s.eps_active] + ([s.eps_active * f for f in (1e-2, 1e-4, 1e2)] if s.refine_active else [])
        for k, eps in enumerate(thresholds):
            active = detect_active(C, d, raw.x, mu0, eps)[0] if m else np.zeros(0, bool)
            repairs = 0 if not s.refine_active else (s.max_refine_iter if k == 0 else min(3, s.max_refine_iter))
            cand = polish(P, q, C, d, A, b, active, linsolver, sparse, s.eps_active, s.refine_active,
                          repairs, start=(raw.x, raw.y, raw.z))
            if out is None or (cand is not None and cand[5] and not out[5]):
                out = cand
            if out is not None and out[5]:
                break
        message = ""
        if out is None:
            status = raw.status if raw.status != Status.SOLVED else Status.NUMERICAL
            return ElementResult(np.zeros(n), np.zeros(p), np.zeros(m), np.zeros(m, bool), status,
                                 solve_time=solve_time, message="non-finite polished solution")
        z, lam, mu, active, kkt, verified, it = out
        status = Status.SOLVED
        if raw.status != Status.SOLVED:
            if verified:
                message = f"solver reported {raw.status.name}; the polished solution passed the KKT check"
            else:
                status = raw.status
                if status == Status.SOLVER_ERROR:
                    status = classify_failure(P, q, C, d, A, b)
                message = (f"{self.solver.name} reported {raw.info.get('raw_status') or raw.status.name!r}; "
                           f"no verified KKT point could be recovered from its output")
                return ElementResult(np.zeros(n), np.zeros(p), np.zeros(m), np.zeros(m, bool), status,
                                     solve_time=solve_time, message=message, iterations=raw.iterations)
        elif not verified:
            # keep the solver's own primal-dual point: the set could not be made consistent
            z = raw.x
            lam = raw.y if raw.y is not None else lam
            mu = np.maximum(raw.z, 0.0) if raw.z is not None else mu
            message = ("active set could not be verified (degenerate problem or inaccurate solver); "
                       "returned the solver's point, gradients use the detected active set")
        mu = np.where(active, np.maximum(mu, 0.0), 0.0) if m else mu
        n_weak, margin = 0, float("inf")
        if m:  # weakly active: on the boundary with a (near) zero multiplier, after the polish
            slack = d - _mv(C, z)
            at_bound = slack <= s.eps_active * (1.0 + np.abs(d))
            zero_dual = mu <= s.eps_active * max(1.0, float(np.max(mu, initial=0.0)))
            n_weak = int(np.count_nonzero(at_bound & zero_dual))
            margin = strict_complementarity_margin(slack, mu, active)
        res = residuals(P, q, C, d, A, b, z, lam, mu)
        if kkt.path == REGULARIZED:
            warn_singular_once()
        return ElementResult(z, lam, mu, active, status, kkt, verified, it, n_weak, raw.iterations,
                             solve_time, message, res, margin)

    def forward(self, batch) -> List[ElementResult]:
        self.used_linsolvers = set()
        nb = batch.numpy()
        B = batch.B
        if len(self.warm) != B:
            self.warm = [None] * B
        use_warm = self.settings.warm_start_from_previous

        def run(i):
            return self.solve_element(nb.element(i), batch.sparse, self.warm[i] if use_warm else None, slot=i)

        if self.settings.omp_parallel and B > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.settings.n_cpu, thread_name_prefix="dqp")
            results = list(self._pool.map(run, range(B)))
        else:
            results = [run(i) for i in range(B)]
        if use_warm:
            self.warm = [(r.z, r.lam, r.mu) if r.status == Status.SOLVED else None for r in results]
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- backward ----------------------------------------------------------------------------
    @staticmethod
    def backward_element(r: ElementResult, gz: np.ndarray, glam: np.ndarray, gmu: np.ndarray):
        """Adjoint solve ``K y = (ḡ_z, ḡ_λ, ḡ_μJ)``; returns ``(y_z, y_lam, y_mu_full, residual)``."""
        n, p, m = len(r.z), len(r.lam), len(r.mu)
        J = np.flatnonzero(r.active)
        rhs = np.concatenate([gz, glam, gmu[J]])
        y = r.kkt.solve(rhs)
        y_mu = np.zeros(m)
        y_mu[J] = y[n + p:]
        return y[:n], y[n:n + p], y_mu, r.kkt.residual
