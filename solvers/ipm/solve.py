"""Built-in batched primal-dual interior-point method (pure torch, any device).

Solves a batch of convex QPs

    min ½ zᵀPz + qᵀz   s.t.   Cz ≤ d  (duals μ ≥ 0),   Az = b  (duals λ)

with Mehrotra's predictor-corrector on the slack form ``Cz + s = d, s ≥ 0``. The same code runs
on CPU and CUDA, in float32 and float64, for a whole batch at once.

Linear algebra, Cholesky only (batched LU hangs on some MKL builds). The
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
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import torch
from dqp.solvers import fused as _fused
from dqp.solvers.base import ForwardSolver, register_solver
from dqp.solvers.ipm.dispatch import _use_fused
from dqp.solvers.ipm.graphs import _SETUP_DEFER_FAILED, _GraphData, graph_device_ok, on_data_device
from dqp.solvers.ipm.iterate import Iteration, IterConfig, run_loop
from dqp.solvers.ipm.newton import _choose_form, form_by_cost
from dqp.solvers.ipm.options import DEFAULT_OPTIONS, IPMOptions
from dqp.solvers.ipm.problem import IPMResult, _prepare, _row_scales, default_eps
from dqp.solvers.ipm.start import _deferred_ok, _init, _init_graphed

from dqp.errors import SettingsError, Status

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["ipm_solve", "IPMSolver"]


@on_data_device
def ipm_solve(
    P: Tensor,
    q: Tensor,
    C: Optional[Tensor] = None,
    d: Optional[Tensor] = None,
    A: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    eps: Optional[float] = None,
    max_iter: int = 100,
    check_every: Optional[int] = None,
    form: str = "auto",
    separate_steps: bool = True,
    step_fraction: float = 0.995,
    eps_infeasible: Optional[float] = None,
    refine: Optional[int] = None,
    stall_iters: int = 12,
    fallback64: bool = True,
    cuda_graph: bool = True,
    graph_cache: bool = True,
    compile: bool = False,
    fused: Optional[bool] = None,
    polish_rounds: int = 0,
    polish_eps: Union[None, float, Sequence[float]] = None,
    trace: Optional[list] = None,
    options: IPMOptions = DEFAULT_OPTIONS,
) -> IPMResult:
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
        With ``cuda_graph``: compile the captured iteration with ``torch.compile`` first (its ~100
        small element-wise kernels per step fused); the first call for each shape then takes the
        compilation time (~100 s on an H100 host), later calls reuse the cached graph. Off by default.
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
        With the kernel's polish (``polish_rounds > 0``) and ``polish_eps > eps``: the IPM first
        stops at ``polish_eps`` and polishes; an element whose point the polish rejects goes on to
        ``eps`` (the iterates of a single solve) and is polished again. A pair ``(eps_1, eps_2)``:
        three stages (eps_1, then eps_2, then eps). Ignored elsewhere.
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
    again = {k: v for k, v in locals().items() if k not in ("P", "q", "C", "d", "A", "b")}  # (the keywords)
    if not isinstance(options, IPMOptions):
        raise SettingsError(f"ipm_solve: options must be an IPMOptions, got {type(options).__name__}.")
    P, q, C, d, A, b, B, n, m, p = _prepare(P, q, C, d, A, b)
    given = (P, q, C, d, A, b)  # (before the row scaling: a restart and the float64 re-solve start from these)
    dtype, device = P.dtype, P.device
    eps, stages, eps_inf, check_every = _checked_arguments(
        dtype, device, eps, max_iter, polish_rounds, step_fraction, polish_eps, eps_infeasible, check_every
    )
    use_graph = cuda_graph and trace is None and graph_device_ok(device, options)
    with torch.profiler.record_function("dqp::ipm_setup"):
        init, deferred, fused_dual = _setup(
            P, q, C, d, A, b, B, n, m, p, form, fused, trace, refine, use_graph and graph_cache, options
        )
    C, d, A, b, c_scale, a_scale, norms, newton, S = init
    if refine is None:
        refine = 1 if newton.form == "primal" else 0
    live = _GraphData(P, q, C, d, A, b, newton, norms)
    # the fused kernel runs the whole loop: nothing of the torch loop's machinery is needed then
    fused_run = (
        fused_dual
        if (newton.form == "dual" and fused_dual is not None)
        else _use_fused(fused, newton.form, dtype, device, n, m, p, trace, refine, options)
    )
    if fused_run:
        S = _fused_loop(live, S, _row_scales(a_scale, c_scale, B), eps, stages, eps_inf, again)
        if deferred is not None and not _deferred_ok(deferred):
            # P failed the dual form's test in some element: the kernel's answer is void; this
            # setup graph tests before going on from now on, and the solve starts again
            _SETUP_DEFER_FAILED.add(deferred[0])
            return ipm_solve(*given, **again)
    else:
        cfg = _iter_config(live, n, m, p, eps, eps_inf, refine, check_every, use_graph, again)
        S = _torch_loop(cfg, trace, live, S, B, max_iter, use_graph, graph_cache, options)
    res = _result(S, bool(fused_run), newton, a_scale, c_scale, B, m, p)
    if fallback64 and dtype != torch.float64:
        res = _fallback64(res, given, again, check_every, refine)
    return res


def _fused_loop(
    live: _GraphData, S, row_scale: Tensor, eps: float, stages: tuple, eps_inf: float, kw: Dict[str, Any]
) -> Dict[str, Tensor]:
    """The whole iteration loop (and, with ``polish_rounds``, the polish) as one launch of the fused
    kernel (:func:`dqp.solvers.fused.solve_dual`) from the dual form's setup; the final state.
    ``kw``: :func:`ipm_solve`'s keywords."""
    newton, polish_rounds = live.newton, kw["polish_rounds"]
    wlo = 1e-60 if live.P.dtype == torch.float64 else 1e-16  # (IterConfig.wlo: the range of W⁻¹ = s/μ)
    with torch.profiler.record_function("dqp::ipm_fused"):
        return _fused.solve_dual(
            live.P,
            live.q,
            live.C,
            live.d,
            live.A,
            live.b,
            newton.M,
            newton.PiAbt,
            newton._Piq,
            newton._g,
            live.norms,
            newton.Md,
            S,
            max_iter=kw["max_iter"],
            stall_iters=kw["stall_iters"],
            separate_steps=kw["separate_steps"],
            eps_inf=eps_inf,
            step_fraction=kw["step_fraction"],
            reg_d=newton.reg_d,
            wlo=wlo,
            polish_rounds=polish_rounds,
            row_scale=row_scale,
            start=True,
            **_stage_tolerances(eps, stages, polish_rounds),
            opts=kw["options"].kernel,
        )


