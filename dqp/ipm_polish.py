"""The batched polish of the IPM layer (:mod:`dqp.ipm_layer`): the active set of an IPM point and
the reduced KKT solve that makes the point exact on it, eagerly, masked or as a CUDA graph.

Active set. The IPM returns slacks ``s`` and duals ``μ`` with ``s∘μ ≈ 0``; row i is classified
active when ``s_i/‖C_i‖ < μ_i‖C_i‖`` (slack smaller than the dual, both in the unit-row scaling),
a rule that does not depend on the IPM's tolerance as long as it has separated the two (at
1e-9 the margin is many orders of magnitude). A weakly active row (``s_i ≈ μ_i ≈ 0``) is
classified by the same comparison; the solution map is not differentiable there and the
gradient returned is the one-sided one of the chosen classification.

Polish. With the active set J, the reduced KKT system ``K (z, λ, μ_J) = (−q, b, d_J)`` is
solved once (the factorization is reused by the backward). The polished point is accepted for
an element when ``μ_J ≥ −τ`` and ``C_¬J z ≤ d_¬J + τ`` (τ = √eps_machine · scale); otherwise the
offending rows move (violated inactive → active, negative active → inactive) and the polish is
repeated (at most ``polish_rounds`` times); an element whose polish is still rejected keeps the
IPM point. Where the fused kernel solves the batch (:mod:`dqp.solvers.fused`), the same polish
runs at the end of its launch (``ipm_solve(polish_rounds=...)``) and its factor goes to the
backward; :func:`polish` then runs only for the elements the kernel reports as fallbacks
(a round's reduced system failed the pivot test), with its augmented and minimum-norm paths.
The polished solution satisfies the KKT conditions to round-off, so the gradients
are exact for that active set. Measured (qpth's generator, B=8, n=m=20, p=2, float64): gradients
with polish agree with an independent Clarabel + dense-KKT reference to 3e-11 (relative); without
polish they differ by ~2e-9, i.e. by the IPM tolerance. On degenerate problems the difference is
larger: for ``min ½‖x‖² − x₁ s.t. x₂ ≤ 0, x₁ ≤ 2`` the IPM's x₂ is −3e-5 (float64) / −4e-3
(float32) and the polished one is exactly 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dqp.linsolve.torch_batched import BatchedKKT
from dqp.solvers.ipm import DEFAULT_OPTIONS, IPMOptions, dual_factors, graph_device_ok, graphed_call

Tensor = torch.Tensor

__all__ = ["classify_active", "polish"]


def classify_active(C: Tensor, s: Tensor, mu: Tensor) -> Tensor:
    """Active mask (B, m): slack below the dual in unit-row scaling (module docstring)."""
    nrm = torch.linalg.vector_norm(C, dim=-1)
    nrm = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    return (s / nrm) < (mu * nrm)


def _attempt(kkt: BatchedKKT, qq, bb, CC, dd, cur, ok_in, tol):
    """Solve the reduced KKT system for the masks ``cur``; ``(z, lam, mu, ok, bad_rows)`` with
    ``ok`` where the point is consistent (multipliers ≥ −τ, inactive rows satisfied to τ) and
    ``bad_rows`` the rows that violate that."""
    dtype = kkt.P.dtype
    gmu = dd * cur.to(dtype) if CC is not None else None
    zp, lp, mp = kkt.solve(-qq, bb, gmu)
    ok = ok_in & torch.isfinite(zp).all(-1)
    if lp is not None:
        ok &= torch.isfinite(lp).all(-1)
    bad_rows = None
    if CC is not None:
        ok &= torch.isfinite(mp).all(-1)
        scale = 1.0 + mp.abs().amax(-1, keepdim=True)
        neg = cur & (mp < -tol * scale)
        Cz = torch.matmul(CC, zp.unsqueeze(-1)).squeeze(-1) if CC.dim() == 3 else zp @ CC.T
        viol = (~cur) & (Cz - dd > tol * (1.0 + dd.abs()))
        bad_rows = neg | viol
        ok &= ~bad_rows.any(-1)
    return zp, lp, mp, ok, bad_rows


def _accept(ok: Tensor, zp, lp, mp, z, lam, mu):
    """``(z, lam, mu)`` with the polished ``(zp, lp, mp)`` (μ clamped at 0) where ``ok`` (B,)."""
    t = ok.unsqueeze(-1)
    z = torch.where(t, zp, z)
    if lp is not None:
        lam = torch.where(t, lp, lam)
    if mp is not None:
        mu = torch.where(t, mp.clamp(min=0.0), mu)
    return z, lam, mu


def polish(
    P: Tensor,
    q: Tensor,
    C: Optional[Tensor],
    d: Optional[Tensor],
    A: Optional[Tensor],
    b: Optional[Tensor],
    z: Tensor,
    lam: Optional[Tensor],
    mu: Optional[Tensor],
    active: Optional[Tensor],
    solved: Tensor,
    *,
    rounds: int = 3,
    factors: Optional[dict] = None,
    options: IPMOptions = DEFAULT_OPTIONS,
):
    """Solve the reduced KKT system for the active set and accept it where it is consistent.

    Round 1 factorizes the whole batch; the (usually few) rejected elements are retried with
    their offending rows moved, on a sub-batch, and the accepted retries are merged into the
    factorization that the backward pass uses. Returns ``(z, lam, mu, active, kkt, polished)``
    with ``polished`` (B,) bool.
    """
    dtype = P.dtype
    B = q.shape[0]
    tol = math.sqrt(torch.finfo(dtype).eps)

    # round 1: the whole batch (reusing the IPM's factorization of P when it has one)
    kkt = BatchedKKT(P, A, C, active, batch=B, factors=factors, options=options.linalg)
    zp, lp, mp, ok, bad_rows = _attempt(kkt, q, b, C, d, active, solved, tol)
    z, lam, mu = _accept(ok, zp, lp, mp, z, lam, mu)
    polished = ok
    nc = kkt.negative_curvature  # (any round's K may show that P is not PSD)
    # later rounds: only the rejected elements, with the offending rows moved
    if C is not None and rounds > 1:
        idx = torch.nonzero(solved & ~ok).squeeze(-1)
        cur = (active ^ bad_rows)[idx]
        for _ in range(rounds - 1):
            if idx.numel() == 0:
                break
            sub = kkt.subset(idx, cur)
            pick = lambda M: M if M is None or M.dim() == 2 else M[idx]  # matrices: shared or batched
            zp, lp, mp, ok_s, bad_s = _attempt(
                sub,
                q[idx],
                None if b is None else b[idx],
                pick(C),
                d[idx],
                cur,
                torch.ones(idx.numel(), dtype=torch.bool, device=q.device),
                tol,
            )
            rows = torch.nonzero(ok_s).squeeze(-1)
            gi = idx[rows]
            z[gi] = zp[rows]
            if lam is not None:
                lam[gi] = lp[rows]
            mu[gi] = mp[rows].clamp(min=0.0)
            active = active.clone()
            active[gi] = cur[rows]
            polished = polished.clone()
            polished[gi] = True
            kkt.absorb(gi, sub, rows)
            if sub.negative_curvature is not None:
                nc = torch.zeros_like(solved) if nc is None else nc.clone()
                nc[idx] |= sub.negative_curvature
            keep = torch.nonzero(~ok_s).squeeze(-1)
            idx, cur = idx[keep], (cur ^ bad_s)[keep]
    kkt.negative_curvature = nc
    return z, lam, mu, active, kkt, polished


def _polish_graph_ok(P, q, C, A, res, options: IPMOptions, cuda_graph: bool = True) -> bool:
    """Whether the polish (and then the backward) of this batch runs as a CUDA graph
    (:attr:`IPMOptions.polish_graph`): the IPM took its dual form (``res.factors``: P positive
    definite and well conditioned) and the polish runs in float64 (for float32 data the graph
    factorizes P again in float64). The eager code is bound by the host (hundreds of small kernels,
    a few synchronizations); larger batches (``B·k² > polish_graph_max_work``) take the eager
    polish, whose retry rounds run on the rejected elements only. Measured on an H100 (qpth's
    generator, forward+backward): B=128, n=m=100 25.8 → 18.7 ms; B=128, n=m=500 105.6 → 210.7 ms
    (the polish and backward graphs do not both fit the cache's memory budget) — hence the limit.
    ``options``: the engine options; ``cuda_graph``: the solve's ``cuda_graph`` keyword."""
    if not (
        options.polish_graph
        and cuda_graph
        and res.factors is not None
        and P.dtype == torch.float64
        and graph_device_ok(P.device, options)
    ):
        return False
    if C is None and A is None:
        return False
    k = (C.shape[-2] if C is not None else 0) + (A.shape[-2] if A is not None else 0)
    return q.shape[0] * max(q.shape[-1], k) ** 2 <= options.polish_graph_max_work


def _polish_masked(P, q, C, d, A, b, z, lam, mu, active, solved, factors, rounds, options: IPMOptions):
    """:func:`polish` without host synchronization: every round on the whole batch (masks).

    Elements accepted in a round keep that round's point and factorization (:meth:`BatchedKKT.merge`).
    Returns ``(z, lam, mu, active, kkt, polished, fallback)``; ``fallback`` (B,) marks elements
    whose Cholesky path failed in a round they needed, for which the caller runs :func:`polish`.
    """
    tol = math.sqrt(torch.finfo(P.dtype).eps)
    B = q.shape[0]
    kkt = BatchedKKT(P, A, C, active, batch=B, factors=factors, fallback=False, options=options.linalg)
    zp, lp, mp, ok, bad = _attempt(kkt, q, b, C, d, active, solved & kkt.ok, tol)
    fallback = solved & ~kkt.ok
    z, lam, mu = _accept(ok, zp, lp, mp, z, lam, mu)
    polished = ok
    if C is not None:
        pending = solved & ~ok & ~fallback
        cur = torch.where(pending.unsqueeze(-1), active ^ bad, active)
        for _ in range(rounds - 1):
            sub = BatchedKKT(P, A, C, cur, batch=B, factors=factors, fallback=False, options=options.linalg)
            zp, lp, mp, ok_s, bad_s = _attempt(sub, q, b, C, d, cur, pending & sub.ok, tol)
            fallback = fallback | (pending & ~sub.ok)
            acc = pending & ok_s
            z, lam, mu = _accept(acc, zp, lp, mp, z, lam, mu)
            active = torch.where(acc.unsqueeze(-1), cur, active)
            polished = polished | acc
            kkt.merge(acc, sub)
            pending = pending & ~ok_s & sub.ok
            cur = torch.where(pending.unsqueeze(-1), cur ^ bad_s, cur)
    return z, lam, mu, active, kkt, polished, fallback


_KKT_TENSORS = ("a", "Abar", "D", "HiAbt", "LS", "ok", "path", "rho")


def _polish_graphed(P, q, C, d, A, b, z, lam, mu, active, solved, factors, rounds, options: IPMOptions):
    """:func:`_polish_masked` as a cached CUDA graph; None where the caller must run :func:`polish`.
    ``factors=None`` (float32 data polished in float64, which has no IPM factors of that dtype):
    they are computed inside the graph."""
    own = factors is None

    def fn(t):
        if own:
            f, pd = dual_factors(t["P"], t.get("C"), t.get("A"), options)
        else:
            f, pd = dict(L=t["L"], PiAbt=t["PiAbt"], M=t["M"]), None
        zz, ll, mm, aa, kkt, pol, fb = _polish_masked(
            t["P"],
            t["q"],
            t.get("C"),
            t.get("d"),
            t.get("A"),
            t.get("b"),
            t["z"],
            t.get("lam"),
            t.get("mu"),
            t.get("active"),
            t["solved"],
            f,
            rounds,
            options,
        )
        out = {"z": zz, "polished": pol, "fallback": fb if pd is None else fb | (t["solved"] & ~pd)}
        out.update({k: v for k, v in (("lam", ll), ("mu", mm), ("active", aa)) if v is not None})
        out.update({"kkt." + k: getattr(kkt, k) for k in _KKT_TENSORS if getattr(kkt, k, None) is not None})
        if own:
            out["kkt.L"] = f["L"]
        return out

    inputs = dict(P=P, q=q, C=C, d=d, A=A, b=b, z=z, lam=lam, mu=mu, active=active, solved=solved)
    if not own:
        inputs.update(L=factors["L"], PiAbt=factors["PiAbt"], M=factors["M"])
    # (all rounds in one graph: on qpth's generator, B=128, n=m=100, the first round accepts 113–124
    # of the 128 elements, so a graph of the first round alone would nearly always need a second)
    out = graphed_call(("dqp_polish", int(rounds), own), fn, inputs, options=options)
    if out is None or bool(out["fallback"].any()):
        return None
    st = {k[4:]: v for k, v in out.items() if k.startswith("kkt.")}
    st.update(P=P, A=A, C=C)
    if not own:
        st["L"] = factors["L"]
    kkt = BatchedKKT.from_state(st, options=options.linalg)
    kkt._graphed = True  # its backward may run as a graph too
    return out["z"], out.get("lam"), out.get("mu"), out.get("active"), kkt, out["polished"]


def _kkt_of_kernel(
    P: Tensor,
    C: Optional[Tensor],
    A: Optional[Tensor],
    active: Optional[Tensor],
    res,
    graphs: bool = True,
    options: IPMOptions = DEFAULT_OPTIONS,
) -> BatchedKKT:
    """The :class:`BatchedKKT` (Cholesky path) of the polish the fused kernel ran: its factor of the
    reduced system's Schur complement (``res.polish["LS"]``) with the IPM's factors of P. Where its
    backward runs as a CUDA graph, the graph's inputs are the few tensors it is made of
    (``kkt._raw``, for :meth:`BatchedKKT.from_schur_factor`), not its dozen derived ones. Its
    backward runs as a graph where ``B·k² ≤`` :attr:`IPMOptions.backward_graph_max_work`."""
    raw = dict(
        P=P,
        A=A,
        C=C,
        active=active,
        L=res.factors["L"],
        PiAbt=res.factors["PiAbt"],
        LS=res.polish["LS"],
        ok=res.polish["ok"],
    )
    kkt = BatchedKKT.from_schur_factor(**raw, options=options.linalg)
    B, n = P.shape[0], P.shape[-1]
    k = (A.shape[-2] if A is not None else 0) + (C.shape[-2] if C is not None else 0)
    kkt._graphed = (
        graphs
        and options.polish_graph
        and graph_device_ok(P.device, options)
        and B * max(n, k) ** 2 <= options.backward_graph_max_work
    )
    if kkt._graphed:
        kkt._raw = raw
    return kkt


def _not_psd(P: Tensor, res, kkt: BatchedKKT, solved: Tensor) -> Optional[Tensor]:
    """(B,) bool: the elements whose P is not positive semidefinite, or None where none can be.

    Only the primal form can meet such a P (the dual form needs P's Cholesky factor). Candidates
    are the elements whose reduced KKT matrix showed negative curvature in the polish
    (:attr:`BatchedKKT.negative_curvature`, known on the host without a synchronization) and, in
    the primal form, those the IPM failed on; P's smallest eigenvalue decides, for them only. A
    convex batch in the dual form costs nothing; in the primal form, one read of the statuses.
    """
    if res.form != "primal" or res.fused:
        return None
    cand = ~solved
    if kkt.negative_curvature is not None:
        cand = cand | kkt.negative_curvature
    idx = torch.nonzero(cand).squeeze(-1)  # (the host sync: the primal form syncs per step anyway)
    if idx.numel() == 0:
        return None
    B, n = solved.shape[0], P.shape[-1]
    Pi = P.expand(B, n, n)[idx]
    lo = torch.linalg.eigvalsh(Pi.double())[:, 0]
    big = Pi.double().abs().flatten(-2).amax(-1)
    bad = torch.zeros_like(solved)
    bad[idx] = lo < -math.sqrt(torch.finfo(P.dtype).eps) * big
    return bad
