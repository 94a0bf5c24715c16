"""Built-in batched primal-dual interior-point method (pure torch, any device).

Solves a batch of convex QPs

    min ½ zᵀPz + qᵀz   s.t.   Cz ≤ d  (duals μ ≥ 0),   Az = b  (duals λ)

with Mehrotra's predictor-corrector on the slack form ``Cz + s = d, s ≥ 0``. The same code runs
on CPU and CUDA, in float32 and float64, for a whole batch at once.

Linear algebra (DESIGN-NOTES §6), Cholesky only (batched LU hangs on some MKL builds). The
Newton system, after eliminating the slack step ``Δs = −r_in − CΔz``, reads

    [[P, Aᵀ, Cᵀ], [A, 0, 0], [C, 0, −W⁻¹]] [Δz; Δλ; Δμ] = [a; b; c],     W = diag(μ/s).

Two eliminations of it are implemented; the solver picks one per call (``form="auto"``):

* ``"primal"``: ``H = P + CᵀWC + δI`` (n×n Cholesky every iteration), equalities through the
  Schur complement ``A H⁻¹ Aᵀ + δ_d I`` (p×p Cholesky). Works for PSD ``P`` (LPs included), for
  ``m > n`` and for dependent rows (the small δ's make the systems quasi-definite; the IPM
  computes its residuals from the unregularized data, so δ only perturbs the direction).
* ``"dual"``: when ``P`` is positive definite and well conditioned, eliminate ``Δz`` instead:
  ``S = Ā P⁻¹ Āᵀ + diag(0, W⁻¹) + δ_d I`` with ``Ā = [A; C]``. ``Ā P⁻¹ Āᵀ`` is formed once
  (once for the whole batch when P, A and C are shared), so an iteration costs one
  (p+m)×(p+m) Cholesky. Chosen when its estimated cost is lower (``m + p`` not much larger than n).

Per-instance logic without host synchronization inside the loop: every instance carries its own
``done`` flag, step lengths of finished instances are zero (``torch.where``, so a NaN in a
finished or failing instance never leaks), a failed Cholesky (``cholesky_ex`` info) raises that
instance's regularization for the next iteration, and the convergence check (residual norms,
certificates, statuses) runs after every ``check_every``-th step and after the last one, where the
host reads ``done.all()`` (every step on CPU, where that costs nothing). On CUDA ``check_every``
steps and the check are one captured CUDA graph.

Stopping rule (scaled, relative, dtype dependent; ``eps`` defaults to 1e-9 in float64 and 1e-5 in
float32), for every instance:

    ‖Az − b‖∞, ‖Cz + s − d‖∞ ≤ eps·(1 + max(‖Az‖∞, ‖b‖∞, ‖Cz‖∞, ‖d‖∞, ‖s‖∞))
    ‖Pz + q + Aᵀλ + Cᵀμ‖∞   ≤ eps·(1 + max(‖Pz‖∞, ‖q‖∞, ‖Aᵀλ‖∞, ‖Cᵀμ‖∞))
    sᵀμ                       ≤ eps·(1 + |zᵀPz| + |qᵀz|)

Infeasibility (no homogeneous embedding): the iterates of an infeasible instance diverge along a
certificate, which is checked on the normalized iterates and on the last step, for instances whose
residual is *not* small:

* primal infeasible: ‖Aᵀλ̂ + Cᵀμ̂‖∞ ≤ ε_inf·scale and bᵀλ̂ + dᵀμ̂ < −ε_inf (μ̂ ≥ 0);
* dual infeasible:  ‖Px̂‖∞, ‖Ax̂‖∞, max(Cx̂) ≤ ε_inf·scale and qᵀx̂ < −ε_inf·‖q‖∞.

A certificate must hold at two iterations before the instance is flagged; the primal one is also
accepted in the weaker form "no feasible point within ‖z‖∞ ≤ −v/‖r‖₁, a ball 1000× larger than
the iterates", because the duals of an infeasible instance grow so fast (1e11 and more) that the
normalized residual ‖r‖ only reaches ~1e-6.
Statuses are :class:`dqp.errors.Status` values; a non-SOLVED status is never silent (the
layer raises or masks on it).
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dqp.errors import LayoutError, SettingsError, ShapeError, Status
from dqp.linsolve.blocked import _tri_inverse, blocked_chol_solve, blocked_cholesky
from dqp.solvers import fused as _fused
from dqp.solvers.base import ForwardSolver, register_solver

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["IPMResult", "ipm_solve", "IPMSolver", "default_eps", "clear_graph_cache", "INVERSE_SOLVE"]


@dataclass
class IPMResult:
    """Solution of a batch of QPs by :func:`ipm_solve`.

    Attributes
    ----------
    z : (B, n) primal solution.
    lam : (B, p) equality duals, or ``None`` without equalities.
    mu : (B, m) inequality duals (≥ 0), or ``None`` without inequalities.
    s : (B, m) slacks ``d − Cz`` as maintained by the IPM (> 0); ``(B, 0)`` without inequalities.
    status : (B,) int64, :class:`dqp.errors.Status` values.
    iterations : (B,) int64, iterations each instance ran.
    form : which elimination ran (``"primal"`` or ``"dual"``).
    factors : for the dual form, ``L`` (Cholesky factor of P), ``PiAbt`` = P⁻¹[A; C]ᵀ and
        ``M`` = [A; C] P⁻¹ [A; C]ᵀ in the caller's scaling, for reuse by
        :class:`dqp.linsolve.torch_batched.BatchedKKT` (the polish and the backward).
    polish : when the fused kernel ran with ``polish_rounds > 0``: ``active`` (B, m) bool,
        ``polished`` (B,) bool (``z, lam, mu`` are then the polished point; ``s`` stays the IPM's
        slack), ``fallback`` (B,) bool (a round's reduced system failed the pivot test: the
        kernel left the IPM point, the caller polishes that element), ``ok`` (B,) bool (the first round's
        factorization passed) and ``LS`` (B, k, k), the lower Cholesky factor of the reduced
        system's Schur complement ``S = Ā_J P⁻¹ Ā_Jᵀ + diag(0, 1 − a)`` as BatchedKKT keeps it.
        Otherwise None.
    """

    z: Tensor
    lam: Optional[Tensor]
    mu: Optional[Tensor]
    s: Tensor
    status: Tensor
    iterations: Tensor
    form: str = "primal"
    factors: Optional[Dict[str, Tensor]] = None
    polish: Optional[Dict[str, Tensor]] = None


def default_eps(dtype: torch.dtype) -> float:
    """Default relative stopping tolerance for ``dtype`` (1e-9 float64, 1e-5 float32/half)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# small batched helpers (work for shared (k, n) and batched (B, k, n) matrices)
# --------------------------------------------------------------------------------------------

#: CPU fast paths through NumPy and SciPy's LAPACK (batched products, in-place Cholesky). Tests
#: switch them off to run the code path that CUDA takes on the CPU.
CPU_FAST_PATHS = True


def _numpy_ok(M: Tensor, x: Tensor) -> bool:
    """Whether a batched CPU product may go through NumPy (no autograd graph is being built)."""
    return (CPU_FAST_PATHS and M.dim() == 3 and M.device.type == "cpu" and x.device.type == "cpu"
            and M.dtype in (torch.float64, torch.float32) and x.dtype == M.dtype
            and not (torch.is_grad_enabled() and (M.requires_grad or x.requires_grad)))


def _mv(M: Tensor, x: Tensor) -> Tensor:
    """``M x`` for x (B, n); M (k, n) or (B, k, n).

    Batched on the CPU through NumPy's stacked ``matmul``: for B=128, k=n=100 in float64 it takes
    0.15 ms where ``torch.matmul`` takes 0.86 ms (1 thread; torch's batched matrix-vector
    product is a loop of small GEMMs). Zero-copy views both ways.
    """
    if _numpy_ok(M, x):
        return torch.from_numpy(np.matmul(M.numpy(), x.detach().numpy()[..., None])[..., 0])
    return torch.matmul(x.unsqueeze(-2), M.transpose(-1, -2)).squeeze(-2)


def _tmv(M: Tensor, y: Tensor) -> Tensor:
    """``Mᵀ y`` for y (B, k); M (k, n) or (B, k, n) (batched CPU: NumPy, as :func:`_mv`)."""
    if _numpy_ok(M, y):
        return torch.from_numpy(np.matmul(y.detach().numpy()[..., None, :], M.numpy())[..., 0, :])
    return torch.matmul(y.unsqueeze(-2), M).squeeze(-2)


