"""Differentiable batched QP solve with the built-in interior-point method, on any device.

Two entry points:

* :class:`IPMQPFunction` — a ``torch.autograd.Function`` on dense batched tensors
  ``(P, q, C, d, A, b)`` (every present argument already has the batch dimension; absent
  constraints are ``None``). Forward: :func:`dqp.solvers.ipm.ipm_solve`, active-set
  classification, one polish solve of the reduced KKT system. Backward: the same
  :class:`dqp.linsolve.torch_batched.BatchedKKT` factorization and
  :func:`dqp.gradients.dense_grads`.
* :func:`solve_qp_batch` — broadcasts shared arguments with ``expand`` (so autograd *sums*
  their gradients over the batch), calls the Function and raises (or masks)
  on failed elements; its signature is stable.
* The layer's batched engine (``qp_solver="dqp_ipm"``) lives in :mod:`dqp.ipm_engine`: it maps the
  :class:`~dqp.settings.Settings` it can honour onto :func:`solve_qp_batch` and fills
  :class:`~dqp.result.SolveInfo`.

Engine tuning (the IPM's, the kernel's, the polish graphs') is one frozen
:class:`~dqp.solvers.ipm.IPMOptions`, passed as the keyword ``options``.

Active set and polish: :mod:`dqp.ipm_polish` (re-exported here: :func:`classify_active`,
:func:`polish`).

Low precision. On the CPU, float32 (and float16/bfloat16) data are solved in float64 throughout
(IPM, polish, backward; a float32-level ``eps`` becomes float64's default) and the outputs are cast
back: the CPU is not faster in float32 at these sizes, and the float32 IPM stalls on harder
problems (qpth's generator, B=128, n=m=200: 68 of 128 elements re-solved in float64, 6.0 s
forward+backward against 2.6 s). On other devices (the GPU, where float32 is faster) the IPM runs
in float32 and the polish and the backward solve run in float64: the data are cast up (exactly), the reduced KKT system is factorized in float64 with
float64's acceptance tolerance, the polished ``(z, λ, μ)`` are cast back to the input dtype, and
the backward solves with that float64 factorization and casts the adjoint back before forming the
gradients in the input dtype (all outputs and gradients keep the input dtype). The default
``polish_rounds`` is 6 instead of 3 there. Float64 data take the unchanged path (bitwise the same
results). Why: the float32 IPM stops at a relative tolerance of 1e-5, where a near-active row
(slack ~1e-4 of the row norm) can still carry a dual of ~0.1 and be classified active. A float32
polish accepted that row, because its slightly negative multiplier passed the √eps₃₂ ≈ 3e-4 test,
and the gradients were off by 1e-2…1e-1. Float32 round-off alone, measured by polishing in float32
on the float64 active set, is ≤1.2e-6. So the error came from the active set, and the loose float32
acceptance test let it through. The float64 polish rejects such rows and moves them. With qpth's
generator the float32 IPM point misclassifies rows in 40–95 % of the elements at n = m = 200–500;
3 rounds repaired all but 1 of 64 elements at n = 500, and 4 rounds repaired that one. Measured
(B=8, n=m=100/200/500, 8 problems each of qpth's generator, worst relative gradient error
vs the Clarabel reference): float32 1.4e-2 / 2.1e-2 / 4.3e-2 before and 4.7e-8 / 4.7e-8 / 4.7e-8
after; float64 1.7e-14 / 3.7e-14 / 1.3e-13 in both cases. Cost at B=128, n=m=100, 1 thread, CPU time
of forward + backward: about +42 ms on ~405 ms (+10 %), all of it in the forward. The float64
factorization cannot reuse the float32 IPM's factors, but the float32 polish it replaces often fell
back to the augmented path. The backward's float64 solve skips iterative refinement. Without the
polish (``polish=False``), the float32 path keeps its float32 factorization.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch

from dqp.cpu_threads import qp_batch_work, serial_if_small
from dqp.errors import SettingsError, ShapeError, Status, error_for_statuses
from dqp.gradients import dense_grads
from dqp.ipm_host import on_host, solve_on_host
from dqp.ipm_polish import _kkt_of_kernel, _not_psd, _polish_graph_ok, _polish_graphed, classify_active, polish
from dqp.problem import INF_BOUND, INF_ROW_RATIO, DeferredChecks
from dqp.linsolve.torch_batched import PATH_NAMES, BatchedKKT
from dqp.solvers.ipm import (
    DEFAULT_OPTIONS,
    IPMOptions,
    default_eps,
    form_by_cost,
    fused_flag,
    fused_reasons,
    graphed_call,
    ipm_solve,
)
from dqp.transforms import first_order_only, fixed_signature, reject_functorch

if TYPE_CHECKING:  # pragma: no cover
    pass

Tensor = torch.Tensor

__all__ = ["IPMQPFunction", "solve_qp_batch", "classify_active", "polish"]


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype`` (no copy when it already is), None stays None."""
    return None if t is None else t.to(dtype)


