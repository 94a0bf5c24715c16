"""Loading QP test problems from disk.

Two sources are supported:

* the Maros–Meszaros collection in the MAT layout of ``osqp_benchmarks`` (one file per problem,
  variables ``P, q, r, A, l, u, n, m``, problem ``min ½xᵀPx + qᵀx + r  s.t.  l ≤ Ax ≤ u``), read
  by :func:`load_maros_meszaros` and listed by :func:`list_maros_meszaros`;
* ``.npz`` archives holding dqp's own form ``min ½zᵀPz + qᵀz  s.t.  Cz ≤ d, Az = b``, read by
  :func:`load_problem` (which also accepts the ``.mat`` layout above) and written by
  :func:`save_problem`.

Both end in a :class:`QPProblem` (SciPy CSC matrices and NumPy vectors) whose
:meth:`QPProblem.to_torch` hands the data to :class:`dqp.dQP.dQP_layer`.

Conversion from ``l ≤ Ax ≤ u`` to dqp's form (:meth:`MarosMeszarosProblem.to_qp`): a row with
``l_i == u_i`` (finite) becomes an equality ``A_i z = u_i``; otherwise a finite ``u_i`` gives the
inequality ``A_i z ≤ u_i`` and a finite ``l_i`` gives ``−A_i z ≤ −l_i``. Bounds with
``|bound| ≥ INFINITY_BOUND = 1e19`` (the collection encodes infinity as 1e20, sometimes stored as
9.99999999999999e19) or ``±inf`` are dropped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp

from .errors import InputError, NonFiniteError, NotSymmetricError, ShapeError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Bounds at least this large in magnitude mean "no bound" in the Maros–Meszaros files (they store
#: 1e20, sometimes rounded to 9.99999999999999e19, hence the margin).
INFINITY_BOUND = 1e19

_MM_KEYS = ("P", "q", "A", "l", "u")
_ENV_DIR = "DQP_MAROS_MESZAROS_DIR"

__all__ = [
    "INFINITY_BOUND",
    "QPProblem",
    "MarosMeszarosProblem",
    "MarosMeszarosEntry",
    "load_maros_meszaros",
    "list_maros_meszaros",
    "maros_meszaros_dir",
    "load_problem",
    "save_problem",
]


# --------------------------------------------------------------------------------------------
# dqp's problem form
# --------------------------------------------------------------------------------------------
@dataclass
class QPProblem:
    """A QP in dqp's form ``min ½zᵀPz + qᵀz + r  s.t.  Cz ≤ d,  Az = b``.

    Attributes
    ----------
    name : str
        Problem name (the file stem for loaded problems).
    P : scipy.sparse.csc_matrix, shape (n, n)
        Full symmetric (both triangles stored).
    q : ndarray, shape (n,)
    C : scipy.sparse.csc_matrix, shape (m_ineq, n)
        May have zero rows.
    d : ndarray, shape (m_ineq,)
    A : scipy.sparse.csc_matrix, shape (p, n) or None
        ``None`` when there are no equality constraints.
    b : ndarray, shape (p,) or None
    r : float
        Constant objective offset (does not affect the minimizer).
    ineq_rows, ineq_signs : ndarray of int, shape (m_ineq,)
        For a converted Maros–Meszaros problem: the original row of ``l ≤ Ax ≤ u`` each row of C
        came from, and ``+1`` (upper bound) or ``−1`` (lower bound). Empty otherwise.
    eq_rows : ndarray of int, shape (p,)
        Original rows that became equalities (converted problems only).
    """

    name: str
    P: sp.csc_matrix
    q: np.ndarray
    C: sp.csc_matrix
    d: np.ndarray
    A: Optional[sp.csc_matrix] = None
    b: Optional[np.ndarray] = None
    r: float = 0.0
    ineq_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ineq_signs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    eq_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n(self) -> int:
        """Number of variables."""
        return int(self.P.shape[0])

    @property
    def n_ineq(self) -> int:
        """Number of inequality rows (rows of C)."""
        return int(self.C.shape[0])

    @property
    def n_eq(self) -> int:
        """Number of equality rows (rows of A; 0 when A is None)."""
        return 0 if self.A is None else int(self.A.shape[0])

    def objective(self, z: np.ndarray) -> float:
        """``½zᵀPz + qᵀz + r``."""
        z = np.asarray(z, dtype=np.float64)
        return float(0.5 * z @ (self.P @ z) + self.q @ z + self.r)

    def violation(self, z: np.ndarray) -> float:
        """Largest constraint violation ``max(max(Cz − d, 0), |Az − b|)`` (0 if feasible)."""
        z = np.asarray(z, dtype=np.float64)
        v = 0.0
        if self.n_ineq:
            v = max(v, float(np.max(np.maximum(self.C @ z - self.d, 0.0))))
        if self.n_eq:
            v = max(v, float(np.max(np.abs(self.A @ z - self.b))))
        return v

    def to_torch(
        self,
        dtype: Any = None,
        sparse: bool = True,
        device: Any = None,
        requires_grad: bool = False,
        return_leaves: bool = False,
    ) -> Tuple[Any, ...]:
        """Return ``(P, q, C, d, A, b)`` as torch tensors for :class:`dqp.dQP.dQP_layer`.

        Parameters
        ----------
        dtype : torch.dtype, optional
            Defaults to ``torch.float64``.
        sparse : bool
            ``True``: P, C, A are ``torch.sparse_csc`` tensors carrying exactly the stored pattern
            of the SciPy matrices (same value order). ``False``: dense strided tensors.
        device : torch.device or str, optional
        requires_grad : bool
            Make the data differentiable. Dense tensors and vectors become leaves; a sparse matrix
            is built from a leaf tensor of its *values* (gradients live on the values; torch cannot
            accumulate into a sparse CSC leaf), so read gradients through ``return_leaves``.
        return_leaves : bool
            Also return a dict ``{"P": leaf, "q": leaf, ...}`` of the tensors whose ``.grad`` holds
            the gradients (for sparse matrices: the values, in CSC order).

        Returns
        -------
        tuple
            ``(P, q, C, d, A, b)`` (``A``, ``b`` are ``None`` without equality constraints), or
            ``((P, q, C, d, A, b), leaves)`` with ``return_leaves=True``.
        """
        import torch

        dtype = torch.float64 if dtype is None else dtype
        leaves: Dict[str, Any] = {}

        def mat(key: str, M: sp.csc_matrix) -> "torch.Tensor":
            if sparse:
                M = _canonical_csc(M)
                vals = torch.as_tensor(np.asarray(M.data, dtype=np.float64), dtype=dtype, device=device)
                vals = vals.clone().requires_grad_(requires_grad)
                leaves[key] = vals
                ccol = torch.as_tensor(M.indptr.astype(np.int64), device=device)
                row = torch.as_tensor(M.indices.astype(np.int64), device=device)
                if requires_grad:
                    return _csc_from_values(ccol, row, vals, M.shape)
                return torch.sparse_csc_tensor(
                    ccol, row, vals, size=M.shape, dtype=dtype, device=device, check_invariants=True
                )
            t = torch.as_tensor(M.toarray(), dtype=dtype, device=device).requires_grad_(requires_grad)
            leaves[key] = t
            return t

        def vec(key: str, v: np.ndarray) -> "torch.Tensor":
            t = torch.as_tensor(np.array(v, dtype=np.float64), dtype=dtype, device=device).requires_grad_(requires_grad)
            leaves[key] = t
            return t

        A = None if self.A is None else mat("A", self.A)
        b = None if self.b is None else vec("b", self.b)
        out = (mat("P", self.P), vec("q", self.q), mat("C", self.C), vec("d", self.d), A, b)
        return (out, leaves) if return_leaves else out

    def to_numpy(self, dense: bool = False) -> Tuple[Any, ...]:
        """Return ``(P, q, C, d, A, b)`` as SciPy CSC (or dense NumPy with ``dense=True``)."""
        f = (lambda M: M.toarray()) if dense else (lambda M: M)
        A = None if self.A is None else f(self.A)
        return f(self.P), self.q, f(self.C), self.d, A, self.b


def _csc_from_values(ccol: Any, row: Any, values: Any, size: Tuple[int, int]) -> Any:
    """CSC tensor on a fixed pattern with an O(nnz) backward: :func:`dqp.sparse.sparse_csc_tensor`."""
    from dqp.sparse import sparse_csc_tensor

    return sparse_csc_tensor(ccol, row, values, size)


# --------------------------------------------------------------------------------------------
# Maros–Meszaros
# --------------------------------------------------------------------------------------------
@dataclass
class MarosMeszarosProblem:
    """One Maros–Meszaros problem, ``min ½xᵀPx + qᵀx + r  s.t.  l ≤ Ax ≤ u``.

    Attributes
    ----------
    name : str
    P : scipy.sparse.csc_matrix, shape (n, n)
        Full symmetric (the files store both triangles; a file storing one triangle only is
        mirrored on load).
    q : ndarray, shape (n,)
    A : scipy.sparse.csc_matrix, shape (m, n)
    l, u : ndarray, shape (m,)
        ``|bound| ≥ INFINITY_BOUND`` (the files use ±1e20) or ``±inf`` mean no bound.
    r : float
    path : Path or None
    """

    name: str
    P: sp.csc_matrix
    q: np.ndarray
    A: sp.csc_matrix
    l: np.ndarray
    u: np.ndarray
    r: float = 0.0
    path: Optional[Path] = None

    @property
    def n(self) -> int:
        """Number of variables."""
        return int(self.P.shape[0])

    @property
    def m(self) -> int:
        """Number of rows of ``l ≤ Ax ≤ u`` (variable bounds included)."""
        return int(self.A.shape[0])

    def violation(self, x: np.ndarray, inf_bound: float = INFINITY_BOUND) -> float:
        """Largest violation of ``l ≤ Ax ≤ u`` at x (infinite bounds ignored; 0 if feasible)."""
        Ax = self.A @ np.asarray(x, dtype=np.float64)
        up = np.abs(self.u) < inf_bound
        lo = np.abs(self.l) < inf_bound
        v = 0.0
        if up.any():
            v = max(v, float(np.max(np.maximum(Ax[up] - self.u[up], 0.0))))
        if lo.any():
            v = max(v, float(np.max(np.maximum(self.l[lo] - Ax[lo], 0.0))))
        return v

    def objective(self, x: np.ndarray) -> float:
        """``½xᵀPx + qᵀx + r``."""
        x = np.asarray(x, dtype=np.float64)
        return float(0.5 * x @ (self.P @ x) + self.q @ x + self.r)

    def to_qp(self, inf_bound: float = INFINITY_BOUND) -> QPProblem:
        """Convert to dqp's form ``Cz ≤ d, Az = b`` (see the module docstring for the rules).

        Inequality rows are ordered: all upper bounds ``A_i z ≤ u_i`` (original row order), then
        all lower bounds ``−A_i z ≤ −l_i``. ``QPProblem.ineq_rows``/``ineq_signs``/``eq_rows``
        record where each row came from.

        Parameters
        ----------
        inf_bound : float
            Bounds with ``|bound| ≥ inf_bound`` are treated as absent.
        """
        l, u = self.l, self.u
        lo = np.isfinite(l) & (np.abs(l) < inf_bound)
        up = np.isfinite(u) & (np.abs(u) < inf_bound)
        eq = lo & up & (l == u)
        up_only = up & ~eq
        lo_only = lo & ~eq
        eq_rows = np.flatnonzero(eq)
        up_rows = np.flatnonzero(up_only)
        lo_rows = np.flatnonzero(lo_only)

        A_csr = self.A.tocsr()
        C = sp.vstack([A_csr[up_rows], -A_csr[lo_rows]], format="csc")
        C = _canonical_csc(sp.csc_matrix(C, shape=(len(up_rows) + len(lo_rows), self.n)))
        d = np.concatenate([u[up_rows], -l[lo_rows]]).astype(np.float64)
        if len(eq_rows):
            A_eq: Optional[sp.csc_matrix] = _canonical_csc(sp.csc_matrix(A_csr[eq_rows]))
            b_eq: Optional[np.ndarray] = u[eq_rows].astype(np.float64)
        else:
            A_eq, b_eq = None, None
        return QPProblem(
            name=self.name,
            P=self.P,
            q=self.q,
            C=C,
            d=d,
            A=A_eq,
            b=b_eq,
            r=self.r,
            ineq_rows=np.concatenate([up_rows, lo_rows]).astype(np.int64),
            ineq_signs=np.concatenate([np.ones(len(up_rows)), -np.ones(len(lo_rows))]).astype(np.int64),
            eq_rows=eq_rows.astype(np.int64),
        )


@dataclass(frozen=True)
class MarosMeszarosEntry:
    """A file of the collection with its size, as listed by :func:`list_maros_meszaros`.

    Usable wherever a path is expected (``os.fspath(entry)`` is the file).
    """

    name: str
    path: Path
    n: int
    m: int
    nnz: int

    def __fspath__(self) -> str:
        return str(self.path)

    def load(self) -> MarosMeszarosProblem:
        """Load the problem (:func:`load_maros_meszaros`)."""
        return load_maros_meszaros(self.path)


def _loadmat(path: Path, variable_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import scipy.io

    if not path.is_file():
        raise InputError(f"Problem file {str(path)!r} does not exist (or is not a file).")
    try:
        return scipy.io.loadmat(str(path), variable_names=variable_names)
    except Exception as exc:  # scipy raises ValueError/TypeError/MatReadError on corrupt files
        raise InputError(
            f"Could not read {str(path)!r} as a MATLAB .mat file "
            f"({type(exc).__name__}: {exc}). Expected the Maros–Meszaros layout with "
            f"variables {', '.join(_MM_KEYS)} (and optionally r, n, m)."
        ) from exc


def _vector(data: Dict[str, Any], key: str, path: Path, length: Optional[int] = None) -> np.ndarray:
    raw = data[key]
    if sp.issparse(raw):
        raw = raw.toarray()
    try:
        v = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{key!r} in {str(path)!r} is not numeric ({exc}).") from exc
    if v.ndim > 2 or (v.ndim == 2 and min(v.shape) > 1):
        raise ShapeError(f"{key!r} in {str(path)!r} must be a vector, got shape {v.shape}.")
    v = v.reshape(-1)
    if length is not None and v.shape[0] != length:
        raise ShapeError(
            f"{key!r} in {str(path)!r} has length {v.shape[0]}, expected {length} (to match the other arrays)."
        )
    return v


def _matrix(
    data: Dict[str, Any], key: str, path: Path, shape: Optional[Tuple[Optional[int], Optional[int]]] = None
) -> sp.csc_matrix:
    raw = data[key]
    try:
        M = (
            sp.csc_matrix(raw, dtype=np.float64)
            if sp.issparse(raw)
            else sp.csc_matrix(np.atleast_2d(np.asarray(raw, dtype=np.float64)))
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"{key!r} in {str(path)!r} is not a numeric matrix ({exc}).") from exc
    if shape is not None:
        for axis, want in enumerate(shape):
            if want is not None and M.shape[axis] != want:
                raise ShapeError(
                    f"{key!r} in {str(path)!r} has shape {M.shape}, expected "
                    f"{tuple('*' if s is None else s for s in shape)}."
                )
    return _canonical_csc(M)


def _canonical_csc(M: sp.spmatrix) -> sp.csc_matrix:
    """CSC with sorted indices and no duplicates (explicit zeros kept), int64 index arrays."""
    M = sp.csc_matrix(M, dtype=np.float64, copy=True)
    M.sum_duplicates()
    M.sort_indices()
    return M


def _check_finite(name: str, path: Path, *arrays: np.ndarray) -> None:
    for a in arrays:
        if a is not None and a.size and not np.all(np.isfinite(a)):
            raise NonFiniteError(f"{name} in {str(path)!r} contains NaN or Inf.")


def _check_square(P: sp.csc_matrix, path: Path) -> None:
    if P.shape[0] != P.shape[1]:
        raise ShapeError(f"'P' in {str(path)!r} must be square, got shape {P.shape}.")


def _symmetric_P(P: sp.csc_matrix, path: Path, tol: float = 1e-10) -> sp.csc_matrix:
    """Return P with both triangles; mirror a P stored as one triangle only."""
    _check_square(P, path)
    upper, lower = sp.triu(P, 1), sp.tril(P, -1)
    if upper.nnz and not lower.count_nonzero():
        logger.info("%s: P stores the upper triangle only; mirroring it.", path)
        P = _canonical_csc(P + upper.T)
    elif lower.nnz and not upper.count_nonzero():
        logger.info("%s: P stores the lower triangle only; mirroring it.", path)
        P = _canonical_csc(P + lower.T)
    asym = abs(P - P.T)
    if asym.nnz:
        scale = max(1.0, float(abs(P).max()))
        worst = float(asym.max())
        if worst > tol * scale:
            raise NotSymmetricError(
                f"'P' in {str(path)!r} is not symmetric: max |P - Pᵀ| = {worst:.3g} "
                f"(relative to max |P| = {scale:.3g}). dqp expects the full symmetric P."
            )
    return P


def load_maros_meszaros(path: PathLike) -> MarosMeszarosProblem:
    """Load one Maros–Meszaros problem from its ``.mat`` file.

    Parameters
    ----------
    path : str or Path
        A file of the ``osqp_benchmarks`` MAT conversion (variables ``P, q, A, l, u`` required;
        ``r`` optional, default 0; ``n``, ``m`` checked when present).

    Returns
    -------
    MarosMeszarosProblem

    Raises
    ------
    InputError
        The file is missing or unreadable, or lacks a required variable (the message names it).
    ShapeError
        Array sizes do not agree.
    NonFiniteError
        ``P``, ``q``, ``A`` or ``r`` hold NaN/Inf, or a bound is NaN.
    NotSymmetricError
        ``P`` is not symmetric (and not a single stored triangle).
    """
    path = Path(path)
    data = _loadmat(path)
    missing = [k for k in _MM_KEYS if k not in data]
    if missing:
        raise InputError(
            f"{str(path)!r} is missing the variable(s) {', '.join(map(repr, missing))}; "
            f"a Maros–Meszaros .mat file needs {', '.join(_MM_KEYS)} "
            f"for min ½xᵀPx + qᵀx + r s.t. l ≤ Ax ≤ u."
        )
    P = _matrix(data, "P", path)
    _check_square(P, path)
    n = P.shape[1]
    q = _vector(data, "q", path, n)
    A = _matrix(data, "A", path, (None, n))
    m = A.shape[0]
    l = _vector(data, "l", path, m)
    u = _vector(data, "u", path, m)
    r = float(_vector(data, "r", path, 1)[0]) if "r" in data else 0.0
    for key, want in (("n", n), ("m", m)):
        if key in data:
            got = int(_vector(data, key, path, 1)[0])
            if got != want:
                raise ShapeError(f"{str(path)!r} declares {key}={got} but the matrices give {key}={want}.")
    _check_finite("'P'", path, P.data)
    _check_finite("'A'", path, A.data)
    _check_finite("'q' or 'r'", path, q, np.array([r]))
    if np.isnan(l).any() or np.isnan(u).any():
        raise NonFiniteError(f"The bounds l/u in {str(path)!r} contain NaN (use ±1e20 or ±inf for no bound).")
    if np.any(l > u):
        bad = int(np.flatnonzero(l > u)[0])
        raise InputError(
            f"{str(path)!r} has l > u in row {bad} (l={l[bad]:.6g}, u={u[bad]:.6g}): "
            f"the problem is trivially infeasible."
        )
    P = _symmetric_P(P, path)
    return MarosMeszarosProblem(name=path.stem, P=P, q=q, A=A, l=l, u=u, r=r, path=path)


def maros_meszaros_dir() -> Optional[Path]:
    """Where the Maros–Meszaros ``.mat`` files are, or ``None`` if not found.

    Looks at ``$DQP_MAROS_MESZAROS_DIR``, then ``<repo>/../shared/data/maros_meszaros`` (the
    layout of the project's checkout and CI), then ``<repo>/shared/data/maros_meszaros``.
    """
    candidates = []
    if os.environ.get(_ENV_DIR):
        candidates.append(Path(os.environ[_ENV_DIR]))
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data" / "maros_meszaros", repo / "shared" / "data" / "maros_meszaros"]
    for c in candidates:
        if c.is_dir() and any(c.glob("*.mat")):
            return c
    return None


def list_maros_meszaros(
    directory: Optional[PathLike] = None, max_n: Optional[int] = None, max_m: Optional[int] = None
) -> List[MarosMeszarosEntry]:
    """List the problems of a directory of Maros–Meszaros ``.mat`` files, smallest first.

    Parameters
    ----------
    directory : str or Path, optional
        Defaults to :func:`maros_meszaros_dir`.
    max_n, max_m : int, optional
        Keep problems with ``n ≤ max_n`` variables and ``m ≤ max_m`` rows of ``l ≤ Ax ≤ u``
        (the collection's own m, variable bounds included).

    Returns
    -------
    list of MarosMeszarosEntry
        Sorted by ``n + m``, then nonzeros of P and A, then name.

    Raises
    ------
    InputError
        The directory does not exist (or none was given and none was found).
    """
    if directory is None:
        directory = maros_meszaros_dir()
        if directory is None:
            raise InputError(
                "No Maros–Meszaros directory found: pass one, or set "
                f"${_ENV_DIR}, or put the files in <repo>/../shared/data/maros_meszaros."
            )
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"Maros–Meszaros directory {str(directory)!r} does not exist.")
    entries = []
    for f in sorted(directory.glob("*.mat")):
        data = _loadmat(f, variable_names=["P", "A"])
        if "P" not in data or "A" not in data:
            raise InputError(f"{str(f)!r} is missing the variable 'P' or 'A' (not a Maros–Meszaros file).")
        P, A = data["P"], data["A"]
        n, m = int(P.shape[0]), int(A.shape[0])
        nnz = int(P.nnz if sp.issparse(P) else np.count_nonzero(P)) + int(
            A.nnz if sp.issparse(A) else np.count_nonzero(A)
        )
        if (max_n is not None and n > max_n) or (max_m is not None and m > max_m):
            continue
        entries.append(MarosMeszarosEntry(name=f.stem, path=f, n=n, m=m, nnz=nnz))
    entries.sort(key=lambda e: (e.n + e.m, e.nnz, e.name))
    return entries


# --------------------------------------------------------------------------------------------
# Generic problem files
# --------------------------------------------------------------------------------------------
_NPZ_ALIASES = {"P": ("P", "Q"), "q": ("q",), "C": ("C", "G"), "d": ("d", "h"), "A": ("A",), "b": ("b",)}


def _npz_get(data: Any, key: str, path: Path, allow_pickle: bool) -> Any:
    """Read key (or its libdqp alias) from an npz: a dense array, a pickled SciPy matrix, or CSC
    components ``<key>_data, <key>_indices, <key>_indptr, <key>_shape``. ``None`` if absent."""
    files = set(data.files)
    for k in _NPZ_ALIASES[key]:
        comps = [f"{k}_data", f"{k}_indices", f"{k}_indptr", f"{k}_shape"]
        if all(c in files for c in comps):
            shape = tuple(int(s) for s in np.asarray(data[f"{k}_shape"]).ravel())
            try:
                M = sp.csc_matrix((data[f"{k}_data"], data[f"{k}_indices"], data[f"{k}_indptr"]), shape=shape)
                M.check_format(full_check=True)
                return M
            except ValueError as exc:
                raise InputError(f"The CSC components of {k!r} in {str(path)!r} are inconsistent ({exc}).") from exc
        if k in files:
            try:
                v = data[k]
            except ValueError as exc:  # object array and allow_pickle=False
                raise InputError(
                    f"{k!r} in {str(path)!r} is a pickled object; pass allow_pickle=True "
                    f"if you trust the file, or store matrices dense or as CSC components "
                    f"({k}_data, {k}_indices, {k}_indptr, {k}_shape; see save_problem)."
                ) from exc
            if v.dtype == object and v.shape == ():
                v = v[()]
            if v is None or (isinstance(v, np.ndarray) and v.dtype == object and v.size == 0):
                return None
            return v
    return None


def load_problem(path: PathLike, allow_pickle: bool = False) -> QPProblem:
    """Load a QP from an ``.npz`` (dqp's form) or a ``.mat`` (Maros–Meszaros layout) file.

    ``.npz`` keys: ``P`` and ``q`` are required; ``C``/``d`` and ``A``/``b`` are optional but come
    in pairs; ``r`` (offset) is optional. libdqp's names ``Q, G, h`` are accepted for ``P, C, d``.
    Matrices may be dense arrays, CSC components (``P_data, P_indices, P_indptr, P_shape``, as
    written by :func:`save_problem`), or pickled SciPy matrices (only with ``allow_pickle=True``).

    Parameters
    ----------
    path : str or Path
    allow_pickle : bool
        Allow pickled objects in an ``.npz`` (only for files you trust).

    Returns
    -------
    QPProblem
        A ``.mat`` file is converted with :meth:`MarosMeszarosProblem.to_qp`.

    Raises
    ------
    InputError
        Missing file, unknown extension, unreadable file, a missing key (named in the message),
        or a half pair (C without d, ...). ``ShapeError``/``NonFiniteError``/``NotSymmetricError``
        (subclasses) for inconsistent, non-finite or asymmetric data.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return load_maros_meszaros(path).to_qp()
    if suffix != ".npz":
        raise InputError(
            f"Cannot load {str(path)!r}: unknown extension {path.suffix!r} "
            f"(expected .npz with keys P, q[, C, d][, A, b] or a Maros–Meszaros .mat)."
        )
    if not path.is_file():
        raise InputError(f"Problem file {str(path)!r} does not exist (or is not a file).")
    try:
        npz = np.load(str(path), allow_pickle=allow_pickle)
    except Exception as exc:
        raise InputError(
            f"Could not read {str(path)!r} as a NumPy .npz archive ({type(exc).__name__}: {exc})."
        ) from exc
    with npz:
        if not hasattr(npz, "files"):
            raise InputError(f"{str(path)!r} holds a single array, not an .npz archive with keys P, q, ...")
        raw = {k: _npz_get(npz, k, path, allow_pickle) for k in _NPZ_ALIASES}
        r = float(np.asarray(npz["r"]).ravel()[0]) if "r" in npz.files else 0.0
    for k in ("P", "q"):
        if raw[k] is None:
            raise InputError(
                f"{str(path)!r} is missing the required key {k!r} (found: {', '.join(sorted(npz.files)) or 'nothing'})."
            )
    for a, b in (("C", "d"), ("A", "b")):
        if (raw[a] is None) != (raw[b] is None):
            have, lack = (a, b) if raw[a] is not None else (b, a)
            raise InputError(
                f"{str(path)!r} has {have!r} but is missing the key {lack!r}; {a} and {b} must be given together."
            )
    P = _matrix(raw, "P", path)
    _check_square(P, path)
    n = P.shape[1]
    q = _vector(raw, "q", path, n)
    if raw["C"] is not None:
        C = _matrix(raw, "C", path, (None, n))
        d = _vector(raw, "d", path, C.shape[0])
    else:
        C, d = sp.csc_matrix((0, n)), np.zeros(0)
    A = b = None
    if raw["A"] is not None:
        A = _matrix(raw, "A", path, (None, n))
        b = _vector(raw, "b", path, A.shape[0])
    _check_finite("'P'", path, P.data)
    _check_finite("'q'", path, q)
    _check_finite("'C' or 'd'", path, C.data, d)
    if A is not None:
        _check_finite("'A' or 'b'", path, A.data, b)
    P = _symmetric_P(P, path)
    return QPProblem(name=path.stem, P=P, q=q, C=_canonical_csc(C), d=d, A=A, b=b, r=r)


def save_problem(path: PathLike, problem: QPProblem) -> Path:
    """Write a :class:`QPProblem` as a pickle-free ``.npz`` readable by :func:`load_problem`.

    Matrices are stored as CSC components (``P_data, P_indices, P_indptr, P_shape``, ...).
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        path = path.with_suffix(".npz")
    out: Dict[str, np.ndarray] = {
        "q": np.asarray(problem.q, dtype=np.float64),
        "d": np.asarray(problem.d, dtype=np.float64),
        "r": np.array([problem.r], dtype=np.float64),
    }
    mats = {"P": problem.P, "C": problem.C}
    if problem.A is not None:
        mats["A"] = problem.A
        out["b"] = np.asarray(problem.b, dtype=np.float64)
    for k, M in mats.items():
        M = _canonical_csc(M)
        out[f"{k}_data"], out[f"{k}_indices"], out[f"{k}_indptr"] = M.data, M.indices, M.indptr
        out[f"{k}_shape"] = np.array(M.shape, dtype=np.int64)
    np.savez(str(path), **out)
    return path
