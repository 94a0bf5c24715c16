"""PyTorch program transforms: ``torch.compile`` (a clean graph break), ``torch.func`` and second
derivatives (typed :class:`dqp.NotSupportedError`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dqp
from dqp import dQP
from dqp.qpth import QPFunction as QpthFunction
from tests.conftest import random_qp

SOLVERS = ["clarabel", "dqp_ipm"]


class _Model(nn.Module):
    """Linear → QP layer → nonlinearity: compiled code before and after the solve."""

    def __init__(self, n: int, qp):
        super().__init__()
        self.lin = nn.Linear(n, n, dtype=torch.float64)
        self.qp = qp

    def forward(self, P, x, C, d):
        q = self.lin(x)
        if isinstance(self.qp, QpthFunction):
            z = self.qp(P, q, C, d, torch.empty(0, dtype=x.dtype), torch.empty(0, dtype=x.dtype))
        else:
            out = self.qp(P, q, C, d)  # the output object (with .info) crosses the graph break
            z = out.z + 0.5 * out.mu.sum(-1, keepdim=True)
        return torch.tanh(z).pow(2).sum()


def _grads(model, *args):
    model.zero_grad()
    loss = model(*args)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("front", SOLVERS + ["qpth"])
def test_compiled_model_matches_eager(front):
    """The issue's failure: ``TypeError: numpy.ndarray - Tensor`` when compiling a model with the layer."""
    torch.manual_seed(0)
    P, x, C, d, *_ = random_qp(5, 7, 0, seed=5, batch=4)
    qp = QpthFunction() if front == "qpth" else dQP.dQP_layer(qp_solver=front)
    model = _Model(5, qp)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    loss0, g0 = _grads(model, P, x, C, d)
    compiled = torch.compile(model, backend=counting_backend)
    loss1, g1 = _grads(compiled, P, x, C, d)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the code around the layer was compiled: the linear map before it and the loss after it
    code = "\n".join(gm.code for gm in graphs)
    assert graphs and "linear" in code and "tanh" in code
    assert "dqp" not in code  # the solve itself runs eagerly
    compiled2 = torch.compile(model, backend="aot_eager")
    loss2, g2 = _grads(compiled2, P, x, C, d)
    torch.testing.assert_close(loss2, loss0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g2, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _layer_fn(front, P, C, d):
    if front == "qpth":
        f = QpthFunction()
        return lambda q: f(P, q, C, d, torch.empty(0), torch.empty(0))
    layer = dQP.dQP_layer(qp_solver=front)
    return lambda q: layer(P, q, C, d)[0]


TRANSFORMS = {
    "vmap": lambda f, q: torch.func.vmap(f)(q),
    "grad": lambda f, q: torch.func.grad(lambda v: f(v).sum())(q),
    "jacrev": lambda f, q: torch.func.jacrev(f)(q),
    "jacfwd": lambda f, q: torch.func.jacfwd(f)(q),
    "hessian": lambda f, q: torch.func.hessian(lambda v: f(v).sum())(q),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("front", SOLVERS + ["qpth"])
def test_torch_func_transforms_raise_not_supported(front, transform):
    P, q, C, d, *_ = random_qp(4, 5, 0, seed=6, batch=3)
    f = _layer_fn(front, P, C, d)
    with pytest.raises(dqp.NotSupportedError, match="torch.func transforms.*batch.*torch.autograd.functional.jacobian"):
        TRANSFORMS[transform](f, q)


@pytest.mark.parametrize("front", SOLVERS)
def test_autograd_functional_jacobian_is_the_alternative(front):
    """What the error message recommends works, and its rows are the backward's vector products."""
    P, q, C, d, *_ = random_qp(4, 5, 0, seed=6, batch=2)
    f = _layer_fn(front, P, C, d)
    J = torch.autograd.functional.jacobian(f, q)
    assert J.shape == (2, 4, 2, 4)
    qq = q.clone().requires_grad_(True)
    z = f(qq)
    (row,) = torch.autograd.grad(z[1, 2], qq)
    torch.testing.assert_close(J[1, 2], row, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [dict(qp_solver="clarabel"), dict(qp_solver="clarabel", lin_solver="torch"), dict(qp_solver="dqp_ipm")],
    ids=["clarabel", "torch_backward", "dqp_ipm"],
)
def test_second_derivatives_raise_not_supported(options):
    """A gradient penalty (create_graph=True). Before: the inner gradient silently had no graph, so the
    penalty's own gradient was dropped (or torch's once_differentiable error)."""
    P, q, C, d, *_ = random_qp(4, 5, 0, seed=7, batch=2)
    layer = dQP.dQP_layer(**options)
    q = q.clone().requires_grad_(True)
    z = layer(P, q, C, d)[0]
    with pytest.raises(dqp.NotSupportedError, match="second derivatives.*create_graph=True"):
        torch.autograd.grad((z**2).sum(), q, create_graph=True)
    (g,) = torch.autograd.grad((z**2).sum(), q)  # first order is unaffected
    assert torch.isfinite(g).all()


def test_qpth_second_derivatives_raise_not_supported():
    Q, p, G, h, *_ = random_qp(4, 5, 0, seed=7, batch=2)
    p = p.clone().requires_grad_(True)
    z = QpthFunction()(Q, p, G, h, torch.empty(0), torch.empty(0))
    with pytest.raises(dqp.NotSupportedError, match="second derivatives"):
        torch.autograd.grad(z.sum(), p, create_graph=True)
