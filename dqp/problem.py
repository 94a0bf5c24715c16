"""Validated QP batches: the data model the layer and the engine share.

:func:`validate` checks the six arguments once (types, layouts, shapes, batch sizes, finiteness,
symmetry, optionally PSD), broadcasts them to a common batch, and returns a :class:`QPBatch`. The
engine only reads ``QPBatch``: it never sees raw user input.

Dense matrices are stored as torch tensors with a batch dimension (shared arguments are expanded
with ``expand``, so autograd sums their gradients over the batch). Sparse matrices are stored as a
:class:`SparseArg`: one values tensor (the concatenation of each element's CSC values, or a single
shared one) plus the CSC patterns.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch

from dqp.errors import LayoutError, NonFiniteError, NotPSDError, NotSymmetricError, ShapeError
from dqp.patterns import PATTERNS, CheckedPattern

_NAMES = ("P", "q", "C", "d", "A", "b")
#: an inequality bound ``d_i ≥ INF_BOUND`` (or ``+inf``) means "no bound" and the row is left out,
#: unless the row is itself that large (``d_i < INF_ROW_RATIO·‖C_i‖∞``: data scaled as a whole keeps
#: its rows); a left-out row could only be active for ``‖z‖∞ ≥ INF_ROW_RATIO / n``
INF_BOUND = 1e20
INF_ROW_RATIO = 1e10


def unbounded_mask_np(C, d: np.ndarray) -> np.ndarray:
    """Rows of one element whose bound means "none" (see :data:`INF_BOUND`)."""
    row_max = np.asarray(abs(C).max(axis=1).todense()).ravel() if sp.issparse(C) else np.abs(C).max(axis=1)
    return (d >= INF_BOUND) & (d >= INF_ROW_RATIO * row_max)


_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


@dataclass
class SparseArg:
    """A sparse matrix argument: one CSC pattern per element, values concatenated.

    Attributes
    ----------
    values : Tensor
        Concatenated CSC values (differentiable); for a shared matrix, its values once.
    ccols, rows : list of ndarray
        CSC column pointers and row indices per *distinct* matrix.
    offsets : list of int
        Start of each distinct matrix's values in ``values``.
    shape : (rows, cols)
    shared : bool
        One matrix for the whole batch.
    """

    values: torch.Tensor
    ccols: List[np.ndarray]
    rows: List[np.ndarray]
    offsets: List[int]
    shape: Tuple[int, int]
    shared: bool
    #: the checked patterns (with their transpose positions), one per distinct matrix, when known
    patterns: Optional[List[CheckedPattern]] = None

    def index(self, i: int) -> int:
        return 0 if self.shared else i

    def scipy(self, i: int, values_np: np.ndarray) -> sp.csc_matrix:
        """Element ``i`` as a SciPy CSC matrix, given the float64 NumPy copy of ``values``."""
        k = self.index(i)
        lo = self.offsets[k]
        nnz = len(self.rows[k])
        pat = self.patterns[k] if self.patterns is not None else None
        idx = np.int64 if pat is None else pat.index_dtype  # (astype copies)
        # a copy in canonical form (sorted rows, duplicates summed, as SciPy and torch's coalesce do):
        # solvers sort and sum in place, which must never reach the caller's values
        M = sp.csc_matrix(
            (values_np[lo : lo + nnz].copy(), self.rows[k].astype(idx), self.ccols[k].astype(idx)), shape=self.shape
        )
        if pat is not None and pat.canonical:
            M.has_canonical_format = True  # (known from the checked pattern: no scan)
        elif not M.has_canonical_format:
            M.sum_duplicates()
        return M

    def col_indices(self, k: int) -> np.ndarray:
        """Column index of each stored value of distinct matrix ``k`` (CSC value order)."""
        return np.repeat(np.arange(self.shape[1]), np.diff(self.ccols[k]))


@dataclass
class DeferredChecks:
    """Value checks of dense data left to the solver's first host read (``validate(..., defer_checks=True)``).

    Attributes
    ----------
    ok : Tensor
        0-dim bool on the data's device: every argument finite and P symmetric (:func:`_dense_ok`'s test).
    run : callable
        The detailed checks: raise the typed error naming the fault; return when ``ok`` was a false
        alarm (a sum that overflowed).
    """

    ok: torch.Tensor
    run: Callable[[], None]

    def check(self) -> None:
        """Read ``ok`` (one host read) and run the detailed checks where it is False."""
        if not bool(self.ok):
            self.run()


@dataclass
class QPBatch:
    """A validated batch of QPs. Absent constraints are ``None``; ``m``/``p`` are then 0.

    ``deferred``: the value checks still to be read (:class:`DeferredChecks`), None once done.
    """

    P: Union[torch.Tensor, SparseArg]
    q: torch.Tensor
    C: Union[torch.Tensor, SparseArg, None]
    d: Optional[torch.Tensor]
    A: Union[torch.Tensor, SparseArg, None]
    b: Optional[torch.Tensor]
    B: int
    n: int
    m: int
    p: int
    batched: bool
    sparse: bool
    dtype: torch.dtype
    device: torch.device
    deferred: Optional[DeferredChecks] = None

    def numpy(self) -> "NumpyBatch":
        """float64 CPU copies for element-wise solvers (one transfer for the whole batch)."""
        return NumpyBatch(self)


class NumpyBatch:
    """float64 NumPy/SciPy views of a :class:`QPBatch`, element by element."""

    def __init__(self, batch: QPBatch):
        self.batch = batch
        # copies: a CPU float64 tensor's .numpy() shares its memory, and solvers may write into their input
        conv = lambda t: None if t is None else np.array(t.detach().to("cpu", torch.float64).numpy(), copy=True)
        self._mats = {}
        for name in ("P", "C", "A"):
            M = getattr(batch, name)
            self._mats[name] = (M, conv(M.values) if isinstance(M, SparseArg) else conv(M))
        self.q, self.d, self.b = conv(batch.q), conv(batch.d), conv(batch.b)

    def matrix(self, name: str, i: int):
        M, data = self._mats[name]
        if M is None:
            return None
        if isinstance(M, SparseArg):
            return M.scipy(i, data)
        return data[i]

    def element(self, i: int):
        """``(P, q, C, d, A, b)`` of element ``i`` (``None`` for absent constraints)."""
        return (
            self.matrix("P", i),
            self.q[i],
            self.matrix("C", i),
            None if self.d is None else self.d[i],
            self.matrix("A", i),
            None if self.b is None else self.b[i],
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, layout {x.layout}, dtype {x.dtype}"
    return type(x).__name__


def _check_dtype_device(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    """``x`` (a dense tensor or sparse values) must share q's floating dtype and device."""
    if x.dtype != ref.dtype:
        raise LayoutError(
            f"Argument {name} has dtype {x.dtype} but q has {ref.dtype}; all arguments must "
            f"share one floating dtype (float32 or float64). Convert with .to({ref.dtype})."
        )
    if x.device != ref.device:
        raise LayoutError(
            f"Argument {name} is on {x.device} but q is on {ref.device}; move all arguments to one device."
        )


