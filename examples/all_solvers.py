"""Every installed forward solver on one QP: solution error, gradient agreement and time.

    python examples/all_solvers.py            # n = 60
    DQP_EXAMPLES_SHORT=1 python examples/all_solvers.py   # n = 12, a few seconds

The QP is built around a known answer, so nothing here trusts a solver: pick z*, an active set J,
multipliers μ_J > 0 and λ; then set ``q = −Pz* − Aᵀλ − C_Jᵀμ_J``, ``b = Az*``, ``d_J = C_J z*`` and
``d_¬J = C_¬J z* + slack``. z* is then the exact solution (strict complementarity by construction),
and the exact gradient of ``L = wᵀz*`` is one dense solve of the reduced KKT system
``[[P, Aᵀ, C_Jᵀ], [A, 0, 0], [C_J, 0, 0]] y = [w; 0; 0]``: ``∇q = −y_z``, ``∇d_J = y_μ``, ``∇d_¬J = 0``.
"""

import os
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message="Sparse (CSR|CSC) tensor support is in beta", category=UserWarning)
warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)

from dqp import dQP  # noqa: E402
from dqp.solvers import available_solvers, get_solver  # noqa: E402

SHORT = os.environ.get("DQP_EXAMPLES_SHORT") == "1"
n, m, p = (12, 18, 2) if SHORT else (60, 90, 5)
rng = np.random.default_rng(0)

# --- a QP with a known solution -----------------------------------------------------------------
L = rng.normal(size=(n, n))
P = L @ L.T / n + np.eye(n)
C = rng.normal(size=(m, n))
A = rng.normal(size=(p, n))
z_star = rng.normal(size=n)
active = np.zeros(m, bool)
active[rng.choice(m, n // 3, replace=False)] = True
mu_star = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
lam_star = rng.normal(size=p)
q = -(P @ z_star + A.T @ lam_star + C.T @ mu_star)
b = A @ z_star
d = C @ z_star + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
w = rng.normal(size=n)

CJ = C[active]
K = np.block([[P, A.T, CJ.T], [A, np.zeros((p, p + len(CJ)))], [CJ, np.zeros((len(CJ), p + len(CJ)))]])
y = np.linalg.solve(K, np.concatenate([w, np.zeros(p + len(CJ))]))
grad_q_exact = -y[:n]
grad_d_exact = np.zeros(m)
grad_d_exact[active] = y[n + p :]

print(f"QP with n={n}, {m} inequalities ({active.sum()} active), {p} equalities; exact z* and gradients known.\n")
print(
    f"{'solver':<16}{'takes':<14}{'z error':>10}{'∇q error':>11}{'∇d error':>11}{'μ error':>10}{'fwd+bwd ms':>12}  note"
)
T = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
results = {}
for name in available_solvers():
    solver = get_solver(name)
    kind = (
        "batched"
        if solver.batched
        else "+".join(k for k, ok in (("dense", solver.dense), ("sparse", solver.sparse)) if ok)
    )
    settings = dQP.build_settings(qp_solver=name, solve_type="dense", empty_batch=False)
    layer = dQP.dQP_layer(settings=settings)
    qt, dt = T(q).requires_grad_(), T(d).requires_grad_()
    try:
        t0 = time.perf_counter()
        z, lam, mu, _, _ = layer(T(P), qt, T(C), dt, T(A), T(b))
        (z @ T(w)).backward()
        elapsed = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - report every solver, including one that fails
        print(f"{name:<16}{kind:<14}{'failed: ' + type(exc).__name__ + ': ' + str(exc)[:60]}")
        continue
    z_err = np.max(np.abs(z.detach().numpy() - z_star))
    gq_err = np.max(np.abs(qt.grad.numpy() - grad_q_exact))
    gd_err = np.max(np.abs(dt.grad.numpy() - grad_d_exact))
    mu_err = np.max(np.abs(mu.detach().numpy() - mu_star))
    note = "" if solver.batched else ("verified" if all(layer.info.verified) else "NOT verified")
    results[name] = (z_err, gq_err, gd_err)
    print(
        f"{name:<16}{kind:<14}{z_err:>10.1e}{gq_err:>11.1e}{gd_err:>11.1e}{mu_err:>10.1e}{1e3 * elapsed:>12.2f}  {note}"
    )

worst = max(max(v) for v in results.values()) if results else float("nan")
print(
    "\n(dense inputs for every solver; dqp converts them for sparse-only backends. The first dqp_ipm call "
    "includes torch's one-time start-up.)"
)
print(
    f"{len(results)} of {len(available_solvers())} installed solvers ran; worst error over z and gradients: {worst:.1e}"
)