#: Compute capabilities whose float64 rate is at least half the float32 rate (data-centre GPUs).
_FULL_FP64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def _fused_widen(P: Tensor, C: Optional[Tensor], A: Optional[Tensor], opts: Dict[str, Any]) -> bool:
    """CUDA, float32/float16 data: whether to solve in float64 throughout
    (:attr:`IPMOptions.widen_on_cuda`). By default where the fused float64 kernel
    (:mod:`dqp.solvers.fused`) takes the widened problem — it runs the float64 problem faster than
    the float32 torch loop runs the float32 one (H200, qpth's generator, B=128, n=m=100) — and on
    GPUs with full-rate float64, where the float64 torch loop beats the float32 one too; the answer
    is float64's. On the CPU only where the kernel is required (``fused=True``: its C++ build)."""
    options = _options(opts)
    flag = fused_flag(opts.get("fused"), options)
    if P.device.type == "cuda" and options.widen_on_cuda is not None:
        return options.widen_on_cuda
    if P.device.type == "cuda" and torch.cuda.get_device_capability(P.device) in _FULL_FP64:
        return True
    if flag is False or (P.device.type != "cuda" and flag is not True):
        return False
    B, n = P.shape[0], P.shape[-1]
    m = 0 if C is None else C.shape[-2]
    p = 0 if A is None else A.shape[-2]
    return form_by_cost(opts.get("form", "auto"), P, B, n, m, p) == "dual" and not fused_reasons(
        flag, "dual", torch.float64, P.device, n, m, p, opts.get("trace"), opts.get("refine"), options
    )


def _options(opts: Dict[str, Any]) -> IPMOptions:
    """The engine options of an options dict (``opts["options"]``, default :data:`DEFAULT_OPTIONS`)."""
    options = opts.get("options")
    if options is None:
        return DEFAULT_OPTIONS
    if not isinstance(options, IPMOptions):
        raise SettingsError(f"options must be a dqp.solvers.ipm.IPMOptions, got {type(options).__name__}.")
    return options


@functools.lru_cache(maxsize=16)
def _with_kernel_threads(options: IPMOptions, threads: int) -> IPMOptions:
    """``options`` whose kernel splits its batch over ``threads`` (made once per pair: options are frozen)."""
    return options.replace(kernel={"cpu_threads": threads})


def _wide_dtype(P: Tensor) -> Optional[torch.dtype]:
    """float64 for float32/float16/bfloat16 data on a device with float64 (the polish dtype), else None."""
    if P.dtype == torch.float64 or not P.dtype.is_floating_point or P.device.type == "mps":
        return None
    return torch.float64


def _finish(res, z, lam, mu, active, kkt, polished, solved, dtype_in, P: Optional[Tensor] = None):
    """IPMQPFunction.forward's outputs: per-element diagnostics on ``kkt``, the point in the input
    dtype, zeros (never NaN) for failed elements. With ``P``: elements whose P is not positive
    semidefinite (:func:`_not_psd`) get ``Status.NOT_PSD`` and count as failed."""
    bad = None if P is None else _not_psd(P, res, kkt, solved)
    if bad is not None:
        res.status = torch.where(bad, torch.full_like(res.status, int(Status.NOT_PSD)), res.status)
        solved = solved & ~bad
    kkt.polished, kkt.iterations = polished & solved, res.iterations
    z, lam, mu = (_cast(t, dtype_in) for t in (z, lam, mu))
    sv = solved.unsqueeze(-1)
    z = torch.where(sv, z, torch.zeros_like(z))
    if lam is not None:
        lam = torch.where(sv, lam, torch.zeros_like(lam))
    if mu is not None:
        mu = torch.where(sv, mu, torch.zeros_like(mu))
    return z, lam, mu, res.status, active, kkt


