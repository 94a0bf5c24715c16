"""Gradients of the element-wise path: every solver, dense/sparse, batched, broadcast, FD, gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqp import dQP
from conftest import ALL_SOLVERS, SPARSE_SOLVERS, inputs_unchanged, random_qp


def qpth_problem(n=50, m=50, seed=3):
    """The issue's generator: Q = UᵀU + 1e-3 I, h = G z0 + s0, p random."""
    g = np.random.default_rng(seed)
    U = g.standard_normal((n, n))
    P = U.T @ U + 1e-3 * np.eye(n)
    C = g.standard_normal((m, n))
    z0 = g.standard_normal(n)
    d = C @ z0 + g.uniform(0, 1, m)
    q = g.standard_normal(n)
    return [torch.tensor(x) for x in (P, q, C, d)]


def layer_for(solver: str, **kw):
    return dQP.dQP_layer(settings=dQP.build_settings(qp_solver=solver, **kw))


def grads_of_sum(layer, P, q, C, d, A=None, b=None):
    ts = [t.clone().requires_grad_() for t in (P, q, C, d)]
    extra = [] if A is None else [t.clone().requires_grad_() for t in (A, b)]
    with inputs_unchanged(*ts, *extra):  # dqp never writes into the caller's tensors
        z, lam, mu, _, _ = layer(*ts, *extra)
        z.sum().backward()
    return z.detach(), [t.grad for t in ts + extra]


@pytest.fixture(scope="module")
def reference():
    """Gradients of sum(z) by central finite differences (re-solving with Clarabel)."""
    P, q, C, d = qpth_problem()
    layer = layer_for("clarabel")
    f = lambda **kw: layer(**{**dict(P=P, q=q, C=C, d=d), **kw})[0].sum().item()
    return (P, q, C, d), f


@pytest.mark.parametrize("case", ALL_SOLVERS)
def test_gradients_match_finite_differences_every_solver(case, reference):
    (P, q, C, d), f = reference
    z, (gP, gq, gC, gd) = grads_of_sum(layer_for(case.name), P, q, C, d)
    rng = np.random.default_rng(7)
    h = 1e-6
    for name, X, G in (("q", q, gq), ("d", d, gd), ("P", P, gP), ("C", C, gC)):
        for _ in range(2):
            D = torch.tensor(rng.standard_normal(tuple(X.shape)))
            if name == "P":
                D = D + D.T
            fd = (f(**{name: X + h * D}) - f(**{name: X - h * D})) / (2 * h)
            an = float((G * D).sum())
            assert abs(an - fd) <= 1e-5 * max(1.0, abs(fd)), (case.name, name, an, fd)


@pytest.mark.parametrize("case", ALL_SOLVERS)
def test_every_solver_agrees_with_exact_reference(case):
    """The full gradient (not only directions) equals the one from an exact active-set solver."""
    P, q, C, d = qpth_problem(seed=11)
    _, ref = grads_of_sum(layer_for("quadprog" if case.name != "quadprog" else "daqp"), P, q, C, d)
    _, got = grads_of_sum(layer_for(case.name), P, q, C, d)
    for r, g in zip(ref, got):
        assert torch.allclose(g, r, rtol=case.grad_rtol, atol=case.grad_rtol * float(r.abs().max())), case.name


def sym(M):
    return 0.5 * (M + M.transpose(-1, -2))


