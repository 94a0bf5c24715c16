"""A bilevel loop with warm starts: learn total-variation weights so that denoising recovers a signal.

    python examples/bilevel_warmstart.py
    DQP_EXAMPLES_SHORT=1 python examples/bilevel_warmstart.py     # a few seconds

Lower level, a sparse QP (1-D total-variation denoising of a noisy observation y with per-edge
weights α ≥ 0)::

    z*(α) = argmin_z ½‖z − y‖² + Σ_i α_i |z_{i+1} − z_i|
          = argmin_{z,s} ½‖z‖² − yᵀz + αᵀs   s.t.  Dz − s ≤ 0,  −Dz − s ≤ 0

Upper level: ``min_θ ½‖z*(softplus(θ)) − t‖²`` for the clean signal t, by gradient descent through
the dqp layer. Successive outer steps solve nearby QPs, so the layer is created with
``warm_start_from_previous=True``: each solve starts from the previous solution (OSQP keeps its
factorization and is warm-started in the primal and the dual). The same loop runs cold for comparison;
dqp polishes every solution to the exact KKT point of its active set, so both runs give the same
losses — the warm start only changes how fast the forward solver gets there.
(experiments/bilevel_warmstart.py is the full study.)
"""

import os
import warnings

import numpy as np
import scipy.sparse as sp
import torch

warnings.filterwarnings("ignore", message="Sparse (CSR|CSC) tensor support is in beta", category=UserWarning)
warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)

from dqp import dQP  # noqa: E402

SHORT = os.environ.get("DQP_EXAMPLES_SHORT") == "1"
n, steps, lr = (150, 8, 2.0) if SHORT else (1000, 40, 2.0)
torch.set_num_threads(1)

# clean piecewise-constant signal t and a noisy observation y
rng = np.random.default_rng(1)
t = np.repeat(rng.normal(size=5), n // 5)
n = len(t)
y = torch.tensor(t + 0.3 * rng.normal(size=n))
t = torch.tensor(t)


def to_torch_csc(M) -> torch.Tensor:
    M = sp.csc_matrix(M)
    M.sort_indices()
    return torch.sparse_csc_tensor(
        torch.tensor(M.indptr), torch.tensor(M.indices), torch.tensor(M.data), size=M.shape, dtype=torch.float64
    )


# the QP in w = (z, s): P = diag(I, 0), C = [[D, −I], [−D, −I]], d = 0
D = sp.diags([-np.ones(n - 1), np.ones(n - 1)], [0, 1], shape=(n - 1, n))
I = sp.identity(n - 1)
P = to_torch_csc(sp.block_diag([sp.identity(n), sp.csc_matrix((n - 1, n - 1))]))
C = to_torch_csc(sp.bmat([[D, -I], [-D, -I]]))
d = torch.zeros(2 * (n - 1), dtype=torch.float64)


def train(warm: bool):
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(
            qp_solver="osqp",
            lin_solver="qdldl",
            solve_type="sparse",
            warm_start_from_previous=warm,
            time=True,
            empty_batch=False,
        )
    )
    theta = torch.full((n - 1,), float(np.log(np.expm1(0.3))), dtype=torch.float64, requires_grad=True)
    losses, solve_times, iterations = [], [], []
    for _ in range(steps):
        q = torch.cat([-y, torch.nn.functional.softplus(theta)])  # the learned linear term
        w, _, _, solve_time, _ = layer(P, q, C, d)
        loss = 0.5 * ((w[:n] - t) ** 2).sum()
        theta.grad = None
        loss.backward()
        with torch.no_grad():
            theta -= lr * theta.grad
        losses.append(loss.item())
        solve_times.append(solve_time)
        iterations.append(layer.info.iterations[0])
    return losses, solve_times, iterations


cold = train(warm=False)
warm = train(warm=True)
print(f"TV denoising QP: {2 * n - 1} variables, {2 * (n - 1)} inequalities; {steps} outer steps\n")
print(
    f"{'step':>4} {'loss (cold)':>14} {'loss (warm)':>14} {'OSQP iters cold':>16} {'warm':>6} "
    f"{'solve ms cold':>14} {'warm':>7}"
)
for k in range(steps):
    print(
        f"{k:>4} {cold[0][k]:>14.10f} {warm[0][k]:>14.10f} {str(cold[2][k]):>16} {str(warm[2][k]):>6} "
        f"{1e3 * cold[1][k]:>14.2f} {1e3 * warm[1][k]:>7.2f}"
    )
same = max(abs(a - b) for a, b in zip(cold[0], warm[0]))
print(f"\nlargest loss difference cold vs warm: {same:.1e}")
print(
    f"forward solve time, all steps: cold {sum(cold[1]):.3f} s, warm {sum(warm[1]):.3f} s; "
    f"OSQP iterations: cold {sum(cold[2])}, warm {sum(warm[2])}"
)
print(f"loss {cold[0][0]:.4f} -> {cold[0][-1]:.4f}")
