"""The dQP layer: ``nn.Module`` front door of dqp."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from dqp.autograd import QPFunction, Work, run_forward
from dqp.engine import Engine
from dqp.errors import SettingsError, Status, error_for_statuses
from dqp.layer_compat import LastCall, LibdqpAttributes, detach_batch, resolve_keywords
from dqp.problem import QPBatch, SparseArg, validate
from dqp.result import QPOutput, SolveInfo
from dqp.settings import Settings, build_settings, settings_from
from dqp.solvers.base import ForwardSolver
from dqp.transforms import graph_break, reject_functorch

logger = logging.getLogger("dqp")


class UnverifiedSolutionWarning(UserWarning):
    """An element's active set did not pass the KKT check (see :attr:`SolveInfo.verified`)."""


def _row_scale_dense(M: torch.Tensor) -> torch.Tensor:
    a = M.abs().amax(dim=-1, keepdim=True)  # ‖v‖ = a‖v/a‖: no overflow for entries beyond 1e154
    a_safe = torch.where(a > 0, a, torch.ones_like(a))
    r = a_safe.squeeze(-1) * (M / a_safe).norm(dim=-1)
    return torch.where(r > 0, r, torch.ones_like(r))


def _row_scale_sparse(M: SparseArg, B: int) -> Tuple[SparseArg, torch.Tensor]:
    """Scale each row of a sparse argument to unit norm (differentiably); returns (scaled, norms (B, rows))."""
    norms, new_vals = [], []
    count = 1 if M.shared else B
    for k in range(count):
        lo, nnz = M.offsets[k], len(M.rows[k])
        v = M.values[lo : lo + nnz]
        rows = torch.as_tensor(M.rows[k], device=v.device)
        a = torch.zeros(M.shape[0], dtype=v.dtype, device=v.device).scatter_reduce(
            0, rows, v.detach().abs(), reduce="amax", include_self=True
        )
        a = torch.where(a > 0, a, torch.ones_like(a))  # scale first: no overflow beyond 1e154
        sq = torch.zeros(M.shape[0], dtype=v.dtype, device=v.device).index_add(0, rows, (v / a[rows]) ** 2)
        r = torch.where(sq > 0, a * sq.sqrt(), torch.ones_like(sq))
        norms.append(r)
        new_vals.append(v / r[rows])
    vals = new_vals[0] if count == 1 else torch.cat(new_vals)
    r = torch.stack(norms)
    if M.shared:
        r = r.expand(B, -1)
    return SparseArg(vals, M.ccols, M.rows, M.offsets, M.shape, M.shared, patterns=M.patterns), r


def _scale_rows(M, v: torch.Tensor, B: int):
    """Rows of ``M`` (dense or sparse) and entries of ``v`` divided by the row norms; returns the norms too."""
    if isinstance(M, SparseArg):
        M, r = _row_scale_sparse(M, B)
    else:
        r = _row_scale_dense(M)
        M = M / r.unsqueeze(-1)
    return M, v / r, r