def _where(ok: torch.Tensor, t: torch.Tensor, batched: bool) -> str:
    if batched and t.layout == torch.strided and t.dim() >= 2:
        bad = (~ok).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        return f" (batch elements {bad[:10]})"
    return ""


def _finite_numpy(name: str, t: torch.Tensor) -> bool:
    """True when a dense CPU float32/float64 tensor surely passes :func:`_check_finite` (one NumPy
    reduction; False leaves the decision to the detailed check, which names the fault)."""
    if t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return False
    x = t.detach().numpy()
    return bool((x > -np.inf).all()) if name == "d" else bool(np.isfinite(x).all())  # (NaN > -inf is False)


def _check_finite(name: str, t: torch.Tensor, batched: bool) -> None:
    if _finite_numpy(name, t):
        return
    vals = (
        t.values()
        if t.layout in _SPARSE_LAYOUTS and t.layout != torch.sparse_coo
        else (t.coalesce().values() if t.layout == torch.sparse_coo else t)
    )
    if name == "d":  # +inf is "no bound" (the row is inactive); NaN and -inf are errors
        ok = ~torch.isnan(vals) & (vals != float("-inf"))
        if not bool(ok.all()):
            raise NonFiniteError(
                f"Argument d contains NaN or -inf{_where(ok, t, batched)}. +inf (or any bound "
                f">= {INF_BOUND:g}) marks an absent bound, but NaN has no meaning and "
                f"C_i z <= -inf cannot hold; check the layer that produced d."
            )
        return
    ok = torch.isfinite(vals)
    if not bool(ok.all()):
        where = ""
        if batched and t.layout == torch.strided and t.dim() >= 2:
            bad = (~ok).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            where = f" (batch elements {bad[:10]})"
        raise NonFiniteError(
            f"Argument {name} contains NaN or Inf{where}. dqp needs finite problem data; "
            f"check the layer that produced {name} (e.g. for exploding values)."
        )