def _amax(x: Tensor) -> Tensor:
    """Row-wise ∞-norm, 0 for empty rows."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    return torch.linalg.vector_norm(x, math.inf, dim=-1)     # one kernel (abs + amax: two); NaN propagates


def _eye_like(k: int, ref: Tensor) -> Tensor:
    return torch.eye(k, dtype=ref.dtype, device=ref.device)


#: How solves with a batched Cholesky factor from :func:`_cholesky` run: ``"never"`` — two
#: one-right-hand-side triangular solves each; ``"always"`` — the factor carries its explicit
#: inverse ``L⁻¹`` (one many-right-hand-side triangular solve per factorization) and every solve
#: is two batched matrix-vector products; ``"auto"`` (default) — the inverse on CUDA for small
#: batches, where cuBLAS's one-right-hand-side batched ``trsm`` is latency-bound. Measured on an
#: H100, float64, µs per call in a CUDA graph (experiments/gpu_kernels.py): B=128, k=100: inverse
#: 104 vs two solves 266 (an IPM iteration solves twice); B=1024, k=100: 553 vs 377; B=128, k=500:
#: 2524 vs 1868 — hence the inverse only while ``B·k² ≤ INVERSE_SOLVE_MAX_WORK`` (and where the
#: blocked path below is not taken).
INVERSE_SOLVE = "auto"
INVERSE_SOLVE_MAX_WORK = 2_000_000

#: Blocked Cholesky factorization and solves (:mod:`dqp.linsolve.blocked`) for batched factors:
#: ``"never"``, ``"always"`` (any batched factor larger than its block) or ``"auto"`` (default: on
#: CUDA for batched factors with ``k ≥ BLOCKED_MIN_K`` and too much work for the explicit inverse,
#: ``B·k² > INVERSE_SOLVE_MAX_WORK``). ``BLOCK_SIZE``: the block size, or None for 64 below k = 256
#: and 128 from there. Measured on an H100, float64, µs per factorization + two solves (an IPM
#: iteration), CUDA graph (experiments/results/gpu_blocked.md): B=128, k=500: library 1813 + 2·933,
#: blocked (nb 128) 2106 + 2·183; B=128, k=200: 324 + 2·289 vs (nb 64) 527 + 2·67; B=1024, k=100:
#: 422 + 2·189 vs 736 + 2·83 — hence not below k = 160.
BLOCKED = "auto"
BLOCK_SIZE: Optional[int] = None
BLOCKED_MIN_K = 160


#: The blocked path's diagonal blocks: ``"kernel"`` (factorized and inverted in shared memory by
#: :func:`dqp.solvers.fused.chol_block`, one thread block per matrix, one launch per block),
#: ``"library"`` (``torch.linalg.cholesky_ex`` and a triangular inverse, ~10 launches per block) or
#: ``"auto"`` (default: the kernel where it builds, CUDA and float64).
BLOCK_DIAG = "auto"


def _block_diag_factor(M: Tensor, nb: int):
    """The ``diag_factor`` of :func:`dqp.linsolve.blocked.blocked_cholesky` for M (None: the library's)."""
    if BLOCK_DIAG not in ("auto", "kernel", "library"):
        raise SettingsError(f"dqp.solvers.ipm.BLOCK_DIAG must be 'auto', 'kernel' or 'library', got {BLOCK_DIAG!r}.")
    if BLOCK_DIAG == "library":
        return None
    from dqp.solvers import fused
    if BLOCK_DIAG == "auto" and not fused.chol_block_available(M.device, M.dtype, nb):
        return None
    return lambda W, j0, j1, info: fused.chol_block(W, j0, j1, info, tile=nb)


def _block_size(k: int) -> int:
    """Block size of the blocked path for a k × k factor."""
    if BLOCK_SIZE is not None:
        return int(BLOCK_SIZE)
    return 64 if k < 256 else 128


def _use_blocked(shape: Tuple[int, ...], device: torch.device) -> bool:
    """Whether a batched factorization of this shape on this device takes the blocked path."""
    if len(shape) != 3 or BLOCKED == "never" or shape[-1] <= _block_size(shape[-1]):
        return False
    if BLOCKED == "always":
        return True
    if BLOCKED != "auto":
        raise SettingsError(f"dqp.solvers.ipm.BLOCKED must be 'auto', 'always' or 'never', got {BLOCKED!r}.")
    k = shape[-1]
    return device.type == "cuda" and k >= BLOCKED_MIN_K and shape[0] * k * k > INVERSE_SOLVE_MAX_WORK


#: Batched Cholesky factors on CUDA (float64, k ≤ :data:`dqp.solvers.fused.KMAX`, not blocked) by
#: the fused source's ``dqp_chol_block`` (:func:`dqp.solvers.fused.chol_block`: the factor and its
#: inverse in one launch, one thread block per matrix) instead of ``cholesky_ex`` (+ the triangular
#: inverse): ``"auto"`` (default) where the factor gets its inverse anyway (:func:`_use_inverse`),
#: ``"always"`` wherever the kernel runs, ``"never"``. Measured on an H200, B=128, k=100, CUDA graph
#: (results/gpu_blocked_session9b.md): 84 µs against 212 for ``cholesky_ex`` and the inverse.
FACTOR_KERNEL = "auto"


def _compiling() -> bool:
    """Whether torch.compile is tracing the caller (its graphs take the library's ops only)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if fn is None:                                       # (torch < 2.3)
        fn = getattr(getattr(torch, "_dynamo", None), "is_compiling", lambda: False)
    return bool(fn())


def _factor_by_kernel(shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> bool:
    if FACTOR_KERNEL not in ("auto", "always", "never"):
        raise SettingsError(f"dqp.solvers.ipm.FACTOR_KERNEL must be 'auto', 'always' or 'never', "
                            f"got {FACTOR_KERNEL!r}.")
    if FACTOR_KERNEL == "never" or len(shape) != 3 or device.type != "cuda" or shape[0] == 0:
        return False
    if FACTOR_KERNEL == "auto" and not _use_inverse(shape, device):
        return False
    if _compiling():
        return False                       # (torch.compile traces the library's ops, not a raw launch)
    return _fused.chol_block_available(device, dtype, shape[-1])


def _policy_key() -> tuple:
    """The module-level linear-algebra policies that captured code reads (part of graph cache keys)."""
    from dqp.linsolve import blocked
    return (INVERSE_SOLVE, INVERSE_SOLVE_MAX_WORK, BLOCKED, BLOCK_SIZE, BLOCKED_MIN_K, blocked.TRI_INVERSE_LEAF,
            SPLIT_GRAPHS, SETUP_PRODUCTS, BLOCK_DIAG, FACTOR_KERNEL, SOLVE_KERNEL)


def _use_inverse(shape: Tuple[int, ...], device: torch.device) -> bool:
    """Whether a batched factor of this shape on this device gets its explicit inverse."""
    if len(shape) != 3 or INVERSE_SOLVE == "never":
        return False
    if INVERSE_SOLVE == "always":
        return True
    if INVERSE_SOLVE != "auto":
        raise SettingsError(f"dqp.solvers.ipm.INVERSE_SOLVE must be 'auto', 'always' or 'never', "
                            f"got {INVERSE_SOLVE!r}.")
    return device.type == "cuda" and shape[0] * shape[-1] ** 2 <= INVERSE_SOLVE_MAX_WORK


def _attach_inverse(L: Tensor) -> Tensor:
    """Attach ``L⁻¹`` to the batched lower factor L (as ``L._dqp_linv``) where
    :func:`_use_inverse` says so; returns L."""
    if _use_inverse(tuple(L.shape), L.device):
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand(L.shape)
        L._dqp_linv = torch.linalg.solve_triangular(L, eye, upper=False)
    return L


def _chol_solve(L: Tensor, r: Tensor) -> Tensor:
    """Solve ``L Lᵀ x = r`` with a (batched or shared) Cholesky factor; r (B, k) or (B, k, j).

    Two ``solve_triangular`` calls: on CPU this is ~10× faster than ``torch.cholesky_solve``,
    which copies its operands to column-major layout on every call. With an attached inverse
    (:func:`_attach_inverse`): two batched products; with attached diagonal-block inverses (a
    factor from the blocked path): block substitution (:func:`dqp.linsolve.blocked.blocked_chol_solve`).
    """
    vec = r.dim() == 2
    dinv = getattr(L, "_dqp_dinv", None)
    if dinv is not None:
        return blocked_chol_solve(L, dinv, r)
    Li = getattr(L, "_dqp_linv", None)
    if Li is not None:
        rr = r.unsqueeze(-1) if vec else r
        x = torch.matmul(Li.mT, torch.matmul(Li, rr))
        return x.squeeze(-1) if vec else x
    if L.dim() == 2 and vec:
        x = torch.linalg.solve_triangular(L, r.T, upper=False)
        return torch.linalg.solve_triangular(L.mT, x, upper=True).T
    if vec and _solve_by_kernel(L, r):
        return _fused.chol_solve_vec(L, r)
    rr = r.unsqueeze(-1) if vec else r
    if L.dim() == 2:
        L = L.expand(rr.shape[0], *L.shape)
    x = torch.linalg.solve_triangular(L, rr, upper=False)
    x = torch.linalg.solve_triangular(L.mT, x, upper=True)
    return x.squeeze(-1) if vec else x


def _cholesky(M: Tensor, overwrite: bool = False) -> Tuple[Tensor, Tensor]:
    """Batched Cholesky ``M = L Lᵀ`` without the host sync of ``torch.linalg.cholesky``.

    ``overwrite``: M is a scratch buffer the factorization may overwrite (the blocked path then
    works in it instead of a copy).

    On CPU, factorizing ``Mᵀ`` (= M, column-major view) as upper ``U`` lets LAPACK work without a
    layout copy: about 2× faster than ``cholesky_ex(M)``; ``L = Uᵀ`` is a view. On CUDA the lower
    factor is computed directly, by the blocked path where :func:`_use_blocked` says so (the
    factor then carries its diagonal-block inverses for :func:`_chol_solve`).
    """
    if _use_blocked(tuple(M.shape), M.device):
        nb = _block_size(M.shape[-1])
        L, dinv, info = blocked_cholesky(M, nb, overwrite=overwrite and M.is_contiguous(),
                                         diag_factor=_block_diag_factor(M, nb))
        L._dqp_dinv = dinv
        return L, info
    if M.device.type != "cpu":
        if _factor_by_kernel(tuple(M.shape), M.device, M.dtype):
            # factor and inverse in one launch (dqp_chol_block, a thread block per matrix)
            L = M.clone(memory_format=torch.contiguous_format)
            info = torch.zeros(M.shape[0], dtype=torch.int32, device=M.device)
            L._dqp_linv = _fused.chol_block(L, 0, M.shape[-1], info)
            return L, info
        # on CUDA the transpose trick costs two layout conversions and a triu kernel
        L, info = torch.linalg.cholesky_ex(M)
        return _attach_inverse(L), info
    U, info = torch.linalg.cholesky_ex(M.mT, upper=True)
    return _attach_inverse(U.mT), info


#: Batched solves ``(L Lᵀ)⁻¹ r`` with one vector per factor on CUDA (float64, k ≤
#: :data:`dqp.solvers.fused.KMAX`, a factor without an attached inverse) by the fused source's
#: ``dqp_chol_solve_vec`` (:func:`dqp.solvers.fused.chol_solve_vec`: one launch that reads L once)
#: instead of two ``solve_triangular``: ``"auto"`` (default) wherever the kernel runs, ``"never"``.
SOLVE_KERNEL = "auto"


def _solve_by_kernel(L: Tensor, r: Tensor) -> bool:
    if SOLVE_KERNEL not in ("auto", "never"):
        raise SettingsError(f"dqp.solvers.ipm.SOLVE_KERNEL must be 'auto' or 'never', got {SOLVE_KERNEL!r}.")
    if SOLVE_KERNEL == "never" or L.device.type != "cuda" or L.dim() != 3 or r.dim() != 2 or r.dtype != L.dtype:
        return False
    if torch.is_grad_enabled() and (L.requires_grad or r.requires_grad):
        return False                       # (the kernel has no autograd formula: the library's solves)
    if _compiling():
        return False                       # (torch.compile traces the library's ops, not a raw launch)
    if r.shape[0] != L.shape[0] or _fused._layout(L) is None:
        return False
    return _fused.chol_solve_vec_available(L.device, L.dtype, L.shape[-1])


#: What a factor from :func:`_cholesky` may carry for :func:`_chol_solve`: its explicit inverse
#: (a tensor) or the inverses of its diagonal blocks (a list of tensors).
_ATTACHED = ("_dqp_linv", "_dqp_dinv")


def _map_attached(L: Tensor, out: Tensor, fn) -> Tensor:
    """Give ``out`` the attachments of ``L``, each tensor of them mapped by ``fn``; returns out."""
    for a in _ATTACHED:
        att = getattr(L, a, None)
        if att is not None:
            setattr(out, a, fn(att) if isinstance(att, Tensor) else [fn(t) for t in att])
    return out


def _index_factor(L: Tensor, idx: Tensor) -> Tensor:
    """``L[idx]`` for a batched matrix, keeping an attached inverse or diagonal-block inverses."""
    return _map_attached(L, L[idx], lambda t: t[idx])


def _cholesky_inplace(S: Tensor, rows: Optional[list] = None) -> Tuple[Tensor, Tensor]:
    """Factorize the symmetric batch ``S`` (B, k, k), contiguous, *in place*; ``(L, info)``.

    ``rows``: factorize only these batch elements (the others keep S and report info 0; the IPM
    passes its unfinished instances, whose directions alone are used).

    ``L`` is a view of ``S`` whose **lower triangle only** holds the factor (the strict upper
    triangle keeps stale values): use it only through :func:`_chol_solve` (triangular solves read
    one triangle). On CPU this calls LAPACK ``potrf`` per matrix on the buffer itself: no
    allocation, no layout copy and no ``triu`` pass, which ``torch.linalg.cholesky_ex`` spends
    more time on than on the factorization (measured, B=128, k=100, float64, 1 thread: 5.1 ms vs
    8.2 ms, and an iteration reuses one buffer instead of allocating 10 MB twice). A NaN in S may
    pass LAPACK's check; the IPM rejects the non-finite direction it gives. Elsewhere (CUDA, half
    precision, a non-contiguous S) it falls back to :func:`_cholesky`.
    """
    potrf = _lapack_potrf(S)
    if potrf is None:
        return _cholesky(S, overwrite=True)
    Sn = S.detach().numpy()
    info = [0] * S.shape[0]
    for i in (range(S.shape[0]) if rows is None else rows):
        # S[i] is symmetric, so its row-major buffer is also its column-major buffer; the upper
        # factor U of the column-major view is the lower factor L = Uᵀ of the row-major one, which
        # keeps L row-major (torch's triangular solves are 2.5× slower on a column-major L)
        _, info[i] = potrf(Sn[i].T, lower=0, clean=0, overwrite_a=1)
    return S, torch.tensor(info, dtype=torch.int32)


def _lapack_potrf(S: Tensor):
    """SciPy's LAPACK ``?potrf`` for S's dtype when S can be factorized in place on the CPU."""
    if not CPU_FAST_PATHS or S.device.type != "cpu" or S.dim() != 3 or not S.is_contiguous():
        return None
    return _lapack(S.dtype, "potrf")


def _lapack(dtype: torch.dtype, name: str):
    """SciPy's LAPACK routine ``d<name>`` / ``s<name>`` for float64 / float32, else None."""
    prefix = {torch.float64: "d", torch.float32: "s"}.get(dtype)
    if prefix is None:
        return None
    from scipy.linalg import lapack
    return getattr(lapack, prefix + name)


def _potrs_inplace(S: Tensor, r: Tensor, rows: Optional[list] = None) -> Tensor:
    """Solve with the factor that :func:`_cholesky_inplace` left in ``S``: ``(L Lᵀ)⁻¹ r`` for r (B, k).

    One LAPACK ``potrs`` per matrix, so both triangular sweeps run while that matrix is in cache:
    one pass over the (B, k, k) factor instead of two (the batch does not fit in cache; on the
    2-core CI machine a pass over B=128, k=100 float64 costs ~1 ms). ``rows``: only these
    elements (the others return r unchanged).
    """
    potrs = _lapack(S.dtype, "potrs")
    x = r.detach().clone(memory_format=torch.contiguous_format)
    Sn, xn = S.detach().numpy(), x.numpy()
    for i in (range(S.shape[0]) if rows is None else rows):
        potrs(Sn[i].T, xn[i][:, None], lower=0, overwrite_b=1)
    return x


def _lapack_potrs_rows_ok(L: Tensor, R: Tensor) -> bool:
    """Whether :func:`_potrs_rows` applies: CPU fast paths, a batched row-major factor (lower
    triangle) and right-hand sides of its dtype, nothing that needs a gradient."""
    return (CPU_FAST_PATHS and L.device.type == "cpu" and R.device.type == "cpu" and L.dim() == 3
            and L.is_contiguous() and L.dtype in (torch.float64, torch.float32) and R.dtype == L.dtype
            and not (torch.is_grad_enabled() and (L.requires_grad or R.requires_grad)))


def _potrs_rows(L: Tensor, R: Tensor) -> Tensor:
    """``R (L Lᵀ)⁻¹`` for the rows of R (B, k, n), i.e. ``((L Lᵀ)⁻¹ Rᵀ)ᵀ``, with one LAPACK ``potrs`` per
    matrix (CPU; L as left by :func:`_cholesky` or :func:`_cholesky_inplace`, row-major, lower
    triangle read). The rows of a row-major R are the columns of its column-major transpose, so
    LAPACK solves in place in a copy of R: no layout conversion. Measured (B=128, n=k=100, float64,
    2 threads): 17 ms against 33 ms for two batched ``solve_triangular`` calls with k right-hand
    sides (the dual form's P⁻¹Cᵀ)."""
    potrs = _lapack(L.dtype, "potrs")
    X = R.detach().clone(memory_format=torch.contiguous_format)
    Ln, Xn = L.detach().numpy(), X.numpy()
    for i in range(X.shape[0]):
        potrs(Ln[i].T, Xn[i].T, lower=0, overwrite_b=1)
    return X


def _max_step(v: Tensor, dv: Tensor, cap: float = 1e30) -> Tensor:
    """Largest α ≥ 0 with v + α dv ≥ 0 (v > 0), per row, capped at ``cap``."""
    if v.shape[-1] == 0:
        return v.new_full(v.shape[:-1], cap)
    # min over dv_i < 0 of v_i/(−dv_i) = −1/min_i(dv_i/v_i): 5 kernels, 3 of them on (B,)
    return (dv / v).amin(-1).clamp(max=-1.0 / cap).reciprocal().neg()


# --------------------------------------------------------------------------------------------
# input normalization
# --------------------------------------------------------------------------------------------

def _prepare(P, q, C, d, A, b):
    """Check shapes, find the batch size, drop 0-row constraints. Returns tensors + (B, n, m, p)."""
    if not isinstance(P, Tensor) or not isinstance(q, Tensor):
        raise LayoutError("ipm_solve: P and q must be torch tensors "
                          f"(got {type(P).__name__}, {type(q).__name__}).")
    dtype, device = P.dtype, P.device
    if not dtype.is_floating_point:
        raise LayoutError(f"ipm_solve: P must be a floating tensor (got dtype {dtype}); "
                          "convert with P.double() or P.float().")
    for name, t in (("q", q), ("C", C), ("d", d), ("A", A), ("b", b)):
        if t is not None and (t.dtype != dtype or t.device != device):
            raise LayoutError(f"ipm_solve: {name} has dtype {t.dtype} on {t.device}, but P has dtype "
                              f"{dtype} on {device}; pass all data with one dtype on one device.")
    if q.dim() not in (1, 2):
        raise ShapeError(f"ipm_solve: q must be (n,) or (B, n), got shape {tuple(q.shape)}.")
    n = q.shape[-1]
    if P.dim() not in (2, 3) or P.shape[-2:] != (n, n):
        raise ShapeError(f"ipm_solve: P must be ({n}, {n}) or (B, {n}, {n}) to match q, got {tuple(P.shape)}.")
    if (C is None) != (d is None):
        raise ShapeError("ipm_solve: give both C and d, or neither.")
    if (A is None) != (b is None):
        raise ShapeError("ipm_solve: give both A and b, or neither.")

    batch = set()
    for name, t, nd in (("P", P, 3), ("q", q, 2), ("C", C, 3), ("d", d, 2), ("A", A, 3), ("b", b, 2)):
        if t is None:
            continue
        if t.dim() not in (nd - 1, nd):
            raise ShapeError(f"ipm_solve: {name} must have {nd - 1} or {nd} dimensions, got shape {tuple(t.shape)}.")
        if t.dim() == nd:
            batch.add(t.shape[0])
    if len(batch) > 1:
        raise ShapeError(f"ipm_solve: batched arguments disagree on the batch size: {sorted(batch)}.")
    B = batch.pop() if batch else 1

    def _rows(M, v, name):
        if M is None:
            return None, None, 0
        if M.shape[-1] != n:
            raise ShapeError(f"ipm_solve: {name} must have {n} columns, got shape {tuple(M.shape)}.")
        k = M.shape[-2]
        if v.shape[-1] != k:
            raise ShapeError(f"ipm_solve: {name} has {k} rows but its right-hand side has {v.shape[-1]}.")
        if k == 0:
            return None, None, 0
        return M, v, k

    C, d, m = _rows(C, d, "C")
    A, b, p = _rows(A, b, "A")
    q = q.expand(B, n)
    if d is not None:
        d = d.expand(B, m)
    if b is not None:
        b = b.expand(B, p)
    return P, q, C, d, A, b, B, n, m, p


