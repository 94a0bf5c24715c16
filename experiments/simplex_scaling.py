"""Scaling study: differentiable projection onto the probability simplex, n = 10 … 10⁵.

The dQP paper's teaser problem::

    z*(x) = argmin_z ½‖z − x‖²   s.t.  1ᵀz = 1,  z ≥ 0

as a QP ``P = I`` (sparse), ``q = −x``, ``A = 1ᵀ``, ``b = 1``, ``C = −I``, ``d = 0``. ``x`` is drawn
so that a known fraction of the bounds is active with strict complementarity (the support entries
of z* and the slack of the off-support entries are bounded away from 0), so the solution map is
differentiable at every x used here.

For each n and method: forward and backward time (loss = wᵀz* with a fixed random w, gradient with
respect to x), and the error against the **exact** answer: the sort-based closed form of the
projection and its closed-form Jacobian on the support ``J = diag(s) − s sᵀ/|s|`` (s the support
indicator), so ``∇_x(wᵀz*) = s ⊙ (w − (sᵀw)/|s|)``.

Methods (each cell runs in a worker subprocess with a wall-clock budget; JSON lines back):

* dqp, sparse CSC, several forward solvers + QDLDL backward (``dqp-sparse-<solver>``);
* dqp, dense (``dqp-dense-<solver>``) and dqp's batched IPM (``dqp-ipm``), dense n ≤ ``--dense-max``;
* peers, each in its own venv (``--peer-python``): libdqp (sparse, same forward solver and
  tolerance), qpth (dense PDIPM), proxsuite's QPLayer (``proxsuite.torch.qplayer.QPFunction``,
  dense), cvxpylayers (cvxpy + diffcp).

Usage::

    python experiments/simplex_scaling.py            # full grid, writes experiments/results/simplex_*
    python experiments/simplex_scaling.py --short    # seconds; used by tests/test_studies_smoke.py

Outputs: ``simplex_scaling.csv`` (one row per cell), ``simplex_scaling.md`` (time table, ratios,
errors) and ``simplex_scaling.png`` (log-log time vs n).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger("simplex_scaling")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
PEERS = REPO / ".peers"
MARKER = "@@SIMPLEX@@"

#: peer method -> default python of its venv (the first that exists is used)
PEER_PYTHONS: Dict[str, List[Path]] = {
    "libdqp": [PEERS / "libdqp" / "bin" / "python", PEERS / "libdqp2" / "bin" / "python"],
    "qpth": [PEERS / "cvxpylayers" / "bin" / "python", PEERS / "bench" / "bin" / "python"],
    "cvxpylayers": [PEERS / "cvxpylayers" / "bin" / "python"],
    "qplayer": [Path(sys.executable)],  # proxsuite is installed in the main venv
}

DQP_SPARSE = ["osqp", "clarabel", "piqp", "proxqp"]
DQP_DENSE = ["piqp", "proxqp"]


# =============================================================================================
# Problem and exact answer
# =============================================================================================
def make_instance(n: int, frac_active: float, seed: int) -> Dict[str, np.ndarray]:
    """x with a known support of the projection, strict complementarity, and a loss weight w.

    Support S (size k = n − round(frac_active·n), at least 1) gets ``x_i = z_i + τ`` with
    ``z_i ∝ U(0.5, 1.5)`` summing to 1; the rest gets ``x_i = τ − u_i``, ``u_i ∝ U(0.5, 1.5)/k`` (a
    slack of the same scale as z). Then ``proj(x) = z`` (up to the rounding of x). The shift τ is
    of the same scale, ``N(0, 1)/k``, so that x carries no digits the answer cannot resolve.
    """
    rng = np.random.default_rng(seed)
    k = max(1, n - int(round(frac_active * n)))
    perm = rng.permutation(n)
    S, off = perm[:k], perm[k:]
    zS = rng.uniform(0.5, 1.5, k)
    zS /= zS.sum()
    tau = rng.normal() / k
    x = np.empty(n)
    x[S] = zS + tau
    x[off] = tau - rng.uniform(0.5, 1.5, n - k) / k
    z = np.zeros(n)
    z[S] = zS
    w = rng.normal(size=n)
    return {"x": x, "w": w, "k": np.array(k), "z_constructed": z}


def project_simplex(x: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {z ≥ 0, 1ᵀz = 1} (sort-based closed form).

    The support comes from the sort; the threshold θ is then recomputed over the support with an
    exactly rounded sum (``math.fsum``), so the reference is accurate to the rounding of x.
    """
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, len(x) + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    support = x - theta > 0
    theta = (math.fsum(x[support]) - 1.0) / int(support.sum())
    return np.maximum(x - theta, 0.0)


