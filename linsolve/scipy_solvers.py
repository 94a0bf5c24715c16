"""CPU linear solvers for the reduced KKT system: QDLDL, Pardiso, SciPy SuperLU/LU/LDL, Cholesky.

Each factorizes a symmetric KKT matrix once; :class:`dqp.kkt.RobustKKT` adds the singular-matrix
fallback (regularization + iterative refinement) on top of any of them.
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from dqp.linsolve.base import Factorization, LinearSolver, Matrix, register_linsolver


class _CallableFactorization(Factorization):
    """A solve function, plus (optional, computed on request) the inertia or determinant sign."""

    def __init__(self, solve_fn, negatives=None, det_sign=None, rcond=None):
        self._solve = solve_fn
        self._negatives = negatives
        self._det_sign = det_sign
        self._rcond = rcond

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        return self._solve(np.asarray(rhs, dtype=np.float64))

    def negative_eigenvalues(self) -> Optional[int]:
        return None if self._negatives is None else int(self._negatives())

    def determinant_sign(self) -> Optional[int]:
        return None if self._det_sign is None else int(self._det_sign())

    def reciprocal_condition(self) -> Optional[float]:
        return None if self._rcond is None else float(self._rcond())


def _lu_det_sign(lu: np.ndarray, piv: np.ndarray) -> int:
    """``sign(det)`` from LAPACK's getrf output: the signs of U's diagonal times the pivots' parity."""
    flips = int(np.count_nonzero(piv != np.arange(len(piv)))) + int(np.count_nonzero(lu.diagonal() < 0))
    return 0 if not np.all(lu.diagonal()) else (-1 if flips % 2 else 1)


def _lu_rcond(lu: np.ndarray, norm1: float, info: int) -> float:
    """LAPACK's estimate of ``1 / cond₁(K)`` from getrf's output (0 for an exactly singular or
    non-finite ``K``)."""
    from scipy.linalg.lapack import dgecon

    if info > 0 or not (0.0 < norm1 < np.inf):  # singular, zero or non-finite K
        return 0.0
    rcond, _ = dgecon(lu, norm1, norm="1")
    return float(rcond) if np.isfinite(rcond) else 0.0


def _block_negatives(D: np.ndarray) -> int:
    """Negative eigenvalues of a block-diagonal D with 1×1 and 2×2 blocks (Bunch–Kaufman's)."""
    N, i, neg = D.shape[0], 0, 0
    while i < N:
        if i + 1 < N and D[i + 1, i] != 0.0:
            neg += int(np.count_nonzero(np.linalg.eigvalsh(D[i : i + 2, i : i + 2]) < 0))
            i += 2
        else:
            neg += int(D[i, i] < 0)
            i += 1
    return neg


def _as_csc(K: Matrix) -> sp.csc_matrix:
    return K.tocsc() if sp.issparse(K) else sp.csc_matrix(K)


def _as_dense(K: Matrix) -> np.ndarray:
    return K.toarray() if sp.issparse(K) else np.asarray(K, dtype=np.float64)


def _columnwise(solve_vec):
    """Lift a solver of one right-hand side to (N,) or (N, k) right-hand sides."""

    def solve(rhs: np.ndarray) -> np.ndarray:
        if rhs.ndim == 1:
            return solve_vec(rhs)
        return np.stack([solve_vec(rhs[:, j]) for j in range(rhs.shape[1])], axis=1)

    return solve


@register_linsolver
class QDLDLSolver(LinearSolver):
    name = "qdldl"
    aliases = ("QDLDL",)
    modules = ("qdldl",)
    description = "Sparse LDLᵀ of the quasi-definite KKT matrix (OSQP's factorization); the sparse default."
    quasi_definite_only = True

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:
        return _QDLDLFactorization(_as_csc(K), None)

    def refactor(self, K: Matrix, previous=None, n: Optional[int] = None) -> Factorization:
        """A numeric refactorization (QDLDL's ``update``) when one of ``previous`` has ``K``'s pattern."""
        Kc = _as_csc(K)
        Kc.sort_indices()
        prev = previous if isinstance(previous, (list, tuple)) else [previous]
        shared = next(
            (F.shared for F in prev if isinstance(F, _QDLDLFactorization) and F.shared.same_pattern(Kc)), None
        )
        return _QDLDLFactorization(Kc, shared)


