"""Small CPU batches of the batched IPM run on one torch thread.

On a machine where another process keeps a core busy, a torch operation that starts a parallel
region waits for the worker thread that shares that core: measured on 2 cores with one busy
process, a batched 10×10 Cholesky took 1.2 ms instead of 9 µs, and one 50×50 batched product
29 ms, so a whole forward + backward (one QP, n = m = 50) took 6–47 ms instead of 1.7 ms. On the
small problems where this happens a second thread gains at most a fraction of a millisecond, so
:func:`serial_if_small` runs them on one thread (``torch.set_num_threads(1)`` for the duration of
the call, then the previous count again). Larger batches keep every thread: their kernel's batch
is split dynamically, and their products are worth the threads.

The thread count is process-wide: another Python thread running torch operations at the same
moment runs them on one thread too, until the call returns.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def serial_if_small(device: torch.device, work: int, max_work: int) -> Iterator[None]:
    """One torch thread for the duration when ``device`` is the CPU and ``work ≤ max_work``."""
    old = torch.get_num_threads()
    if device.type != "cpu" or work > max_work or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def batch_work(B: int, n: int, m: int, p: int) -> int:
    """``B·k³`` with ``k = n + m + p``: the work measure of a batch of dense QPs."""
    return B * (n + m + p) ** 3
