"""One layer shared by 4 threads: each call's output carries its own diagnostics.

The issue's failure: callers read ``layer.active`` / ``layer.info`` after their call and got another
thread's (31 of 400 calls). ``out.info`` and ``out.active`` belong to the call that returned them.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from dqp import Status, dQP
from tests.conftest import random_qp

THREADS, CALLS = 4, 8


def _problem(k: int):
    """Thread k's batch of 2: different sizes of active sets per thread; thread 0's second element
    is infeasible (x₀ ≤ −1 and −x₀ ≤ −1), so its status differs from the others'."""
    P, q, C, d, *_ = random_qp(5, 6, 0, seed=10 + k, batch=2, frac_active=0.15 * (k + 1))
    if k == 0:
        C, d = C.clone(), d.clone()
        C[1, :2] = 0.0
        C[1, 0, 0], C[1, 1, 0] = 1.0, -1.0
        d[1, :2] = -1.0
    return P, q, C, d


def _call(layer, data):
    P, q, C, d = data
    q = q.clone().requires_grad_(True)
    out = layer(P, q, C, d)
    out.z.sum().backward()
    return out, q.grad


@pytest.mark.parametrize("solver", ["clarabel", "osqp", "dqp_ipm"])
def test_four_threads_get_their_own_diagnostics(solver):
    layer = dQP.dQP_layer(qp_solver=solver, on_failure="mask", fallback_solver=None)
    data = [_problem(k) for k in range(THREADS)]
    ref = [_call(layer, data[k]) for k in range(THREADS)]
    assert ref[0][0].info.status[1] == Status.PRIMAL_INFEASIBLE
    assert all(r[0].info.status == [Status.SOLVED] * 2 for r in ref[1:])
    assert len({tuple(r[0].active.sum(-1).tolist()) for r in ref}) > 1  # the threads' sets differ
    errors = []
    barrier = threading.Barrier(THREADS)

    def work(k):
        try:
            barrier.wait()
            for _ in range(CALLS):
                out, g = _call(layer, data[k])
                out0, g0 = ref[k]
                assert out.info.status == out0.info.status, (k, out.info.status)
                assert torch.equal(out.active, out0.active), k
                assert [bool(v) for v in out.info.verified] == [bool(v) for v in out0.info.verified]
                torch.testing.assert_close(out.z, out0.z, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)
        except Exception as exc:  # collected: an assertion in a thread does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    # the layer's attributes are the last call's: one of the threads' own
    assert any(np.array_equal(layer.active, r[0].active.numpy()) for r in ref)  # layer.active: a NumPy mask (libdqp)


def test_worker_threads_leave_the_callers_warning_filters_alone():
    """Solves on worker threads (omp_parallel) must not swap the process-wide warning state: a
    caller's catch_warnings/pytest.warns entered while a worker solves must keep recording after the
    worker finishes (catch_warnings on the worker would restore the state from before the caller's)."""
    import threading
    import warnings

    from dqp.errors import numerics_quiet

    inside, go_on = threading.Event(), threading.Event()

    def worker():
        with numerics_quiet():
            inside.set()
            go_on.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        go_on.set()
        t.join(5)
        warnings.warn("still recorded", UserWarning)
    assert any("still recorded" in str(w.message) for w in rec)
