"""libdqp's ``sparse_helper`` functions, over dqp's own loader and sparse constructor.

* :func:`initialize_torch_from_npz` reads the ``.npz`` files of the dQP repository (pickled SciPy
  matrices under the keys ``Q, q, G, h, A, b``) with :func:`dqp.io.load_problem` and returns torch
  tensors ready for ``dQP_layer(solve_type="sparse")``.
* :func:`csc_torch_to_scipy` / :func:`csc_scipy_to_torch` convert single CSC matrices.

libdqp's differentiable sparse row normalizations (``sparse_row_norm``, ``sparse_row_normalize``)
are not provided: dqp normalizes rows itself with ``normalize_constraints=True``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from dqp.errors import LayoutError
from dqp.io import PathLike, load_problem
from dqp.sparse import sparse_csc_tensor

__all__ = ["initialize_torch_from_npz", "csc_torch_to_scipy", "csc_scipy_to_torch"]


def csc_torch_to_scipy(A: torch.Tensor) -> sp.csc_matrix:
    """A torch sparse CSC tensor as a SciPy ``csc_matrix`` (float64, detached, on the CPU).

    Raises
    ------
    LayoutError
        ``A`` is not a 2-D torch sparse CSC tensor.
    """
    if not isinstance(A, torch.Tensor) or A.layout != torch.sparse_csc or A.dim() != 2:
        what = f"layout {A.layout}, shape {tuple(A.shape)}" if isinstance(A, torch.Tensor) else type(A).__name__
        raise LayoutError(
            f"csc_torch_to_scipy expects a 2-D torch sparse CSC tensor, got {what}; convert with .to_sparse_csc()."
        )
    values = A.values().detach().to("cpu", torch.float64).numpy()
    return sp.csc_matrix((values, A.row_indices().cpu().numpy(), A.ccol_indices().cpu().numpy()), shape=tuple(A.shape))


def csc_scipy_to_torch(A, requires_grad: bool = False) -> torch.Tensor:
    """A SciPy sparse matrix as a torch sparse CSC tensor (float64).

    With ``requires_grad=True`` the stored values are a leaf that receives the gradient (through
    :func:`dqp.sparse_csc_tensor`, O(nnz) backward).
    """
    M = sp.csc_matrix(A, dtype=np.float64)
    M.sort_indices()
    values = torch.tensor(M.data, dtype=torch.float64, requires_grad=requires_grad)
    ccol = torch.tensor(M.indptr, dtype=torch.int64)
    row = torch.tensor(M.indices, dtype=torch.int64)
    if requires_grad:
        return sparse_csc_tensor(ccol, row, values, M.shape)
    return torch.sparse_csc_tensor(ccol, row, values, size=M.shape, dtype=torch.float64)


def initialize_torch_from_npz(
    filename: PathLike,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``Q, q, G, h, A, b`` from a dQP-repository ``.npz`` file, as differentiable torch tensors.

    Matrices come back as torch sparse CSC tensors whose values require grad (their gradient flows
    to the stored nonzeros), vectors as dense float64 leaves with ``requires_grad=True`` (read
    ``h.grad`` after ``backward``). A file without equality constraints gives ``A = b = None``
    (libdqp raised an ``UnboundLocalError`` there).

    The file is read with ``allow_pickle=True`` (the repository stores pickled SciPy matrices): load
    only files you trust. Files in dqp's own pickle-free format (:func:`dqp.io.save_problem`) work
    too.

    Raises
    ------
    InputError
        Missing or malformed file (see :func:`dqp.io.load_problem`).
    """
    problem = load_problem(filename, allow_pickle=True)
    vec = lambda v: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True)  # noqa: E731
    Q = csc_scipy_to_torch(problem.P, requires_grad=True)
    G = csc_scipy_to_torch(problem.C, requires_grad=True)
    A = b = None
    if problem.A is not None:
        A, b = csc_scipy_to_torch(problem.A, requires_grad=True), vec(problem.b)
    return Q, vec(problem.q), G, vec(problem.d), A, b
