"""A non-convex (indefinite) P on the batched IPM: never a verified point, a NotPSDError naming
the elements (or status NOT_PSD with on_failure='mask')."""

import pytest
import torch

import dqp
from dqp import dQP
from dqp.errors import NotPSDError, Status, error_for_statuses
from dqp.ipm_layer import solve_qp_batch
from dqp.linsolve.torch_batched import BatchedKKT
from dqp.qpth import QPFunction
from dqp.solvers.ipm import IPMOptions, KernelOptions, ipm_solve

DT = torch.float64


def _box_batch():
    """Element 0 convex; 1: P = -I, q = 0 (z = 0 is a stationary point, the maximum); 2: one negative
    eigenvalue, q = 0 (z = 0 a saddle); box constraints -1 <= z <= 1, so the IPM converges to z = 0."""
    n = 4
    eye = torch.eye(n, dtype=DT)
    P = torch.stack([eye, -eye, eye - 3 * torch.diag(torch.tensor([1.0, 0, 0, 0], dtype=DT))])
    q = torch.zeros(3, n, dtype=DT)
    q[0] = 0.3
    C = torch.cat([eye, -eye]).expand(3, 2 * n, n).contiguous()
    d = torch.ones(3, 2 * n, dtype=DT)
    return P, q, C, d


def _strongly_indefinite():
    """Element 2's P has a large negative eigenvalue: the IPM itself fails on it."""
    g = torch.Generator().manual_seed(0)
    B, n, m = 4, 6, 5
    L = torch.randn(B, n, n, dtype=DT, generator=g)
    P = L @ L.transpose(1, 2) + 0.1 * torch.eye(n, dtype=DT)
    P[2] -= 20 * torch.eye(n, dtype=DT)
    q = torch.randn(B, n, dtype=DT, generator=g)
    C = torch.randn(B, m, n, dtype=DT, generator=g)
    d = torch.rand(B, m, dtype=DT, generator=g) + 0.5
    return P, q, C, d


def test_ipm_returns_the_stationary_point_it_converges_to():
    # the failure the layer must catch: the bare IPM reports z = 0 as SOLVED for a maximum
    P, q, C, d = _box_batch()
    res = ipm_solve(P, q, C, d)
    assert res.form == "primal"
    assert res.status.tolist() == [0, 0, 0]
    assert torch.equal(res.z[1], torch.zeros(4, dtype=DT))


@pytest.mark.parametrize("make, bad", [(_box_batch, [1, 2]), (_strongly_indefinite, [2])])
def test_layer_raises_not_psd_naming_elements(make, bad):
    P, q, C, d = make()
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    with pytest.raises(NotPSDError, match=rf"batch elements \{bad}") as e:
        layer(P, q, C, d, None, None)
    assert e.value.batch_indices == bad


@pytest.mark.parametrize("make, bad", [(_box_batch, [1, 2]), (_strongly_indefinite, [2])])
def test_layer_mask_marks_not_psd_unverified(make, bad):
    P, q, C, d = make()
    P.requires_grad_(True)
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm", on_failure="mask"))
    z = layer(P, q, C, d, None, None)[0]
    info = layer.info
    for i in range(P.shape[0]):
        if i in bad:
            assert info.status[i] == Status.NOT_PSD
            assert not info.verified[i]
            assert torch.equal(z[i].detach(), torch.zeros_like(z[i]))
        else:
            assert info.status[i] == Status.SOLVED and info.verified[i]
    z.sum().backward()
    assert torch.isfinite(P.grad).all()
    assert torch.count_nonzero(P.grad[bad]) == 0


def test_qpth_without_spd_check_raises_not_psd():
    P, q, C, d = _box_batch()
    e = torch.empty(0, dtype=DT)
    with pytest.raises(NotPSDError, match=r"batch elements \[1, 2\]"):
        QPFunction(check_Q_spd=False)(P, q, C, d, e, e)


def test_solve_qp_batch_mask_status():
    P, q, C, d = _strongly_indefinite()
    z, lam, mu, status, active = solve_qp_batch(P, q, C, d, on_failure="mask")
    assert status.tolist() == [0, 0, int(Status.NOT_PSD), 0]


def test_convex_semidefinite_p_is_not_flagged():
    # P = 0 (an LP) and a singular PSD P: the polish's Cholesky of P fails, but nothing is negative
    g = torch.Generator().manual_seed(1)
    B, n, m = 3, 5, 12
    v = torch.randn(B, n, 1, dtype=DT, generator=g)
    P = torch.stack([torch.zeros(n, n, dtype=DT), (v @ v.transpose(1, 2))[1], (v @ v.transpose(1, 2))[2]])
    q = torch.randn(B, n, dtype=DT, generator=g)
    eye = torch.eye(n, dtype=DT)
    C = torch.cat([eye, -eye, torch.randn(2, n, dtype=DT, generator=g)]).expand(B, m, n)
    d = torch.ones(B, m, dtype=DT)
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    layer(P, q, C, d, None, None)
    assert layer.info.status == [Status.SOLVED] * B


def test_negative_curvature_from_kkt_inertia():
    # K = [[P, a^T], [a, 0]] with P indefinite on the null space of a: more than k negative eigenvalues
    P = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=DT)).expand(2, 3, 3).clone()
    P[0] = torch.eye(3, dtype=DT)
    A = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=DT).expand(2, 1, 3)
    kkt = BatchedKKT(P, A, None, None, batch=2)
    assert kkt.negative_curvature.tolist() == [False, True]
    # a convex batch never reaches the eigendecomposition: nothing read, nothing flagged
    assert BatchedKKT(torch.eye(3, dtype=DT).expand(2, 3, 3), A, None, None, batch=2).negative_curvature is None


def test_kernel_never_runs_an_indefinite_p():
    # the fused kernel (C++ build on the CPU) runs the dual form only, which needs P's Cholesky factor
    P, q, C, d = _box_batch()
    with pytest.raises(dqp.SettingsError, match="primal form"):
        ipm_solve(P, q, C, d, fused=True, options=IPMOptions(kernel=KernelOptions(mode=True)))


def test_error_for_statuses_not_psd_first():
    err = error_for_statuses([Status.SOLVED, Status.NUMERICAL, Status.NOT_PSD], "dqp_ipm")
    assert isinstance(err, NotPSDError) and isinstance(err, ValueError)
    assert err.batch_indices == [2]
    assert "batch elements [2]" in str(err) and "check_PSD=True" in str(err)