def _row_normalize(M: Optional[Tensor], v: Optional[Tensor]):
    """Scale rows of ``M`` (and v) to unit 2-norm. Returns (M, v, scale) with scale (…, k)."""
    if M is None:
        return None, None, None
    nrm = torch.linalg.vector_norm(M, dim=-1)
    nrm = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    return M / nrm.unsqueeze(-1), v / nrm, nrm


# --------------------------------------------------------------------------------------------
# Newton-system solvers
# --------------------------------------------------------------------------------------------

class _PrimalNewton:
    """``H = P + CᵀWC + δI`` (n×n Cholesky), equalities by the Schur complement ``A H⁻¹ Aᵀ``."""

    form = "primal"
    #: Keep the factorization of the first call when m == 0 (it does not change across iterations);
    #: off in captured code (see ipm_solve's _make_body)
    cache_const = True

    def __init__(self, P, C, A, B, n, m, p, reg_p, reg_d):
        self.P, self.C, self.A = P, C, A
        self.B, self.n, self.m, self.p = B, n, m, p
        self.reg_p, self.reg_d = reg_p, reg_d
        self.reg_fail = 1e-15 if P.dtype == torch.float64 else 1e-7
        self._const = None  # cached factorization when m == 0

    def factor(self, winv: Optional[Tensor], delta: Tensor, running: Optional[Tensor] = None) -> Tensor:
        """Factorize for W = 1/winv (B, m); returns per-instance ok flags (B,). (``running``: as
        :meth:`_DualNewton.factor`; unused here.)"""
        if self.m == 0 and self.cache_const and self._const is not None:
            self.LH, self.HiAt, self.LS = self._const
            return self._const_ok
        P, C, A = self.P, self.C, self.A
        H = P.expand(self.B, self.n, self.n)
        if self.m:
            w = 1.0 / winv
            H = H + torch.matmul(C.transpose(-1, -2) * w.unsqueeze(-2), C)
        else:
            H = H.clone()
        Hd = torch.diagonal(H, dim1=-2, dim2=-1)
        # static δ = reg_p·max|P|; after a failed factorization (delta > 1) also relative to diag(H),
        # whose scale grows with W = μ/s
        rel = torch.where(delta > 1, delta * self.reg_fail * Hd.abs().amax(-1), torch.zeros_like(delta))
        Hd.add_((delta * self.reg_p + rel).unsqueeze(-1))
        self.LH, info = _cholesky(H)
        ok = info == 0
        if self.p:
            self.HiAt = _chol_solve(self.LH, A.transpose(-1, -2).expand(self.B, self.n, self.p))
            S = torch.matmul(A, self.HiAt)
            Sd = torch.diagonal(S, dim1=-2, dim2=-1)
            Sd.add_((delta * self.reg_d * Sd.abs().amax(-1).clamp(min=1.0)).unsqueeze(-1))
            self.LS, info2 = _cholesky(S)
            ok = ok & (info2 == 0)
        else:
            self.HiAt = self.LS = None
        if self.m == 0 and self.cache_const:
            self._const = (self.LH, self.HiAt, self.LS)
            self._const_ok = ok
        return ok

    def solve(self, a: Tensor, bb: Optional[Tensor], c: Optional[Tensor], winv: Optional[Tensor]):
        r = a
        if self.m:
            wc = c / winv
            r = r + _tmv(self.C, wc)
        v = _chol_solve(self.LH, r)
        dlam = None
        if self.p:
            dlam = _chol_solve(self.LS, _mv(self.A, v) - bb)
            v = v - torch.matmul(self.HiAt, dlam.unsqueeze(-1)).squeeze(-1)
        dmu = Cv = None
        if self.m:
            Cv = _mv(self.C, v)
            dmu = (Cv - c) / winv
        return v, dlam, dmu, Cv

    def direction(self, a, bb, c, winv, need_dz: bool, refine: int):
        """Newton direction ``(Δz, Δλ, Δμ, CΔz)``, refined on the unreduced system."""
        dz, dl, dm, Cdz = self.solve(a, bb, c, winv)
        for _ in range(refine):
            e1 = a - _mv(self.P, dz)
            e2 = e3 = None
            if self.m:
                e1 = e1 - _tmv(self.C, dm)
                e3 = c - Cdz + winv * dm
            if self.p:
                e1 = e1 - _tmv(self.A, dl)
                e2 = bb - _mv(self.A, dz)
            cz, cl, cm, Ccz = self.solve(e1, e2, e3, winv)
            dz = dz + cz
            if self.m:
                dm, Cdz = dm + cm, Cdz + Ccz
            if self.p:
                dl = dl + cl
        return dz, dl, dm, Cdz


#: How the dual form's one-time products ``P⁻¹Āᵀ`` and ``M = ĀP⁻¹Āᵀ`` are formed for a batched P
#: on CUDA: ``"solve"`` — solves with P's Cholesky factor L (two triangular solves with k
#: right-hand sides, or the substitution of a factor with an attached inverse or blocked);
#: ``"inverse"`` — through ``X = L⁻¹`` (:func:`dqp.linsolve.blocked._tri_inverse`, mostly matrix
#: products): ``W = XĀᵀ``, ``P⁻¹Āᵀ = XᵀW``, ``M = WᵀW``; ``"auto"`` (default) — the inverse
#: where L carries neither an inverse nor block inverses (:func:`_cholesky`) and k ≥ n. Measured
#: on an H200, float64, k = n, ms (experiments/kernel_probe.py): B=1024, n=100: solve 1.22,
#: inverse 0.83; B=128, n=100 (L has its inverse): 0.12 vs 0.39; B=128, n=500 (blocked): 2.78
#: vs 3.50. (The CPU and a shared P always solve.)
SETUP_PRODUCTS = "auto"


def _setup_by_inverse(LP: Tensor, k: int) -> bool:
    if SETUP_PRODUCTS not in ("auto", "solve", "inverse"):
        raise SettingsError(f"dqp.solvers.ipm.SETUP_PRODUCTS must be 'auto', 'solve' or 'inverse', "
                            f"got {SETUP_PRODUCTS!r}.")
    if SETUP_PRODUCTS == "solve" or LP.dim() != 3 or LP.device.type != "cuda":
        return False
    return SETUP_PRODUCTS == "inverse" or (k >= LP.shape[-1] and not any(hasattr(LP, a) for a in _ATTACHED))


