"""The IPM's CPU fast paths: in-place LAPACK factorization, per-matrix solves, tracked products.

On the CPU the float64 dual form factorizes the Schur complement in place, solves with LAPACK per
matrix, skips finished instances and carries P z, C z, Cᵀμ, A z, Aᵀλ and M y from step to step.
These tests check that the answers are those of the plain batched code: converged instances
satisfy the stopping rule when the residuals are recomputed from scratch, and the primal form
(which uses none of the fast paths) finds the same points.
"""

from __future__ import annotations

import pytest
import torch

from dqp.errors import Status
from dqp.linsolve.cholesky import CholeskyFactor, CholeskyOptions, cholesky, cholesky_inplace, mv, potrs_inplace, tmv
from dqp.solvers.ipm import IPMOptions, KernelOptions
from dqp.solvers.ipm import ipm_solve as _ipm_solve
from dqp.solvers.ipm.newton import _DualNewton

#: These tests are of the torch loop; the fused kernel (which the float64 dual form takes by
#: default where it can be built) has tests/test_fused.py.
LOOP = IPMOptions(kernel=KernelOptions(mode=False))


def ipm_solve(*args, **kw):
    return _ipm_solve(*args, options=LOOP, **kw)


def _problems(B, n, m, p, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=dtype)
    P = U.mT @ U / n + 0.1 * torch.eye(n, dtype=dtype)
    q = torch.randn(B, n, generator=g, dtype=dtype)
    C = torch.randn(B, m, n, generator=g, dtype=dtype)
    z0 = torch.randn(B, n, generator=g, dtype=dtype)
    d = (C @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=dtype)
    A = torch.randn(B, p, n, generator=g, dtype=dtype) if p else None
    b = (A @ z0.unsqueeze(-1)).squeeze(-1) if p else None
    return P, q, C, d, A, b


def _true_residuals(P, q, C, d, A, b, r):
    """Scaled residuals of the module docstring's stopping rule, recomputed from scratch."""
    z, mu, lam, s = r.z, r.mu, r.lam, r.s
    Pz = (P @ z.unsqueeze(-1)).squeeze(-1)
    CTm = (C.mT @ mu.unsqueeze(-1)).squeeze(-1)
    rd = Pz + q + CTm
    terms = [Pz.abs().amax(-1), q.abs().amax(-1), CTm.abs().amax(-1)]
    Cz = (C @ z.unsqueeze(-1)).squeeze(-1)
    # the IPM works on unit-norm rows: compare its slack condition in that scaling
    nrm = torch.linalg.vector_norm(C, dim=-1)
    rin = ((Cz + s - d) / nrm).abs().amax(-1)
    rp = rin
    if A is not None:
        ATl = (A.mT @ lam.unsqueeze(-1)).squeeze(-1)
        rd = rd + ATl
        terms.append(ATl.abs().amax(-1))
        rp = torch.maximum(
            rp, ((A @ z.unsqueeze(-1)).squeeze(-1) - b).abs().amax(-1) / torch.linalg.vector_norm(A, dim=-1).amin(-1)
        )
    dres = rd.abs().amax(-1) / (1.0 + torch.stack(terms).amax(0))
    return dres, rp


@pytest.mark.parametrize("p", [0, 3])
def test_dual_form_fast_paths_reach_true_tolerance(p):
    P, q, C, d, A, b = _problems(16, 20, 30, p)
    r = ipm_solve(P, q, C, d, A, b, form="dual")
    assert r.form == "dual"
    assert (r.status == int(Status.SOLVED)).all()
    dres, pres = _true_residuals(P, q, C, d, A, b, r)
    # the stopping rule holds for the recomputed residuals (eps = 1e-9; small slack for the scaling)
    assert dres.max() < 1e-8
    assert pres.max() < 1e-8


def test_tracked_products_never_declare_a_false_convergence():
    """A badly scaled element (q × 1e8) whose tracked residual products drift: the tracked check
    once reported SOLVED at a true scaled primal residual of 1.6e-7 (eps = 1e-9). An element now
    stops only on exact products: SOLVED elements meet the rule when it is recomputed from scratch."""
    from test_ipm import known_qp

    P, q, C, d, A, b, *_ = known_qp(4, 8, 6, 3, seed=7)
    q = q.clone()
    q[3] *= 1e8
    r = ipm_solve(P, q, C, d, A, b, form="dual", check_every=1)
    dres, pres = _true_residuals(P, q, C, d, A, b, r)
    ok = r.status == int(Status.SOLVED)
    assert bool(ok[:3].all())
    # (scaled primal residual: relative to the scale of the iterate, as the rule; 1 + |d| bounds it)
    scale = 1.0 + d.abs().amax(-1) + (C @ r.z.unsqueeze(-1)).squeeze(-1).abs().amax(-1)
    assert bool((pres[ok] <= 1e-8 * scale[ok]).all()) and bool((dres[ok] <= 1e-8).all())


