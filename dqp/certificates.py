"""Certificates of infeasibility and unboundedness, checked before they are believed.

A solver's claim that a QP ``min ½zᵀPz + qᵀz s.t. Cz ≤ d, Az = b`` has no solution is only as good
as the certificate behind it:

* **primal infeasible**: ``y ≥ 0`` and ``w`` with ``Cᵀy + Aᵀw = 0`` and ``dᵀy + bᵀw < 0`` (Farkas:
  for any feasible z, ``0 ≥ yᵀ(Cz − d) + wᵀ(Az − b) = −(dᵀy + bᵀw) > 0``, a contradiction);
* **unbounded** (dual infeasible): a direction ``v`` with ``Pv = 0``, ``Av = 0``, ``Cv ≤ 0`` and
  ``qᵀv < 0`` (from any feasible point the objective decreases without bound along v).

:func:`verified_status` checks the claiming solver's own point as such a certificate (residuals
relative to the size of the terms, so scaling the data changes nothing); :func:`find_certificate`
looks for one with two small bounded LPs (always feasible and bounded, so the LP solver cannot fail
the same way) when a solve failed without a verified reason. Only a verified certificate becomes an
:class:`~dqp.errors.InfeasibleError` / :class:`~dqp.errors.UnboundedError`.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp

from dqp.errors import SolverKeywordWarning, Status

logger = logging.getLogger("dqp")

#: residual allowance of a certificate, relative to the size of its terms
CERT_TOL = 1e-7
#: how far from the KKT conditions (relative residual) an unverified point may be and still be returned
FAR_FROM_KKT = 1e-3


def inf_norm(v) -> float:
    """‖v‖∞ (0 for None or an empty vector)."""
    if v is None:
        return 0.0
    a = np.abs(v)
    return float(a.max()) if a.size else 0.0


def primal_infeasibility_verified(C, d, A, b, y, w, tol: float = CERT_TOL) -> bool:
    """Whether ``(y, w)`` certifies that ``Cz ≤ d, Az = b`` has no solution (module docstring)."""
    m = 0 if C is None else C.shape[0]
    p = 0 if A is None else A.shape[0]
    y = np.zeros(m) if (y is None or m == 0) else np.maximum(np.asarray(y, float), 0.0)
    w = np.zeros(p) if (w is None or p == 0) else np.asarray(w, float)
    if len(y) != m or len(w) != p or not (np.all(np.isfinite(y)) and np.all(np.isfinite(w))):
        return False
    scale = max(inf_norm(y), inf_norm(w))
    if scale == 0.0:
        return False
    y, w = y / scale, w / scale
    r = np.zeros(C.shape[1] if m else A.shape[1])
    size = np.zeros_like(r)
    gap, gap_size = 0.0, 0.0
    if m:
        r = r + C.T @ y
        size = size + abs(C).T @ y
        gap += float(d @ y)
        gap_size += float(np.abs(d) @ y)
    if p:
        r = r + A.T @ w
        size = size + abs(A).T @ np.abs(w)
        gap += float(b @ w)
        gap_size += float(np.abs(b) @ np.abs(w))
    return inf_norm(r) <= tol * max(inf_norm(size), np.finfo(float).tiny) and gap < -tol * max(
        gap_size, np.finfo(float).tiny
    )


def unboundedness_verified(P, q, C, A, v, tol: float = CERT_TOL) -> bool:
    """Whether ``v`` is a direction along which the objective decreases without bound (module docstring)."""
    if v is None or not np.all(np.isfinite(v)):
        return False
    v = np.asarray(v, float)
    scale = inf_norm(v)
    if scale == 0.0:
        return False
    v = v / scale
    tiny = np.finfo(float).tiny
    descent = float(q @ v)
    if not descent < -tol * max(float(np.abs(q) @ np.abs(v)), tiny):
        return False
    if inf_norm(P @ v) > tol * max(inf_norm(abs(P) @ np.abs(v)), tiny) and inf_norm(P @ v) > tol * abs(descent):
        return False
    if A is not None and A.shape[0] and np.any(np.abs(A @ v) > tol * np.maximum(abs(A) @ np.abs(v), tiny)):
        return False
    if C is not None and C.shape[0] and np.any(C @ v > tol * np.maximum(abs(C) @ np.abs(v), tiny)):
        return False
    return True


def verified_status(data, claimed: Status, x, y, z) -> Optional[Status]:
    """``claimed`` when the solver's returned point certifies it, else ``None``.

    Solvers return their certificate in the solution slots (qpsolvers' convention, as Clarabel
    does): the unboundedness direction in ``x``, the infeasibility multipliers in ``(z, y)`` for
    ``(C, A)``.
    """
    P, q, C, d, A, b = data
    if claimed == Status.PRIMAL_INFEASIBLE:
        return claimed if primal_infeasibility_verified(C, d, A, b, z, y) else None
    if claimed == Status.DUAL_INFEASIBLE:
        return claimed if unboundedness_verified(P, q, C, A, x) else None
    return None


def _stack(blocks):
    blocks = [B for B in blocks if B is not None and B.shape[0]]
    return sp.vstack([sp.csc_matrix(B) for B in blocks], format="csc") if blocks else None


def _lp(c, Aeq, beq, G, h):
    """``min cᵀx s.t. Aeq x = beq, G x ≤ h`` by Clarabel; the minimizer or ``None``."""
    from dqp.solvers import get_solver

    n = len(c)
    try:
        raw = get_solver("clarabel").solve(
            sp.csc_matrix((n, n)),
            c,
            G,
            h,
            Aeq,
            beq,
            keywords={"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10},
        )
    except Exception as exc:  # pragma: no cover - clarabel is a core dependency
        logger.debug("certificate LP failed: %s", exc)
        return None
    return raw.x if raw.status == Status.SOLVED else None


def find_certificate(data) -> Tuple[Optional[Status], str]:
    """Look for a verified infeasibility or unboundedness certificate; ``(status, note)``.

    Two LPs over a box (both feasible and bounded): ``min dᵀy + bᵀw`` over ``Cᵀy + Aᵀw = 0``,
    ``0 ≤ y ≤ 1``, ``|w| ≤ 1``, and ``min qᵀv`` over ``Pv = 0, Av = 0, Cv ≤ 0, |v| ≤ 1``. A negative
    optimum whose minimizer passes the checks above is a certificate. Costs two LP solves: run only
    after a failure.
    """
    P, q, C, d, A, b = data
    n = len(q)
    m = 0 if C is None else C.shape[0]
    p = 0 if A is None else A.shape[0]
    if m + p:
        k = m + p
        Aeq = sp.hstack(
            [sp.csc_matrix(C.T) if m else sp.csc_matrix((n, 0)), sp.csc_matrix(A.T) if p else sp.csc_matrix((n, 0))],
            format="csc",
        )
        I = sp.identity(k, format="csc")
        lo = np.concatenate([np.zeros(m), -np.ones(p)])
        yw = _lp(
            np.concatenate([d if m else np.zeros(0), b if p else np.zeros(0)]),
            Aeq,
            np.zeros(n),
            sp.vstack([I, -I], format="csc"),
            np.concatenate([np.ones(k), -lo]),
        )
        if yw is not None and primal_infeasibility_verified(C, d, A, b, yw[:m], yw[m:]):
            return Status.PRIMAL_INFEASIBLE, "verified infeasibility certificate (y ≥ 0, Cᵀy + Aᵀw = 0, dᵀy + bᵀw < 0)"
    I = sp.identity(n, format="csc")
    v = _lp(
        q,
        _stack([sp.csc_matrix(P), A]),
        np.zeros(n + p),
        _stack([C, I, -I]),
        np.concatenate([np.zeros(m), np.ones(2 * n)]),
    )
    if v is not None and unboundedness_verified(P, q, C, A, v):
        return Status.DUAL_INFEASIBLE, "verified unbounded direction (Pv = 0, Av = 0, Cv ≤ 0, qᵀv < 0)"
    return None, ""


def _objective_length(P, q) -> float:
    """``‖q‖∞ / max|P_ij|``: the length scale of the objective's minimizer (0 for an LP or q = 0)."""
    pmax = float(abs(P).max()) if P.shape[0] else 0.0
    qmax = inf_norm(q)
    return qmax / pmax if pmax > 0 and qmax > 0 else 0.0