class _DualNewton:
    """``P ≻ 0``: ``S = Ā P⁻¹ Āᵀ + diag(0, W⁻¹) + δ_d I`` with ``Ā = [A; C]``; ``Ā P⁻¹ Āᵀ`` formed once."""

    form = "dual"
    cache_const = True          # as _PrimalNewton.cache_const

    def __init__(self, LP, P, C, A, B, n, m, p, reg_d, pre: Optional[Dict[str, Tensor]] = None,
                 q: Optional[Tensor] = None):
        """``pre``: the tensors that a solver for the same data computed (``Abar``, ``PiAbt``, ``M``,
        ``Md``, and ``_Piq``, ``_g`` of :meth:`prime` for ``q``), used instead of computing them;
        ``Abar`` may be left out where it is C or A itself (:func:`_init_graphed`)."""
        self.LP = LP
        self.B, self.n, self.m, self.p = B, n, m, p
        self.reg_d = reg_d
        k = m + p
        self.k = k
        self._point = None
        self._const = None
        self._a = None
        if pre is not None:
            self.Abar = pre.get("Abar", A if C is None else C)
            self.PiAbt, self.M, self.Md = pre["PiAbt"], pre["M"], pre["Md"]
            if "_Piq" in pre:
                self._Piq, self._g, self._point = pre["_Piq"], pre["_g"], (q,)
            return
        self.Abar = A if C is None else (C if A is None else torch.cat(
            [A.expand(B, p, n) if (A.dim() == 3 or C.dim() == 3) else A,
             C.expand(B, m, n) if (A.dim() == 3 or C.dim() == 3) else C], dim=-2))
        Abt = self.Abar.transpose(-1, -2)
        self.M = None
        by_inverse = _setup_by_inverse(LP, k)
        if LP.dim() == 2 and Abt.dim() == 2:
            self.PiAbt = _chol_solve(LP, Abt.unsqueeze(0))[0]       # shared (n, k)
        elif _lapack_potrs_rows_ok(LP, self.Abar):
            self.PiAbt = _potrs_rows(LP, self.Abar.expand(B, k, n)).mT
        elif by_inverse:
            X = _tri_inverse(LP)                                     # L⁻¹, mostly matrix products
            LP._dqp_linv = X           # kept: later solves with L (P⁻¹q, the backward's) are products
            W = torch.matmul(X, Abt)                                 # L⁻¹Āᵀ
            self.PiAbt = torch.matmul(X.mT, W)
            self.M = torch.matmul(W.mT, W)                           # symmetric (to rounding)
        else:
            self.PiAbt = _chol_solve(LP, Abt.expand(B, n, k))
        if self.M is None:
            self.M = torch.matmul(self.Abar, self.PiAbt)            # (k, k) or (B, k, k)
        self.Md = torch.diagonal(self.M, dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1e-30)

    def factor(self, winv: Optional[Tensor], delta: Tensor, running: Optional[Tensor] = None) -> Tensor:
        """Factorize S for W = 1/winv; ``running`` (B,) bool, optional: only those elements' factors
        are used (the CPU path then skips the others). Returns per-instance ok flags (B,)."""
        if self.m == 0 and self.cache_const and self._const is not None:
            self.LS = self._const
            return self._const_ok
        inplace = (self.m > 0 and CPU_FAST_PATHS and self.M.device.type == "cpu"
                   and self.M.dtype in (torch.float64, torch.float32))
        if inplace:
            # CPU: one buffer for every iteration, factorized in place (_cholesky_inplace)
            if getattr(self, "_Sbuf", None) is None:
                self._Sbuf = torch.empty(self.B, self.k, self.k, dtype=self.M.dtype)
            S = self._Sbuf
            S.copy_(self.M.expand(self.B, self.k, self.k))
        else:
            S = self.M.expand(self.B, self.k, self.k).clone()
        Sd = torch.diagonal(S, dim1=-2, dim2=-1)
        Sd.add_((delta * self.reg_d * self.Md).unsqueeze(-1))
        if self.m:
            Sd[:, self.p:].add_(winv)
        self._Sdiag = Sd - torch.diagonal(self.M, dim1=-2, dim2=-1)     # what was added to M
        rows = None if running is None or not inplace else torch.nonzero(running).flatten().tolist()
        self.LS, info = _cholesky_inplace(S, rows) if inplace else _cholesky(S, overwrite=True)
        self._lapack_rows = rows if inplace else False        # solves with LS go through _solve_S
        ok = info == 0
        if self.m == 0 and self.cache_const:
            self._const, self._const_ok = self.LS, ok
        return ok

    def _prepare(self, a):
        # predictor and corrector share a = −r_d: P⁻¹a and Ā P⁻¹a are computed once per iteration
        if self._a is not a:
            self._a = a
            self._t = _chol_solve(self.LP, a)
            self._At = _mv(self.Abar, self._t)

    def _solve_S(self, rhs: Tensor) -> Tensor:
        """``S⁻¹ rhs`` with the current factorization (LAPACK per matrix on CPU, else batched)."""
        rows = getattr(self, "_lapack_rows", False)
        if rows is not False:
            return _potrs_inplace(self.LS, rhs, rows)
        return _chol_solve(self.LS, rhs)

    def _dy(self, bb, c, refine, need_My: bool = True):
        parts = [x for x in (bb, c) if x is not None]
        rhs = self._At - (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        dy = self._solve_S(rhs)
        if not need_My and not refine:
            return dy, None
        My = _mv(self.M, dy)
        for _ in range(refine):
            # refinement of the Schur system S Δy = rhs (k-space, cheap)
            dd = self._solve_S(rhs - My - self._Sdiag * dy)
            dy = dy + dd
            My = My + _mv(self.M, dd)
        return dy, My

    def solve(self, a: Tensor, bb: Optional[Tensor], c: Optional[Tensor], winv: Optional[Tensor]):
        self._prepare(a)
        dy, _ = self._dy(bb, c, 0, need_My=False)
        dz = self._t - _mv(self.PiAbt, dy)
        dlam = dy[:, :self.p] if self.p else None
        dmu = dy[:, self.p:] if self.m else None
        return dz, dlam, dmu, None

    def prime(self, q):
        """Precompute ``P⁻¹q`` and ``ĀP⁻¹q`` for :meth:`set_point` (outside any CUDA graph)."""
        self._Piq = _chol_solve(self.LP, q)
        self._g = _mv(self.Abar, self._Piq)
        self._point = (q,)

    def set_point(self, q, z, y, Abar_z, My=None):
        """Current iterate, so that ``a = −(Pz + q + Āᵀy)`` is used through the identities
        ``P⁻¹a = −z − P⁻¹q − P⁻¹Āᵀy`` and ``ĀP⁻¹a = −Āz − ĀP⁻¹q − My`` (no triangular solve with
        P per iteration). ``My``: ``M y`` when the caller tracks it (else one product here)."""
        if self._point is None or self._point[0] is not q:
            self.prime(q)
        self._z, self._y = z, y
        self._pending = Abar_z
        self._My_given = My

    def direction(self, a, bb, c, winv, need_dz: bool, refine: int):
        """Newton direction ``(Δz or None, Δλ, Δμ, CΔz)``: ``CΔz = C P⁻¹a − (M Δy)_C`` needs no
        n-space product, so the predictor never forms Δz."""
        if getattr(self, "_pending", None) is not None:
            # a = −r_d at the point given to set_point: ĀP⁻¹a from k-space products only
            self._a = a
            My0 = getattr(self, "_My_given", None)
            self.My_point = My0 if My0 is not None else _mv(self.M, self._y)
            self._At = -self._pending - self._g - self.My_point
            self._t = None
            self._pending = None
        self._prepare(a)
        # the predictor (need_dz False) only needs CΔz, which the Schur system gives without a pass
        # over M: S Δy = rhs ⇒ (M Δy)_C = rhs_C − diag(S − M)_C Δμ, so CΔz = c + diag(S − M)_C Δμ
        # (exact up to the solve's residual; the corrector, which moves the iterate, uses M Δy)
        # (float64 only: in float32 the identity's error costs iterations — measured on qpth's generator,
        # n = m = 100, B = 128: max iterations 14 → 35)
        dy, My = self._dy(bb, c, refine, need_My=need_dz or not self.m or self.M.dtype != torch.float64)
        if not need_dz:
            dz = None
        elif self._t is None:
            dz = -self._z - self._Piq - _mv(self.PiAbt, self._y + dy)
        else:
            dz = self._t - _mv(self.PiAbt, dy)
        dlam = dy[:, :self.p] if self.p else None
        dmu = Cdz = None
        # for a caller that tracks products across iterations: M Δy and Ā Δz of this direction
        # (no kernel otherwise: on the GPU this runs inside the captured iteration)
        self.last_My = My
        self.last_Abdz = None if (My is None or not getattr(self, "tracking", False)) else self._At - My
        if self.m:
            dmu = dy[:, self.p:]
            Cdz = (self._At[:, self.p:] - My[:, self.p:]) if My is not None else c + self._Sdiag[:, self.p:] * dmu
        return dz, dlam, dmu, Cdz


def _factor_ok(LP: Tensor, info: Tensor, P: Tensor) -> Tensor:
    """Per element: the Cholesky factor of P succeeded and P is well conditioned enough for the
    dual form (an estimate from the factor's diagonal: min pivot² ≥ limit · max |P_ii|)."""
    diag = torch.diagonal(LP, dim1=-2, dim2=-1)
    dmin = diag.abs().amin(-1) ** 2
    dmax = torch.diagonal(P, dim1=-2, dim2=-1).abs().amax(-1).clamp(min=torch.finfo(P.dtype).tiny)
    limit = 1e-12 if P.dtype == torch.float64 else 1e-4
    return (info == 0) & torch.isfinite(diag).all(-1) & (dmin >= limit * dmax)


def _form_by_cost(form, P, B, n, m, p, est_iters=15) -> str:
    """The form to try, by the requested one and (``"auto"``) the estimated flops: ``"dual"`` still
    needs P's factor to succeed (:func:`_choose_form`)."""
    if form not in ("auto", "primal", "dual"):
        raise SettingsError(f"ipm_solve: form must be 'auto', 'primal' or 'dual', got {form!r}.")
    k = m + p
    if form == "dual" and k == 0:
        raise SettingsError("ipm_solve: form='dual' eliminates the constraints, and this problem has "
                            "none; use form='auto' or 'primal'.")
    if form != "auto":
        return form
    nb = 1 if P.dim() == 2 else B
    cost_primal = est_iters * B * (2.0 * m * n * n + n ** 3 / 3 + 2.0 * p * n * n + p ** 3 / 3)
    cost_dual = nb * (n ** 3 / 3 + 2.0 * n * n * k + 2.0 * n * k * k) + est_iters * B * (k ** 3 / 3 + 4.0 * n * k)
    return "primal" if cost_dual >= cost_primal or k == 0 else "dual"


def _choose_form(form, P, B, n, m, p):
    """Return (form, LP) — LP the Cholesky factor of P when the dual form is used."""
    if _form_by_cost(form, P, B, n, m, p) == "primal":
        return "primal", None
    LP, info = _cholesky(P)
    if not bool(_factor_ok(LP, info, P).all()):      # (one host sync, outside the loop)
        if form == "dual":
            raise SettingsError("ipm_solve: form='dual' needs a positive definite, well-conditioned P; "
                                "use form='primal' or 'auto'.")
        return "primal", None
    return "dual", LP


# --------------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------------

def _regularization(dtype: torch.dtype) -> Tuple[float, float]:
    """Primal and dual regularization of the Newton systems (relative, see the solvers)."""
    return (1e-10, 1e-12) if dtype == torch.float64 else (1e-7, 1e-7)


def _start(newton, q, C, d, b, B: int, m: int, one_m: Tensor, delta: Tensor):
    """The starting point ``(z, s, mu, lam)``: the KKT system with W = I, then s and μ shifted into
    the interior; defaults (z = 0, s = μ = 1, λ = 0) for an element with a non-finite value. (The
    fused kernel computes the same one itself: dqp.solvers.fused.solve_dual(start=True).)"""
    newton.factor(one_m if m else None, delta)
    z, lam, _, _ = newton.solve(-q, b, d if m else None, one_m if m else None)
    if m:
        s_hat = d - _mv(C, z)
        # (the W = I system gives μ̂ = Cz − d = −ŝ)
        def _shift(v):
            lo = v.amin(-1, keepdim=True)
            return torch.where(lo > 0, v, v + (1.0 - lo))      # strictly ≥ 1 when shifted
        s = _shift(s_hat)
        mu = _shift(-s_hat)
    else:
        s = q.new_zeros(B, 0)
        mu = q.new_zeros(B, 0)
    if lam is None:
        lam = q.new_zeros(B, 0)
    bad0 = ~(torch.isfinite(z).all(-1) & torch.isfinite(s).all(-1) & torch.isfinite(mu).all(-1)
             & torch.isfinite(lam).all(-1))
    z = torch.where(bad0.unsqueeze(-1), torch.zeros_like(z), z)
    s = torch.where(bad0.unsqueeze(-1), torch.ones_like(s), s)
    mu = torch.where(bad0.unsqueeze(-1), torch.ones_like(mu), mu)
    lam = torch.where(bad0.unsqueeze(-1), torch.zeros_like(lam), lam)
    return z, s, mu, lam


def _start_placeholders(q: Tensor, B: int, m: int, p: int):
    """``(z, s, mu, lam)`` buffers for a kernel that computes its own starting point (not read)."""
    return torch.zeros_like(q), q.new_ones(B, m), q.new_ones(B, m), q.new_zeros(B, p)


def _init(P, q, C, d, A, b, B: int, n: int, m: int, p: int, fm: str, LP: Optional[Tensor],
          start: bool = True):
    """Everything before the first interior-point iteration: the row scaling, the norms the checks
    read, the Newton solver of form ``fm`` (``LP``: P's Cholesky factor for the dual form) and the
    starting point. Device work only, no host sync (on CUDA it may run as a graph, see
    :data:`SETUP_GRAPH`). Returns ``(C, d, A, b, c_scale, a_scale, norms, newton, S)``: the scaled
    constraints, their row norms, a dict of norms, the solver and the iteration's state.
    ``start=False``: the fused kernel computes the starting point (the same one) itself; the
    state's z, s, mu, lam are then placeholders."""
    dtype, device = P.dtype, P.device
    reg_p, reg_d = _regularization(dtype)
    # row scaling of the constraints (unit-norm rows); undone on return
    C, d, c_scale = _row_normalize(C, d)
    A, b, a_scale = _row_normalize(A, b)
    if c_scale is not None:
        c_scale = c_scale.expand(B, m)
    if a_scale is not None:
        a_scale = a_scale.expand(B, p)

    Pscale = P.abs().flatten(-2).amax(-1).expand(B) if n else P.new_zeros(B)
    pscale = Pscale.clamp(min=1.0)
    qnorm = _amax(q)
    bnorm = _amax(b) if p else None          # constant: once, not at every check
    dnorm = _amax(d) if m else None

    if fm == "dual":
        newton = _DualNewton(LP, P, C, A, B, n, m, p, reg_d)
    else:
        newton = _PrimalNewton(P, C, A, B, n, m, p, reg_p * pscale, reg_d)
    delta = torch.ones(B, dtype=dtype, device=device)         # per-instance regularization multiplier
    one_m = torch.ones(B, m, dtype=dtype, device=device)

    # ---- starting point: solve the KKT system with W = I, then shift s and μ into the interior
    if not start:
        z, s, mu, lam = _start_placeholders(q, B, m, p)
    else:
        z, s, mu, lam = _start(newton, q, C, d, b, B, m, one_m, delta)

    zB = lambda k: torch.zeros(B, k, dtype=dtype, device=device)      # noqa: E731
    # the iteration's whole state, device tensors only (the CUDA graph's static buffers)
    S: Dict[str, Tensor] = dict(
        z=z, s=s, mu=mu, lam=lam,
        delta=delta,
        nfail=torch.zeros(B, dtype=torch.int64, device=device),
        iters=torch.zeros(B, dtype=torch.int64, device=device),
        done=torch.zeros(B, dtype=torch.bool, device=device),
        status=torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=device),
        pinf_cnt=torch.zeros(B, dtype=torch.int64, device=device),
        dinf_cnt=torch.zeros(B, dtype=torch.int64, device=device),
        best=torch.full((B,), math.inf, dtype=dtype, device=device),
        last_impr=torch.zeros(B, dtype=torch.int64, device=device),
        it=torch.zeros((), dtype=torch.int64, device=device),
        # the previous check's iterate (certificates along the step); have_prev: there was one
        have_prev=torch.zeros((), dtype=torch.bool, device=device),
        prev_z=zB(n), prev_Pz=zB(n), prev_Az=zB(p), prev_Cz=zB(m), prev_lam=zB(p), prev_mu=zB(m),
        prev_Ay=zB(n))
    if fm == "dual" and dtype == torch.float64:
        newton.prime(q)
    norms = dict(pscale=pscale, qnorm=qnorm, bnorm=bnorm, dnorm=dnorm)
    return C, d, A, b, c_scale, a_scale, norms, newton, S


#: On CUDA, run :func:`_init` for the dual form (with P's factorization and the conditioning test
#: of :func:`_choose_form`) as a cached CUDA graph (:func:`graphed_call`) where ``B·k²`` (k = max(n,
#: m + p)) is at most ``SETUP_GRAPH_MAX_WORK``: its ~250 small operations cost ~3 ms of host time
#: eagerly (B=128, n=m=100, H100), while the device idles. Above, the device work hides the launches.
SETUP_GRAPH = True
SETUP_GRAPH_MAX_WORK = 20_000_000


def _row_scales(a_scale: Optional[Tensor], c_scale: Optional[Tensor], B: int) -> Tensor:
    """The row norms of ``[A; C]`` (B, k) from the scaling's per-block ones."""
    sc = [t.expand(B, t.shape[-1]) for t in (a_scale, c_scale) if t is not None]
    return torch.cat(sc, dim=-1) if len(sc) > 1 else sc[0]


#: The state entries the fused kernel reads (:func:`dqp.solvers.fused.solve_dual`).
_FUSED_STATE = ("z", "s", "mu", "lam", "delta")


#: Setup graphs (their keys) whose dual-form test failed in a call that had deferred it (see
#: ``_init_graphed``'s ``defer_ok``): later calls with that key test before going on.
_SETUP_DEFER_FAILED: set = set()


def _init_graphed(P, q, C, d, A, b, B: int, n: int, m: int, p: int, minimal: bool = False,
                  defer_ok: bool = False):
    """:func:`_init` with ``fm="dual"`` (P factorized inside) replayed from a cached graph; None
    when P's factor fails the dual form's test in some element (the caller then chooses the form
    eagerly, :func:`_choose_form`) or the graph cannot be used. ``minimal``: return only the state
    entries the fused kernel reads, and copy out of the graph only P's factor (the caller's
    other reads of the outputs are queued before the next replay).

    Returns ``(init, deferred)``: ``init`` as :func:`_init`'s result and ``deferred`` None (the test
    passed) or, with ``defer_ok``, ``(key, ok, event)``: the test's outcome on its way to pinned
    host memory (a 0-d bool tensor, valid once ``event`` has completed), not yet read. The caller
    launches its work first (no host sync between the setup and the fused kernel), then reads it
    (:func:`_deferred_ok`); where it is False the caller must discard that work, add ``key`` to
    :data:`_SETUP_DEFER_FAILED` and start again."""
    if B * max(n, m + p) ** 2 > SETUP_GRAPH_MAX_WORK:
        return None
    inputs = {k: v for k, v in zip(_GraphData._DATA, (P, q, C, d, A, b)) if v is not None}
    names = _GraphData._NEWTON["dual"]

    def fn(inp):
        P_, C_, A_ = inp["P"], inp.get("C"), inp.get("A")
        LP, info = _cholesky(P_)
        ok = _factor_ok(LP, info, P_).all()
        C2, d2, A2, b2, cs, as_, norms, nt, S = _init(P_, inp["q"], C_, inp.get("d"), A_, inp.get("b"),
                                                      B, n, m, p, "dual", LP, start=not minimal)
        out = dict(ok=ok, C=C2, d=d2, A=A2, b=b2, c_scale=cs, a_scale=as_)
        out.update({"norm." + k: v for k, v in norms.items()})
        # (Abar when it is C or A itself: not a tensor of its own, see _DualNewton)
        out.update({"nt." + k: getattr(nt, k, None) for k in names
                    if not (k == "Abar" and (nt.Abar is C2 or nt.Abar is A2))})
        out.update({"S." + k: v for k, v in S.items() if not minimal or k in _FUSED_STATE})
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    key = ("dqp_ipm_init", B, n, m, p, minimal)
    defer_ok = defer_ok and key not in _SETUP_DEFER_FAILED
    # (with the kernel to follow, ipm_solve reads the outputs only in work it queues before it
    # returns, except P's factor, which the result's factors keep: the rest is not copied)
    out = graphed_call(key, fn, inputs, fresh=(lambda name: name.startswith("nt.LP")) if minimal else None)
    if out is None or (not defer_ok and not bool(out["ok"])):          # (one host sync, as in _choose_form)
        return None
    Cs, ds, As, bs = (out.get(k) for k in ("C", "d", "A", "b"))
    pre = {k[3:]: v for k, v in out.items() if k.startswith("nt.")}
    newton = _DualNewton(pre["LP"], P, Cs, As, B, n, m, p, _regularization(P.dtype)[1], pre=pre, q=q)
    norms = {k: out.get("norm." + k) for k in ("pscale", "qnorm", "bnorm", "dnorm")}
    S = {k[2:]: v for k, v in out.items() if k.startswith("S.")}
    ok = None
    if defer_ok and out["ok"].device.type == "cuda":
        # (copied to pinned host memory now, read after the caller's launches: the read then waits
        # for the setup only, not for the work queued after it)
        ok = torch.empty((), dtype=torch.bool, pin_memory=True)
        ok.copy_(out["ok"], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(out["ok"].device))
        ok = (key, ok, ev)
    elif defer_ok:
        ok = (key, out["ok"], None)
    return (Cs, ds, As, bs, out.get("c_scale"), out.get("a_scale"), norms, newton, S), ok