@fixed_signature
class IPMQPFunction(torch.autograd.Function):
    """Batched QP solve with gradients w.r.t. all of ``(P, q, C, d, A, b)``.

    ``IPMQPFunction.apply(P, q, C, d, A, b, options)`` with ``P (B,n,n)``, ``q (B,n)``,
    ``C (B,m,n)``, ``d (B,m)``, ``A (B,p,n)``, ``b (B,p)`` (every present argument batched —
    use :func:`solve_qp_batch` to broadcast shared ones; ``None`` for absent constraints) and
    ``options`` a dict of :func:`dqp.solvers.ipm.ipm_solve` keywords plus ``polish`` (bool,
    default True) and ``polish_rounds`` (int, default 3; 6 for float32/float16 data, whose polish and
    backward solve run in float64; see the module docstring).

    Returns ``(z, lam, mu, status, active, kkt)``: ``z (B,n)``, ``lam (B,p)`` or None, ``mu (B,m)``
    or None (differentiable), ``status (B,)`` int64 and ``active (B,m)`` bool or None (not
    differentiable), and the :class:`~dqp.linsolve.torch_batched.BatchedKKT` factorization the
    backward uses (for diagnostics: ``kkt.path``). Only ``P``'s symmetric part enters the problem (the forward uses
    ``½(P + Pᵀ)``), so ``∇P`` is symmetric. Elements whose status is not SOLVED return zeros
    and receive zero gradients.
    """

    @staticmethod
    def forward(P, q, C, d, A, b, options: Optional[Dict[str, Any]] = None):
        """IPM solve, active-set classification and polish; returns ``(z, lam, mu, status, active, kkt)``."""
        eng = _options(dict(options or {}))
        work = qp_batch_work(P, C, A)
        with serial_if_small(P.device, work, eng.cpu_serial_max_work) as threads:
            if threads is not None and eng.kernel.cpu_threads is None:
                # the kernel's C++ build keeps the caller's threads (its split is dynamic)
                options = {**(options or {}), "options": _with_kernel_threads(eng, threads)}
            return IPMQPFunction._forward(P, q, C, d, A, b, options)

    @staticmethod
    def _forward(P, q, C, d, A, b, options: Optional[Dict[str, Any]] = None):
        opts = dict(options or {})
        eng = _options(opts)
        do_polish = opts.pop("polish", True)
        rounds = opts.pop("polish_rounds", None)
        if P.dim() != 3 or q.dim() != 2:
            raise ShapeError(
                "IPMQPFunction: pass batched tensors P (B,n,n), q (B,n), ...; "
                "use dqp.ipm_layer.solve_qp_batch to broadcast shared arguments."
            )
        P = 0.5 * (P + P.transpose(-1, -2))
        wide = _wide_dtype(P)
        dtype_in = P.dtype
        if (
            do_polish
            and wide is not None
            and ((P.device.type == "cpu" and eng.widen_on_cpu) or _fused_widen(P, C, A, opts))
        ):
            # CPU, float32/float16 data: solve in float64 throughout and cast the answer back. The
            # float32 IPM gains nothing here (the CPU is not faster in float32 at these sizes) and
            # stalls: on qpth's generator, B=128, n=m=200, 68 of 128 elements re-solved in float64,
            # 6.0 s forward+backward against 2.6 s for float64 data. On CUDA: where the fused
            # float64 kernel takes the problem (_fused_widen)
            P, q, C, d, A, b = (_cast(t, wide) for t in (P, q, C, d, A, b))
            if opts.get("eps") is not None and opts["eps"] >= default_eps(dtype_in):
                opts["eps"] = None  # a float32-level tolerance → float64's default
            wide = None
        if do_polish and opts.get("eps") is None and P.dtype == torch.float64:
            # the polish makes the answer exact on the active set; the IPM only has to find that set
            opts["eps"] = eng.polished_eps
        if rounds is None:
            rounds = 3 if wide is None else 6  # a float32 IPM point misclassifies more rows
        with torch.profiler.record_function("dqp::ipm_solve"):
            # (where the fused kernel runs, it polishes too, in the same launch: IPMResult.polish)
            # (the torch polish always runs its first round: so does the kernel's)
            kernel_polish = do_polish and wide is None
            if kernel_polish and eng.polish_stage_eps is not None:
                opts.setdefault("polish_eps", eng.polish_stage_eps)
            res = ipm_solve(P, q, C, d, A, b, polish_rounds=max(int(rounds), 1) if kernel_polish else 0, **opts)
        solved = res.status == int(Status.SOLVED)
        if res.polish is not None:
            # the kernel polished: its outputs are queued before the one host sync (its fallback
            # flags), which then waits for the kernel while the device works
            with torch.profiler.record_function("dqp::polish"):
                active = res.polish["active"]
                kkt = _kkt_of_kernel(P, C, A, active, res, graphs=opts.get("cuda_graph", True), options=eng)
                out = _finish(res, res.z, res.lam, res.mu, active, kkt, res.polish["polished"], solved, dtype_in)
            fb = res.polish["fallback"]
            if not bool(fb.any()):
                return out
            # some elements' reduced systems failed the kernel's pivot test: the torch polish (with
            # its augmented and minimum-norm paths) for those alone, from their IPM point (the kernel
            # did not touch it); the others keep the kernel's polish, its active set and factor
            with torch.profiler.record_function("dqp::polish"):
                act = res.polish["active"]
                if act is not None:
                    act = torch.where(fb.unsqueeze(-1), classify_active(C, res.s, res.mu) & solved.unsqueeze(-1), act)
                z, lam, mu, active, kkt, polished = polish(
                    P,
                    q,
                    C,
                    d,
                    A,
                    b,
                    res.z,
                    res.lam,
                    res.mu,
                    act,
                    solved & fb,
                    rounds=rounds,
                    factors=res.factors,
                    options=eng,
                )
            return _finish(res, z, lam, mu, active, kkt, polished | res.polish["polished"], solved, dtype_in)
        z, lam, mu = res.z, res.lam, res.mu
        active = classify_active(C, res.s, mu) if mu is not None else None
        if active is not None:
            active = active & solved.unsqueeze(-1)
        with torch.profiler.record_function("dqp::polish"):
            if do_polish and wide is not None:
                # float32/float16 data: polish (and keep the factorization for the backward) in float64,
                # with float64's acceptance tolerance (module docstring, "Low precision")
                wargs = [_cast(t, wide) for t in (P, q, C, d, A, b, z, lam, mu)]
                out = None
                if _polish_graph_ok(wargs[0], q, C, A, res, eng, opts.get("cuda_graph", True)):
                    out = _polish_graphed(*wargs, active, solved, None, rounds, eng)
                if out is None:
                    out = polish(*wargs, active, solved, rounds=rounds, options=eng)
                z, lam, mu, active, kkt, polished = out
            elif do_polish:
                out = None
                if _polish_graph_ok(P, q, C, A, res, eng, opts.get("cuda_graph", True)):
                    out = _polish_graphed(P, q, C, d, A, b, z, lam, mu, active, solved, res.factors, rounds, eng)
                if out is not None:
                    z, lam, mu, active, kkt, polished = out
                else:
                    z, lam, mu, active, kkt, polished = polish(
                        P, q, C, d, A, b, z, lam, mu, active, solved, rounds=rounds, factors=res.factors, options=eng
                    )
            else:
                kkt = BatchedKKT(P, A, C, active, batch=q.shape[0], factors=res.factors, options=eng.linalg)
                polished = torch.zeros_like(solved)
        return _finish(res, z, lam, mu, active, kkt, polished, solved, dtype_in, P)

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Keep the factorized reduced KKT system and the solution for the backward."""
        z, lam, mu, status, active, kkt = output
        ctx.kkt = kkt
        ctx.engine_options = _options(dict(inputs[6] or {})) if len(inputs) > 6 else DEFAULT_OPTIONS
        ctx.shapes = [None if t is None else t.shape for t in inputs[:6]]
        ctx.work = qp_batch_work(inputs[0], inputs[2], inputs[4])
        ctx.save_for_backward(z, lam, mu, status, active)
        ctx.mark_non_differentiable(status)
        if active is not None:
            ctx.mark_non_differentiable(active)

    # KKT derivation: at the solution, locally Pz + q + Aᵀλ + C_Jᵀμ_J = 0,
    # Az = b, C_J z = d_J. Differentiating, K (dz, dλ, dμ_J) = −(dP z + dq + dAᵀλ + dC_Jᵀμ_J,
    # dA z − db, dC_J z − dd_J) with K symmetric, so the vector-Jacobian product is obtained from
    # one solve K y = (ḡ_z, ḡ_λ, ḡ_μJ) and the formulas in dqp.gradients.dense_grads.
    @staticmethod
    @first_order_only
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, glam, gmu, _gstatus=None, _gactive=None, _gkkt=None):
        """One solve with the saved KKT factorization, then :func:`dqp.gradients.dense_grads`."""
        with (
            torch.profiler.record_function("dqp::backward"),
            serial_if_small(ctx.kkt.P.device, ctx.work, ctx.engine_options.cpu_serial_max_work),
        ):
            return IPMQPFunction._backward(ctx, gz, glam, gmu)

    @staticmethod
    def _backward(ctx, gz, glam, gmu):
        z, lam, mu, status, active = ctx.saved_tensors
        kkt: BatchedKKT = ctx.kkt
        if gz is None:
            gz = torch.zeros_like(z)
        if lam is not None and glam is None:
            glam = torch.zeros_like(lam)
        if mu is not None and gmu is None:
            gmu = torch.zeros_like(mu)
        need = tuple(ctx.needs_input_grad[:6])
        eng: IPMOptions = ctx.engine_options
        if getattr(kkt, "_graphed", False):
            # the forward's polish ran as a CUDA graph: so does this (same shapes, Cholesky path)
            raw = getattr(kkt, "_raw", None)

            def fn(t):
                if raw is not None:
                    k = BatchedKKT.from_schur_factor(
                        **{n: t.get(n) for n in raw}, refine=kkt.refine, options=eng.linalg
                    )
                else:
                    k = BatchedKKT.from_state(
                        {n: t.get(n) for n in BatchedKKT._STATE}, refine=kkt.refine, options=eng.linalg
                    )
                g = _backward_math(
                    k,
                    t["gz"],
                    t.get("glam"),
                    t.get("gmu"),
                    t["z"],
                    t.get("lam"),
                    t.get("mu"),
                    t["status"],
                    t.get("active"),
                    need,
                    eng.outer,
                )
                return {f"g{i}": v for i, v in enumerate(g) if v is not None}

            inputs = dict(
                raw if raw is not None else kkt.state(),
                gz=gz,
                glam=glam,
                gmu=gmu,
                z=z,
                lam=lam,
                mu=mu,
                status=status,
                active=active,
            )
            out = graphed_call(("dqp_backward", need, kkt.refine, raw is not None), fn, inputs, options=eng)
            if out is not None:
                return tuple(out.get(f"g{i}") for i in range(6)) + (None,)
        return _backward_math(kkt, gz, glam, gmu, z, lam, mu, status, active, need, eng.outer) + (None,)


def _backward_math(kkt: BatchedKKT, gz, glam, gmu, z, lam, mu, status, active, need, outer: str = "auto"):
    """The vector-Jacobian product (see IPMQPFunction.backward); ``(dP, dq, dC, dd, dA, db)``."""
    if mu is not None:
        gmu = gmu * active.to(mu.dtype)
    dtype, wdt = z.dtype, kkt.P.dtype  # wdt float64 when the forward polished float32 data in float64
    cast = lambda t, dt: None if t is None else t.to(dt)  # noqa: E731
    # a float64 solve of float32 data needs no iterative refinement for a float32 adjoint
    yz, ylam, ymu = kkt.solve(
        cast(gz, wdt),
        cast(glam, wdt) if lam is not None else None,
        cast(gmu, wdt) if mu is not None else None,
        refine=0 if wdt != dtype else None,
    )
    # the adjoint is accurate to the input dtype now; the outer products are formed in that dtype
    yz, ylam, ymu = cast(yz, dtype), cast(ylam, dtype), cast(ymu, dtype)
    ok = status == int(Status.SOLVED)
    # failed elements get zero gradients: their vectors are zeroed before the outer products (every
    # gradient is a sum of products of them), not the (B, ·, n) results after (two passes each).
    # (on the CPU, reading the flags costs nothing: skip the masking when all solved)
    if not (ok.device.type == "cpu" and bool(ok.all())):
        okv = ok.unsqueeze(-1)
        yz, ylam, ymu, z, lam, mu = (
            None if t is None else torch.where(okv, t, torch.zeros_like(t)) for t in (yz, ylam, ymu, z, lam, mu)
        )
    grads = dense_grads(yz, ylam, ymu, z, lam, mu, active, need=need, outer=outer)
    return tuple(g if nd else None for g, nd in zip(grads, need))


def _broadcast(P, q, C, d, A, b):
    """Validate shapes, drop 0-row constraints, expand everything to the batch size B."""
    for name, t in (("P", P), ("q", q)):
        if not isinstance(t, Tensor):
            raise ShapeError(f"solve_qp_batch: {name} must be a torch tensor, got {type(t).__name__}.")
    if q.dim() not in (1, 2) or P.dim() not in (2, 3):
        raise ShapeError(
            f"solve_qp_batch: expected P (n,n)/(B,n,n) and q (n,)/(B,n), got {tuple(P.shape)} and {tuple(q.shape)}."
        )
    n = q.shape[-1]
    if (C is None) != (d is None) or (A is None) != (b is None):
        raise ShapeError("solve_qp_batch: give C with d and A with b (or neither of a pair).")
    if C is not None and C.shape[-2] == 0:
        C = d = None
    if A is not None and A.shape[-2] == 0:
        A = b = None
    sizes = set()
    for t, nd in ((P, 3), (q, 2), (C, 3), (d, 2), (A, 3), (b, 2)):
        if t is not None and t.dim() == nd:
            sizes.add(t.shape[0])
    if len(sizes) > 1:
        raise ShapeError(f"solve_qp_batch: batched arguments disagree on the batch size: {sorted(sizes)}.")
    B = sizes.pop() if sizes else 1

    def ex(t, shape):
        if t is None:
            return None
        try:
            return t.expand(*shape) if t.dim() == len(shape) - 1 else t.expand(*shape)
        except RuntimeError as e:
            raise ShapeError(
                f"solve_qp_batch: an argument of shape {tuple(t.shape)} does not fit {tuple(shape)}: {e}"
            ) from None

    P = ex(P, (B, n, n))
    q = ex(q, (B, n))
    if C is not None:
        m = C.shape[-2]
        C, d = ex(C, (B, m, n)), ex(d, (B, m))
    if A is not None:
        p = A.shape[-2]
        A, b = ex(A, (B, p, n)), ex(b, (B, p))
    return P, q, C, d, A, b


#: Data whose constraint rows or objective have a norm outside [1/EQUILIBRATE_RANGE,
#: EQUILIBRATE_RANGE] are scaled before the solve (:func:`_equilibrate`).
EQUILIBRATE_RANGE = 1e3


def _row_norms(M: Optional[Tensor]) -> Optional[Tensor]:
    if M is None:
        return None
    nrm = torch.linalg.vector_norm(M, dim=-1)
    return torch.where(nrm > 0, nrm, torch.ones_like(nrm))


def _scales(P, q, C, A):
    """Row norms of C and A (ones for zero rows) and the objective's scale ``σ = max(max|P_ij|, ‖q‖∞)``."""
    rc, ra = _row_norms(C), _row_norms(A)
    sigma = torch.maximum(P.abs().flatten(-2).amax(-1), q.abs().amax(-1) if q.shape[-1] else q.new_zeros(q.shape[0]))
    return rc, ra, torch.where(sigma > 0, sigma, torch.ones_like(sigma))


