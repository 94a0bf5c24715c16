"""The Newton systems of the batched IPM: the primal and the dual elimination, and the choice of form."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from dqp.linsolve.blocked import tri_inverse
from dqp.linsolve.cholesky import CholeskyFactor, CholeskyOptions, cholesky, cholesky_inplace, mv, potrs_inplace, tmv
from dqp.solvers.ipm.options import DEFAULT_OPTIONS, IPMOptions

from dqp.errors import SettingsError

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


# Newton-system solvers
# --------------------------------------------------------------------------------------------


class _PrimalNewton:
    """``H = P + CᵀWC + δI`` (n×n Cholesky), equalities by the Schur complement ``A H⁻¹ Aᵀ``."""

    form = "primal"
    #: Keep the factorization of the first call when m == 0 (it does not change across iterations);
    #: off in captured code (see ipm_solve's _make_body)
    cache_const = True

    def __init__(self, P, C, A, B, n, m, p, reg_p, reg_d, lin: CholeskyOptions = DEFAULT_OPTIONS.linalg):
        self.lin = lin
        self.P, self.C, self.A = P, C, A
        self.B, self.n, self.m, self.p = B, n, m, p
        self.reg_p, self.reg_d = reg_p, reg_d
        self.reg_fail = 1e-15 if P.dtype == torch.float64 else 1e-7
        self._const = None  # cached factorization when m == 0

    def factor(self, winv: Optional[Tensor], delta: Tensor, running: Optional[Tensor] = None) -> Tensor:
        """Factorize for W = 1/winv (B, m); returns per-instance ok flags (B,). (``running``: as
        :meth:`_DualNewton.factor`; unused here.)"""
        if self.m == 0 and self.cache_const and self._const is not None:
            self.LH, self.HiAt, self.LS = self._const
            return self._const_ok
        P, C, A = self.P, self.C, self.A
        H = P.expand(self.B, self.n, self.n)
        if self.m:
            w = 1.0 / winv
            H = H + torch.matmul(C.transpose(-1, -2) * w.unsqueeze(-2), C)
        else:
            H = H.clone()
        Hd = torch.diagonal(H, dim1=-2, dim2=-1)
        # static δ = reg_p·max|P|; after a failed factorization (delta > 1) also relative to diag(H),
        # whose scale grows with W = μ/s
        rel = torch.where(delta > 1, delta * self.reg_fail * Hd.abs().amax(-1), torch.zeros_like(delta))
        Hd.add_((delta * self.reg_p + rel).unsqueeze(-1))
        self.LH, info = cholesky(H, self.lin)
        ok = info == 0
        if self.p:
            self.HiAt = self.LH.solve(A.transpose(-1, -2).expand(self.B, self.n, self.p))
            S = torch.matmul(A, self.HiAt)
            Sd = torch.diagonal(S, dim1=-2, dim2=-1)
            Sd.add_((delta * self.reg_d * Sd.abs().amax(-1).clamp(min=1.0)).unsqueeze(-1))
            self.LS, info2 = cholesky(S, self.lin)
            ok = ok & (info2 == 0)
        else:
            self.HiAt = self.LS = None
        if self.m == 0 and self.cache_const:
            self._const = (self.LH, self.HiAt, self.LS)
            self._const_ok = ok
        return ok

    def solve(self, a: Tensor, bb: Optional[Tensor], c: Optional[Tensor], winv: Optional[Tensor]):
        r = a
        if self.m:
            wc = c / winv
            r = r + tmv(self.C, wc, self.lin)
        v = self.LH.solve(r)
        dlam = None
        if self.p:
            dlam = self.LS.solve(mv(self.A, v, self.lin) - bb)
            v = v - torch.matmul(self.HiAt, dlam.unsqueeze(-1)).squeeze(-1)
        dmu = Cv = None
        if self.m:
            Cv = mv(self.C, v, self.lin)
            dmu = (Cv - c) / winv
        return v, dlam, dmu, Cv

    def direction(self, a, bb, c, winv, need_dz: bool, refine: int):
        """Newton direction ``(Δz, Δλ, Δμ, CΔz)``, refined on the unreduced system."""
        dz, dl, dm, Cdz = self.solve(a, bb, c, winv)
        for _ in range(refine):
            e1 = a - mv(self.P, dz, self.lin)
            e2 = e3 = None
            if self.m:
                e1 = e1 - tmv(self.C, dm, self.lin)
                e3 = c - Cdz + winv * dm
            if self.p:
                e1 = e1 - tmv(self.A, dl, self.lin)
                e2 = bb - mv(self.A, dz, self.lin)
            cz, cl, cm, Ccz = self.solve(e1, e2, e3, winv)
            dz = dz + cz
            if self.m:
                dm, Cdz = dm + cm, Cdz + Ccz
            if self.p:
                dl = dl + cl
        return dz, dl, dm, Cdz


def _setup_by_inverse(LP: CholeskyFactor, k: int, setup_products: str) -> bool:
    """Whether the dual form's one-time products go through ``L⁻¹`` (:attr:`IPMOptions.setup_products`)."""
    if setup_products == "solve" or LP.dim() != 3 or LP.device.type != "cuda":
        return False
    return setup_products == "inverse" or (k >= LP.shape[-1] and LP.inverse is None and LP.block_inverses is None)


