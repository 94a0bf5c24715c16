"""Everything before the first interior-point iteration: the Newton solver, the norms and the starting
point (eagerly, or for the dual form as a cached CUDA graph)."""

from __future__ import annotations

import logging
import math
from typing import Dict, Optional

import torch
from dqp.linsolve.cholesky import CholeskyFactor, cholesky, mv
from dqp.solvers.ipm.graphs import _SETUP_DEFER_FAILED, _GraphData, graphed_call
from dqp.solvers.ipm.newton import _DualNewton, _PrimalNewton, _regularization, factor_ok
from dqp.solvers.ipm.options import DEFAULT_OPTIONS, IPMOptions
from dqp.solvers.ipm.problem import _amax, _row_normalize

from dqp.errors import Status

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


def _start(newton, q, C, d, b, B: int, m: int, one_m: Tensor, delta: Tensor):
    """The starting point ``(z, s, mu, lam)``: the KKT system with W = I, then s and μ shifted into
    the interior; defaults (z = 0, s = μ = 1, λ = 0) for an element with a non-finite value. (The
    fused kernel computes the same one itself: dqp.solvers.fused.solve_dual(start=True).)"""
    newton.factor(one_m if m else None, delta)
    z, lam, _, _ = newton.solve(-q, b, d if m else None, one_m if m else None)
    if m:
        s_hat = d - mv(C, z, newton.lin)

        # (the W = I system gives μ̂ = Cz − d = −ŝ)
        def _shift(v):
            lo = v.amin(-1, keepdim=True)
            return torch.where(lo > 0, v, v + (1.0 - lo))  # strictly ≥ 1 when shifted

        s = _shift(s_hat)
        mu = _shift(-s_hat)
    else:
        s = q.new_zeros(B, 0)
        mu = q.new_zeros(B, 0)
    if lam is None:
        lam = q.new_zeros(B, 0)
    bad0 = ~(
        torch.isfinite(z).all(-1) & torch.isfinite(s).all(-1) & torch.isfinite(mu).all(-1) & torch.isfinite(lam).all(-1)
    )
    z = torch.where(bad0.unsqueeze(-1), torch.zeros_like(z), z)
    s = torch.where(bad0.unsqueeze(-1), torch.ones_like(s), s)
    mu = torch.where(bad0.unsqueeze(-1), torch.ones_like(mu), mu)
    lam = torch.where(bad0.unsqueeze(-1), torch.zeros_like(lam), lam)
    return z, s, mu, lam


def _start_placeholders(q: Tensor, B: int, m: int, p: int):
    """``(z, s, mu, lam)`` buffers for a kernel that computes its own starting point (not read)."""
    return torch.zeros_like(q), q.new_ones(B, m), q.new_ones(B, m), q.new_zeros(B, p)


def _init(
    P,
    q,
    C,
    d,
    A,
    b,
    B: int,
    n: int,
    m: int,
    p: int,
    fm: str,
    LP: Optional[CholeskyFactor],
    start: bool = True,
    options: IPMOptions = DEFAULT_OPTIONS,
):
    """Everything before the first interior-point iteration: the row scaling, the norms the checks
    read, the Newton solver of form ``fm`` (``LP``: P's Cholesky factor for the dual form) and the
    starting point. Device work only, no host sync (on CUDA it may run as a graph, see
    :attr:`IPMOptions.setup_graph`). Returns ``(C, d, A, b, c_scale, a_scale, norms, newton, S)``: the scaled
    constraints, their row norms, a dict of norms, the solver and the iteration's state.
    ``start=False``: the fused kernel computes the starting point (the same one) itself; the
    state's z, s, mu, lam are then placeholders."""
    dtype, device = P.dtype, P.device
    reg_p, reg_d = _regularization(dtype)
    # row scaling of the constraints (unit-norm rows); undone on return
    C, d, c_scale = _row_normalize(C, d)
    A, b, a_scale = _row_normalize(A, b)
    if c_scale is not None:
        c_scale = c_scale.expand(B, m)
    if a_scale is not None:
        a_scale = a_scale.expand(B, p)

    Pscale = P.abs().flatten(-2).amax(-1).expand(B) if n else P.new_zeros(B)
    pscale = Pscale.clamp(min=1.0)
    qnorm = _amax(q)
    bnorm = _amax(b) if p else None  # constant: once, not at every check
    dnorm = _amax(d) if m else None

    if fm == "dual":
        newton = _DualNewton(LP, P, C, A, B, n, m, p, reg_d, options=options)
    else:
        newton = _PrimalNewton(P, C, A, B, n, m, p, reg_p * pscale, reg_d, options.linalg)
    delta = torch.ones(B, dtype=dtype, device=device)  # per-instance regularization multiplier
    one_m = torch.ones(B, m, dtype=dtype, device=device)

    # ---- starting point: solve the KKT system with W = I, then shift s and μ into the interior
    if not start:
        z, s, mu, lam = _start_placeholders(q, B, m, p)
    else:
        z, s, mu, lam = _start(newton, q, C, d, b, B, m, one_m, delta)

    zB = lambda k: torch.zeros(B, k, dtype=dtype, device=device)  # noqa: E731
    # the iteration's whole state, device tensors only (the CUDA graph's static buffers)
    S: Dict[str, Tensor] = dict(
        z=z,
        s=s,
        mu=mu,
        lam=lam,
        delta=delta,
        nfail=torch.zeros(B, dtype=torch.int64, device=device),
        iters=torch.zeros(B, dtype=torch.int64, device=device),
        done=torch.zeros(B, dtype=torch.bool, device=device),
        status=torch.full((B,), int(Status.MAX_ITER), dtype=torch.int64, device=device),
        pinf_cnt=torch.zeros(B, dtype=torch.int64, device=device),
        dinf_cnt=torch.zeros(B, dtype=torch.int64, device=device),
        best=torch.full((B,), math.inf, dtype=dtype, device=device),
        last_impr=torch.zeros(B, dtype=torch.int64, device=device),
        it=torch.zeros((), dtype=torch.int64, device=device),
        # the previous check's iterate (certificates along the step); have_prev: there was one
        have_prev=torch.zeros((), dtype=torch.bool, device=device),
        prev_z=zB(n),
        prev_Pz=zB(n),
        prev_Az=zB(p),
        prev_Cz=zB(m),
        prev_lam=zB(p),
        prev_mu=zB(m),
        prev_Ay=zB(n),
    )
    if fm == "dual" and dtype == torch.float64:
        newton.prime(q)
    norms = dict(pscale=pscale, qnorm=qnorm, bnorm=bnorm, dnorm=dnorm)
    return C, d, A, b, c_scale, a_scale, norms, newton, S