def _badly_scaled(rc, ra, sigma) -> Tensor:
    """A device flag: some scale lies outside ``[1/EQUILIBRATE_RANGE, EQUILIBRATE_RANGE]``."""
    scales = torch.cat([t.reshape(-1) for t in (rc, ra, sigma) if t is not None])
    return ((scales < 1.0 / EQUILIBRATE_RANGE) | (scales > EQUILIBRATE_RANGE)).any()


def _equilibrate(P, q, C, d, A, b):
    """Scale badly scaled data: rows of C and A to unit 2-norm (with d, b) and the objective by
    ``σ = max(max|P_ij|, ‖q‖∞)``, per element. The IPM row-normalizes internally; its polish and
    the backward, whose acceptance tests are absolute in the data's units, need it where the rows
    or the objective are far from unit size (``z`` is invariant; ``λ, μ`` scale back by σ/‖row‖).
    Differentiable torch operations. Returns ``((P, q, C, d, A, b), (rc, ra, σ))``, rc and ra of
    ones where absent."""
    rc, ra, sigma = _scales(P, q, C, A)
    s3 = sigma.view(-1, 1, 1)
    Ps, qs = P / s3, q / sigma.unsqueeze(-1)
    Cs, ds = (None, None) if C is None else (C / rc.unsqueeze(-1), d / rc)
    As, bs = (None, None) if A is None else (A / ra.unsqueeze(-1), b / ra)
    ones = lambda M: None if M is None else q.new_ones(M.shape[:-1])  # noqa: E731
    return (Ps, qs, Cs, ds, As, bs), (rc if C is not None else ones(C), ra if A is not None else ones(A), sigma)


