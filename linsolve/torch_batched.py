"""Batched masked reduced-KKT solves in torch, on any device.

For a batch of problems with active masks ``a ∈ {0,1}^m`` the reduced KKT matrix is kept the
same size for every element:

    K = [[P,      Aᵀ,  (aC)ᵀ      ],
         [A,      0,   0          ],
         [aC,     0,   −diag(1−a) ]]      (aC = diag(a) C)

so an inactive row ``i`` reads ``−y_μi = g_μi`` and decouples. Write ``Ā = [A; aC]`` and
``D = diag(0, 1−a)``. :class:`BatchedKKT` factorizes ``K`` for the whole batch with Cholesky only,
choosing per element the first path that works:

0. ``"cholesky"`` — P ≻ 0: Cholesky of P and of the Schur complement ``S = Ā P⁻¹ Āᵀ + D``
   (SPD when the active rows ``[A; C_J]`` have full row rank).
1. ``"augmented"`` — P only PSD (an LP, a QP with a flat direction): the equivalent system with
   ``H = P + ρ ĀᵀĀ`` in place of P and right-hand side ``g_z + ρ Āᵀ g_y`` (exact, not a
   regularization: it adds ρĀᵀ times the second block row). H ≻ 0 whenever K is nonsingular.
2. ``"minimum-norm"`` — K singular (dependent active rows, a flat direction not fixed by the
   active constraints): the minimum-norm least-squares solution ``K⁺g`` from a symmetric
   eigendecomposition of the dense K of those elements only (they are rare; a regularized
   quasi-definite solve with iterative refinement was tried first and rejected: on an
   inconsistent right-hand side, which the backward pass produces with dependent rows, the
   refinement diverges like 1/δ). Exact when K is nonsingular, minimum-norm when singular.

Paths 0 and 1 end with ``refine`` steps of iterative refinement against the true K, so the
answer's residual is at round-off level. :attr:`BatchedKKT.path` records, per element, which
path ran (0, 1, 2). A shared P (2-D, or a batch view with stride 0 from ``expand``) is
factorized once for the batch.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Optional, Tuple

import torch

from dqp.errors import ShapeError
from dqp.linsolve.base import LinearSolver, register_linsolver
from dqp.linsolve.cholesky import DEFAULT_OPTIONS, CholeskyFactor, CholeskyOptions, cholesky, cholesky_inplace, mv, tmv

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

__all__ = ["BatchedKKT", "TorchBatchedSolver", "PATH_NAMES"]

PATH_NAMES = ("cholesky", "augmented", "minimum-norm")


def _shared(M: Optional[Tensor]) -> Optional[Tensor]:
    """Return the 2-D matrix if ``M`` is 2-D or a stride-0 batch view of one, else None."""
    if M is None:
        return None
    if M.dim() == 2:
        return M
    if M.shape[0] == 1 or M.stride(0) == 0:
        return M[0]
    return None


def _masked_rows(
    P: Tensor, A: Optional[Tensor], C: Optional[Tensor], active: Optional[Tensor], B: int, mask: bool = True
):
    """``(a, Abar, D)`` of the masked reduced system (module docstring): the active mask as P's
    dtype (None without C), ``Ā = [A; aC]`` (B, k, n) (None without rows) and ``D = diag(0, 1 − a)``
    as (B, k). ``mask=False``: ``Abar = [A; C]`` unmasked, and C or A itself (not a copy) where it
    is the only block."""
    n, dtype = P.shape[-1], P.dtype
    p = A.shape[-2] if A is not None else 0
    m = C.shape[-2] if C is not None else 0
    blocks = []
    a = None
    if A is not None:
        blocks.append(A.expand(B, p, n))
    if C is not None:
        a = active.to(dtype)
        blocks.append(C.expand(B, m, n) * a.unsqueeze(-1) if mask else C)
    if not mask and len(blocks) == 1:
        Abar = A if C is None else C
    else:
        Abar = torch.cat([t.expand(B, t.shape[-2], n) for t in blocks], dim=-2) if blocks else None
        # (a buffer of its own: absorb() writes it)
    D = torch.zeros(B, p + m, dtype=dtype, device=P.device)
    if m:
        D[:, p:] = 1.0 - a
    return a, Abar, D


class BatchedKKT:
    """Factorization of a batch of masked reduced KKT matrices (see the module docstring).

    Parameters
    ----------
    P : (B, n, n) or (n, n)
    A : (B, p, n), (p, n) or None
    C : (B, m, n), (m, n) or None
    active : (B, m) bool or None
        Active inequality rows (required when C is given).
    batch : int, optional
        Batch size when every argument is shared.
    refine : int
        Iterative-refinement steps against the true K after every solve (default 1).
    factors : dict, optional
        ``L`` (Cholesky factor of P), ``PiAbt`` = P⁻¹[A; C]ᵀ and ``M`` = [A; C]P⁻¹[A; C]ᵀ, as
        computed by the IPM's dual form (:attr:`dqp.solvers.ipm.IPMResult.factors`): the
        Cholesky path then only masks them and factorizes the Schur complement.
    fallback : bool
        Default True: elements whose Cholesky path fails take the augmented or minimum-norm path
        (which reads the flags on the host). False: the Cholesky path only, without a host
        synchronization (capturable in a CUDA graph); ``ok`` says where it failed.
    options : CholeskyOptions
        How the Cholesky factors are computed (:mod:`dqp.linsolve.cholesky`).

    Attributes
    ----------
    path : (B,) int64 tensor, 0 = cholesky, 1 = augmented, 2 = minimum-norm (see PATH_NAMES).
    negative_curvature : (B,) bool tensor or None
        Elements whose K has more than k = p + m negative eigenvalues, which proves that P is not
        positive semidefinite (P ⪰ 0 makes the quadratic form of K nonnegative on the n-dimensional
        subspace of vectors (x, 0), so K has at most k negative eigenvalues). Read from the
        minimum-norm path's eigendecomposition, which is where such an element ends: a negative
        direction of P in the null space of the active rows fails both Cholesky paths. None where
        that path did not run (nothing seen, no host synchronization).
    """

    negative_curvature: Optional[Tensor] = None

    def __init__(
        self,
        P: Tensor,
        A: Optional[Tensor],
        C: Optional[Tensor],
        active: Optional[Tensor],
        *,
        batch: Optional[int] = None,
        refine: int = 1,
        factors: Optional[dict] = None,
        fallback: bool = True,
        options: CholeskyOptions = DEFAULT_OPTIONS,
    ):
        self.lin = options
        if A is not None and A.shape[-2] == 0:
            A = None
        if C is not None and C.shape[-2] == 0:
            C = None
        if C is not None and active is None:
            raise ShapeError("BatchedKKT: C was given without the active mask (B, m).")
        sizes = {t.shape[0] for t, nd in ((P, 3), (A, 3), (C, 3)) if t is not None and t.dim() == nd}
        if active is not None and C is not None:
            sizes.add(active.shape[0])
        if batch is not None:
            sizes.add(batch)
        if len(sizes) > 1:
            raise ShapeError(f"BatchedKKT: inconsistent batch sizes {sorted(sizes)}.")
        B = sizes.pop() if sizes else 1
        n = P.shape[-1]
        dtype, device = P.dtype, P.device
        self.B, self.n = B, n
        eps = torch.finfo(dtype).eps
        self._eps = eps
        self.p = A.shape[-2] if A is not None else 0
        self.m = C.shape[-2] if C is not None else 0
        self.k = self.p + self.m
        self.refine = int(refine)
        self.P = P
        self.A = A
        self.C = C
        self._rm = None  # (a row mask kept as a vector: from_schur_factor)
        self.a, self.Abar, self.D = _masked_rows(P, A, C, active, B)

        # --- attempt 0: plain Cholesky (P shared → one factorization)
        rho = torch.zeros(B, dtype=dtype, device=device)
        self.path = torch.zeros(B, dtype=torch.int64, device=device)
        # precomputed factors (the IPM's): kept for subset(), which re-masks them instead of
        # factorizing P again; _L_fresh: L was computed here (else it is the caller's factor of P)
        self._factors = factors if factors is not None and self.k else None
        self._L_fresh = False
        self._augmented = False
        ok = self._factor_pre(factors) if self._factors is not None else self._factor(rho)
        # fallback=False: the Cholesky path only, no host sync (the caller reads self.ok)
        if fallback and not bool(ok.all()):
            # --- attempt 1: augmented H = P + ρĀᵀĀ for the elements that failed
            Pmax = P.abs().flatten(-2).amax(-1).expand(B)
            if self.k:
                amax = (self.Abar**2).sum(-1).amax(-1)
            else:
                amax = torch.ones(B, dtype=dtype, device=device)
            base = torch.where(Pmax > 0, Pmax, torch.ones_like(Pmax)) / torch.where(
                amax > 0, amax, torch.ones_like(amax)
            )
            bad = ~ok
            self._augmented = True  # some element has ρ > 0 (see _solve_reg)
            rho = torch.where(bad, base, rho)
            self.path = torch.where(bad, torch.ones_like(self.path), self.path)
            ok = self._factor(rho)
            if not bool(ok.all()):
                # --- attempt 2: K singular → minimum-norm solve by a symmetric eigendecomposition
                self._setup_pinv(~ok)
                ok = torch.ones_like(ok)
        self.ok = ok
        self.rho = rho
        if not hasattr(self, "_pinv_idx"):
            self._pinv_idx = None

    @classmethod
    def from_schur_factor(
        cls,
        P: Tensor,
        A: Optional[Tensor],
        C: Optional[Tensor],
        active: Optional[Tensor],
        L: CholeskyFactor,
        PiAbt: Tensor,
        LS: Tensor,
        ok: Tensor,
        *,
        refine: int = 1,
        options: CholeskyOptions = DEFAULT_OPTIONS,
    ) -> "BatchedKKT":
        """The Cholesky path from factors computed elsewhere: ``L`` = chol(P), ``PiAbt`` =
        P⁻¹[A; C]ᵀ and ``LS`` the lower Cholesky factor of the Schur complement S (the fused
        kernel's polish, :mod:`dqp.solvers.fused`); ``ok`` (B,) where LS passed the pivot test.
        Device work only (it may run inside a CUDA graph).

        The row mask stays a vector: ``Ā = diag(r)[A; C]`` and ``H⁻¹Āᵀ = P⁻¹[A; C]ᵀ diag(r)``
        (r = 1 on the rows in the system) multiply vectors as ``r ⊙ ([A; C] x)`` and
        ``P⁻¹[A; C]ᵀ (r ⊙ y)`` — the same numbers (r is 0 or 1) without two passes over (B, k, n)
        matrices; the masked matrices are formed only where a method needs them (:meth:`_materialize`)."""
        B = (active if active is not None else LS).shape[0]
        a, rows, D = _masked_rows(P, A, C, active, B, mask=False)
        zeros = torch.zeros(B, dtype=P.dtype, device=P.device)
        if not isinstance(LS, CholeskyFactor):
            LS = CholeskyFactor(LS, options=options)
        self = cls.from_state(
            dict(
                P=P,
                A=A,
                C=C,
                a=a,
                Abar=rows,
                D=D,
                L=L,
                HiAbt=PiAbt,
                LS=LS,
                ok=ok,
                path=zeros.to(torch.int64),
                rho=zeros,
            ),
            refine=refine,
            options=options,
        )
        self._rm = 1.0 - D
        return self

    def _materialize(self) -> None:
        """Apply a row mask kept as a vector (:meth:`from_schur_factor`) to Ā and H⁻¹Āᵀ themselves."""
        r = self._rm
        if r is None:
            return
        self.Abar = self.Abar.expand(self.B, self.k, self.n) * r.unsqueeze(-1)
        self.HiAbt = self.HiAbt * r.unsqueeze(-2)
        self._rm = None

    def _Av(self, x: Tensor) -> Tensor:
        """``Ā x``."""
        y = mv(self.Abar, x, self.lin)
        return y if self._rm is None else y * self._rm

    def _Atv(self, y: Tensor) -> Tensor:
        """``Āᵀ y``."""
        return tmv(self.Abar, y if self._rm is None else y * self._rm, self.lin)

    def _Hv(self, y: Tensor) -> Tensor:
        """``H⁻¹Āᵀ y``."""
        return mv(self.HiAbt, y if self._rm is None else y * self._rm, self.lin)

    # tensors that describe a Cholesky-path factorization (see state() / from_state())
    _STATE = ("P", "A", "C", "a", "Abar", "D", "L", "HiAbt", "LS", "ok", "path", "rho")

    def state(self) -> dict:
        """The factorization's tensors (Cholesky path only: no minimum-norm elements)."""
        if self._pinv_idx is not None:
            raise ValueError("BatchedKKT.state: minimum-norm elements have no tensor state")
        self._materialize()
        return {k: getattr(self, k) for k in self._STATE if getattr(self, k, None) is not None}

    @classmethod
    def from_state(cls, st: dict, *, refine: int = 1, options: CholeskyOptions = DEFAULT_OPTIONS) -> "BatchedKKT":
        """A factorization from the tensors of :meth:`state` (e.g. the outputs of a CUDA graph)."""
        self = cls.__new__(cls)
        self.lin = options
        for k in cls._STATE:
            setattr(self, k, st.get(k))
        self.B, self.n = self.ok.shape[0], self.P.shape[-1]
        self.p = self.A.shape[-2] if self.A is not None else 0
        self.m = self.C.shape[-2] if self.C is not None else 0
        self.k = self.p + self.m
        self.refine = int(refine)
        self._eps = torch.finfo(self.P.dtype).eps
        self._factors, self._L_fresh, self._pinv_idx = None, False, None
        self._augmented = False
        self._rm = None
        return self

    def merge(self, sel: Tensor, other: "BatchedKKT") -> None:
        """Take ``other``'s factorization (same batch and data, other active masks, Cholesky path)
        for the elements ``sel`` ((B,) bool), without a host synchronization (torch.where per tensor)."""
        if self._augmented or other._augmented:
            raise ValueError("BatchedKKT.merge: Cholesky-path factorizations only")
        self._materialize()
        other._materialize()

        def pick(mine, theirs, name):
            if mine is None or mine is theirs:
                return mine
            if isinstance(mine, CholeskyFactor):
                try:
                    return mine.where(sel, theirs)
                except ValueError:
                    raise ValueError(f"BatchedKKT.merge: the {name} factors differ in their inverses") from None
            return torch.where(sel.view(-1, *([1] * (mine.dim() - 1))), theirs, mine)

        for k in ("a", "Abar", "D", "HiAbt", "LS", "L", "ok", "path", "rho"):
            setattr(self, k, pick(getattr(self, k), getattr(other, k), k))

    def subset(self, idx: Tensor, active: Optional[Tensor]) -> "BatchedKKT":
        """A new :class:`BatchedKKT` for the batch elements ``idx`` with other active masks."""

        def pick(M):
            if M is None or M.dim() == 2 or _shared(M) is not None:
                return None if M is None else (_shared(M) if M.dim() == 3 else M)
            return M[idx]

        factors = None
        if self._factors is not None:
            # the IPM's factor of P and P⁻¹[A; C]ᵀ do not depend on the active set: re-mask them
            # (a factor keeps its inverse / diagonal-block inverses)
            factors = {
                k: (
                    (v.index(idx) if isinstance(v, CholeskyFactor) else v[idx])
                    if v.dim() == 3 and v.shape[0] == self.B
                    else v
                )
                for k, v in self._factors.items()
            }
        return BatchedKKT(
            pick(self.P),
            pick(self.A),
            pick(self.C),
            active,
            batch=int(idx.numel()),
            refine=self.refine,
            factors=factors,
            options=self.lin,
        )

    def absorb(self, idx: Tensor, sub: "BatchedKKT", rows: Tensor) -> None:
        """Take over the factorization of ``sub``'s elements ``rows`` as this batch's ``idx``."""
        if idx.numel() == 0:
            return
        self._materialize()
        sub._materialize()
        B = self.B
        if self.m:
            self.a = self.a.clone()
            self.a[idx] = sub.a[rows]
        if self.k:
            # (Abar, D, HiAbt and LS were computed by this object, nobody else holds them: updated
            # in place — a copy of a (B, k, k) factor costs as much as a solve with it)
            self.Abar[idx] = sub.Abar[rows]
            self.D[idx] = sub.D[rows]
            self.HiAbt[idx] = sub.HiAbt[rows]
            self.LS.put(idx, sub.LS, rows)
        if not (self.L.dim() == 2 and sub.L.dim() == 2) and (sub._L_fresh or self._L_fresh):
            # (both from the same precomputed factor of P: nothing to copy)
            L = self.L.expanded(B).map(torch.clone)
            L.put(idx, sub.L.expanded(sub.B), rows)
            self.L = L
        self.rho = self.rho.clone()
        self.rho[idx] = sub.rho[rows]
        self._augmented = self._augmented or sub._augmented
        self.path = self.path.clone()
        self.path[idx] = sub.path[rows]
        # merge the minimum-norm elements
        keep = (
            []
            if self._pinv_idx is None
            else [
                (i, V, inv)
                for i, V, inv in zip(self._pinv_idx.tolist(), self._pinv_V, self._pinv_inv)
                if i not in set(idx.tolist())
            ]
        )
        if sub._pinv_idx is not None:
            pos = {r: j for j, r in enumerate(rows.tolist())}
            for j, r in enumerate(sub._pinv_idx.tolist()):
                if r in pos:
                    keep.append((int(idx[pos[r]]), sub._pinv_V[j], sub._pinv_inv[j]))
        if keep:
            self._pinv_idx = torch.tensor([k[0] for k in keep], device=self.path.device)
            self._pinv_V = torch.stack([k[1] for k in keep])
            self._pinv_inv = torch.stack([k[2] for k in keep])
        else:
            self._pinv_idx = None

    def _dense_K(self, idx: Tensor) -> Tensor:
        """Dense K for the batch elements ``idx`` (only used for the rare singular ones)."""
        self._materialize()
        n, k = self.n, self.k
        P = self.P.expand(self.B, n, n)[idx]
        K = P.new_zeros(idx.numel(), n + k, n + k)
        K[:, :n, :n] = P
        if k:
            Ab = self.Abar[idx]
            K[:, :n, n:] = Ab.transpose(-1, -2)
            K[:, n:, :n] = Ab
            K[:, n:, n:] = -torch.diag_embed(self.D[idx])
        return K

    def _setup_pinv(self, bad: Tensor) -> None:
        """Minimum-norm (pseudo-inverse) solve for the elements ``bad`` via ``eigh`` of K."""
        idx = torch.nonzero(bad).squeeze(-1)
        K = self._dense_K(idx)
        K = 0.5 * (K + K.transpose(-1, -2))
        evals, V = torch.linalg.eigh(K)
        tol = evals.abs().amax(-1, keepdim=True) * K.shape[-1] * self._eps * 10
        neg = torch.zeros(self.B, dtype=torch.bool, device=K.device)
        neg[idx] = (evals < -tol).sum(-1) > self.k  # (the docstring: P is not PSD)
        self.negative_curvature = neg
        inv = torch.where(evals.abs() > tol, 1.0 / evals, torch.zeros_like(evals))
        self._pinv_idx, self._pinv_V, self._pinv_inv = idx, V, inv
        self.path[idx] = 2
        logger.info(
            "BatchedKKT: %d batch elements have a singular reduced KKT matrix; using the minimum-norm solution",
            idx.numel(),
        )
        # keep the Cholesky factors of those elements finite (their answers are overwritten)
        # (plain factors from here: their triangular solves read the repaired rows)
        if self.L.dim() == 3:
            L = self.L.L.clone()
            L[idx] = torch.eye(self.n, dtype=L.dtype, device=L.device)
            self.L = CholeskyFactor(L, options=self.lin)
            if self.k:
                LS = self.LS.L.clone()
                LS[idx] = torch.eye(self.k, dtype=LS.dtype, device=LS.device)
                self.LS = CholeskyFactor(LS, options=self.lin)
                HiAbt = self.HiAbt.clone()
                HiAbt[idx] = 0.0
                self.HiAbt = HiAbt

    # ------------------------------------------------------------------------------------------
    def _factor(self, rho: Tensor) -> Tensor:
        B, n, k = self.B, self.n, self.k
        self._L_fresh = True
        P = self.P
        Ps = _shared(P)
        # (ρ is nonzero only after a failed attempt 0: no device read needed here)
        use_shared = Ps is not None and not self._augmented
        if use_shared:
            L, info = cholesky(Ps, self.lin)
            ok = ((info == 0) & self._pivots_ok(L.L, Ps)).expand(B)
            self.L = L  # (n, n)
        else:
            if k and self._augmented:
                AtA = torch.matmul(self.Abar.transpose(-1, -2), self.Abar)
                H = torch.addcmul(P.expand(B, n, n), rho.view(-1, 1, 1), AtA)
            else:
                H = P.expand(B, n, n).clone()
            L, info = cholesky(H, self.lin)
            ok = (info == 0) & self._pivots_ok(L.L, H)
            self.L = L  # (B, n, n)
        if k:
            Abt = self.Abar.transpose(-1, -2)  # (B, n, k)
            if self.L.dim() == 2:
                rhs = Abt.permute(1, 0, 2).reshape(n, B * k)  # one solve for the batch
                self.HiAbt = self.L.solve(rhs.unsqueeze(0))[0].reshape(n, B, k).permute(1, 0, 2)
            else:
                self.HiAbt = self.L.solve(Abt)
            S = torch.matmul(self.Abar, self.HiAbt)
            torch.diagonal(S, dim1=-2, dim2=-1).add_(self.D)
            self.LS, info2 = cholesky(S, self.lin)
            ok = ok & (info2 == 0) & self._pivots_ok(self.LS.L, S)
        return ok & torch.isfinite(self.L.L).flatten(-2).all(-1).expand(B)

    def _factor_pre(self, f: dict) -> Tensor:
        """Cholesky path from precomputed P⁻¹[A; C]ᵀ and [A; C]P⁻¹[A; C]ᵀ: mask, add D, factorize S."""
        cm = 1.0 - self.D  # 1 on the rows in the system
        self.L = f["L"] if isinstance(f["L"], CholeskyFactor) else CholeskyFactor(f["L"], options=self.lin)
        self.HiAbt = f["PiAbt"] * cm.unsqueeze(-2)
        S = f["M"] * (cm.unsqueeze(-1) * cm.unsqueeze(-2))  # cm is 0/1: exact
        torch.diagonal(S, dim1=-2, dim2=-1).add_(self.D)
        big = self._diag_max(S)
        self.LS, info = cholesky_inplace(S, self.lin)  # S is a fresh buffer
        ok = (info == 0) & self._pivots_ok(self.LS.L, None, big)
        if self.L.dim() == 3:
            ok = ok & torch.isfinite(self.L.L).flatten(-2).all(-1)
        return ok

    @staticmethod
    def _diag_max(M: Tensor) -> Tensor:
        return torch.diagonal(M, dim1=-2, dim2=-1).abs().amax(-1)

    def _pivots_ok(self, L: Tensor, M: Optional[Tensor], big: Optional[Tensor] = None) -> Tensor:
        """Reject a numerically singular factorization: smallest pivot² vs the largest diagonal of
        the factorized matrix M (or ``big``, that maximum taken before an in-place factorization)."""
        piv = torch.diagonal(L, dim1=-2, dim2=-1)
        if big is None:
            big = self._diag_max(M)
        return (piv.abs().amin(-1) ** 2 > 100 * self._eps * L.shape[-1] * big) & torch.isfinite(piv).all(-1)

    def _solve_reg(self, gz: Tensor, gy: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Solve the (augmented, possibly regularized) system once."""
        if self.k and self._augmented:
            gz = gz + self.rho.unsqueeze(-1) * self._Atv(gy)
        t = self.L.solve(gz)
        if not self.k:
            return t, None
        rhs = self._Av(t) - gy
        yy = self.LS.solve(rhs)
        yz = t - self._Hv(yy)
        return yz, yy

    def _residual(self, gz, gy, yz, yy):
        """g − K y for the true (unregularized, unaugmented) K."""
        Pyz = mv(self.P, yz, self.lin)
        if not self.k:
            return gz - Pyz, None
        rz = gz - Pyz - self._Atv(yy)
        ry = gy - self._Av(yz) + self.D * yy
        return rz, ry

    def apply(self, yz: Tensor, ylam: Optional[Tensor] = None, ymu: Optional[Tensor] = None):
        """``K y`` (for checks)."""
        yy = self._pack(ylam, ymu, yz)
        Pyz = mv(self.P, yz, self.lin)
        if not self.k:
            return Pyz, None, None
        rz = Pyz + self._Atv(yy)
        ry = self._Av(yz) - self.D * yy
        return (rz,) + self._unpack(ry)

    def _pack(self, glam, gmu, ref):
        if not self.k:
            return None
        parts = []
        if self.p:
            parts.append(glam if glam is not None else ref.new_zeros(self.B, self.p))
        if self.m:
            parts.append(gmu if gmu is not None else ref.new_zeros(self.B, self.m))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _unpack(self, y):
        if y is None:
            return None, None
        return (y[:, : self.p] if self.p else None), (y[:, self.p :] if self.m else None)

    def solve(
        self, g_z: Tensor, g_lam: Optional[Tensor] = None, g_mu: Optional[Tensor] = None, refine: Optional[int] = None
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Solve ``K (y_z, y_λ, y_μ) = (g_z, g_λ, g_μ)`` for the batch (any missing g is 0).

        Returns ``(y_z, y_λ, y_μ)`` with ``y_λ``/``y_μ`` None when there are no such rows.
        """
        g_z = g_z.expand(self.B, self.n)
        gy = self._pack(g_lam, g_mu, g_z)
        yz, yy = self._solve_reg(g_z, gy)
        steps = self.refine if refine is None else int(refine)
        for _ in range(steps):
            rz, ry = self._residual(g_z, gy, yz, yy)
            dz, dy = self._solve_reg(rz, ry)
            yz = yz + dz
            if yy is not None:
                yy = yy + dy
        if self._pinv_idx is not None:
            idx = self._pinv_idx
            g = g_z[idx] if gy is None else torch.cat([g_z[idx], gy[idx]], dim=-1)
            V = self._pinv_V
            y = torch.matmul(V, (self._pinv_inv * torch.matmul(g.unsqueeze(-2), V).squeeze(-2)).unsqueeze(-1)).squeeze(
                -1
            )
            yz = yz.clone()
            yz[idx] = y[:, : self.n]
            if yy is not None:
                yy = yy.clone()
                yy[idx] = y[:, self.n :]
        return (yz,) + self._unpack(yy)


@register_linsolver
class TorchBatchedSolver(LinearSolver):
    """Registry entry for :class:`BatchedKKT` (batched, torch, any device)."""

    name: ClassVar[str] = "torch"
    aliases: ClassVar[tuple] = ("torch_batched", "batched")
    modules: ClassVar[tuple] = ("torch",)
    dense: ClassVar[bool] = True
    sparse: ClassVar[bool] = False
    batched: ClassVar[bool] = True
    description: ClassVar[str] = "batched masked reduced-KKT Cholesky in torch (CPU and GPU)"

    def factor_batch(
        self, P: Tensor, A: Optional[Tensor], C: Optional[Tensor], active: Optional[Tensor], **kwargs
    ) -> BatchedKKT:
        """Factorize a batch of masked reduced KKT matrices; see :class:`BatchedKKT`."""
        return BatchedKKT(P, A, C, active, **kwargs)
