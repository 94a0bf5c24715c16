"""Reduced KKT systems: assembly and a robust factorization shared by the polish and the backward.

``K = [[P, Aᵀ, C_Jᵀ], [A, 0, 0], [C_J, 0, 0]]`` is factorized once per forward call. When ``K``
is singular (dependent active rows, or P only semidefinite on the null space of the constraints),
the direct factorization fails or is inaccurate; :class:`RobustKKT` then factorizes the
quasi-definite regularization ``K + diag(δI, −δI)`` and applies iterative refinement against the
true ``K``. For a consistent right-hand side this converges to a solution of ``K y = r`` with a small
null-space component (a regularized, minimum-norm-like choice). The path taken is recorded.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
from typing import Iterator, List, Optional, Union

import numpy as np
import scipy.sparse as sp

from dqp.errors import numerics_quiet
from dqp.linsolve.base import Factorization, LinearSolver

logger = logging.getLogger("dqp")

#: a sparse reduced KKT matrix of at most this many entries (rows × columns) is multiplied as a dense
#: copy (refinement residuals, probes); it is still factorized sparse. The copy lives as long as the
#: factorization (until the backward), so the bound keeps it at 20 kB per batch element
DENSE_PRODUCTS = 2_500

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
        warnings.warn(
            "The reduced KKT matrix is singular (dependent active constraints or a semidefinite P): "
            "dqp used a regularized solve with iterative refinement (a minimum-norm-like derivative). "
            "See layer.info.kkt_path; this warning is shown once.",
            SingularKKTWarning,
            stacklevel=4,
        )


def assemble_kkt(P, A, CJ, sparse: bool, reg: float = 0.0):
    """Assemble ``[[P + reg·I, Aᵀ, C_Jᵀ], [A, −reg·I, 0], [C_J, 0, −reg·I]]``.

    ``A`` and ``CJ`` may be ``None`` or have zero rows. Returns a SciPy CSC matrix when ``sparse``
    (with every diagonal entry stored, explicit zeros included, so a regularization only changes
    values), else a dense ndarray. Sparse blocks in CSC or CSR form are placed through a
    :class:`_KKTLayout` kept per sparsity pattern (a layer called in a loop assembles its reduced
    systems by scattering values, without rebuilding the structure).
    """
    n = P.shape[0]
    blocks = [M for M in (A, CJ) if M is not None and M.shape[0] > 0]
    if sparse:
        layout = _KKTLayout.get(P, blocks)
        if layout is not None:
            return layout.assemble(P, blocks, reg)
        return _assemble_coo(P, blocks, reg)
    G = np.vstack([np.asarray(M.toarray() if sp.issparse(M) else M) for M in blocks]) if blocks else np.zeros((0, n))
    k = G.shape[0]
    Pd = np.asarray(P.toarray() if sp.issparse(P) else P, dtype=np.float64)
    K = np.zeros((n + k, n + k))
    K[:n, :n] = Pd + reg * np.eye(n)
    K[:n, n:] = G.T
    K[n:, :n] = G
    K[n:, n:] = -reg * np.eye(k)
    return K


def _assemble_coo(P, blocks, reg: float) -> sp.csc_matrix:
    """The sparse KKT matrix through COO triplets (any SciPy format, duplicates summed)."""
    n = P.shape[0]
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
    vals.append(_reg_diagonal(n, N, reg))
    K = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(N, N))
    K.sum_duplicates()
    return K


def _reg_diagonal(n: int, N: int, reg: float) -> np.ndarray:
    """The regularization on the KKT diagonal: +reg on the n primal rows, −reg on the N − n dual rows."""
    return np.concatenate([np.full(n, reg), np.full(N - n, -reg)])


def _entries(M):
    """``(rows, cols)`` of the stored entries of a CSC or CSR matrix, in the order of ``M.data``."""
    major = np.repeat(np.arange(len(M.indptr) - 1), np.diff(M.indptr))
    return (M.indices, major) if M.format == "csc" else (major, M.indices)


class _KKTLayout:
    """The structure of a sparse reduced KKT matrix for given patterns of ``P`` and the constraint
    blocks: ``indptr``/``indices`` of ``K`` and where each stored value of each block lands in
    ``K.data``. Assembling another matrix of the same patterns is then a scatter of the values.

    Kept per pattern in a small cache (the last ``CACHE`` patterns): a layer called in a loop, and the
    polish rounds of one call, meet the same patterns again.
    """

    CACHE = 32
    _cache: "dict" = {}
    _lock = threading.Lock()

    def __init__(self, P, blocks) -> None:
        n = P.shape[0]
        rows, cols = [], []
        r, c = _entries(P)
        rows.append(r)
        cols.append(c)
        off = n
        for M in blocks:
            r, c = _entries(M)
            rows += [r + off, c]  # the block and its transpose
            cols += [c, r + off]
            off += M.shape[0]
        N = off
        diag = np.arange(N)
        rows.append(diag)
        cols.append(diag)
        rr, cc = np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)
        keys, target = np.unique(cc * N + rr, return_inverse=True)  # column-major: CSC order, duplicates merged
        self.N, self.n = N, n
        self.indices = (keys % N).astype(np.int32)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(keys // N, minlength=N))]).astype(np.int32)
        # positions in K.data of P's values, of each block and its transpose, and of the diagonal
        sizes = [P.nnz] + [k for M in blocks for k in (M.nnz, M.nnz)] + [N]
        self.targets = np.split(target.ravel(), np.cumsum(sizes)[:-1])

    @staticmethod
    def _key(P, blocks) -> Optional[tuple]:
        parts = []
        for M in (P, *blocks):
            if not sp.issparse(M) or M.format not in ("csc", "csr") or not M.has_canonical_format:
                return None  # (duplicates must be summed: the layout places each value once)
            parts += [M.format, M.shape, M.indptr.tobytes(), M.indices.tobytes()]
        return tuple(parts)

    @classmethod
    def get(cls, P, blocks) -> Optional["_KKTLayout"]:
        """The layout of these patterns (made once), or ``None`` for formats other than CSC/CSR."""
        key = cls._key(P, blocks)
        if key is None:
            return None
        layout = cls._cache.get(key)
        if layout is None:
            layout = cls(P, blocks)
            with cls._lock:
                if len(cls._cache) >= cls.CACHE:
                    cls._cache.pop(next(iter(cls._cache)))
                cls._cache[key] = layout
        return layout

    def assemble(self, P, blocks, reg: float) -> sp.csc_matrix:
        data = np.zeros(len(self.indices))
        data[self.targets[0]] = P.data
        for k, M in enumerate(blocks):
            data[self.targets[1 + 2 * k]] = M.data
            data[self.targets[2 + 2 * k]] = M.data
        if reg:
            data[self.targets[-1]] += _reg_diagonal(self.n, self.N, reg)
        return sp.csc_matrix((data, self.indices.copy(), self.indptr.copy()), shape=(self.N, self.N))


def ruiz_scaling(K, iters: int = 15) -> np.ndarray:
    """Symmetric Ruiz equilibration: ``D`` with ``D K D`` of rows with ∞-norm within 10 % of 1.

    Badly scaled data (Maros–Meszaros problems have entries from 1e-6 to 1e7) makes the reduced KKT
    matrix look numerically singular; equilibrating first restores accurate factorizations. Each step
    halves the rows' distance from 1: 10 % takes about 6 steps on those problems, 0.1 % 13, and the
    tighter scaling conditioned the factorizations no better (same verdicts on the 62 small problems).
    It always starts from 1: on a singular system the regularized solve, and so the derivative,
    depends on the scaling, which must then be a function of the matrix alone.
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
        full = bool(nonempty.all())  # (every row stored, as assemble_kkt's diagonal makes it: no scatter)
    else:
        absK = np.abs(np.asarray(K))
    for _ in range(iters):
        if sp.issparse(K):
            stored = np.maximum.reduceat(absdata * D.take(rows) * D.take(cols), starts) if absdata.size else absdata
            if full:
                row = stored
            else:  # (rows with no entry keep 1)
                row = np.ones(N)
                row[nonempty] = stored
        else:
            row = (D[:, None] * absK * D[None, :]).max(axis=1)
        row = np.where(row > 0, row, 1.0)
        if np.max(np.abs(row - 1.0)) < 1e-1:
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