def _feasible(z: Tensor, C, d, A, b) -> Tensor:
    """Per element: ``z`` satisfies the (unscaled) constraints to a tolerance relative to each row's
    scale, ``|r_i| ≤ √ε·(|d_i| + |C_i||z|)`` — what a polished (verified) point must meet."""
    tol = math.sqrt(torch.finfo(z.dtype).eps)
    zc, zabs = z.unsqueeze(-1), None
    bad = None
    with torch.no_grad():
        for M, v, eq in ((C, d, False), (A, b, True)):
            if M is None:
                continue
            r = torch.matmul(M, zc).squeeze(-1).sub_(v)
            excess = r.abs_() if eq else r
            # tol·|v_i| is a lower bound of the rounded tol·(|v_i| + |M_i||z|) (rounding is monotone):
            # rows within it pass without |M||z|. On the CPU reading that flag costs nothing
            if excess.device.type == "cpu" and not bool(torch.gt(excess, v.abs().mul_(tol)).any()):
                continue
            zabs = z.abs().unsqueeze(-1) if zabs is None else zabs
            size = torch.matmul(M.abs(), zabs).squeeze(-1).add_(v.abs()).mul_(tol)
            rows = torch.gt(excess, size).any(-1)
            bad = rows if bad is None else bad.logical_or_(rows)
    return torch.ones(z.shape[0], dtype=torch.bool, device=z.device) if bad is None else bad.logical_not_()