class _SharedQDLDL:
    """One QDLDL solver (its ordering and symbolic analysis) shared by factorizations of one pattern.

    It holds the numeric factors of one of them at a time (``current``); another one that solves
    refactorizes its own values first, so every factorization stays valid.
    """

    def __init__(self, K: sp.csc_matrix):
        import qdldl

        self.indptr, self.indices = K.indptr.copy(), K.indices.copy()
        # QDLDL reads the upper triangle: its positions in K.data, taken once per pattern (QDLDL's own
        # extraction builds several SciPy matrices per call, more than a small factorization costs)
        cols = np.repeat(np.arange(K.shape[1]), np.diff(K.indptr))
        self.upper = K.indices <= cols
        counts = np.bincount(cols[self.upper], minlength=K.shape[1])
        self.U = sp.csc_matrix(
            (K.data[self.upper], K.indices[self.upper], np.concatenate([[0], np.cumsum(counts)])), shape=K.shape
        )
        self.solver = qdldl.Solver(self.U, upper=True)
        self.current: Optional["_QDLDLFactorization"] = None
        self.lock = threading.Lock()

    def update(self, K: sp.csc_matrix) -> None:
        """Numeric refactorization with ``K``'s values (the caller holds the lock)."""
        self.U.data[:] = K.data[self.upper]
        self.solver.update(self.U, upper=True)

    def same_pattern(self, K: sp.csc_matrix) -> bool:
        return (
            K.shape[0] == len(self.indptr) - 1
            and np.array_equal(K.indptr, self.indptr)
            and np.array_equal(K.indices, self.indices)
        )


class _QDLDLFactorization(Factorization):
    @property
    def analysis(self) -> _SharedQDLDL:
        """The symbolic analysis this factorization shares with others of its pattern."""
        return self.shared

    def __init__(self, K: sp.csc_matrix, shared: Optional[_SharedQDLDL]):
        K.sort_indices()
        self.K = K
        if shared is None:
            self.shared = _SharedQDLDL(K)
        else:
            self.shared = shared
            with shared.lock:
                shared.current = None  # until the update succeeds
                shared.update(K)
        self.shared.current = self

    def _solve_vec(self, r: np.ndarray) -> np.ndarray:
        sh = self.shared
        with sh.lock:
            if sh.current is not self:  # another matrix of this pattern was factorized since
                sh.current = None
                sh.update(self.K)
                sh.current = self
            return np.asarray(sh.solver.solve(np.ascontiguousarray(r)))

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        rhs = np.asarray(rhs, dtype=np.float64)
        return _columnwise(self._solve_vec)(rhs)

    def negative_eigenvalues(self) -> Optional[int]:
        """Negative pivots of QDLDL's D: the inertia of the (quasi-definite) matrix factorized."""
        sh = self.shared
        with sh.lock:
            if sh.current is not self:
                sh.current = None
                sh.update(self.K)
                sh.current = self
            return int(np.count_nonzero(np.asarray(sh.solver.factors()[1]) < 0))


@register_linsolver
class PardisoSolver(LinearSolver):
    name = "pardiso"
    aliases = ("Pardiso", "pypardiso", "mkl_pardiso")
    modules = ("pypardiso",)
    description = "Intel MKL Pardiso through pypardiso (x86-64); sparse, multithreaded."

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:
        Kc = sp.csr_matrix(K)
        token = object()
        _pardiso_factorize(Kc, token)

        def solve(rhs: np.ndarray) -> np.ndarray:
            # the thread's one Pardiso instance is refactorized if another matrix was factorized since
            ps = _pardiso_factorize(Kc, token)
            x = ps.solve(Kc, np.ascontiguousarray(rhs))
            return np.asarray(x).reshape(rhs.shape)

        return _CallableFactorization(solve)


_pardiso_local = threading.local()


def _pardiso_factorize(K: sp.csr_matrix, token: object):
    """The thread's PyPardisoSolver (creating one costs ~0.4 s of MKL set-up), holding ``K``'s factors."""
    ps = getattr(_pardiso_local, "solver", None)
    if ps is None:
        import pypardiso

        ps = _pardiso_local.solver = pypardiso.PyPardisoSolver()
        _pardiso_local.token = None
    if _pardiso_local.token is not token:
        ps.factorize(K)
        _pardiso_local.token = token
    return ps


