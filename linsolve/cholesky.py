"""Batched Cholesky factors: one value type and the policies that decide how they are computed.

:class:`CholeskyFactor` holds a lower factor ``L`` (shared ``(k, k)`` or batched ``(B, k, k)``)
together with what makes solves with it fast: its explicit inverse ``L⁻¹`` or the inverses of its
diagonal blocks (a factor of the blocked path, :mod:`dqp.linsolve.blocked`). :func:`cholesky`
computes one, choosing the route by a frozen :class:`CholeskyOptions`; the factor keeps those
options, so its solves follow them too. The interior-point method (:mod:`dqp.solvers.ipm`) and the
batched KKT solver (:mod:`dqp.linsolve.torch_batched`) both use this module.

Batched matrix-vector products (:func:`mv`, :func:`tmv`) live here too: on the CPU they go
through NumPy's ``einsum`` where no autograd graph is built (``cpu_fast_paths``). Nothing here calls
a BLAS of NumPy's or SciPy's with work large enough for it to start its own threads: those pools
ignore ``torch.set_num_threads``, and a pool thread that shares its core with another busy process
stalls the whole call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from dqp.linsolve.blocked import blocked_chol_solve, blocked_cholesky, diag_block_inverses

from dqp.errors import SettingsError

Tensor = torch.Tensor

__all__ = [
    "CholeskyOptions",
    "CholeskyFactor",
    "cholesky",
    "cholesky_inplace",
    "potrs_inplace",
    "mv",
    "tmv",
    "compiling",
    "lapack",
]

_MODES3 = ("auto", "always", "never")


@dataclass(frozen=True)
class CholeskyOptions:
    """How batched Cholesky factors are computed and used (every field has a measured default).

    Attributes
    ----------
    cpu_fast_paths : bool
        CPU fast paths through NumPy and SciPy's LAPACK (batched products, in-place Cholesky).
        False runs the code path that CUDA takes, on the CPU (tests).
    inverse_solve : {"auto", "always", "never"}
        Whether a batched factor carries its explicit inverse ``L⁻¹`` (one many-right-hand-side
        triangular solve per factorization; every solve is then two batched matrix-vector
        products). ``"auto"``: on CUDA while ``B·k² ≤ inverse_solve_max_work``, where cuBLAS's
        one-right-hand-side batched ``trsm`` is latency-bound. Measured on an H100, float64, µs per
        call in a CUDA graph: B=128, k=100: inverse 104 vs two solves 266; B=1024, k=100: 553 vs
        377; B=128, k=500: 2524 vs 1868.
    inverse_solve_max_work : int
        The ``B·k²`` limit of ``inverse_solve="auto"`` (and of the blocked path's "auto").
    blocked : {"auto", "always", "never"}
        Blocked factorization and solves (:mod:`dqp.linsolve.blocked`) for batched factors.
        ``"auto"``: on CUDA for ``k ≥ blocked_min_k`` and ``B·k² > inverse_solve_max_work``.
        Measured on an H100, float64, µs per factorization + two solves: B=128, k=500: library
        1813 + 2·933, blocked (nb 128) 2106 + 2·183; B=128, k=200: 324 + 2·289 vs (nb 64)
        527 + 2·67; B=1024, k=100: 422 + 2·189 vs 736 + 2·83 — hence not below k = 160.
    block_size : int, optional
        The blocked path's block size; None: 64 below k = 256, 128 from there.
    blocked_min_k : int
        Smallest k of the blocked path's "auto".
    block_diag : {"auto", "kernel", "library"}
        The blocked path's diagonal blocks: the fused source's ``dqp_chol_block`` (one thread
        block per matrix), the library's ``cholesky_ex`` and triangular inverse, or (``"auto"``)
        the kernel where it builds (CUDA, float64).
    factor_kernel : {"auto", "always", "never"}
        Batched factors on CUDA (float64, k ≤ the kernel's limit, not blocked) by ``dqp_chol_block``
        (the factor and its inverse in one launch): ``"auto"`` where the factor gets its inverse
        anyway. Measured on an H200, B=128, k=100, CUDA graph: 84 µs against 212 for
        ``cholesky_ex`` and the inverse.
    solve_kernel : {"auto", "never"}
        Batched one-vector solves on CUDA (float64, a factor without an inverse) by the fused
        source's ``dqp_chol_solve_vec`` (one launch that reads L once) instead of two
        ``solve_triangular``.
    """

    cpu_fast_paths: bool = True
    inverse_solve: str = "auto"
    inverse_solve_max_work: int = 2_000_000
    blocked: str = "auto"
    block_size: Optional[int] = None
    blocked_min_k: int = 160
    block_diag: str = "auto"
    factor_kernel: str = "auto"
    solve_kernel: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("inverse_solve", _MODES3),
            ("blocked", _MODES3),
            ("factor_kernel", _MODES3),
            ("block_diag", ("auto", "kernel", "library")),
            ("solve_kernel", ("auto", "never")),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise SettingsError(f"CholeskyOptions.{name} must be one of {allowed}, got {value!r}.")
        if self.block_size is not None and not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise SettingsError(
                f"CholeskyOptions.block_size must be a positive integer or None, got {self.block_size!r}."
            )

    def replace(self, **changes) -> "CholeskyOptions":
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    # ---- the decisions these options make
    def block_size_for(self, k: int) -> int:
        """Block size of the blocked path for a k × k factor."""
        return int(self.block_size) if self.block_size is not None else (64 if k < 256 else 128)

    def use_blocked(self, shape: Tuple[int, ...], device: torch.device) -> bool:
        """Whether a batched factorization of this shape on this device takes the blocked path."""
        if len(shape) != 3 or self.blocked == "never" or shape[-1] <= self.block_size_for(shape[-1]):
            return False
        if self.blocked == "always":
            return True
        k = shape[-1]
        return device.type == "cuda" and k >= self.blocked_min_k and shape[0] * k * k > self.inverse_solve_max_work

    def use_inverse(self, shape: Tuple[int, ...], device: torch.device) -> bool:
        """Whether a batched factor of this shape on this device gets its explicit inverse."""
        if len(shape) != 3 or self.inverse_solve == "never":
            return False
        if self.inverse_solve == "always":
            return True
        return device.type == "cuda" and shape[0] * shape[-1] ** 2 <= self.inverse_solve_max_work

    def factor_by_kernel(self, shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a batched factor is computed by the fused source's ``dqp_chol_block``."""
        if self.factor_kernel == "never" or len(shape) != 3 or device.type != "cuda" or shape[0] == 0:
            return False
        if self.factor_kernel == "auto" and not self.use_inverse(shape, device):
            return False
        if compiling():
            return False  # (torch.compile traces the library's ops, not a raw launch)
        from dqp.solvers import fused

        return fused.chol_block_available(device, dtype, shape[-1])

    def diag_factor(self, M: Tensor, nb: int) -> Optional[Callable]:
        """The ``diag_factor`` of :func:`dqp.linsolve.blocked.blocked_cholesky` (None: the library's)."""
        if self.block_diag == "library":
            return None
        from dqp.solvers import fused

        if self.block_diag == "auto" and not fused.chol_block_available(M.device, M.dtype, nb):
            return None
        return lambda W, j0, j1, info: fused.chol_block(W, j0, j1, info, tile=nb)

    def numpy_ok(self, M: Tensor, x: Tensor) -> bool:
        """Whether a batched CPU product may go through NumPy (no autograd graph is being built)."""
        return (
            self.cpu_fast_paths
            and M.dim() == 3
            and M.device.type == "cpu"
            and x.device.type == "cpu"
            and M.dtype in (torch.float64, torch.float32)
            and x.dtype == M.dtype
            and not (torch.is_grad_enabled() and (M.requires_grad or x.requires_grad))
        )


DEFAULT_OPTIONS = CholeskyOptions()


def compiling() -> bool:
    """Whether torch.compile is tracing the caller (its graphs take the library's ops only)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if fn is None:  # (torch < 2.3)
        fn = getattr(getattr(torch, "_dynamo", None), "is_compiling", lambda: False)
    return bool(fn())


# --------------------------------------------------------------------------------------------
# batched products (shared (k, n) and batched (B, k, n) matrices)
# --------------------------------------------------------------------------------------------


def mv(M: Tensor, x: Tensor, options: CholeskyOptions = DEFAULT_OPTIONS) -> Tensor:
    """``M x`` for x (B, n); M (k, n) or (B, k, n).

    Batched on the CPU through NumPy's ``einsum`` (its own loops, one thread, no BLAS): for B=128,
    k=n=100 in float64 it takes 0.4 ms where ``torch.matmul`` takes 1.4 ms (1 thread; torch's
    batched matrix-vector product is a loop of small GEMMs) and NumPy's stacked ``matmul`` 1.2 ms
    (whose BLAS threads stall when another process is busy on a core). Zero-copy views both ways.
    """
    if options.numpy_ok(M, x):
        return torch.from_numpy(np.einsum("...kn,...n->...k", M.numpy(), x.detach().numpy()))
    return torch.matmul(x.unsqueeze(-2), M.transpose(-1, -2)).squeeze(-2)


def tmv(M: Tensor, y: Tensor, options: CholeskyOptions = DEFAULT_OPTIONS) -> Tensor:
    """``Mᵀ y`` for y (B, k); M (k, n) or (B, k, n) (batched CPU: NumPy's ``einsum``, as :func:`mv`)."""
    if options.numpy_ok(M, y):
        return torch.from_numpy(np.einsum("...kn,...k->...n", M.numpy(), y.detach().numpy()))
    return torch.matmul(y.unsqueeze(-2), M).squeeze(-2)


# --------------------------------------------------------------------------------------------
# the factor
# --------------------------------------------------------------------------------------------


@dataclass
class CholeskyFactor:
    """A lower Cholesky factor ``L`` with what its solves use.

    Attributes
    ----------
    L : (k, k) or (B, k, k) tensor
        The lower factor. A factor from :func:`cholesky_inplace` keeps stale values in its strict
        upper triangle: only triangular solves (which read one triangle) may use it.
    inverse : (B, k, k) tensor, optional
        ``L⁻¹``: solves are then two batched matrix products.
    block_inverses : list of (B, nb, nb) tensors, optional
        Inverses of L's diagonal blocks (the blocked path): solves are block substitutions.
    options : CholeskyOptions
        The policies the factor was computed with (its solves follow them).
    """

    L: Tensor
    inverse: Optional[Tensor] = None
    block_inverses: Optional[List[Tensor]] = None
    options: CholeskyOptions = DEFAULT_OPTIONS

    # ---- tensor-like views of L
    def dim(self) -> int:
        return self.L.dim()

    @property
    def shape(self) -> torch.Size:
        return self.L.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.L.dtype

    @property
    def device(self) -> torch.device:
        return self.L.device

    def diagonal(self) -> Tensor:
        """The pivots, (k,) or (B, k)."""
        return torch.diagonal(self.L, dim1=-2, dim2=-1)

    # ---- structure
    def map(self, fn: Callable[[Tensor], Tensor]) -> "CholeskyFactor":
        """A factor whose every tensor is ``fn`` of this one's (``torch.clone``, an index, ...)."""
        return CholeskyFactor(
            fn(self.L),
            None if self.inverse is None else fn(self.inverse),
            None if self.block_inverses is None else [fn(t) for t in self.block_inverses],
            self.options,
        )

    def index(self, idx: Tensor) -> "CholeskyFactor":
        """The factors of the batch elements ``idx``."""
        return self.map(lambda t: t[idx])

    def expanded(self, B: int) -> "CholeskyFactor":
        """A batched (B, k, k) view of a shared factor (a batched one is returned as is)."""
        if self.L.dim() == 3:
            return self
        return CholeskyFactor(self.L.expand(B, *self.L.shape), options=self.options)

    def where(self, sel: Tensor, other: "CholeskyFactor") -> "CholeskyFactor":
        """Per batch element: ``other``'s factor where ``sel`` ((B,) bool), else this one's."""
        if (self.inverse is None) != (other.inverse is None) or (self.block_inverses is None) != (
            other.block_inverses is None
        ):
            raise ValueError("CholeskyFactor.where: the factors differ in their inverses")
        pick = lambda a, b: torch.where(sel.view(-1, *([1] * (a.dim() - 1))), b, a)  # noqa: E731
        return CholeskyFactor(
            pick(self.L, other.L),
            None if self.inverse is None else pick(self.inverse, other.inverse),
            None
            if self.block_inverses is None
            else [pick(a, b) for a, b in zip(self.block_inverses, other.block_inverses)],
            self.options,
        )

    def put(self, idx: Tensor, other: "CholeskyFactor", rows: Tensor) -> None:
        """``self[idx] = other[rows]`` in place (batched factors), keeping this factor's inverse or
        block inverses for the new rows too (taken from ``other``, or computed for those rows where
        ``other`` was factorized another way)."""
        new = other.L[rows]
        self.L[idx] = new
        if self.inverse is not None:
            if other.inverse is not None:
                self.inverse[idx] = other.inverse[rows]
            else:
                eye = torch.eye(new.shape[-1], dtype=new.dtype, device=new.device).expand(new.shape)
                self.inverse[idx] = torch.linalg.solve_triangular(new, eye, upper=False)
        if self.block_inverses is not None:
            D, Ds = self.block_inverses, other.block_inverses
            if Ds is None or [t.shape[-1] for t in D] != [t.shape[-1] for t in Ds]:
                Dn = diag_block_inverses(new, D[0].shape[-1])
            else:
                Dn = [t[rows] for t in Ds]
            for t, tn in zip(D, Dn):
                t[idx] = tn

    def tensors(self) -> Dict[str, Tensor]:
        """The factor's tensors by name (``L``, ``inverse``, ``block_inverses[i]``): see :meth:`from_tensors`."""
        out = {"L": self.L}
        if self.inverse is not None:
            out["inverse"] = self.inverse
        for i, t in enumerate(self.block_inverses or ()):
            out[f"block_inverses[{i}]"] = t
        return out

    @classmethod
    def from_tensors(cls, tensors: Dict[str, Tensor], options: CholeskyOptions = DEFAULT_OPTIONS) -> "CholeskyFactor":
        """Inverse of :meth:`tensors`."""
        nblk = sum(1 for k in tensors if k.startswith("block_inverses["))
        return cls(
            tensors["L"],
            tensors.get("inverse"),
            [tensors[f"block_inverses[{i}]"] for i in range(nblk)] if nblk else None,
            options,
        )

    # ---- solves
    def solve(self, r: Tensor) -> Tensor:
        """Solve ``L Lᵀ x = r``; r (B, k) or (B, k, j).

        Two ``solve_triangular`` calls: on CPU this is ~10× faster than ``torch.cholesky_solve``,
        which copies its operands to column-major layout on every call. With the inverse: two
        batched products; with block inverses: block substitution.
        """
        L = self.L
        vec = r.dim() == 2
        if self.block_inverses is not None:
            return blocked_chol_solve(L, self.block_inverses, r)
        if self.inverse is not None:
            Li = self.inverse
            rr = r.unsqueeze(-1) if vec else r
            x = torch.matmul(Li.mT, torch.matmul(Li, rr))
            return x.squeeze(-1) if vec else x
        if L.dim() == 2 and vec:
            x = torch.linalg.solve_triangular(L, r.T, upper=False)
            return torch.linalg.solve_triangular(L.mT, x, upper=True).T
        if vec and self._solve_by_kernel(r):
            from dqp.solvers import fused

            return fused.chol_solve_vec(L, r)
        rr = r.unsqueeze(-1) if vec else r
        if L.dim() == 2:
            L = L.expand(rr.shape[0], *L.shape)
        x = torch.linalg.solve_triangular(L, rr, upper=False)
        x = torch.linalg.solve_triangular(L.mT, x, upper=True)
        return x.squeeze(-1) if vec else x

    def _solve_by_kernel(self, r: Tensor) -> bool:
        L = self.L
        if (
            self.options.solve_kernel == "never"
            or L.device.type != "cuda"
            or L.dim() != 3
            or r.dim() != 2
            or r.dtype != L.dtype
        ):
            return False
        if torch.is_grad_enabled() and (L.requires_grad or r.requires_grad):
            return False  # (the kernel has no autograd formula: the library's solves)
        if compiling():
            return False  # (torch.compile traces the library's ops, not a raw launch)
        from dqp.solvers import fused

        if r.shape[0] != L.shape[0] or fused.matrix_layout(L) is None:
            return False
        return fused.chol_solve_vec_available(L.device, L.dtype, L.shape[-1])


def _with_inverse(L: Tensor, options: CholeskyOptions) -> CholeskyFactor:
    """The factor of L, with ``L⁻¹`` where the options say so."""
    inv = None
    if options.use_inverse(tuple(L.shape), L.device):
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand(L.shape)
        inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return CholeskyFactor(L, inverse=inv, options=options)


def cholesky(
    M: Tensor, options: CholeskyOptions = DEFAULT_OPTIONS, overwrite: bool = False
) -> Tuple[CholeskyFactor, Tensor]:
    """Batched Cholesky ``M = L Lᵀ`` without the host sync of ``torch.linalg.cholesky``; ``(factor, info)``.

    ``overwrite``: M is a scratch buffer the factorization may overwrite (the blocked path then
    works in it instead of a copy).

    On CPU, factorizing ``Mᵀ`` (= M, column-major view) as upper ``U`` lets LAPACK work without a
    layout copy: about 2× faster than ``cholesky_ex(M)``; ``L = Uᵀ`` is a view. On CUDA the lower
    factor is computed directly, by the blocked path or the fused source's kernel where the
    options say so.
    """
    if options.use_blocked(tuple(M.shape), M.device):
        nb = options.block_size_for(M.shape[-1])
        L, dinv, info = blocked_cholesky(
            M, nb, overwrite=overwrite and M.is_contiguous(), diag_factor=options.diag_factor(M, nb)
        )
        return CholeskyFactor(L, block_inverses=dinv, options=options), info
    if M.device.type != "cpu":
        if options.factor_by_kernel(tuple(M.shape), M.device, M.dtype):
            # factor and inverse in one launch (dqp_chol_block, a thread block per matrix)
            from dqp.solvers import fused

            L = M.clone(memory_format=torch.contiguous_format)
            info = torch.zeros(M.shape[0], dtype=torch.int32, device=M.device)
            inv = fused.chol_block(L, 0, M.shape[-1], info)
            return CholeskyFactor(L, inverse=inv, options=options), info
        # on CUDA the transpose trick costs two layout conversions and a triu kernel
        L, info = torch.linalg.cholesky_ex(M)
        return _with_inverse(L, options), info
    potrf = _cpu_potrf(M, options)
    if potrf is not None:
        L = M.detach() if overwrite and M.is_contiguous() else M.detach().clone(memory_format=torch.contiguous_format)
        info = _potrf_batch(potrf, L, clean=True)
        return _with_inverse(L, options), info
    U, info = torch.linalg.cholesky_ex(M.mT, upper=True)
    return _with_inverse(U.mT, options), info


def _cpu_potrf(M: Tensor, options: CholeskyOptions):
    """SciPy's LAPACK ``potrf`` for a batched CPU ``M`` that no autograd graph follows, else None.

    ``torch.linalg.cholesky_ex`` on a batch enters torch's thread pool even for one 10×10 matrix:
    with two threads and another process busy on one core it took 1.2 ms instead of 9 µs (the
    pool waits for the thread that shares the busy core). ``potrf`` per matrix starts no threads.
    """
    if not (options.cpu_fast_paths and M.device.type == "cpu" and M.dim() == 3):
        return None
    if torch.is_grad_enabled() and M.requires_grad:
        return None
    return lapack(M.dtype, "potrf")


def _potrf_batch(potrf, S: Tensor, clean: bool, rows: Optional[list] = None) -> Tensor:
    """``potrf`` on each (symmetric, contiguous) ``S[i]`` in place (those of ``rows``); the info codes.

    S[i] is symmetric, so its row-major buffer is also its column-major buffer; the upper factor U
    of the column-major view is the lower factor L = Uᵀ of the row-major one, which keeps L
    row-major (torch's triangular solves are 2.5× slower on a column-major L). ``clean`` zeroes the
    other triangle.
    """
    Sn = S.numpy()
    info = [0] * S.shape[0]
    for i in range(S.shape[0]) if rows is None else rows:
        _, info[i] = potrf(Sn[i].T, lower=0, clean=int(clean), overwrite_a=1)
    return torch.tensor(info, dtype=torch.int32)


def lapack(dtype: torch.dtype, name: str):
    """SciPy's LAPACK routine ``d<name>`` / ``s<name>`` for float64 / float32, else None."""
    prefix = {torch.float64: "d", torch.float32: "s"}.get(dtype)
    if prefix is None:
        return None
    from scipy.linalg import lapack as _lp

    return getattr(_lp, prefix + name)


def cholesky_inplace(
    S: Tensor, options: CholeskyOptions = DEFAULT_OPTIONS, rows: Optional[list] = None
) -> Tuple[CholeskyFactor, Tensor]:
    """Factorize the symmetric batch ``S`` (B, k, k), contiguous, *in place*; ``(factor, info)``.

    ``rows``: factorize only these batch elements (the others keep S and report info 0; the IPM
    passes its unfinished instances, whose directions alone are used).

    The factor's ``L`` is S itself, whose **lower triangle only** holds the factor (the strict
    upper triangle keeps stale values): use it only through solves (which read one triangle). On
    CPU this calls LAPACK ``potrf`` per matrix on the buffer itself: no allocation, no layout copy
    and no ``triu`` pass, which ``torch.linalg.cholesky_ex`` spends more time on than on the
    factorization (measured, B=128, k=100, float64, 1 thread: 5.1 ms vs 8.2 ms). A NaN in S may
    pass LAPACK's check; the IPM rejects the non-finite direction it gives. Elsewhere (CUDA, half
    precision, a non-contiguous S, ``cpu_fast_paths`` off) it falls back to :func:`cholesky`.
    """
    potrf = _cpu_potrf(S, options) if S.is_contiguous() else None
    if potrf is None:
        return cholesky(S, options, overwrite=True)
    return CholeskyFactor(S, options=options), _potrf_batch(potrf, S.detach(), clean=False, rows=rows)


def potrs_inplace(S: Tensor, r: Tensor, rows: Optional[list] = None) -> Tensor:
    """Solve with the factor that :func:`cholesky_inplace` left in ``S``: ``(L Lᵀ)⁻¹ r`` for r (B, k).

    One LAPACK ``potrs`` per matrix, so both triangular sweeps run while that matrix is in cache:
    one pass over the (B, k, k) factor instead of two. ``rows``: only these elements (the others
    return r unchanged).
    """
    potrs = lapack(S.dtype, "potrs")
    x = r.detach().clone(memory_format=torch.contiguous_format)
    Sn, xn = S.detach().numpy(), x.numpy()
    for i in range(S.shape[0]) if rows is None else rows:
        potrs(Sn[i].T, xn[i][:, None], lower=0, overwrite_b=1)
    return x