def exact_grad(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """∇_x (wᵀ proj(x)) = J w with J = diag(s) − s sᵀ/|s| (s: support of z)."""
    s = (z > 0).astype(np.float64)
    return s * (w - (s @ w) / s.sum())


# =============================================================================================
# Methods (run inside a worker)
# =============================================================================================
def _sparse_data(n: int):
    import torch

    def csc(M):
        import scipy.sparse as sp

        M = sp.csc_matrix(M)
        M.sort_indices()
        return torch.sparse_csc_tensor(
            torch.tensor(M.indptr, dtype=torch.int64),
            torch.tensor(M.indices, dtype=torch.int64),
            torch.tensor(M.data, dtype=torch.float64),
            size=M.shape,
        )

    import scipy.sparse as sp

    P = csc(sp.identity(n))
    A = csc(sp.csc_matrix(np.ones((1, n))))
    C = csc(-sp.identity(n))
    return P, C, torch.zeros(n, dtype=torch.float64), A, torch.ones(1, dtype=torch.float64)


def _dense_data(n: int):
    import torch

    P = torch.eye(n, dtype=torch.float64)
    C = -torch.eye(n, dtype=torch.float64)
    A = torch.ones(1, n, dtype=torch.float64)
    return P, C, torch.zeros(n, dtype=torch.float64), A, torch.ones(1, dtype=torch.float64)


def build_method(method: str, n: int, eps: float):
    """Return ``solve(x_tensor) -> z`` (differentiable in x) plus a dict of notes."""
    import torch

    kind, _, solver = method.partition(":")
    notes: Dict[str, Any] = {}
    if kind in ("dqp-sparse", "dqp-dense", "dqp-ipm"):
        from dqp import dQP

        if kind == "dqp-ipm":
            settings = dQP.build_settings(qp_solver="dqp_ipm", solve_type="dense", empty_batch=False)
            data = _dense_data(n)
        else:
            st = "sparse" if kind == "dqp-sparse" else "dense"
            settings = dQP.build_settings(
                qp_solver=solver,
                solve_type=st,
                eps_abs=eps,
                eps_rel=eps,
                empty_batch=False,
                **({"lin_solver": "qdldl"} if st == "sparse" else {}),
            )
            data = _sparse_data(n) if st == "sparse" else _dense_data(n)
        layer = dQP.dQP_layer(settings=settings)
        P, C, d, A, b = data

        def solve(x):
            z = layer(P, -x, C, d, A, b)[0]
            notes["info"] = layer.info
            return z

        return solve, notes
    if kind == "libdqp":
        from dqp import dQP  # libdqp's own package, in its own venv

        settings = dQP.build_settings(
            solve_type="sparse",
            qp_solver=solver or "osqp",
            lin_solver="qdldl",
            eps_abs=eps,
            eps_rel=eps,
            empty_batch=False,
        )
        layer = dQP.dQP_layer(settings=settings)
        P, C, d, A, b = _sparse_data(n)

        def solve(x):
            return layer(P, -x, C, d, A, b)[0]

        return solve, notes
    if kind == "qpth":
        from qpth.qp import QPFunction, QPSolvers

        P, C, d, A, b = _dense_data(n)
        f = QPFunction(verbose=-1, eps=eps, maxIter=50, solver=QPSolvers.PDIPM_BATCHED)

        def solve(x):
            return f(P, -x, C, d, A, b)[0]

        return solve, notes
    if kind == "qplayer":
        from proxsuite.torch.qplayer import QPFunction

        P, C, d, A, b = _dense_data(n)
        lo = torch.full((n,), -1e20, dtype=torch.float64)
        f = QPFunction(eps=eps, maxIter=10000)

        def solve(x):
            return f(P, -x, A, b, C, lo, d)[0].reshape(-1)

        return solve, notes
    if kind == "cvxpylayers":
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        xp = cp.Parameter(n)
        zv = cp.Variable(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(zv - xp)), [cp.sum(zv) == 1, zv >= 0])
        t0 = time.perf_counter()
        layer = CvxpyLayer(prob, parameters=[xp], variables=[zv])
        notes["setup_time"] = time.perf_counter() - t0
        args = {"eps": eps} if eps else {}

        def solve(x):
            return layer(x, solver_args=args)[0]

        return solve, notes
    raise ValueError(f"unknown method {method!r}")


