"""The batched engine's layer.info: lists computed from tensors on first read, the same values,
picklable and copyable; layer.active as one tensor."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import torch

from dqp import dQP
from dqp.errors import Status
from dqp.ipm_engine import LazySolveInfo
from dqp.ipm_layer import solve_qp_batch
from dqp.result import SolveInfo

from test_ipm import known_qp


def _layer_call():
    P, q, C, d, A, b, *_ = known_qp(5, 6, 8, 2, seed=2)
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    out = layer(P, q, C, d, A, b)
    return layer, out, (P, q, C, d, A, b)


def test_lazy_lists_match_the_data():
    layer, out, (P, q, C, d, A, b) = _layer_call()
    info = layer.info
    assert isinstance(info, LazySolveInfo) and isinstance(info, SolveInfo)
    assert "primal_residual" not in vars(info)  # not computed until read
    z = out.z
    r_prim = torch.maximum(
        (A @ z.unsqueeze(-1)).squeeze(-1).sub(b).abs().amax(-1),
        ((C @ z.unsqueeze(-1)).squeeze(-1) - d).clamp_min(0).amax(-1),
    )
    assert np.allclose(info.primal_residual, r_prim.tolist(), atol=1e-14)
    assert len(info.dual_residual) == len(info.complementarity) == 5
    assert info.status == [Status.SOLVED] * 5 and info.verified == [True] * 5
    _, _, _, _, active = solve_qp_batch(P, q, C, d, A, b)
    assert torch.equal(out.active, active)  # the call's tensor
    assert np.array_equal(layer.active, active.numpy())  # libdqp's NumPy mask
    assert [a.tolist() for a in info.active] == active.tolist()
    assert info.kkt_path == ["cholesky"] * 5 and len(info.iterations) == 5
    assert len(info.n_weakly_active) == len(info.complementarity_margin) == 5
    assert "5/5 solved" in info.summary()


def test_lazy_info_pickles_and_copies():
    layer, _, _ = _layer_call()
    info = layer.info
    for other in (pickle.loads(pickle.dumps(info)), copy.deepcopy(info)):
        assert other.status == info.status
        assert other.primal_residual == info.primal_residual
        assert other.kkt_path == info.kkt_path
        assert np.array_equal(other.active_mask(8).numpy(), layer.active)
    assert pickle.loads(pickle.dumps(layer)).info.dual_residual == info.dual_residual
