"""The autograd Function of the element-wise path (black-box forward, KKT backward)."""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from dqp.engine import ElementResult, Engine
from dqp.errors import Status
from dqp.gradients import dense_grads, pattern_grad
from dqp.problem import QPBatch, SparseArg
from dqp.transforms import first_order_only, fixed_signature


#: relative residual of the adjoint solve above which the gradient is reported as inaccurate
BACKWARD_TOL = 1e-6


class GradientAccuracyWarning(UserWarning):
    """The backward linear solve did not reach ``BACKWARD_TOL`` (see ``SolveInfo.backward_residual``)."""


class Work:
    """Carries the batch structure and the forward results from forward to backward."""

    def __init__(self, engine: Engine, batch: QPBatch):
        self.engine = engine
        self.batch = batch
        self.results: List[ElementResult] = []


def _stack(results: List[ElementResult], attr: str, like: torch.Tensor) -> torch.Tensor:
    # (a copy either way: the result's arrays also serve as the next call's warm start)
    arr = getattr(results[0], attr)[None].copy() if len(results) == 1 else np.stack([getattr(r, attr) for r in results])
    return torch.as_tensor(arr, dtype=like.dtype).to(like.device)


def run_forward(work: Work) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve every element; return ``z (B,n), lam (B,p), mu (B,m)`` on the data's device and dtype."""
    work.results = work.engine.forward(work.batch)
    like = work.batch.q
    return _stack(work.results, "z", like), _stack(work.results, "lam", like), _stack(work.results, "mu", like)


@fixed_signature
class QPFunction(torch.autograd.Function):
    """``(P, q, C, d, A, b) ↦ (z, λ, μ)`` with the active-set KKT backward.

    Matrix inputs are dense batched tensors or the values of sparse matrices (the pattern lives in
    ``work.batch``).
    """

    @staticmethod
    def forward(work: Work, P, q, C, d, A, b):  # type: ignore[override]
        return run_forward(work)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.work = inputs[0]
        ctx.save_for_backward(*output)

    # Backward. At the solution, with J the active set, the KKT conditions
    #   P z + q + Aᵀλ + C_Jᵀμ_J = 0,   A z = b,   C_J z = d_J
    # read K (z, λ, μ_J) = (−q, b, d_J) with K = [[P, Aᵀ, C_Jᵀ], [A, 0, 0], [C_J, 0, 0]].
    # Differentiating: K d(z, λ, μ_J) = (−dq − dP z − dAᵀλ − dC_Jᵀμ_J, db − dA z, dd_J − dC_J z).
    # For a loss with incoming gradients ḡ, y = K⁻¹ ḡ (K symmetric) and dL = yᵀ(right-hand side):
    #   ∇q = −y_z, ∇b = y_λ, ∇d_J = y_μ, ∇P = −½(y_z zᵀ + z y_zᵀ), ∇A = −(λ y_zᵀ + y_λ zᵀ),
    #   ∇C_J = −(μ_J y_zᵀ + y_μ zᵀ); inactive rows get zero (μ ≡ 0 near the solution).
    @staticmethod
    @first_order_only
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gz, glam, gmu):  # type: ignore[override]
        work: Work = ctx.work
        batch = work.batch
        z, lam, mu = ctx.saved_tensors
        B, n, m, p = batch.B, batch.n, batch.m, batch.p
        if work.engine.lin_solver_name == "torch":
            return (None, *_batched_torch_backward(ctx, work, z, lam, mu, gz, glam, gmu))
        to_np = lambda g, k: np.zeros((B, k)) if g is None else g.detach().to("cpu", torch.float64).numpy()
        gz_, glam_, gmu_ = to_np(gz, n), to_np(glam, p), to_np(gmu, m)
        y_z, y_lam, y_mu = np.zeros((B, n)), np.zeros((B, p)), np.zeros((B, m))
        info = getattr(work, "info", None)
        back_res = []
        for i, r in enumerate(work.results):
            if r.status != Status.SOLVED or r.kkt is None:
                back_res.append(None)
                continue
            y_z[i], y_lam[i], y_mu[i], res = Engine.backward_element(r, gz_[i], glam_[i], gmu_[i])
            back_res.append(res)
        if info is not None:
            info.backward_residual = back_res
        inaccurate = [i for i, res in enumerate(back_res) if res is not None and not res <= BACKWARD_TOL]
        if inaccurate:
            warnings.warn(
                f"dQP backward: the adjoint KKT solve of batch element(s) {inaccurate[:10]} has relative residual "
                f"{max(back_res[i] for i in inaccurate):.1e} (> {BACKWARD_TOL:g}); their gradients are inaccurate "
                f"(a singular or very ill-conditioned reduced KKT system). See layer.info.backward_residual and "
                f"kkt_path; normalize_constraints=True or another lin_solver may help.",
                GradientAccuracyWarning,
                stacklevel=2,
            )
        need = ctx.needs_input_grad  # (work, P, q, C, d, A, b)
        like = batch.q
        t = lambda a: torch.as_tensor(a, dtype=like.dtype).to(like.device)
        active = torch.as_tensor(np.stack([r.active for r in work.results])) if m else None
        if not batch.sparse:
            dP, dq, dC, dd, dA, db = dense_grads(
                t(y_z),
                t(y_lam) if p else None,
                t(y_mu) if m else None,
                z,
                lam if p else None,
                mu if m else None,
                None if active is None else active.to(like.device),
                need[1:],
            )
            return (
                None,
                dP if need[1] else None,
                dq if need[2] else None,
                dC if need[3] else None,
                dd if need[4] else None,
                dA if need[5] else None,
                db if need[6] else None,
            )
        # sparse: gradients on the stored values only, in the tensor's own value order
        zn, lamn, mun = (x.detach().to("cpu", torch.float64).numpy() for x in (z, lam, mu))
        a_np = active.numpy() if m else None

        def sparse_grad(M: Optional[SparseArg], left_u, left_v, right_w, right_x, scale):
            if M is None:
                return None
            parts = []
            total = np.zeros(len(M.rows[0])) if M.shared else None
            for i in range(B):
                k = M.index(i)
                rows, cols = M.rows[k], M.col_indices(k)
                g = pattern_grad(left_u[i], left_v[i], right_w[i], right_x[i], rows, cols, scale)
                if M.shared:
                    total += g
                else:
                    parts.append(g)
            out = total if M.shared else np.concatenate(parts)
            return torch.as_tensor(out, dtype=M.values.dtype).to(M.values.device)

        dP = sparse_grad(batch.P, y_z, zn, zn, y_z, -0.5) if need[1] else None
        dC = None
        if m and need[3]:
            y_mu_a = y_mu * a_np
            dC = sparse_grad(batch.C, mun * a_np, y_z, y_mu_a, zn, -1.0)
        dA = sparse_grad(batch.A, lamn, y_z, y_lam, zn, -1.0) if (p and need[5]) else None
        dq = t(-y_z) if need[2] else None
        dd = t(y_mu * a_np) if (m and need[4]) else None
        db = t(y_lam) if (p and need[6]) else None
        return None, dP, dq, dC, dd, dA, db