def worker(args: argparse.Namespace) -> Dict[str, Any]:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

    torch.set_num_threads(args.threads)
    inst = make_instance(args.n, args.frac_active, args.seed)
    x_np, w_np = inst["x"], inst["w"]
    z_ex = project_simplex(x_np)
    g_ex = exact_grad(z_ex, w_np)
    rec: Dict[str, Any] = {
        "method": args.method,
        "n": args.n,
        "k_support": int(inst["k"]),
        "construction_err": float(np.max(np.abs(z_ex - inst["z_constructed"])) / np.max(z_ex)),
    }
    t0 = time.perf_counter()
    solve, notes = build_method(args.method, args.n, args.eps)
    rec["setup_time"] = time.perf_counter() - t0
    w = torch.tensor(w_np)
    fwd, bwd, solver_t = [], [], []
    deadline = time.perf_counter() + args.rep_budget
    z = g = None
    for r in range(args.reps + 1):  # the first run is a warm-up (imports, JIT, allocations)
        x = torch.tensor(x_np, requires_grad=True)
        t0 = time.perf_counter()
        z = solve(x)
        t1 = time.perf_counter()
        (z.reshape(-1) @ w).backward()
        t2 = time.perf_counter()
        g = x.grad
        st = sum(notes["info"].solve_time) if notes.get("info") is not None and notes["info"].solve_time else None
        if r > 0 or args.reps == 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            solver_t.append(st)
        if r == 0 and (t2 - t0) * (args.reps + 1) > args.rep_budget:
            fwd.append(t1 - t0)  # slow cell: the warm-up run is the measurement
            bwd.append(t2 - t1)
            solver_t.append(st)
            break
        if r > 0 and time.perf_counter() > deadline:
            break
    zn = z.detach().reshape(-1).numpy()
    gn = g.detach().reshape(-1).numpy()
    # best of the runs: this machine is shared, and the minimum is the least disturbed measurement
    tot = [a + b for a, b in zip(fwd, bwd)]
    best = int(np.argmin(tot))
    rec.update(
        status="ok", t_forward=fwd[best], t_backward=bwd[best], reps=len(fwd), t_total_median=float(np.median(tot))
    )
    rec["t_total"] = rec["t_forward"] + rec["t_backward"]
    rec["z_err"] = float(np.max(np.abs(zn - z_ex)) / np.max(np.abs(z_ex)))
    rec["grad_err"] = float(np.max(np.abs(gn - g_ex)) / max(np.max(np.abs(g_ex)), 1e-300))
    rec["finite"] = bool(np.all(np.isfinite(zn)) and np.all(np.isfinite(gn)))
    info = notes.get("info")
    if info is not None:
        rec["verified"] = bool(all(info.verified)) if info.verified else None
        it = info.iterations[0] if info.iterations else None
        rec["iterations"] = it
        rec["t_solver"] = solver_t[best]  # forward-solver seconds of the reported run
    if "setup_time" in notes:
        rec["layer_setup_time"] = notes["setup_time"]
    return rec


# =============================================================================================
# Driver
# =============================================================================================
def peer_python(method: str, override: Dict[str, str]) -> Optional[str]:
    kind = method.split(":")[0]
    if kind.startswith("dqp"):
        return sys.executable
    if kind in override:
        return override[kind]
    for p in PEER_PYTHONS.get(kind, []):
        if Path(p).exists():
            return str(p)
    return None


def run_cell(method: str, n: int, python: str, args: argparse.Namespace) -> Dict[str, Any]:
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        "--method",
        method,
        "--n",
        str(n),
        "--seed",
        str(args.seed),
        "--frac-active",
        str(args.frac_active),
        "--eps",
        str(args.eps),
        "--threads",
        str(args.threads),
        "--reps",
        str(args.reps),
        "--rep-budget",
        str(args.rep_budget),
    ]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(args.threads)
    if not method.startswith("dqp"):
        env.pop("PYTHONPATH", None)  # a peer venv must not see this repo's dqp
    cwd = tempfile.gettempdir()  # never the repo root: libdqp also imports as ``dqp``
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "status": "timeout", "error": f"no result within {args.cell_timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(MARKER):
            rec = json.loads(line[len(MARKER) :])
            rec["wall"] = time.perf_counter() - t0
            return rec
    tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])
    return {"method": method, "n": n, "status": "error", "error": f"rc={proc.returncode}: {tail[-300:]}"}