def _iter_config(
    live: _GraphData,
    n: int,
    m: int,
    p: int,
    eps: float,
    eps_inf: float,
    refine: int,
    check_every: int,
    use_graph: bool,
    kw: Dict[str, Any],
) -> IterConfig:
    """The torch loop's configuration from :func:`ipm_solve`'s checked arguments and keywords ``kw``
    (warns where ``compile`` cannot act: it compiles the captured CUDA-graph iteration only)."""
    dtype, device = live.P.dtype, live.P.device
    if kw["compile"] and not use_graph:
        warnings.warn(
            f"ipm_solve: compile=True compiles the captured CUDA-graph iteration; it has no effect "
            f"here (device {device.type}, cuda_graph={kw['cuda_graph']}, trace given: {kw['trace'] is not None}) "
            "and the iterations run eagerly.",
            stacklevel=3,
        )
    form = live.newton.form
    return IterConfig(
        n=n,
        m=m,
        p=p,
        dtype=dtype,
        device=device,
        form=form,
        eps=eps,
        eps_inf=eps_inf,
        separate_steps=kw["separate_steps"],
        step_fraction=kw["step_fraction"],
        refine=refine,
        stall_iters=kw["stall_iters"],
        check_every=check_every,
        compile=kw["compile"],
        lin=kw["options"].linalg,
        track=form == "dual" and dtype == torch.float64 and not use_graph and m > 0,
    )