def _batched_torch_backward(ctx: Any, work: Work, z, lam, mu, gz, glam, gmu):
    """Backward on the data's device with the batched torch KKT solver (``lin_solver='torch'``).

    The forward (a black-box solver and the CPU polish) fixed the active sets; here one batched
    factorization of the masked reduced KKT systems gives every adjoint at once.
    """
    from dqp.linsolve.torch_batched import BatchedKKT

    batch = work.batch
    B, m, p = batch.B, batch.m, batch.p
    solved = torch.tensor([r.status == Status.SOLVED for r in work.results], device=z.device)
    active = (
        torch.as_tensor(np.stack([r.active for r in work.results])).to(z.device) & solved.unsqueeze(-1) if m else None
    )
    P, C, A = (None if M is None else M.detach() for M in (batch.P, batch.C, batch.A))
    kkt = BatchedKKT(P, A, C, active, batch=B)
    gz = torch.zeros_like(z) if gz is None else gz
    glam = (torch.zeros_like(lam) if glam is None else glam) if p else None
    gmu = ((torch.zeros_like(mu) if gmu is None else gmu) * active.to(mu.dtype)) if m else None
    y_z, y_lam, y_mu = kkt.solve(gz, glam, gmu)
    grads = dense_grads(y_z, y_lam, y_mu, z, lam if p else None, mu if m else None, active, ctx.needs_input_grad[1:])
    keep = solved.view(-1, 1)
    need = ctx.needs_input_grad[1:]
    out = []
    for g, nd in zip(grads, need):
        if g is None or not nd:
            out.append(None)
        else:
            out.append(torch.where(keep.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g)))
    if getattr(work, "info", None) is not None:
        work.info.backward_residual = [None] * B
    return tuple(out)