def _inprocess(method: str, n: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Run a dqp cell in this interpreter (``--short``: no subprocess start-up per cell)."""
    a = argparse.Namespace(**{**vars(args), "method": method, "n": n})
    try:
        return worker(a)
    except Exception as exc:  # noqa: BLE001
        return {"method": method, "n": n, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}


def label(method: str) -> str:
    kind, _, solver = method.partition(":")
    return f"{kind} ({solver})" if solver else kind


def methods_for(args: argparse.Namespace) -> List[str]:
    ms = [f"dqp-sparse:{s}" for s in args.dqp_sparse] + [f"dqp-dense:{s}" for s in args.dqp_dense]
    if not args.no_ipm:
        ms.append("dqp-ipm")
    for p in args.peers:
        ms += [f"libdqp:{s}" for s in args.libdqp_solver] if p == "libdqp" else [p]
    return ms


def driver(args: argparse.Namespace) -> int:
    from dqp.solvers import available_solvers

    avail = set(available_solvers())
    args.dqp_sparse = [s for s in args.dqp_sparse if s in avail]
    args.dqp_dense = [s for s in args.dqp_dense if s in avail]
    methods = methods_for(args)
    override = dict(kv.split("=", 1) for kv in args.peer_python)
    rows: List[Dict[str, Any]] = []
    dead: Dict[str, str] = {}
    for method in methods:
        py = peer_python(method, override)
        for n in args.grid:
            dense = method.startswith(("dqp-dense", "dqp-ipm", "qpth", "qplayer"))
            if py is None:
                rec = {"method": method, "n": n, "status": "n/a", "error": "peer venv not found"}
            elif dense and n > args.dense_max:
                rec = {"method": method, "n": n, "status": "n/a", "error": f"dense n×n inputs, n > {args.dense_max}"}
            elif method in dead:
                rec = {"method": method, "n": n, "status": "skipped", "error": dead[method]}
            elif args.inprocess and method.startswith("dqp"):
                rec = _inprocess(method, n, args)
            else:
                rec = run_cell(method, n, py, args)
                if rec["status"] != "ok":
                    dead[method] = f"{rec['status']} at n={n}"
            rec.setdefault("method", method)
            rows.append(rec)
            _log_row(rec)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_stem
    csv_path, md_path, png_path = (out_dir / f"{stem}.{e}" for e in ("csv", "md", "png"))
    write_csv(rows, csv_path)
    command = "python experiments/simplex_scaling.py " + " ".join(args.argv)
    md = write_markdown(rows, md_path, methods, args, command.strip())
    print(md)
    if plot(csv_path, png_path):
        print(f"plot: {png_path}")
    else:
        plotted = False
        for cand in (PEERS / "cvxpylayers" / "bin" / "python", PEERS / "bench" / "bin" / "python"):
            if cand.exists():
                r = subprocess.run(
                    [str(cand), str(Path(__file__).resolve()), "--plot", str(csv_path), str(png_path)],
                    capture_output=True,
                    text=True,
                    cwd=tempfile.gettempdir(),
                )
                if r.returncode == 0:
                    plotted = True
                    print(f"plot: {png_path}")
                    break
        if not plotted:
            logger.warning("matplotlib not available: no plot written")
    print(f"results: {csv_path}  {md_path}")
    return 0


def _log_row(rec: Dict[str, Any]) -> None:
    if rec.get("status") == "ok":
        logger.info(
            "%-24s n=%-7d fwd %.3es bwd %.3es z_err %.1e grad_err %.1e",
            rec["method"],
            rec["n"],
            rec["t_forward"],
            rec["t_backward"],
            rec["z_err"],
            rec["grad_err"],
        )
    else:
        logger.info("%-24s n=%-7d %s: %s", rec["method"], rec["n"], rec.get("status"), rec.get("error", ""))


COLUMNS = [
    "method",
    "n",
    "status",
    "t_forward",
    "t_backward",
    "t_total",
    "t_total_median",
    "t_solver",
    "z_err",
    "grad_err",
    "reps",
    "iterations",
    "verified",
    "k_support",
    "setup_time",
    "layer_setup_time",
    "wall",
    "error",
]


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)


def _t(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def _torch_version() -> str:
    try:
        import torch
    except ImportError:  # the report of a run without torch in this interpreter
        return "?"
    return torch.__version__


def git_version() -> str:
    """Short commit of the repository, with ``+dirty`` when tracked dqp files are modified."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "dqp", "solvers", "linsolve"],
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_markdown(
    rows: List[Dict[str, Any]], path: Path, methods: List[str], args: argparse.Namespace, command: str
) -> str:
    grid = args.grid
    cell = {(r["method"], r["n"]): r for r in rows}
    out = [
        "# Simplex projection scaling (forward + backward)",
        "",
        f"`{command}` — dqp {git_version()}, {platform.machine()} ({os.cpu_count()} CPUs), "
        f"torch {_torch_version()}, python {platform.python_version()}, {args.threads} thread(s) per worker, "
        f"fraction of active bounds {args.frac_active}, tolerance eps={args.eps}, "
        f"best of up to {args.reps} runs after a warm-up (medians in the CSV), cell budget {args.cell_timeout:.0f} s. "
        f"Loss wᵀz*, gradient w.r.t. x; errors are relative (‖·‖∞ / ‖exact‖∞) against the sort-based "
        f"closed form and its Jacobian diag(s) − ssᵀ/|s|.",
        "",
        "## Forward + backward time",
        "",
        "| method | " + " | ".join(f"n={n:g}" for n in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for m in methods:
        cells = []
        for n in grid:
            r = cell.get((m, n), {})
            cells.append(_t(r.get("t_total")) if r.get("status") == "ok" else r.get("status", "-"))
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Forward / backward split (ms):",
        "",
        "| method | " + " | ".join(f"n={n:g}" for n in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for m in methods:
        cells = []
        for n in grid:
            r = cell.get((m, n), {})
            cells.append(
                f"{r['t_forward'] * 1e3:.3g} / {r['t_backward'] * 1e3:.3g}"
                if r.get("status") == "ok"
                else r.get("status", "-")
            )
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    out += [
        "",
        "dqp: forward-solver share of the forward time (the rest is validation, active-set polish, "
        "KKT factorization and verification):",
        "",
        "| method | " + " | ".join(f"n={n:g}" for n in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for m in methods:
        if not m.startswith("dqp") or m == "dqp-ipm":
            continue
        cells = []
        for n in grid:
            r = cell.get((m, n), {})
            ok = r.get("status") == "ok" and r.get("t_solver") not in (None, "")
            cells.append(f"{100 * float(r['t_solver']) / r['t_forward']:.0f}%" if ok else "-")
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    # ratios: peer time / best dqp time at the same n
    dqp_methods = [m for m in methods if m.startswith("dqp")]
    peers = [m for m in methods if not m.startswith("dqp")]
    best: Dict[int, Tuple[str, float]] = {}
    for n in grid:
        ok = [(cell[(m, n)]["t_total"], m) for m in dqp_methods if cell.get((m, n), {}).get("status") == "ok"]
        if ok:
            t, m = min(ok)
            best[n] = (m, t)
    out += [
        "",
        "## Ratios: peer time / fastest dqp time at the same n (> 1: dqp is faster)",
        "",
        "fastest dqp: " + ", ".join(f"n={n:g}: {label(best[n][0])}" for n in grid if n in best),
        "",
        "| peer | " + " | ".join(f"n={n:g}" for n in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for m in peers:
        cells = []
        for n in grid:
            r = cell.get((m, n), {})
            cells.append(
                f"{r['t_total'] / best[n][1]:.3g}×" if r.get("status") == "ok" and n in best else r.get("status", "-")
            )
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    for lib in [m for m in peers if m.startswith("libdqp")]:
        same = f"dqp-sparse:{lib.split(':')[1]}"
        if same not in methods:
            continue
        cells = []
        for n in grid:
            a, b2 = cell.get((same, n), {}), cell.get((lib, n), {})
            cells.append(f"{b2['t_total'] / a['t_total']:.3g}×" if a.get("status") == b2.get("status") == "ok" else "-")
        if not any(c != "-" for c in cells):
            continue
        if "Same forward solver" not in "".join(out):
            out += [
                "",
                "Same forward solver (libdqp time / dqp time, > 1: dqp is faster):",
                "",
                "| pair | " + " | ".join(f"n={n:g}" for n in grid) + " |",
                "|---|" + "---|" * len(grid),
            ]
        out.append(f"| {label(lib)} / {label(same)} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Errors against the closed form (max over n of the relative ∞-norm error)",
        "",
        "| method | z error | gradient error | cells |",
        "|---|---|---|---|",
    ]
    for m in methods:
        ok = [cell[(m, n)] for n in grid if cell.get((m, n), {}).get("status") == "ok"]
        if ok:
            out.append(
                f"| {label(m)} | {max(r['z_err'] for r in ok):.1e} | {max(r['grad_err'] for r in ok):.1e} | {len(ok)} |"
            )
        else:
            out.append(f"| {label(m)} | - | - | 0 |")
    notes = sorted(
        {
            (label(r["method"]), r.get("status"), r.get("error", ""))
            for r in rows
            if r.get("status") not in ("ok",) and r.get("error")
        }
    )
    if notes:
        out += ["", "## Cells that did not run", ""]
        for m, st, err in notes:
            out.append(f"* {m}: {st} — {err}")
    text = "\n".join(out) + "\n"
    path.write_text(text)
    return text


def plot(csv_path: Path, png_path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: Dict[str, List[Tuple[float, float]]] = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok":
                series.setdefault(r["method"], []).append((float(r["n"]), float(r["t_total"])))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    cmap = plt.get_cmap("tab20")
    for i, (m, pts) in enumerate(series.items()):
        pts.sort()
        ours = m.startswith("dqp")
        ax.loglog(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "-" if ours else "--",
            marker="o" if ours else "s",
            ms=4,
            color=cmap(i % 20),
            label=label(m),
        )
    ax.set_xlabel("n (simplex dimension)")
    ax.set_ylabel("forward + backward time [s]")
    from plot_caption import caption

    ax.set_title("Differentiable projection onto the simplex, forward + backward\n" + caption(png_path), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path)
    return True


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--short", action="store_true", help="tiny grid, dqp only (seconds)")
    ap.add_argument("--grid", type=float, nargs="+", default=None, help="values of n")
    ap.add_argument("--frac-active", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, default=1e-8, help="forward tolerance for every method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rep-budget", type=float, default=5.0, help="seconds of repeated runs per cell")
    ap.add_argument("--cell-timeout", type=float, default=240.0)
    ap.add_argument("--dense-max", type=int, default=3000)
    ap.add_argument("--dqp-sparse", nargs="*", default=DQP_SPARSE)
    ap.add_argument("--dqp-dense", nargs="*", default=DQP_DENSE)
    ap.add_argument("--no-ipm", action="store_true")
    ap.add_argument("--peers", nargs="*", default=["libdqp", "qplayer", "qpth", "cvxpylayers"])
    ap.add_argument(
        "--libdqp-solver",
        nargs="+",
        default=["osqp", "piqp"],
        help="libdqp forward solvers (each compared with dqp on the same solver)",
    )
    ap.add_argument("--peer-python", nargs="*", default=[], help="KIND=/path/to/python overrides")
    ap.add_argument("--out-stem", default=None)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--inprocess", action="store_true", help="run dqp cells in this process (default with --short)")
    # worker / plot internals
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--plot", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.short:
        args.grid = args.grid or [10, 100, 300]
        args.inprocess = True
        args.peers = [p for p in args.peers if "--peers" in args.argv]  # peers only when asked
        args.dqp_dense = args.dqp_dense if "--dqp-dense" in args.argv else ["piqp"]
        args.dqp_sparse = args.dqp_sparse if "--dqp-sparse" in args.argv else ["osqp", "clarabel"]
        args.reps, args.rep_budget, args.cell_timeout = 2, 1.0, 60.0
        args.dense_max = min(args.dense_max, 300)
        args.out_stem = args.out_stem or "simplex_scaling_short"
    args.grid = [int(g) for g in (args.grid or [10, 100, 1000, 3000, 10000, 30000, 100000])]
    args.out_stem = args.out_stem or "simplex_scaling"
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.plot:
        return 0 if plot(Path(args.plot[0]), Path(args.plot[1])) else 1
    if args.worker:
        try:
            rec = worker(args)
        except Exception as exc:  # noqa: BLE001 - the study records failures
            import traceback

            where = traceback.extract_tb(exc.__traceback__)[-1]
            msg = str(exc).strip().splitlines()[0][:250] if str(exc).strip() else ""
            rec = {
                "method": args.method,
                "n": args.n,
                "status": "error",
                "error": f"{type(exc).__name__}: {msg} (in {Path(where.filename).parent.name}/"
                f"{Path(where.filename).name}:{where.name})",
            }
        print(MARKER + json.dumps(rec), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
