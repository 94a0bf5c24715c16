"""layer.info on the batched interior-point path: per-element verified flag, KKT path, iterations,
complementarity margin and weakly active count, as on the element-wise path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dqp import dQP
from dqp.errors import Status
from dqp.ipm_layer import solve_qp_batch


def _batch():
    torch.manual_seed(0)
    P = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    q = torch.randn(4, 3, dtype=torch.float64)
    C = torch.randn(4, 2, 3, dtype=torch.float64)
    d = torch.ones(4, 2, dtype=torch.float64)
    return P, q, C, d


def test_layer_info_is_filled_per_element():
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    P, q, C, d = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about on these
        z, lam, mu = layer(P, q, C, d)[:3]
    info = layer.info
    assert info.status == [Status.SOLVED] * 4
    assert info.verified == [True] * 4
    assert info.kkt_path == ["cholesky"] * 4
    assert all(isinstance(k, int) and 1 <= k <= 100 for k in info.iterations)
    # the margin is min(min over active rows of μ, min over inactive rows of the slack)
    slack = d - (C @ z.unsqueeze(-1)).squeeze(-1)
    for i in range(4):
        act = torch.as_tensor(info.active[i])
        want = min([float(v) for v in mu[i][act]] + [float(v) for v in slack[i][~act]] + [math.inf])
        assert info.complementarity_margin[i] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert info.n_weakly_active == [0] * 4


def test_weakly_active_row_is_counted():
    # min ½‖x‖² − x₁ s.t. x₂ ≤ 0, x₁ ≤ 2: x = (1, 0), row x₂ ≤ 0 at its bound with μ = 0
    P = torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
    q = torch.tensor([-1.0, 0.0], dtype=torch.float64).expand(2, 2)
    C = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64).expand(2, 2, 2)
    d = torch.tensor([0.0, 2.0], dtype=torch.float64).expand(2, 2)
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    layer(P, q, C, d)
    assert layer.info.n_weakly_active == [1, 1]


def test_diagnostics_without_polish():
    P, q, C, d = _batch()
    diag = {}
    solve_qp_batch(P, q, C, d, polish=False, diagnostics=diag)
    assert diag["verified"].tolist() == [False] * 4  # nothing was verified without the polish
    assert len(diag["kkt_path"]) == 4 and diag["iterations"].shape == (4,)
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm", qp_solver_keywords={"polish": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UnverifiedSolutionWarning when the polish is off
        layer(P, q, C, d)
    assert layer.info.verified == [False] * 4
