"""Built-in batched primal-dual interior-point method (pure torch, any device).

Solves a batch of convex QPs

    min ½ zᵀPz + qᵀz   s.t.   Cz ≤ d  (duals μ ≥ 0),   Az = b  (duals λ)

with Mehrotra's predictor-corrector on the slack form ``Cz + s = d, s ≥ 0``. The same code runs
on CPU and CUDA, in float32 and float64, for a whole batch at once.

Linear algebra (DESIGN-NOTES §6), Cholesky only (batched LU hangs on some MKL builds). The
Newton system, after eliminating the slack step ``Δs = −r_in − CΔz``, reads

    [[P, Aᵀ, Cᵀ], [A, 0, 0], [C, 0, −W⁻¹]] [Δz; Δλ; Δμ] = [a; b; c],     W = diag(μ/s).

Two eliminations of it are implemented; the solver picks one per call (``form="auto"``):

* ``"primal"``: ``H = P + CᵀWC + δI`` (n×n Cholesky every iteration), equalities through the
  Schur complement ``A H⁻¹ Aᵀ + δ_d I`` (p×p Cholesky). Works for PSD ``P`` (LPs included), for
  ``m > n`` and for dependent rows (the small δ's make the systems quasi-definite; the IPM
  computes its residuals from the unregularized data, so δ only perturbs the direction).
* ``"dual"``: when ``P`` is positive definite and well conditioned, eliminate ``Δz`` instead:
  ``S = Ā P⁻¹ Āᵀ + diag(0, W⁻¹) + δ_d I`` with ``Ā = [A; C]``. ``Ā P⁻¹ Āᵀ`` is formed once
  (once for the whole batch when P, A and C are shared), so an iteration costs one
  (p+m)×(p+m) Cholesky. Chosen when its estimated cost is lower (``m + p`` not much larger than n).

Per-instance logic without host synchronization inside the loop: every instance carries its own
``done`` flag, step lengths of finished instances are zero (``torch.where``, so a NaN in a
finished or failing instance never leaks), a failed Cholesky (``cholesky_ex`` info) raises that
instance's regularization for the next iteration, and the convergence check (residual norms,
certificates, statuses) runs after every ``check_every``-th step and after the last one, where the
host reads ``done.all()`` (every step on CPU, where that costs nothing). On CUDA ``check_every``
steps and the check are one captured CUDA graph.

Stopping rule (scaled, relative, dtype dependent; ``eps`` defaults to 1e-9 in float64 and 1e-5 in
float32), for every instance:

    ‖Az − b‖∞, ‖Cz + s − d‖∞ ≤ eps·(1 + max(‖Az‖∞, ‖b‖∞, ‖Cz‖∞, ‖d‖∞, ‖s‖∞))
    ‖Pz + q + Aᵀλ + Cᵀμ‖∞   ≤ eps·(1 + max(‖Pz‖∞, ‖q‖∞, ‖Aᵀλ‖∞, ‖Cᵀμ‖∞))
    sᵀμ                       ≤ eps·(1 + |zᵀPz| + |qᵀz|)

Infeasibility (no homogeneous embedding): the iterates of an infeasible instance diverge along a
certificate, which is checked on the normalized iterates and on the last step, for instances whose
residual is *not* small:

* primal infeasible: ‖Aᵀλ̂ + Cᵀμ̂‖∞ ≤ ε_inf·scale and bᵀλ̂ + dᵀμ̂ < −ε_inf (μ̂ ≥ 0);
* dual infeasible:  ‖Px̂‖∞, ‖Ax̂‖∞, max(Cx̂) ≤ ε_inf·scale and qᵀx̂ < −ε_inf·‖q‖∞.

A certificate must hold at two iterations before the instance is flagged; the primal one is also
accepted in the weaker form "no feasible point within ‖z‖∞ ≤ −v/‖r‖₁, a ball 1000× larger than
the iterates", because the duals of an infeasible instance grow so fast (1e11 and more) that the
normalized residual ‖r‖ only reaches ~1e-6.
Statuses are :class:`dqp.errors.Status` values; a non-SOLVED status is never silent (the
layer raises or masks on it).
"""
from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import torch

from dqp.errors import SettingsError, Status
from dqp.linsolve.cholesky import (mv, tmv)
from dqp.solvers import fused as _fused
from dqp.solvers.base import ForwardSolver, register_solver
from dqp.solvers.ipm.options import DEFAULT_OPTIONS, IPMOptions
from dqp.solvers.ipm.dispatch import _use_fused
from dqp.solvers.ipm.graphs import (_SETUP_DEFER_FAILED, _CheckSchedule, _GraphData,
                                    _compact_size, _graph_for, _graph_stats, _scatter_state,
                                    graph_device_ok)
from dqp.solvers.ipm.newton import form_by_cost, _choose_form
from dqp.solvers.ipm.problem import IPMResult, _amax, _max_step, _prepare, _row_scales, default_eps
from dqp.solvers.ipm.start import _deferred_ok, _init, _init_graphed

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["ipm_solve", "IPMSolver"]