def check_compressed(name: str, ptr: np.ndarray, idx: np.ndarray, n_ptr: int, n_idx: int, kind: str = "CSC") -> None:
    """O(nnz) structure check of a compressed sparse matrix; raises :class:`LayoutError`.

    ``ptr`` (column pointers for CSC, row pointers for CSR) must have ``n_ptr + 1`` entries, start
    at 0, never decrease and end at ``nnz = len(idx)``; every index must lie in ``[0, n_idx)``.
    Duplicate and unsorted indices are allowed (they are summed and sorted on a copy).
    """
    ptr_name, idx_name = ("ccol_indices", "row_indices") if kind == "CSC" else ("crow_indices", "col_indices")
    fix = (
        f"Build {name} with torch.sparse_csc_tensor(..., check_invariants=True) or from a dense tensor "
        f"with .to_sparse_csc() to find the fault."
    )
    if ptr.shape != (n_ptr + 1,):
        raise LayoutError(
            f"Argument {name}: {kind} {ptr_name} must have {n_ptr + 1} entries, got {ptr.shape[0]}. {fix}"
        )
    if ptr[0] != 0 or ptr[-1] != len(idx):
        raise LayoutError(
            f"Argument {name}: {kind} {ptr_name} must start at 0 and end at nnz = {len(idx)}, got "
            f"{int(ptr[0])} ... {int(ptr[-1])}. {fix}"
        )
    if n_ptr and np.any(np.diff(ptr) < 0):
        raise LayoutError(
            f"Argument {name}: {kind} {ptr_name} must be nondecreasing (at position "
            f"{int(np.flatnonzero(np.diff(ptr) < 0)[0])}). {fix}"
        )
    if len(idx) and (idx.min() < 0 or idx.max() >= n_idx):
        bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
        raise LayoutError(f"Argument {name}: {kind} {idx_name} must lie in [0, {n_idx}), found {bad}. {fix}")


def _check_structure(name: str, M: torch.Tensor) -> None:
    """Validate a CSR or COO tensor's index structure before its conversion reads it (torch does not
    by default); a CSC tensor's is checked once per pattern (:func:`_pattern`)."""
    r, c = M.shape
    if M.layout == torch.sparse_csr:
        check_compressed(name, M.crow_indices().cpu().numpy(), M.col_indices().cpu().numpy(), r, c, "CSR")
    elif M.layout == torch.sparse_coo:
        idx = M._indices().cpu().numpy()
        if idx.size and (idx.min() < 0 or np.any(idx.max(axis=1) >= np.array([r, c]))):
            raise LayoutError(f"Argument {name}: COO indices must lie in [0, {r}) x [0, {c}).")


def _pattern(name: str, M: torch.Tensor) -> CheckedPattern:
    """The checked pattern of a CSC tensor (its structure checked the first time it is seen)."""
    r, c = M.shape
    check = lambda ptr, idx: check_compressed(name, ptr, idx, c, r, "CSC")
    return PATTERNS.get(M.ccol_indices().cpu().numpy(), M.row_indices().cpu().numpy(), (r, c), check)


def _to_csc(name: str, M: torch.Tensor) -> torch.Tensor:
    if M.layout == torch.sparse_csc:  # (its structure is checked once per pattern, by _pattern)
        if M.requires_grad and M.is_leaf:
            raise LayoutError(
                f"Argument {name} is a sparse CSC leaf tensor with requires_grad=True; torch cannot "
                f"accumulate gradients into it. Make the values the leaf instead: "
                f"vals.requires_grad_(); {name} = dqp.sparse_csc_tensor(ccol, row, vals, size) (O(nnz) backward), "
                f"then read vals.grad."
            )
        return M
    _check_structure(name, M)
    if M.layout in (torch.sparse_coo, torch.sparse_csr):
        return M.to_sparse_csc()  # differentiable; gradients reach the original values in their order
    raise LayoutError(
        f"Argument {name}: solve_type='sparse' expects a torch sparse CSC (or COO/CSR) tensor, "
        f"got {_describe(M)}. Convert with {name}.to_sparse_csc(), or use solve_type='dense'."
    )