def normalize_rows(batch: QPBatch) -> Tuple[QPBatch, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Scale the rows of C and A (and d, b) to unit norm; return the batch and the row norms."""
    C, d, rC = (None, None, None) if batch.C is None else _scale_rows(batch.C, batch.d, batch.B)
    A, b, rA = (None, None, None) if batch.A is None else _scale_rows(batch.A, batch.b, batch.B)
    return dataclasses.replace(batch, C=C, d=d, A=A, b=b), rC, rA


def _data(M):
    return M.values if isinstance(M, SparseArg) else M


class dQP_layer(LibdqpAttributes, nn.Module):  # noqa: N801  (the name users know from the reference implementation)
    """A differentiable QP layer: ``min ½zᵀPz + qᵀz  s.t.  Cz ≤ d,  Az = b``.

    Parameters
    ----------
    settings : Settings or dict, optional
        From :func:`dqp.dQP.build_settings` (the layer keeps a copy), or a dict of options (as
        libdqp's settings were). Keyword options may be given instead.
    **options
        Shortcut for ``settings=build_settings(**options)``.

    Attributes
    ----------
    active : ndarray or None
        Active inequality constraints of the *last call*, whichever thread made it, as libdqp has
        them: a NumPy bool array, ``(m,)`` for unbatched inputs, ``(B, m)`` for batched ones. Each
        call's own are on its output: ``out.active`` (a tensor shaped like the outputs).
    info : SolveInfo or None
        Diagnostics of the *last call*, per batch element (status, residuals, active-set
        verification, KKT path, backward residual after ``backward``). Each call's own are on its
        output, ``out.info``: read those when several threads share the layer.
    nBatch, dim, nIneq, nEq, nActive, qp_solver, lin_solver, x_star_np, mu_star_np, nu_star_np, KKT_A_np
        libdqp's read-only attributes, derived from the last call (see :mod:`dqp.layer_compat`).

    Notes
    -----
    The layer can be called from several threads at once: each thread keeps its own solver
    workspaces, thread pool and warm-start memory. It pickles, deep-copies and ``torch.save``-s at
    any time; workspaces, pools and warm starts are not part of its state (they are rebuilt on the
    next call, which starts cold).

    Examples
    --------
    >>> layer = dQP_layer(settings=build_settings(qp_solver="clarabel"))
    >>> z, lam, mu, _, _ = layer(P, q, C, d)          # doctest: +SKIP
    """

    def __init__(self, settings: Optional[Settings] = None, **options):
        super().__init__()
        if settings is not None and options:
            raise SettingsError("Pass either settings=... or keyword options, not both.")
        self.settings = settings_from(settings) if settings is not None else build_settings(**options)
        self._last: Optional[LastCall] = None
        self._local = threading.local()

    # -- state: solver workspaces, thread pools and warm starts are per thread and not saved ---------
    def __getstate__(self) -> dict:
        getter = getattr(super(), "__getstate__", None)  # (a copy: never edit the live __dict__)
        state = dict(getter()) if getter is not None else self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    @property
    def _engines(self) -> dict:
        """This thread's engines by ``(qp_solver, lin_solver)`` (fresh in a forked process)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.engines = os.getpid(), {}
        return local.engines

    # -- solver choice --------------------------------------------------------------------------
    def _choose(self, batch: QPBatch) -> Tuple[str, str, ForwardSolver]:
        """``(qp_solver, lin_solver, solver)`` for this batch: the settings' choice with ``auto`` resolved."""
        from dqp.solvers import available_solvers, get_solver

        s = self.settings
        qp = s.qp_solver
        if qp == "auto":
            on_gpu = batch.device.type != "cpu"
            # by capability: a batched dense engine (the built-in IPM) for dense data on a GPU or large batches
            engines = [n for n in available_solvers() if get_solver(n).batched and get_solver(n).dense]
            qp = engines[0] if (engines and not batch.sparse and (on_gpu or batch.B > 16)) else "clarabel"
            logger.log(
                logging.INFO if s.verbose else logging.DEBUG,
                "qp_solver='auto' picked %r (%s inputs, batch %d, %s)",
                qp,
                "sparse" if batch.sparse else "dense",
                batch.B,
                batch.device,
            )
        solver = get_solver(qp)
        if solver.batched and batch.sparse:
            raise SettingsError(
                f"qp_solver={qp!r} is a batched dense solver; it does not take sparse input. "
                f"Use solve_type='dense' (P.to_dense()) or a sparse qp_solver such as 'clarabel'."
            )
        lin = s.lin_solver
        if solver.batched:
            if lin not in ("auto", "torch"):
                raise SettingsError(
                    f"qp_solver={qp!r} runs on torch tensors and differentiates with the batched "
                    f"torch KKT solver; use lin_solver='torch' or 'auto' (got {lin!r})."
                )
            lin = "torch"
        elif lin == "torch" and batch.sparse:
            raise SettingsError(
                "lin_solver='torch' is a dense batched solver; with solve_type='sparse' pick a "
                "sparse linear solver ('qdldl', 'pardiso', 'scipy_splu') or 'auto'."
            )
        return qp, lin, solver

    def _engine(self, qp: str, lin: str) -> Engine:
        from dqp.solvers import get_solver

        key = (qp, lin)
        if key not in self._engines:
            self._engines[key] = Engine(self.settings, get_solver(qp), lin)
        return self._engines[key]

    def _solve_elementwise(self, batch: QPBatch, qp: str, lin: str, inputs: tuple, needs_grad: bool):
        """The element-wise engine: each element solved by ``qp``, polished and verified, the gradient
        through the reduced KKT system; returns ``(z, lam, mu, info)`` with ``info`` filled per element."""
        engine = self._engine(qp, lin)
        work = Work(engine, batch)
        info = SolveInfo(qp_solver=qp, lin_solver=lin)
        work.info = info
        if needs_grad:
            z, lam, mu = QPFunction.apply(work, *inputs)
        else:
            with torch.no_grad():
                z, lam, mu = run_forward(work)
        rs = work.results
        info.status = [r.status for r in rs]
        info.active = [r.active for r in rs]
        info.n_weakly_active = [r.n_weak for r in rs]
        info.verified = [r.verified for r in rs]
        info.refine_iterations = [r.refine_iterations for r in rs]
        info.primal_residual = [r.residuals[0] for r in rs]
        info.dual_residual = [r.residuals[1] for r in rs]
        info.complementarity = [r.residuals[2] for r in rs]
        info.complementarity_margin = [r.margin for r in rs]
        info.kkt_path = [r.kkt.path if r.kkt is not None else "none" for r in rs]
        info.polish_path = [r.polish_path for r in rs]
        info.factorizations = [r.factorizations for r in rs]
        info.iterations = [r.iterations for r in rs]
        info.solve_time = [r.solve_time for r in rs]
        info.messages = [r.message for r in rs]
        if lin == "auto":
            info.lin_solver = f"auto ({', '.join(sorted(engine.used_linsolvers))})"
            logger.log(
                logging.INFO if self.settings.verbose else logging.DEBUG,
                "lin_solver='auto' picked %s",
                info.lin_solver[6:-1],
            )
        unverified = [i for i, r in enumerate(rs) if r.status == Status.SOLVED and not r.verified]
        if unverified:
            warnings.warn(
                f"dQP: the active set of batch element(s) {unverified[:10]} could not be verified (a degenerate "
                f"problem, e.g. a non-unique solution, or an inaccurate solver): the solver's point is returned "
                f"and the gradient uses the detected active set. See layer.info.verified / messages; a tighter "
                f"eps_abs or another qp_solver may help.",
                UnverifiedSolutionWarning,
                stacklevel=3,
            )
        return z, lam, mu, info

    def _validated(self, P, q, C, d, A, b) -> QPBatch:
        """:func:`dqp.problem.validate` with the settings' options. Off the CPU the value checks' host
        read is left to the solver's first one (``QPBatch.deferred``); on the CPU their NumPy screen
        costs no device round trip and runs at once."""
        s = self.settings
        defer = isinstance(q, torch.Tensor) and q.device.type != "cpu"
        return validate(P, q, C, d, A, b, sparse=s.solve_type == "sparse", check_psd=s.check_PSD, defer_checks=defer)

    # -- call ---------------------------------------------------------------------------------
    @graph_break  # torch.compile: the solve runs eagerly, the model around it compiles
    def forward(
        self,
        P: Optional[torch.Tensor] = None,
        q: Optional[torch.Tensor] = None,
        C: Optional[torch.Tensor] = None,
        d: Optional[torch.Tensor] = None,
        A: Optional[torch.Tensor] = None,
        b: Optional[torch.Tensor] = None,
        *,
        Q: Optional[torch.Tensor] = None,
        G: Optional[torch.Tensor] = None,
        h: Optional[torch.Tensor] = None,
    ) -> QPOutput:
        """Solve the QP(s) and return ``(z, lam, mu, solve_time, forward_time)``.

        Any argument may be batched or shared; a shared argument's gradient is the sum over the
        batch. Outputs have the dtype and device of ``q``. Vectors may also be columns
        (``(k, 1)`` / ``(B, k, 1)``); outputs keep the shapes above. libdqp's keyword names
        ``Q``, ``G``, ``h`` are accepted for ``P``, ``C``, ``d``.

        Parameters
        ----------
        P : Tensor
            ``(n, n)`` or ``(B, n, n)`` symmetric PSD; a torch sparse CSC tensor (or a list of them for a
            batch) with ``solve_type="sparse"``.
        q : Tensor
            ``(n,)`` or ``(B, n)``.
        C, d : Tensor, optional
            Inequalities ``C z ≤ d``: ``(m, n)``/``(B, m, n)`` and ``(m,)``/``(B, m)``.
        A, b : Tensor, optional
            Equalities ``A z = b``: ``(p, n)``/``(B, p, n)`` and ``(p,)``/``(B, p)``.

        Raises
        ------
        InputError
            Malformed data (:class:`ShapeError`, :class:`NonFiniteError`, ...), or one argument
            given under both names (``P`` and ``Q``).
        SolveError
            An element failed (:class:`InfeasibleError`, :class:`UnboundedError`, ...) and
            ``on_failure='raise'``; the message names the batch elements.
        """
        P, q, C, d, A, b = resolve_keywords(P, q, C, d, A, b, Q=Q, G=G, h=h)
        reject_functorch((P, q, C, d, A, b), "dQP_layer")
        s = self.settings
        t_start = time.perf_counter()
        batch = self._validated(P, q, C, d, A, b)
        given = batch
        rC = rA = None
        if s.normalize_constraints:
            batch, rC, rA = normalize_rows(batch)
        qp, lin, solver = self._choose(batch)
        if batch.deferred is not None and not (solver.batched and solver.reads_deferred_checks):
            batch.deferred.check()
        inputs = (_data(batch.P), batch.q, _data(batch.C), batch.d, _data(batch.A), batch.b)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        if solver.batched:
            # the batched engine (built-in IPM): it validates the settings it can honour and fills SolveInfo
            z, lam, mu, info = solver.solve_batch(batch, s)
            info.qp_solver = qp
        else:
            z, lam, mu, info = self._solve_elementwise(batch, qp, lin, inputs, needs_grad)
        if rC is not None:
            mu = mu / rC
        if rA is not None:
            lam = lam / rA
        active = info.active_mask(batch.m)  # (B, m) tensor, on the data's device for the batched engine
        # the last call's state, published by one assignment (concurrent callers and a call that raises
        # never leave layer.info and the libdqp attributes describing different calls)
        last = LastCall(detach_batch(given), z.detach(), lam.detach(), mu.detach(), info=info, active=active)
        object.__setattr__(self, "_last", last)  # a plain attribute (not a parameter, buffer or submodule)
        if s.on_failure == "raise":
            err = error_for_statuses(info.status, qp, info.messages)
            if err is not None:
                raise err
        elif info.failed:
            logger.warning(
                "dQP: %d of %d batch elements failed (statuses in layer.info.status); their "
                "outputs and gradients are zero.",
                len(info.failed),
                batch.B,
            )
        out_active = active  # the call's own, shaped like z
        if not batch.batched and not s.empty_batch:
            z, lam, mu, out_active = z[0], lam[0], mu[0], out_active[0]
        if needs_grad:  # fresh tensors: an in-place edit by the caller (z.unsqueeze_(-1)) leaves the backward's intact
            # (an output without a graph, e.g. the empty lam of a QP without equalities, is fresh already)
            z, lam, mu = (t.clone() if t.requires_grad else t for t in (z, lam, mu))
        solve_time = float(sum(info.solve_time)) if s.time else None
        fwd_time = time.perf_counter() - t_start if s.time else None
        if s.verbose:
            logger.info("dQP: %s", info.summary())
        return QPOutput(z, lam, mu, solve_time, fwd_time, info=info, active=out_active)

    def extra_repr(self) -> str:
        """The solver choice shown by ``repr(layer)``."""
        s = self.settings
        return f"qp_solver={s.qp_solver!r}, lin_solver={s.lin_solver!r}, solve_type={s.solve_type!r}"
