"""Bilevel warm-start study: does ``warm_start_from_previous=True`` pay off in an outer loop?

Lower level (a sparse QP): 1-D total-variation denoising of a signal y ∈ Rⁿ,

    z*(y) = argmin_z ½‖z − y‖² + α‖Dz‖₁

written as a QP in w = (z, s), s ∈ Rⁿ⁻¹:  ``min ½‖z‖² − yᵀz + α1ᵀs  s.t.  Dz − s ≤ 0, −Dz − s ≤ 0``
(P = diag(I, 0) sparse, C = [[D, −I], [−D, −I]], d = 0; D the forward difference).

with per-edge weights: the linear term of s is ``α = softplus(θ) ∈ Rⁿ⁻¹``. Upper level: learn θ so
that denoising a fixed noisy observation y of a piecewise-constant signal t recovers t,
``L(θ) = ½‖z*(y, α(θ)) − t‖²``, with gradient descent on θ (``--steps`` outer steps, gradient through the dqp
layer). Consecutive outer steps solve nearby QPs, which is where a warm start helps.

For each solver (forward solvers that use a starting point: OSQP — dqp's native backend, which
also keeps the factorization and warm-starts the duals — and the qpsolvers backends that take
``initvals``; Clarabel as an interior-point control that ignores it), the loop runs twice from the
same θ₀: cold (``warm_start_from_previous=False``) and warm (``True``), interleaved step by step
(alternating which goes first) so that both see the same load on a shared machine. Recorded per outer step:
forward-solver time (``layer.info.solve_time``), whole-forward time, iterations
(``layer.info.iterations``, where the backend reports them), loss. dqp polishes every forward solution
to the exact KKT point of its active set, so both runs must follow the same trajectory: the final
losses are compared. (ProxQP is not in the default list: at n=2000 one cold solve takes ~80 s here, and
at n=300 its warm-started solve stalls at outer step 73, see experiments/README.md.)

Usage::

    python experiments/bilevel_warmstart.py            # n=2000, 100 outer steps
    python experiments/bilevel_warmstart.py --short    # seconds (tests/test_studies_smoke.py)

Outputs (``experiments/results/``): ``bilevel_warmstart.csv`` (per step), ``bilevel_warmstart.md``
(summary table), ``bilevel_warmstart.png`` (forward-solver time per outer step, cold vs warm).
The loss and y of the observation are those of ``tv_problem``; ``t`` has ``n // 200`` pieces.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

logger = logging.getLogger("bilevel_warmstart")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
PEERS = REPO / ".peers"
#: ``name@eps`` runs a solver at its own forward tolerance: dqp polishes the result to the exact KKT
#: point of the detected active set, so a loose forward tolerance is enough when the set is right
DEFAULT_SOLVERS = ["osqp", "osqp@1e-5", "osqp_qpsolvers", "qpalm", "clarabel"]  # proxqp: see --solvers, slow here


def tv_problem(n: int, seed: int):
    """Target t (piecewise constant), observation y = t + noise, and the QP matrices (torch CSC).

    Returns ``(t, y, P, C, d)`` with P of size (2n−1)², C of size 2(n−1) × (2n−1).
    """
    import scipy.sparse as sp
    import torch

    rng = np.random.default_rng(seed)
    n_pieces = max(2, n // 200)
    cuts = np.sort(rng.choice(np.arange(1, n), n_pieces - 1, replace=False))
    levels = rng.normal(size=n_pieces)
    t = np.repeat(levels, np.diff(np.concatenate([[0], cuts, [n]])))
    y0 = t + 0.3 * rng.normal(size=n)
    D = sp.diags([-np.ones(n - 1), np.ones(n - 1)], [0, 1], shape=(n - 1, n))
    I = sp.identity(n - 1)
    P = sp.block_diag([sp.identity(n), sp.csc_matrix((n - 1, n - 1))])
    C = sp.bmat([[D, -I], [-D, -I]])

    def csc(M):
        M = sp.csc_matrix(M)
        M.eliminate_zeros()
        M.sort_indices()
        return torch.sparse_csc_tensor(
            torch.tensor(M.indptr, dtype=torch.int64),
            torch.tensor(M.indices, dtype=torch.int64),
            torch.tensor(M.data, dtype=torch.float64),
            size=M.shape,
        )

    d = torch.zeros(2 * (n - 1), dtype=torch.float64)
    return torch.tensor(t), torch.tensor(y0), csc(P), csc(C), d


def parse_spec(spec: str, default_eps: float):
    """``"osqp"`` or ``"osqp@1e-5"`` (a solver with its own forward tolerance) -> (name, eps)."""
    name, _, eps = spec.partition("@")
    return name, float(eps) if eps else default_eps


def run_loop(
    spec: str, warm: bool, n: int, steps: int, lr: float, alpha: float, seed: int, eps: float
) -> Iterator[Dict[str, Any]]:
    """Gradient descent on θ through the dqp layer, one outer step per ``next()``.

    Yields each step's record, then once more ``{"steps": [...], "final_loss": L, "theta": θ}``.
    A generator, so that the driver can interleave the cold and the warm loop step by step: both
    then see the same load on a shared machine.
    """
    import torch
    from dqp import dQP

    solver, eps = parse_spec(spec, eps)
    t, y, P, C, d = tv_problem(n, seed)
    settings = dQP.build_settings(
        qp_solver=solver,
        lin_solver="qdldl",
        solve_type="sparse",
        eps_abs=eps,
        eps_rel=eps,
        warm_start_from_previous=warm,
        time=True,
        empty_batch=False,
    )
    layer = dQP.dQP_layer(settings=settings)
    # α = softplus(θ), starting from the uniform weight ``alpha``
    theta = torch.full((n - 1,), float(np.log(np.expm1(alpha))), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr)
    steps_out: List[Dict[str, Any]] = []
    for k in range(steps):
        q = torch.cat([-y, torch.nn.functional.softplus(theta)])
        t0 = time.perf_counter()
        w, _, _, solve_time, fwd_time = layer(P, q, C, d)
        t1 = time.perf_counter()
        z = w[:n]
        loss = 0.5 * ((z - t) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        info = layer.info
        steps_out.append(
            {
                "solver": spec,
                "warm": warm,
                "step": k,
                "loss": float(loss.detach()),
                "solve_time": float(solve_time),
                "forward_time": float(fwd_time),
                "call_time": t1 - t0,
                "backward_time": t2 - t1,
                "iterations": info.iterations[0] if info.iterations else None,
                "verified": bool(info.verified[0]) if info.verified else None,
                "n_active": int(np.count_nonzero(info.active[0])) if info.active else None,
                "n_weak": int(info.n_weakly_active[0]) if info.n_weakly_active else None,
            }
        )
        yield steps_out[-1]
        opt.step()
    with torch.no_grad():  # the loss at the final θ
        q = torch.cat([-y, torch.nn.functional.softplus(theta)])
        z = layer(P, q, C, d)[0][:n]
        final = float(0.5 * ((z - t) ** 2).sum())
    yield {"steps": steps_out, "final_loss": final, "theta": theta.detach().numpy().copy()}


def summarize(runs: Dict[tuple, Dict[str, Any]], solvers: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for s in solvers:
        cold, warm = runs.get((s, False)), runs.get((s, True))
        if cold is None or warm is None:
            continue
        r: Dict[str, Any] = {"solver": s}
        for tag, run in (("cold", cold), ("warm", warm)):
            st = run["steps"]
            r[f"{tag}_solve_total"] = sum(x["solve_time"] for x in st)
            r[f"{tag}_solve_after1"] = sum(x["solve_time"] for x in st[1:])
            r[f"{tag}_forward_total"] = sum(x["forward_time"] for x in st)
            r[f"{tag}_step_total"] = sum(x["call_time"] + x["backward_time"] for x in st)
            its = [x["iterations"] for x in st if x["iterations"] is not None]
            r[f"{tag}_iters_mean"] = float(np.mean(its)) if its else None
            r[f"{tag}_iters_mean_after1"] = float(np.mean(its[1:])) if len(its) > 1 else None
            r[f"{tag}_final_loss"] = run["final_loss"]
            r[f"{tag}_unverified"] = sum(1 for x in st if x["verified"] is False)
            r[f"{tag}_weak_steps"] = sum(1 for x in st if x.get("n_weak"))
        r["solve_speedup"] = r["cold_solve_total"] / r["warm_solve_total"]
        r["forward_speedup"] = r["cold_forward_total"] / r["warm_forward_total"]
        r["loss_abs_diff"] = abs(r["cold_final_loss"] - r["warm_final_loss"])
        r["loss_rel_diff"] = r["loss_abs_diff"] / max(abs(r["cold_final_loss"]), 1e-300)
        r["theta_max_diff"] = float(np.max(np.abs(cold["theta"] - warm["theta"])))
        r["initial_loss"] = cold["steps"][0]["loss"]
        rows.append(r)
    return rows


def _f(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write_markdown(
    rows: List[Dict[str, Any]], path: Path, args: argparse.Namespace, command: str, skipped: Dict[str, str]
) -> str:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from simplex_scaling import git_version

    out = [
        "# Bilevel loop with and without warm starts",
        "",
        f"`{command}` — dqp {git_version()}, {platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
        f"python {platform.python_version()}, 1 thread. 1-D TV denoising QP, n={args.n} "
        f"(QP: {2 * args.n - 1} variables, {2 * (args.n - 1)} inequalities), learned per-edge TV weights "
        f"α = softplus(θ) from α={args.alpha}, {args.steps} gradient steps (lr={args.lr}), tolerance eps={args.eps}.",
        "",
        "`solver@eps` runs that solver at forward tolerance eps (dqp polishes the result). "
        "Forward-solver time summed over the outer steps (`layer.info.solve_time`), the whole forward "
        "(solve + active-set polish + factorization), mean iterations per solve where the backend reports "
        "them, and the final loss of both runs.",
        "",
        "| solver | solve time cold | solve time warm | solve speed-up | forward cold | forward warm | "
        "forward speed-up | iters cold | iters warm | final loss cold | final loss warm | |Δloss| | max |Δθ| |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['solver']} | {r['cold_solve_total']:.3g} s | {r['warm_solve_total']:.3g} s | "
            f"{r['solve_speedup']:.2f}× | {r['cold_forward_total']:.3g} s | {r['warm_forward_total']:.3g} s | "
            f"{r['forward_speedup']:.2f}× | {_f(r['cold_iters_mean'], '.1f')} | {_f(r['warm_iters_mean'], '.1f')} | "
            f"{r['cold_final_loss']:.10g} | {r['warm_final_loss']:.10g} | {r['loss_abs_diff']:.1e} | "
            f"{r['theta_max_diff']:.1e} |"
        )
    if rows:
        out += [
            "",
            f"Initial loss {rows[0]['initial_loss']:.6g}. Unverified polishes (cold/warm): "
            + ", ".join(f"{r['solver']} {r['cold_unverified']}/{r['warm_unverified']}" for r in rows)
            + ". Outer steps with weakly active constraints (cold/warm; there the map is not differentiable and "
            "the one-sided gradient may depend on the solver's point): "
            + ", ".join(f"{r['solver']} {r['cold_weak_steps']}/{r['warm_weak_steps']}" for r in rows)
            + ".",
        ]
    if skipped:
        out += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    text = "\n".join(out) + "\n"
    path.write_text(text)
    return text


COLUMNS = [
    "solver",
    "warm",
    "step",
    "loss",
    "solve_time",
    "forward_time",
    "call_time",
    "backward_time",
    "iterations",
    "verified",
    "n_active",
    "n_weak",
]


def plot(csv_path: Path, png_path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data: Dict[str, Dict[bool, List[tuple]]] = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            data.setdefault(r["solver"], {}).setdefault(r["warm"] == "True", []).append(
                (int(r["step"]), float(r["solve_time"]), r["iterations"])
            )
    solvers = list(data)
    fig, axes = plt.subplots(2, len(solvers), figsize=(3.2 * len(solvers), 5.6), dpi=90, squeeze=False, sharex=True)
    for j, s in enumerate(solvers):
        for warm, color in ((False, "tab:red"), (True, "tab:blue")):
            pts = sorted(data[s].get(warm, []))
            lab = "warm start" if warm else "cold start"
            axes[0][j].semilogy([p[0] for p in pts], [p[1] * 1e3 for p in pts], color=color, lw=1, label=lab)
            its = [(p[0], float(p[2])) for p in pts if p[2] not in ("", "None")]
            if its:
                axes[1][j].plot([p[0] for p in its], [p[1] for p in its], color=color, lw=1, label=lab)
        if not any(p[2] not in ("", "None") for v in data[s].values() for p in v):
            axes[1][j].text(
                0.5,
                0.5,
                "iterations not reported\nby this backend",
                ha="center",
                va="center",
                transform=axes[1][j].transAxes,
                fontsize=8,
            )
        axes[0][j].set_title(s, fontsize=9)
        axes[1][j].set_xlabel("outer step")
        for i in range(2):
            axes[i][j].grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("forward solve time [ms]")
    axes[1][0].set_ylabel("solver iterations")
    axes[0][0].legend(fontsize=8)
    from plot_caption import caption

    fig.suptitle("Bilevel loop, cold vs warm start, per outer step\n" + caption(png_path), fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path)
    return True


def driver(args: argparse.Namespace) -> int:
    import torch

    from dqp.solvers import available_solvers, resolve_solver_name

    torch.set_num_threads(1)
    avail = set(available_solvers())
    solvers, skipped = [], {}
    for s in args.solvers:
        try:
            name = resolve_solver_name(parse_spec(s, args.eps)[0])
        except Exception as exc:  # noqa: BLE001
            skipped[s] = f"unknown: {exc}"[:120]
            continue
        if name not in avail:
            skipped[s] = "not installed"
            continue
        solvers.append(s)
    runs: Dict[tuple, Dict[str, Any]] = {}
    all_steps: List[Dict[str, Any]] = []
    for s in solvers:
        t0 = time.perf_counter()
        loops = {
            warm: run_loop(s, warm, args.n, args.steps, args.lr, args.alpha, args.seed, args.eps)
            for warm in (False, True)
        }
        try:
            for k in range(args.steps + 1):  # interleaved, alternating which of the two goes first
                for warm in (False, True) if k % 2 == 0 else (True, False):
                    out = next(loops[warm])
                    if k == args.steps:
                        runs[(s, warm)] = out
        except Exception as exc:  # noqa: BLE001 - the study records the failure
            skipped[s] = f"{type(exc).__name__}: {exc}"[:200]
            logger.warning("%s failed: %s", s, exc)
            runs.pop((s, False), None)
            runs.pop((s, True), None)
            continue
        for warm in (False, True):
            st = runs[(s, warm)]["steps"]
            all_steps += st
            its = [x["iterations"] for x in st if x["iterations"] is not None]
            logger.info(
                "%-15s %-5s solve total %.3fs  final loss %.10g  mean iters %s",
                s,
                "warm" if warm else "cold",
                sum(x["solve_time"] for x in st),
                runs[(s, warm)]["final_loss"],
                _f(float(np.mean(its)) if its else None, ".1f"),
            )
        logger.info("%-15s both loops %.1fs", s, time.perf_counter() - t0)
    rows = summarize(runs, solvers)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / f"{args.out_stem}.{e}" for e in ("csv", "md", "png"))
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        wr.writeheader()
        for r in all_steps:
            wr.writerow(r)
    command = ("python experiments/bilevel_warmstart.py " + " ".join(args.argv)).strip()
    print(write_markdown(rows, md_path, args, command, skipped))
    for r in rows:
        print(
            f"RESULT solver={r['solver']} loss_cold={r['cold_final_loss']:.17g} loss_warm={r['warm_final_loss']:.17g} "
            f"solve_speedup={r['solve_speedup']:.4f} theta_max_diff={r['theta_max_diff']:.3e}"
        )
    if args.no_plot:
        pass
    elif not plot(csv_path, png_path):
        for cand in (PEERS / "cvxpylayers" / "bin" / "python", PEERS / "bench" / "bin" / "python"):
            if (
                cand.exists()
                and subprocess.run(
                    [str(cand), str(Path(__file__).resolve()), "--plot", str(csv_path), str(png_path)],
                    capture_output=True,
                    cwd=tempfile.gettempdir(),
                ).returncode
                == 0
            ):
                break
        else:
            logger.warning("matplotlib not available: no plot written")
    if png_path.exists():
        print(f"plot: {png_path}")
    print(f"results: {csv_path}  {md_path}")
    return 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="small problem, few steps (seconds)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2.0, help="gradient-descent step on θ")
    ap.add_argument("--alpha", type=float, default=0.3, help="initial TV weight")
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solvers", nargs="+", default=DEFAULT_SOLVERS)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--out-stem", default=None)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.short:
        if "--n" not in args.argv:
            args.n = 200
        if "--steps" not in args.argv:
            args.steps = 10
        if "--solvers" not in args.argv:
            args.solvers = ["osqp", "clarabel"]
        args.out_stem = args.out_stem or "bilevel_warmstart_short"
    args.out_stem = args.out_stem or "bilevel_warmstart"
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.plot:
        return 0 if plot(Path(args.plot[0]), Path(args.plot[1])) else 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import warnings

    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
