"""Reduced KKT systems: assembly and a robust factorization shared by the polish and the backward.

``K = [[P, Aᵀ, C_Jᵀ], [A, 0, 0], [C_J, 0, 0]]`` is factorized once per forward call. When ``K``
is singular (dependent active rows, or P only semidefinite on the null space of the constraints),
the direct factorization fails or is inaccurate; :class:`RobustKKT` then factorizes the
quasi-definite regularization ``K + diag(δI, −δI)`` and applies iterative refinement against the
true ``K``. For a consistent right-hand side this converges to a solution of ``K y = r`` with a small
null-space component (a regularized, minimum-norm-like choice). The path taken is recorded.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp

from dqp.linsolve import get_linsolver
from dqp.linsolve.base import Factorization, LinearSolver

logger = logging.getLogger("dqp")

#: paths recorded in the diagnostics
DIRECT, REGULARIZED = "direct", "regularized"


class SingularKKTWarning(UserWarning):
    """The reduced KKT matrix was singular; a regularized solve was used (warned once)."""


_warned_singular = False


def warn_singular_once() -> None:
    """Warn (once per process) that a singular reduced KKT system was solved with regularization."""
    global _warned_singular
    if not _warned_singular:
        _warned_singular = True
        warnings.warn("The reduced KKT matrix is singular (dependent active constraints or a semidefinite P): "
                      "dqp used a regularized solve with iterative refinement (a minimum-norm-like derivative). "
                      "See layer.info.kkt_path; this warning is shown once.", SingularKKTWarning, stacklevel=4)


def assemble_kkt(P, A, CJ, sparse: bool, reg: float = 0.0):
    """Assemble ``[[P + reg·I, Aᵀ, C_Jᵀ], [A, −reg·I, 0], [C_J, 0, −reg·I]]``.

    ``A`` and ``CJ`` may be ``None`` or have zero rows. Returns a SciPy CSC matrix when ``sparse``
    (with every diagonal entry stored, explicit zeros included, so a regularization only changes
    values), else a dense ndarray.
    """
    n = P.shape[0]
    blocks = [M for M in (A, CJ) if M is not None and M.shape[0] > 0]
    if sparse:
        Pc = sp.coo_matrix(P)
        rows, cols, vals = [Pc.row], [Pc.col], [Pc.data]
        off = n
        for M in blocks:
            Mc = sp.coo_matrix(M)
            rows += [Mc.row + off, Mc.col]  # the block and its transpose
            cols += [Mc.col, Mc.row + off]
            vals += [Mc.data, Mc.data]
            off += M.shape[0]
        N = off
        diag = np.arange(N)
        rows.append(diag)
        cols.append(diag)
        vals.append(np.concatenate([np.full(n, reg), np.full(N - n, -reg)]))
        K = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(N, N))
        K.sum_duplicates()
        return K
    G = np.vstack([np.asarray(M.toarray() if sp.issparse(M) else M) for M in blocks]) if blocks else np.zeros((0, n))
    k = G.shape[0]
    Pd = np.asarray(P.toarray() if sp.issparse(P) else P, dtype=np.float64)
    K = np.zeros((n + k, n + k))
    K[:n, :n] = Pd + reg * np.eye(n)
    K[:n, n:] = G.T
    K[n:, :n] = G
    K[n:, n:] = -reg * np.eye(k)
    return K


def ruiz_scaling(K, iters: int = 15) -> np.ndarray:
    """Symmetric Ruiz equilibration: ``D`` with ``D K D`` of rows with ∞-norm ≈ 1.

    Badly scaled data (Maros–Meszaros problems have entries from 1e-6 to 1e7) makes the reduced KKT
    matrix look numerically singular; equilibrating first restores accurate factorizations.
    """
    N = K.shape[0]
    D = np.ones(N)
    if N == 0:
        return D
    if sp.issparse(K):
        M = sp.csr_matrix(K, copy=True)
        M.sum_duplicates()
        absdata = np.abs(M.data)
        rows = np.repeat(np.arange(N), np.diff(M.indptr))
        cols = M.indices
        nonempty = np.diff(M.indptr) > 0
        starts = M.indptr[:-1][nonempty]
    else:
        absK = np.abs(np.asarray(K))
    for _ in range(iters):
        if sp.issparse(K):
            row = np.ones(N)
            if absdata.size:
                row[nonempty] = np.maximum.reduceat(absdata * D[rows] * D[cols], starts)
        else:
            row = (D[:, None] * absK * D[None, :]).max(axis=1)
        row = np.where(row > 0, row, 1.0)
        if np.max(np.abs(row - 1.0)) < 1e-3:
            break
        D = D / np.sqrt(row)
    return D


def _scaled(M, D):
    """``diag(D) M diag(D)`` (for CSC: the same pattern, values scaled in place of a product)."""
    if not sp.issparse(M):
        return D[:, None] * M * D[None, :]
    S = M.copy()
    cols = np.repeat(np.arange(M.shape[1]), np.diff(M.indptr))
    S.data = S.data * D[M.indices] * D[cols]
    return S


class RobustKKT(Factorization):
    """Factorization of a reduced KKT matrix with a regularized fallback.

    ``K`` is first equilibrated (:func:`ruiz_scaling`). Then, in order, each attempt accepted only if a
    probe solve (with iterative refinement) recovers a random vector to 1e-6:

    1. the chosen solver on ``K``;
    2. the chosen solver on the quasi-definite ``K + diag(δ₀I, −δ₀I)`` with a tiny ``δ₀`` (how
       QDLDL handles the zero block), made exact again by the refinement;
    3. a pivoting LU: LAPACK on ``K`` for dense data up to 3000 rows, else SuperLU (up to 5000
       rows; Pardiso above, if installed) on the
       quasi-definite form with ``δ₀ = 1e-12``.

    Solvers that may crash on singular input (``safe_on_singular = False``, e.g. SuperLU) skip step 1.

    If all fail, ``K`` is singular: the solver (or SuperLU) factorizes ``K + diag(δI, −δI)`` and
    refinement drives the residual down for consistent right-hand sides (``path="regularized"``);
    started from a given point (:meth:`solve`'s ``x0``) it stays close to it.

    Parameters
    ----------
    P, A, CJ
        Blocks of ``K`` (NumPy or SciPy; ``A``/``CJ`` may be ``None``).
    sparse : bool
        Assemble ``K`` sparse (CSC) or dense.
    solver : LinearSolver
        Factorizes ``K`` (and its regularization when needed).
    delta : float
        Regularization of the (equilibrated) singular fallback.

    Attributes
    ----------
    path : str
        ``"direct"`` (K nonsingular) or ``"regularized"`` (K singular).
    residual : float
        Relative residual of the last solve (after refinement): an estimate of the solve's error.
    """

    def __init__(self, P, A, CJ, sparse: bool, solver: LinearSolver, delta: float = 1e-8,
                 refine_steps: int = 30):
        from dqp.linsolve.scipy_solvers import DenseLUSolver, SuperLUSolver

        self.n = P.shape[0]
        self.K = assemble_kkt(P, A, CJ, sparse)
        N = self.K.shape[0]
        self.D = ruiz_scaling(self.K)
        self.Ks = _scaled(self.K, self.D)
        self.refine_steps = refine_steps
        self.residual = 0.0
        self.path = DIRECT
        self._F: Optional[Factorization] = None
        probe = np.random.default_rng(0).standard_normal(N)
        probe_rhs = self.Ks @ probe
        # LAPACK's LU is safe on singular matrices; SuperLU only gets the (nonsingular) quasi-definite form
        # (SuperLU's fill-in makes it impractical beyond a few thousand rows: Pardiso there, if installed)
        if not sparse and N <= 3000:
            pivoting = [(DenseLUSolver(), 0.0)]
        elif N <= 5000:
            pivoting = [(SuperLUSolver(), 1e-12)]
        else:
            from dqp.linsolve import available_linsolvers, get_linsolver

            pivoting = [(get_linsolver("pardiso"), 1e-12)] if ("pardiso" in available_linsolvers()
                                                               and solver.name != "pardiso") else []
        direct_ok = solver.safe_on_singular and not (solver.quasi_definite_only and N > self.n)
        attempts = ([(solver, 0.0)] if direct_ok else []) + [(solver, 1e-10)] + pivoting
        for lin, reg in attempts:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    M = self.Ks if not reg else _plus_reg(self.Ks, self.n, reg)
                    self._F = lin.factor(M if sparse or lin.dense else sp.csc_matrix(M), n=self.n)
                    err = np.linalg.norm(self._solve_scaled(probe_rhs) - probe) / np.linalg.norm(probe)
                if np.isfinite(err) and err < 1e-6:
                    return
            except Exception as exc:  # a failed factorization just moves on to the next attempt
                logger.debug("KKT factorization attempt (%s, reg=%s) failed: %s", lin.name, reg, exc)
            self._F = None
        self.path = REGULARIZED
        Kreg = _plus_reg(self.Ks, self.n, delta)
        # an indefinite factorization of the quasi-definite Kreg (a Schur-complement Cholesky of it
        # squares the regularization's conditioning and gives another derivative)
        if solver.name in ("qdldl", "pardiso", "scipy_lu", "scipy_ldl"):
            fallback = solver
        elif not sparse:
            fallback = DenseLUSolver()
        elif N <= 5000:
            fallback = SuperLUSolver()
        else:
            from dqp.linsolve import get_linsolver

            fallback = get_linsolver("qdldl")  # Kreg is quasi-definite: QDLDL's home ground
        try:
            self._F = fallback.factor(Kreg if sparse or fallback.dense else sp.csc_matrix(Kreg), n=self.n)
        except Exception:  # SuperLU factorizes any nonsingular (quasi-definite) Kreg
            self._F = SuperLUSolver().factor(sp.csc_matrix(Kreg))

    def negative_curvature(self) -> bool:
        """Whether the factorization shows P curving downward on the constraints' null space.

        For a convex QP (P ⪰ 0) with independent constraint rows, ``K`` (and its quasi-definite
        regularization) has exactly as many negative eigenvalues as constraint rows; more (read
        from an LDLᵀ's D, or a flipped ``sign det K`` from an LU) means an indefinite reduced
        Hessian. Free: it reads the factorization already made. ``False`` when it does not tell.
        """
        if self._F is None:
            return False
        k = self.K.shape[0] - self.n
        neg = self._F.negative_eigenvalues()
        if neg is not None:
            return neg > k
        sign = self._F.determinant_sign()
        return sign is not None and sign != (-1) ** k

    def _solve_scaled(self, rhs: np.ndarray, x0: Optional[np.ndarray] = None) -> np.ndarray:
        K, F = self.Ks, self._F
        x = F.solve(rhs) if x0 is None else x0 + F.solve(rhs - K @ x0)
        norm_r = max(np.linalg.norm(rhs), 1e-300)
        res = np.linalg.norm(rhs - K @ x) / norm_r
        for _ in range(self.refine_steps):
            if not np.isfinite(res) or res < 1e-15:
                break
            x_new = x + F.solve(rhs - K @ x)
            res_new = np.linalg.norm(rhs - K @ x_new) / norm_r
            if not res_new < res:
                break
            x, res = x_new, res_new
        self.residual = float(res)
        return x

    def solve(self, rhs: np.ndarray, x0: Optional[np.ndarray] = None) -> np.ndarray:
        """Solve ``K x = rhs`` with iterative refinement.

        ``x0`` is a starting point (e.g. the forward solver's primal-dual point): when ``K`` is singular
        the refinement then converges to a solution close to ``x0`` instead of an arbitrary one.
        """
        rhs = np.asarray(rhs, dtype=np.float64)
        D = self.D if rhs.ndim == 1 else self.D[:, None]
        xs = self._solve_scaled(D * rhs, None if x0 is None else np.asarray(x0, dtype=np.float64) / D)
        return D * xs


def _plus_reg(K, n: int, delta: float):
    """``K + diag(δI_n, −δI)``; for CSC from :func:`assemble_kkt` the diagonal is stored, so only values change."""
    N = K.shape[0]
    diag = np.concatenate([np.full(n, delta), np.full(N - n, -delta)])
    if not sp.issparse(K):
        return K + np.diag(diag)
    R = K.copy()
    R.setdiag(R.diagonal() + diag)  # no structural change: every diagonal entry exists
    return R


def auto_linsolver(sparse: bool, size: int) -> str:
    """The linear solver ``lin_solver='auto'`` picks for a KKT system of this format and size."""
    if sparse or size > 3000:
        return "qdldl"
    return "scipy_lu"