@pytest.mark.parametrize("p", [0, 2])
def test_gradcheck_dense_single(p):
    P, q, C, d, A, b, *_ = random_qp(5, 6, p, seed=2)
    layer = layer_for("clarabel")
    args = [P, q, C, d] + ([A, b] if p else [])
    args = [a.clone().requires_grad_() for a in args]

    def fn(P, q, C, d, *ab):
        z, lam, mu, _, _ = layer(sym(P), q, C, d, *ab)
        return z, lam, mu

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_dense_batched_and_broadcast():
    g = np.random.default_rng(4)
    n, m, B = 4, 5, 3
    L = torch.tensor(g.standard_normal((n, n)))
    P = L @ L.T + torch.eye(n, dtype=torch.float64)
    A = torch.tensor(g.standard_normal((1, n)))
    z0 = torch.tensor(g.standard_normal((B, n)))
    C = torch.tensor(g.standard_normal((B, m, n)))
    d = (C @ z0.unsqueeze(-1)).squeeze(-1) + torch.tensor(g.uniform(0.0, 1.0, (B, m)))
    b = z0 @ A.T
    q = torch.tensor(g.standard_normal((B, n)))
    layer = layer_for("piqp")
    # P and A shared (unbatched), the rest batched
    args = [t.clone().requires_grad_() for t in (P, q, C, d, A, b)]

    def fn(P, q, C, d, A, b):
        z, lam, mu, _, _ = layer(sym(P), q, C, d, A, b)
        return z, lam, mu

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_broadcast_gradient_is_sum_over_batch():
    P, q, C, d, *_ = random_qp(6, 8, 0, seed=5, batch=4)
    layer = layer_for("clarabel")
    Cs = C[0].clone().requires_grad_()
    z, *_ = layer(P, q, Cs, d)
    z.sum().backward()
    total = torch.zeros_like(Cs)
    for i in range(4):
        Ci = C[0].clone().requires_grad_()
        zi, *_ = layer(P[i], q[i], Ci, d[i])
        zi.sum().backward()
        total += Ci.grad
    assert torch.allclose(Cs.grad, total, atol=1e-10)
    assert not torch.allclose(Cs.grad, total / 4)


@pytest.mark.parametrize("kind", ["equality_only", "inequality_only", "bounds", "unconstrained"])
def test_constraint_structures_match_finite_differences(kind):
    g = np.random.default_rng(1)
    n = 6
    U = g.standard_normal((n, n))
    P = torch.tensor(U.T @ U + np.eye(n))
    q = torch.tensor(g.standard_normal(n))
    C = d = A = b = None
    if kind == "equality_only":
        A, b = torch.tensor(g.standard_normal((2, n))), torch.tensor(g.standard_normal(2))
    elif kind == "inequality_only":
        C, d = torch.tensor(g.standard_normal((5, n))), torch.tensor(g.uniform(-0.5, 0.5, 5))
    elif kind == "bounds":  # -0.1 <= z <= 0.1 as C z <= d
        C = torch.cat([torch.eye(n), -torch.eye(n)]).double()
        d = torch.full((2 * n,), 0.1, dtype=torch.float64)
    layer = layer_for("clarabel")
    w = torch.tensor(g.standard_normal(n))
    loss = lambda q_: (layer(P, q_, C, d, A, b)[0] * w).sum()
    qq = q.clone().requires_grad_()
    loss(qq).backward()
    h = 1e-6
    for k in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[k] = h
        fd = (loss(q + e) - loss(q - e)).item() / (2 * h)
        assert abs(fd - qq.grad[k].item()) < 1e-6
    if kind == "bounds":
        assert int(layer.active.sum()) > 0


# ---------------------------------------------------------------- sparse
def _coo_shuffled(M: torch.Tensor, seed: int):
    """A COO tensor of M's nonzeros in a random (uncoalesced) order, values as a leaf."""
    idx = M.nonzero().T
    perm = torch.randperm(idx.shape[1], generator=torch.Generator().manual_seed(seed))
    idx = idx[:, perm]
    vals = M[idx[0], idx[1]].clone().requires_grad_()
    return torch.sparse_coo_tensor(idx, vals, M.shape), idx, vals


