"""Blocked batched Cholesky factorization and solves built from batched matrix products.

cuSOLVER's batched ``potrf`` and cuBLAS's batched one-right-hand-side ``trsm`` are latency-bound
for the matrices a batched IPM factorizes (k = 100…500): on an H100, float64, B=128, k=500, one
factorization takes 1.8 ms and one solve (two triangular sweeps) 0.93 ms, while reading the whole
factor once takes ~0.08 ms. The routines here split the
matrix into ``nb × nb`` blocks and do almost all of the work in batched matrix products, which
run near the memory or compute bound:

- :func:`blocked_cholesky` — right-looking: factorize the diagonal block (the library's small
  batched Cholesky), invert that triangle (a small many-right-hand-side triangular solve), form
  the block column as a product with that inverse, and update the trailing matrix with one
  product. The inverses of the diagonal blocks are kept.
- :func:`blocked_chol_solve` — ``(L Lᵀ)⁻¹ r`` by block forward and backward substitution: per
  block one product with the already-solved part and one with the diagonal block's inverse.

Same torch code on the CPU and CUDA, no host synchronization (failures are reported in
``info``, as ``torch.linalg.cholesky_ex`` does), so it can be captured in a CUDA graph. Solves
with a factor from here agree with a plain Cholesky solve to round-off (the diagonal-block
inverses are as well conditioned as the blocks; tests/test_blocked.py). Which path the IPM uses
on which device and shape is decided in :mod:`dqp.solvers.ipm` from measurements.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["blocked_cholesky", "blocked_chol_solve", "diag_block_inverses", "block_starts", "tri_inverse", "DiagFactor"]


def block_starts(k: int, nb: int) -> List[Tuple[int, int]]:
    """``[(j0, j1), ...]`` block ranges of size ``nb`` covering ``0..k`` (the last may be smaller)."""
    if nb < 1:
        raise ValueError(f"block size nb must be ≥ 1, got {nb}")
    return [(j0, min(j0 + nb, k)) for j0 in range(0, k, nb)]


#: Largest triangle inverted by one triangular solve; bigger ones are split in two (see tri_inverse).
TRI_INVERSE_LEAF = 64


def tri_inverse(Ljj: Tensor) -> Tensor:
    """Inverse of a batch of lower-triangular blocks.

    Up to ``TRI_INVERSE_LEAF`` rows: one many-right-hand-side triangular solve. Larger: by halves,
    ``[[L11, 0], [L21, L22]]⁻¹ = [[X11, 0], [−X22 L21 X11, X22]]`` (as LAPACK's ``trtri``), so most
    of the work is two matrix products — measured on an H100 (B=128, float64), a 128-row inverse
    by one cuBLAS ``trsm`` costs ~160 µs, two 64-row ones ~40 µs each.
    """
    k = Ljj.shape[-1]
    if k <= TRI_INVERSE_LEAF:
        eye = torch.eye(k, dtype=Ljj.dtype, device=Ljj.device).expand(Ljj.shape)
        return torch.linalg.solve_triangular(Ljj, eye, upper=False)
    h = k // 2
    X11 = tri_inverse(Ljj[..., :h, :h])
    X22 = tri_inverse(Ljj[..., h:, h:])
    X = torch.zeros_like(Ljj)
    X[..., :h, :h] = X11
    X[..., h:, h:] = X22
    X[..., h:, :h] = -torch.matmul(X22, torch.matmul(Ljj[..., h:, :h], X11))
    return X


def diag_block_inverses(L: Tensor, nb: int) -> List[Tensor]:
    """Inverses of the diagonal ``nb × nb`` blocks of the batched lower factor ``L`` (B, k, k)."""
    return [tri_inverse(L[..., j0:j1, j0:j1]) for j0, j1 in block_starts(L.shape[-1], nb)]


#: ``diag_factor(W, j0, j1, info) -> L_jj⁻¹``: factorizes the diagonal block ``W[:, j0:j1, j0:j1]`` of
#: a contiguous W in place (lower factor, zeros above), records failures in ``info`` as
#: :func:`blocked_cholesky` does, and returns the block's inverse (``dqp.solvers.fused.chol_block``).
DiagFactor = Callable[[Tensor, int, int, Tensor], Tensor]


def blocked_cholesky(
    M: Tensor, nb: int, overwrite: bool = False, diag_factor: Optional[DiagFactor] = None
) -> Tuple[Tensor, List[Tensor], Tensor]:
    """Batched Cholesky ``M = L Lᵀ`` in ``nb × nb`` blocks.

    Parameters
    ----------
    M : (B, k, k) tensor
        Symmetric positive definite matrices.
    nb : int
        Block size.
    overwrite : bool
        Factorize M's own storage (M must then be contiguous; it becomes L). Default False: a copy.
    diag_factor : callable, optional
        Factorizes and inverts each diagonal block (:data:`DiagFactor`) instead of the library's
        batched Cholesky and :func:`tri_inverse`.

    Returns
    -------
    L : (B, k, k) tensor
        Lower factor, zero above the diagonal.
    dinv : list of (B, nb_j, nb_j) tensors
        Inverses of the diagonal blocks of L (what :func:`blocked_chol_solve` needs).
    info : (B,) int32 tensor
        0 where the factorization succeeded, else the 1-based index of the first non-positive
        pivot (as ``torch.linalg.cholesky_ex``; the rest of that element's L is garbage).
    """
    B, k = M.shape[0], M.shape[-1]
    # the trailing matrix, overwritten by L
    W = M if overwrite else M.clone(memory_format=torch.contiguous_format)
    dinv: List[Tensor] = []
    info = torch.zeros(B, dtype=torch.int32, device=M.device)
    for j0, j1 in block_starts(k, nb):
        if diag_factor is not None:
            Dj = diag_factor(W, j0, j1, info)
        else:
            Ljj, inf = torch.linalg.cholesky_ex(W[:, j0:j1, j0:j1])
            info = torch.where((info == 0) & (inf > 0), inf + j0, info)
            Dj = tri_inverse(Ljj)
            W[:, j0:j1, j0:j1] = Ljj
        dinv.append(Dj)
        if j1 < k:
            panel = torch.matmul(W[:, j1:, j0:j1], Dj.mT)  # L21 = A21 L11⁻ᵀ
            W[:, j1:, j0:j1] = panel
            W[:, j0:j1, j1:] = 0.0
            W[:, j1:, j1:].baddbmm_(panel, panel.mT, alpha=-1.0)  # A22 − L21 L21ᵀ
    return W, dinv, info


def blocked_chol_solve(L: Tensor, dinv: List[Tensor], r: Tensor) -> Tensor:
    """Solve ``L Lᵀ x = r`` with a lower factor L (B, k, k) and its diagonal-block inverses.

    ``r`` is (B, k) or (B, k, j). Only the lower block triangle of L is read.
    """
    vec = r.dim() == 2
    rr = r.unsqueeze(-1) if vec else r
    k = L.shape[-1]
    nb = dinv[0].shape[-1]
    blocks = block_starts(k, nb)
    y = torch.empty_like(rr)
    for (j0, j1), Dj in zip(blocks, dinv):  # L y = r
        t = rr[:, j0:j1]
        if j0:
            t = torch.baddbmm(t, L[:, j0:j1, :j0], y[:, :j0], alpha=-1.0)
        y[:, j0:j1] = torch.matmul(Dj, t)
    x = torch.empty_like(rr)
    for (j0, j1), Dj in zip(reversed(blocks), reversed(dinv)):  # Lᵀ x = y
        t = y[:, j0:j1]
        if j1 < k:
            t = torch.baddbmm(t, L[:, j1:, j0:j1].mT, x[:, j1:], alpha=-1.0)
        x[:, j0:j1] = torch.matmul(Dj.mT, t)
    return x.squeeze(-1) if vec else x