@register_linsolver
class SuperLUSolver(LinearSolver):
    name = "scipy_splu"
    aliases = ("scipy SPLU", "splu", "superlu", "scipy_superlu")
    modules = ("scipy",)
    description = "SciPy's SuperLU sparse LU with partial pivoting."
    safe_on_singular = False  # SciPy's SuperLU has segfaulted on exactly singular KKT matrices

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:
        # MMD on AᵀA+A suits the symmetric KKT pattern
        lu = spla.splu(_as_csc(K), permc_spec="MMD_AT_PLUS_A")
        return _CallableFactorization(lu.solve)


@register_linsolver
class DenseLUSolver(LinearSolver):
    name = "scipy_lu"
    aliases = ("scipy LU", "lu", "dense_lu")
    modules = ("scipy",)
    description = "Dense LU (LAPACK getrf); the dense default for small systems."

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:
        from scipy.linalg.lapack import dgetrf, dgetrs

        # LAPACK directly: SciPy's lu_factor/lu_solve wrappers cost more than the work at these sizes
        Kd = np.array(_as_dense(K), dtype=np.float64, order="F")
        norm1 = float(np.abs(Kd).sum(axis=0).max(initial=0.0))  # before getrf overwrites Kd
        lu, piv, info = dgetrf(Kd, overwrite_a=True)
        if info < 0:  # pragma: no cover - an illegal argument
            raise ValueError(f"dgetrf: illegal value in argument {-info}")

        def solve(r: np.ndarray) -> np.ndarray:
            x, info_s = dgetrs(lu, piv, r)
            return x

        return _CallableFactorization(
            solve, det_sign=lambda: _lu_det_sign(lu, piv), rcond=lambda: _lu_rcond(lu, norm1, info)
        )


@register_linsolver
class DenseLDLSolver(LinearSolver):
    name = "scipy_ldl"
    aliases = ("scipy LDL", "ldl", "dense_ldl")
    modules = ("scipy",)
    description = "Dense Bunch-Kaufman LDLᵀ (LAPACK sytrf) for the symmetric indefinite KKT matrix."

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:
        Kd = _as_dense(K)
        lu, D, perm = sla.ldl(Kd, lower=True, check_finite=False)
        L = lu[perm]  # triangular after the row permutation
        Dlu = sla.lu_factor(D, check_finite=False)  # D is block diagonal with 1x1 / 2x2 blocks

        def solve(rhs: np.ndarray) -> np.ndarray:
            y = sla.solve_triangular(L, rhs[perm], lower=True, unit_diagonal=True, check_finite=False)
            w = sla.lu_solve(Dlu, y, check_finite=False)
            x = np.empty_like(w)
            x[perm] = sla.solve_triangular(L.T, w, lower=False, unit_diagonal=True, check_finite=False)
            return x

        if not np.all(np.isfinite(Dlu[0])) or np.min(np.abs(np.diag(Dlu[0]))) == 0.0:
            raise np.linalg.LinAlgError("singular D block in LDLᵀ")
        return _CallableFactorization(solve, negatives=lambda: _block_negatives(D))


@register_linsolver
class DenseCholeskySolver(LinearSolver):
    name = "scipy_cholesky"
    aliases = ("scipy Cholesky", "cholesky", "dense_cholesky")
    modules = ("scipy",)
    description = (
        "Dense Cholesky of P and of the Schur complement G P⁻¹ Gᵀ (needs P ≻ 0 and independent "
        "active rows; otherwise dqp falls back automatically)."
    )

    def factor(self, K: Matrix, n: Optional[int] = None) -> Factorization:
        if n is None:
            raise ValueError("scipy_cholesky needs the primal block size n")
        Kd = _as_dense(K)
        H, G, E = Kd[:n, :n], Kd[n:, :n], Kd[n:, n:]
        cH = sla.cho_factor(H, lower=True, check_finite=False)  # raises LinAlgError unless H ≻ 0
        k = G.shape[0]
        if k:
            W = sla.solve_triangular(cH[0], G.T, lower=True, check_finite=False)  # L⁻¹Gᵀ
            cS = sla.cho_factor(W.T @ W - E, lower=True, check_finite=False)  # G H⁻¹ Gᵀ − E

        def solve_vec(r: np.ndarray) -> np.ndarray:
            r1, r2 = r[:n], r[n:]
            h = sla.cho_solve(cH, r1, check_finite=False)
            if not k:
                return h
            y = sla.cho_solve(cS, G @ h - r2, check_finite=False)
            x = sla.cho_solve(cH, r1 - G.T @ y, check_finite=False)
            return np.concatenate([x, y])

        return _CallableFactorization(_columnwise(solve_vec))