def _sparse_arg(name: str, M, shape_rows: Optional[int], n: int) -> Tuple[SparseArg, int, Optional[int]]:
    mats = list(M) if isinstance(M, (list, tuple)) else [M]  # non-empty, first element 2-D (_mat_shape)
    csc = []
    for i, Mi in enumerate(mats):
        if not isinstance(Mi, torch.Tensor):
            raise LayoutError(
                f"Argument {name}{'' if len(mats) == 1 else f'[{i}]'} must be a torch sparse tensor, "
                f"got {_describe(Mi)}."
            )
        if Mi.dim() != 2:
            raise ShapeError(
                f"Argument {name}: each sparse matrix must be 2-D, got shape {tuple(Mi.shape)}. "
                f"Pass a batch of sparse matrices as a list."
            )
        csc.append(_to_csc(name, Mi))
    shapes = {tuple(c.shape) for c in csc}
    if len(shapes) != 1:
        raise ShapeError(f"Argument {name}: all matrices of a batch must have one shape, got {sorted(shapes)}.")
    ((r, c),) = shapes  # c == n: the first matrix was checked by _matrix_sizes
    patterns = [_pattern(name, t) for t in csc]
    ccols = [pat.ccol for pat in patterns]
    rows = [pat.rows for pat in patterns]
    nnz = [len(x) for x in rows]
    offsets = [0, *itertools.accumulate(nnz[:-1])]  # (Python ints; NumPy's cumsum costs 10 µs here)
    values = csc[0].values() if len(csc) == 1 else torch.cat([t.values() for t in csc])
    B = None if len(csc) == 1 and not isinstance(M, (list, tuple)) else len(csc)
    return SparseArg(values, ccols, rows, offsets, (r, c), shared=len(csc) == 1, patterns=patterns), r, B


def _mat_shape(name: str, M, sparse: bool) -> Tuple[int, int]:
    """``(rows, cols)`` of a matrix argument (a list of sparse matrices: of its first element)."""
    if sparse:
        if isinstance(M, torch.Tensor) and M.layout == torch.strided:
            raise LayoutError(
                f"Argument {name}: solve_type='sparse' expects a torch sparse CSC tensor, got a "
                f"dense tensor. Use {name}.to_sparse_csc() or solve_type='dense'."
            )
        first = M[0] if isinstance(M, (list, tuple)) and len(M) else M
        if isinstance(M, (list, tuple)) and not len(M):
            raise ShapeError(f"Argument {name} is an empty list; give one sparse matrix or one per batch element.")
        if not isinstance(first, torch.Tensor):
            raise LayoutError(f"Argument {name} must be a torch sparse tensor, got {_describe(first)}.")
        if first.dim() != 2:
            raise ShapeError(
                f"Argument {name}: each sparse matrix must be 2-D, got shape {tuple(first.shape)}. "
                f"Pass a batch of sparse matrices as a list."
            )
        return int(first.shape[0]), int(first.shape[1])
    if M.dim() not in (2, 3):
        raise ShapeError(f"Argument {name} must have shape (k, n) or (B, k, n), got {tuple(M.shape)}.")
    return int(M.shape[-2]), int(M.shape[-1])


def _matrix_sizes(args: dict, sparse: bool) -> Tuple[int, dict]:
    """``n`` and the row counts of C and A; the argument that disagrees with the others is named.

    ``n`` is what most of P, q and the columns of C and A agree on (P decides a tie), so a shape
    error names the argument that does not fit. The rows of C and A set the lengths of d and b.
    """
    rows, n_P = _mat_shape("P", args["P"], sparse)
    if rows != n_P:
        raise ShapeError(f"Argument P must be square, got {rows} x {n_P} (shape {_shape_of(args['P'])}).")
    votes = {"P": n_P, "q": _vector_length(args["q"])}
    sizes = {}
    for name in ("C", "A"):
        if args[name] is not None:
            sizes[name], votes[name] = _mat_shape(name, args[name], sparse)
    counts = {}
    for v in votes.values():
        counts[v] = counts.get(v, 0) + 1
    n = max(counts, key=lambda v: (counts[v], v == n_P))
    for name, v in votes.items():
        if v == n or name == "q":
            continue  # q's own message (with the accepted forms) comes from _as_vector
        others = ", ".join(k for k, w in votes.items() if w == n)
        if name == "P":
            raise ShapeError(
                f"Argument P has shape {_shape_of(args['P'])} but {others} give n = {n}; expected (..., {n}, {n})."
            )
        raise ShapeError(
            f"Argument {name} has {v} columns but {others} give n = {n}; {name} must have "
            f"{n} columns (shape {_shape_of(args[name])})."
        )
    return n, sizes