def _deferred_ok(deferred) -> bool:
    """The outcome of a deferred dual-form test (see :func:`_init_graphed`), waiting for the setup only."""
    _, ok, ev = deferred
    if ev is not None:
        ev.synchronize()
    return bool(ok)


def _fused_flag(fused: Optional[bool]):
    """The effective ``fused`` setting: the call's, else :data:`dqp.solvers.fused.FUSED`."""
    fused = _fused.FUSED if fused is None else fused
    if fused not in (True, False, "auto"):
        raise SettingsError(f"ipm_solve: fused must be True, False or None, got {fused!r}.")
    return fused


def _fused_reasons(fused, fm: str, dtype: torch.dtype, device: torch.device, n: int, m: int, p: int,
                   trace: Optional[list], refine: Optional[int] = None) -> list:
    """Why the fused kernel cannot run this solve (empty: it can)."""
    fits = _fused.fused_available(device, dtype, n, m, p) or (device.type == "cpu" and fused is True)
    return [why for bad, why in (
        (fm != "dual", f"the {fm} form was chosen (the kernel runs the dual form: P positive definite "
                       "and well conditioned, form='dual' or 'auto')"),
        (dtype != torch.float64, f"the data are {dtype} (the kernel is float64)"),
        (m + p == 0, "the problem has no constraints"),
        (trace is not None, "trace is given"),
        (refine not in (None, 0), f"refine={refine} (the kernel does not refine the Newton direction)"),
        (not fits, f"no fused build fits on {device} (CUDA, shared memory for k = {m + p})")) if bad]


def _use_fused(fused: Optional[bool], fm: str, dtype: torch.dtype, device: torch.device, n: int, m: int,
               p: int, trace: Optional[list], refine: Optional[int] = None) -> bool:
    """Whether this solve runs the fused kernel (see ``ipm_solve``'s ``fused``)."""
    fused = _fused_flag(fused)
    if fused is False:
        return False
    reasons = _fused_reasons(fused, fm, dtype, device, n, m, p, trace, refine)
    if fused == "auto":
        return not reasons
    if reasons:
        raise SettingsError("ipm_solve: fused=True does not apply here: " + "; ".join(reasons)
                            + ". Use fused=None (automatic) or False.")
    return True