def _unbounded_mask(C: Optional[Tensor], d: Optional[Tensor]) -> Optional[Tensor]:
    """(B, m) rows whose bound means "none" (``d_i ≥ INF_BOUND``, ``+inf``; see :mod:`dqp.problem`)."""
    if C is None:
        return None
    return (d >= INF_BOUND) & (d >= INF_ROW_RATIO * C.detach().abs().amax(-1))


def _unbounded_rows(C: Tensor, d: Tensor, big: Tensor):
    """Take the rows marked in ``big`` (:func:`_unbounded_mask`) out: they cannot be active.

    Rows unbounded in every element are dropped; rows unbounded in some elements become ``0·z ≤ 1``
    there (always satisfied, so their multiplier is 0; ``torch.where`` gives the original entries a
    zero gradient). Returns ``(C, d, rows)`` with ``rows = (kept indices, m, masked (B, k))``.
    """
    m = d.shape[-1]
    idx = (~big.all(0)).nonzero().flatten()
    C, d, big = C[:, idx], d[:, idx], big[:, idx]
    if idx.numel() == 0:
        return None, None, (idx, m, big)
    if bool(big.any()):
        C = torch.where(big.unsqueeze(-1), torch.zeros_like(C), C)
        d = torch.where(big, torch.ones_like(d), d)
    return C, d, (idx, m, big)


