"""One torch thread for small CPU batches of the batched IPM (``IPMOptions.cpu_serial_max_work``)."""

import pytest
import torch

from dqp.cpu_threads import batch_work, qp_batch_work, serial_if_small
from dqp.ipm_layer import solve_qp_batch
from dqp.solvers.ipm import IPMOptions

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_small_work_runs_on_one_thread_and_restores(two_threads):
    with serial_if_small(CPU, 10, 100) as threads:
        assert torch.get_num_threads() == 1
        assert threads == 2  # the caller's count, for the kernel's own threads
    assert torch.get_num_threads() == 2


def test_restored_after_an_exception(two_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with serial_if_small(CPU, 10, 100):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("work,max_work,device", [(101, 100, CPU), (10, 0, CPU), (10, 100, torch.device("meta"))])
def test_large_work_disabled_or_other_devices_keep_the_threads(two_threads, work, max_work, device):
    with serial_if_small(device, work, max_work) as threads:
        assert torch.get_num_threads() == 2 and threads is None


def test_batch_work():
    assert batch_work(3, 10, 5, 2) == 3 * 17**3
    P, C, A = torch.zeros(3, 10, 10), torch.zeros(3, 5, 10), torch.zeros(3, 2, 10)
    assert qp_batch_work(P, C, A) == batch_work(3, 10, 5, 2) and qp_batch_work(P, None, None) == 3 * 10**3


def test_solve_answers_do_not_depend_on_the_thread_count(two_threads):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    P = U @ U.mT + torch.eye(8, dtype=torch.float64)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    C = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    d = torch.rand(4, 6, generator=g, dtype=torch.float64)
    out = {}
    for name, opt in (("serial", IPMOptions()), ("threads", IPMOptions(cpu_serial_max_work=0))):
        z = solve_qp_batch(P, q, C, d, options=opt)[0]
        (gq,) = torch.autograd.grad(z.sum(), q)
        out[name] = (z.detach(), gq)
        assert torch.get_num_threads() == 2
    assert torch.allclose(out["serial"][0], out["threads"][0], atol=1e-12)
    assert torch.allclose(out["serial"][1], out["threads"][1], atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_cholesky_per_matrix_matches_torch(dtype):
    """The CPU factorization through LAPACK per matrix: torch's factor and info codes, a clean upper
    triangle, the caller's matrix untouched; with autograd it stays on torch (gradients flow)."""
    from dqp.linsolve.cholesky import cholesky

    g = torch.Generator().manual_seed(1)
    U = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    S = (U @ U.mT + torch.eye(6, dtype=torch.float64)).to(dtype)
    S[2] = -S[2]  # not positive definite: its info is the order of the first failing minor
    keep = S.clone()
    F, info = cholesky(S)
    L0, info0 = torch.linalg.cholesky_ex(S)
    assert torch.equal(info, info0) and torch.equal(S, keep)
    ok = [0, 1, 3]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(F.L[ok], L0[ok], atol=tol) and not torch.triu(F.L[ok], 1).any()
    Sg = S[ok].detach().clone().requires_grad_(True)
    Fg, _ = cholesky(Sg)
    Fg.L.sum().backward()
    assert Sg.grad is not None and torch.isfinite(Sg.grad).all()
