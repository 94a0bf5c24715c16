"""The batched engine behind the layer (``qp_solver="dqp_ipm"``): :class:`~dqp.settings.Settings`
mapped onto :func:`dqp.ipm_layer.solve_qp_batch`'s keywords, and the per-element
:class:`~dqp.result.SolveInfo` filled from its results without extra host reads (the diagnostics
stay tensors until first read: :class:`LazySolveInfo`)."""

from __future__ import annotations

import functools
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import torch

from dqp.errors import Status
from dqp.ipm_layer import _solve
from dqp.linsolve.torch_batched import PATH_NAMES
from dqp.result import SolveInfo
from dqp.solvers.ipm import default_eps

if TYPE_CHECKING:  # pragma: no cover
    from dqp.problem import QPBatch
    from dqp.settings import Settings

Tensor = torch.Tensor
__all__ = ["solve_settings_batch", "ipm_keywords", "LazySolveInfo"]


def ipm_keywords(settings: "Settings", dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    """The :func:`solve_qp_batch` keywords a :class:`~dqp.settings.Settings` asks for.

    * ``eps_abs``/``eps_rel`` → the IPM's stopping tolerance (:meth:`IPMSolver.tolerance_keywords
      <dqp.solvers.ipm.IPMSolver.tolerance_keywords>`); float32 data solved in float32 (off the CPU)
      cannot go below float32's default (1e-5): a tighter request is raised to it, with a warning.
    * ``refine_active`` → the polish on the IPM's active set (False: none); ``max_refine_iter``, when
      changed from its default, → the polish's rounds (otherwise the engine's: 3, 6 for float32).
    * ``qp_solver_keywords`` → any :func:`solve_qp_batch` keyword, over the above.

    Options that only the element-wise engine has (``warm_start_from_previous``, ``omp_parallel``,
    ``n_cpu``, ``dual_available=False``, an explicit ``fallback_solver``, ``fallback_on_unverified``
    with one) give a warning here, naming the option: the batched IPM cannot honour them.
    """
    from dqp.settings import OPTIONS
    from dqp.solvers.ipm import IPMSolver

    s = settings
    _warn_unsupported(s)
    kw: Dict[str, Any] = dict(IPMSolver().tolerance_keywords(s.eps_abs, s.eps_rel))
    native32 = dtype in (torch.float32, torch.float16, torch.bfloat16) and device.type != "cpu"
    if native32 and kw["eps"] < default_eps(torch.float32):
        if (s.eps_abs, s.eps_rel) != (OPTIONS["eps_abs"][0], OPTIONS["eps_rel"][0]):
            warnings.warn(
                f"dQP: eps_abs={s.eps_abs}, eps_rel={s.eps_rel} is below what the float32 interior-point "
                f"method reaches; it stops at {default_eps(torch.float32)} (the polish then makes the "
                f"answer exact on its active set). Pass float64 data for a tighter IPM tolerance.",
                UserWarning,
                stacklevel=4,
            )
        kw["eps"] = None
    kw["polish"] = bool(s.refine_active)
    if s.max_refine_iter != OPTIONS["max_refine_iter"][0]:
        kw["polish_rounds"] = max(int(s.max_refine_iter), 1)
    kw.update(s.qp_solver_keywords or {})
    return kw


@functools.lru_cache(maxsize=1)
def _default_fallback() -> tuple:
    """The default settings' fallback chain (built once: it asks which solvers are installed)."""
    from dqp.settings import build_settings

    return tuple(build_settings().fallback_solver)


def _warn_unsupported(s: "Settings") -> None:
    """Warn about the settings the batched IPM cannot honour (see :func:`ipm_keywords`)."""
    bad: List[str] = []
    if s.warm_start_from_previous:
        bad.append("warm_start_from_previous=True (an interior-point method starts from its own point)")
    if s.omp_parallel is True:
        bad.append("omp_parallel=True (the batch is one solve already)")
    if getattr(s, "time_limit", None) is not None:
        bad.append(
            f"time_limit={s.time_limit} (the batched interior point has no clock: bound it with "
            "qp_solver_keywords={'max_iter': ...}, or pick qp_solver='clarabel')"
        )
    if s.dual_available is False:
        bad.append("dual_available=False (the IPM's duals classify the active set; the polish recomputes them)")
    if s.fallback_solver not in (_default_fallback(), None, ()):
        bad.append(
            f"fallback_solver={s.fallback_solver!r} (failed elements are reported in layer.info.status; "
            "float32 failures are re-solved in float64)"
        )
    if bad:
        warnings.warn(
            "dQP: qp_solver='dqp_ipm' (the batched interior-point engine) ignores "
            + "; ".join(bad)
            + ". These options apply to the element-wise engine (a qpsolvers backend).",
            UserWarning,
            stacklevel=4,
        )


def solve_settings_batch(batch: "QPBatch", settings: "Settings") -> Tuple[Tensor, Tensor, Tensor, SolveInfo]:
    """The batched engine behind the layer (``qp_solver="dqp_ipm"``): solve a validated dense batch
    with the settings it can honour (:func:`ipm_keywords`); returns ``(z, lam, mu, info)`` with
    empty ``(B, 0)`` duals where there are no such constraints and the per-element diagnostics."""
    from dqp.layer import UnverifiedSolutionWarning

    s = settings
    t0 = time.perf_counter()
    kw = ipm_keywords(s, batch.q.dtype, batch.q.device)
    do_polish = kw.pop("polish", True)
    z, lam, mu, status, active, kkt, feasible = _solve(
        batch.P,
        batch.q,
        batch.C,
        batch.d,
        batch.A,
        batch.b,
        kw.pop("eps", None),
        kw.pop("max_iter", 100),
        do_polish,
        kw,
        checks=batch.deferred,
        broadcast=False,
    )
    diag = dict(
        verified=kkt.polished & feasible,
        iterations=kkt.iterations,
        kkt_path=lambda path=kkt.path: [PATH_NAMES[i] for i in path.tolist()],
    )
    elapsed = time.perf_counter() - t0
    B = batch.B
    if lam is None:
        lam = batch.q.new_zeros(B, 0)
    if mu is None:
        mu = batch.q.new_zeros(B, 0)
    if active is None:
        active = torch.zeros(B, 0, dtype=torch.bool, device=z.device)
    # the one host read of the call (the statuses decide raise/mask, ``verified`` the warning); the
    # other diagnostics stay tensors until read (LazySolveInfo)
    codes, ver = torch.stack([status, diag["verified"].to(status.dtype)]).tolist()
    st = [Status(x) for x in codes] if any(codes) else [Status.SOLVED] * B
    verified = [v != 0 for v in ver]
    zd, lamd, mud = z.detach(), lam.detach(), mu.detach()
    residuals = _once(lambda: _torch_residuals(batch, zd, lamd, mud))
    margins = _once(lambda: _torch_margins(batch, zd, mud, active, s.eps_active))
    info = LazySolveInfo(
        dict(
            active=lambda: list(active.cpu().numpy()),
            kkt_path=diag["kkt_path"],
            iterations=lambda: diag["iterations"].tolist(),
            primal_residual=lambda: residuals()[0],
            dual_residual=lambda: residuals()[1],
            complementarity=lambda: residuals()[2],
            n_weakly_active=lambda: margins()[0],
            complementarity_margin=lambda: margins()[1],
        ),
        active_mask=active,
        qp_solver="dqp_ipm",
        lin_solver="torch",
        status=st,
        verified=verified,
        solve_time=[elapsed / B] * B,
        messages=[""] * B,
    )
    if do_polish:
        unverified = [i for i, v in enumerate(verified) if st[i] == Status.SOLVED and not v]
        for i in unverified:
            info.messages[i] = (
                "the polished point was rejected (active set not confirmed): returned the "
                "interior-point solution; gradients use its active set"
            )
        if unverified:
            warnings.warn(
                f"dQP: the active set of batch element(s) {unverified[:10]} could not be verified by the "
                f"polish of the interior-point solution (a degenerate problem): the IPM's point is returned "
                f"and the gradient uses its active set. See layer.info.verified / messages.",
                UnverifiedSolutionWarning,
                stacklevel=4,
            )
    return z, lam, mu, info


def _once(fn):
    """``fn`` evaluated at the first call, its value kept."""
    box: list = []

    def get():
        if not box:
            box.append(fn())
        return box[0]

    return get


class LazySolveInfo(SolveInfo):
    """A :class:`SolveInfo` whose per-element lists are computed from the engine's tensors when
    first read (each costs a host synchronization and some work: nothing is spent on diagnostics
    nobody reads). Pickles and copies as a plain SolveInfo (every list materialized).

    Parameters
    ----------
    fills : dict of str to callable
        Field name → function returning that field's list.
    active_mask : Tensor
        The (B, m) active mask itself (:meth:`active_mask`).
    **fields
        The fields known now.
    """

    def __init__(self, fills: Dict[str, Any], active_mask: Tensor, **fields):
        super().__init__(**fields)
        for k in fills:
            self.__dict__.pop(k, None)
        self.__dict__["_fills"] = dict(fills)
        self.__dict__["_active_mask"] = active_mask

    def __getattr__(self, name: str):
        fills = self.__dict__.get("_fills", {})
        fn = fills.get(name)
        if fn is not None:
            # (two threads reading it at once both compute the same value: no lock, nothing lost)
            value = fn()
            self.__dict__[name] = value
            fills.pop(name, None)
            return value
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def active_mask(self, m: int) -> Tensor:
        """The (B, m) active mask as one tensor, on the data's device (no host copy)."""
        return self._active_mask

    def __getstate__(self):
        for k in list(self.__dict__.get("_fills", {})):
            getattr(self, k)
        st = dict(self.__dict__)
        st.pop("_fills", None)
        st["_active_mask"] = st["_active_mask"].detach().cpu()
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self.__dict__["_fills"] = {}


def _torch_margins(batch: "QPBatch", z, mu, active, eps: float):
    """Per element: weakly active rows (at the bound with a ~zero multiplier, the core path's rule)
    and the strict-complementarity margin ``min(min_J μ, min_¬J slack)`` (lists)."""
    B = batch.B
    if batch.C is None or active is None:
        return [0] * B, [float("inf")] * B
    C, d = batch.C.detach(), batch.d.detach()
    Cz = (C @ z.unsqueeze(-1)).squeeze(-1)
    slack = d - Cz
    size = torch.maximum(d.abs(), (C.abs() @ z.abs().unsqueeze(-1)).squeeze(-1))
    at_bound = (slack <= eps * size.clamp_min(torch.finfo(z.dtype).tiny)) & torch.isfinite(slack)
    zero_dual = mu <= eps * mu.amax(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    weak = (at_bound & zero_dual).sum(-1)
    inf = torch.full_like(slack, float("inf"))
    margin = torch.minimum(torch.where(active, mu, inf).amin(-1), torch.where(active, inf, slack).amin(-1))
    return weak.tolist(), margin.tolist()


def _torch_residuals(batch: "QPBatch", z, lam, mu):
    """Residuals of a dense batch computed in torch (lists of floats)."""
    P = batch.P.detach()
    r_dual = (P @ z.unsqueeze(-1)).squeeze(-1) + batch.q.detach()
    r_prim = torch.zeros(batch.B, dtype=z.dtype, device=z.device)
    comp = torch.zeros_like(r_prim)
    if batch.A is not None:
        A = batch.A.detach()
        r_dual = r_dual + (A.transpose(-1, -2) @ lam.unsqueeze(-1)).squeeze(-1)
        r_prim = (A @ z.unsqueeze(-1)).squeeze(-1).sub(batch.b.detach()).abs().amax(-1)
    if batch.C is not None:
        C = batch.C.detach()
        r_dual = r_dual + (C.transpose(-1, -2) @ mu.unsqueeze(-1)).squeeze(-1)
        slack = batch.d.detach() - (C @ z.unsqueeze(-1)).squeeze(-1)
        r_prim = torch.maximum(r_prim, (-slack).clamp_min(0).amax(-1))
        comp = torch.where(torch.isfinite(slack), mu * slack, torch.zeros_like(slack)).abs().amax(-1)  # d_i = +inf
    return r_prim.tolist(), r_dual.abs().amax(-1).tolist(), comp.tolist()