@pytest.mark.parametrize("case", SPARSE_SOLVERS)
def test_sparse_gradients_in_value_order(case):
    """Several active rows in C and several rows in A: sparse value gradients equal the dense ones."""
    P, q, C, d, A, b, *_ = random_qp(8, 10, 3, seed=9, frac_active=0.5)
    C = C * (torch.rand(C.shape, generator=torch.Generator().manual_seed(1)) < 0.6)
    A = A * (torch.rand(A.shape, generator=torch.Generator().manual_seed(2)) < 0.7)
    P = P  # dense pattern
    # dense reference
    dl = layer_for(case.name)
    Pd, Cd, Ad = (M.clone().requires_grad_() for M in (P, C, A))
    z, lam, mu, _, _ = dl(Pd, q, Cd, d, Ad, b)
    w = torch.linspace(-1, 1, 8, dtype=torch.float64)
    ((z * w).sum() + lam.sum() + mu.sum()).backward()
    assert int(dl.active.sum()) >= 2
    # sparse, from shuffled COO values (as the user's example does)
    sl = layer_for(case.name, solve_type="sparse")
    Ps, Pi, Pv = _coo_shuffled(P, 0)
    Cs, Ci, Cv = _coo_shuffled(C, 1)
    As, Ai, Av = _coo_shuffled(A, 2)
    sparse_args = (Ps.to_sparse_csc(), q, Cs.to_sparse_csc(), d, As.to_sparse_csc(), b)
    with inputs_unchanged(*sparse_args, Pv, Cv, Av):
        z2, lam2, mu2, _, _ = sl(*sparse_args)
        ((z2 * w).sum() + lam2.sum() + mu2.sum()).backward()
    assert torch.allclose(z2, z, atol=1e-9)
    for vals, idx, dense in ((Pv, Pi, Pd), (Cv, Ci, Cd), (Av, Ai, Ad)):
        assert torch.allclose(vals.grad, dense.grad[idx[0], idx[1]], atol=1e-8, rtol=1e-7)


def test_sparse_batch_list_and_shared_pattern():
    """A batch given as a list of CSC matrices (P) mixed with one shared CSC matrix (C)."""
    P, q, C, d, *_ = random_qp(5, 6, 0, seed=12, batch=2, frac_active=0.5)
    C0 = C[0] * (C[0].abs() > 0.3)
    layer = layer_for("clarabel", solve_type="sparse")
    Pv = [P[i].to_sparse_csc() for i in range(2)]
    csc = C0.to_sparse_csc()
    Cvals = csc.values().clone().requires_grad_()
    Cs = torch.sparse_csc_tensor(csc.ccol_indices(), csc.row_indices(), Cvals, C0.shape)
    z, *_ = layer(Pv, q, Cs, d)
    z.sum().backward()
    Cd = C0.clone().requires_grad_()
    zd, *_ = layer_for("clarabel")(P, q, Cd, d)
    zd.sum().backward()
    assert torch.allclose(z, zd, atol=1e-9)
    rows = csc.row_indices()
    cols = torch.repeat_interleave(torch.arange(C0.shape[1]), csc.ccol_indices().diff())
    assert torch.allclose(Cvals.grad, Cd.grad[rows, cols], atol=1e-9)


def test_duals_are_differentiable():
    P, q, C, d, A, b, *_ = random_qp(5, 6, 2, seed=13)
    layer = layer_for("clarabel")
    args = [t.clone().requires_grad_() for t in (q, d, b)]

    def fn(q, d, b):
        z, lam, mu, _, _ = layer(P, q, C, d, A, b)
        return lam, mu

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_sparse_csc_tensor_from_value_leaves_is_fast_and_right():
    import time

    import dqp

    n = 3000
    P = (torch.eye(n, dtype=torch.float64) * 2).to_sparse_csc()
    vals = P.values().clone().requires_grad_()
    Ps = dqp.sparse_csc_tensor(P.ccol_indices(), P.row_indices(), vals, P.shape)
    q = torch.linspace(-1, 1, n, dtype=torch.float64)
    layer = layer_for("clarabel", solve_type="sparse")
    z = layer(Ps, q)[0]
    t0 = time.perf_counter()
    z.sum().backward()
    assert time.perf_counter() - t0 < 5.0
    # z = -q/2, L = sum z, dL/dP_ii = -½(y_i z_i + z_i y_i) with y = P⁻¹·1 = 1/2
    assert torch.allclose(vals.grad, -0.5 * z.detach(), atol=1e-12)


def test_leading_dimension_one_broadcasts_like_torch():
    P, q, C, d, *_ = random_qp(4, 5, 0, seed=21, batch=3)
    layer = layer_for("clarabel")
    q1 = q[:1].clone().requires_grad_()  # (1, n) against (B, n, n)
    z = layer(P, q1, C, d)[0]
    assert z.shape == (3, 4)
    z.sum().backward()
    total = sum(
        torch.autograd.functional.jacobian(lambda qq: layer(P[i], qq, C[i], d[i])[0].sum(), q[0]) for i in range(3)
    )
    assert torch.allclose(q1.grad[0], total, atol=1e-8)
