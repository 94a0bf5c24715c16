"""Shared fixtures: random QP generators and the solver capability table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import dqp.solvers as solvers

try:  # (hypothesis is a test extra; the property tests import it themselves)
    import os

    from hypothesis import settings as _hyp

    # The property tests draw the same examples on every run: a suite that passes or fails by chance
    # says nothing about a change. HYPOTHESIS_PROFILE=explore draws new ones (and keeps failures).
    _hyp.register_profile("repeatable", derandomize=True, database=None)
    _hyp.register_profile("explore")
    _hyp.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
except ImportError:  # pragma: no cover
    pass

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class SolverCase:
    """One row of the solver table: name, what it supports, and the tolerance its gradients meet."""

    name: str
    dense: bool
    sparse: bool
    needs_pd: bool  # P must be positive definite (quadprog, ecos)
    grad_rtol: float


#: The one table the tests are parametrized over. Tolerances are what dqp guarantees after the
#: active-set polish (the forward solver's accuracy does not enter).
SOLVER_TABLE = [
    SolverCase("clarabel", True, True, False, 1e-6),
    SolverCase("osqp", True, True, False, 1e-6),
    SolverCase("piqp", True, True, False, 1e-6),
    SolverCase("proxqp", True, True, False, 1e-6),
    SolverCase("daqp", True, False, True, 1e-6),
    SolverCase("quadprog", True, False, True, 1e-6),
    SolverCase("highs", True, True, False, 1e-6),
    SolverCase("cvxopt", True, True, False, 1e-6),
    SolverCase("ecos", True, False, True, 1e-6),
    SolverCase("scs", True, True, False, 1e-6),
    SolverCase("qpalm", True, True, False, 1e-6),
    SolverCase("dqp_ipm", True, False, False, 1e-6),  # built-in batched interior point (torch)
]


def installed(case: SolverCase):
    return pytest.param(
        case,
        id=case.name,
        marks=pytest.mark.skipif(
            not solvers.registered_solvers()[case.name].is_available(), reason=f"{case.name} not installed"
        ),
    )


ALL_SOLVERS = [installed(c) for c in SOLVER_TABLE]
SPARSE_SOLVERS = [installed(c) for c in SOLVER_TABLE if c.sparse]


def random_qp(
    n: int, m: int, p: int = 0, seed: int = 0, batch: int | None = None, dtype=torch.float64, frac_active: float = 0.3
):
    """qpth-style random QP with a known interior-ish solution and a fraction of active rows.

    ``P = UᵀU + 1e-3·I``, ``C`` normal, ``d = C z0 + s0`` with ``s0 = 0`` on ~frac_active of the rows
    (so those are active for suitable duals: q is chosen so that z0 with duals mu0 > 0 is optimal).
    """
    g = np.random.default_rng(seed)

    def one():
        U = g.standard_normal((n, n))
        P = U.T @ U / n + 1e-1 * np.eye(n)
        C = g.standard_normal((m, n))
        z0 = g.standard_normal(n)
        k = min(int(round(frac_active * m)), n - p)  # keep [A; C_J] full row rank (LICQ)
        act = np.zeros(m, bool)
        act[g.choice(m, size=k, replace=False)] = True
        s0 = np.where(act, 0.0, g.uniform(0.5, 1.5, m))
        mu0 = np.where(act, g.uniform(0.5, 1.5, m), 0.0)
        d = C @ z0 + s0
        A = g.standard_normal((p, n))
        b = A @ z0
        lam0 = g.standard_normal(p)
        q = -(P @ z0 + C.T @ mu0 + A.T @ lam0)
        return P, q, C, d, A, b, z0, mu0, lam0

    items = [one() for _ in range(batch or 1)]
    out = [np.stack([it[k] for it in items]) for k in range(9)]
    if batch is None:
        out = [o[0] for o in out]
    return [torch.tensor(o, dtype=dtype) for o in out]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _snapshot(x):
    """A deep copy of a tensor argument (a sparse tensor's indices and values), a list of them, or None."""
    if isinstance(x, (list, tuple)):
        return [_snapshot(t) for t in x]
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach()
    if x.layout == torch.sparse_csc:
        return ("csc", x.ccol_indices().clone(), x.row_indices().clone(), x.values().clone())
    if x.layout == torch.sparse_csr:
        return ("csr", x.crow_indices().clone(), x.col_indices().clone(), x.values().clone())
    if x.layout == torch.sparse_coo:
        return ("coo", x._indices().clone(), x._values().clone())
    return ("dense", x.clone())


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if not isinstance(a, tuple):
        return a is b or a == b
    return a[0] == b[0] and all(
        torch.equal(x, y)
        or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()))
        for x, y in zip(a[1:], b[1:])
    )


class inputs_unchanged:
    """Context manager: the given arguments (dense or sparse tensors, lists of them) are bit-for-bit the
    same after the block (dqp never writes into a caller's tensor)."""

    def __init__(self, *args):
        self.args = args
        self.before = [_snapshot(a) for a in args]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        after = [_snapshot(a) for a in self.args]
        changed = [i for i, (x, y) in enumerate(zip(self.before, after)) if not _same(x, y)]
        assert not changed, f"arguments at positions {changed} were modified in place"
        return False
