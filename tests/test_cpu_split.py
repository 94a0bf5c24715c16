"""The CPU build of the fused kernel splits the batch dynamically over its threads."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

import dqp.solvers.fused as fused
from dqp.errors import SettingsError
from dqp.solvers.ipm import IPMOptions, KernelOptions, ipm_solve

from test_ipm import known_qp

needs_cxx = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")), reason="needs a C++ compiler"
)


def _recording(calls: list):
    """KernelOptions.cpu_function that records every (thread, b0, b1) and runs the real build."""
    lock = threading.Lock()

    def of_k(k):
        real = fused._cpu_library(k).dqp_ipm_dual_cpu

        def fn(*args):
            with lock:
                calls.append((threading.get_ident(), args[-2], args[-1]))
            return real(*args)

        return fn

    return of_k


@needs_cxx
@pytest.mark.parametrize("split", ["dynamic", "static"])
def test_every_element_once_and_answers_of_one_thread(split):
    P, q, C, d, A, b, *_ = known_qp(37, 6, 9, 2, seed=3)
    one = ipm_solve(P, q, C, d, A, b, fused=True, options=IPMOptions(kernel=KernelOptions(cpu_threads=1)))
    calls: list = []
    opts = IPMOptions(kernel=KernelOptions(cpu_threads=3, cpu_split=split, cpu_function=_recording(calls)))
    res = ipm_solve(P, q, C, d, A, b, fused=True, options=opts)
    assert torch.equal(res.z, one.z) and torch.equal(res.status, one.status)
    covered = sorted(r for _, b0, b1 in calls for r in range(b0, b1))
    assert covered == list(range(37))
    if split == "dynamic":
        # chunks of ceil(37 / (3 * 8)) = 2 elements, taken in turn: many more calls than threads
        assert len(calls) == 19 and max(b1 - b0 for _, b0, b1 in calls) == 2
    else:
        assert len(calls) == 3


def test_cpu_split_is_checked():
    with pytest.raises(SettingsError, match="cpu_split"):
        KernelOptions(cpu_split="round-robin")