def _vector_length(v: torch.Tensor) -> int:
    """The length a vector argument claims: ``k`` for ``(k,)``, ``(B, k)``, ``(B, k, 1)``."""
    return int(v.shape[-2]) if v.dim() == 3 else int(v.shape[-1]) if v.dim() else 0


def _shape_of(M) -> str:
    if isinstance(M, (list, tuple)):
        return f"list of {len(M)} x {tuple(M[0].shape) if len(M) and hasattr(M[0], 'shape') else '?'}"
    return str(tuple(M.shape))


def _as_vector(name: str, v: torch.Tensor, k: int, mat: str) -> torch.Tensor:
    """``v`` as ``(k,)`` or ``(B, k)``: column vectors ``(k, 1)`` / ``(B, k, 1)`` are squeezed.

    ``k`` is set by ``mat`` (n for q, the rows of C for d, of A for b). A ``(1, 1)`` vector with
    ``k = 1`` stays a batch of one (both readings give the same values).
    """
    given = tuple(v.shape)
    if v.dim() == 3 and v.shape[-1] == 1:
        v = v.squeeze(-1)
    elif v.dim() == 2 and v.shape[-1] != k and v.shape[-1] == 1 and v.shape[0] == k:
        v = v.squeeze(-1)
    if v.dim() not in (1, 2) or v.shape[-1] != k:
        letter = {"q": "n", "d": "m", "b": "p"}[name]
        size = f"P is {k} x {k}" if name == "q" else f"{mat} has {k} rows"
        raise ShapeError(
            f"Argument {name} has shape {given} but {size}; {name} must have shape "
            f"({letter},) or (B, {letter}), or be a column ({letter}, 1) / (B, {letter}, 1), "
            f"with {letter} = {k}."
        )
    return v


def validate(
    P,
    q,
    C=None,
    d=None,
    A=None,
    b=None,
    *,
    sparse: bool = False,
    check_psd: bool = False,
    sym_tol: float = 1e-9,
    defer_checks: bool = False,
) -> QPBatch:
    """Check the problem data and broadcast it to a common batch.

    Parameters
    ----------
    P, q, C, d, A, b
        Problem data (see :class:`dqp.dQP.dQP_layer`). ``C``/``d`` and ``A``/``b`` come in pairs and
        may be ``None`` (or have zero rows).
    sparse : bool
        Whether the matrices are sparse (CSC, or COO/CSR converted differentiably).
    check_psd : bool
        Also check that P is positive semidefinite.
    defer_checks : bool
        Dense data without ``check_psd``: compute the finiteness and symmetry screen as a device flag
        and leave its host read to the solver (``QPBatch.deferred``), which reads it with its own;
        the typed errors are the same, raised at that read.

    Raises
    ------
    ShapeError, NonFiniteError, NotSymmetricError, NotPSDError, LayoutError
    """
    args = dict(P=P, q=q, C=C, d=d, A=A, b=b)
    for mat, vec in (("C", "d"), ("A", "b")):
        if (args[mat] is None) != (args[vec] is None):
            given, missing = (mat, vec) if args[mat] is not None else (vec, mat)
            raise ShapeError(
                f"Argument {given} is given but {missing} is None; constraints need both "
                f"({'C z <= d' if mat == 'C' else 'A z = b'}). Pass both or neither."
            )
    if P is None or q is None:
        raise ShapeError("Arguments P and q are required.")
    ref = q
    _check_layouts(args, sparse)
    n, sizes = _matrix_sizes(args, sparse)
    q = args["q"] = _as_vector("q", q, n, "P")
    if n == 0:
        raise ShapeError("Argument q has zero entries: the QP needs at least one variable.")
    batch_sizes = {}
    if q.dim() == 2:
        batch_sizes["q"] = q.shape[0]
    vec_len = {}
    for name, mat in (("d", "C"), ("b", "A")):
        if args[name] is None:
            continue
        v = args[name] = _as_vector(name, args[name], sizes[mat], mat)
        vec_len[name] = v.shape[-1]
        if v.dim() == 2:
            batch_sizes[name] = v.shape[0]
    d, b = args["d"], args["b"]
    mats = {}
    for name, vec in (("P", None), ("C", "d"), ("A", "b")):
        M = args[name]
        if M is None:
            continue
        rows_expected = n if name == "P" else vec_len[vec]
        if sparse:
            arg, r, Bm = _sparse_arg(name, M, rows_expected, n)
            _check_dtype_device(name, arg.values, ref)
            _check_finite(name, arg.values, False)
            mats[name] = arg
            if Bm is not None:
                batch_sizes[name] = Bm
        else:
            if M.dim() == 3:
                batch_sizes[name] = M.shape[0]
            mats[name] = M
    batched, B = _common_batch(batch_sizes, sparse)
    sym_tol = max(sym_tol, 64 * torch.finfo(q.dtype).eps)
    defer = defer_checks and not sparse and not check_psd
    ok = _dense_ok_flag(args, sym_tol) if defer else None
    fast = defer or (not sparse and _dense_ok(args, sym_tol))  # (else the checks below name what is wrong)
    if not fast:
        _check_finite_all(args, sparse)

    batch = _expanded_batch(mats, q, d, b, B, n, vec_len, batched, sparse)
    # rounding in the user's own P = L @ L.T is ~n·eps relative: allow for it in the working precision
    if not fast:
        _check_symmetric(batch, sym_tol)
    if check_psd:
        _check_psd(batch)
    if ok is not None:
        batch.deferred = DeferredChecks(ok, _detailed_checks(args, copy.copy(batch), sym_tol))
    return batch


