"""Tests of the qpth-compatible QPFunction (dqp.qpth)."""

from __future__ import annotations

import pytest
import torch

from dqp.errors import InfeasibleError, NotPSDError, ShapeError
from dqp.ipm_layer import solve_qp_batch
from dqp.qpth import QPFunction, QPSolvers

F64, F32 = torch.float64, torch.float32
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


def qpth_problem(B, n, m, p=0, *, seed=0, dtype=F64, device="cpu"):
    """qpth's benchmark generator: Q = UᵀU + 1e-3·I, G normal, h = G z0 + s0 (+ A z0 = b)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = U.transpose(1, 2) @ U + 1e-3 * torch.eye(n, dtype=F64)
    p_ = torch.randn(B, n, generator=g, dtype=F64)
    G = torch.randn(B, m, n, generator=g, dtype=F64)
    z0 = torch.randn(B, n, generator=g, dtype=F64)
    s0 = torch.rand(B, m, generator=g, dtype=F64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    A = torch.randn(B, p, n, generator=g, dtype=F64)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return [t.to(dtype=dtype, device=device) for t in (Q, p_, G, h, A, b)]


def kkt_residual(Q, p, G, h, z):
    """Max violation of ``Gz ≤ h`` (optimality is checked against an independent solve)."""
    return ((G @ z.unsqueeze(-1)).squeeze(-1) - h).clamp(min=0).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_matches_reference_solution(device, dtype):
    Q, p, G, h, A, b = qpth_problem(4, 6, 8, 2, seed=1, dtype=dtype, device=device)
    z = QPFunction(verbose=-1)(Q, p, G, h, A, b)
    assert z.shape == (4, 6) and z.dtype == dtype
    ref = solve_qp_batch(*(t.double() for t in (Q, p, G, h, A, b)))[0]
    tol = 1e-8 if dtype == F64 else 2e-3
    assert ((z.double() - ref).abs().max() / (1 + ref.abs().max())).item() < tol
    assert kkt_residual(Q.double(), p.double(), G.double(), h.double(), z.double()) < tol


def test_matches_clarabel():
    qpsolvers = pytest.importorskip("qpsolvers")
    Q, p, G, h, A, b = qpth_problem(3, 5, 7, 0, seed=2)
    e = torch.Tensor()
    z = QPFunction(verbose=-1)(Q, p, G, h, e, e)
    for i in range(3):
        sol = qpsolvers.solve_qp(
            Q[i].numpy(),
            p[i].numpy(),
            G[i].numpy(),
            h[i].numpy(),
            solver="clarabel",
            tol_feas=1e-10,
            tol_gap_abs=1e-10,
            tol_gap_rel=1e-10,
        )
        assert torch.allclose(z[i], torch.from_numpy(sol), atol=1e-7)


def test_unbatched_inputs_return_batch_of_one():
    Q, p, G, h, A, b = qpth_problem(1, 4, 5, 1, seed=3)
    z = QPFunction(verbose=-1)(Q[0], p[0], G[0], h[0], A[0], b[0])
    assert z.shape == (1, 4)  # as qpth returns
    z_b = QPFunction(verbose=-1)(Q, p, G, h, A, b)
    assert torch.allclose(z, z_b, atol=1e-10)


def test_empty_constraint_tensors():
    Q, p, G, h, A, b = qpth_problem(2, 4, 5, 2, seed=4)
    e = torch.Tensor()  # float32 and empty, as in qpth docs
    z_ineq = QPFunction(verbose=-1)(Q, p, G, h, e, e)
    z_eq = QPFunction(verbose=-1)(Q, p, e, e, A, b)
    z_none = QPFunction(verbose=-1)(Q, p, e, e, e, e)  # qpth asserts here; dqp solves it
    assert torch.allclose(z_ineq, solve_qp_batch(Q, p, G, h)[0], atol=1e-10)
    assert torch.allclose(z_eq, solve_qp_batch(Q, p, None, None, A, b)[0], atol=1e-10)
    assert torch.allclose(A @ z_eq.unsqueeze(-1), b.unsqueeze(-1), atol=1e-9)
    ref = torch.linalg.solve(Q, -p.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(z_none, ref, atol=1e-8)


def test_broadcast_gradients_are_summed():
    Q, p, G, h, A, b = qpth_problem(3, 4, 6, 0, seed=5)
    Gs = G[0].clone().requires_grad_()
    hs = h[0].clone().requires_grad_()
    e = torch.Tensor()
    z = QPFunction(verbose=-1)(Q, p, Gs, hs, e, e)
    z.square().sum().backward()
    gG = torch.zeros_like(Gs)
    gh = torch.zeros_like(hs)
    for i in range(3):
        Gi, hi = Gs.detach().clone().requires_grad_(), hs.detach().clone().requires_grad_()
        QPFunction(verbose=-1)(Q[i], p[i], Gi, hi, e, e).square().sum().backward()
        gG += Gi.grad
        gh += hi.grad
    assert torch.allclose(Gs.grad, gG, atol=1e-9) and torch.allclose(hs.grad, gh, atol=1e-9)
    assert gh.abs().max() > 0  # some constraint is active


def test_gradcheck_all_inputs():
    Q, p, G, h, A, b = qpth_problem(2, 3, 4, 1, seed=6)
    args = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
    f = lambda *a: QPFunction(verbose=-1)(*a)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 1e-5)])
def test_zero_starting_slack_qpth_gets_wrong(dtype, tol):
    """min ½‖x‖² − x₁ s.t. x₂ ≤ 0, x₁ ≤ 2: x = (1, 0)."""
    Q = torch.eye(2, dtype=dtype)
    p = torch.tensor([-1.0, 0.0], dtype=dtype)
    G = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)
    h = torch.tensor([0.0, 2.0], dtype=dtype)
    e = torch.Tensor()
    z = QPFunction(verbose=-1)(Q, p, G, h, e, e)
    assert torch.allclose(z, torch.tensor([[1.0, 0.0]], dtype=dtype), atol=tol)


def test_check_Q_spd():
    Q = torch.zeros(3, 3, dtype=F64)  # an LP
    p = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    G = torch.cat([torch.eye(3), -torch.eye(3)]).to(F64)
    h = torch.ones(6, dtype=F64)
    e = torch.Tensor()
    with pytest.raises(NotPSDError, match="check_Q_spd=False"):
        QPFunction()(Q, p, G, h, e, e)
    with pytest.raises(NotPSDError, match=r"batch elements \[1\]"):
        QPFunction()(torch.stack([torch.eye(3, dtype=F64), Q]), p, G, h, e, e)
    z = QPFunction(check_Q_spd=False)(Q, p, G, h, e, e)
    assert torch.allclose(z, -torch.sign(p).unsqueeze(0), atol=1e-8)


def test_constructor_compatibility():
    Q, p, G, h, A, b = qpth_problem(2, 4, 5, 0, seed=7)
    e = torch.Tensor()
    z0 = QPFunction()(Q, p, G, h, e, e)
    for kw in (
        dict(eps=1e-6),
        dict(maxIter=5),
        dict(notImprovedLim=1),
        dict(verbose=1),
        dict(solver=QPSolvers.CVXPY),
        dict(solver=QPSolvers.PDIPM_BATCHED),
    ):
        z = QPFunction(**kw)(Q, p, G, h, e, e)
        assert torch.allclose(z, z0, atol=1e-8), kw  # maxIter=5 is raised to 100
    assert "dqp" in repr(QPFunction())


def test_infeasible_raises_with_index():
    Q = torch.eye(1, dtype=F64).expand(2, 1, 1)
    p = torch.zeros(2, 1, dtype=F64)
    G = torch.tensor([[1.0], [-1.0]], dtype=F64)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    e = torch.Tensor()
    with pytest.raises(InfeasibleError) as ei:
        QPFunction(verbose=-1)(Q, p, G, h, e, e)
    assert ei.value.batch_indices == [1]


def test_mismatched_empty_pairs_raise():
    Q, p, G, h, A, b = qpth_problem(1, 3, 2, 1, seed=8)
    e = torch.Tensor()
    with pytest.raises(ShapeError, match="G and h"):
        QPFunction()(Q, p, G, e, e, e)
    with pytest.raises(ShapeError, match="A and b"):
        QPFunction()(Q, p, G, h, A, e)


@pytest.mark.parametrize(
    "script,expect", [("optnet_classifier.py", "OptNet head: test accuracy"), ("sudoku.py", "after 2 epochs")]
)
def test_examples_short_mode(script, expect):
    """The qpth-API examples run unchanged in their short mode and reach their own assertions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / script
    env = {**os.environ, "DQP_EXAMPLES_SHORT": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=280, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert expect in out.stdout
