"""float32 gradients of the IPM layer (dqp.ipm_layer): polish and backward solve in float64.

The float32 IPM stops at a relative tolerance of 1e-5, where near-active rows (slack ~1e-4 of the
row norm) can still be classified wrongly; a float32 polish accepted such a row (its multiplier,
slightly negative, passed the √eps₃₂ test) and the gradients were off by 1e-2…1e-1. The polish now
runs in float64 for float32 data (see the module docstring of dqp.ipm_layer).
"""

from __future__ import annotations

import pytest
import torch

from dqp.ipm_layer import IPMQPFunction, solve_qp_batch

F64, F32 = torch.float64, torch.float32


def qpth_problems(B: int, n: int, m: int, seed: int):
    """qpth's generator (as experiments/bench_qpth.make_problems), rounded to float32 values.

    Returns ``(Q, p, G, h, w)`` in float64, ``w`` the weights of the loss ``Σ w·z``.
    """
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = U.transpose(1, 2) @ U + 1e-3 * torch.eye(n, dtype=F64)
    G = torch.randn(B, m, n, generator=g, dtype=F64)
    z0 = torch.randn(B, n, generator=g, dtype=F64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=F64)
    p = torch.randn(B, n, generator=g, dtype=F64)
    w = torch.randn(B, n, generator=g, dtype=F64)
    r = lambda x: x.to(F32).to(F64)  # noqa: E731 - data exactly representable in float32
    return r(0.5 * (Q + Q.transpose(1, 2))), r(p), r(G), r(h), r(w)


def _grads(data, w, dtype):
    args = [t.to(dtype).requires_grad_() for t in data]
    z, lam, mu, status, active = solve_qp_batch(*args)
    assert (status == 0).all()
    grads = torch.autograd.grad((z * w.to(dtype)).sum(), args)
    return z, mu, grads, active


def test_float32_gradients_match_float64_at_n200():
    """qpth's generator, n = m = 200, B = 2 (seed 3): element 1 has a near-active row that the float32
    IPM point classifies active; with the float32 polish the gradients differed by 1.3e-1 (relative,
    Frobenius), with the float64 polish by ~5e-8 (float32 rounding of the outputs)."""
    *data, w = qpth_problems(2, 200, 200, seed=3)
    z64, mu64, g64, act64 = _grads(data, w, F64)
    z32, mu32, g32, act32 = _grads(data, w, F32)
    assert z32.dtype == F32 and mu32.dtype == F32
    assert all(g.dtype == F32 for g in g32)
    for name, a, b in zip(("Q", "p", "G", "h"), g32, g64):
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel < 1e-3, f"∇{name}: relative error {rel:.1e}"
    assert torch.equal(act32, act64)
    assert ((z32.double() - z64).norm() / z64.norm()).item() < 1e-6


@pytest.mark.parametrize("polish", [True, False])
def test_float32_outputs_keep_dtype_with_equalities(polish):
    """All outputs and gradients keep float32 (equalities included); the factorization kept for the
    backward is float64 exactly when the polish ran."""
    *data, w = qpth_problems(3, 12, 16, seed=5)
    Q, p, G, h = data
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 2, 12, generator=g, dtype=F64)
    b = (A @ torch.randn(3, 12, 1, generator=g, dtype=F64)).squeeze(-1)
    args = [t.to(F32).requires_grad_() for t in (Q, p, G, h, A, b)]
    z, lam, mu, status, active, kkt = IPMQPFunction.apply(*args, {"polish": polish})
    assert (status == 0).all()
    assert z.dtype == lam.dtype == mu.dtype == F32
    assert kkt.P.dtype == (F64 if polish else F32)
    grads = torch.autograd.grad((z * w.float()).sum() + lam.sum() + mu.sum(), args)
    assert all(gr.dtype == F32 and torch.isfinite(gr).all() for gr in grads)
    args64 = [t.detach().double().requires_grad_() for t in args]
    z6, lam6, mu6, *_ = IPMQPFunction.apply(*args64, {})
    grads64 = torch.autograd.grad((z6 * w).sum() + lam6.sum() + mu6.sum(), args64)
    tol = 1e-5 if polish else 1e-2  # without the polish: the float32 IPM point (eps 1e-5)
    for a, b in zip(grads, grads64):
        assert ((a.double() - b).abs().max() / (1 + b.abs().max())).item() < tol