class FactorPool:
    """The last few factorizations of one batch slot, one per symbolic analysis: a later factorization
    of the same pattern (the polish's sets repeat from call to call, and within a call across its
    rounds) reuses one of them (:meth:`LinearSolver.refactor`)."""

    def __init__(self, factors=(), size: int = 4) -> None:
        self.size = size
        self._items: List[Factorization] = []
        #: the last call's polish met a singular reduced system (the next starts from the regularized form)
        self.singular = False
        for F in factors:
            self.add(F)

    def add(self, F: Optional[Factorization]) -> None:
        """Keep ``F`` (newest first), replacing one that shares its analysis."""
        if F is None:
            return
        key = getattr(F, "analysis", F)
        items = [G for G in self._items if getattr(G, "analysis", G) is not key]
        self._items = [F, *items][: self.size]

    def __iter__(self) -> Iterator[Factorization]:
        return iter(list(self._items))


class RobustKKT(Factorization):
    """Factorization of a reduced KKT matrix with a regularized fallback.

    With ``quick=True`` (the polish's first try) ``K`` is factorized once as it is: the chosen solver
    on ``K`` (or, for solvers that need a quasi-definite matrix, on ``K + diag(δ₀I, −δ₀I)`` with ``δ₀``
    tiny relative to ``K``'s largest entry), accepted when a probe solve with iterative refinement
    recovers a fixed vector to 1e-6 (or, for a factorization that estimates its condition, a pivoting
    LU of ``K`` itself, when it is below 1e8). Only when that fails does the ladder below run (on the
    same assembled matrix).

    The ladder: ``K`` is equilibrated (:func:`ruiz_scaling`); then, in order, each attempt accepted
    only if the probe solve recovers its vector to 1e-6 (or its condition estimate is below 1e8):

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
    quick : bool
        Try one unscaled factorization before the ladder.
    singular_hint : bool
        An earlier reduced system of the same problem was singular: after equilibration, go straight
        to the regularized factorization (accepted as ``"direct"`` when its refined probe solve shows
        ``K`` nonsingular after all), skipping the attempts a singular ``K`` fails.
    reuse : FactorPool or Factorization, optional
        Earlier factorizations: a matrix of the same pattern reuses the symbolic analysis of one made
        by the same solver (:meth:`LinearSolver.refactor`). A pool also receives this system's own.

    Attributes
    ----------
    path : str
        ``"direct"`` (K nonsingular) or ``"regularized"`` (K singular).
    D : ndarray
        The equilibration (ones when ``K`` was factorized unscaled).
    residual : float
        Relative residual of the last solve (after refinement): an estimate of the solve's error.
    factorizations : int
        Numeric factorizations made (1 when the quick try succeeds).
    """

    def __init__(
        self,
        P,
        A,
        CJ,
        sparse: bool,
        solver: LinearSolver,
        delta: float = 1e-8,
        refine_steps: int = 30,
        quick: bool = False,
        reuse: Union["FactorPool", Factorization, None] = None,
        singular_hint: bool = False,
    ):
        self.n = P.shape[0]
        self.K = assemble_kkt(P, A, CJ, sparse)
        self.sparse = sparse
        self.refine_steps = refine_steps
        self.residual = 0.0
        self.path = DIRECT
        self.factorizations = 0
        self._F: Optional[Factorization] = None
        self._last: Optional[Factorization] = None
        self._dense: Optional[tuple] = None
        self._pool = reuse if isinstance(reuse, FactorPool) else FactorPool([reuse])
        N = self.K.shape[0]
        self._probe = _probe_vector(N)
        if quick and not singular_hint:
            self.D, self.Ks = np.ones(N), self.K
            if self._quick(solver):
                return
        self.D = ruiz_scaling(self.K)
        self.Ks = _scaled(self.K, self.D)
        if (quick or singular_hint) and self._regularized_once(solver, delta):
            return
        self._ladder(solver, delta, attempts=not singular_hint)

    def _factor(self, lin: LinearSolver, M) -> Factorization:
        """One numeric factorization (counted), reusing the symbolic analysis of an earlier one of the
        same pattern (this system's last, or one in the pool)."""
        self.factorizations += 1
        M = M if self.sparse or lin.dense else sp.csc_matrix(M)
        last = self._F if self._F is not None else self._last
        F = lin.refactor(M, [last, *self._pool] if last is not None else list(self._pool), n=self.n)
        self._last = F
        self._pool.add(F)
        return F

    def _accept(self, lin: LinearSolver, reg: float, steps: int) -> bool:
        """Factorize ``Ks`` (+ reg) with ``lin``; keep it when the probe solve recovers the probe.

        A factorization of ``Ks`` itself (no ``reg``) whose condition estimate shows it well
        conditioned (``reciprocal_condition() > _WELL_CONDITIONED``) is kept without the probe: its
        solves pass the probe's test by a wide margin. With ``reg`` the estimate is of ``Ks + reg``,
        not of the ``Ks`` the refinement solves against, so the probe decides."""
        probe = self._probe
        try:
            with numerics_quiet():
                M = self.Ks if not reg else _plus_reg(self.Ks, self.n, reg)
                self._F = self._factor(lin, M)
                rcond = self._F.reciprocal_condition()
                if not reg and rcond is not None and rcond > _WELL_CONDITIONED:
                    return True
                err = np.linalg.norm(self._solve_scaled(self._Kx(probe), steps=steps) - probe) / np.linalg.norm(probe)
            if np.isfinite(err) and err < 1e-6:
                return True
        except Exception as exc:  # a failed factorization just moves on to the next attempt
            logger.debug("KKT factorization attempt (%s, reg=%s) failed: %s", lin.name, reg, exc)
        self._F = None
        return False

    def _quick(self, solver: LinearSolver) -> bool:
        """One factorization of the unscaled ``K`` (the common, well-posed case)."""
        N = self.K.shape[0]
        if N == 0:
            return False
        if solver.safe_on_singular and not (solver.quasi_definite_only and N > self.n):
            reg = 0.0
        else:  # a zero (2,2) block: a regularization tiny next to K's entries, undone by refinement
            big = np.max(np.abs(self.K.data if self.sparse else self.K), initial=0.0)
            reg = 1e-12 * max(float(big), 1e-300)
        return self._accept(solver, reg, steps=5)

    def _regularized_once(self, solver: LinearSolver, delta: float) -> bool:
        """After a failed quick try: one factorization of the equilibrated ``K + diag(δI, −δI)``.

        Refinement against the true ``K`` makes its solves exact when ``K`` is nonsingular (the
        probe is then recovered: ``path="direct"``); when ``K`` is singular (dependent active rows, P
        singular on the constraints' null space: most Maros–Meszaros LPs' sets) the probe is not, and
        this is the ladder's regularized factorization (``path="regularized"``), made without the
        ladder's attempts that a singular ``K`` fails. False when the factorization itself fails.
        """
        lin = self._regularized_solver(solver)
        try:
            with numerics_quiet():
                Kreg = _plus_reg(self.Ks, self.n, delta)
                self._F = self._factor(lin, Kreg)
                probe = self._probe
                x = self._solve_scaled(self._Kx(probe))
        except Exception as exc:  # the ladder tries other solvers
            logger.debug("regularized KKT factorization (%s) failed: %s", lin.name, exc)
            self._F = None
            return False
        if not np.all(np.isfinite(x)):
            self._F = None
            return False
        if not np.linalg.norm(x - probe) < 1e-6 * np.linalg.norm(probe):
            self.path = REGULARIZED
            self._stabilize(lin, Kreg)
        return True

    def _stabilize(self, lin: LinearSolver, Kreg) -> None:
        """Redo an inaccurate regularized factorization with a pivoting LU, keeping the better.

        The probe's right-hand side is consistent, so refinement on a stable factorization of the
        regularization drives its residual to round-off even when ``K`` is singular; a residual it
        cannot remove means an unstable factorization (an LDLᵀ without pivoting on a badly scaled
        matrix), whose polished points fail the KKT check. Costs one factorization, only then.
        """
        res = self.residual
        if not res > _UNSTABLE:
            return
        from dqp.linsolve.scipy_solvers import DenseLUSolver, SuperLUSolver

        N = self.K.shape[0]
        piv = DenseLUSolver() if not self.sparse else (SuperLUSolver() if N <= 5000 else None)
        if piv is None or piv.name == lin.name:
            return
        F = self._F
        try:
            with numerics_quiet():
                self._F = self._factor(piv, sp.csc_matrix(Kreg) if self.sparse else Kreg)
                x = self._solve_scaled(self._Kx(self._probe))
            if np.all(np.isfinite(x)) and self.residual < res:
                return
        except Exception as exc:  # keep the first factorization
            logger.debug("pivoting regularized KKT factorization failed: %s", exc)
        self._F, self.residual = F, res

    def _regularized_solver(self, solver: LinearSolver) -> LinearSolver:
        """An indefinite factorization for the quasi-definite ``K + diag(δI, −δI)`` (a Schur-complement
        Cholesky of it squares the regularization's conditioning and gives another derivative)."""
        from dqp.linsolve.scipy_solvers import DenseLUSolver, SuperLUSolver

        if solver.name in ("qdldl", "pardiso", "scipy_lu", "scipy_ldl"):
            return solver
        if not self.sparse:
            return DenseLUSolver()
        if self.K.shape[0] <= 5000:
            return SuperLUSolver()
        from dqp.linsolve import get_linsolver

        return get_linsolver("qdldl")  # Kreg is quasi-definite: QDLDL's home ground

    def _ladder(self, solver: LinearSolver, delta: float, attempts: bool = True) -> None:
        from dqp.linsolve.scipy_solvers import DenseLUSolver, SuperLUSolver

        sparse, N = self.sparse, self.K.shape[0]
        # LAPACK's LU is safe on singular matrices; SuperLU only gets the (nonsingular) quasi-definite form
        # (SuperLU's fill-in makes it impractical beyond a few thousand rows: Pardiso there, if installed)
        if not sparse and N <= 3000:
            pivoting = [(DenseLUSolver(), 0.0)]
        elif N <= 5000:
            pivoting = [(SuperLUSolver(), 1e-12)]
        else:
            from dqp.linsolve import available_linsolvers, get_linsolver

            pivoting = (
                [(get_linsolver("pardiso"), 1e-12)]
                if ("pardiso" in available_linsolvers() and solver.name != "pardiso")
                else []
            )
        direct_ok = solver.safe_on_singular and not (solver.quasi_definite_only and N > self.n)
        tries = ([(solver, 0.0)] if direct_ok else []) + [(solver, 1e-10)] + pivoting
        for lin, reg in tries if attempts else ():
            if self._accept(lin, reg, steps=self.refine_steps):
                return
        self.path = REGULARIZED
        Kreg = _plus_reg(self.Ks, self.n, delta)
        fallback = self._regularized_solver(solver)
        if attempts or not sparse:
            try:
                self._F = self._factor(fallback, Kreg)
                with numerics_quiet():
                    self._solve_scaled(self._Kx(self._probe))
                self._stabilize(fallback, Kreg)
                return
            except Exception:  # SuperLU factorizes any nonsingular (quasi-definite) Kreg
                pass
        # (after a failed regularized factorization by the chosen solver: not repeated)
        self._F = self._factor(SuperLUSolver(), sp.csc_matrix(Kreg))

    def _Kx(self, x: np.ndarray) -> np.ndarray:  # noqa: N802  (K, the matrix's name)
        """``Ks @ x``; a small sparse ``Ks`` is multiplied as a dense copy (made once per ``Ks``), whose
        product costs about 1 µs instead of SciPy's 5 µs of overhead."""
        Ks = self.Ks
        if not self.sparse or Ks.shape[0] * Ks.shape[1] > DENSE_PRODUCTS:
            return Ks @ x
        if self._dense is None or self._dense[0] is not Ks:
            self._dense = (Ks, Ks.toarray())
        return self._dense[1] @ x

    @property
    def factor(self) -> Optional[Factorization]:
        """The linear solver's factorization in use (for reuse by a later call)."""
        return self._F

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

    def _solve_scaled(
        self, rhs: np.ndarray, x0: Optional[np.ndarray] = None, steps: Optional[int] = None
    ) -> np.ndarray:
        K, F = self._Kx, self._F
        x = F.solve(rhs) if x0 is None else x0 + F.solve(rhs - K(x0))
        norm_r = max(_norm(rhs), 1e-300)
        r = rhs - K(x)
        res = _norm(r) / norm_r
        for _ in range(self.refine_steps if steps is None else steps):
            if not np.isfinite(res) or res < _REFINED:
                break
            x_new = x + F.solve(r)
            r_new = rhs - K(x_new)
            res_new = _norm(r_new) / norm_r
            if not res_new < res:
                break
            x, r, res = x_new, r_new, res_new
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