def _expanded_batch(
    mats: dict, q: torch.Tensor, d, b, B: int, n: int, vec_len: dict, batched: bool, sparse: bool
) -> QPBatch:
    """The :class:`QPBatch` of checked arguments, each dense one with the leading dimension B
    (no expand where it is B already: one autograd node less per argument)."""

    def expand_vec(v):
        if v is None:
            return None
        v = v if v.dim() == 2 else v.unsqueeze(0)
        return v if v.shape[0] == B else v.expand(B, -1)

    def expand_mat(M):
        if M is None or isinstance(M, SparseArg):
            return M
        M = M if M.dim() == 3 else M.unsqueeze(0)
        return M if M.shape[0] == B else M.expand(B, -1, -1)

    Pm, Cm, Am = expand_mat(mats["P"]), expand_mat(mats.get("C")), expand_mat(mats.get("A"))
    qv, dv, bv = expand_vec(q), expand_vec(d), expand_vec(b)
    m = vec_len.get("d", 0)
    p = vec_len.get("b", 0)
    if m == 0:
        Cm = dv = None
    if p == 0:
        Am = bv = None
    return QPBatch(Pm, qv, Cm, dv, Am, bv, B, n, m, p, batched, sparse, q.dtype, q.device)


def _check_finite_all(args: dict, sparse: bool) -> None:
    """:func:`_check_finite` on every argument given (the matrices of sparse input are checked with
    their patterns)."""
    for name in ("q", "d", "b") + (() if sparse else ("P", "C", "A")):
        x = args[name]
        if x is not None:
            _check_finite(name, x, x.dim() == (2 if name in "qdb" else 3))


def _detailed_checks(args: dict, batch: QPBatch, tol: float) -> Callable[[], None]:
    """The checks :func:`validate` runs on dense data that fails its screen, as a function."""

    def run() -> None:
        _check_finite_all(args, False)
        _check_symmetric(batch, tol)

    return run


def _check_layouts(args: dict, sparse: bool) -> None:
    """Every argument a tensor of ``q``'s floating dtype and device; dense, except the matrices of
    sparse input (checked with their patterns)."""
    q = args["q"]
    if not isinstance(q, torch.Tensor) or q.layout != torch.strided:
        raise LayoutError(f"Argument q must be a dense torch tensor, got {_describe(q)}.")
    if not q.is_floating_point():
        raise LayoutError(f"Argument q must be floating point (float32/float64), got {q.dtype}. Use q.double().")
    if q.device.type == "meta":
        raise LayoutError("Argument q is a 'meta' tensor (no data); dqp needs real values on a CPU or CUDA device.")
    for name, x in args.items():
        if x is None or (sparse and name in ("P", "C", "A")):
            continue
        if not isinstance(x, torch.Tensor):
            raise LayoutError(f"Argument {name} must be a torch tensor, got {_describe(x)}.")
        if x.layout != torch.strided:
            raise LayoutError(
                f"Argument {name} is sparse ({x.layout}) but solve_type='dense'. Use "
                f"solve_type='sparse' (torch CSC tensors), or {name}.to_dense()."
            )
        _check_dtype_device(name, x, q)