def _restore_rows(mu: Optional[Tensor], active: Optional[Tensor], rows, like: Tensor):
    """Multipliers and active flags of all ``m`` rows (the taken-out rows: 0 and inactive)."""
    idx, m, big = rows
    B = like.shape[0]
    mu_full = like.new_zeros(B, m)
    act_full = torch.zeros(B, m, dtype=torch.bool, device=like.device)
    if mu is not None:
        mu_full = mu_full.index_copy(1, idx, torch.where(big, torch.zeros_like(mu), mu))
    if active is not None:
        act_full[:, idx] = active & ~big
    return mu_full, act_full


@functools.lru_cache(maxsize=1)
def _ipm_keyword_names() -> Tuple[str, ...]:
    """The keywords :func:`solve_qp_batch` passes on (``ipm_solve``'s and ``polish_rounds``), read once."""
    import inspect

    return tuple(k for k in inspect.signature(ipm_solve).parameters if k not in ("P", "q", "C", "d", "A", "b")) + (
        "polish_rounds",
    )


def _check_ipm_options(options: Dict[str, Any]) -> None:
    """Unknown ``ipm_solve`` keywords are a :class:`SettingsError` (with the closest valid name)."""
    import difflib

    valid = list(_ipm_keyword_names())
    unknown = [k for k in options if k not in valid]
    if unknown:
        hints = [
            f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, valid, n=1)) else "")
            for k in unknown
        ]
        raise SettingsError(
            f"qp_solver='dqp_ipm' has no option {', '.join(hints)}. Valid keywords "
            f"(qp_solver_keywords / solve_qp_batch): {', '.join(sorted(valid))}."
        )


def solve_qp_batch(
    P: Tensor,
    q: Tensor,
    C: Optional[Tensor] = None,
    d: Optional[Tensor] = None,
    A: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    eps: Optional[float] = None,
    max_iter: int = 100,
    on_failure: str = "raise",
    polish: bool = True,
    diagnostics: Optional[Dict[str, Any]] = None,
    **ipm_options,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor, Optional[Tensor]]:
    """Solve a batch of QPs differentiably with the built-in IPM (stable entry point).

    Parameters
    ----------
    P : torch.Tensor
        Quadratic term, ``(n, n)`` or ``(B, n, n)``.
    q : torch.Tensor
        Linear term, ``(n,)`` or ``(B, n)``.
    C, d : torch.Tensor or None
        Inequalities ``Cz ≤ d``: ``C`` is ``(m, n)`` or ``(B, m, n)``, ``d`` is ``(m,)`` or
        ``(B, m)``; ``None`` or zero rows when there are none.
    A, b : torch.Tensor or None
        Equalities ``Az = b``: ``A`` is ``(p, n)`` or ``(B, p, n)``, ``b`` is ``(p,)`` or
        ``(B, p)``; ``None`` or zero rows when there are none. Any mix of batched and shared
        arguments is allowed; shared ones are broadcast, so their gradient is the *sum* over
        the batch.
    eps : float, optional
        IPM relative tolerance. Default with the polish: ``IPMOptions.polished_eps`` = 1e-8 for float64
        data (and float32 data on the CPU, solved in float64), 1e-5 for float32 on other devices;
        without the polish 1e-9 / 1e-5.
    max_iter : int
        IPM iteration limit.
    on_failure : {"raise", "mask"}
        ``"raise"``: raise :func:`dqp.errors.error_for_statuses` (``InfeasibleError``,
        ``UnboundedError``, ``MaxIterationsError``, ``SolverFailedError``) naming every failed
        element. ``"mask"``: return zeros for failed elements (never NaN; zero gradients) and let
        the caller read ``status``.
    polish : bool
        Polish the IPM point on its active set (see the module docstring).
    diagnostics : dict, optional
        Filled, per element, with ``verified`` ((B,) bool: the polished point was accepted, i.e. it
        satisfies the KKT conditions of its active set to round-off), ``iterations`` ((B,) IPM
        iterations) and ``kkt_path`` (list of ``"cholesky"``, ``"augmented"`` or
        ``"minimum-norm"``: how the reduced KKT system was solved).
    **ipm_options
        Further :func:`dqp.solvers.ipm.ipm_solve` keywords (check_every, form, ...; ``options``: an
        :class:`~dqp.solvers.ipm.IPMOptions` with the engine's tuning, the layer's polish included),
        and ``polish_rounds``.

    Returns
    -------
    z : torch.Tensor
        Solutions, ``(B, n)`` (``B = 1`` when no argument is batched).
    lam : torch.Tensor or None
        Equality multipliers, ``(B, p)``.
    mu : torch.Tensor or None
        Inequality multipliers, ``(B, m)``.
    status : torch.Tensor
        ``(B,)`` int64 :class:`dqp.errors.Status` codes.
    active : torch.Tensor or None
        ``(B, m)`` bool: the inequalities in the active set.
    """
    reject_functorch((P, q, C, d, A, b), "solve_qp_batch")
    if on_failure not in ("raise", "mask"):
        raise SettingsError(f"solve_qp_batch: on_failure must be 'raise' or 'mask', got {on_failure!r}.")
    z, lam, mu, status, active, kkt, feasible = _solve(
        P, q, C, d, A, b, eps, max_iter, polish, ipm_options, check_feasible=diagnostics is not None
    )
    if diagnostics is not None:
        verified = kkt.polished & feasible
        diagnostics.update(
            verified=verified, iterations=kkt.iterations, kkt_path=[PATH_NAMES[i] for i in kkt.path.tolist()]
        )
    if on_failure == "raise":
        st = status.tolist()
        if any(s != int(Status.SOLVED) for s in st):
            raise error_for_statuses([Status(s) for s in st], "dqp_ipm")
    return z, lam, mu, status, active