class _DualNewton:
    """``P ≻ 0``: ``S = Ā P⁻¹ Āᵀ + diag(0, W⁻¹) + δ_d I`` with ``Ā = [A; C]``; ``Ā P⁻¹ Āᵀ`` formed once."""

    form = "dual"
    cache_const = True  # as _PrimalNewton.cache_const

    def __init__(
        self,
        LP: CholeskyFactor,
        P,
        C,
        A,
        B,
        n,
        m,
        p,
        reg_d,
        pre: Optional[Dict[str, Tensor]] = None,
        q: Optional[Tensor] = None,
        options: IPMOptions = DEFAULT_OPTIONS,
    ):
        """``LP``: P's Cholesky factor. ``pre``: the tensors that a solver for the same data computed
        (``Abar``, ``PiAbt``, ``M``, ``Md``, and ``_Piq``, ``_g`` of :meth:`prime` for ``q``), used
        instead of computing them; ``Abar`` may be left out where it is C or A itself
        (:func:`_init_graphed`)."""
        self.LP = LP
        self.lin = options.linalg
        self.B, self.n, self.m, self.p = B, n, m, p
        self.reg_d = reg_d
        k = m + p
        self.k = k
        self._point = None
        self._const = None
        self._a = None
        if pre is not None:
            self.Abar = pre.get("Abar", A if C is None else C)
            self.PiAbt, self.M, self.Md = pre["PiAbt"], pre["M"], pre["Md"]
            if "_Piq" in pre:
                self._Piq, self._g, self._point = pre["_Piq"], pre["_g"], (q,)
            return
        self.Abar = (
            A
            if C is None
            else (
                C
                if A is None
                else torch.cat(
                    [
                        A.expand(B, p, n) if (A.dim() == 3 or C.dim() == 3) else A,
                        C.expand(B, m, n) if (A.dim() == 3 or C.dim() == 3) else C,
                    ],
                    dim=-2,
                )
            )
        )
        Abt = self.Abar.transpose(-1, -2)
        self.M = None
        by_inverse = _setup_by_inverse(LP, k, options.setup_products)
        if LP.dim() == 2 and Abt.dim() == 2:
            self.PiAbt = LP.solve(Abt.unsqueeze(0))[0]  # shared (n, k)
        elif by_inverse:
            X = tri_inverse(LP.L)  # L⁻¹, mostly matrix products
            LP.inverse = X  # kept: later solves with L (P⁻¹q, the backward's) are products
            W = torch.matmul(X, Abt)  # L⁻¹Āᵀ
            self.PiAbt = torch.matmul(X.mT, W)
            self.M = torch.matmul(W.mT, W)  # symmetric (to rounding)
        else:
            self.PiAbt = LP.solve(Abt.expand(B, n, k))
        if self.M is None:
            self.M = torch.matmul(self.Abar, self.PiAbt)  # (k, k) or (B, k, k)
        self.Md = torch.diagonal(self.M, dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1e-30)

    def factor(self, winv: Optional[Tensor], delta: Tensor, running: Optional[Tensor] = None) -> Tensor:
        """Factorize S for W = 1/winv; ``running`` (B,) bool, optional: only those elements' factors
        are used (the CPU path then skips the others). Returns per-instance ok flags (B,)."""
        if self.m == 0 and self.cache_const and self._const is not None:
            self.LS = self._const
            return self._const_ok
        inplace = (
            self.m > 0
            and self.lin.cpu_fast_paths
            and self.M.device.type == "cpu"
            and self.M.dtype in (torch.float64, torch.float32)
        )
        if inplace:
            # CPU: one buffer for every iteration, factorized in place (cholesky_inplace)
            if getattr(self, "_Sbuf", None) is None:
                self._Sbuf = torch.empty(self.B, self.k, self.k, dtype=self.M.dtype)
            S = self._Sbuf
            S.copy_(self.M.expand(self.B, self.k, self.k))
        else:
            S = self.M.expand(self.B, self.k, self.k).clone()
        Sd = torch.diagonal(S, dim1=-2, dim2=-1)
        Sd.add_((delta * self.reg_d * self.Md).unsqueeze(-1))
        if self.m:
            Sd[:, self.p :].add_(winv)
        self._Sdiag = Sd - torch.diagonal(self.M, dim1=-2, dim2=-1)  # what was added to M
        rows = None if running is None or not inplace else torch.nonzero(running).flatten().tolist()
        self.LS, info = cholesky_inplace(S, self.lin, rows) if inplace else cholesky(S, self.lin, overwrite=True)
        self._lapack_rows = rows if inplace else False  # solves with LS go through _solve_S
        ok = info == 0
        if self.m == 0 and self.cache_const:
            self._const, self._const_ok = self.LS, ok
        return ok

    def _prepare(self, a):
        # predictor and corrector share a = −r_d: P⁻¹a and Ā P⁻¹a are computed once per iteration
        if self._a is not a:
            self._a = a
            self._t = self.LP.solve(a)
            self._At = mv(self.Abar, self._t, self.lin)

    def _solve_S(self, rhs: Tensor) -> Tensor:
        """``S⁻¹ rhs`` with the current factorization (LAPACK per matrix on CPU, else batched)."""
        rows = getattr(self, "_lapack_rows", False)
        if rows is not False:
            return potrs_inplace(self.LS.L, rhs, rows)
        return self.LS.solve(rhs)

    def _dy(self, bb, c, refine, need_My: bool = True):
        parts = [x for x in (bb, c) if x is not None]
        rhs = self._At - (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        dy = self._solve_S(rhs)
        if not need_My and not refine:
            return dy, None
        My = mv(self.M, dy, self.lin)
        for _ in range(refine):
            # refinement of the Schur system S Δy = rhs (k-space, cheap)
            dd = self._solve_S(rhs - My - self._Sdiag * dy)
            dy = dy + dd
            My = My + mv(self.M, dd, self.lin)
        return dy, My

    def solve(self, a: Tensor, bb: Optional[Tensor], c: Optional[Tensor], winv: Optional[Tensor]):
        self._prepare(a)
        dy, _ = self._dy(bb, c, 0, need_My=False)
        dz = self._t - mv(self.PiAbt, dy, self.lin)
        dlam = dy[:, : self.p] if self.p else None
        dmu = dy[:, self.p :] if self.m else None
        return dz, dlam, dmu, None

    def prime(self, q):
        """Precompute ``P⁻¹q`` and ``ĀP⁻¹q`` for :meth:`set_point` (outside any CUDA graph)."""
        self._Piq = self.LP.solve(q)
        self._g = mv(self.Abar, self._Piq, self.lin)
        self._point = (q,)

    def set_point(self, q, z, y, Abar_z, My=None):
        """Current iterate, so that ``a = −(Pz + q + Āᵀy)`` is used through the identities
        ``P⁻¹a = −z − P⁻¹q − P⁻¹Āᵀy`` and ``ĀP⁻¹a = −Āz − ĀP⁻¹q − My`` (no triangular solve with
        P per iteration). ``My``: ``M y`` when the caller tracks it (else one product here)."""
        if self._point is None or self._point[0] is not q:
            self.prime(q)
        self._z, self._y = z, y
        self._pending = Abar_z
        self._My_given = My

    def direction(self, a, bb, c, winv, need_dz: bool, refine: int):
        """Newton direction ``(Δz or None, Δλ, Δμ, CΔz)``: ``CΔz = C P⁻¹a − (M Δy)_C`` needs no
        n-space product, so the predictor never forms Δz."""
        if getattr(self, "_pending", None) is not None:
            # a = −r_d at the point given to set_point: ĀP⁻¹a from k-space products only
            self._a = a
            My0 = getattr(self, "_My_given", None)
            self.My_point = My0 if My0 is not None else mv(self.M, self._y, self.lin)
            self._At = -self._pending - self._g - self.My_point
            self._t = None
            self._pending = None
        self._prepare(a)
        # the predictor (need_dz False) only needs CΔz, which the Schur system gives without a pass
        # over M: S Δy = rhs ⇒ (M Δy)_C = rhs_C − diag(S − M)_C Δμ, so CΔz = c + diag(S − M)_C Δμ
        # (exact up to the solve's residual; the corrector, which moves the iterate, uses M Δy)
        # (float64 only: in float32 the identity's error costs iterations — measured on qpth's generator,
        # n = m = 100, B = 128: max iterations 14 → 35)
        dy, My = self._dy(bb, c, refine, need_My=need_dz or not self.m or self.M.dtype != torch.float64)
        if not need_dz:
            dz = None
        elif self._t is None:
            dz = -self._z - self._Piq - mv(self.PiAbt, self._y + dy, self.lin)
        else:
            dz = self._t - mv(self.PiAbt, dy, self.lin)
        dlam = dy[:, : self.p] if self.p else None
        dmu = Cdz = None
        # for a caller that tracks products across iterations: M Δy and Ā Δz of this direction
        # (no kernel otherwise: on the GPU this runs inside the captured iteration)
        self.last_My = My
        self.last_Abdz = None if (My is None or not getattr(self, "tracking", False)) else self._At - My
        if self.m:
            dmu = dy[:, self.p :]
            Cdz = (self._At[:, self.p :] - My[:, self.p :]) if My is not None else c + self._Sdiag[:, self.p :] * dmu
        return dz, dlam, dmu, Cdz


def factor_ok(LP: CholeskyFactor, info: Tensor, P: Tensor) -> Tensor:
    """Per element: the Cholesky factor of P succeeded and P is well conditioned enough for the
    dual form (an estimate from the factor's diagonal: min pivot² ≥ limit · max |P_ii|)."""
    diag = LP.diagonal()
    dmin = diag.abs().amin(-1) ** 2
    dmax = torch.diagonal(P, dim1=-2, dim2=-1).abs().amax(-1).clamp(min=torch.finfo(P.dtype).tiny)
    limit = 1e-12 if P.dtype == torch.float64 else 1e-4
    return (info == 0) & torch.isfinite(diag).all(-1) & (dmin >= limit * dmax)


def form_by_cost(form, P, B, n, m, p, est_iters=15) -> str:
    """The form to try, by the requested one and (``"auto"``) the estimated flops: ``"dual"`` still
    needs P's factor to succeed (:func:`_choose_form`)."""
    if form not in ("auto", "primal", "dual"):
        raise SettingsError(f"ipm_solve: form must be 'auto', 'primal' or 'dual', got {form!r}.")
    k = m + p
    if form == "dual" and k == 0:
        raise SettingsError(
            "ipm_solve: form='dual' eliminates the constraints, and this problem has none; use form='auto' or 'primal'."
        )
    if form != "auto":
        return form
    nb = 1 if P.dim() == 2 else B
    cost_primal = est_iters * B * (2.0 * m * n * n + n**3 / 3 + 2.0 * p * n * n + p**3 / 3)
    cost_dual = nb * (n**3 / 3 + 2.0 * n * n * k + 2.0 * n * k * k) + est_iters * B * (k**3 / 3 + 4.0 * n * k)
    return "primal" if cost_dual >= cost_primal or k == 0 else "dual"


def _choose_form(form, P, B, n, m, p, lin: CholeskyOptions):
    """Return (form, LP) — LP the Cholesky factor of P when the dual form is used."""
    if form_by_cost(form, P, B, n, m, p) == "primal":
        return "primal", None
    LP, info = cholesky(P, lin)
    if not bool(factor_ok(LP, info, P).all()):  # (one host sync, outside the loop)
        if form == "dual":
            raise SettingsError(
                "ipm_solve: form='dual' needs a positive definite, well-conditioned P; use form='primal' or 'auto'."
            )
        return "primal", None
    return "dual", LP


def dual_factors(
    P: Tensor, C: Optional[Tensor], A: Optional[Tensor], options: IPMOptions = DEFAULT_OPTIONS
) -> Tuple[Dict[str, Any], Tensor]:
    """What the dual form hands the polish and the backward, as the IPM forms it: ``L`` = chol(P)
    (a :class:`CholeskyFactor`), ``PiAbt`` = P⁻¹[A; C]ᵀ and ``M`` = [A; C]P⁻¹[A; C]ᵀ for a batched
    P (B, n, n); computed without a host sync. Also returns where chol(P) passed :func:`factor_ok`."""
    L, info = cholesky(P, options.linalg)
    m, p = (C.shape[-2] if C is not None else 0), (A.shape[-2] if A is not None else 0)
    nt = _DualNewton(L, P, C, A, P.shape[0], P.shape[-1], m, p, 0.0, options=options)
    return dict(L=nt.LP, PiAbt=nt.PiAbt, M=nt.M), factor_ok(L, info, P)


# --------------------------------------------------------------------------------------------


def _regularization(dtype: torch.dtype) -> Tuple[float, float]:
    """Primal and dual regularization of the Newton systems (relative, see the solvers)."""
    return (1e-10, 1e-12) if dtype == torch.float64 else (1e-7, 1e-7)