#: The state entries the fused kernel reads (:func:`dqp.solvers.fused.solve_dual`).
_FUSED_STATE = ("z", "s", "mu", "lam", "delta")


def _init_graphed(
    P,
    q,
    C,
    d,
    A,
    b,
    B: int,
    n: int,
    m: int,
    p: int,
    minimal: bool = False,
    defer_ok: bool = False,
    options: IPMOptions = DEFAULT_OPTIONS,
):
    """:func:`_init` with ``fm="dual"`` (P factorized inside) replayed from a cached graph; None
    when P's factor fails the dual form's test in some element (the caller then chooses the form
    eagerly, :func:`_choose_form`) or the graph cannot be used. ``minimal``: return only the state
    entries the fused kernel reads, and copy out of the graph only P's factor (the caller's
    other reads of the outputs are queued before the next replay).

    Returns ``(init, deferred)``: ``init`` as :func:`_init`'s result and ``deferred`` None (the test
    passed) or, with ``defer_ok``, ``(key, ok, event)``: the test's outcome on its way to pinned
    host memory (a 0-d bool tensor, valid once ``event`` has completed), not yet read. The caller
    launches its work first (no host sync between the setup and the fused kernel), then reads it
    (:func:`_deferred_ok`); where it is False the caller must discard that work, add ``key`` to
    :data:`_SETUP_DEFER_FAILED` and start again."""
    if B * max(n, m + p) ** 2 > options.setup_graph_max_work:
        return None
    inputs = {k: v for k, v in zip(_GraphData._DATA, (P, q, C, d, A, b)) if v is not None}
    names = _GraphData._NEWTON["dual"]

    def fn(inp):
        P_, C_, A_ = inp["P"], inp.get("C"), inp.get("A")
        LP, info = cholesky(P_, options.linalg)
        ok = factor_ok(LP, info, P_).all()
        C2, d2, A2, b2, cs, as_, norms, nt, S = _init(
            P_, inp["q"], C_, inp.get("d"), A_, inp.get("b"), B, n, m, p, "dual", LP, start=not minimal, options=options
        )
        out = dict(ok=ok, C=C2, d=d2, A=A2, b=b2, c_scale=cs, a_scale=as_)
        out.update({"norm." + k: v for k, v in norms.items()})
        # (Abar when it is C or A itself: not a tensor of its own, see _DualNewton)
        out.update(
            {"nt." + k: getattr(nt, k, None) for k in names if not (k == "Abar" and (nt.Abar is C2 or nt.Abar is A2))}
        )
        out.update({"S." + k: v for k, v in S.items() if not minimal or k in _FUSED_STATE})
        return {k: v for k, v in out.items() if isinstance(v, (Tensor, CholeskyFactor))}

    key = ("dqp_ipm_init", B, n, m, p, minimal)
    defer_ok = defer_ok and key not in _SETUP_DEFER_FAILED
    # (with the kernel to follow, ipm_solve reads the outputs only in work it queues before it
    # returns, except P's factor, which the result's factors keep: the rest is not copied)
    out = graphed_call(
        key, fn, inputs, fresh=(lambda name: name.startswith("nt.LP")) if minimal else None, options=options
    )
    if out is None or (not defer_ok and not bool(out["ok"])):  # (one host sync, as in _choose_form)
        return None
    Cs, ds, As, bs = (out.get(k) for k in ("C", "d", "A", "b"))
    pre = {k[3:]: v for k, v in out.items() if k.startswith("nt.")}
    newton = _DualNewton(pre["LP"], P, Cs, As, B, n, m, p, _regularization(P.dtype)[1], pre=pre, q=q, options=options)
    norms = {k: out.get("norm." + k) for k in ("pscale", "qnorm", "bnorm", "dnorm")}
    S = {k[2:]: v for k, v in out.items() if k.startswith("S.")}
    ok = None
    if defer_ok and out["ok"].device.type == "cuda":
        # (copied to pinned host memory now, read after the caller's launches: the read then waits
        # for the setup only, not for the work queued after it)
        ok = torch.empty((), dtype=torch.bool, pin_memory=True)
        ok.copy_(out["ok"], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(out["ok"].device))
        ok = (key, ok, ev)
    elif defer_ok:
        ok = (key, out["ok"], None)
    return (Cs, ds, As, bs, out.get("c_scale"), out.get("a_scale"), norms, newton, S), ok


def _deferred_ok(deferred) -> bool:
    """The outcome of a deferred dual-form test (see :func:`_init_graphed`), waiting for the setup only."""
    _, ok, ev = deferred
    if ev is not None:
        ev.synchronize()
    return bool(ok)
