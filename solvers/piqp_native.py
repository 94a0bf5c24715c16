"""PIQP called directly on sparse data: one workspace per batch slot, refactorized by ``update``.

qpsolvers' PIQP wrapper sets a new solver up on every call, so each call pays PIQP's symbolic
analysis of its KKT system again. In a training or bilevel loop the patterns of P, C, A do not
change between calls: this backend keeps one PIQP workspace per batch element and, when the patterns
and settings are those of its last call, passes the new values with ``update`` (PIQP recomputes its
equilibration and refactorizes numerically). Dense data, a call without a batch slot (a fallback
solve) and PIQP versions before 0.6 go through qpsolvers as before. It replaces the qpsolvers entry
under the name ``"piqp"``.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Dict, Tuple

import numpy as np
import scipy.sparse as sp

from dqp.errors import numerics_quiet
from dqp.solvers.base import RawSolution, register_solver
from dqp.solvers.qpsolvers_backend import BACKENDS, QPSolversBackend, raw_solution


def _pattern(M: sp.csc_matrix) -> Tuple[Any, ...]:
    return (M.shape, hash(M.indptr.tobytes()), hash(M.indices.tobytes()))


def _csc(M, n: int) -> sp.csc_matrix:
    """``M`` as sorted CSC (PIQP copies its input), or an empty ``(0, n)`` block for an absent constraint
    (as qpsolvers passes it)."""
    if M is None:
        return _empty(n)
    out = M if M.format == "csc" else sp.csc_matrix(M)
    out.sort_indices()
    return out


@functools.lru_cache(maxsize=16)
def _empty(n: int) -> sp.csc_matrix:
    """The empty ``(0, n)`` block, made once per ``n`` (PIQP only reads it)."""
    return sp.csc_matrix((0, n))


@register_solver
class PIQPNative(QPSolversBackend):
    """PIQP with a persistent workspace per batch slot for sparse data (see the module docstring)."""

    name = "piqp"
    aliases = ("piqp_native",)
    qpsolvers_name = "piqp"
    modules = ("qpsolvers", "piqp")
    extra = BACKENDS["piqp"][1]
    dense = True
    sparse = True
    warm_starts = False
    description = BACKENDS["piqp"][3] + " Sparse data: workspace reused across calls (numeric update)."

    def __init__(self) -> None:
        self._workspaces: Dict[Any, Tuple[Any, tuple]] = {}
        self._lock = threading.Lock()

    def prune(self, batch_size: int) -> None:
        """Drop the workspaces of batch slots beyond ``batch_size`` (the batch shrank)."""
        with self._lock:
            for slot in [s for s in self._workspaces if s >= batch_size]:
                del self._workspaces[slot]

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def _new_interface() -> bool:
        import piqp

        major, minor = (int(x) for x in piqp.__version__.split(".")[:2])
        return (major, minor) >= (0, 6)

    def solve(self, P, q, C, d, A, b, *, initvals=None, warm_duals=None, keywords=None, slot=None) -> RawSolution:
        if slot is None or not sp.issparse(P) or not self._new_interface():
            return super().solve(P, q, C, d, A, b, initvals=initvals, keywords=keywords, slot=slot)
        import piqp

        n = P.shape[0]
        Pc, Gc, Ac = _csc(P, n), _csc(C, n), _csc(A, n)
        c = np.asarray(q, dtype=np.float64)
        h = np.zeros(0) if d is None else np.asarray(d, dtype=np.float64)
        bb = np.zeros(0) if b is None else np.asarray(b, dtype=np.float64)
        settings = {"verbose": False, **(keywords or {})}
        key = (_pattern(Pc), _pattern(Gc), _pattern(Ac), tuple(sorted(settings.items())))
        t0 = time.perf_counter()
        with self._lock:
            ws, wkey = self._workspaces.get(slot, (None, None))
        try:
            with numerics_quiet():
                if ws is not None and wkey == key:
                    ws.update(P=Pc, c=c, A=Ac, b=bb, G=Gc, h_u=h)
                else:
                    ws = piqp.SparseSolver()
                    for k, v in settings.items():
                        try:
                            setattr(ws.settings, k, v)
                        except AttributeError:  # as qpsolvers: an unknown setting is ignored
                            pass
                    ws.setup(Pc, c, Ac, bb, Gc, None, h, None, None)
                    with self._lock:
                        self._workspaces[slot] = (ws, key)
                status = ws.solve()
        except Exception as exc:  # PIQP raises ValueError on bad data: the next call sets up afresh
            with self._lock:
                self._workspaces.pop(slot, None)
            return RawSolution.error(exc, time.perf_counter() - t0)
        res = ws.result
        # copies: the workspace's result vectors are overwritten by its next solve
        x, y, z = (np.array(v, dtype=np.float64, copy=True) for v in (res.x, res.y, res.z_u))
        return raw_solution(
            status == piqp.PIQP_SOLVED,
            x,
            y if A is not None else None,
            z if C is not None else None,
            {"info": res.info},
            time.perf_counter() - t0,
            n,
            C,
            A,
        )
