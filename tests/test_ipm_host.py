"""Small CUDA batches solved on the host CPU (``IPMOptions.host_max_work``): same answers and
gradients as on the device, results on the device, and the option's validation."""

import pytest
import torch

from dqp import dQP
from dqp.errors import SettingsError
from dqp.ipm_host import on_host, to_host
from dqp.ipm_layer import solve_qp_batch
from dqp.solvers.ipm import IPMOptions
from test_ipm import known_qp

F64 = torch.float64
HOST = IPMOptions(host_max_work=10**9)
DEVICE = IPMOptions(host_max_work=0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", ["host_max_work", "cpu_serial_max_work"])
@pytest.mark.parametrize("value", [-1, 1.5, "big", None, True])
def test_work_limits_must_be_non_negative_ints(name, value):
    with pytest.raises(SettingsError, match=f"{name} must be a non-negative int"):
        IPMOptions(**{name: value})


def test_cpu_data_is_never_rerouted():
    P = torch.eye(3, dtype=F64).expand(2, 3, 3)
    assert not on_host(P, None, None, HOST)


def test_to_host_keeps_shapes_values_and_gradients():
    a = torch.randn(2, 3, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float32, requires_grad=True)
    c = torch.randn(5, dtype=F64, requires_grad=True)
    ha, hn, hb, hc = to_host([a, None, b, c])
    assert hn is None and ha.shape == a.shape and hb.dtype == torch.float32
    assert torch.equal(ha, a) and torch.equal(hb, b) and torch.equal(hc, c)
    (ha.sum() + 2 * hb.sum() + 3 * hc.sum()).backward()
    assert torch.equal(a.grad, torch.ones_like(a)) and torch.equal(b.grad, 2 * torch.ones_like(b))
    assert torch.equal(c.grad, 3 * torch.ones_like(c))


def _solve_and_grad(options, P, q, C, d, A, b, w):
    args = [None if t is None else t.detach().clone().requires_grad_(True) for t in (P, q, C, d, A, b)]
    leaves = [t for t in args if t is not None]
    diag = {}
    z, lam, mu, status, active = solve_qp_batch(*args, options=options, diagnostics=diag)
    loss = (w * z).sum() + mu.sum() + (0.0 if lam is None else lam.sum())
    grads = torch.autograd.grad(loss, leaves)
    return (z, lam, mu, status, active), grads, diag


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("p", [0, 2])
@pytest.mark.parametrize("B", [1, 3])
def test_small_cuda_batch_on_host_matches_the_device(B, p):
    P, q, C, d, A, b, *_ = known_qp(B, 6, 5, p, seed=3, device="cuda")
    if not p:
        A = b = None
    w = torch.randn(B, 6, dtype=F64, generator=torch.Generator().manual_seed(1)).cuda()
    assert on_host(P, C, A, HOST) and not on_host(P, C, A, DEVICE)
    (out_h, g_h, diag_h), (out_d, g_d, diag_d) = (_solve_and_grad(o, P, q, C, d, A, b, w) for o in (HOST, DEVICE))
    for x, y in zip(out_h, out_d):
        if x is None:
            assert y is None
            continue
        assert x.device.type == "cuda"
        assert torch.allclose(x.double(), y.double(), rtol=1e-9, atol=1e-10)
    for gh, gd in zip(g_h, g_d):
        assert gh.device.type == "cuda" and torch.allclose(gh, gd, rtol=1e-8, atol=1e-10)
    assert diag_h["verified"].device.type == "cuda" and bool(diag_h["verified"].all())
    assert torch.equal(diag_h["verified"], diag_d["verified"])


@pytest.mark.cuda
@needs_cuda
def test_small_cuda_batch_on_host_through_the_layer():
    P, q, C, d, *_ = known_qp(2, 5, 4, 0, seed=5, device="cuda")
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm", qp_solver_keywords={"options": HOST}))
    q = q.clone().requires_grad_(True)
    z = layer(P, q, C, d)[0]
    z.sum().backward()
    assert z.device.type == "cuda" and q.grad.device.type == "cuda"
    assert bool(layer.info.verified[0])
