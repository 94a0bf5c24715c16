"""Property tests: QPs manufactured from a chosen solution, active set and duals.

z*, λ*, μ* are known exactly, so the forward is checked against them, and the gradients against
central finite differences (the solution map is smooth there: strict complementarity and LICQ
hold by construction).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dqp import dQP

SOLVERS = ["clarabel", "osqp", "piqp", "daqp", "dqp_ipm"]


@st.composite
def manufactured(draw):
    n = draw(st.integers(1, 7))
    p = draw(st.integers(0, min(2, n - 1)))
    m = draw(st.integers(0, 8))
    k = draw(st.integers(0, min(m, n - p)))  # number of active inequalities (LICQ: k + p <= n)
    batch = draw(st.sampled_from([None, 2]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    items = []
    for _ in range(batch or 1):
        L = g.standard_normal((n, n))
        P = L @ L.T / n + 0.5 * np.eye(n)
        C = g.standard_normal((m, n))
        A = g.standard_normal((p, n))
        z = g.standard_normal(n)
        act = np.zeros(m, bool)
        act[g.choice(m, size=k, replace=False)] = True
        mu = np.where(act, g.uniform(0.2, 2.0, m), 0.0)
        s = np.where(act, 0.0, g.uniform(0.2, 2.0, m))
        lam = g.standard_normal(p)
        G = np.vstack([A, C[act]])
        # a well-conditioned, not nearly vanishing [A; C_J] keeps the solution map smooth on the
        # finite-difference scale (cond alone passes a single row of size 3.6e-4, whose duals move
        # by ~1e7 per unit of d: beyond what the solvers' tolerances let differences resolve)
        assume(G.shape[0] == 0 or (np.linalg.cond(G) < 1e2 and np.linalg.svd(G, compute_uv=False).min() > 0.1))
        d = C @ z + s
        b = A @ z
        q = -(P @ z + C.T @ mu + A.T @ lam)
        items.append((P, q, C, d, A, b, z, lam, mu))
    arrs = [np.stack([it[j] for it in items]) if batch else items[0][j] for j in range(9)]
    return [torch.tensor(a, dtype=torch.float64) for a in arrs], m, p, batch


def _solve(layer, P, q, C, d, A, b, m, p, sparse):
    Cm, dm = (C, d) if m else (None, None)
    Am, bm = (A, b) if p else (None, None)
    if sparse:
        conv = lambda M: None if M is None else ([x.to_sparse_csc() for x in M] if M.dim() == 3 else M.to_sparse_csc())
        return layer(conv(P), q, conv(Cm), dm, conv(Am), bm)
    return layer(P, q, Cm, dm, Am, bm)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=manufactured(), solver=st.sampled_from(SOLVERS), sparse=st.booleans())
def test_manufactured_solution_duals_and_gradients(data, solver, sparse):
    (P, q, C, d, A, b, z_true, lam_true, mu_true), m, p, batch = data
    if solver in ("daqp", "dqp_ipm"):
        sparse = False  # dense-only solvers
    layer = dQP.dQP_layer(qp_solver=solver, solve_type="sparse" if sparse else "dense")
    qv = q.clone().requires_grad_()
    dv = d.clone().requires_grad_()
    z, lam, mu, _, _ = _solve(layer, P, qv, C, dv, A, b, m, p, sparse)
    assert torch.allclose(z, z_true, atol=1e-7)
    if p:
        assert torch.allclose(lam, lam_true, atol=1e-7)
    if m:
        assert torch.allclose(mu, mu_true, atol=1e-7)
        assert np.array_equal(layer.active, (mu_true > 0).numpy())
    w = torch.linspace(-1.0, 1.0, z.shape[-1], dtype=torch.float64)
    loss = (z * w).sum() + (mu.sum() if m else 0.0)
    loss.backward()
    g = np.random.default_rng(0)
    h = 1e-6
    f = lambda qq, dd: float(
        (
            (_solve(layer, P, qq, C, dd, A, b, m, p, sparse)[0] * w).sum()
            + (_solve(layer, P, qq, C, dd, A, b, m, p, sparse)[2].sum() if m else 0.0)
        )
    )
    Dq = torch.tensor(g.standard_normal(tuple(q.shape)))
    fd = (f(q + h * Dq, d) - f(q - h * Dq, d)) / (2 * h)
    assert abs(fd - float((qv.grad * Dq).sum())) < 1e-5 * max(1.0, abs(fd))
    if m:
        Dd = torch.tensor(g.standard_normal(tuple(d.shape)))
        fd = (f(q, d + h * Dd) - f(q, d - h * Dd)) / (2 * h)
        assert abs(fd - float((dv.grad * Dd).sum())) < 1e-5 * max(1.0, abs(fd))
