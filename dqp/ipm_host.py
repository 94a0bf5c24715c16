"""Small batches of CUDA data solved on the host CPU.

A batch of a few small QPs is latency-bound on a GPU: its forward and backward are a few hundred
small kernels and host reads, each costing microseconds of launch and synchronization, whatever the
arithmetic. The host CPU runs the same engine (its compiled interior-point loop, the polish and
the backward) on such a batch in less time than the launches take, so :func:`on_host` routes a CUDA
batch whose work ``B·k³`` (``k = n + m + p``) is at most ``IPMOptions.host_max_work`` to the CPU:
the data go to the host in one copy, the solve runs there, and the results come back. The copies
are ordinary differentiable tensor operations, so autograd carries the gradients across them.

Never while a CUDA graph is being captured or ``torch.compile`` traces the call (a host copy is
not allowed there), and never when ``host_max_work`` is 0.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from dqp.cpu_threads import qp_batch_work
from dqp.linsolve.cholesky import compiling
from dqp.linsolve.torch_batched import BatchedKKT
from dqp.solvers.ipm import IPMOptions

Tensor = torch.Tensor


def _capturing_or_compiling() -> bool:
    return compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def on_host(P: Tensor, C: Optional[Tensor], A: Optional[Tensor], options: IPMOptions) -> bool:
    """Whether this (broadcast, ``(B, n, n)``) CUDA batch is solved on the host CPU."""
    if P.device.type != "cuda" or options.host_max_work <= 0:
        return False
    return qp_batch_work(P, C, A) <= options.host_max_work and not _capturing_or_compiling()


def to_host(tensors: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """``tensors`` on the CPU, in one device-to-host copy per dtype (autograd follows the copy)."""
    out: List[Optional[Tensor]] = list(tensors)
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        parts = [tensors[i] for i in idx]
        flat = torch.cat([t.reshape(-1) for t in parts]).cpu()
        for i, piece in zip(idx, flat.split([t.numel() for t in parts])):
            out[i] = piece.view(tensors[i].shape)
    return out


def solve_on_host(
    solve: Callable[..., Tuple], data: Sequence[Optional[Tensor]], device: torch.device, *args, **kwargs
) -> Tuple:
    """``solve(*host data, *args, **kwargs)`` on the CPU, every tensor of its result moved to ``device``.

    Attributes of the result's factorization that diagnostics read (``polished``, ``iterations``)
    move too; the factorization itself stays on the host, where the backward runs.
    """
    out = solve(*to_host(data), *args, **kwargs)
    moved = []
    for x in out:
        if isinstance(x, Tensor):
            x = x.to(device, non_blocking=True)
        elif isinstance(x, BatchedKKT):
            for name in ("polished", "iterations"):
                v = getattr(x, name, None)
                if isinstance(v, Tensor):
                    setattr(x, name, v.to(device, non_blocking=True))
        moved.append(x)
    return tuple(moved)