def _torch_loop(
    cfg: IterConfig,
    trace,
    live: _GraphData,
    S,
    B: int,
    max_iter: int,
    use_graph: bool,
    graph_cache: bool,
    options: IPMOptions,
):
    """The torch loop (:func:`dqp.solvers.ipm.iterate.run_loop`) of this solve; the final state."""
    live.newton.tracking = cfg.track
    return run_loop(Iteration(cfg, trace), live, S, B, max_iter, use_graph, graph_cache, options)


def _setup(
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
    form: str,
    fused,
    trace,
    refine,
    graphed: bool,
    options: IPMOptions,
):
    """The setup (form, Newton solver, start): for the dual form as a cached graph where ``graphed``
    (:func:`_init_graphed`), else eagerly. Returns ``(init, deferred, fused_dual)``: :func:`_init`'s
    result, the graphed setup's deferred test (or None) and the kernel's verdict should the dual
    form be taken (None where not decided)."""
    dtype, device = P.dtype, P.device
    fused_dual = None
    if graphed and options.setup_graph and form_by_cost(form, P, B, n, m, p) == "dual":
        fused_dual = _use_fused(fused, "dual", dtype, device, n, m, p, trace, refine, options)
        # (with the kernel to follow, the dual form's test is read after its launch)
        got = _init_graphed(P, q, C, d, A, b, B, n, m, p, minimal=fused_dual, defer_ok=fused_dual, options=options)
        if got is not None:
            return got[0], got[1], fused_dual
    fm, LP = _choose_form(form, P, B, n, m, p, options.linalg)
    if fm == "dual":
        fused_dual = _use_fused(fused, "dual", dtype, device, n, m, p, trace, refine, options)
    # (where the kernel follows, it computes the starting point itself)
    init = _init(P, q, C, d, A, b, B, n, m, p, fm, LP, start=not (fm == "dual" and fused_dual), options=options)
    return init, None, fused_dual


def _stage_tolerances(eps: float, stages: tuple, polish_rounds: int) -> Dict[str, Any]:
    """The kernel's stop tolerances: with its polish and a looser ``polish_eps``, two (or three)
    stages, the first to polish_eps (:func:`dqp.solvers.fused.solve_dual`'s eps, eps2, eps_mid)."""
    eps_first = max(stages[0], eps) if (polish_rounds and stages) else eps
    eps_mid = stages[1] if (polish_rounds and len(stages) == 2 and eps < stages[1] < eps_first) else None
    return dict(eps=eps_first, eps2=eps if eps_first > eps else None, eps_mid=eps_mid)


def _checked_arguments(
    dtype, device, eps, max_iter, polish_rounds, step_fraction, polish_eps, eps_infeasible, check_every
):
    """``ipm_solve``'s arguments checked, defaults filled: ``(eps, polish stages, eps_inf, check_every)``."""
    if max_iter < 1:
        raise SettingsError(f"ipm_solve: max_iter must be >= 1, got {max_iter}.")
    if not (isinstance(polish_rounds, int) and polish_rounds >= 0):
        raise SettingsError(f"ipm_solve: polish_rounds must be an integer >= 0, got {polish_rounds!r}.")
    if not 0.0 < step_fraction < 1.0:
        raise SettingsError(f"ipm_solve: step_fraction must be in (0, 1), got {step_fraction}.")
    eps = default_eps(dtype) if eps is None else float(eps)
    if not eps > 0:
        raise SettingsError(f"ipm_solve: eps must be positive, got {eps}.")
    stages = (
        ()
        if polish_eps is None
        else (tuple(float(t) for t in polish_eps) if isinstance(polish_eps, (tuple, list)) else (float(polish_eps),))
    )
    if polish_eps is not None and not (
        1 <= len(stages) <= 2 and all(t > 0 for t in stages) and (len(stages) == 1 or stages[0] > stages[1])
    ):
        raise SettingsError(
            f"ipm_solve: polish_eps must be a positive tolerance, a pair of them (the looser "
            f"first) or None, got {polish_eps!r}."
        )
    eps_inf = (1e-7 if dtype == torch.float64 else 1e-4) if eps_infeasible is None else float(eps_infeasible)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4
    return eps, stages, eps_inf, max(int(check_every), 1)


