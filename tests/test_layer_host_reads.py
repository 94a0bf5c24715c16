"""Host reads (device synchronizations) on the layer's batched path: no more than QPFunction's, and
validation's value checks read with the solver's first read when deferred, raising the same errors."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dqp import dQP
from dqp.errors import NonFiniteError, NotSymmetricError
from dqp.ipm_engine import solve_settings_batch
from dqp.problem import validate
from dqp.qpth import QPFunction

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]

#: tensor methods and functions that copy device data to the host (each a synchronization on a GPU)
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "nonzero", "argwhere"}


class HostReads(TorchFunctionMode):
    """Counts the calls of :data:`READS` made while active (``counts``: name -> calls)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _problem(B: int, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    P = U.mT @ U + 0.1 * torch.eye(n, dtype=torch.float64)
    P = 0.5 * (P + P.mT)
    C = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    d = (C @ torch.randn(B, n, 1, generator=g, dtype=torch.float64)).squeeze(-1) + torch.rand(
        B, n, generator=g, dtype=torch.float64
    )
    q = torch.randn(B, n, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (P, q, C, d)]


def _reads(fn) -> HostReads:
    with HostReads() as h:
        fn()
    return h


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [1, 8])
def test_layer_reads_no_more_than_qpfunction(device, B):
    P, q, C, d = _problem(B, 6, device)
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    door = QPFunction(verbose=-1, check_Q_spd=False)
    e = torch.empty(0, dtype=torch.float64, device=device)

    def run(which):
        leaves = [x.detach().requires_grad_(True) for x in (P, q, C, d)]
        z = layer(*leaves, None, None)[0] if which == "layer" else door(*leaves, e, e)
        torch.autograd.grad(z.sum(), leaves)

    run("layer"), run("door")  # (first calls build caches)
    layer_reads, door_reads = _reads(lambda: run("layer")), _reads(lambda: run("door"))
    assert door_reads.total > 0
    assert layer_reads.total <= door_reads.total, (layer_reads.counts, door_reads.counts)
    # the diagnostics are read when asked for, not during the call
    info_reads = _reads(lambda: (layer.info.primal_residual, layer.info.iterations, layer.info.kkt_path))
    assert info_reads.total > 0


def test_deferred_checks_add_no_host_read():
    P, q, C, d = _problem(4, 5, "cpu", seed=1)
    s = dQP.build_settings(qp_solver="dqp_ipm")
    now = validate(P, q, C, d)
    deferred_reads = _reads(lambda: validate(P, q, C, d, defer_checks=True))
    assert deferred_reads.total == 0
    later = validate(P, q, C, d, defer_checks=True)
    assert now.deferred is None and later.deferred is not None
    reads_now = _reads(lambda: solve_settings_batch(now, s))
    reads_later = _reads(lambda: solve_settings_batch(later, s))
    assert reads_later.total == reads_now.total
    z0, lam0, mu0, info0 = solve_settings_batch(now, s)
    z1, lam1, mu1, info1 = solve_settings_batch(later, s)
    assert torch.equal(z0, z1) and torch.equal(mu0, mu1) and torch.equal(lam0, lam1)
    assert info0.status == info1.status and info0.verified == info1.verified
    assert info0.primal_residual == info1.primal_residual and info0.kkt_path == info1.kkt_path


def _faults():
    P, q, C, d = _problem(3, 4, "cpu", seed=2)
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    inf_C = C.clone()
    inf_C[2, 0, 1] = float("inf")
    neg_d = d.clone()
    neg_d[0, 3] = float("-inf")
    asym = P.clone()
    asym[1, 0, 2] += 1.0
    return {
        "nan-q": ((P, nan_q, C, d), NonFiniteError),
        "inf-C": ((P, q, inf_C, d), NonFiniteError),
        "-inf-d": ((P, q, C, neg_d), NonFiniteError),
        "asymmetric-P": ((asym, q, C, d), NotSymmetricError),
    }


@pytest.mark.parametrize("fault", sorted(_faults()))
def test_deferred_checks_raise_the_same_errors(fault):
    args, err = _faults()[fault]
    with pytest.raises(err) as now:
        validate(*args)
    batch = validate(*args, defer_checks=True)  # nothing read yet
    with pytest.raises(err) as later:
        solve_settings_batch(batch, dQP.build_settings(qp_solver="dqp_ipm"))
    assert str(later.value) == str(now.value)
    with pytest.raises(err) as layer_err:
        dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))(*args)
    assert str(layer_err.value) == str(now.value)


def test_deferred_checks_pass_absent_bounds():
    """+inf in d fails the screen (its sum is not finite); the detailed checks accept it."""
    P, q, C, d = _problem(3, 4, "cpu", seed=3)
    d = d.clone()
    d[1, 2] = float("inf")
    s = dQP.build_settings(qp_solver="dqp_ipm")
    z0, _, mu0, _ = solve_settings_batch(validate(P, q, C, d), s)
    z1, _, mu1, _ = solve_settings_batch(validate(P, q, C, d, defer_checks=True), s)
    assert torch.equal(z0, z1) and torch.equal(mu0, mu1)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_errors_do_not_depend_on_the_device(device):
    """Off the CPU the layer defers its value checks; the errors are those of the CPU."""
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    for args, err in _faults().values():
        with pytest.raises(err) as on_cpu:
            layer(*args)
        with pytest.raises(err) as here:
            layer(*[t.to(device) for t in args])
        assert str(here.value) == str(on_cpu.value)


def _feasible_by_definition(z, C, d, A, b):
    """``|r_i| ≤ √ε·(|v_i| + |M_i||z|)`` per row, as :func:`dqp.ipm_layer._feasible` documents it."""
    tol = torch.finfo(z.dtype).eps ** 0.5
    ok = torch.ones(z.shape[0], dtype=torch.bool)
    for M, v, eq in ((C, d, False), (A, b, True)):
        if M is not None:
            r = (M @ z.unsqueeze(-1)).squeeze(-1) - v
            size = v.abs() + (M.abs() @ z.abs().unsqueeze(-1)).squeeze(-1)
            ok = ok & ~((r.abs() if eq else r) > tol * size).any(-1)
    return ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feasible_matches_its_definition(dtype):
    """Residuals near the tolerance, zero bounds (where the cheap bound tol·|v| does not decide)."""
    from dqp.ipm_layer import _feasible

    g = torch.Generator().manual_seed(4)
    tol = torch.finfo(dtype).eps ** 0.5
    decided = collections.Counter()
    for trial in range(400):
        B, n, m, p = 4, 5, 6, 2
        C, A = torch.randn(B, m, n, generator=g).to(dtype), torch.randn(B, p, n, generator=g).to(dtype)
        z = torch.randn(B, n, generator=g).to(dtype) * 10.0 ** (trial % 7 - 5)
        noise = tol * 10.0 ** (trial % 4 - 3)
        d = (C @ z.unsqueeze(-1)).squeeze(-1) + noise * torch.randn(B, m, generator=g).to(dtype)
        if trial % 3 == 0:
            d[:, 0] = 0.0
        b = (A @ z.unsqueeze(-1)).squeeze(-1) + noise * torch.randn(B, p, generator=g).to(dtype)
        for args in ((z, C, d, None, None), (z, C, d, A, b), (z, None, None, A, b)):
            got = _feasible(*args)
            assert torch.equal(got, _feasible_by_definition(*args))
            decided[bool(got.all())] += 1
    assert decided[True] and decided[False]  # both outcomes were exercised
