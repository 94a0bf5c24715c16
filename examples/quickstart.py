"""Quickstart: a QP layer, its solution, its duals and its gradients (dense and sparse).

python examples/quickstart.py
"""

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse (CSR|CSC) tensor support is in beta", category=UserWarning)
warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)

from dqp import dQP  # noqa: E402  (after the warning filters)

torch.manual_seed(0)
n, m, p = 4, 6, 1
L = torch.randn(n, n, dtype=torch.float64)
P = (L @ L.T + 0.1 * torch.eye(n, dtype=torch.float64)).requires_grad_()
q = torch.randn(n, dtype=torch.float64, requires_grad=True)
C = torch.randn(m, n, dtype=torch.float64, requires_grad=True)
d = torch.rand(m, dtype=torch.float64, requires_grad=True)
A = torch.ones(p, n, dtype=torch.float64, requires_grad=True)
b = torch.ones(p, dtype=torch.float64, requires_grad=True)

# 1. Dense: any installed qpsolvers backend forward, exact KKT backward.
layer = dQP.dQP_layer(
    settings=dQP.build_settings(qp_solver="osqp", lin_solver="scipy LU", time=True, empty_batch=False)
)  # (n,) outputs for this unbatched problem
z, lam, mu, solve_time, forward_time = layer(P, q, C, d, A, b)
print("z   =", z.detach().numpy().round(6))
print("lam =", lam.detach().numpy().round(6), " (equality duals)")
print("mu  =", mu.detach().numpy().round(6), " (inequality duals; zero where inactive)")
print("active set:", layer.active.nonzero()[0].tolist())
print(f"solve {1e3 * solve_time:.2f} ms, forward {1e3 * forward_time:.2f} ms")
print("diagnostics:", layer.info.summary())

loss = (z**2).sum()
loss.backward()
print("dL/dq =", q.grad.numpy().round(6))
print("dL/dd =", d.grad.numpy().round(6), " (zero on inactive rows)")

# 2. Sparse: torch CSC tensors; gradients live on the stored values, in their order.
vals = C.detach().to_sparse_csc().values().clone().requires_grad_()
csc = C.detach().to_sparse_csc()
C_sparse = torch.sparse_csc_tensor(csc.ccol_indices(), csc.row_indices(), vals, C.shape)
sparse_layer = dQP.dQP_layer(
    settings=dQP.build_settings(qp_solver="clarabel", lin_solver="qdldl", solve_type="sparse", empty_batch=False)
)
zs, *_ = sparse_layer(
    P.detach().to_sparse_csc(), q.detach(), C_sparse, d.detach(), A.detach().to_sparse_csc(), b.detach()
)
(zs**2).sum().backward()
print("sparse z matches dense:", torch.allclose(zs, z.detach(), atol=1e-8))
print("dL/dC on the stored values:", vals.grad.numpy().round(6))

# 3. A batch: shared P, batched q; the gradient of a shared argument is the sum over the batch.
qb = torch.randn(8, n, dtype=torch.float64)
zb, *_ = layer(P, qb, C, d, A, b)
print("batched z shape:", tuple(zb.shape))
