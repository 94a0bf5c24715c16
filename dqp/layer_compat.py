"""libdqp's names on :class:`dqp.dQP.dQP_layer`: ``Q=/G=/h=`` keywords and read-only attributes.

Code written for libdqp (the dQP paper's library) calls ``layer(Q=Q, q=q, G=G, h=h, A=A, b=b)`` and
reads attributes of the layer after a call (``layer.nActive``, ``layer.x_star_np``, ...). dqp keeps
its own state in :attr:`dQP_layer.info <dqp.result.SolveInfo>`; the attributes here are read-only
views of it and of the last call's outputs, in libdqp's conventions:

==========================  ====================================================================
attribute                   meaning (libdqp's letters: ``(x, μ, ν)`` = dqp's ``(z, λ, μ)``)
==========================  ====================================================================
``dim, nIneq, nEq``         n, m (rows of C), p (rows of A)
``nBatch``                  batch size (1 for unbatched inputs)
``nActive``                 active inequalities: an ``int`` unbatched, an int array ``(B,)`` batched
``active``                  a NumPy bool mask, ``(m,)`` unbatched, ``(B, m)`` batched (``out.active`` is the call's tensor)
``qp_solver, lin_solver``   the solvers used by the last call (the settings' before any call)
``x_star_np``               z as a float64 array ``(n,)`` / ``(B, n)``
``mu_star_np``              equality duals (dqp's λ) ``(p,)`` / ``(B, p)``
``nu_star_np``              duals of the *active* inequalities, ``(nActive,)`` (a list per element
                            when batched), as libdqp keeps them after a call
``nu_star_with_inactive_np`` all inequality duals (dqp's μ), zero on inactive rows
``KKT_A_np``                the reduced KKT matrix ``[[P, Āᵀ], [Ā, 0]]``, ``Ā = [A; C_J]``, at the
                            solution (dense array, or SciPy CSC for sparse input; a list when batched)
==========================  ====================================================================

Before the first call the per-call attributes are ``None``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import numpy as np
import torch

from dqp.errors import InputError
from dqp.problem import SparseArg

#: libdqp's argument names and dqp's.
KEYWORD_ALIASES = {"Q": "P", "G": "C", "h": "d"}


def resolve_keywords(P, q, C, d, A, b, Q=None, G=None, h=None):
    """``(P, q, C, d, A, b)`` from dqp's names or libdqp's (``Q``, ``G``, ``h``).

    Raises
    ------
    InputError
        One argument given under both names (e.g. ``P`` and ``Q``).
    """
    if Q is None and G is None and h is None:
        return P, q, C, d, A, b
    given = {"P": P, "C": C, "d": d}
    for alias, name in KEYWORD_ALIASES.items():
        value = {"Q": Q, "G": G, "h": h}[alias]
        if value is None:
            continue
        if given[name] is not None:
            raise InputError(
                f"Argument {name} was given twice, as {name} and as {alias} (libdqp's name for it); "
                f"pass it once: layer(P, q, C, d, A, b) or layer(Q=..., q=..., G=..., h=..., A=..., b=...)."
            )
        given[name] = value
    return given["P"], q, given["C"], given["d"], A, b


@dataclass
class LastCall:
    """What the libdqp attributes are computed from: the last call's detached data and outputs."""

    batch: Any  # QPBatch with detached tensors, in the caller's scaling
    z: torch.Tensor  # (B, n)
    lam: torch.Tensor  # (B, p)
    mu: torch.Tensor  # (B, m)
    info: Any = None  # the call's SolveInfo
    active: Optional[torch.Tensor] = None  # (B, m) bool


def detach_batch(batch):
    """A copy of a :class:`dqp.problem.QPBatch` that holds no autograd graph."""

    def det(M):
        if isinstance(M, SparseArg):
            return M if not M.values.requires_grad else dataclasses.replace(M, values=M.values.detach())
        return M.detach() if M is not None and M.requires_grad else M

    # (a shallow copy with six fields set: dataclasses.replace re-runs __init__ over every field)
    new = copy.copy(batch)
    new.P, new.q, new.C, new.d = det(batch.P), det(batch.q), det(batch.C), det(batch.d)
    new.A, new.b = det(batch.A), det(batch.b)
    new.deferred = None  # (its checks hold the caller's tensors)
    return new


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


