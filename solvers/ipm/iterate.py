"""The interior-point iteration of the torch loop: residuals, one predictor-corrector step, the
convergence and infeasibility checks, and the loop that runs them eagerly or as (captured) graphs.

The state of a solve is explicit: :class:`IterConfig` (what one solve fixes), :class:`Iteration`
(the step and the check as methods of it, and the products it carries from step to step) and the
state dict ``S`` of device tensors (what a CUDA graph's static buffers hold).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from dqp.linsolve.cholesky import CholeskyOptions, mv, tmv
from dqp.solvers.ipm.graphs import _CheckSchedule, _compact_size, _graph_for, _graph_stats, _GraphData, _scatter_state
from dqp.solvers.ipm.options import IPMOptions
from dqp.solvers.ipm.problem import _amax, _max_step

from dqp.errors import Status

Tensor = torch.Tensor

SOLVED, PINF, DINF, NUM = (
    int(Status.SOLVED),
    int(Status.PRIMAL_INFEASIBLE),
    int(Status.DUAL_INFEASIBLE),
    int(Status.NUMERICAL),
)

#: Eager float64 dual form with tracked products (:attr:`IterConfig.track`): every this many
#: iterations the products are recomputed exactly.
EXACT_EVERY = 5


@dataclass
class IterConfig:
    """What one solve fixes for its iterations (see :func:`dqp.solvers.ipm.ipm_solve`'s parameters).

    ``track``: the eager float64 dual form carries P z, Aᵀλ, Cᵀμ, A z, C z and M y from step to step
    instead of recomputing them (on the CPU each product is a pass over a (B, ·, n) matrix that does
    not fit in cache); recomputed exactly every :data:`EXACT_EVERY` iterations."""

    n: int
    m: int
    p: int
    dtype: torch.dtype
    device: torch.device
    form: str
    eps: float
    eps_inf: float
    separate_steps: bool
    step_fraction: float
    refine: int
    stall_iters: int
    check_every: int
    compile: bool
    lin: CholeskyOptions
    track: bool = False

    @property
    def f64(self) -> bool:
        return self.dtype == torch.float64

    @property
    def wlo(self) -> float:
        """Bounds of W⁻¹ = s/μ within which W and W⁻¹ are finite in this dtype."""
        return 1e-60 if self.f64 else 1e-16

    @property
    def tiny(self) -> float:
        return torch.finfo(self.dtype).tiny


class Iteration:
    """The step and the check of one solve (the torch loop), with the products it tracks.

    ``graphed``: the calls run inside a (captured or emulated) graph, where the factorization
    covers the whole batch (the eager CPU path factorizes the running elements only).
    """

    def __init__(self, cfg: IterConfig, trace: Optional[list] = None):
        self.cfg, self.trace = cfg, trace
        self.trk: Dict[str, Any] = {}
        self.graphed = False

    # ------------------------------------------------------------------ residuals
    def residuals(self, S: Dict[str, Tensor], D: _GraphData, T: Optional[Dict[str, Tensor]] = None):
        """``(Pz, r_d, Aᵀλ, Cᵀμ, Az, Cz, r_eq, r_in, gap, gap scale)`` at the iterate of ``S``; ``T``:
        products tracked by :meth:`step` instead of recomputed ones."""
        c, lin = self.cfg, self.cfg.lin
        m, p = c.m, c.p
        z, s, mu, lam = S["z"], S["s"], S["mu"], S["lam"]
        if T is None:
            Pz, ATl, CTm = mv(D.P, z, lin), tmv(D.A, lam, lin) if p else None, tmv(D.C, mu, lin) if m else None
            Az, Cz = mv(D.A, z, lin) if p else None, mv(D.C, z, lin) if m else None
        else:
            Pz, ATl, CTm, Az, Cz = T["Pz"], T["ATl"], T["CTm"], T["Az"], T["Cz"]
        rd = Pz + D.q
        if p:
            rd = rd + ATl
        if m:
            rd = rd + CTm
        req = Az - D.b if p else None
        rin = Cz + s - D.d if m else None
        gap = (s * mu).sum(-1)
        gscl = 1.0 + (z * Pz).sum(-1).abs() + (D.q * z).sum(-1).abs()
        return Pz, rd, ATl, CTm, Az, Cz, req, rin, gap, gscl

    # ------------------------------------------------------------------ the step
    def _direction(self, S, R, D, running):
        """Factorize and solve the predictor and the corrector (Mehrotra); the direction and the
        step lengths ``(dz, dλ, dμ, (Δs, Δμ) stacked, (s, μ) stacked, steps, αp, αd, ok, a)``."""
        c = self.cfg
        m, p = c.m, c.p
        z, s, mu, lam, delta = S["z"], S["s"], S["mu"], S["lam"], S["delta"]
        _, rd, _, _, Az_s, Cz_s, req, rin, gap, gscl = R
        newton = D.newton
        # W⁻¹ = s/μ, kept inside the range where W and W⁻¹ are finite in this dtype
        winv = (s / mu).clamp(min=c.wlo, max=1.0 / c.wlo) if m else None
        fact_ok = newton.factor(winv, delta, None if self.graphed else running)
        if c.form == "dual" and c.f64:
            # (float64 only: in float32 the identities cancel badly — measured: every instance of
            # qpth's generator at n = m = 100 stalls — so float32 solves with P each iteration)
            yv = torch.cat([lam, mu], dim=-1) if (p and m) else (lam if p else mu)
            Az_ = [v for v in (Az_s, Cz_s) if v is not None]
            newton.set_point(
                D.q, z, yv, torch.cat(Az_, dim=-1) if len(Az_) > 1 else Az_[0], self.trk.get("My") if c.track else None
            )
        a = -rd
        bb = -req if p else None
        nrin = -rin if m else None
        if not m:
            dz_, dl_, dm_, _ = newton.direction(a, bb, None, None, True, c.refine)
            ap = torch.ones(z.shape[0], dtype=c.dtype, device=c.device)
            return dz_, dl_, dm_, None, None, None, ap, ap, fact_ok, a
        # (s and μ, and their directions, are stacked (B, 2, m) where both take the same operations:
        # one kernel for both; an iteration is a few hundred small kernels at B=128, n=m=100)
        c_aff = nrin + s  # −r_in + r_c/μ with r_c = s∘μ
        _, dl_a, dm_a, Cdz_a = newton.direction(a, bb, c_aff, winv, False, 0)
        sm = torch.stack([s, mu], 1)
        dsm_a = torch.stack([nrin - Cdz_a, dm_a], 1)  # (Δs, Δμ) affine
        st_a = _max_step(sm, dsm_a, 1.0)  # (B, 2): primal, dual
        if not c.separate_steps:
            st_a = st_a.amin(-1, keepdim=True)
        tau = gap / m
        sm_a = torch.addcmul(sm, st_a.unsqueeze(-1), dsm_a)
        mu_aff = (sm_a[:, 0] * sm_a[:, 1]).sum(-1) / m
        sigma = (mu_aff / tau.clamp(min=c.tiny)).clamp(min=0.0, max=1.0) ** 3
        # corrector (centering + second order) with the same factorization
        rc = torch.addcmul(s * mu, dsm_a[:, 0], dm_a).sub_((sigma * tau).unsqueeze(-1))
        c_cor = torch.addcdiv(nrin, rc, mu)
        dz_, dl_, dm_, Cdz = newton.direction(a, bb, c_cor, winv, True, c.refine)
        dsm = torch.stack([nrin - Cdz, dm_], 1)
        # fraction to the boundary, → 1 as the instance converges (per instance)
        eta = (1.0 - (gap / gscl).sqrt()).clamp(min=c.step_fraction)
        eta = torch.nan_to_num(eta, nan=c.step_fraction)  # (a NaN gap must not reach the step)
        st = (eta.unsqueeze(-1) * _max_step(sm, dsm)).clamp(max=1.0)
        if not c.separate_steps:
            st = st.amin(-1, keepdim=True)
        return dz_, dl_, dm_, dsm, sm, st, st[:, 0], st[:, -1], fact_ok, a

    def step(
        self, S: Dict[str, Tensor], R, D: _GraphData, it: int = 0, scaled=(None, None, None, None)
    ) -> Dict[str, Tensor]:
        """One predictor-corrector step from the state S with its residuals R (:meth:`residuals`);
        returns the updated entries of S. ``it``, ``scaled``: for ``trace`` only."""
        c = self.cfg
        m, p = c.m, c.p
        z, s, mu, lam, delta, nfail, done = (S[k] for k in ("z", "s", "mu", "lam", "delta", "nfail", "done"))
        running = ~done
        iters = S["iters"] + running
        dz_, dl_, dm_, dsm, sm, st, ap, ad, fact_ok, a = self._direction(S, R, D, running)
        # finite direction: a NaN or ±inf anywhere makes the sum non-finite (a sum that overflows
        # counts as non-finite too)
        tot = dz_.sum(-1)
        if p:
            tot = tot + dl_.sum(-1)
        if m:
            tot = tot + dsm.sum((-2, -1))
        ok = fact_ok & torch.isfinite(tot)
        upd = running & ok
        # failed factorization / non-finite step: raise that instance's regularization and retry
        # (δ ∈ [1, 1e12]: ×100 after a failure, ×0.5 after a success)
        bad = running & ~ok
        delta = (delta * torch.where(bad, 100.0, 0.5)).clamp(min=1.0, max=1e12)
        nfail = (nfail + 1) * bad
        if self.trace is not None:
            pres, pscl, dres, dscl = scaled
            sc = lambda x, y: None if x is None else x / y  # noqa: E731 (no check this iteration)
            self.trace.append(
                dict(
                    it=it,
                    pres=sc(pres, pscl),
                    dres=sc(dres, dscl),
                    gap=R[8] / R[9],
                    ap=ap,
                    ad=ad,
                    delta=delta,
                    ok=ok,
                    fact_ok=fact_ok,
                    done=done.clone(),
                    mumax=_amax(mu),
                    smin=s.amin(-1) if m else None,
                )
            )
        u = upd.unsqueeze(-1)
        z = torch.where(u, torch.addcmul(z, ap.unsqueeze(-1), dz_), z)
        if m:
            # (clamp: keep strict interiority against round-off)
            sm = torch.where(u.unsqueeze(-1), torch.addcmul(sm, st.unsqueeze(-1), dsm), sm).clamp_(min=c.tiny)
            s, mu = sm[:, 0], sm[:, 1]
        if p:
            lam = torch.where(u, torch.addcmul(lam, ad.unsqueeze(-1), dl_), lam)
        if c.track:
            self._track(R, D, u, a, dl_, dm_, ap, ad)
        return dict(z=z, s=s, mu=mu, lam=lam, delta=delta, nfail=nfail, iters=iters, it=S["it"] + 1)

    def _track(self, R, D, u, a, dl_, dm_, ap, ad) -> None:
        """Products at the new iterate from this step's own quantities: P Δz = a − Āᵀ Δy (the first
        block row, which the dual form satisfies by construction), Ā Δz and M Δy from the Schur
        solve; one pass over [A; C] instead of recomputing P z, C z, Cᵀμ, A z, Aᵀλ, M y (an error in a
        tracked product decays by (1 − α) per step: it enters the next direction through the
        residual it is used for)."""
        c, trk, newton = self.cfg, self.trk, D.newton
        m, p = c.m, c.p
        Az_s, Cz_s = R[4], R[5]
        ATd = tmv(D.A, dl_, c.lin) if p else None
        CTd = tmv(D.C, dm_, c.lin) if m else None
        Pdz = a - (ATd if p else 0.0) - (CTd if m else 0.0)
        apc, adc = ap.unsqueeze(-1), ad.unsqueeze(-1)
        Abdz = newton.last_Abdz
        upd_ = lambda v, dv, st: torch.where(u, torch.addcmul(v, st, dv), v)  # noqa: E731
        trk.update(
            Pz=upd_(trk["Pz_cur"], Pdz, apc),
            My=upd_(newton.My_point, newton.last_My, adc),
            ATl=upd_(trk["ATl_cur"], ATd, adc) if p else None,
            CTm=upd_(trk["CTm_cur"], CTd, adc) if m else None,
            Az=upd_(Az_s, Abdz[:, :p], apc) if p else None,
            Cz=upd_(Cz_s, Abdz[:, p:], apc) if m else None,
        )

    # ------------------------------------------------------------------ the check
    def _scaled_norms(self, S, R, D):
        """``(pres, pscl, dres, dscl)``: the primal and dual residual norms and their scales."""
        c = self.cfg
        m, p = c.m, c.p
        Pz, rd, ATl, CTm, Az, Cz, req, rin, gap, gscl = R
        z, s = S["z"], S["s"]
        # (∞-norms are ≥ 0: max with 0 only where there is no constraint at all)
        pres = pscl = None
        if p:
            pres = _amax(req)
            pscl = torch.maximum(_amax(Az), D.norms["bnorm"])
        if m:
            pres = _amax(rin) if pres is None else torch.maximum(pres, _amax(rin))
            ci = torch.maximum(torch.maximum(_amax(Cz), D.norms["dnorm"]), _amax(s))
            pscl = ci if pscl is None else torch.maximum(pscl, ci)
        if pres is None:
            pres = torch.zeros(z.shape[0], dtype=c.dtype, device=c.device)
            pscl = torch.ones(z.shape[0], dtype=c.dtype, device=c.device)
        else:
            pscl = pscl.clamp(min=1.0)
        dres = _amax(rd)
        dscl = torch.maximum(_amax(Pz), D.norms["qnorm"])
        if p:
            dscl = torch.maximum(dscl, _amax(ATl))
        if m:
            dscl = torch.maximum(dscl, _amax(CTm))
        return pres, pscl, dres, dscl + 1.0

    def _primal_cert(self, D, lv, mv_, Ayv, radius):
        """y = (λ, μ) normalized: Aᵀŷ_λ + Cᵀŷ_μ = r and bᵀŷ_λ + dᵀŷ_μ = v < 0 prove that no feasible z
        has |rᵀz| < −v, i.e. none within ‖z‖∞ ≤ −v/‖r‖₁. Accepted when r is tiny (a certificate) or
        when that ball is much larger than the iterates (rows are unit norm after the scaling)."""
        c = self.cfg
        yn = torch.maximum(_amax(lv), _amax(mv_)).clamp(min=c.tiny)
        r = Ayv / yn.unsqueeze(-1)
        val = ((D.b * lv).sum(-1) if c.p else 0.0) + ((D.d * mv_).sum(-1) if c.m else 0.0)
        val = val / yn
        scale = (1.0 if c.p else 0.0) + (1.0 if c.m else 0.0)
        small = (_amax(r) <= c.eps_inf * scale) | (r.abs().sum(-1) * radius <= -val)
        return small & (val < -c.eps_inf), yn

    def _dual_cert(self, D, x, Px, Ax, Cx):
        """x with ‖Px‖, ‖Ax‖, max(Cx) small and qᵀx < 0 (relative to ‖x‖): a direction of unboundedness."""
        c = self.cfg
        xn = _amax(x).clamp(min=c.tiny)
        okc = _amax(Px) <= c.eps_inf * D.norms["pscale"] * xn
        if c.p:
            okc = okc & (_amax(Ax) <= c.eps_inf * xn)
        if c.m:
            okc = okc & (Cx.amax(-1) <= c.eps_inf * xn)
        return okc & ((D.q * x).sum(-1) < -c.eps_inf * D.norms["qnorm"].clamp(min=c.tiny) * xn), xn

    def _infeasible(self, S, R, D, p_ok, d_ok):
        """Infeasibility certificates (for instances that are not converging) from products already
        computed: the iterates and their change since the last check; ``(pinf, dinf, Aᵀλ + Cᵀμ)``."""
        c = self.cfg
        m, p = c.m, c.p
        Pz, _, ATl, CTm, Az, Cz = R[:6]
        z, mu, lam = S["z"], S["mu"], S["lam"]
        Ay = (ATl + CTm) if (p and m) else (ATl if p else (CTm if m else torch.zeros_like(z)))
        radius = 1e3 * (1.0 + _amax(z))
        have_prev = S["have_prev"]
        if m or p:
            c1, ynorm = self._primal_cert(D, lam, mu, Ay, radius)
            dmu_s = mu - S["prev_mu"] if m else mu
            c2, dyn = self._primal_cert(D, lam - S["prev_lam"], dmu_s, Ay - S["prev_Ay"], radius)
            if m:
                c2 = c2 & (dmu_s.amin(-1) >= -c.eps_inf * dyn)
            pinf = ((c1 & (ynorm > 1.0 / c.eps_inf**0.5)) | (c2 & have_prev)) & ~p_ok
        else:
            pinf = torch.zeros(z.shape[0], dtype=torch.bool, device=c.device)
        e1, zn = self._dual_cert(D, z, Pz, Az, Cz)
        e2, _ = self._dual_cert(
            D, z - S["prev_z"], Pz - S["prev_Pz"], Az - S["prev_Az"] if p else None, Cz - S["prev_Cz"] if m else None
        )
        dinf = ((e1 & (zn > 1.0 / c.eps_inf**0.5)) | (e2 & have_prev)) & ~d_ok
        return pinf, dinf, Ay

    def check(self, S: Dict[str, Tensor], R, D: _GraphData):
        """Norms, convergence, infeasibility certificates, stalls and statuses at the iterate of
        ``S`` with its residuals ``R``. Device tensors only (it runs inside the captured iteration);
        returns the updated entries of S and (pres, pscl, dres, dscl)."""
        c = self.cfg
        Pz, gap, gscl = R[0], R[8], R[9]
        pres, pscl, dres, dscl = self._scaled_norms(S, R, D)
        p_ok = pres <= c.eps * pscl
        d_ok = dres <= c.eps * dscl
        conv = p_ok & d_ok & (gap <= c.eps * gscl)
        pinf, dinf, Ay = self._infeasible(S, R, D, p_ok, d_ok)
        done, status = S["done"], S["status"]
        status = torch.where(conv & ~done, SOLVED, status)
        done = done | conv
        # a certificate must be seen twice (not necessarily in consecutive checks)
        pinf_cnt = S["pinf_cnt"] + (pinf & ~done).to(torch.int64)
        dinf_cnt = S["dinf_cnt"] + (dinf & ~done).to(torch.int64)
        pinf_hit = (pinf_cnt >= 2) & ~done
        dinf_hit = (dinf_cnt >= 2) & ~done & ~pinf_hit
        status = torch.where(pinf_hit, PINF, status)
        status = torch.where(dinf_hit, DINF, status)
        done = done | pinf_hit | dinf_hit
        # repeated factorization failures: a certificate seen once decides, else NUMERICAL
        numfail = (S["nfail"] >= 8) & ~done
        fail_st = torch.where(pinf_cnt > 0, PINF, torch.where(dinf_cnt > 0, DINF, NUM))
        status = torch.where(numfail, fail_st, status)
        done = done | numfail
        # stall: no halving of the worst scaled residual for `stall_iters` iterations
        merit = torch.maximum(torch.maximum(pres / pscl, dres / dscl), gap / gscl)
        improved = merit < 0.5 * S["best"]
        best = torch.where(improved, merit, S["best"])
        last_impr = torch.where(improved, S["it"], S["last_impr"])
        stalled = (S["it"] - last_impr >= c.stall_iters) & ~done
        status = torch.where(stalled, NUM, status)
        done = done | stalled
        upd = dict(
            done=done,
            status=status,
            pinf_cnt=pinf_cnt,
            dinf_cnt=dinf_cnt,
            best=best,
            last_impr=last_impr,
            have_prev=torch.ones_like(S["have_prev"]),
            prev_z=S["z"],
            prev_Pz=Pz,
            prev_lam=S["lam"],
            prev_mu=S["mu"],
            prev_Ay=Ay,
        )
        if c.p:
            upd["prev_Az"] = R[4]
        if c.m:
            upd["prev_Cz"] = R[5]
        return upd, (pres, pscl, dres, dscl)

    # ------------------------------------------------------------------ graphs
    def make_body(self, D: _GraphData):
        """``check_every`` steps, then the check at the new iterate, as one function of the state:
        what the CUDA graph captures."""
        c = self.cfg
        # a captured step factorizes every time: a factor cached by an earlier (warm-up or eager)
        # call is a tensor outside the graph's static data, which a cached graph would keep reading
        # after later calls refilled that data
        D.newton.cache_const, D.newton._const = False, None

        def one(S):
            return {**S, **self.step(S, self.residuals(S, D), D)}

        def chk(S):
            return {**S, **self.check(S, self.residuals(S, D), D)[0]}

        if c.compile:
            # fuse the element-wise work between the factorizations and solves (torch.compile;
            # the linear algebra stays ATen/cuSOLVER): compiled once per captured graph
            one, chk = torch.compile(one, dynamic=False), torch.compile(chk, dynamic=False)

        def body(S):
            for _ in range(c.check_every):
                S = one(S)
            return chk(S)

        # captured as one graph per part (see _capture): the host launches the next steps while the
        # device runs the first
        body.parts = ((one, c.check_every), (chk, 1))
        return body

    def graph_key(self, D: _GraphData, Bc: int, options: IPMOptions) -> tuple:
        """The graph-cache key: everything the captured iterations depend on besides tensor values
        (the thread and stream too: a cached graph's static buffers are reused only by calls that
        are ordered after one another on the device)."""
        c = self.cfg
        return (
            c.form,
            c.dtype,
            str(c.device),
            Bc,
            c.n,
            c.m,
            c.p,
            c.separate_steps,
            float(c.step_fraction),
            int(c.refine),
            c.check_every,
            c.eps,
            c.eps_inf,
            int(c.stall_iters),
            options,
            bool(c.compile),
            D.signature(),
            threading.get_ident(),
            torch.cuda.current_stream(c.device).cuda_stream if c.device.type == "cuda" else 0,
        )

    def eager_step(self, S, D, it: int, check: bool, last: bool):
        """One eager iteration: the check where due (on exact products), then the step unless the
        solve stops there (every instance done, or ``last``: the iteration limit). Returns
        ``(S, stop, nleft)`` (nleft None without a check)."""
        c, trk = self.cfg, self.trk
        use_T = c.track and "Pz" in trk and it % EXACT_EVERY != 0
        R = self.residuals(S, D, T=trk if use_T else None)
        if c.track:
            trk.update(Pz_cur=R[0], ATl_cur=R[2], CTm_cur=R[3])
            if not use_T:
                trk.pop("My", None)  # exact M y too at the exact iterations
        scaled = (None, None, None, None)
        nleft = None
        if check:
            upd, scaled = self.check(S, R, D)
            if use_T and bool((upd["done"] & ~S["done"]).any()):
                # a tracked product drifts from the exact one and can hide a residual (q scaled by
                # 1e8: SOLVED with a true scaled primal residual of 1.6e-7 against eps = 1e-9):
                # an element stops only on exact products
                R = self.residuals(S, D)
                trk.update(Pz_cur=R[0], ATl_cur=R[2], CTm_cur=R[3])
                trk.pop("My", None)
                upd, scaled = self.check(S, R, D)
            S = {**S, **upd}
            nleft = int((~S["done"]).sum())
            if nleft == 0 or last:
                return S, True, nleft
        return {**S, **self.step(S, R, D, it=it, scaled=scaled)}, False, nleft


@dataclass
class _Compaction:
    """Tail compaction of the captured iterations: ``full`` holds the whole batch's state, ``gidx``
    the current rows' places in it."""

    full: Optional[Dict[str, Tensor]] = None
    gidx: Optional[Tensor] = None