def _common_batch(batch_sizes: dict, sparse: bool) -> Tuple[bool, int]:
    """``(batched, B)`` from the leading dimensions of the batched arguments (name -> size).

    A dense leading dimension of 1 broadcasts, as in torch; a list of one sparse matrix does not.
    """
    bs = set(batch_sizes.values())
    sparse_lists = {k for k in batch_sizes if sparse and k in ("P", "C", "A")}
    if len(bs) == 2 and 1 in bs and not any(batch_sizes[k] == 1 for k in sparse_lists):
        bs.discard(1)
    if len(bs) > 1:
        raise ShapeError(
            f"Batch sizes do not agree: {batch_sizes}. Give every batched argument the same "
            f"leading dimension B (unbatched arguments are shared across the batch)."
        )
    B = bs.pop() if bs else 1
    if B == 0:
        raise ShapeError("The batch is empty (B = 0).")
    return bool(batch_sizes), B


def _dense_ok(args: dict, tol: float) -> bool:
    """Dense data, one host read: every argument finite and P symmetric to ``tol`` (as
    :func:`_check_symmetric` measures it). False: the per-argument checks run and name the fault."""
    # (a sum is NaN or ±inf where an entry is, or on overflow: then the detailed checks decide; P's
    # non-finite entries make its asymmetry NaN, which fails the comparison)
    if args["q"].device.type == "cpu" and args["q"].dtype in (torch.float32, torch.float64):
        return _dense_ok_numpy(args, tol)  # the same test on CPU arrays: a few microseconds, not tens
    return bool(_dense_ok_flag(args, tol))


def _dense_ok_flag(args: dict, tol: float) -> torch.Tensor:
    """:func:`_dense_ok`'s test as a 0-dim bool tensor on the data's device (no host read)."""
    sums = torch.stack([x.detach().sum() for name, x in args.items() if x is not None and name != "P"])
    Pd = args["P"].detach()
    asym = torch.sub(Pd, Pd.transpose(-1, -2)).abs_().amax(dim=(-1, -2))
    return torch.isfinite(sums).all() & (asym <= tol * (1.0 + Pd.abs().amax(dim=(-1, -2)))).all()


def _dense_ok_numpy(args: dict, tol: float) -> bool:
    """:func:`_dense_ok` on CPU tensors of float32/float64 (every argument shares q's dtype and device).

    The common case costs one sum per argument and one comparison of P with its transpose: a finite
    total means every argument is finite, and an exactly symmetric finite P passes the tolerance test
    (its asymmetry is 0). Anything else takes the tolerance test itself (:func:`_dense_ok_flag`).
    """
    arrays = [x.detach().numpy() for x in args.values() if x is not None]  # P first
    with np.errstate(all="ignore"):
        total = sum(float(np.add.reduce(a, axis=None)) for a in arrays)
        Pd = arrays[0]
        if math.isfinite(total) and np.equal(Pd, np.swapaxes(Pd, -1, -2)).all():
            return True
    return bool(_dense_ok_flag(args, tol))