class LibdqpAttributes:
    """Read-only libdqp attributes of a layer (see the module docstring)."""

    _last: Optional[LastCall]

    def _one(self, a: np.ndarray) -> Union[np.ndarray, Any]:
        """Per-element array ``(B, ...)`` as libdqp shows it: element 0 alone when unbatched."""
        return a if self._last.batch.batched else a[0]

    @property
    def info(self):
        """The last call's :class:`~dqp.result.SolveInfo` (whichever thread made it; each call's own is
        ``out.info``), or None before the first call."""
        return None if self._last is None else self._last.info

    @property
    def active(self) -> Optional[np.ndarray]:
        """Active inequalities of the last call as a NumPy bool array (libdqp's type): ``(m,)`` for
        unbatched inputs, ``(B, m)`` for batched ones (copied from the device when read)."""
        if self._last is None or self._last.active is None:
            return None
        a = self._last.active.detach().cpu().numpy().astype(bool)
        return a if self._last.batch.batched else a[0]

    @property
    def nBatch(self) -> Optional[int]:  # noqa: N802  (libdqp's name)
        """Batch size of the last call (1 for unbatched inputs)."""
        return None if self._last is None else self._last.batch.B

    @property
    def dim(self) -> Optional[int]:
        """Number of variables n of the last call."""
        return None if self._last is None else self._last.batch.n

    @property
    def nIneq(self) -> Optional[int]:  # noqa: N802
        """Number of inequality rows m (rows of C) of the last call."""
        return None if self._last is None else self._last.batch.m

    @property
    def nEq(self) -> Optional[int]:  # noqa: N802
        """Number of equality rows p (rows of A) of the last call."""
        return None if self._last is None else self._last.batch.p

    @property
    def nActive(self) -> Union[None, int, np.ndarray]:  # noqa: N802
        """Active inequalities: an int for unbatched inputs, an int array ``(B,)`` for batched ones."""
        if self._last is None:
            return None
        counts = np.array([int(np.sum(a)) for a in self._last.info.active], dtype=np.int64)
        return counts if self._last.batch.batched else int(counts[0])

    @property
    def qp_solver(self) -> str:
        """The forward solver of the last call (the settings' choice before any call)."""
        return self._last.info.qp_solver if self._last is not None else self.settings.qp_solver

    @property
    def lin_solver(self) -> str:
        """The backward linear solver of the last call (the settings' choice before any call)."""
        return self._last.info.lin_solver if self._last is not None else self.settings.lin_solver

    @property
    def x_star_np(self) -> Optional[np.ndarray]:
        """z of the last call as a float64 array, ``(n,)`` or ``(B, n)``."""
        return None if self._last is None else self._one(_np(self._last.z))

    @property
    def mu_star_np(self) -> Optional[np.ndarray]:
        """Equality duals (dqp's λ) of the last call, ``(p,)`` or ``(B, p)``."""
        return None if self._last is None else self._one(_np(self._last.lam))

    @property
    def nu_star_with_inactive_np(self) -> Optional[np.ndarray]:  # noqa: N802
        """All inequality duals (dqp's μ) of the last call, zero on inactive rows."""
        return None if self._last is None else self._one(_np(self._last.mu))

    @property
    def nu_star_np(self) -> Union[None, np.ndarray, List[np.ndarray]]:
        """Duals of the active inequalities only, ``(nActive,)`` (a list per element when batched)."""
        if self._last is None:
            return None
        mu = _np(self._last.mu)
        per = [
            mu[i][np.asarray(a, dtype=bool)] if mu.shape[1] else mu[i][:0] for i, a in enumerate(self._last.info.active)
        ]
        return per if self._last.batch.batched else per[0]

    @property
    def KKT_A_np(self):  # noqa: N802
        """The reduced KKT matrix ``[[P, Āᵀ], [Ā, 0]]``, ``Ā = [A; C_J]``, of the last call (a list when batched)."""
        if self._last is None:
            return None
        from dqp.kkt import assemble_kkt

        np_batch = self._last.batch.numpy()
        out = []
        for i, act in enumerate(self._last.info.active):
            P, _, C, _, A, _ = np_batch.element(i)
            CJ = C[np.asarray(act, dtype=bool)] if C is not None else None
            out.append(assemble_kkt(P, A, CJ, sparse=self._last.batch.sparse))
        return out if self._last.batch.batched else out[0]
