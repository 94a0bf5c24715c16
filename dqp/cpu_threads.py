"""Small CPU batches of the batched IPM run on one torch thread.

Measured on 2 cores with one busy process: a batched 10×10 Cholesky took 1.2 ms instead of 9 µs,
one 50×50 batched product 29 ms, and a whole forward + backward of one QP (n = m = 50) 6–47 ms
instead of 1.7 ms. :func:`serial_if_small` runs a batch whose work is at most a limit with torch
on one thread (``torch.set_num_threads(1)`` for the duration of the call, then the previous count
again) and hands the caller the previous count, which the fused kernel's C++ build keeps: its
batch is split over its own threads dynamically, so a thread on a busy core simply takes fewer
problems. Up to 128 QPs with n = m = 50, the torch operations gained nothing from a second thread
on an idle machine, and lost up to 3× under load.

The thread count is process-wide: another Python thread running torch operations at the same
moment runs them on one thread too, until the call returns.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def serial_if_small(device: torch.device, work: int, max_work: int) -> Iterator[Optional[int]]:
    """Torch on one thread for the duration when ``device`` is the CPU and ``work ≤ max_work``.

    Yields the caller's thread count when it changed it (for the fused kernel's own threads), else
    None.
    """
    old = torch.get_num_threads()
    if device.type != "cpu" or work > max_work or old == 1:
        yield None
        return
    torch.set_num_threads(1)
    try:
        yield old
    finally:
        torch.set_num_threads(old)


def batch_work(B: int, n: int, m: int, p: int) -> int:
    """``B·k³`` with ``k = n + m + p``: the work measure of a batch of dense QPs."""
    return B * (n + m + p) ** 3


def qp_batch_work(P: torch.Tensor, C: Optional[torch.Tensor], A: Optional[torch.Tensor]) -> int:
    """:func:`batch_work` of the batch ``P (B, n, n)``, ``C (B, m, n)``, ``A (B, p, n)`` (absent: None)."""
    rows = lambda M: 0 if M is None else M.shape[-2]  # noqa: E731
    return batch_work(P.shape[0], P.shape[-1], rows(C), rows(A))
