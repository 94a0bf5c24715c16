"""Differentiable construction of sparse CSC tensors whose gradients live on the values."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class _CSCFromValues(torch.autograd.Function):
    """``values ↦ CSC tensor`` on a fixed pattern, with an O(nnz) backward."""

    @staticmethod
    def forward(values: torch.Tensor, ccol: torch.Tensor, row: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return torch.sparse_csc_tensor(ccol, row, values, size=tuple(size), dtype=values.dtype, device=values.device)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        values, ccol, row, size = inputs
        ctx.save_for_backward(ccol, row)
        ctx.size = tuple(size)
        ctx.nnz = values.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        ccol, row = ctx.saved_tensors
        if (
            grad.layout == torch.sparse_csc
            and grad.values().shape[0] == ctx.nnz
            and torch.equal(grad.ccol_indices(), ccol)
            and torch.equal(grad.row_indices(), row)
        ):
            return grad.values(), None, None, None
        dense = grad.to_dense() if grad.layout != torch.strided else grad
        cols = torch.repeat_interleave(torch.arange(ctx.size[1], device=ccol.device), ccol.diff())
        return dense[row, cols], None, None, None


def sparse_csc_tensor(ccol_indices: Any, row_indices: Any, values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A torch CSC tensor built from ``values`` so that ``values.grad`` receives its gradient.

    Same arguments as ``torch.sparse_csc_tensor``. Use it for sparse P, C, A whose values are leaves
    (learnable): torch cannot accumulate gradients into a sparse CSC leaf, and the backward of
    ``torch.sparse_csc_tensor`` itself is O(n²); this one is O(nnz).

    Examples
    --------
    >>> vals = torch.tensor([2.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> P = sparse_csc_tensor(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), vals, (2, 2))
    """
    ccol = torch.as_tensor(ccol_indices, dtype=torch.int64, device=values.device)
    row = torch.as_tensor(row_indices, dtype=torch.int64, device=values.device)
    return _CSCFromValues.apply(values, ccol, row, tuple(int(s) for s in size))