def _on_data_device(fn):
    """Run ``fn`` with the CUDA device of its first CUDA tensor argument (positional, or a value of a
    dict argument) as the current device: the streams, events, pinned buffers and graph captures
    made inside take the current device, so the data on ``cuda:r`` never touch ``cuda:0``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            for t in (a.values() if isinstance(a, dict) else (a,)):
                if isinstance(t, Tensor) and t.device.type == "cuda":
                    with torch.cuda.device(t.device):
                        return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


@_on_data_device
def ipm_solve(P: Tensor, q: Tensor, C: Optional[Tensor] = None, d: Optional[Tensor] = None,
              A: Optional[Tensor] = None, b: Optional[Tensor] = None, *, eps: Optional[float] = None,
              max_iter: int = 100, check_every: Optional[int] = None, form: str = "auto",
              separate_steps: bool = True, step_fraction: float = 0.995,
              eps_infeasible: Optional[float] = None, refine: Optional[int] = None,
              stall_iters: int = 12, fallback64: bool = True, cuda_graph: bool = True,
              graph_cache: bool = True, compile: bool = False, fused: Optional[bool] = None,
              polish_rounds: int = 0, polish_eps: Union[None, float, Sequence[float]] = None,
              trace: Optional[list] = None) -> IPMResult:
    """Solve a batch of convex QPs with a primal-dual interior-point method.

    Parameters
    ----------
    P : (n, n) or (B, n, n)
        Symmetric positive semidefinite.
    q : (n,) or (B, n)
    C, d : (m, n) / (B, m, n) and (m,) / (B, m), or None
        Inequalities ``Cz ≤ d``. A 0-row C means none.
    A, b : (p, n) / (B, p, n) and (p,) / (B, p), or None
        Equalities ``Az = b``. A 0-row A means none.
    eps : float, optional
        Relative stopping tolerance (see the module docstring); default :func:`default_eps`.
    max_iter : int
        Iteration limit; instances not converged by then get ``Status.MAX_ITER``.
    check_every : int, optional
        Steps between convergence checks; the host reads the ``all done`` flag (a device sync)
        after each check. Default 1 on CPU, 4 on other devices. An instance that converges
        between checks keeps stepping (towards the same solution) until the next check.
    form : {"auto", "primal", "dual"}
        Which elimination of the Newton system to use (module docstring).
    separate_steps : bool
        Separate primal and dual step lengths (default) or one common step.
    step_fraction : float
        Fraction of the step to the boundary (0.995).
    eps_infeasible : float, optional
        Tolerance of the infeasibility certificates (default 1e-7 float64, 1e-4 float32).
    refine : int, optional
        Iterative-refinement steps of the (corrector) Newton direction on the unreduced system.
        Default 1 for the primal form: as W grows, ``H = P + CᵀWC`` loses accuracy and the IPM
        stalls with a dual residual around 1e-8; one step of refinement on the unreduced system
        removes the stall (measured on qpth's generator, n=50, m=150: 17 of 128 instances stall
        without it). Default 0 for the dual form, where a refinement of its Schur system changed
        no iteration count in the same measurements.
    stall_iters : int
        An instance whose worst scaled residual has not halved for this many iterations stops
        with ``Status.NUMERICAL`` instead of running to ``max_iter`` (and holding up its batch).
    fallback64 : bool
        For float32/float16 data: re-solve the instances that end with MAX_ITER or NUMERICAL in
        float64 (outputs are cast back). Float32 stalls on ill-conditioned problems (measured on
        qpth's generator, n = m = 100: 1 of 128 instances stalls at a dual residual ~1e-3).
    cuda_graph : bool
        On CUDA, capture an interior-point step (residuals, factorization, predictor, corrector,
        step) and the convergence check as CUDA graphs (one per step, :data:`SPLIT_GRAPHS`) and
        replay ``check_every`` steps and a check until every instance is done: nothing in them
        synchronizes with the host, which reads one flag per replay. Cuts the per-iteration launch
        overhead that dominates small problems. The dual form's setup runs as a cached graph too
        (:data:`SETUP_GRAPH`, with ``graph_cache``). Falls back to eager execution if the capture fails.
    graph_cache : bool
        Keep the captured iteration for later calls with the same shapes, dtype, device, form and
        options (LRU of ``GRAPH_CACHE_SIZE`` entries, ``GRAPH_CACHE_MAX_BYTES`` in all): those
        calls copy their data into the graph's static buffers instead of capturing again, so a
        training loop captures once. :func:`clear_graph_cache` frees them.
    compile : bool
        With ``cuda_graph``: compile the captured iteration with ``torch.compile`` first, which
        fuses its element-wise work (about 100 small kernels per step) into a few generated
        kernels. The first call for each shape then takes the compilation time (about 100 s on an
        H100 host); later calls reuse the cached graph. Each capture compiles anew, and past
        ``torch._dynamo.config.cache_size_limit`` captures in one process torch.compile runs the
        iteration uncompiled (with its own warning). Off by default.
    fused : bool, optional
        Run the whole iteration loop as one fused kernel (:mod:`dqp.solvers.fused`: a thread
        block per QP). ``None`` (default) follows :data:`dqp.solvers.fused.FUSED` (``"auto"``: on
        CUDA for float64 dual-form problems whose Schur matrix fits a block's shared memory);
        ``True`` requires it (on the CPU it runs the kernel's C++ build, for tests) and raises
        :class:`~dqp.errors.SettingsError` where it does not apply; ``False``: the torch loop.
    polish_rounds : int
        Where the fused kernel runs: go on, in the same launch, with the active-set polish of
        :func:`dqp.ipm_layer.polish` (at most this many rounds; 0: none) and return it in
        :attr:`IPMResult.polish`. The torch loop ignores it (``polish`` is None: the caller polishes).
    polish_eps : float, optional
        With the kernel's polish (``polish_rounds > 0``) and ``polish_eps > eps``: two stages. The
        IPM first stops at ``polish_eps`` and polishes; where the polish rejects a solved element's
        point, that element goes on to ``eps`` (the iterates of a single solve at ``eps``) and is
        polished again. So an element is either polished or solved to ``eps``, as without it, in
        fewer iterations where the looser point already shows the active set. A pair
        ``(eps_1, eps_2)`` with ``eps_1 > eps_2 > eps``: three stages, the stops and polishes at
        eps_1, then (where rejected) eps_2, then eps. Ignored elsewhere.
    trace : list, optional
        Diagnostics: when given, a dict of per-instance tensors (residuals, gap, step lengths,
        regularization) is appended every iteration.

    Returns
    -------
    IPMResult
        Shapes ``(B, ·)``; B = 1 when no argument is batched.
    """
    again = dict(eps=eps, max_iter=max_iter, check_every=check_every, form=form, separate_steps=separate_steps,
                 step_fraction=step_fraction, eps_infeasible=eps_infeasible, refine=refine,
                 stall_iters=stall_iters, fallback64=fallback64, cuda_graph=cuda_graph, graph_cache=graph_cache,
                 compile=compile, fused=fused, polish_rounds=polish_rounds, polish_eps=polish_eps, trace=trace)
    P, q, C, d, A, b, B, n, m, p = _prepare(P, q, C, d, A, b)
    P0, q0, d0, b0 = P, q, d, b
    dtype, device = P.dtype, P.device
    if max_iter < 1:
        raise SettingsError(f"ipm_solve: max_iter must be >= 1, got {max_iter}.")
    if not (isinstance(polish_rounds, int) and polish_rounds >= 0):
        raise SettingsError(f"ipm_solve: polish_rounds must be an integer >= 0, got {polish_rounds!r}.")
    if not 0.0 < step_fraction < 1.0:
        raise SettingsError(f"ipm_solve: step_fraction must be in (0, 1), got {step_fraction}.")
    eps = default_eps(dtype) if eps is None else float(eps)
    if not eps > 0:
        raise SettingsError(f"ipm_solve: eps must be positive, got {eps}.")
    stages = () if polish_eps is None else (tuple(float(t) for t in polish_eps)
                                            if isinstance(polish_eps, (tuple, list)) else (float(polish_eps),))
    if polish_eps is not None and not (1 <= len(stages) <= 2 and all(t > 0 for t in stages)
                                       and (len(stages) == 1 or stages[0] > stages[1])):
        raise SettingsError(f"ipm_solve: polish_eps must be a positive tolerance, a pair of them (the looser "
                            f"first) or None, got {polish_eps!r}.")
    eps_inf = (1e-7 if dtype == torch.float64 else 1e-4) if eps_infeasible is None else float(eps_infeasible)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4
    check_every = max(int(check_every), 1)
    f64 = dtype == torch.float64

    C_u, A_u = C, A
    use_graph = cuda_graph and trace is None and _graph_device_ok(device)
    with torch.profiler.record_function("dqp::ipm_setup"):
        init = deferred = None
        fused_dual = None            # the kernel's verdict should the dual form be taken (decided once)
        if use_graph and graph_cache and SETUP_GRAPH and _form_by_cost(form, P, B, n, m, p) == "dual":
            fused_dual = _use_fused(fused, "dual", dtype, device, n, m, p, trace, refine)
            # (with the kernel to follow, the dual form's test is read after its launch)
            got = _init_graphed(P, q, C, d, A, b, B, n, m, p, minimal=fused_dual, defer_ok=fused_dual)
            if got is not None:
                init, deferred = got
        if init is None:
            fm, LP = _choose_form(form, P, B, n, m, p)
            if fm == "dual":
                fused_dual = _use_fused(fused, "dual", dtype, device, n, m, p, trace, refine)
            # (where the kernel follows, it computes the starting point itself)
            init = _init(P, q, C, d, A, b, B, n, m, p, fm, LP, start=not (fm == "dual" and fused_dual))
    C, d, A, b, c_scale, a_scale, norms, newton, S = init
    fm = newton.form
    if refine is None:
        refine = 1 if fm == "primal" else 0
    Cscale = 1.0 if m else 0.0   # rows are unit norm after scaling
    Ascale = 1.0 if p else 0.0
    tiny = torch.finfo(dtype).tiny
    wlo = 1e-60 if f64 else 1e-16
    SOLVED, PINF, DINF, NUM = (int(Status.SOLVED), int(Status.PRIMAL_INFEASIBLE),
                               int(Status.DUAL_INFEASIBLE), int(Status.NUMERICAL))

    # the fused kernel runs the whole loop: nothing of the torch loop's machinery is needed then
    # (with its polish and a looser polish_eps: two stages, the first to polish_eps)
    eps_first = max(stages[0], eps) if (polish_rounds and stages) else eps
    eps_mid = stages[1] if (polish_rounds and len(stages) == 2 and eps < stages[1] < eps_first) else None
    fused_out = None
    if (fused_dual if (fm == "dual" and fused_dual is not None)
            else _use_fused(fused, fm, dtype, device, n, m, p, trace, refine)):
        with torch.profiler.record_function("dqp::ipm_fused"):
            fused_out = _fused.solve_dual(
                P, q, C, d, A, b, newton.M, newton.PiAbt, newton._Piq, newton._g, norms, newton.Md, S,
                max_iter=max_iter, stall_iters=stall_iters, separate_steps=separate_steps,
                eps_inf=eps_inf, step_fraction=step_fraction, reg_d=newton.reg_d, wlo=wlo,
                polish_rounds=polish_rounds, row_scale=_row_scales(a_scale, c_scale, B), start=True,
                eps=eps_first, eps2=eps if eps_first > eps else None, eps_mid=eps_mid)
        if deferred is not None and not _deferred_ok(deferred):
            # P failed the dual form's test in some element: the kernel's answer is void; this
            # setup graph tests before going on from now on, and the solve starts again
            _SETUP_DEFER_FAILED.add(deferred[0])
            return ipm_solve(P0, q0, C_u, d0, A_u, b0, **again)

    live = _GraphData(P, q, C, d, A, b, newton, norms)

    def _resid(z, s, mu, lam, D=live, T=None):
        P, q, C, d, A, b = D.P, D.q, D.C, D.d, D.A, D.b
        if T is None:
            Pz, ATl, CTm = _mv(P, z), _tmv(A, lam) if p else None, _tmv(C, mu) if m else None
            Az, Cz = _mv(A, z) if p else None, _mv(C, z) if m else None
        else:   # products tracked by _step (see `track` below)
            Pz, ATl, CTm, Az, Cz = T["Pz"], T["ATl"], T["CTm"], T["Az"], T["Cz"]
        rd = Pz + q
        if p:
            rd = rd + ATl
        if m:
            rd = rd + CTm
        req = Az - b if p else None
        rin = Cz + s - d if m else None
        gap = (s * mu).sum(-1)
        gscl = 1.0 + (z * Pz).sum(-1).abs() + (q * z).sum(-1).abs()
        return Pz, rd, ATl, CTm, Az, Cz, req, rin, gap, gscl

    def _step(S, R, D=live, it=0, scaled=(None, None, None, None)):
        """One predictor-corrector step from the state S with its residuals R (from ``_resid``);
        returns the updated entries of S. ``it``, ``scaled``: for ``trace`` only."""
        z, s, mu, lam, delta, nfail, iters, done = (S[k] for k in ("z", "s", "mu", "lam", "delta", "nfail",
                                                                 "iters", "done"))
        _, rd, _, _, Az_s, Cz_s, req, rin, gap, gscl = R
        pres, pscl, dres, dscl = scaled
        newton, q = D.newton, D.q
        running = ~done
        iters = iters + running

        # ---------------- predictor (affine) step
        # W⁻¹ = s/μ, kept inside the range where W and W⁻¹ are finite in this dtype
        winv = (s / mu).clamp(min=wlo, max=1.0 / wlo) if m else None
        fact_ok = newton.factor(winv, delta, running if not use_graph else None)
        if fm == "dual" and f64:
            # (float64 only: in float32 the identities cancel badly — measured: every instance of
            # qpth's generator at n = m = 100 stalls — so float32 solves with P each iteration)
            yv = torch.cat([lam, mu], dim=-1) if (p and m) else (lam if p else mu)
            Az_ = [v for v in (Az_s, Cz_s) if v is not None]
            newton.set_point(q, z, yv, torch.cat(Az_, dim=-1) if len(Az_) > 1 else Az_[0],
                             trk.get("My") if track else None)
        a = -rd
        bb = -req if p else None
        nrin = -rin if m else None
        c_aff = (nrin + s) if m else None          # −r_in + r_c/μ with r_c = s∘μ
        # (s and μ, and their directions, are stacked (B, 2, m) where both take the same operations:
        # one kernel for both; an iteration is a few hundred small kernels at B=128, n=m=100)
        if m:
            _, dl_a, dm_a, Cdz_a = newton.direction(a, bb, c_aff, winv, False, 0)
            sm = torch.stack([s, mu], 1)
            dsm_a = torch.stack([nrin - Cdz_a, dm_a], 1)                  # (Δs, Δμ) affine
            st_a = _max_step(sm, dsm_a, 1.0)                             # (B, 2): primal, dual
            if not separate_steps:
                st_a = st_a.amin(-1, keepdim=True)
            tau = gap / m
            sm_a = torch.addcmul(sm, st_a.unsqueeze(-1), dsm_a)
            mu_aff = (sm_a[:, 0] * sm_a[:, 1]).sum(-1) / m
            sigma = (mu_aff / tau.clamp(min=tiny)).clamp(min=0.0, max=1.0) ** 3
            # ---------------- corrector (centering + second order) with the same factorization
            rc = torch.addcmul(s * mu, dsm_a[:, 0], dm_a).sub_((sigma * tau).unsqueeze(-1))
            c_cor = torch.addcdiv(nrin, rc, mu)
            dz_, dl_, dm_, Cdz = newton.direction(a, bb, c_cor, winv, True, refine)
            dsm = torch.stack([nrin - Cdz, dm_], 1)
            # fraction to the boundary, → 1 as the instance converges (per instance)
            eta = (1.0 - (gap / gscl).sqrt()).clamp(min=step_fraction)
            eta = torch.nan_to_num(eta, nan=step_fraction)       # (a NaN gap must not reach the step)
            st = (eta.unsqueeze(-1) * _max_step(sm, dsm)).clamp(max=1.0)
            if not separate_steps:
                st = st.amin(-1, keepdim=True)
            ap, ad = st[:, 0], st[:, -1]
        else:
            dz_, dl_, dm_, _ = newton.direction(a, bb, None, None, True, refine)
            ap = torch.ones(z.shape[0], dtype=dtype, device=device)
            ad = ap

        # finite direction: a NaN or ±inf anywhere makes the sum non-finite (a sum that overflows
        # counts as non-finite too)
        tot = dz_.sum(-1)
        if p:
            tot = tot + dl_.sum(-1)
        if m:
            tot = tot + dsm.sum((-2, -1))
        ok = fact_ok & torch.isfinite(tot)
        upd = running & ok
        # failed factorization / non-finite step: raise that instance's regularization and retry
        # (δ ∈ [1, 1e12]: ×100 after a failure, ×0.5 after a success)
        bad = running & ~ok
        delta = (delta * torch.where(bad, 100.0, 0.5)).clamp(min=1.0, max=1e12)
        nfail = (nfail + 1) * bad
        if trace is not None:
            sc = (lambda a, b: None if a is None else a / b)        # noqa: E731 (no check this iteration)
            trace.append(dict(it=it, pres=sc(pres, pscl), dres=sc(dres, dscl), gap=gap / gscl, ap=ap, ad=ad,
                              delta=delta, ok=ok, fact_ok=fact_ok, done=done.clone(), mumax=_amax(mu), smin=s.amin(-1) if m else None))
        u = upd.unsqueeze(-1)
        z = torch.where(u, torch.addcmul(z, ap.unsqueeze(-1), dz_), z)
        if m:
            # (clamp: keep strict interiority against round-off)
            sm = torch.where(u.unsqueeze(-1), torch.addcmul(sm, st.unsqueeze(-1), dsm), sm).clamp_(min=tiny)
            s, mu = sm[:, 0], sm[:, 1]
        if p:
            lam = torch.where(u, torch.addcmul(lam, ad.unsqueeze(-1), dl_), lam)
        if track:
            # products at the new iterate from this step's own quantities: P Δz = a − Āᵀ Δy (the
            # first block row, which the dual form satisfies by construction), Ā Δz and M Δy from the
            # Schur solve; one pass over [A; C] instead of recomputing P z, C z, Cᵀμ, A z, Aᵀλ, M y
            # (an error in a tracked product decays by (1 − α) per step: it enters the next
            # direction through the residual it is used for)
            ATd = _tmv(D.A, dl_) if p else None
            CTd = _tmv(D.C, dm_) if m else None
            Pdz = a - (ATd if p else 0.0) - (CTd if m else 0.0)
            apc, adc = ap.unsqueeze(-1), ad.unsqueeze(-1)
            Abdz = newton.last_Abdz
            upd_ = lambda v, dv, st: torch.where(u, torch.addcmul(v, st, dv), v)   # noqa: E731
            trk.update(Pz=upd_(trk["Pz_cur"], Pdz, apc), My=upd_(newton.My_point, newton.last_My, adc),
                       ATl=upd_(trk["ATl_cur"], ATd, adc) if p else None,
                       CTm=upd_(trk["CTm_cur"], CTd, adc) if m else None,
                       Az=upd_(Az_s, Abdz[:, :p], apc) if p else None,
                       Cz=upd_(Cz_s, Abdz[:, p:], apc) if m else None)
        return dict(z=z, s=s, mu=mu, lam=lam, delta=delta, nfail=nfail, iters=iters, it=S["it"] + 1)

    def _check(S, R, D=live):
        """Norms, convergence, infeasibility certificates, stalls and statuses at the iterate of
        ``S`` with its residuals ``R`` (from ``_resid``). Device tensors only (it runs inside the
        captured iteration); returns the updated entries of S and (pres, pscl, dres, dscl)."""
        Pz, rd, ATl, CTm, Az, Cz, req, rin, gap, gscl = R
        z, s, mu, lam = S["z"], S["s"], S["mu"], S["lam"]
        q, b, d = D.q, D.b, D.d
        pscale, qnorm, bnorm, dnorm = D.norms["pscale"], D.norms["qnorm"], D.norms["bnorm"], D.norms["dnorm"]
        # (∞-norms are ≥ 0: max with 0 only where there is no constraint at all)
        pres = pscl = None
        if p:
            pres = _amax(req)
            pscl = torch.maximum(_amax(Az), bnorm)
        if m:
            pres = _amax(rin) if pres is None else torch.maximum(pres, _amax(rin))
            ci = torch.maximum(torch.maximum(_amax(Cz), dnorm), _amax(s))
            pscl = ci if pscl is None else torch.maximum(pscl, ci)
        if pres is None:
            pres = torch.zeros(z.shape[0], dtype=dtype, device=device)
            pscl = torch.ones(z.shape[0], dtype=dtype, device=device)
        else:
            pscl = pscl.clamp(min=1.0)
        dres = _amax(rd)
        dscl = torch.maximum(_amax(Pz), qnorm)
        if p:
            dscl = torch.maximum(dscl, _amax(ATl))
        if m:
            dscl = torch.maximum(dscl, _amax(CTm))
        dscl = dscl + 1.0
        p_ok = pres <= eps * pscl
        d_ok = dres <= eps * dscl
        conv = p_ok & d_ok & (gap <= eps * gscl)

        # ---------------- infeasibility certificates (only for instances that are not converging),
        # from products already computed: the iterates and their change since the last check
        Ay = (ATl + CTm) if (p and m) else (ATl if p else (CTm if m else torch.zeros_like(z)))
        radius = 1e3 * (1.0 + _amax(z))
        have_prev = S["have_prev"]

        def _pcert(lv, mv, Ayv):
            # y = (λ, μ) normalized: Aᵀŷ_λ + Cᵀŷ_μ = r and bᵀŷ_λ + dᵀŷ_μ = v < 0 prove that no
            # feasible z has |rᵀz| < −v, i.e. none within ‖z‖∞ ≤ −v/‖r‖₁. Accept when r is
            # tiny (a certificate) or when that ball is much larger than the iterates.
            yn = torch.maximum(_amax(lv), _amax(mv)).clamp(min=tiny)
            r = Ayv / yn.unsqueeze(-1)
            val = ((b * lv).sum(-1) if p else 0.0) + ((d * mv).sum(-1) if m else 0.0)
            val = val / yn
            small = (_amax(r) <= eps_inf * (Ascale + Cscale)) | (r.abs().sum(-1) * radius <= -val)
            return small & (val < -eps_inf), yn

        def _dcert(x, Px, Ax, Cx):
            xn = _amax(x).clamp(min=tiny)
            okc = _amax(Px) <= eps_inf * pscale * xn
            if p:
                okc = okc & (_amax(Ax) <= eps_inf * Ascale * xn)
            if m:
                okc = okc & (Cx.amax(-1) <= eps_inf * Cscale * xn)
            return okc & ((q * x).sum(-1) < -eps_inf * qnorm.clamp(min=tiny) * xn), xn

        if m or p:
            c1, ynorm = _pcert(lam, mu, Ay)
            dmu_s = mu - S["prev_mu"] if m else mu
            c2, dyn = _pcert(lam - S["prev_lam"], dmu_s, Ay - S["prev_Ay"])
            if m:
                c2 = c2 & (dmu_s.amin(-1) >= -eps_inf * dyn)
            pinf = ((c1 & (ynorm > 1.0 / eps_inf ** 0.5)) | (c2 & have_prev)) & ~p_ok
        else:
            pinf = torch.zeros(z.shape[0], dtype=torch.bool, device=device)
        e1, zn = _dcert(z, Pz, Az, Cz)
        e2, _ = _dcert(z - S["prev_z"], Pz - S["prev_Pz"], Az - S["prev_Az"] if p else None,
                       Cz - S["prev_Cz"] if m else None)
        dinf = ((e1 & (zn > 1.0 / eps_inf ** 0.5)) | (e2 & have_prev)) & ~d_ok

        done, status = S["done"], S["status"]
        new_conv = conv & ~done
        status = torch.where(new_conv, SOLVED, status)
        done = done | conv
        # a certificate must be seen twice (not necessarily in consecutive checks)
        pinf_cnt = S["pinf_cnt"] + (pinf & ~done).to(torch.int64)
        dinf_cnt = S["dinf_cnt"] + (dinf & ~done).to(torch.int64)
        pinf_hit = (pinf_cnt >= 2) & ~done
        dinf_hit = (dinf_cnt >= 2) & ~done & ~pinf_hit
        status = torch.where(pinf_hit, PINF, status)
        status = torch.where(dinf_hit, DINF, status)
        done = done | pinf_hit | dinf_hit
        # repeated factorization failures: a certificate seen once decides, else NUMERICAL
        numfail = (S["nfail"] >= 8) & ~done
        fail_st = torch.where(pinf_cnt > 0, PINF, torch.where(dinf_cnt > 0, DINF, NUM))
        status = torch.where(numfail, fail_st, status)
        done = done | numfail

        # stall: no halving of the worst scaled residual for `stall_iters` iterations
        merit = torch.maximum(torch.maximum(pres / pscl, dres / dscl), gap / gscl)
        improved = merit < 0.5 * S["best"]
        best = torch.where(improved, merit, S["best"])
        last_impr = torch.where(improved, S["it"], S["last_impr"])
        stalled = (S["it"] - last_impr >= stall_iters) & ~done
        status = torch.where(stalled, NUM, status)
        done = done | stalled
        upd = dict(done=done, status=status, pinf_cnt=pinf_cnt, dinf_cnt=dinf_cnt, best=best,
                   last_impr=last_impr, have_prev=torch.ones_like(have_prev),
                   prev_z=z, prev_Pz=Pz, prev_lam=lam, prev_mu=mu, prev_Ay=Ay)
        if p:
            upd["prev_Az"] = Az
        if m:
            upd["prev_Cz"] = Cz
        return upd, (pres, pscl, dres, dscl)

    def _make_body(D):
        """``check_every`` steps, then the check at the new iterate, as one function of the state:
        what the CUDA graph captures."""
        # a captured step factorizes every time: a factor cached by an earlier (warm-up or eager)
        # call is a tensor outside the graph's static data, which a cached graph would keep reading
        # after later calls refilled that data
        D.newton.cache_const, D.newton._const = False, None

        def one(S):
            return {**S, **_step(S, _resid(S["z"], S["s"], S["mu"], S["lam"], D=D), D=D)}

        def chk(S):
            return {**S, **_check(S, _resid(S["z"], S["s"], S["mu"], S["lam"], D=D), D=D)[0]}

        if compile:
            # fuse the element-wise work between the factorizations and solves (torch.compile;
            # the linear algebra stays ATen/cuSOLVER): compiled once per captured graph
            one, chk = torch.compile(one, dynamic=False), torch.compile(chk, dynamic=False)

        def body(S):
            for _ in range(check_every):
                S = one(S)
            return chk(S)
        # captured as one graph per part (see _capture): the host launches the next steps while the
        # device runs the first
        body.parts = ((one, check_every), (chk, 1))
        return body

    if compile and not use_graph:
        warnings.warn(f"ipm_solve: compile=True compiles the captured CUDA-graph iteration; it has no effect "
                      f"here (device {device.type}, cuda_graph={cuda_graph}, trace given: {trace is not None}) "
                      "and the iterations run eagerly.", stacklevel=2)
    def _gkey(D, Bc):
        if not (use_graph and graph_cache):
            return None
        # cache key: everything the captured iterations depend on besides tensor values
        # (the thread and stream too: a cached graph's static buffers are reused only by calls
        # that are ordered after one another on the device)
        return (fm, dtype, str(device), Bc, n, m, p, separate_steps, float(step_fraction), int(refine),
                check_every, eps, eps_inf, int(stall_iters), _policy_key(), bool(compile), D.signature(),
                threading.get_ident(),
                torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    gkey = _gkey(live, B) if fused_out is None else None
    graph = None
    # eager float64 dual form: carry P z, Aᵀλ, Cᵀμ, A z, C z and M y from step to step (see _step)
    # instead of recomputing them — on the CPU each product is a pass over a (B, ·, n) matrix that
    # does not fit in cache; recomputed exactly every `exact_every` iterations
    track = fm == "dual" and f64 and not use_graph and m > 0
    newton.tracking = track
    trk: Dict[str, Any] = {}
    exact_every = 5
    # tail compaction (captured iterations only): once few instances are left, continue on those
    # alone; `full` holds the whole batch's state, `gidx` the current rows' places in it
    full: Optional[Dict[str, Tensor]] = None
    gidx: Optional[Tensor] = None
    Bc = B
    # the iterate is checked after every `check_every`-th step and after the last one (max_iter)
    it = 0
    checked = -1                      # the iteration whose iterate the last check saw
    # when the checks come (every `check_every` steps, more often in the tail: _CheckSchedule); the
    # same for the captured and the eager iterations
    # (where the tail compaction applies, it deals with the tail: see TAIL_CHECKS)
    sched = _CheckSchedule(check_every, B, TAIL_CHECKS and SPLIT_GRAPHS
                           and not (COMPACT and B * max(n, m + p) ** 2 >= COMPACT_MIN_WORK))
    while fused_out is None:
        if use_graph and it == max(checked, 0) and sched.next <= max_iter:
            # GPU: the steps up to the next check and the check per graph replay; the host reads one
            # count per replay
            if graph is None:
                with torch.profiler.record_function("dqp::ipm_capture"):
                    graph, st = _graph_for(gkey, live, _make_body, S)
                if graph is None:
                    use_graph = False
                    continue
                S = st
            with torch.profiler.record_function("dqp::ipm_replay"):
                steps = sched.next - it
                if sched.adaptive:
                    graph.replay(steps)           # (a _GraphChain: a graph per step)
                else:
                    graph.replay()
                it += steps
                checked = it
                nleft = int((~S["done"]).sum())
                if nleft == 0 or it == max_iter:
                    break
                sched.checked(it, nleft)
            bucket = _compact_size(nleft, Bc, max(n, m + p))
            if bucket is not None:
                with torch.profiler.record_function("dqp::ipm_compact"):
                    if full is None:
                        # (the graph's static buffers: copied, a cached graph overwrites them later)
                        full = {k: v.clone() for k, v in S.items() if v.dim() >= 1}
                    else:
                        _scatter_state(full, gidx, S)
                    run = torch.nonzero(~S["done"]).squeeze(-1)
                    # pad with finished rows (there are Bc − nleft ≥ bucket − nleft of them): they take
                    # no steps, keep their values and do not count as running in later reads
                    fin = torch.nonzero(S["done"]).squeeze(-1)[:bucket - nleft]
                    idx = torch.cat([run, fin])
                    gidx = idx if gidx is None else gidx[idx]
                    S = {k: (v[idx] if v.dim() >= 1 else v.clone()) for k, v in S.items()}
                    live = live.subset(idx)
                    Bc = bucket
                    gkey = _gkey(live, Bc)
                    graph = None
                    _graph_stats["compactions"] += 1
            continue
        # ---------------- eager iteration (CPU; on the GPU the tail after the last replay)
        with torch.profiler.record_function("dqp::ipm_eager_iteration"):
            check = (it == sched.next or it == max_iter) and checked != it
            use_T = track and "Pz" in trk and it % exact_every != 0
            R = _resid(S["z"], S["s"], S["mu"], S["lam"], D=live, T=trk if use_T else None)
            if track:
                trk.update(Pz_cur=R[0], ATl_cur=R[2], CTm_cur=R[3])
                if not use_T:
                    trk.pop("My", None)          # exact M y too at the exact iterations
            scaled = (None, None, None, None)
            stop = False
            if check:
                upd, scaled = _check(S, R, D=live)
                if use_T and bool((upd["done"] & ~S["done"]).any()):
                    # a tracked product drifts from the exact one and can hide a residual (q scaled by
                    # 1e8: SOLVED with a true scaled primal residual of 1.6e-7 against eps = 1e-9):
                    # an element stops only on exact products
                    R = _resid(S["z"], S["s"], S["mu"], S["lam"], D=live)
                    trk.update(Pz_cur=R[0], ATl_cur=R[2], CTm_cur=R[3])
                    trk.pop("My", None)
                    upd, scaled = _check(S, R, D=live)
                S = {**S, **upd}
                checked = it
                nleft = int((~S["done"]).sum())
                stop = it == max_iter or nleft == 0
                sched.checked(it, nleft)
            if not stop:
                S = {**S, **_step(S, R, D=live, it=it, scaled=scaled)}
                it += 1
        if stop:
            break
    if fused_out is not None:
        S = fused_out
    elif full is not None:
        _scatter_state(full, gidx, S)
        S = full
    elif graph is not None:
        # the static buffers belong to the graph (a cached graph overwrites them in a later call)
        S = {k: S[k].clone() for k in ("z", "s", "mu", "lam", "status", "iters")}
    z, s, mu, lam, status, iters = S["z"], S["s"], S["mu"], S["lam"], S["status"], S["iters"]
    graph = st = S = None

    # ---------------- undo the row scaling
    lam_out = lam / a_scale if p else None
    mu_out = mu / c_scale if m else None
    s_out = s * c_scale if m else s
    factors = None
    polished = None
    if fused_out is not None and "pflag" in fused_out:
        pf = fused_out["pflag"]
        polished = dict(active=fused_out["active"] if m else None, polished=(pf & 1) != 0,
                        fallback=(pf & 2) != 0, ok=(pf & 4) != 0, LS=fused_out["LS"])
    if fm == "dual":
        sc = _row_scales(a_scale, c_scale, B)                                  # (B, k) row norms
        if newton.PiAbt.dim() == 2:
            # (P⁻¹Āᵀ is shared only when P, A and C are: their row norms are then one vector)
            sc = sc[0]
        factors = dict(L=newton.LP, PiAbt=newton.PiAbt * sc.unsqueeze(-2),
                       M=newton.M * sc.unsqueeze(-1) * sc.unsqueeze(-2))
    res = IPMResult(z=z, lam=lam_out, mu=mu_out, s=s_out, status=status, iterations=iters, form=fm,
                    factors=factors, polish=polished)
    if fallback64 and dtype != torch.float64:
        bad = (status == int(Status.MAX_ITER)) | (status == NUM)
        if bool(bad.any()):
            res = _fallback64(res, bad, (P0, q0, C_u, d0, A_u, b0), dict(
                eps=None, max_iter=max_iter, check_every=check_every, form=form,
                separate_steps=separate_steps, step_fraction=step_fraction, refine=refine,
                stall_iters=stall_iters, cuda_graph=cuda_graph, graph_cache=False))
    return res


class _GraphData:
    """The tensors one interior-point iteration reads besides its state: the (row-scaled) data
    and the Newton solver. A CUDA graph is captured on a private copy (:meth:`static`) that
    later calls with the same shapes refill (:meth:`refill`), so the graph is captured once."""

    _DATA = ("P", "q", "C", "d", "A", "b")
    # Newton-solver tensors computed before the loop and only read inside it
    _NEWTON = {"dual": ("LP", "Abar", "PiAbt", "M", "Md", "_Piq", "_g"), "primal": ("reg_p",)}

    def __init__(self, P, q, C, d, A, b, newton, norms: Optional[Dict[str, Optional[Tensor]]] = None):
        self.P, self.q, self.C, self.d, self.A, self.b, self.newton = P, q, C, d, A, b, newton
        # per-instance norms of the data that the convergence check reads (None where absent)
        self.norms: Dict[str, Optional[Tensor]] = dict(norms or {})

    def _newton_inputs(self):
        """Newton tensors read inside the loop, less those that are data tensors themselves."""
        nt = self.newton
        data = [getattr(self, k) for k in self._DATA]
        # (the float64 dual form uses the identities of set_point: no solve with P in the loop)
        skip = ("LP",) if nt.form == "dual" and getattr(nt, "_point", None) is not None else ()
        return [(k, getattr(nt, k)) for k in self._NEWTON[nt.form]
                if k not in skip and isinstance(getattr(nt, k, None), Tensor)
                and not any(getattr(nt, k) is t for t in data)]

    def signature(self) -> tuple:
        """Shapes (and so code paths) of every tensor the iteration reads."""
        sh = lambda t: None if t is None else tuple(t.shape)
        return (tuple(sh(getattr(self, k)) for k in self._DATA),
                tuple((k, tuple(t.shape)) for k, t in self._newton_inputs()),
                tuple((k, sh(t)) for k, t in sorted(self.norms.items())))

    def nbytes(self) -> int:
        """Device memory a :meth:`static` copy takes."""
        ts = ([getattr(self, k) for k in self._DATA] + [t for _, t in self._newton_inputs()]
              + list(self.norms.values()))
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def static(self) -> "_GraphData":
        """A copy on freshly allocated tensors (materialized: expanded views become dense)."""
        cl = lambda t: None if t is None else t.clone(memory_format=torch.contiguous_format)
        nt = copy.copy(self.newton)
        st = _GraphData(*(cl(getattr(self, k)) for k in self._DATA), nt,
                        {k: cl(t) for k, t in self.norms.items()})
        for k, t in self._newton_inputs():
            setattr(nt, k, cl(t))
        for k in self._NEWTON[nt.form] + ("P", "C", "A"):        # aliases of the data
            for dk in self._DATA:
                if getattr(self, dk) is not None and getattr(self.newton, k, None) is getattr(self, dk):
                    setattr(nt, k, getattr(st, dk))
        if nt.form == "dual":
            nt._a = nt._pending = None
            if getattr(nt, "_point", None) is not None:
                nt._point = (st.q,)
                nt.LP = None                     # not read in the loop; do not keep it alive
        return st

    # per-instance tensors (B, ·) whatever their rank; the matrices are batched when 3-D
    _VECTORS = ("q", "d", "b", "Md", "_Piq", "_g", "reg_p")

    def subset(self, idx: Tensor) -> "_GraphData":
        """The data of the batch rows ``idx`` (with a Newton solver for them), for tail compaction."""
        def pick(name, t):
            if not isinstance(t, Tensor):
                return t
            if name in self._VECTORS:
                return t[idx] if t.dim() >= 1 else t
            return _index_factor(t, idx) if t.dim() == 3 else t
        nt = copy.copy(self.newton)
        nt.B = int(idx.numel())
        for k in self._NEWTON[nt.form] + ("P", "C", "A"):
            if hasattr(nt, k):
                setattr(nt, k, pick(k, getattr(nt, k)))
        sub = _GraphData(*(pick(k, getattr(self, k)) for k in self._DATA), nt,
                         {k: pick("q", t) for k, t in self.norms.items()})
        for k in self._NEWTON[nt.form] + ("P", "C", "A"):        # keep aliases of the data aliases
            for dk in self._DATA:
                if getattr(self, dk) is not None and getattr(self.newton, k, None) is getattr(self, dk):
                    setattr(nt, k, getattr(sub, dk))
        nt._const = nt._Sbuf = None
        if nt.form == "dual":
            nt._a = nt._pending = None
            if getattr(self.newton, "_point", None) is not None:
                nt._point = (sub.q,)
        return sub

    def refill(self, src: "_GraphData") -> None:
        """Copy the values of ``src`` (same signature) into these tensors."""
        for k in self._DATA:
            t = getattr(self, k)
            if t is not None:
                t.copy_(getattr(src, k))
        for k, t in src._newton_inputs():
            getattr(self.newton, k).copy_(t)
        for k, t in src.norms.items():
            if t is not None:
                self.norms[k].copy_(t)


def _graph_device_ok(device: torch.device) -> bool:
    """Whether iterations on ``device`` are captured as CUDA graphs."""
    return device.type == "cuda" and torch.cuda.is_available()


#: Tail compaction of the captured iterations: when at most ``COMPACT_FRACTION`` of the current
#: batch is still running after a replay, the rest of the solve runs on those instances alone
#: (padded with finished ones to a power of two, at least 8, so that a training loop meets few batch
#: sizes and their graphs stay cached). Only where the batch is large enough for the saving to outweigh the new
#: graph: ``B·k² ≥ COMPACT_MIN_WORK`` for the factorized size ``k``. ``COMPACT = False``: never.
COMPACT = True
COMPACT_FRACTION = 0.25
COMPACT_MIN_WORK = 4_000_000


def _compact_size(nleft: int, Bc: int, k: int) -> Optional[int]:
    """Batch size to compact to (``None``: stay) with ``nleft`` of ``Bc`` instances running."""
    if not COMPACT or nleft > COMPACT_FRACTION * Bc or Bc * k * k < COMPACT_MIN_WORK:
        return None
    bucket = max(8, 1 << max(nleft - 1, 0).bit_length())
    return bucket if bucket < Bc else None


def _scatter_state(full: Dict[str, Tensor], gidx: Tensor, S: Dict[str, Tensor]) -> None:
    """Write the per-instance entries of the compacted state ``S`` into ``full`` at rows ``gidx``."""
    for k, v in full.items():
        v[gidx] = S[k]


# captured iterations, keyed by shapes/dtype/device/form/options (LRU); see _graph_for
_GRAPH_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
GRAPH_CACHE_SIZE = 8
# the cached static copies of the data (P, C, the Newton factors) live on the device as long as
# their entry: entries are also evicted to keep their total below this many bytes, and a problem
# larger than it is captured per call without caching (it is GPU-bound; launches matter little)
GRAPH_CACHE_MAX_BYTES = 2 * 1024 ** 3
_graph_stats = {"captures": 0, "hits": 0, "compactions": 0}


def clear_graph_cache() -> None:
    """Drop the cached CUDA graphs of :func:`ipm_solve` and :func:`graphed_call` (frees their memory pools)."""
    _GRAPH_CACHE.clear()
    _FN_GRAPHS.clear()
    _SETUP_DEFER_FAILED.clear()


def _graph_for(key, live, make_body, state):
    """The CUDA graph of ``make_body(data)`` (a function of the state dict) for ``live``'s data:
    from the cache (inputs and state copied into its static buffers) or freshly captured.
    ``(graph, static_state)`` or ``(None, None)`` when the capture fails. ``key=None``: capture
    without caching."""
    with torch.no_grad():
        return _graph_for_impl(key, live, make_body, state)


def _graph_for_impl(key, live, make_body, state):
    if key is not None and live.nbytes() > GRAPH_CACHE_MAX_BYTES:
        key = None
    ent = _GRAPH_CACHE.get(key) if key is not None else None
    if ent is not None:
        graph, st, sdata = ent
        _GRAPH_CACHE.move_to_end(key)
        sdata.refill(live)
        for k, t in state.items():
            st[k].copy_(t)
        _graph_stats["hits"] += 1
        return graph, st
    sdata = live.static() if key is not None else live
    graph, st = _capture(make_body(sdata), state)
    if graph is not None:
        _graph_stats["captures"] += 1
        if key is not None:
            _GRAPH_CACHE[key] = (graph, st, sdata)
            while len(_GRAPH_CACHE) > max(int(GRAPH_CACHE_SIZE), 0) or (
                    len(_GRAPH_CACHE) > 1
                    and sum(e[2].nbytes() for e in _GRAPH_CACHE.values()) > GRAPH_CACHE_MAX_BYTES):
                _GRAPH_CACHE.popitem(last=False)
    return graph, st


#: Capture the ``check_every`` steps and the check of a replay as one CUDA graph per step (and one
#: for the check), replayed in sequence, instead of one graph for all. The device starts a graph
#: only once ``cudaGraphLaunch`` has returned, which takes host time in proportion to the graph's
#: nodes (~0.8 ms for the ~900 kernels of 4 steps at B=128, n=m=100 on an H100, while the device
#: waits): with one graph per step the host launches the later steps while the device runs the
#: first, and the device waits for one step's launch per replay only.
SPLIT_GRAPHS = True


class _GraphChain:
    """Graphs replayed in sequence as one (``parts``: (graph, repeats) pairs)."""

    def __init__(self, parts):
        self.parts = parts

    def replay(self, steps: Optional[int] = None) -> None:
        """Replay the parts; ``steps``: repeat the first part (an IPM step) that often instead."""
        for i, (g, reps) in enumerate(self.parts):
            for _ in range(steps if (i == 0 and steps is not None) else reps):
                g.replay()


#: Check more often in the tail of a solve: once at most ``TAIL_FRACTION`` of the batch is still
#: running, the next checks come after 1, 1, 2, 4, … steps (at most ``check_every``) instead of
#: every ``check_every`` steps, so that the last instances do not step up to ``check_every − 1``
#: times past their convergence while holding up the batch. Needs a graph per step
#: (:data:`SPLIT_GRAPHS`); the eager iterations follow the same schedule. On qpth's generator
#: (B=128, n=m=100) the slowest elements converge after 13 steps: 13 steps and checks at 4, 8, 12,
#: 13 instead of 16 steps and checks at 4, 8, 12, 16 (H100, forward+backward: 17.7 vs 19.5 ms).
#: Only for batches too small for the tail compaction (:data:`COMPACT`): with it, the extra checks
#: also compact to more sizes (B=1024, n=m=100: 42.7 vs 39.8 ms; B=128, n=m=500: 118.5 vs 117.7 ms).
TAIL_CHECKS = True
TAIL_FRACTION = 0.1


class _CheckSchedule:
    """The iterations at which the IPM checks convergence (see :data:`TAIL_CHECKS`): ``next``."""

    def __init__(self, check_every: int, batch: int, adaptive: bool):
        self.ce, self.batch = check_every, batch
        self.adaptive = adaptive and check_every > 1
        self.next = check_every
        self.tail = 0

    def checked(self, it: int, nleft: int) -> None:
        """Record a check at iteration ``it`` with ``nleft`` instances still running."""
        steps = self.ce
        if self.adaptive and nleft <= TAIL_FRACTION * self.batch:
            steps = min(self.ce, 1 << max(self.tail - 1, 0))
            self.tail += 1
        self.next = it + steps


def _write_back(st: Dict[str, Tensor], out: Dict[str, Tensor]) -> None:
    """Copy the entries of ``out`` into the buffers of ``st`` (those that are new tensors)."""
    for k, buf in st.items():
        if out[k] is not buf:
            buf.copy_(out[k])


def _run_parts(parts, st: Dict[str, Tensor]) -> None:
    """Run ``parts`` ((function, repeats) pairs) as their graphs will: each call reads the buffers of
    ``st`` and writes its result back into them. The capture's warm-up: it initializes library
    handles and workspaces, and calls each function (compiled with ``torch.compile`` under
    ``compile=True``) on inputs laid out as in the capture: a function that saw other strides in the
    warm-up would be compiled again while capturing, which invalidates the capture."""
    for fn, reps in parts:
        for _ in range(reps):
            _write_back(st, fn(st))


def _capture(body, state):
    """Capture ``state ← body(state)`` (dicts of tensors) as a CUDA graph; ``(graph, static_state)``.
    With ``body.parts`` ((function, repeats) pairs that make up body) and :data:`SPLIT_GRAPHS`: one
    graph per part, sharing a memory pool, as a :class:`_GraphChain`."""
    try:
        with torch.no_grad():
            parts = (getattr(body, "parts", None) if SPLIT_GRAPHS else None) or ((body, 1),)
            st = {k: t.clone() for k, t in state.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _run_parts(parts, {k: t.clone() for k, t in state.items()})   # warm-up
            torch.cuda.current_stream().wait_stream(side)
            graphs = []
            for fn, reps in parts:
                # each part writes its result into the static state: a part's graph reads only st and
                # the static data, so the parts can share one pool (they run one after the other)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=graphs[0][0].pool() if graphs else None):
                    _write_back(st, fn(st))
                graphs.append((g, reps))
        return (graphs[0][0] if len(graphs) == 1 else _GraphChain(graphs)), st
    except Exception as exc:  # pragma: no cover - depends on the CUDA/torch build
        logger.warning("ipm_solve: CUDA graph capture failed (%s: %s); running eagerly", type(exc).__name__, exc)
        return None, None


# --------------------------------------------------------------------------------------------
# whole functions as cached CUDA graphs (the layer's polish and backward for small batches)
# --------------------------------------------------------------------------------------------

def _flatten(d: Dict[str, Any]) -> Dict[str, Tensor]:
    """Tensors of ``d`` with their attached inverses as entries of their own (``key@attr[i]``)."""
    out: Dict[str, Tensor] = {}
    for k, v in d.items():
        if not isinstance(v, Tensor):
            continue
        out[k] = v
        for a in _ATTACHED:
            att = getattr(v, a, None)
            if isinstance(att, Tensor):
                out[f"{k}@{a}"] = att
            elif att is not None:
                for i, t in enumerate(att):
                    out[f"{k}@{a}[{i}]"] = t
    return out


def _unflatten(flat: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of :func:`_flatten`: attach the ``key@attr`` entries to their tensors again."""
    out = {k: v for k, v in flat.items() if "@" not in k}
    lists: Dict[Tuple[str, str], Dict[int, Tensor]] = {}
    for k, v in flat.items():
        if "@" not in k:
            continue
        base, a = k.split("@", 1)
        if a.endswith("]"):
            a, i = a[:-1].split("[")
            lists.setdefault((base, a), {})[int(i)] = v
        else:
            setattr(out[base], a, v)
    for (base, a), items in lists.items():
        setattr(out[base], a, [items[i] for i in range(len(items))])
    return out


_FN_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()
FN_GRAPH_CACHE_SIZE = 16
#: Device memory the graphs of :func:`graphed_call` may hold (their static inputs and outputs,
#: counted ×3 for the intermediates in their pools): None = a tenth of the device's memory. A call
#: whose graph would not fit runs eagerly; older graphs are evicted to make room.
FN_GRAPH_MAX_BYTES: Optional[int] = None


def _fn_graph_budget(device: torch.device) -> int:
    if FN_GRAPH_MAX_BYTES is not None:
        return int(FN_GRAPH_MAX_BYTES)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 10
    return 2 * 1024 ** 3


def _nbytes(d: Dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in d.values())


def _capture_fn(fn, static_in: Dict[str, Tensor]):
    """Capture ``fn(static_in)`` (a dict of tensors → dict of tensors); ``(graph, static_out)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(_unflatten({k: v.clone() for k, v in static_in.items()}))         # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _flatten(fn(_unflatten(static_in)))
    return graph, out


@_on_data_device
def graphed_call(key: tuple, fn, inputs: Dict[str, Any],
                 fresh: Optional[Callable[[str], bool]] = None) -> Optional[Dict[str, Tensor]]:
    """``fn(inputs)`` replayed from a cached CUDA graph: the inputs are copied into the graph's
    static buffers and the outputs are returned as fresh tensors (attached inverses included).

    ``fresh``: only the outputs whose (flattened) name it accepts are copied; the others are the
    graph's static buffers themselves, for a caller that has queued all its reads of them before it
    returns (the next replay, on the same stream, comes after those reads).

    ``fn`` takes and returns dicts of tensors and must not synchronize with the host or branch on
    tensor values; the key must determine everything else it depends on (shapes, dtypes,
    options). Returns None when the graph cannot be captured (the caller runs ``fn`` eagerly).
    """
    flat = _flatten(inputs)
    dev = next(iter(flat.values())).device
    # besides the caller's key: the shapes, the module-level solve policies the code reads while
    # capturing, and the thread and stream (static buffers are reused by ordered calls only)
    key = key + tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in sorted(flat.items())) + (
        _policy_key(), threading.get_ident(),
        torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0)
    ent = _FN_GRAPHS.get(key)
    with torch.no_grad():
        if ent is None:
            budget = _fn_graph_budget(dev)
            if 3 * _nbytes(flat) > budget:
                return None
            while _FN_GRAPHS and 3 * (_nbytes(flat) + sum(_nbytes(e[1]) + _nbytes(e[2]) for e in _FN_GRAPHS.values())) > budget:
                _FN_GRAPHS.popitem(last=False)
            static_in = {k: v.clone(memory_format=torch.contiguous_format) for k, v in flat.items()}
            try:
                graph, static_out = _capture_fn(fn, static_in)
            except Exception as exc:  # pragma: no cover - depends on the CUDA/torch build
                logger.warning("graphed_call: CUDA graph capture failed (%s: %s); running eagerly",
                               type(exc).__name__, exc)
                return None
            _graph_stats["captures"] += 1
            _FN_GRAPHS[key] = ent = (graph, static_in, static_out)
            while len(_FN_GRAPHS) > FN_GRAPH_CACHE_SIZE:
                _FN_GRAPHS.popitem(last=False)
        else:
            _FN_GRAPHS.move_to_end(key)
            _graph_stats["hits"] += 1
        graph, static_in, static_out = ent
        for k, v in flat.items():
            static_in[k].copy_(v)
        graph.replay()
        return _unflatten({k: v.clone() if fresh is None or fresh(k) else v for k, v in static_out.items()})


def _fallback64(res: IPMResult, bad: Tensor, data, kw) -> IPMResult:
    """Re-solve the instances ``bad`` in float64 and write them back (cast to res's dtype)."""
    idx = torch.nonzero(bad).squeeze(-1)
    P, q, C, d, A, b = data
    sel = lambda M, nd: None if M is None else (M[idx] if M.dim() == nd else M).double()
    logger.info("ipm_solve: re-solving %d float32 instances in float64", idx.numel())
    r64 = ipm_solve(sel(P, 3), sel(q, 2), sel(C, 3), sel(d, 2), sel(A, 3), sel(b, 2), fallback64=False, **kw)
    dt = res.z.dtype
    def put(dst, src):
        if dst is None:
            return None
        dst = dst.clone()
        dst[idx] = src.to(dt)
        return dst
    status = res.status.clone()
    status[idx] = r64.status
    iters = res.iterations.clone()
    iters[idx] = iters[idx] + r64.iterations
    return IPMResult(z=put(res.z, r64.z), lam=put(res.lam, r64.lam), mu=put(res.mu, r64.mu),
                     s=put(res.s, r64.s) if res.s.shape[-1] else res.s, status=status, iterations=iters,
                     form=res.form)


@register_solver
class IPMSolver(ForwardSolver):
    """dqp's built-in batched interior-point method (torch; CPU and CUDA; float32/float64)."""

    name = "dqp_ipm"
    aliases = ("ipm", "dqp")
    modules = ("torch",)
    dense = True
    sparse = False
    batched = True
    duals = True
    description = "built-in batched primal-dual interior point (Mehrotra), pure torch, CPU and GPU"

    _KEYS = ("eps", "max_iter", "check_every", "form", "separate_steps", "step_fraction", "eps_infeasible",
             "refine", "stall_iters", "fallback64", "cuda_graph", "graph_cache", "compile")

    def tolerance_keywords(self, eps_abs: float, eps_rel: float) -> Dict[str, Any]:
        return {"eps": max(min(eps_abs, eps_rel), 1e-14)}

    def solve_batch(self, P, q, C=None, d=None, A=None, b=None, *, keywords: Optional[Dict[str, Any]] = None,
                    warm=None) -> IPMResult:
        """Solve a batch given as torch tensors (None for absent constraints).

        ``keywords`` may hold any keyword of :func:`ipm_solve` (eps, max_iter, check_every, form,
        separate_steps, step_fraction, eps_infeasible). ``warm`` is accepted and ignored: an
        interior-point method gains little from a warm start.
        """
        kw = dict(keywords or {})
        unknown = sorted(set(kw) - set(self._KEYS))
        if unknown:
            raise SettingsError(f"qp_solver='dqp_ipm' does not take the keywords {unknown}; "
                                f"valid: {', '.join(self._KEYS)}.")
        return ipm_solve(P, q, C, d, A, b, **kw)
