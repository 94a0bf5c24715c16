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

from dqp.certificates import check_keyword_failure, finalize, unverified_distance, verified_status
from dqp.errors import NotPSDError, Status
from dqp.problem import drop_unbounded_rows, restore_rows
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
    nonconvex: bool = False
    #: the solver's own duals ``(y, z)`` of an unverified point (judging how far it is from the KKT conditions)
    raw_duals: Optional[Tuple[Optional[np.ndarray], Optional[np.ndarray]]] = None


def _mv(M, x):
    return M @ x


_TINY = np.finfo(np.float64).tiny
#: allowance for round-off in a KKT residual, relative to the size of the terms summed
_ROUND = 1e3 * np.finfo(np.float64).eps


def _abs_rows(C, x: np.ndarray) -> np.ndarray:
    """``|C| |x|`` row by row: the natural size of ``C x`` (for scale-invariant tolerances)."""
    return abs(C) @ np.abs(x)


def detect_active(C, d: np.ndarray, x: np.ndarray, mu: Optional[np.ndarray], eps: float) -> Tuple[np.ndarray, int]:
    """Active inequalities from the slack and (when given) the dual, each relative to its own scale.

    Constraint ``i`` is active when ``d_i − C_i x ≤ eps·max(|d_i|, |C_i||x|)`` or
    ``μ_i > eps·‖μ‖∞``: multiplying C and d (or P and q) by any factor leaves the set unchanged.
    Returns the mask and the number of weakly active constraints (small slack *and* small dual).
    """
    slack = d - _mv(C, x)
    near = slack <= eps * np.maximum(np.maximum(np.abs(d), _abs_rows(C, x)), _TINY)
    if mu is None:
        return near, 0
    big = mu > eps * max(float(np.max(np.abs(mu), initial=0.0)), _TINY)
    weak = int(np.count_nonzero(near & ~big))
    return near | big, weak


def _inf(v) -> float:
    return float(np.max(np.abs(v), initial=0.0)) if v is not None else 0.0


