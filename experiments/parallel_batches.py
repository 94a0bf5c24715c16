"""The black-box path's thread pool: a batch solved one element after another, in the pool, and with
``omp_parallel="auto"`` (the default), side by side in one process.

Forward + backward of ``Σ z`` through ``dQP_layer`` on two families: the grid Laplacian of
``blackbox_overhead.py`` (sparse; n = k², bounds ``z ≤ d``) and its random dense problems (n = m).
Each round calls every mode of a cell once, in turn, so that machine noise spreads over the modes
alike; the table gives the median over the rounds and each mode's speed-up over the sequential
solve. Torch runs one thread; the pool has ``--workers`` workers.

Usage::

    python experiments/parallel_batches.py --rounds 9 --workers 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blackbox_overhead import _dense_problem, _grid_problem  # noqa: E402

MODES = (False, True, "auto")
#: (family, size, batch, solvers): size is the grid side k (n = k²) or the dense n = m
CELLS = [
    ("grid", 20, 4, ("clarabel", "osqp", "piqp")),
    ("grid", 45, 4, ("clarabel", "osqp", "piqp")),
    ("dense", 10, 32, ("daqp", "quadprog", "clarabel")),
    ("dense", 50, 32, ("daqp", "quadprog", "clarabel")),
    ("dense", 200, 8, ("daqp", "quadprog", "clarabel")),
]
SHORT_CELLS = [("grid", 6, 2, ("clarabel",)), ("dense", 8, 3, ("daqp",))]


def _inputs(family: str, size: int, B: int):
    """The layer's arguments (q batched, the rest shared) and its solve_type."""
    if family == "grid":
        from dqp.sparse_helper import csc_scipy_to_torch

        P, q, C, d, _, _ = _grid_problem(size)
        g = np.random.default_rng(size)
        qs = torch.tensor(np.stack([q + 0.1 * g.standard_normal(len(q)) for _ in range(B)]))
        Pt, Ct = csc_scipy_to_torch(P), csc_scipy_to_torch(C)
        return ([Pt] * B, qs, [Ct] * B, torch.tensor(d)), "sparse"
    P, q, C, d = (torch.tensor(x) for x in _dense_problem(size, size, B, seed=size + B))
    return (P, q, C, d), "dense"


def run_cell(family: str, size: int, B: int, solver: str, rounds: int, workers: int) -> dict:
    from dqp import dQP

    args, solve_type = _inputs(family, size, B)
    layers = {
        m: dQP.dQP_layer(
            settings=dQP.build_settings(qp_solver=solver, solve_type=solve_type, omp_parallel=m, n_cpu=workers)
        )
        for m in MODES
    }
    times = {m: [] for m in MODES}
    answers = {}
    for r in range(rounds + 1):
        for m, layer in layers.items():
            q = args[1].clone().requires_grad_()
            t0 = time.perf_counter()
            z = layer(args[0], q, *args[2:])[0]
            z.sum().backward()
            if r:  # round 0 warms up (workspaces, patterns, the pool's threads)
                times[m].append(time.perf_counter() - t0)
            answers[m] = torch.cat([z.detach().flatten(), q.grad.flatten()])
    med = {m: statistics.median(v) for m, v in times.items()}
    n = size * size if family == "grid" else size
    # the modes solve the same problems: z and ∇q agree (the elements are independent of their order)
    diff = max(float((answers[m] - answers[False]).abs().max()) for m in MODES)
    return {"family": family, "n": n, "B": B, "solver": solver, "max_diff": diff, **{f"t_{m}": med[m] for m in MODES}}


def report(rows: list, command: str, workers: int) -> str:
    lines = [
        "### The black-box path's thread pool (`omp_parallel`)",
        "",
        f"Forward + backward, median ms over the rounds; speed-up = sequential time / that mode's. "
        f"Pool of {workers} workers, torch 1 thread. The last column compares every mode's z and ∇q "
        "with the sequential solve's.",
        "",
        f"- command: {command}",
        f"- torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs",
        "",
        "| family | n | B | solver | sequential | pool | auto | pool speed-up | auto speed-up | max z, ∇q difference |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        seq, par, auto = r["t_False"], r["t_True"], r["t_auto"]
        lines.append(
            f"| {r['family']} | {r['n']} | {r['B']} | {r['solver']} | {seq * 1e3:.1f} | {par * 1e3:.1f} | "
            f"{auto * 1e3:.1f} | {seq / par:.2f} | {seq / auto:.2f} | {r['max_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--short", action="store_true", help="two tiny cells, two rounds (the smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cells, rounds = (SHORT_CELLS, 2) if args.short else (CELLS, args.rounds)
    rows = []
    for family, size, B, solvers in cells:
        for solver in solvers:
            rows.append(run_cell(family, size, B, solver, rounds, args.workers))
            print(rows[-1], flush=True)
    command = "python experiments/parallel_batches.py " + " ".join(sys.argv[1:])
    text = report(rows, command.strip(), args.workers)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "parallel_batches.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