def kkt_distance(data, z, lam, mu) -> float:
    """Largest KKT residual of ``(z, λ, μ)`` relative to the size of its terms (scale-invariant).

    Primal violation relative to ``max(‖d‖∞, ‖|C| ζ‖∞)`` (likewise for A, b), stationarity relative
    to the largest of ``‖Pz‖, ‖q‖, ‖Aᵀλ‖, ‖Cᵀμ‖``, complementarity ``max μ_i|s_i|`` relative to
    ``‖μ‖∞`` times that row size (∞-norms: per-row ratios blow up on rows whose terms are ~0). The
    magnitude ``ζ = max(|z|, ‖q‖∞ / max|P_ij|)`` keeps the size meaningful where z* = 0 and d = 0
    (nonnegativity constraints): there ``|C||z|`` is only the solver's round-off.
    """
    P, q, C, d, A, b = data
    tiny = np.finfo(float).tiny
    zeta = np.maximum(np.abs(z), _objective_length(P, q))
    Pz = P @ z
    r = Pz + q
    sizes = [inf_norm(Pz), inf_norm(q)]
    worst = 0.0
    if A is not None and A.shape[0]:
        lam = np.zeros(A.shape[0]) if lam is None else lam
        ATl = A.T @ lam
        r = r + ATl
        sizes.append(inf_norm(ATl))
        size = max(inf_norm(b), inf_norm(abs(A) @ zeta), tiny)
        worst = max(worst, inf_norm(A @ z - b) / size)
    if C is not None and C.shape[0]:
        mu = np.zeros(C.shape[0]) if mu is None else np.maximum(mu, 0.0)
        CTm = C.T @ mu
        r = r + CTm
        sizes.append(inf_norm(CTm))
        size = max(inf_norm(d), inf_norm(abs(C) @ zeta), tiny)
        slack = d - C @ z
        worst = max(worst, float(np.max(np.maximum(-slack, 0.0))) / size)
        worst = max(worst, inf_norm(mu * slack) / max(inf_norm(mu) * size, tiny))
    return max(worst, inf_norm(r) / max(max(sizes), tiny))