def polish(P, q, C, d, A, b, active: np.ndarray, solver, sparse: bool, eps: float, refine: bool,
           max_iter: int, start: Optional[Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]] = None):
    """Solve the reduced KKT on ``active`` and verify; repair the set when ``refine``.

    The check is scale-invariant, with tolerance ``tol = 1e-2·eps`` relative to each quantity's own
    size: inactive rows satisfy ``C_i z − d_i ≤ tol·max(|d_i|, |C_i||z|)``, active duals
    ``μ_J ≥ −tol·max(‖μ_J‖∞, (‖Pz‖∞+‖q‖∞)/‖C_J‖∞)``, and the equalities, active rows and
    stationarity hold to ``tol`` relative to the norms of their terms. A point that passes satisfies
    the KKT conditions of the (convex) QP, so it is the solution, whatever the solver's accuracy.

    ``start`` = the forward solver's ``(x, y, z)``: the refinement starts there, so when the reduced
    system is singular (a non-unique solution) the polished point stays next to the solver's.

    Returns ``(z, lam, mu_full, active, kkt, verified, iterations)``, or ``None`` if the solve is
    not finite.
    """
    n = P.shape[0]
    p = 0 if A is None else A.shape[0]
    m = 0 if C is None else C.shape[0]
    tol = max(1e-2 * eps, 1e-13)
    active = active.copy()
    Cr = None if C is None else (C.tocsr() if sp.issparse(C) else C)
    best = None
    for it in range(max_iter + 1):
        J = np.flatnonzero(active)
        CJ = None if C is None else Cr[J]
        kkt = RobustKKT(P, A, CJ, sparse, solver)
        rhs = np.concatenate([-q, b if b is not None else np.zeros(0), d[J] if m else np.zeros(0)])
        x0 = None
        if start is not None:
            sx, sy, sz = start
            x0 = np.concatenate([sx, sy if (p and sy is not None) else np.zeros(p),
                                 sz[J] if (m and sz is not None) else np.zeros(len(J))])
        sol = kkt.solve(rhs, x0=x0)
        if not np.all(np.isfinite(sol)):
            return None
        z, lam, muJ = sol[:n], sol[n:n + p], sol[n + p:]
        mu = np.zeros(m)
        mu[J] = muJ
        Pz = _mv(P, z)
        # stationarity and the equality-type rows (A, C_J) hold to tol relative to their terms
        terms = [_abs_rows(P, z), q]  # |P||z|, not Pz: the terms' size survives cancellation
        r_stat = Pz + q
        r_prim = 0.0
        scale_p = _TINY
        if p:
            ATl = A.T @ lam
            r_stat = r_stat + ATl
            terms.append(abs(A).T @ np.abs(lam))
            Az = _mv(A, z)
            r_prim = _inf(Az - b)
            scale_p = max(scale_p, _inf(b), _inf(_abs_rows(A, z)))  # |A||z|: the size of the terms of Az
        viol = np.zeros(m)
        neg = np.zeros(0, bool)
        mu_scale = _TINY
        if m:
            # the layer returns max(μ, 0): check stationarity for that point, so a negative μ_J within
            # the sign tolerance cannot hide a residual that its clipping creates
            mu_pos = np.maximum(mu, 0.0)
            CTm = C.T @ mu_pos
            r_stat = r_stat + CTm
            terms.append(abs(C).T @ mu_pos)
            Cz = _mv(C, z)
            row_size = np.maximum(np.maximum(np.abs(d), _abs_rows(C, z)), _TINY)
            viol = (Cz - d) - tol * row_size
            if len(J):
                r_prim = max(r_prim, _inf(Cz[J] - d[J]))
                scale_p = max(scale_p, _inf(row_size[J]))
                viol[J] = -np.inf
                row_norm = _inf(np.asarray(abs(CJ).sum(axis=1)).ravel())
                mu_scale = tol * max(_inf(muJ), (_inf(Pz) + _inf(q)) / max(row_norm, _TINY), _TINY)
                neg = muJ < -mu_scale
        # stationarity to tol relative to the size of its *vectors* (Pz, q, Aᵀλ, Cᵀμ), plus the
        # round-off that summing the terms leaves (relative to the terms, |P||z| + |A|ᵀ|λ| + ...):
        # measuring it against the terms alone accepted points whose huge, cancelling multipliers
        # hid a real residual (LISWET8: ‖Pz+q+Cᵀμ‖∞ = 4.6e-3 with ‖Cᵀμ‖∞ = 1.2, |C|ᵀ|μ| = 6.8e6)
        vec_scale = max(_inf(Pz), _inf(q), _inf(ATl) if p else 0.0, _inf(CTm) if m else 0.0, _TINY)
        scale_d = tol * vec_scale + _ROUND * max(_inf(t) for t in terms)
        consistent = _inf(r_stat) <= scale_d and r_prim <= tol * scale_p
        bad_primal = bool(m) and bool(np.any(viol > 0))
        verified = consistent and not bad_primal and not np.any(neg)
        score = (max(float(np.max(viol, initial=0.0)), 0.0) + float(np.sum(np.maximum(-muJ - mu_scale, 0.0)))
                 + (0.0 if consistent else 1.0))
        if best is None or score < best[0]:
            best = (score, z, lam, mu, active.copy(), kkt, verified, it)
        if verified or not refine or it == max_iter:
            break
        if bad_primal:
            active[viol > 0] = True
        elif np.any(neg):
            active[J[neg]] = False
        else:  # inconsistent reduced system (dependent rows with incompatible right-hand sides)
            break
    _, z, lam, mu, active, kkt, verified, it = best
    return z, lam, mu, active, kkt, verified, it