@pytest.mark.parametrize("p", [0, 3])
def test_dual_form_matches_primal_form(p):
    P, q, C, d, A, b = _problems(12, 15, 25, p, seed=1)
    rd = ipm_solve(P, q, C, d, A, b, form="dual")
    rp = ipm_solve(P, q, C, d, A, b, form="primal")
    assert torch.allclose(rd.z, rp.z, atol=1e-6, rtol=1e-6)
    assert torch.allclose(rd.mu, rp.mu, atol=1e-6, rtol=1e-5)


def test_inplace_cholesky_and_potrs_match_torch():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 9, 9, generator=g, dtype=torch.float64)
    S = X @ X.mT + torch.eye(9, dtype=torch.float64)
    r = torch.randn(6, 9, generator=g, dtype=torch.float64)
    L, info = cholesky_inplace(S.clone())
    assert (info == 0).all()
    assert torch.allclose(L.L.tril(), torch.linalg.cholesky(S), atol=1e-12)
    assert torch.allclose(L.solve(r), torch.linalg.solve(S, r.unsqueeze(-1)).squeeze(-1), atol=1e-10)
    F = S.clone()
    cholesky_inplace(F)
    x = potrs_inplace(F, r)
    assert torch.allclose(x, torch.linalg.solve(S, r.unsqueeze(-1)).squeeze(-1), atol=1e-10)
    # rows: only those elements are factorized / solved
    G = S.clone()
    _, info = cholesky_inplace(G, rows=[1, 4])
    assert torch.equal(G[0], S[0]) and not torch.equal(G[1], S[1])
    y = potrs_inplace(G, r, rows=[1])
    assert torch.equal(y[0], r[0]) and torch.allclose(y[1], x[1], atol=1e-10)


def test_inplace_cholesky_reports_non_pd():
    S = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    S[1, 2, 2] = -1.0
    _, info = cholesky_inplace(S)
    assert info.tolist()[0] == 0 and info.tolist()[1] > 0 and info.tolist()[2] == 0


def test_float32_dual_form_solves():
    P, q, C, d, A, b = _problems(8, 12, 18, 2, seed=2, dtype=torch.float32)
    r = ipm_solve(P, q, C, d, A, b, form="dual")
    assert (r.status == int(Status.SOLVED)).all()
    r64 = ipm_solve(P.double(), q.double(), C.double(), d.double(), A.double(), b.double(), form="dual")
    # (the float32 IPM stops at a relative residual of 1e-5; the polish makes z accurate)
    assert torch.allclose(r.z.double(), r64.z, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_products_match_torch_and_the_dual_form_setup_is_the_same_without_fast_paths(dtype):
    """mv / tmv (NumPy's einsum on the CPU fast path) equal torch's products, a shared vector
    broadcast included, and fall back to torch where a graph is built; the dual form's P⁻¹Āᵀ is the
    same with and without the CPU fast paths."""
    g = torch.Generator().manual_seed(5)
    M = torch.randn(5, 6, 8, generator=g, dtype=torch.float64).to(dtype)
    x, x1, y = (torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in ((5, 8), (1, 8), (5, 6)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(mv(M, x), (M @ x.unsqueeze(-1)).squeeze(-1), atol=tol, rtol=tol)
    assert torch.allclose(mv(M, x1), (M @ x1.mT).squeeze(-1), atol=tol, rtol=tol)
    assert torch.allclose(tmv(M, y), (M.mT @ y.unsqueeze(-1)).squeeze(-1), atol=tol, rtol=tol)
    assert mv(M, x).dtype == dtype
    xg = x.detach().requires_grad_(True)
    mv(M, xg).sum().backward()  # (the torch fallback: a gradient flows)
    assert torch.allclose(xg.grad, M.sum(-2), atol=tol, rtol=tol)
    X = torch.randn(5, 8, 8, generator=g, dtype=torch.float64)
    P = (X @ X.mT + torch.eye(8, dtype=torch.float64)).to(dtype)
    R = torch.randn(5, 6, 8, generator=g, dtype=torch.float64).to(dtype)
    fast = _DualNewton(cholesky(P)[0], P, R, None, 5, 8, 6, 0, 1e-12).PiAbt
    slow_opts = CholeskyOptions(cpu_fast_paths=False)
    slow = _DualNewton(
        CholeskyFactor(cholesky(P)[0].L, options=slow_opts),
        P,
        R,
        None,
        5,
        8,
        6,
        0,
        1e-12,
        options=LOOP.replace(linalg=slow_opts),
    ).PiAbt
    ref = torch.linalg.solve(P.double(), R.double().mT)
    assert torch.allclose(fast.double(), ref, atol=10 * tol, rtol=10 * tol)
    assert torch.allclose(fast, slow, atol=tol, rtol=tol)