def _solve(
    P,
    q,
    C,
    d,
    A,
    b,
    eps,
    max_iter,
    polish,
    ipm_options,
    check_feasible: bool = True,
    checks: Optional[DeferredChecks] = None,
    broadcast: bool = True,
):
    """:func:`solve_qp_batch`'s solve: ``(z, lam, mu, status, active, kkt, feasible)`` with
    ``feasible`` (B,) whether z satisfies the constraints (:func:`_feasible`; None unless
    ``check_feasible``). One host read before the solve: whether rows must be taken out
    (absent bounds), whether the data must be equilibrated and, with ``checks`` (the layer's
    :class:`dqp.problem.DeferredChecks`), whether the data passed validation's screen (the
    detailed checks then raise the typed error). ``broadcast=False``: the arguments are a
    validated batch already (:class:`dqp.problem.QPBatch`: every one ``(B, ...)``, absent
    constraints None), used as they are (no expand: no autograd node per argument)."""
    _check_ipm_options(ipm_options)
    if broadcast:
        P, q, C, d, A, b = _broadcast(P, q, C, d, A, b)
    if on_host(P, C, A, _options(ipm_options)):
        if checks is not None:
            checks.check()  # (the data's screen, read before the copy to the host)
        return solve_on_host(_solve, (P, q, C, d, A, b), P.device, eps, max_iter, polish, ipm_options, check_feasible)
    with torch.no_grad():
        big = _unbounded_mask(C, d)
        scaled_badly = _badly_scaled(*_scales(P, q, C, A))
        flags = [scaled_badly if big is None else big.any(), scaled_badly] + ([] if checks is None else [checks.ok])
        has_big, rescale, *data_ok = torch.stack(flags).tolist()
    if data_ok and not data_ok[0]:
        checks.run()
    rows = None
    if has_big:
        C, d, rows = _unbounded_rows(C, d, big)
        with torch.no_grad():
            rescale = rescale and bool(_badly_scaled(*_scales(P, q, C, A)))
    opts = dict(ipm_options)
    opts.update(eps=eps, max_iter=max_iter, polish=polish)
    if not rescale:
        z, lam, mu, status, active, kkt = IPMQPFunction.apply(P, q, C, d, A, b, opts)
    else:
        # badly scaled data: solved (IPM, polish, backward) with unit rows and a unit objective; the
        # scaling is differentiable, so autograd carries the gradients back through it
        (Ps, qs, Cs, ds, As, bs), (rc, ra, sigma) = _equilibrate(P, q, C, d, A, b)
        z, lam, mu, status, active, kkt = IPMQPFunction.apply(Ps, qs, Cs, ds, As, bs, opts)
        mu = None if mu is None else mu * sigma.unsqueeze(-1) / rc
        lam = None if lam is None else lam * sigma.unsqueeze(-1) / ra
    feasible = _feasible(z.detach(), C, d, A, b) if check_feasible else None
    if rows is not None:
        mu, active = _restore_rows(mu, active, rows, z)
    return z, lam, mu, status, active, kkt, feasible