def _include_weakly_active(P, q, C, d, A, b, out, linsolver, sparse: bool, eps: float):
    """Canonical treatment of weakly active rows: every row at its bound joins the active set.

    At a weakly active row (zero slack *and* zero multiplier) the solution map has a kink, and
    whether the solver's point put the row in or out of the set is an accident of its iterates. dqp
    always takes it *in* (the one-sided derivative of keeping the constraint tight), so the gradient
    does not depend on which solver, tolerance or warm start produced the point.
    """
    z, lam, mu, active, kkt, verified, it = out
    slack = d - _mv(C, z)
    at_bound = (~active) & (slack <= eps * np.maximum(np.maximum(np.abs(d), _abs_rows(C, z)), _TINY))
    if not np.any(at_bound):
        return out
    cand = polish(P, q, C, d, A, b, active | at_bound, linsolver, sparse, eps, False, 0,
                  start=(z, lam, mu))
    if cand is not None and cand[5]:
        return cand[:6] + (it,)
    return out


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
        ``fallback_solver`` chain is tried in turn (settings): the first verified answer wins, a
        solved-but-unverified one (the primary's first) is kept if none verifies, and a certificate of
        infeasibility stops a chain that started from a failure.
        """
        s = self.settings
        P, q, C, d, A, b = data
        n, m, p = P.shape[0], 0 if C is None else C.shape[0], 0 if A is None else A.shape[0]
        linsolver = self._linsolver(sparse, n + p + m)
        if m == 0:  # no inequalities: the KKT system *is* the problem; no solver needed
            out = polish(P, q, C, d, A, b, np.zeros(0, bool), linsolver, sparse, s.eps_active, False, 0)
            if out is not None and out[5]:
                return self._result(data, out, None, 0.0, "no inequalities: solved the KKT system directly")
        if warm is not None and (len(warm[0]), len(warm[1]), len(warm[2])) != (n, p, m):
            warm = None  # the problem changed size since the previous call
        res = self._solve_with(self.solver, data, sparse, linsolver, warm, slot)
        if res.status == Status.SOLVED and (res.verified or not s.fallback_on_unverified):
            return res
        from dqp.solvers import get_solver

        # an unverified answer (the primary's first) is kept unless a fallback verifies one
        kept: Optional[ElementResult] = res if res.status == Status.SOLVED else None
        tried = []
        for fb in s.fallback_solver:
            if fb == self.solver.name:
                continue
            fsolver = get_solver(fb)
            # a second opinion on a solved-but-unverified answer gets a time limit (10× the first solve,
            # at least 1 s) where the solver has one: HiGHS took minutes on QPILOTNO
            extra = fsolver.time_limit_keywords(max(10.0 * res.solve_time, 1.0)) if kept is res else {}
            res2 = self._solve_with(fsolver, data, sparse, linsolver, None, None, extra)
            tried.append(f"{fb}: {res2.status.name}" + ("" if res2.status != Status.SOLVED or res2.verified
                                                          else " (unverified)"))
            res.solve_time += res2.solve_time
            if res2.status == Status.SOLVED:
                why = ("its point could not be verified" if res.status == Status.SOLVED
                       else f"failed ({res.message or res.status.name})")
                res2.message = (f"{self.solver.name} {why}; solved by fallback_solver {fb!r}. "
                                + res2.message).strip()
                if res2.verified:
                    res2.solve_time = res.solve_time
                    return res2
                if kept is res:
                    # an unverified primary gets one second opinion that solves, not the whole chain; the
                    # point closer to the KKT conditions is kept (proxqp's can be far off where Clarabel's is not)
                    if unverified_distance(data, res2) < unverified_distance(data, res):
                        kept = res2
                    break
                kept = kept or res2
                continue
            if res.status == Status.SOLVED:
                continue                  # the primary found a point: a fallback's failure changes nothing
            if res2.status in (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE):
                res.status = res2.status  # a certificate (Clarabel's, PIQP's, HiGHS's) names the failure
                break
            if res.status == Status.SOLVER_ERROR:
                res.status = res2.status
        if kept is not None:
            if kept is not res:
                kept.solve_time = res.solve_time
            elif tried:
                kept.message = (kept.message + "; " if kept.message else "") + "no fallback verified it (" + \
                    ", ".join(tried) + ")"
            return kept
        if tried:
            res.message += "; fallback solvers: " + ", ".join(tried)
        return res

    def _solve_with(self, solver: ForwardSolver, data, sparse: bool, linsolver, warm, slot,
                    extra: Optional[dict] = None) -> ElementResult:
        s = self.settings
        P, q, C, d, A, b = data
        n, m, p = P.shape[0], 0 if C is None else C.shape[0], 0 if A is None else A.shape[0]
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
        raw: RawSolution = solver.solve(P, q, C, d, A, b, initvals=initvals, warm_duals=warm_duals,
                                        keywords=kw, slot=slot)
        solve_time = raw.info.get("time", time.perf_counter() - t0)
        check_keyword_failure(solver.name, raw, user_kw)
        if raw.status in (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE) and \
                verified_status(data, raw.status, raw.x, raw.y, raw.z) is None:
            # a claim without a certificate that checks out is a failure, not a diagnosis (Clarabel
            # called PRIMALC2 unbounded; HiGHS solves it): the fallback chain goes on
            raw.info["raw_status"] = (f"claimed {raw.status.name} but its certificate did not verify; "
                                      + str(raw.info.get("raw_status", "")))
            raw.status = Status.NUMERICAL

        def failed(status: Status, message: str) -> ElementResult:
            return ElementResult(np.zeros(n), np.zeros(p), np.zeros(m), np.zeros(m, bool), status,
                                 solve_time=solve_time, message=message, iterations=raw.iterations)

        if raw.x is None:
            return failed(raw.status, f"{solver.name}: " + (raw.info.get("error", "") or raw.info.get("raw_status", "")
                                                             or raw.status.name))
        mu0 = raw.z if (s.dual_available and raw.z is not None) else None
        out = None
        # The detection threshold is eps_active; when the set it gives cannot be verified (the solver's
        # accuracy and eps_active disagree, as on badly scaled problems), stricter and looser thresholds
        # are tried: the check, not the threshold, decides.
        thresholds = [s.eps_active] + ([s.eps_active * f for f in (1e-2, 1e-4, 1e2)] if s.refine_active and m else [])
        for k, eps in enumerate(thresholds):
            active = detect_active(C, d, raw.x, mu0, eps)[0] if m else np.zeros(0, bool)
            repairs = 0 if not s.refine_active else (s.max_refine_iter if k == 0 else min(3, s.max_refine_iter))
            cand = polish(P, q, C, d, A, b, active, linsolver, sparse, s.eps_active, s.refine_active,
                          repairs, start=(raw.x, raw.y, raw.z))
            if out is None or (cand is not None and cand[5] and not out[5]):
                out = cand
            if out is not None and out[5]:
                break
        if out is None:
            return failed(raw.status if raw.status != Status.SOLVED else Status.NUMERICAL,
                          f"{solver.name}: non-finite polished solution")
        verified = out[5]
        if verified and m:
            out = _include_weakly_active(P, q, C, d, A, b, out, linsolver, sparse, s.eps_active)
        message = ""
        if raw.status != Status.SOLVED:
            if not verified:
                return failed(raw.status, f"{solver.name} reported {raw.info.get('raw_status') or raw.status.name!r}; "
                                          f"no verified KKT point could be recovered from its output")
            message = f"{solver.name} reported {raw.status.name}; the polished solution passed the KKT check"
        return self._result(data, out, raw, solve_time, message)

    def _result(self, data, out, raw: Optional[RawSolution], solve_time: float, message: str) -> ElementResult:
        """Assemble the element's result from a polish outcome (and the solver's point when unverified)."""
        s = self.settings
        P, q, C, d, A, b = data
        m = 0 if C is None else C.shape[0]
        z, lam, mu, active, kkt, verified, it = out
        if not verified and raw is not None:
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
            at_bound = slack <= s.eps_active * np.maximum(np.maximum(np.abs(d), _abs_rows(C, z)), _TINY)
            zero_dual = mu <= s.eps_active * max(float(np.max(mu, initial=0.0)), _TINY)
            n_weak = int(np.count_nonzero(at_bound & zero_dual))
            margin = strict_complementarity_margin(slack, mu, active)
        res = residuals(P, q, C, d, A, b, z, lam, mu)
        if kkt.path == REGULARIZED:
            warn_singular_once()
        return ElementResult(z, lam, mu, active, Status.SOLVED, kkt, verified, it, n_weak,
                             None if raw is None else raw.iterations, solve_time, message, res, margin,
                             raw_duals=None if verified or raw is None else (raw.y, raw.z))

    def forward(self, batch) -> List[ElementResult]:
        self.used_linsolvers = set()
        nb = batch.numpy()
        B = batch.B
        if len(self.warm) != B:
            self.warm = [None] * B
            if hasattr(self.solver, "prune"):  # per-slot workspaces (OSQP) of a larger batch
                self.solver.prune(B)
        use_warm = self.settings.warm_start_from_previous

        def run(i):
            return self.solve_element(nb.element(i), batch.sparse, self.warm[i] if use_warm else None, slot=i)

        if self.settings.omp_parallel and B > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.settings.n_cpu, thread_name_prefix="dqp")
            futures = [self._pool.submit(run, i) for i in range(B)]
            try:
                results = [f.result() for f in futures]
            except KeyboardInterrupt:  # Ctrl-C: drop the elements not started yet, then stop
                for f in futures:
                    f.cancel()
                raise
        else:
            results = [run(i) for i in range(B)]  # a KeyboardInterrupt reaches Python between elements
        bad = [i for i, r in enumerate(results) if r.nonconvex]
        if bad:
            raise NotPSDError(
                f"Argument P is not positive semidefinite{f' (batch elements {bad[:10]})' if batch.batched else ''}: "
                f"it has a negative eigenvalue (seen in the inertia of the reduced KKT factorization at the "
                f"solver's point, or after the solve failed, and confirmed by P's smallest eigenvalue), so the QP "
                f"is not convex and a solver's point is not its minimum. Build P as L @ L.T (+ eps*I); "
                f"check_PSD=True tests every P before solving.")
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