def ipm_solve(P: Tensor, q: Tensor, C: Optional[Tensor] = None, d: Optional[Tensor] = None,
              A: Optional[Tensor] = None, b: Optional[Tensor] = None, *, eps: Optional[float] = None,
              max_iter: int = 100, check_every: Optional[int] = None, form: str = "auto",
              separate_steps: bool = True, step_fraction: float = 0.995,
              eps_infeasible: Optional[float] = None, refine: Optional[int] = None,
              stall_iters: int = 12, fallback64: bool = True, cuda_graph: bool = True,
              graph_cache: bool = True, compile: bool = False, fused: Optional[bool] = None,
              polish_rounds: int = 0, polish_eps: Union[None, float, Sequence[float]] = None,
              trace: Optional[list] = None, options: IPMOptions = DEFAULT_OPTIONS) -> IPMResult:
    """Solve a batch of convex QPs with a primal-dual interior-point method.

    Parameters
    ----------
    P : (n, n) or (B, n, n)
        Symmetric positive semidefinite.
    q : (n,) or (B, n)
    C, d : (m, n) / (B, m, n) and (m,) / (B, m), or None
        Inequalities ``Cz ≤ d``. A 0-row C means none.
    A, b : (p, n) / (B, p, n) and (p,) / (B, p), or None
        Equalities ``Az = b``. A 0-row A means none.
    eps : float, optional
        Relative stopping tolerance (see the module docstring); default :func:`default_eps`.
    max_iter : int
        Iteration limit; instances not converged by then get ``Status.MAX_ITER``.
    check_every : int, optional
        Steps between convergence checks; the host reads the ``all done`` flag (a device sync)
        after each check. Default 1 on CPU, 4 on other devices. An instance that converges
        between checks keeps stepping (towards the same solution) until the next check.
    form : {"auto", "primal", "dual"}
        Which elimination of the Newton system to use (module docstring).
    separate_steps : bool
        Separate primal and dual step lengths (default) or one common step.
    step_fraction : float
        Fraction of the step to the boundary (0.995).
    eps_infeasible : float, optional
        Tolerance of the infeasibility certificates (default 1e-7 float64, 1e-4 float32).
    refine : int, optional
        Iterative-refinement steps of the (corrector) Newton direction on the unreduced system.
        Default 1 for the primal form: as W grows, ``H = P + CᵀWC`` loses accuracy and the IPM
        stalls with a dual residual around 1e-8; one step of refinement on the unreduced system
        removes the stall (measured on qpth's generator, n=50, m=150: 17 of 128 instances stall
        without it). Default 0 for the dual form, where a refinement of its Schur system changed
        no iteration count in the same measurements.
    stall_iters : int
        An instance whose worst scaled residual has not halved for this many iterations stops
        with ``Status.NUMERICAL`` instead of running to ``max_iter`` (and holding up its batch).
    fallback64 : bool
        For float32/float16 data: re-solve the instances that end with MAX_ITER or NUMERICAL in
        float64 (outputs are cast back). Float32 stalls on ill-conditioned problems (measured on
        qpth's generator, n = m = 100: 1 of 128 instances stalls at a dual residual ~1e-3).
    cuda_graph : bool
        On CUDA, capture an interior-point step (residuals, factorization, predictor, corrector,
        step) and the convergence check as CUDA graphs (one per step, ``options.split_graphs``) and
        replay ``check_every`` steps and a check until every instance is done: nothing in them
        synchronizes with the host, which reads one flag per replay. Cuts the per-iteration launch
        overhead that dominates small problems. The dual form's setup runs as a cached graph too
        (``options.setup_graph``, with ``graph_cache``). Falls back to eager execution if the capture fails.
    graph_cache : bool
        Keep the captured iteration for later calls with the same shapes, dtype, device, form and
        options (LRU of ``options.graph_cache_size`` entries, ``options.graph_cache_max_bytes`` in all): those
        calls copy their data into the graph's static buffers instead of capturing again, so a
        training loop captures once. :func:`clear_graph_cache` frees them.
    compile : bool
        With ``cuda_graph``: compile the captured iteration with ``torch.compile`` first, which
        fuses its element-wise work (about 100 small kernels per step) into a few generated
        kernels. The first call for each shape then takes the compilation time (about 100 s on an
        H100 host); later calls reuse the cached graph. Each capture compiles anew, and past
        ``torch._dynamo.config.cache_size_limit`` captures in one process torch.compile runs the
        iteration uncompiled (with its own warning). Off by default.
    fused : bool, optional
        Run the whole iteration loop as one fused kernel (:mod:`dqp.solvers.fused`: a thread
        block per QP). ``None`` (default) follows ``options.kernel.mode`` (``"auto"``: on
        CUDA for float64 dual-form problems whose Schur matrix fits a block's shared memory);
        ``True`` requires it (on the CPU it runs the kernel's C++ build, for tests) and raises
        :class:`~dqp.errors.SettingsError` where it does not apply; ``False``: the torch loop.
    polish_rounds : int
        Where the fused kernel runs: go on, in the same launch, with the active-set polish of
        :func:`dqp.ipm_layer.polish` (at most this many rounds; 0: none) and return it in
        :attr:`IPMResult.polish`. The torch loop ignores it (``polish`` is None: the caller polishes).
    polish_eps : float, optional
        With the kernel's polish (``polish_rounds > 0``) and ``polish_eps > eps``: two stages. The
        IPM first stops at ``polish_eps`` and polishes; where the polish rejects a solved element's
        point, that element goes on to ``eps`` (the iterates of a single solve at ``eps``) and is
        polished again. So an element is either polished or solved to ``eps``, as without it, in
        fewer iterations where the looser point already shows the active set. A pair
        ``(eps_1, eps_2)`` with ``eps_1 > eps_2 > eps``: three stages, the stops and polishes at
        eps_1, then (where rejected) eps_2, then eps. Ignored elsewhere.
    trace : list, optional
        Diagnostics: when given, a dict of per-instance tensors (residuals, gap, step lengths,
        regularization) is appended every iteration.
    options : IPMOptions
        Engine tuning (linear algebra, kernel, CUDA graphs); the defaults are measured.

    Returns
    -------
    IPMResult
        Shapes ``(B, ·)``; B = 1 when no argument is batched.
    """
    again = dict(eps=eps, max_iter=max_iter, check_every=check_every, form=form, separate_steps=separate_steps,
                 step_fraction=step_fraction, eps_infeasible=eps_infeasible, refine=refine,
                 stall_iters=stall_iters, fallback64=fallback64, cuda_graph=cuda_graph, graph_cache=graph_cache,
                 compile=compile, fused=fused, polish_rounds=polish_rounds, polish_eps=polish_eps, trace=trace,
                 options=options)
    if not isinstance(options, IPMOptions):
        raise SettingsError(f"ipm_solve: options must be an IPMOptions, got {type(options).__name__}.")
    P, q, C, d, A, b, B, n, m, p = _prepare(P, q, C, d, A, b)
    P0, q0, d0, b0 = P, q, d, b
    lin = options.linalg
    dtype, device = P.dtype, P.device
    if max_iter < 1:
        raise SettingsError(f"ipm_solve: max_iter must be >= 1, got {max_iter}.")
    if not (isinstance(polish_rounds, int) and polish_rounds >= 0):
        raise SettingsError(f"ipm_solve: polish_rounds must be an integer >= 0, got {polish_rounds!r}.")
    if not 0.0 < step_fraction < 1.0:
        raise SettingsError(f"ipm_solve: step_fraction must be in (0, 1), got {step_fraction}.")
    eps = default_eps(dtype) if eps is None else float(eps)
    if not eps > 0:
        raise SettingsError(f"ipm_solve: eps must be positive, got {eps}.")
    stages = () if polish_eps is None else (tuple(float(t) for t in polish_eps)
                                            if isinstance(polish_eps, (tuple, list)) else (float(polish_eps),))
    if polish_eps is not None and not (1 <= len(stages) <= 2 and all(t > 0 for t in stages)
                                       and (len(stages) == 1 or stages[0] > stages[1])):
        raise SettingsError(f"ipm_solve: polish_eps must be a positive tolerance, a pair of them (the looser "
                            f"first) or None, got {polish_eps!r}.")
    eps_inf = (1e-7 if dtype == torch.float64 else 1e-4) if eps_infeasible is None else float(eps_infeasible)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4
    check_every = max(int(check_every), 1)
    f64 = dtype == torch.float64

    C_u, A_u = C, A
    use_graph = cuda_graph and trace is None and graph_device_ok(device, options)
    with torch.profiler.record_function("dqp::ipm_setup"):
        init = deferred = None
        fused_dual = None            # the kernel's verdict should the dual form be taken (decided once)
        if use_graph and graph_cache and options.setup_graph and form_by_cost(form, P, B, n, m, p) == "dual":
            fused_dual = _use_fused(fused, "dual", dtype, device, n, m, p, trace, refine, options)
            # (with the kernel to follow, the dual form's test is read after its launch)
            got = _init_graphed(P, q, C, d, A, b, B, n, m, p, minimal=fused_dual, defer_ok=fused_dual,
                                options=options)
            if got is not None:
                init, deferred = got
        if init is None:
            fm, LP = _choose_form(form, P, B, n, m, p, options.linalg)
            if fm == "dual":
                fused_dual = _use_fused(fused, "dual", dtype, device, n, m, p, trace, refine, options)
            # (where the kernel follows, it computes the starting point itself)
            init = _init(P, q, C, d, A, b, B, n, m, p, fm, LP, start=not (fm == "dual" and fused_dual),
                         options=options)
    C, d, A, b, c_scale, a_scale, norms, newton, S = init
    fm = newton.form
    if refine is None:
        refine = 1 if fm == "primal" else 0
    Cscale = 1.0 if m else 0.0   # rows are unit norm after scaling
    Ascale = 1.0 if p else 0.0
    tiny = torch.finfo(dtype).tiny
    wlo = 1e-60 if f64 else 1e-16
    SOLVED, PINF, DINF, NUM = (int(Status.SOLVED), int(Status.PRIMAL_INFEASIBLE),
                               int(Status.DUAL_INFEASIBLE), int(Status.NUMERICAL))

    # the fused kernel runs the whole loop: nothing of the torch loop's machinery is needed then
    # (with its polish and a looser polish_eps: two stages, the first to polish_eps)
    eps_first = max(stages[0], eps) if (polish_rounds and stages) else eps
    eps_mid = stages[1] if (polish_rounds and len(stages) == 2 and eps < stages[1] < eps_first) else None
    fused_out = None
    if (fused_dual if (fm == "dual" and fused_dual is not None)
            else _use_fused(fused, fm, dtype, device, n, m, p, trace, refine, options)):
        with torch.profiler.record_function("dqp::ipm_fused"):
            fused_out = _fused.solve_dual(
                P, q, C, d, A, b, newton.M, newton.PiAbt, newton._Piq, newton._g, norms, newton.Md, S,
                max_iter=max_iter, stall_iters=stall_iters, separate_steps=separate_steps,
                eps_inf=eps_inf, step_fraction=step_fraction, reg_d=newton.reg_d, wlo=wlo,
                polish_rounds=polish_rounds, row_scale=_row_scales(a_scale, c_scale, B), start=True,
                eps=eps_first, eps2=eps if eps_first > eps else None, eps_mid=eps_mid, opts=options.kernel)
        if deferred is not None and not _deferred_ok(deferred):
            # P failed the dual form's test in some element: the kernel's answer is void; this
            # setup graph tests before going on from now on, and the solve starts again
            _SETUP_DEFER_FAILED.add(deferred[0])
            return ipm_solve(P0, q0, C_u, d0, A_u, b0, **again)

    live = _GraphData(P, q, C, d, A, b, newton, norms)

    def _resid(z, s, mu, lam, D=live, T=None):
        P, q, C, d, A, b = D.P, D.q, D.C, D.d, D.A, D.b
        if T is None:
            Pz, ATl, CTm = mv(P, z, lin), tmv(A, lam, lin) if p else None, tmv(C, mu, lin) if m else None
            Az, Cz = mv(A, z, lin) if p else None, mv(C, z, lin) if m else None
        else:   # products tracked by _step (see `track` below)
            Pz, ATl, CTm, Az, Cz = T["Pz"], T["ATl"], T["CTm"], T["Az"], T["Cz"]
        rd = Pz + q
        if p:
            rd = rd + ATl
        if m:
            rd = rd + CTm
        req = Az - b if p else None
        rin = Cz + s - d if m else None
        gap = (s * mu).sum(-1)
        gscl = 1.0 + (z * Pz).sum(-1).abs() + (q * z).sum(-1).abs()
        return Pz, rd, ATl, CTm, Az, Cz, req, rin, gap, gscl

    def _step(S, R, D=live, it=0, scaled=(None, None, None, None)):
        """One predictor-corrector step from the state S with its residuals R (from ``_resid``);
        returns the updated entries of S. ``it``, ``scaled``: for ``trace`` only."""
        z, s, mu, lam, delta, nfail, iters, done = (S[k] for k in ("z", "s", "mu", "lam", "delta", "nfail",
                                                                 "iters", "done"))
        _, rd, _, _, Az_s, Cz_s, req, rin, gap, gscl = R
        pres, pscl, dres, dscl = scaled
        newton, q = D.newton, D.q
        running = ~done
        iters = iters + running

        # ---------------- predictor (affine) step
        # W⁻¹ = s/μ, kept inside the range where W and W⁻¹ are finite in this dtype
        winv = (s / mu).clamp(min=wlo, max=1.0 / wlo) if m else None
        fact_ok = newton.factor(winv, delta, running if not use_graph else None)
        if fm == "dual" and f64:
            # (float64 only: in float32 the identities cancel badly — measured: every instance of
            # qpth's generator at n = m = 100 stalls — so float32 solves with P each iteration)
            yv = torch.cat([lam, mu], dim=-1) if (p and m) else (lam if p else mu)
            Az_ = [v for v in (Az_s, Cz_s) if v is not None]
            newton.set_point(q, z, yv, torch.cat(Az_, dim=-1) if len(Az_) > 1 else Az_[0],
                             trk.get("My") if track else None)
        a = -rd
        bb = -req if p else None
        nrin = -rin if m else None
        c_aff = (nrin + s) if m else None          # −r_in + r_c/μ with r_c = s∘μ
        # (s and μ, and their directions, are stacked (B, 2, m) where both take the same operations:
        # one kernel for both; an iteration is a few hundred small kernels at B=128, n=m=100)
        if m:
            _, dl_a, dm_a, Cdz_a = newton.direction(a, bb, c_aff, winv, False, 0)
            sm = torch.stack([s, mu], 1)
            dsm_a = torch.stack([nrin - Cdz_a, dm_a], 1)                  # (Δs, Δμ) affine
            st_a = _max_step(sm, dsm_a, 1.0)                             # (B, 2): primal, dual
            if not separate_steps:
                st_a = st_a.amin(-1, keepdim=True)
            tau = gap / m
            sm_a = torch.addcmul(sm, st_a.unsqueeze(-1), dsm_a)
            mu_aff = (sm_a[:, 0] * sm_a[:, 1]).sum(-1) / m
            sigma = (mu_aff / tau.clamp(min=tiny)).clamp(min=0.0, max=1.0) ** 3
            # ---------------- corrector (centering + second order) with the same factorization
            rc = torch.addcmul(s * mu, dsm_a[:, 0], dm_a).sub_((sigma * tau).unsqueeze(-1))
            c_cor = torch.addcdiv(nrin, rc, mu)
            dz_, dl_, dm_, Cdz = newton.direction(a, bb, c_cor, winv, True, refine)
            dsm = torch.stack([nrin - Cdz, dm_], 1)
            # fraction to the boundary, → 1 as the instance converges (per instance)
            eta = (1.0 - (gap / gscl).sqrt()).clamp(min=step_fraction)
            eta = torch.nan_to_num(eta, nan=step_fraction)       # (a NaN gap must not reach the step)
            st = (eta.unsqueeze(-1) * _max_step(sm, dsm)).clamp(max=1.0)
            if not separate_steps:
                st = st.amin(-1, keepdim=True)
            ap, ad = st[:, 0], st[:, -1]
        else:
            dz_, dl_, dm_, _ = newton.direction(a, bb, None, None, True, refine)
            ap = torch.ones(z.shape[0], dtype=dtype, device=device)
            ad = ap

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
        if trace is not None:
            sc = (lambda a, b: None if a is None else a / b)        # noqa: E731 (no check this iteration)
            trace.append(dict(it=it, pres=sc(pres, pscl), dres=sc(dres, dscl), gap=gap / gscl, ap=ap, ad=ad,
                              delta=delta, ok=ok, fact_ok=fact_ok, done=done.clone(), mumax=_amax(mu), smin=s.amin(-1) if m else None))
        u = upd.unsqueeze(-1)
        z = torch.where(u, torch.addcmul(z, ap.unsqueeze(-1), dz_), z)
        if m:
            # (clamp: keep strict interiority against round-off)
            sm = torch.where(u.unsqueeze(-1), torch.addcmul(sm, st.unsqueeze(-1), dsm), sm).clamp_(min=tiny)
            s, mu = sm[:, 0], sm[:, 1]
        if p:
            lam = torch.where(u, torch.addcmul(lam, ad.unsqueeze(-1), dl_), lam)
        if track:
            # products at the new iterate from this step's own quantities: P Δz = a − Āᵀ Δy (the
            # first block row, which the dual form satisfies by construction), Ā Δz and M Δy from the
            # Schur solve; one pass over [A; C] instead of recomputing P z, C z, Cᵀμ, A z, Aᵀλ, M y
            # (an error in a tracked product decays by (1 − α) per step: it enters the next
            # direction through the residual it is used for)
            ATd = tmv(D.A, dl_, lin) if p else None
            CTd = tmv(D.C, dm_, lin) if m else None
            Pdz = a - (ATd if p else 0.0) - (CTd if m else 0.0)
            apc, adc = ap.unsqueeze(-1), ad.unsqueeze(-1)
            Abdz = newton.last_Abdz
            upd_ = lambda v, dv, st: torch.where(u, torch.addcmul(v, st, dv), v)   # noqa: E731
            trk.update(Pz=upd_(trk["Pz_cur"], Pdz, apc), My=upd_(newton.My_point, newton.last_My, adc),
                       ATl=upd_(trk["ATl_cur"], ATd, adc) if p else None,
                       CTm=upd_(trk["CTm_cur"], CTd, adc) if m else None,
                       Az=upd_(Az_s, Abdz[:, :p], apc) if p else None,
                       Cz=upd_(Cz_s, Abdz[:, p:], apc) if m else None)
        return dict(z=z, s=s, mu=mu, lam=lam, delta=delta, nfail=nfail, iters=iters, it=S["it"] + 1)

    def _check(S, R, D=live):
        """Norms, convergence, infeasibility certificates, stalls and statuses at the iterate of
        ``S`` with its residuals ``R`` (from ``_resid``). Device tensors only (it runs inside the
        captured iteration); returns the updated entries of S and (pres, pscl, dres, dscl)."""
        Pz, rd, ATl, CTm, Az, Cz, req, rin, gap, gscl = R
        z, s, mu, lam = S["z"], S["s"], S["mu"], S["lam"]
        q, b, d = D.q, D.b, D.d
        pscale, qnorm, bnorm, dnorm = D.norms["pscale"], D.norms["qnorm"], D.norms["bnorm"], D.norms["dnorm"]
        # (∞-norms are ≥ 0: max with 0 only where there is no constraint at all)
        pres = pscl = None
        if p:
            pres = _amax(req)
            pscl = torch.maximum(_amax(Az), bnorm)
        if m:
            pres = _amax(rin) if pres is None else torch.maximum(pres, _amax(rin))
            ci = torch.maximum(torch.maximum(_amax(Cz), dnorm), _amax(s))
            pscl = ci if pscl is None else torch.maximum(pscl, ci)
        if pres is None:
            pres = torch.zeros(z.shape[0], dtype=dtype, device=device)
            pscl = torch.ones(z.shape[0], dtype=dtype, device=device)
        else:
            pscl = pscl.clamp(min=1.0)
        dres = _amax(rd)
        dscl = torch.maximum(_amax(Pz), qnorm)
        if p:
            dscl = torch.maximum(dscl, _amax(ATl))
        if m:
            dscl = torch.maximum(dscl, _amax(CTm))
        dscl = dscl + 1.0
        p_ok = pres <= eps * pscl
        d_ok = dres <= eps * dscl
        conv = p_ok & d_ok & (gap <= eps * gscl)

        # ---------------- infeasibility certificates (only for instances that are not converging),
        # from products already computed: the iterates and their change since the last check
        Ay = (ATl + CTm) if (p and m) else (ATl if p else (CTm if m else torch.zeros_like(z)))
        radius = 1e3 * (1.0 + _amax(z))
        have_prev = S["have_prev"]

        def _pcert(lv, mv, Ayv):
            # y = (λ, μ) normalized: Aᵀŷ_λ + Cᵀŷ_μ = r and bᵀŷ_λ + dᵀŷ_μ = v < 0 prove that no
            # feasible z has |rᵀz| < −v, i.e. none within ‖z‖∞ ≤ −v/‖r‖₁. Accept when r is
            # tiny (a certificate) or when that ball is much larger than the iterates.
            yn = torch.maximum(_amax(lv), _amax(mv)).clamp(min=tiny)
            r = Ayv / yn.unsqueeze(-1)
            val = ((b * lv).sum(-1) if p else 0.0) + ((d * mv).sum(-1) if m else 0.0)
            val = val / yn
            small = (_amax(r) <= eps_inf * (Ascale + Cscale)) | (r.abs().sum(-1) * radius <= -val)
            return small & (val < -eps_inf), yn

        def _dcert(x, Px, Ax, Cx):
            xn = _amax(x).clamp(min=tiny)
            okc = _amax(Px) <= eps_inf * pscale * xn
            if p:
                okc = okc & (_amax(Ax) <= eps_inf * Ascale * xn)
            if m:
                okc = okc & (Cx.amax(-1) <= eps_inf * Cscale * xn)
            return okc & ((q * x).sum(-1) < -eps_inf * qnorm.clamp(min=tiny) * xn), xn

        if m or p:
            c1, ynorm = _pcert(lam, mu, Ay)
            dmu_s = mu - S["prev_mu"] if m else mu
            c2, dyn = _pcert(lam - S["prev_lam"], dmu_s, Ay - S["prev_Ay"])
            if m:
                c2 = c2 & (dmu_s.amin(-1) >= -eps_inf * dyn)
            pinf = ((c1 & (ynorm > 1.0 / eps_inf ** 0.5)) | (c2 & have_prev)) & ~p_ok
        else:
            pinf = torch.zeros(z.shape[0], dtype=torch.bool, device=device)
        e1, zn = _dcert(z, Pz, Az, Cz)
        e2, _ = _dcert(z - S["prev_z"], Pz - S["prev_Pz"], Az - S["prev_Az"] if p else None,
                       Cz - S["prev_Cz"] if m else None)
        dinf = ((e1 & (zn > 1.0 / eps_inf ** 0.5)) | (e2 & have_prev)) & ~d_ok

        done, status = S["done"], S["status"]
        new_conv = conv & ~done
        status = torch.where(new_conv, SOLVED, status)
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
        stalled = (S["it"] - last_impr >= stall_iters) & ~done
        status = torch.where(stalled, NUM, status)
        done = done | stalled
        upd = dict(done=done, status=status, pinf_cnt=pinf_cnt, dinf_cnt=dinf_cnt, best=best,
                   last_impr=last_impr, have_prev=torch.ones_like(have_prev),
                   prev_z=z, prev_Pz=Pz, prev_lam=lam, prev_mu=mu, prev_Ay=Ay)
        if p:
            upd["prev_Az"] = Az
        if m:
            upd["prev_Cz"] = Cz
        return upd, (pres, pscl, dres, dscl)

    def _make_body(D):
        """``check_every`` steps, then the check at the new iterate, as one function of the state:
        what the CUDA graph captures."""
        # a captured step factorizes every time: a factor cached by an earlier (warm-up or eager)
        # call is a tensor outside the graph's static data, which a cached graph would keep reading
        # after later calls refilled that data
        D.newton.cache_const, D.newton._const = False, None

        def one(S):
            return {**S, **_step(S, _resid(S["z"], S["s"], S["mu"], S["lam"], D=D), D=D)}

        def chk(S):
            return {**S, **_check(S, _resid(S["z"], S["s"], S["mu"], S["lam"], D=D), D=D)[0]}

        if compile:
            # fuse the element-wise work between the factorizations and solves (torch.compile;
            # the linear algebra stays ATen/cuSOLVER): compiled once per captured graph
            one, chk = torch.compile(one, dynamic=False), torch.compile(chk, dynamic=False)

        def body(S):
            for _ in range(check_every):
                S = one(S)
            return chk(S)
        # captured as one graph per part (see _capture): the host launches the next steps while the
        # device runs the first
        body.parts = ((one, check_every), (chk, 1))
        return body

    if compile and not use_graph:
        warnings.warn(f"ipm_solve: compile=True compiles the captured CUDA-graph iteration; it has no effect "
                      f"here (device {device.type}, cuda_graph={cuda_graph}, trace given: {trace is not None}) "
                      "and the iterations run eagerly.", stacklevel=2)
    def _gkey(D, Bc):
        if not (use_graph and graph_cache):
            return None
        # cache key: everything the captured iterations depend on besides tensor values
        # (the thread and stream too: a cached graph's static buffers are reused only by calls
        # that are ordered after one another on the device)
        return (fm, dtype, str(device), Bc, n, m, p, separate_steps, float(step_fraction), int(refine),
                check_every, eps, eps_inf, int(stall_iters), options, bool(compile), D.signature(),
                threading.get_ident(),
                torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    gkey = _gkey(live, B) if fused_out is None else None
    graph = None
    # eager float64 dual form: carry P z, Aᵀλ, Cᵀμ, A z, C z and M y from step to step (see _step)
    # instead of recomputing them — on the CPU each product is a pass over a (B, ·, n) matrix that
    # does not fit in cache; recomputed exactly every `exact_every` iterations
    track = fm == "dual" and f64 and not use_graph and m > 0
    newton.tracking = track
    trk: Dict[str, Any] = {}
    exact_every = 5
    # tail compaction (captured iterations only): once few instances are left, continue on those
    # alone; `full` holds the whole batch's state, `gidx` the current rows' places in it
    full: Optional[Dict[str, Tensor]] = None
    gidx: Optional[Tensor] = None
    Bc = B
    # the iterate is checked after every `check_every`-th step and after the last one (max_iter)
    it = 0
    checked = -1                      # the iteration whose iterate the last check saw
    # when the checks come (every `check_every` steps, more often in the tail: _CheckSchedule); the
    # same for the captured and the eager iterations
    # (where the tail compaction applies, it deals with the tail: see IPMOptions.tail_checks)
    sched = _CheckSchedule(check_every, B, options.tail_checks and options.split_graphs
                           and not (options.compact and B * max(n, m + p) ** 2 >= options.compact_min_work),
                           options.tail_fraction)
    while fused_out is None:
        if use_graph and it == max(checked, 0) and sched.next <= max_iter:
            # GPU: the steps up to the next check and the check per graph replay; the host reads one
            # count per replay
            if graph is None:
                with torch.profiler.record_function("dqp::ipm_capture"):
                    graph, st = _graph_for(gkey, live, _make_body, S, options)
                if graph is None:
                    use_graph = False
                    continue
                S = st
            with torch.profiler.record_function("dqp::ipm_replay"):
                _graph_stats["replays"] += 1
                steps = sched.next - it
                if sched.adaptive:
                    graph.replay(steps)           # (a _GraphChain: a graph per step)
                else:
                    graph.replay()
                it += steps
                checked = it
                nleft = int((~S["done"]).sum())
                if nleft == 0 or it == max_iter:
                    break
                sched.checked(it, nleft)
            bucket = _compact_size(nleft, Bc, max(n, m + p), options)
            if bucket is not None:
                with torch.profiler.record_function("dqp::ipm_compact"):
                    if full is None:
                        # (the graph's static buffers: copied, a cached graph overwrites them later)
                        full = {k: v.clone() for k, v in S.items() if v.dim() >= 1}
                    else:
                        _scatter_state(full, gidx, S)
                    run = torch.nonzero(~S["done"]).squeeze(-1)
                    # pad with finished rows (there are Bc − nleft ≥ bucket − nleft of them): they take
                    # no steps, keep their values and do not count as running in later reads
                    fin = torch.nonzero(S["done"]).squeeze(-1)[:bucket - nleft]
                    idx = torch.cat([run, fin])
                    gidx = idx if gidx is None else gidx[idx]
                    S = {k: (v[idx] if v.dim() >= 1 else v.clone()) for k, v in S.items()}
                    live = live.subset(idx)
                    Bc = bucket
                    gkey = _gkey(live, Bc)
                    graph = None
                    _graph_stats["compactions"] += 1
            continue
        # ---------------- eager iteration (CPU; on the GPU the tail after the last replay)
        with torch.profiler.record_function("dqp::ipm_eager_iteration"):
            check = (it == sched.next or it == max_iter) and checked != it
            use_T = track and "Pz" in trk and it % exact_every != 0
            R = _resid(S["z"], S["s"], S["mu"], S["lam"], D=live, T=trk if use_T else None)
            if track:
                trk.update(Pz_cur=R[0], ATl_cur=R[2], CTm_cur=R[3])
                if not use_T:
                    trk.pop("My", None)          # exact M y too at the exact iterations
            scaled = (None, None, None, None)
            stop = False
            if check:
                upd, scaled = _check(S, R, D=live)
                if use_T and bool((upd["done"] & ~S["done"]).any()):
                    # a tracked product drifts from the exact one and can hide a residual (q scaled by
                    # 1e8: SOLVED with a true scaled primal residual of 1.6e-7 against eps = 1e-9):
                    # an element stops only on exact products
                    R = _resid(S["z"], S["s"], S["mu"], S["lam"], D=live)
                    trk.update(Pz_cur=R[0], ATl_cur=R[2], CTm_cur=R[3])
                    trk.pop("My", None)
                    upd, scaled = _check(S, R, D=live)
                S = {**S, **upd}
                checked = it
                nleft = int((~S["done"]).sum())
                stop = it == max_iter or nleft == 0
                sched.checked(it, nleft)
            if not stop:
                S = {**S, **_step(S, R, D=live, it=it, scaled=scaled)}
                it += 1
        if stop:
            break
    if fused_out is not None:
        S = fused_out
    elif full is not None:
        _scatter_state(full, gidx, S)
        S = full
    elif graph is not None:
        # the static buffers belong to the graph (a cached graph overwrites them in a later call)
        S = {k: S[k].clone() for k in ("z", "s", "mu", "lam", "status", "iters")}
    z, s, mu, lam, status, iters = S["z"], S["s"], S["mu"], S["lam"], S["status"], S["iters"]
    graph = st = S = None

    # ---------------- undo the row scaling
    lam_out = lam / a_scale if p else None
    mu_out = mu / c_scale if m else None
    s_out = s * c_scale if m else s
    factors = None
    polished = None
    if fused_out is not None and "pflag" in fused_out:
        pf = fused_out["pflag"]
        polished = dict(active=fused_out["active"] if m else None, polished=(pf & 1) != 0,
                        fallback=(pf & 2) != 0, ok=(pf & 4) != 0, LS=fused_out["LS"])
    if fm == "dual":
        sc = _row_scales(a_scale, c_scale, B)                                  # (B, k) row norms
        if newton.PiAbt.dim() == 2:
            # (P⁻¹Āᵀ is shared only when P, A and C are: their row norms are then one vector)
            sc = sc[0]
        factors = dict(L=newton.LP, PiAbt=newton.PiAbt * sc.unsqueeze(-2),
                       M=newton.M * sc.unsqueeze(-1) * sc.unsqueeze(-2))
    res = IPMResult(z=z, lam=lam_out, mu=mu_out, s=s_out, status=status, iterations=iters, form=fm,
                    factors=factors, polish=polished, fused=fused_out is not None)
    if fallback64 and dtype != torch.float64:
        bad = (status == int(Status.MAX_ITER)) | (status == NUM)
        if bool(bad.any()):
            res = _fallback64(res, bad, (P0, q0, C_u, d0, A_u, b0), dict(
                eps=None, max_iter=max_iter, check_every=check_every, form=form,
                separate_steps=separate_steps, step_fraction=step_fraction, refine=refine,
                stall_iters=stall_iters, cuda_graph=cuda_graph, graph_cache=False, options=options))
    return res



def _fallback64(res: IPMResult, bad: Tensor, data, kw) -> IPMResult:
    """Re-solve the instances ``bad`` in float64 and write them back (cast to res's dtype)."""
    idx = torch.nonzero(bad).squeeze(-1)
    P, q, C, d, A, b = data
    sel = lambda M, nd: None if M is None else (M[idx] if M.dim() == nd else M).double()
    logger.info("ipm_solve: re-solving %d float32 instances in float64", idx.numel())
    r64 = ipm_solve(sel(P, 3), sel(q, 2), sel(C, 3), sel(d, 2), sel(A, 3), sel(b, 2), fallback64=False, **kw)
    dt = res.z.dtype
    def put(dst, src):
        if dst is None:
            return None
        dst = dst.clone()
        dst[idx] = src.to(dt)
        return dst
    status = res.status.clone()
    status[idx] = r64.status
    iters = res.iterations.clone()
    iters[idx] = iters[idx] + r64.iterations
    return IPMResult(z=put(res.z, r64.z), lam=put(res.lam, r64.lam), mu=put(res.mu, r64.mu),
                     s=put(res.s, r64.s) if res.s.shape[-1] else res.s, status=status, iterations=iters,
                     form=res.form)


@register_solver
class IPMSolver(ForwardSolver):
    """dqp's built-in batched interior-point method (torch; CPU and CUDA; float32/float64)."""

    name = "dqp_ipm"
    aliases = ("ipm", "dqp")
    modules = ("torch",)
    dense = True
    sparse = False
    batched = True
    duals = True
    description = "built-in batched primal-dual interior point (Mehrotra), pure torch, CPU and GPU"

    def tolerance_keywords(self, eps_abs: float, eps_rel: float) -> Dict[str, Any]:
        """The IPM's stopping tolerance for ``eps_abs``/``eps_rel``: its tests are relative with an
        absolute floor (``‖r‖ ≤ eps·(1 + scale)``), so one ``eps`` = the tighter of the two (eps_rel
        = 0: eps_abs alone), at least 1e-14."""
        eps = min(eps_abs, eps_rel) if eps_rel > 0 else eps_abs
        return {"eps": max(float(eps), 1e-14)}

    def solve_batch(self, batch, settings):
        """Solve a validated dense batch (:class:`dqp.problem.QPBatch`) differentiably with the
        settings (:class:`dqp.settings.Settings`) the engine honours; ``(z, lam, mu, info)``
        (:func:`dqp.ipm_layer.solve_settings_batch`, which maps the settings and fills
        :class:`dqp.result.SolveInfo`). The keywords of :func:`ipm_solve` and of
        :func:`dqp.ipm_layer.solve_qp_batch` go in ``settings.qp_solver_keywords``."""
        from dqp.ipm_layer import solve_settings_batch
        return solve_settings_batch(batch, settings)