def min_eigenvalue(P) -> Tuple[float, float]:
    """``(λ_min(P), max |λ(P)|)``: dense eigenvalues up to n = 1000, Lanczos above."""
    n = P.shape[0]
    if n <= 1000:
        e = np.linalg.eigvalsh(P.toarray() if sp.issparse(P) else np.asarray(P))
        return float(e[0]), float(max(abs(e[0]), abs(e[-1])))
    from scipy.sparse.linalg import eigsh

    hi = eigsh(P, k=1, which="LM", return_eigenvectors=False, tol=1e-6)[0]
    lo = eigsh(P, k=1, which="SA", return_eigenvectors=False, tol=1e-6)[0]
    return float(lo), float(abs(hi))


def is_nonconvex(P, tol: float = 1e-9) -> bool:
    """Whether P has an eigenvalue below ``−tol·max|λ(P)|`` (rounding of a PSD P passes)."""
    lo, size = min_eigenvalue(P)
    return lo < -tol * max(size, np.finfo(float).tiny)


_KEYWORD_WORDS = (
    "keyword",
    "unknown option",
    "unknown setting",
    "unknown parameter",
    "not a valid setting",
    "has no attribute",
    "incompatible function arguments",
)


def check_keyword_failure(solver: str, raw, user_keywords) -> None:
    """Raise or warn when a solve failed with an exception and the user passed solver keywords.

    A bad keyword must not be hidden by the fallback chain (which would quietly solve with another
    solver): an error that names a keyword, or a ``TypeError``, is a :class:`SettingsError`; any
    other exception with keywords given is a :class:`SolverKeywordWarning`.
    """
    err = raw.info.get("error") if raw.x is None else None
    if not user_keywords or not err:
        return
    from dqp.errors import SettingsError

    text = str(err).lower()
    named = [k for k in user_keywords if k.lower() in text]
    if named or err.startswith("TypeError") or any(w in text for w in _KEYWORD_WORDS):
        raise SettingsError(
            f"qp_solver={solver!r} rejected qp_solver_keywords={dict(user_keywords)!r}: {err}. "
            f"Fix or remove the keyword (see the solver's documentation for names and types)."
        )
    import warnings

    warnings.warn(
        f"qp_solver={solver!r} raised {err} with qp_solver_keywords={dict(user_keywords)!r}; if a "
        f"keyword is the cause, fix it (the fallback_solver chain may answer instead).",
        SolverKeywordWarning,
        stacklevel=2,
    )


def unverified_distance(data, res) -> float:
    """:func:`kkt_distance` of an element result's point, with its duals or the solver's own
    (``res.raw_duals``) when those certify z better."""
    dist = kkt_distance(data, res.z, res.lam, res.mu)
    if dist > FAR_FROM_KKT and res.raw_duals is not None:
        y, mu = res.raw_duals
        dist = min(dist, kkt_distance(data, res.z, res.lam if y is None else y, res.mu if mu is None else mu))
    return dist


def finalize(data, res, search_on_max_iter: bool = True):
    """The element's final word: classify failures from verified certificates; reject bad points.

    * a solved but unverified point farther than :data:`FAR_FROM_KKT` from the KKT conditions (with
      the returned duals, or the solver's own when closer) is a failure (``NUMERICAL``), not a warning;
    * a verified point whose factorization shows negative curvature (free to read) is checked for
      a nonconvex P (an eigenvalue test, only then), and marked ``nonconvex``;
    * a failure without a verified reason gets one from :func:`find_certificate`, else (when P is
      not PSD) is marked ``nonconvex``.
    """
    from dataclasses import replace

    P = data[0]
    if res.status == Status.SOLVED:
        if res.kkt is not None and res.kkt.negative_curvature() and is_nonconvex(P):
            return replace(res, nonconvex=True)
        if res.verified:
            return res
        dist = unverified_distance(data, res)
        if dist <= FAR_FROM_KKT:
            return res
        res = replace(
            res,
            status=Status.NUMERICAL,
            z=np.zeros_like(res.z),
            lam=np.zeros_like(res.lam),
            mu=np.zeros_like(res.mu),
            active=np.zeros_like(res.active),
            kkt=None,
            message=f"the solver's point could not be verified and is far from the KKT conditions "
            f"(relative residual {dist:.2g} > {FAR_FROM_KKT:g}); " + res.message,
        )
    # under a time limit, hitting it is the diagnosis (the LPs would spend the time it saved)
    skip = (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE) + (() if search_on_max_iter else (Status.MAX_ITER,))
    if res.status not in skip:
        status, note = find_certificate(data)
        if status is not None:
            return replace(res, status=status, message=f"{note}; " + res.message)
        if is_nonconvex(P):
            return replace(res, nonconvex=True)
    return res