def _check_symmetric(batch: QPBatch, tol: float) -> None:
    P = batch.P
    if isinstance(P, SparseArg):
        vals = P.values.detach().to("cpu", torch.float64).numpy()
        for k in range(len(P.rows)):
            v = vals[P.offsets[k] : P.offsets[k] + len(P.rows[k])]
            pat = P.patterns[k] if P.patterns is not None else None
            asym = pat.asymmetry(v) if pat is not None else _csc_asymmetry(P.ccols[k], P.rows[k], v, P.shape[0])
            if asym is None:  # duplicate or unsorted entries: on a summed copy
                M = P.scipy(k, vals)
                asym = abs(M - M.T).max() if M.nnz else 0.0
                v = M.data
            scale = 1.0 + (float(np.max(np.abs(v))) if len(v) else 0.0)
            if asym > tol * scale:
                where = "" if P.shared else f" (batch element {k})"
                raise NotSymmetricError(
                    f"Argument P is not symmetric{where}: max |P - Pᵀ| = {asym:.3g}. dqp needs the full symmetric "
                    f"matrix (both triangles). If you store one triangle, use P + P.T - diag(P); if P is a "
                    f"learned matrix, symmetrize it: 0.5 * (P + P.T)."
                )
            if P.shared:
                break
        return
    Pd = P.detach()
    asym = (Pd - Pd.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    scale = 1.0 + Pd.abs().amax(dim=(-1, -2))
    bad = (asym > tol * scale).nonzero().flatten().tolist()
    if bad:
        where = f" (batch elements {bad[:10]})" if batch.batched else ""
        raise NotSymmetricError(
            f"Argument P is not symmetric{where}: max |P - Pᵀ| = {float(asym.max()):.3g}. Symmetrize it, "
            f"e.g. P = 0.5 * (P + P.transpose(-1, -2)), or build it as L @ L.T."
        )


def _csc_asymmetry(ccol: np.ndarray, rows: np.ndarray, vals: np.ndarray, n: int) -> Optional[float]:
    """``max |M − Mᵀ|`` of a square CSC matrix from its arrays (no SciPy object); ``None`` when the
    pattern is not canonical (unsorted or duplicate row indices)."""
    return CheckedPattern(ccol, rows, (n, n)).asymmetry(vals)


def _check_psd(batch: QPBatch, tol: float = 1e-9) -> None:
    P = batch.P
    if isinstance(P, SparseArg):
        vals = P.values.detach().to("cpu", torch.float64).numpy()
        ext = []
        for k in range(1 if P.shared else batch.B):
            M = P.scipy(k, vals)
            if M.shape[0] <= 1000:  # dense eigenvalues: exact and fast at this size
                e = np.linalg.eigvalsh(M.toarray())
                ext.append((e[0], e[-1]))
            else:  # O(nnz) per Lanczos step instead of an O(n³) dense decomposition
                from scipy.sparse.linalg import eigsh

                hi = eigsh(M, k=1, which="LA", return_eigenvectors=False, tol=1e-6)[0]
                lo = eigsh(M, k=1, which="SA", return_eigenvectors=False, tol=1e-6)[0]
                ext.append((lo, hi))
        eig = torch.tensor(ext, dtype=torch.float64)
    else:
        eig = torch.linalg.eigvalsh(P.detach().to(torch.float64))
    lo = eig[..., 0]
    scale = 1.0 + eig.abs().amax(dim=-1)
    bad = (lo < -tol * scale).nonzero().flatten().tolist()
    if bad:
        where = f" (batch elements {bad[:10]})" if batch.batched else ""
        raise NotPSDError(
            f"Argument P is not positive semidefinite{where}: smallest eigenvalue "
            f"{float(lo.min()):.3g}. The QP is then nonconvex. Build P as L @ L.T (+ eps*I), or "
            f"turn off check_PSD if you know P is PSD up to rounding."
        )


def drop_unbounded_rows(data):
    """Leave out inequality rows whose bound means "none" (:data:`INF_BOUND`, ``+inf``) from one element.

    Returns ``(data, keep, m)``: the reduced ``(P, q, C, d, A, b)``, the kept rows' mask (``None``
    when nothing was dropped) and the original row count.
    """
    P, q, C, d, A, b = data
    if C is None or not (d >= INF_BOUND).any():
        return data, None, 0 if C is None else C.shape[0]
    keep = ~unbounded_mask_np(C, d)
    m = len(d)
    if keep.all():
        return data, None, m
    if not keep.any():
        return (P, q, None, None, A, b), keep, m
    Ck = C.tocsr()[keep] if sp.issparse(C) else C[keep]
    return (P, q, sp.csc_matrix(Ck) if sp.issparse(C) else Ck, d[keep], A, b), keep, m


def restore_rows(res, keep: np.ndarray, m: int):
    """Put the left-out rows back into an element's result: inactive, with zero multipliers."""
    from dataclasses import replace

    mu = np.zeros(m)
    active = np.zeros(m, bool)
    if len(res.mu):
        mu[keep] = res.mu
        active[keep] = res.active
    return replace(res, mu=mu, active=active)
