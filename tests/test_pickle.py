"""Checkpoints: a layer (and its settings) pickles, deep-copies and ``torch.save``-s at any time.

After forward (and backward) calls with every kind of solver — a qpsolvers backend, OSQP's kept
workspaces, warm starts, the thread pool of ``omp_parallel`` and the batched IPM — the copy gives
the same solutions and gradients as the original; solver workspaces and pools are rebuilt lazily.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import dqp
from dqp import dQP
from dqp.qpth import QPFunction as QpthFunction
from tests.conftest import random_qp

#: settings that leave per-layer machinery behind after a call (workspaces, pools, warm starts)
KINDS = {
    "clarabel": dict(qp_solver="clarabel"),
    "osqp_workspaces": dict(qp_solver="osqp", warm_start_from_previous=True),
    "omp_parallel": dict(qp_solver="clarabel", omp_parallel=True, n_cpu=2),
    "torch_backward": dict(qp_solver="clarabel", lin_solver="torch"),
    "dqp_ipm": dict(qp_solver="dqp_ipm"),
}


def _pickle(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"pickle": _pickle, "deepcopy": copy.deepcopy, "torch.save": _torch_save}


def _solve_and_grad(layer, data):
    P, q, C, d = (t.clone() for t in data)
    q.requires_grad_(True)
    z = layer(P, q, C, d)[0]
    (z**2).sum().backward()
    return z.detach(), q.grad


@pytest.mark.parametrize("copier", list(COPIES), ids=list(COPIES))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_layer_copies_after_calls(kind, copier):
    """The issue's failures: ``Can't pickle <class 'abc.QPSolvers_clarabel'>``, ``cannot pickle
    'module' object`` (OSQP) and ``'_queue.SimpleQueue'`` (omp_parallel) after the first call."""
    P, q, C, d, *_ = random_qp(5, 6, 0, seed=3, batch=3)
    layer = dQP.dQP_layer(settings=dQP.build_settings(**KINDS[kind]))
    z0, g0 = _solve_and_grad(layer, (P, q, C, d))
    _solve_and_grad(layer, (P, q, C, d))  # workspaces / warm starts / pool now in use
    twin = COPIES[copier](layer)
    assert twin.settings == layer.settings
    assert twin.info is not None and twin.info.status == layer.info.status
    z1, g1 = _solve_and_grad(twin, (P, q, C, d))
    torch.testing.assert_close(z1, z0, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)
    z2, _ = _solve_and_grad(layer, (P, q, C, d))  # the original still works
    torch.testing.assert_close(z2, z0, rtol=1e-7, atol=1e-8)


def test_copy_between_forward_and_backward():
    """A copy taken while an autograd graph through the layer is alive; both backward passes work."""
    P, q, C, d, *_ = random_qp(4, 5, 0, seed=4, batch=2)
    layer = dQP.dQP_layer(qp_solver="osqp")
    q = q.clone().requires_grad_(True)
    z = layer(P, q, C, d)[0]
    twin = copy.deepcopy(layer)
    _torch_save(layer)
    z.sum().backward()
    g = q.grad.clone()
    q.grad = None
    twin(P, q, C, d)[0].sum().backward()
    torch.testing.assert_close(q.grad, g, rtol=1e-6, atol=1e-8)


class _OptNetLike(nn.Module):
    def __init__(self, n: int, m: int, **options):
        super().__init__()
        self.lin = nn.Linear(n, n, dtype=torch.float64)
        self.G = nn.Parameter(torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        self.qp = dQP.dQP_layer(**options)

    def forward(self, x):
        n = x.shape[-1]
        P = torch.eye(n, dtype=x.dtype)
        return self.qp(P, self.lin(x), self.G, torch.ones(self.G.shape[0], dtype=x.dtype))[0]


@pytest.mark.parametrize("kind", ["osqp_workspaces", "dqp_ipm"])
def test_model_checkpoint_round_trip(kind):
    """``torch.save(model)`` / ``torch.load`` of a model holding the layer, and its ``state_dict``."""
    torch.manual_seed(0)
    model = _OptNetLike(4, 6, **KINDS[kind])
    x = torch.randn(5, 4, dtype=torch.float64)
    y0 = model(x)
    loaded = _torch_save(model)
    torch.testing.assert_close(loaded(x), y0, rtol=1e-7, atol=1e-8)
    fresh = _OptNetLike(4, 6, **KINDS[kind])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), y0, rtol=1e-7, atol=1e-8)


def test_settings_and_outputs_pickle():
    s = dQP.build_settings(qp_solver="osqp", qp_solver_keywords={"max_iter": 500}, fallback_solver=None)
    assert _pickle(s) == s and copy.deepcopy(s) == s
    P, q, C, d, *_ = random_qp(3, 2, 0, seed=0)
    out = dQP.dQP_layer(settings=s)(P, q, C, d)
    back = _pickle(out)
    assert isinstance(back, dqp.QPOutput) and back.info.status == out.info.status
    torch.testing.assert_close(back.z, out.z)
    torch.testing.assert_close(back.active, out.active)


def test_qpth_function_pickles():
    Q, p, G, h, *_ = random_qp(4, 5, 0, seed=1, batch=2)
    f = QpthFunction(verbose=0)
    z = f(Q, p, G, h, torch.empty(0), torch.empty(0))
    torch.testing.assert_close(_pickle(f)(Q, p, G, h, torch.empty(0), torch.empty(0)), z)


class _QPDataset(torch.utils.data.Dataset):
    """Solves a QP per item with a layer made (and used) in the parent process."""

    def __init__(self, layer, data):
        self.layer, self.data = layer, data

    def __len__(self):
        return self.data[1].shape[0]

    def __getitem__(self, i):
        return self.layer(*self.data)[0][i]  # (the whole batch: the thread pool is used)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_layer_in_forked_dataloader_workers():
    """DataLoader workers get the layer by fork after the parent's calls made its thread pool: a pool
    inherited through fork has no threads, so the workers start their own (per process)."""
    P, q, C, d, *_ = random_qp(4, 5, 0, seed=8, batch=6)
    layer = dQP.dQP_layer(qp_solver="clarabel", omp_parallel=True, n_cpu=2)
    ref = layer(P, q, C, d)[0]  # the parent's pool now exists
    loader = torch.utils.data.DataLoader(
        _QPDataset(layer, (P, q, C, d)), batch_size=3, num_workers=2, multiprocessing_context="fork", timeout=120
    )
    got = torch.cat(list(loader))
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-8)
