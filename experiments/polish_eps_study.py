"""How loose can the IPM stop before the polish? Iterations, polish acceptance and gradients.

The layer stops the IPM at ``IPMOptions.polished_eps`` (float64) when the polish follows:
the polish makes the answer exact on the active set, so the IPM only has to find that set. For
each tolerance: the batch's largest and mean iteration count (what a batched solve pays), the
elements whose polished point was accepted, the reduced-system paths, and the gradients of
``Σ w·z`` w.r.t. Q, p, G, h against a reference solve at eps = 1e-10 (max |Δ| over the batch
relative to the reference's max, per tensor; the worst tensor). Device-independent counts (float64, same algorithm on CPU and CUDA), so it runs on
the CPU; the time an iteration costs on a GPU is in results/qpth_cuda_session8*.md.

    python experiments/polish_eps_study.py [--cells 128x100,32x500] [--eps 1e-8,1e-7,1e-6] [--seeds 2] [--family qpth|nearly-lp]
    python experiments/polish_eps_study.py --stages none,1e-5,1e-3,1e-3:1e-5 --cells 256x100   # the kernel's polish stages
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import torch

from dqp.ipm_layer import solve_qp_batch
from dqp.solvers.ipm import IPMOptions


def gen(B, n, m, seed, family="qpth"):
    """qpth's generator; ``"nearly-lp"``: Q = 1e-3 UᵀU/n + 1e-4 I (ill-conditioned, nearly an LP,
    many active rows) with m = 2n inequalities."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    if family == "nearly-lp":
        m = 2 * n
        Q = 1e-3 * U.mT @ U / n + 1e-4 * torch.eye(n, dtype=torch.float64)
    else:
        Q = U.mT @ U + 1e-3 * torch.eye(n, dtype=torch.float64)
    G = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(B, n, generator=g, dtype=torch.float64)
    s0 = torch.rand(B, m, generator=g, dtype=torch.float64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    p = torch.randn(B, n, generator=g, dtype=torch.float64)
    w = torch.randn(B, n, generator=g, dtype=torch.float64)
    return (Q, p, G, h), w


def run(data, w, eps, stage="default"):
    changes = dict(polished_eps=eps)
    if stage != "default":
        changes["polish_stage_eps"] = stage
    ins = [t.clone().requires_grad_() for t in data]
    diag = {}
    z = solve_qp_batch(*ins, on_failure="mask", diagnostics=diag, options=IPMOptions(**changes))[0]
    (z * w).sum().backward()
    grads = [t.grad for t in ins]
    grads[0] = 0.5 * (grads[0] + grads[0].mT)
    return z.detach(), grads, diag


def rel(a, b):
    """max |a − b| / max |b| over the whole batch (per element it would divide by ~0 where z sits
    at a vertex: there ∇Q and ∇p vanish)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="128x100,32x500")
    ap.add_argument("--eps", default="1e-8,1e-7,1e-6,1e-5")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--family", default="qpth", choices=["qpth", "nearly-lp"])
    ap.add_argument("--stages", default=None,
                    help="vary the kernel's polish stages instead of the IPM tolerance: a comma-separated list "
                         "of eps1 or eps1:eps2 (IPMOptions.polish_stage_eps; 'none': one stage), IPM at 1e-8")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    default_stage = IPMOptions().polish_stage_eps
    if a.stages:
        parse = lambda t: None if t == "none" else (tuple(float(x) for x in t.split(":")) if ":" in t else float(t))  # noqa: E731
        eps_list = [(1e-8, parse(t)) for t in a.stages.split(",")]
    else:
        eps_list = [(float(e), "default") for e in a.eps.split(",")]
    rows = []
    for cell in a.cells.split(","):
        B, n = (int(x) for x in cell.split("x"))
        for seed in range(a.seeds):
            data, w = gen(B, n, n, seed, a.family)
            z_ref, g_ref, _ = run(data, w, 1e-10, None)
            for eps, stage in eps_list:
                z, g, diag = run(data, w, eps, stage)
                it = diag["iterations"].double()
                row = dict(family=a.family, B=B, n=n, m=data[2].shape[-2], seed=seed, eps=eps,
                           stage=str(default_stage if stage == "default" else stage),
                           iters_max=int(it.max()), iters_mean=round(float(it.mean()), 2),
                           verified=int(diag["verified"].sum()), paths=dict(collections.Counter(diag["kkt_path"])),
                           z_err=rel(z, z_ref), grad_err=max(rel(x, r) for x, r in zip(g, g_ref)))
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [f"# IPM tolerance before the polish ({a.family} problems, float64, CPU)\n",
             "Per cell and seed: iterations (max / mean over the batch), elements whose polished point was "
             "accepted, and the error of z and of the gradients against eps = 1e-10 (max |Δ| over the batch "
             "relative to the reference's max).\n",
             "| family | B | n | m | seed | eps | polish stages | iterations max / mean | accepted | z err | grad err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['B']} | {r['n']} | {r['m']} | {r['seed']} | {r['eps']:.0e} | {r['stage']} | "
                     f"{r['iters_max']} / {r['iters_mean']} | "
                     f"{r['verified']}/{r['B']} | {r['z_err']:.1e} | {r['grad_err']:.1e} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"polish_{'stage' if a.stages else 'eps'}_study_{a.family}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