def _result(S: Dict[str, Tensor], fused: bool, newton, a_scale, c_scale, B: int, m: int, p: int) -> IPMResult:
    """The :class:`IPMResult` of the final state: the row scaling undone, the kernel's polish and the
    dual form's factors (in the caller's scaling) attached."""
    lam_out = S["lam"] / a_scale if p else None
    mu_out = S["mu"] / c_scale if m else None
    s_out = S["s"] * c_scale if m else S["s"]
    factors = polished = None
    if fused and "pflag" in S:
        pf = S["pflag"]
        polished = dict(
            active=S["active"] if m else None,
            polished=(pf & 1) != 0,
            fallback=(pf & 2) != 0,
            ok=(pf & 4) != 0,
            LS=S["LS"],
        )
    if newton.form == "dual":
        sc = _row_scales(a_scale, c_scale, B)  # (B, k) row norms
        if newton.PiAbt.dim() == 2:
            # (P⁻¹Āᵀ is shared only when P, A and C are: their row norms are then one vector)
            sc = sc[0]
        factors = dict(
            L=newton.LP, PiAbt=newton.PiAbt * sc.unsqueeze(-2), M=newton.M * sc.unsqueeze(-1) * sc.unsqueeze(-2)
        )
    return IPMResult(
        z=S["z"],
        lam=lam_out,
        mu=mu_out,
        s=s_out,
        status=S["status"],
        iterations=S["iters"],
        form=newton.form,
        factors=factors,
        polish=polished,
        fused=fused,
    )


def _fallback64(res: IPMResult, data, kw: Dict[str, Any], check_every: int, refine: int) -> IPMResult:
    """Re-solve the instances that ended with MAX_ITER or NUMERICAL in float64 and write them back
    (cast to res's dtype). ``data``: the problem; ``kw``: :func:`ipm_solve`'s keywords, of which the
    re-solve keeps the iteration's (with the checked ``check_every`` and the form's ``refine``),
    float64's default tolerance and no graph cache."""
    bad = (res.status == int(Status.MAX_ITER)) | (res.status == int(Status.NUMERICAL))
    if not bool(bad.any()):
        return res
    kept = ("max_iter", "form", "separate_steps", "step_fraction", "stall_iters", "cuda_graph", "options")
    kw = dict(eps=None, check_every=check_every, refine=refine, graph_cache=False, **{k: kw[k] for k in kept})
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
    return IPMResult(
        z=put(res.z, r64.z),
        lam=put(res.lam, r64.lam),
        mu=put(res.mu, r64.mu),
        s=put(res.s, r64.s) if res.s.shape[-1] else res.s,
        status=status,
        iterations=iters,
        form=res.form,
    )


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
    reads_deferred_checks = True
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
        (:func:`dqp.ipm_engine.solve_settings_batch`, which maps the settings and fills
        :class:`dqp.result.SolveInfo`). The keywords of :func:`ipm_solve` and of
        :func:`dqp.ipm_layer.solve_qp_batch` go in ``settings.qp_solver_keywords``."""
        from dqp.ipm_engine import solve_settings_batch

        return solve_settings_batch(batch, settings)