def _compact(S, live, bucket: int, nleft: int, comp: _Compaction):
    """Continue on the running rows alone, padded with finished ones to ``bucket`` rows (they take no
    steps, keep their values and do not count as running in later reads); ``(S, live)``."""
    gidx = comp.gidx
    if comp.full is None:
        # (the graph's static buffers: copied, a cached graph overwrites them later)
        comp.full = {k: v.clone() for k, v in S.items() if v.dim() >= 1}
    else:
        _scatter_state(comp.full, gidx, S)
    run = torch.nonzero(~S["done"]).squeeze(-1)
    fin = torch.nonzero(S["done"]).squeeze(-1)[: bucket - nleft]
    idx = torch.cat([run, fin])
    comp.gidx = idx if gidx is None else gidx[idx]
    S = {k: (v[idx] if v.dim() >= 1 else v.clone()) for k, v in S.items()}
    _graph_stats["compactions"] += 1
    return S, live.subset(idx)


def run_loop(
    itr: Iteration,
    live: _GraphData,
    S: Dict[str, Tensor],
    B: int,
    max_iter: int,
    use_graph: bool,
    graph_cache: bool,
    options: IPMOptions,
) -> Dict[str, Tensor]:
    """The torch loop: iterations until every instance is done or ``max_iter``. With graphs, the
    steps up to the next check and the check per (captured) replay, the host reading one count per
    replay, and the tail compaction; eagerly (the CPU; on the GPU the tail after the last replay)
    one iteration at a time. The iterate is checked after every ``check_every``-th step (more often
    in the tail: :class:`_CheckSchedule`) and after the last one. Returns the final state."""
    c = itr.cfg
    k = max(c.n, c.m + c.p)
    gkey = itr.graph_key(live, B, options) if (use_graph and graph_cache) else None
    graph = None
    comp = _Compaction()
    Bc, it, checked = B, 0, -1  # checked: the iteration whose iterate the last check saw
    sched = _CheckSchedule(
        c.check_every,
        B,
        options.tail_checks and options.split_graphs and not (options.compact and B * k**2 >= options.compact_min_work),
        options.tail_fraction,
    )
    while True:
        itr.graphed = use_graph
        if use_graph and it == max(checked, 0) and sched.next <= max_iter:
            if graph is None:
                with torch.profiler.record_function("dqp::ipm_capture"):
                    graph, st = _graph_for(gkey, live, itr.make_body, S, options)
                if graph is None:
                    use_graph = False
                    continue
                S = st
            with torch.profiler.record_function("dqp::ipm_replay"):
                _graph_stats["replays"] += 1
                steps = sched.next - it
                graph.replay(steps) if sched.adaptive else graph.replay()  # (adaptive: a graph per step)
                it = checked = it + steps
                nleft = int((~S["done"]).sum())
                if nleft == 0 or it == max_iter:
                    break
                sched.checked(it, nleft)
            gidx = comp.gidx  # noqa: F841 (read by tests' spies)
            bucket = _compact_size(nleft, Bc, k, options)
            if bucket is not None:
                with torch.profiler.record_function("dqp::ipm_compact"):
                    S, live = _compact(S, live, bucket, nleft, comp)
                    Bc, graph = bucket, None
                    gkey = itr.graph_key(live, Bc, options) if graph_cache else None
            continue
        with torch.profiler.record_function("dqp::ipm_eager_iteration"):
            check = (it == sched.next or it == max_iter) and checked != it
            S, stop, nleft = itr.eager_step(S, live, it, check, it == max_iter)
            if check:
                checked = it
                sched.checked(it, nleft)
            if not stop:
                it += 1
        if stop:
            break
    if comp.full is not None:
        _scatter_state(comp.full, comp.gidx, S)
        return comp.full
    if graph is not None:
        # the static buffers belong to the graph (a cached graph overwrites them in a later call)
        return {key: S[key].clone() for key in ("z", "s", "mu", "lam", "status", "iters")}
    return S