def _norm(x: np.ndarray) -> float:
    """The 2-norm of a vector or of a matrix's entries (as ``np.linalg.norm``, without its dispatch)."""
    x = x.ravel()
    return math.sqrt(float(x @ x))


#: reciprocal condition number above which a backward-stable factorization (a pivoting LU) is
#: accepted without the probe solve: its solves are accurate to about cond·ε ≈ 2e-8 relative before
#: refinement (LAPACK's estimate is within a small factor of the truth), well inside the probe's 1e-6
#: test, so the probe would pass
_WELL_CONDITIONED = 1e-8
#: relative residual at which iterative refinement stops (a few units of round-off)
_REFINED = 1e-15
#: relative residual of a refined solve with a consistent right-hand side above which the
#: (regularized) factorization is judged unstable
_UNSTABLE = 1e-9


@functools.lru_cache(maxsize=64)
def _probe_vector(N: int) -> np.ndarray:
    """A fixed pseudo-random vector of length ``N`` (the probe that tests a factorization; read only)."""
    v = np.random.default_rng(0).standard_normal(N)
    v.flags.writeable = False
    return v


def _plus_reg(K, n: int, delta: float):
    """``K + diag(δI_n, −δI)``; for CSC from :func:`assemble_kkt` the diagonal is stored, so only values change."""
    N = K.shape[0]
    diag = np.concatenate([np.full(n, delta), np.full(N - n, -delta)])
    if not sp.issparse(K):
        return K + np.diag(diag)
    R = K.copy()
    R.data[_diagonal_positions(R)] += diag  # no structural change: every diagonal entry is stored
    return R


def _diagonal_positions(K: sp.csc_matrix) -> np.ndarray:
    """Positions in ``K.data`` of the diagonal entries, column by column (each stored once)."""
    cols = np.repeat(np.arange(K.shape[1]), np.diff(K.indptr))
    pos = np.flatnonzero(K.indices == cols)
    if len(pos) != K.shape[0]:
        raise ValueError("the KKT matrix must store its whole diagonal")
    return pos


def auto_linsolver(sparse: bool, size: int) -> str:
    """The linear solver ``lin_solver='auto'`` picks for a KKT system of this format and size."""
    if sparse or size > 3000:
        return "qdldl"
    return "scipy_lu"
