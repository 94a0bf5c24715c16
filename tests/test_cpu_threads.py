"""One torch thread for small CPU batches of the batched IPM (``IPMOptions.cpu_serial_max_work``)."""

import pytest
import torch

from dqp.cpu_threads import batch_work, serial_if_small
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
