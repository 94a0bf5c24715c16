"""OSQP called directly: setup once, update values, and warm-start both primal and dual.

qpsolvers' OSQP wrapper sets the solver up on every call and warm-starts the primal only. In a
bilevel loop or a training loop the pattern of P, C, A does not change between calls, so this backend
keeps one OSQP workspace per batch element, updates the numerical values in place when the pattern
is the same, and warm-starts from the previous primal *and* dual solution. A reused workspace starts
from the configured step size ``rho`` again (OSQP keeps the value its last solve adapted to, which
made a warm workspace take 2–3× the iterations of a fresh one). It replaces the qpsolvers
entry under the name ``"osqp"`` (alias ``"osqp_qpsolvers"`` keeps the plain wrapper).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Tuple

import numpy as np
import scipy.sparse as sp

from dqp.errors import Status
from dqp.solvers.base import ForwardSolver, RawSolution, register_solver
from dqp.solvers.qpsolvers_backend import QPSolversBackend, status_from_extras

_INF = 1e30
#: OSQP's default initial step size
_RHO = 0.1


def _stack_constraints(C, d, A, b, n: int):
    """OSQP form ``l ≤ M z ≤ u`` with ``M = [C; A]``."""
    blocks, lo, hi = [], [], []
    if C is not None:
        blocks.append(sp.csc_matrix(C))
        lo.append(np.full(C.shape[0], -np.inf))
        hi.append(np.asarray(d, dtype=np.float64))
    if A is not None:
        blocks.append(sp.csc_matrix(A))
        lo.append(np.asarray(b, dtype=np.float64))
        hi.append(np.asarray(b, dtype=np.float64))
    if not blocks:
        return sp.csc_matrix((0, n)), np.zeros(0), np.zeros(0)
    return sp.vstack(blocks, format="csc"), np.concatenate(lo), np.concatenate(hi)


def _pattern(M: sp.csc_matrix) -> Tuple[int, ...]:
    M.sort_indices()
    return (M.shape, hash(M.indptr.tobytes()), hash(M.indices.tobytes()))


@register_solver
class OSQPNative(ForwardSolver):
    """OSQP through its own Python API, with persistent workspaces and primal-dual warm starts."""

    name = "osqp"
    aliases = ("osqp_native",)
    modules = ("osqp",)
    extra = ""
    dense = True
    sparse = True
    warm_starts = True
    gil_free = True
    description = (
        "ADMM (C); sparse; fast, moderately accurate (dqp polishes the result). Direct API: "
        "workspace reused across calls, primal+dual warm starts."
    )

    def __init__(self) -> None:
        self._workspaces: Dict[Any, Tuple[Any, tuple, Dict[str, Any]]] = {}
        #: slots whose workspace adapted rho in its last solve (reset before the next one)
        self._adapted: Dict[Any, bool] = {}
        self._lock = threading.Lock()

    def prune(self, batch_size: int) -> None:
        """Drop the workspaces of batch slots beyond ``batch_size`` (the batch shrank)."""
        with self._lock:
            for slot in [s for s in self._workspaces if s is None or s >= batch_size]:
                del self._workspaces[slot]
                self._adapted.pop(slot, None)

    def tolerance_keywords(self, eps_abs: float, eps_rel: float) -> Dict[str, Any]:
        return {"eps_abs": eps_abs, "eps_rel": eps_rel, "max_iter": 20000}

    def solve(self, P, q, C, d, A, b, *, initvals=None, warm_duals=None, keywords=None, slot=None) -> RawSolution:
        import osqp

        n = P.shape[0]
        Pu = sp.triu(sp.csc_matrix(P), format="csc")
        Pu.sort_indices()
        M, lo, hi = _stack_constraints(C, d, A, b, n)
        M.sort_indices()
        q = np.asarray(q, dtype=np.float64)
        settings = {"verbose": False, "polishing": False, **(keywords or {})}
        key = (_pattern(Pu), _pattern(M), tuple(sorted(settings.items())))
        t0 = time.perf_counter()
        ws = None
        with self._lock:
            if slot is not None and slot in self._workspaces and self._workspaces[slot][1] == key:
                ws = self._workspaces[slot][0]
        reused = ws is not None
        try:
            if ws is None:
                ws = osqp.OSQP()
                ws.setup(Pu, q, M, np.maximum(lo, -_INF), np.minimum(hi, _INF), **settings)
                if slot is not None:
                    with self._lock:
                        self._workspaces[slot] = (ws, key, settings)
            else:
                ws.update(q=q, l=np.maximum(lo, -_INF), u=np.minimum(hi, _INF), Px=Pu.data, Ax=M.data)
                if self._adapted.get(slot):  # start from the configured step size, as a fresh setup does
                    ws.update_settings(rho=float(settings.get("rho", _RHO)))
            if initvals is not None:
                y0 = None
                if warm_duals is not None:
                    lam0, mu0 = warm_duals
                    y0 = np.concatenate([mu0 if C is not None else np.zeros(0), lam0 if A is not None else np.zeros(0)])
                ws.warm_start(x=np.asarray(initvals, dtype=np.float64), y=y0)
            elif reused:  # a reused workspace remembers its last iterate: start cold when not asked to warm-start
                ws.warm_start(x=np.zeros(n), y=np.zeros(M.shape[0]))
            res = ws.solve(raise_error=False)
            if slot is not None:
                self._adapted[slot] = int(getattr(res.info, "rho_updates", 1) or 0) > 0
        except Exception as exc:  # OSQP raises ValueError on bad data, and others on internal errors
            if slot is not None:
                with self._lock:
                    self._workspaces.pop(slot, None)
            return RawSolution.error(exc, time.perf_counter() - t0)
        elapsed = time.perf_counter() - t0
        text = str(res.info.status).lower()
        status = (
            Status.SOLVED
            if text.startswith("solved") and "inaccurate" not in text
            else (status_from_extras({"status": text}) or Status.SOLVER_ERROR)
        )
        x = np.asarray(res.x, dtype=np.float64)
        y = np.asarray(res.y, dtype=np.float64)
        m = 0 if C is None else C.shape[0]
        finite = np.all(np.isfinite(x))
        return RawSolution(
            x if finite else None,
            y[m:] if A is not None else None,
            y[:m] if C is not None else None,
            status,
            iterations=int(res.info.iter),
            info={"time": elapsed, "raw_status": text, "warm": initvals is not None},
        )


# the plain qpsolvers wrapper stays available under another name
register_solver(
    type(
        "QPSolvers_osqp_qpsolvers",
        (QPSolversBackend,),
        {
            "name": "osqp_qpsolvers",
            "qpsolvers_name": "osqp",
            "aliases": (),
            "modules": ("qpsolvers", "osqp"),
            "extra": "",
            "dense": True,
            "sparse": True,
            "warm_starts": True,
            "description": "OSQP through qpsolvers (set up on every call, primal warm start only).",
        },
    )
)
