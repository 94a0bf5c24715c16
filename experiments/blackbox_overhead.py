"""The black-box path's own cost: dqp's forward next to its forward solver, and next to libdqp.

Families of cells, each timed in one worker process per implementation (one thread:
``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``), every number the process's CPU time (on
shared cores wall time measures the wait for a core), the minimum over ``--reps`` repetitions after
one warm-up call (and over ``--rounds`` runs of each family, the implementations taking turns):

* ``mm``: small Maros–Meszaros problems (sparse CSC input, every argument requiring gradients),
  forward solvers PIQP and Clarabel at 1e-8: the raw solver call through qpsolvers on the same
  data, the layer's forward, and forward + backward of ``loss = Σ z``; dqp's record also has
  ``layer.info``'s verification, polish path and factorization count;
* ``dense``: random strictly convex QPs (``P = LLᵀ + I``, ``C`` normal, ``d = C z₀ + s₀``), n = 10 and
  50, batches 1 and 32, DAQP and quadprog (dense input): forward + backward;
* ``loop``: one problem, same pattern, new values every call (``q`` and ``d`` perturbed), ``--calls``
  calls: the first call's time next to the median of the others;
* ``grid``: the 5-point Laplacian of a k×k grid (+10⁻²I) with bounds ``z ≤ d``, OSQP, Clarabel, PIQP,
  the layer called repeatedly: forward + backward next to the floor, raw solve + one QDLDL
  factorization of the reduced KKT system on dqp's active set;
* ``stages`` (dqp only): a profile of forward + backward by stage (validation, solver call,
  detection, assembly, equilibration, factorizations, solves, result, backward).

Implementations: ``ours`` (this checkout), ``libdqp`` (the reference implementation, which also
imports as ``dqp``; run with ``--libdqp-python``, the interpreter of a venv holding
``libdqp==0.1.2``), and optionally ``compare`` (``--compare-path``: a directory whose ``dqp``
package is another dqp build, e.g. an older commit laid out as an installed package).

The machine's cores may be shared: compare ratios measured in the same run, not absolute times
across runs. Outputs: ``<out>.csv`` (one row per cell × implementation) and ``<out>.md``.

Examples
--------
    python experiments/blackbox_overhead.py --short --out /tmp/bbo          # smoke (seconds)
    python experiments/blackbox_overhead.py --libdqp-python /path/to/libdqp-venv/bin/python
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_MM = (
    "HS21",
    "HS35",
    "HS118",
    "DUALC1",
    "QAFIRO",
    "QADLITTL",
    "QSCAGR7",
    "QSHARE2B",
    "QBANDM",
    "QRECIPE",
    "CVXQP1_S",
    "PRIMALC1",
    "QSC205",
    "AUG3DC",
)
SHORT_MM = ("HS21", "HS35")


# ------------------------------------------------------------------------------------------ data
def _mm_problem(name: str, directory: str):
    """``(P, q, C, d, A, b)`` of a Maros–Meszaros file in SciPy CSC / NumPy (dqp's own loader is not
    used, so every implementation reads the same arrays)."""
    import scipy.io
    import scipy.sparse as sp

    data = scipy.io.loadmat(os.path.join(directory, name + ".mat"))
    P = sp.csc_matrix(data["P"], dtype=np.float64)
    P = sp.csc_matrix((P + P.T) * 0.5)
    q = np.asarray(data["q"], dtype=np.float64).ravel()
    A = sp.csr_matrix(data["A"], dtype=np.float64)
    lo, up = (np.asarray(data[k], dtype=np.float64).ravel() for k in ("l", "u"))
    big = 1e19
    eq = np.isfinite(lo) & np.isfinite(up) & (lo == up) & (np.abs(up) < big)
    up_rows = np.flatnonzero(~eq & np.isfinite(up) & (np.abs(up) < big))
    lo_rows = np.flatnonzero(~eq & np.isfinite(lo) & (np.abs(lo) < big))
    C = sp.vstack([A[up_rows], -A[lo_rows]], format="csc")
    d = np.concatenate([up[up_rows], -lo[lo_rows]])
    Aeq = sp.csc_matrix(A[np.flatnonzero(eq)]) if eq.any() else None
    beq = up[eq] if eq.any() else None
    for M in (P, C, Aeq):
        if M is not None:
            M.sort_indices()
    return P, q, C, d, Aeq, beq


def _dense_problem(n: int, m: int, B: int, seed: int):
    g = np.random.default_rng(seed)
    L = g.standard_normal((B, n, n))
    P = L @ L.transpose(0, 2, 1) / n + np.eye(n)
    C = g.standard_normal((B, m, n))
    d = np.einsum("bij,bj->bi", C, g.standard_normal((B, n))) + g.random((B, m))
    q = g.standard_normal((B, n))
    return P, q, C, d


def _grid_problem(k: int, seed: int = 0):
    """``min ½zᵀ(L + 10⁻²I)z + qᵀz s.t. z ≤ d``: L the 5-point Laplacian of a k×k grid (n = k²),
    q normal, d uniform in [0.1, 0.15] (a fraction of the bounds active)."""
    import scipy.sparse as sp

    T = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(k, k))
    n = k * k
    P = (sp.kron(sp.eye(k), T) + sp.kron(T, sp.eye(k)) + 1e-2 * sp.eye(n)).tocsc()
    g = np.random.default_rng(seed)
    C = sp.eye(n, format="csc")
    for M in (P, C):
        M.sort_indices()
    return P, g.standard_normal(n), C, 0.1 + 0.05 * g.random(n), None, None


def _csc_tensor(M, requires_grad: bool):
    import torch

    vals = torch.tensor(M.data, dtype=torch.float64, requires_grad=requires_grad)
    T = torch.sparse_csc_tensor(
        torch.tensor(M.indptr, dtype=torch.int64),
        torch.tensor(M.indices, dtype=torch.int64),
        vals,
        size=M.shape,
        dtype=torch.float64,
    )
    return T, vals


def _sparse_inputs(prob, grad: bool):
    """Torch inputs (sparse CSC matrices, dense vectors) and the leaves that would get gradients."""
    import torch

    P, q, C, d, A, b = prob
    out, leaves = [], []
    for M in (P, q, C, d, A, b):
        if M is None:
            out.append(None)
        elif isinstance(M, np.ndarray):
            t = torch.tensor(M, dtype=torch.float64, requires_grad=grad)
            out.append(t)
            leaves.append(t)
        else:
            T, vals = _csc_tensor(M, False)
            out.append(T)
    return out, leaves


# ------------------------------------------------------------------------------------------ worker
#: the clock: the process's CPU time (every worker runs one thread). On a machine whose cores are
#: shared, wall time mostly measures the wait for a core; CPU time measures the work.
CLOCK = time.process_time


def _best(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return min(ts)


def _layer(impl: str, solver: str, sparse: bool):
    from dqp import dQP

    common = dict(qp_solver=solver, solve_type="sparse" if sparse else "dense", eps_abs=1e-8, eps_rel=1e-8)
    if impl == "libdqp":
        return dQP.dQP_layer(settings=dQP.build_settings(empty_batch=False, **common))
    return dQP.dQP_layer(settings=dQP.build_settings(**common))


def _raw_solver(prob, solver: str) -> float:
    import qpsolvers

    kw = {
        "piqp": {"eps_abs": 1e-8, "eps_rel": 1e-8},
        "clarabel": {"tol_gap_abs": 1e-8, "tol_gap_rel": 1e-8, "tol_feas": 1e-8},
    }.get(solver, {})
    P, q, C, d, A, b = prob
    return qpsolvers.solve_problem(qpsolvers.Problem(P, q, C, d, A, b), solver=solver, **kw)


def _info(layer) -> Dict[str, Any]:
    info = getattr(layer, "info", None)
    rec: Dict[str, Any] = {}
    for key in ("verified", "polish_path", "factorizations", "kkt_path"):
        v = getattr(info, key, None) if info is not None else None
        if isinstance(v, list) and v:
            x = v[0]
            rec[key] = x.item() if isinstance(x, np.generic) else x
    return rec


def worker_mm(cell: Dict[str, Any], impl: str, reps: int) -> Dict[str, Any]:
    import torch

    prob = _mm_problem(cell["name"], cell["dir"])
    rec: Dict[str, Any] = {"n": prob[0].shape[0], "m": len(prob[3]), "p": 0 if prob[4] is None else prob[4].shape[0]}
    if impl == "ours":
        rec["t_raw"] = _best(lambda: _raw_solver(prob, cell["solver"]), reps)
    layer = _layer(impl, cell["solver"], True)
    inputs, _ = _sparse_inputs(prob, False)

    def fwd():
        with torch.no_grad():
            layer(*inputs)

    def fwd_bwd():
        args, leaves = _sparse_inputs(prob, True)
        z = layer(*args)[0]
        z.sum().backward()

    rec["t_fwd"] = _best(fwd, reps)
    rec["t_fwd_bwd"] = _best(fwd_bwd, reps)
    rec.update(_info(layer))
    return rec


def worker_dense(cell: Dict[str, Any], impl: str, reps: int) -> Dict[str, Any]:
    import torch

    n, B = cell["n"], cell["B"]
    P, q, C, d = (torch.tensor(x) for x in _dense_problem(n, n, B, seed=n + B))
    if B == 1:
        P, q, C, d = P[0], q[0], C[0], d[0]
    layer = _layer(impl, cell["solver"], False)

    def fwd_bwd():
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        z = layer(P, qq, C, dd)[0]
        z.sum().backward()

    return {"n": n, "B": B, "t_fwd_bwd": _best(fwd_bwd, reps), **_info(layer)}


def worker_grid(cell: Dict[str, Any], impl: str, reps: int) -> Dict[str, Any]:
    """Large sparse cells: forward + backward next to the floor (raw solve + one factorization of the
    reduced KKT system on dqp's active set), with the layer called repeatedly (a reused workspace)."""
    import qdldl
    import scipy.sparse as sp

    prob = _grid_problem(cell["k"])
    P, q, C, d, A, b = prob
    rec: Dict[str, Any] = {"n": P.shape[0]}
    layer = _layer(impl, cell["solver"], True)

    def fwd_bwd():
        args, _ = _sparse_inputs(prob, True)
        layer(*args)[0].sum().backward()

    rec["t_fwd_bwd"] = _best(fwd_bwd, reps)
    rec.update(_info(layer))
    if impl == "ours":
        if cell["solver"] == "osqp":
            import osqp

            def raw():
                s = osqp.OSQP()
                s.setup(
                    sp.triu(P, format="csc"),
                    q,
                    C,
                    np.full(len(d), -1e30),
                    d,
                    verbose=False,
                    eps_abs=1e-8,
                    eps_rel=1e-8,
                    max_iter=20000,
                    polishing=False,
                )
                return s.solve()

            rec["t_raw"] = _best(raw, reps)
        else:
            rec["t_raw"] = _best(lambda: _raw_solver(prob, cell["solver"]), reps)
        J = np.flatnonzero(np.asarray(layer.info.active[0]))
        CJ = C.tocsr()[J]
        K = sp.bmat([[P, CJ.T], [CJ, -1e-12 * sp.eye(len(J))]], format="csc")
        rec["t_factor"] = _best(lambda: qdldl.Solver(K), reps)
        rec["floor"] = rec["t_raw"] + rec["t_factor"]
        rec["iterations"] = layer.info.iterations[0]
    return rec


def worker_loop(cell: Dict[str, Any], impl: str, reps: int) -> Dict[str, Any]:
    prob = _mm_problem(cell["name"], cell["dir"])
    layer = _layer(impl, cell["solver"], True)
    g = np.random.default_rng(0)
    P, q, C, d, A, b = prob
    times = []
    for k in range(cell["calls"]):
        pert = (P, q * (1 + 1e-3 * g.standard_normal(len(q))), C, d + 1e-4 * np.abs(d) * g.random(len(d)), A, b)
        args, _ = _sparse_inputs(pert, True)
        t0 = CLOCK()
        z = layer(*args)[0]
        z.sum().backward()
        times.append(CLOCK() - t0)
    rest = times[1:] or times
    return {
        "t_first": times[0],
        "t_rest_mean": statistics.fmean(rest),
        "t_rest_median": statistics.median(rest),
        "rest_over_first": statistics.median(rest) / times[0],
        **_info(layer),
    }


#: stage -> (file suffix, function names) whose cumulative profile time the stage is
STAGES = {
    "validate": ("dqp/problem.py", ("validate",)),
    "solver call": ("", ("solve_problem", "solve")),
    "detection": ("dqp/engine.py", ("detect_active",)),
    "assembly": ("dqp/kkt.py", ("assemble_kkt",)),
    "equilibration": ("dqp/kkt.py", ("ruiz_scaling",)),
    "factorizations": ("linsolve/scipy_solvers.py", ("factor", "refactor")),
    "solves + refinement": ("dqp/kkt.py", ("_solve_scaled",)),
    "polish (all)": ("dqp/engine.py", ("polish",)),
    "result assembly": ("dqp/engine.py", ("_result",)),
    "backward": ("dqp/autograd.py", ("backward",)),
}


def worker_stages(cell: Dict[str, Any], impl: str, reps: int) -> Dict[str, Any]:
    """Where a forward + backward spends its time: cumulative profile time of each stage's functions
    per call (the profiler inflates Python-heavy stages; read the shares, not the totals)."""
    import cProfile
    import pstats

    prob = _mm_problem(cell["name"], cell["dir"])
    layer = _layer(impl, cell["solver"], True)

    inputs = [_sparse_inputs(prob, True)[0] for _ in range(reps + 1)]  # built outside the profile

    def fwd_bwd(args):
        layer(*args)[0].sum().backward()

    fwd_bwd(inputs.pop())
    t0 = CLOCK()
    prof = cProfile.Profile(CLOCK)
    prof.enable()
    for args in inputs:
        fwd_bwd(args)
    prof.disable()
    rec: Dict[str, Any] = {"t_profiled": (CLOCK() - t0) / reps}
    stats = pstats.Stats(prof).stats
    # the solver's own module: OSQP and (on sparse data) PIQP are called directly, the others through qpsolvers
    solver_mod = {"osqp": "osqp_native", "piqp": "piqp_native"}.get(cell["solver"], "qpsolvers")
    for stage, (suffix, funcs) in STAGES.items():
        total = 0.0
        for (fname, _, func), (_, _, _, cum, callers) in stats.items():
            where = suffix or solver_mod
            if func in funcs and where in fname.replace(os.sep, "/"):
                # count only the outermost calls (no caller of the same stage)
                if not any(c[2] in funcs and where in c[0] for c in callers):
                    total += cum
        rec[f"stage_{stage}"] = total / reps
    return {**rec, **_info(layer)}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    cells = json.loads(Path(args.cells).read_text())
    run = {"mm": worker_mm, "dense": worker_dense, "loop": worker_loop, "stages": worker_stages, "grid": worker_grid}
    for cell in cells:
        try:
            rec = run[cell["family"]](cell, args.worker, args.reps)
            rec["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - a failing cell is recorded, not fatal
            rec = {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
        print(json.dumps({**{k: v for k, v in cell.items() if k != "dir"}, "impl": args.worker, **rec}), flush=True)


# ------------------------------------------------------------------------------------------ driver
def _run_impl(
    impl: str, python: str, cells: List[Dict[str, Any]], reps: int, tmp: Path, pythonpath: Optional[str], timeout: float
) -> List[Dict[str, Any]]:
    if impl != "ours":
        cells = [c for c in cells if c["family"] != "stages"]
    path = tmp / f"cells_{impl}.json"
    path.write_text(json.dumps(cells))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # libdqp and other builds also import as ``dqp``: run them outside this checkout
    cwd = str(HERE.parent) if impl == "ours" else str(tmp)
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--worker", impl, "--cells", str(path), "--reps", str(reps)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not out:
        raise RuntimeError(f"{impl} worker failed: {proc.stderr[-2000:]}")
    return out


def _min_over_rounds(rounds: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Each cell's record of the first round, its times (``t_*``, ``stage_*``) the minimum over the
    rounds where it ran ok, and the quantities derived from times recomputed."""
    out = []
    for r in rounds[0]:
        same = [o for rows in rounds for o in rows if _key(o) == _key(r) and o.get("status") == "ok"]
        rec = dict(same[0] if same else r)
        for k in rec:
            if (k.startswith("t_") or k.startswith("stage_")) and same:
                vals = [o[k] for o in same if isinstance(o.get(k), (int, float))]
                rec[k] = min(vals) if vals else rec[k]
        if "t_raw" in rec and "t_factor" in rec:
            rec["floor"] = rec["t_raw"] + rec["t_factor"]
        if "t_first" in rec and "t_rest_median" in rec:
            rec["rest_over_first"] = rec["t_rest_median"] / rec["t_first"]
        out.append(rec)
    return out


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _gmean(xs: List[float]) -> float:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")


def _key(r: Dict[str, Any], impl: Optional[str] = None) -> tuple:
    """A cell's identity (its defining fields, not its measured ones) and the implementation."""
    fields = {"dense": ("family", "solver", "n", "B"), "grid": ("family", "solver", "k")}.get(
        r["family"], ("family", "name", "solver")
    )
    return tuple(r.get(k) for k in fields) + (impl or r["impl"],)


def report(rows: List[Dict[str, Any]], impls: List[str]) -> str:
    by = {_key(r): r for r in rows}
    lines = [
        "# Black-box path overhead",
        "",
        "Ratios of times measured in one run (one thread per worker; CPU time of the worker process, "
        "shared cores: compare ratios, not absolute times across runs). Times in ms, each the minimum "
        "over the repetitions.",
        "",
    ]
    mm = [r for r in rows if r["family"] == "mm" and r["impl"] == "ours"]
    if mm:
        head = "| problem | solver | n | m | raw | dqp fwd | fwd/raw | dqp fwd+bwd |"
        sep = "|---|---|---|---|---|---|---|---|"
        for impl in impls[1:]:
            head += f" {impl} fwd/raw | {impl} fwd+bwd | dqp/{impl} fwd+bwd |"
            sep += "---|---|---|"
        head += " verified | path | factorizations |"
        sep += "---|---|---|"
        lines += ["## Small Maros–Meszaros problems (forward / raw solver)", "", head, sep]
        summary: Dict[str, Dict[str, List[float]]] = {}
        for r in mm:
            raw = r.get("t_raw")
            ratio = r["t_fwd"] / raw if r.get("status") == "ok" and raw else float("nan")
            s = summary.setdefault(
                r["solver"], {"ours": [], **{i: [] for i in impls[1:]}, **{f"fb_{i}": [] for i in impls[1:]}}
            )
            s["ours"].append(ratio)
            cells = [
                r["name"],
                r["solver"],
                _fmt(r.get("n")),
                _fmt(r.get("m")),
                _fmt(1e3 * raw if raw else None),
                _fmt(1e3 * r.get("t_fwd", float("nan"))),
                _fmt(ratio, 1),
                _fmt(1e3 * r.get("t_fwd_bwd", float("nan"))),
            ]
            for impl in impls[1:]:
                o = by.get(_key(r, impl), {})
                ok = o.get("status") == "ok" and raw
                ro = o["t_fwd"] / raw if ok else float("nan")
                fb = r["t_fwd_bwd"] / o["t_fwd_bwd"] if ok and r.get("status") == "ok" else float("nan")
                s[impl].append(ro)
                s[f"fb_{impl}"].append(fb)
                cells += [_fmt(ro, 1), _fmt(1e3 * o["t_fwd_bwd"]) if ok else o.get("status", "-")[:30], _fmt(fb)]
            cells += [_fmt(r.get("verified")), _fmt(r.get("polish_path")), _fmt(r.get("factorizations"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "| solver | impl | median fwd/raw | geo-mean fwd/raw | worst fwd/raw | median dqp/impl fwd+bwd |",
            "|---|---|---|---|---|---|",
        ]
        for solver, s in summary.items():
            for impl in impls:
                xs = [x for x in s[impl] if math.isfinite(x)]
                fb = [x for x in s.get(f"fb_{impl}", []) if math.isfinite(x)]
                lines.append(
                    f"| {solver} | {impl} | {_fmt(statistics.median(xs) if xs else None, 1)} | "
                    f"{_fmt(_gmean(xs), 1)} | {_fmt(max(xs) if xs else None, 1)} | "
                    f"{_fmt(statistics.median(fb) if fb else None)} |"
                )
    dense = [r for r in rows if r["family"] == "dense" and r["impl"] == "ours"]
    if dense:
        head, sep = "| solver | n | B | dqp fwd+bwd |", "|---|---|---|---|"
        for impl in impls[1:]:
            head += f" {impl} fwd+bwd | dqp/{impl} |"
            sep += "---|---|"
        lines += ["", "## Small dense problems (forward + backward, ms)", "", head, sep]
        for r in dense:
            cells = [r["solver"], str(r["n"]), str(r["B"]), _fmt(1e3 * r.get("t_fwd_bwd", float("nan")))]
            for impl in impls[1:]:
                o = by.get(_key(r, impl), {})
                ok = o.get("status") == "ok" and r.get("status") == "ok"
                cells += [
                    _fmt(1e3 * o["t_fwd_bwd"]) if ok else o.get("status", "-")[:30],
                    _fmt(r["t_fwd_bwd"] / o["t_fwd_bwd"]) if ok else "-",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    grid = [r for r in rows if r["family"] == "grid" and r["impl"] == "ours"]
    if grid:
        head = "| n | solver | raw solve | one KKT factorization | floor | dqp fwd+bwd | dqp / floor | iterations |"
        sep = "|---|---|---|---|---|---|---|---|"
        for impl in impls[1:]:
            head += f" {impl} fwd+bwd | dqp/{impl} |"
            sep += "---|---|"
        lines += ["", "## Grid Laplacian (repeated calls on one layer; ms)", "", head, sep]
        for r in grid:
            if r.get("status") != "ok":
                lines.append(f"| k={r['k']} | {r['solver']} | {r['status'][:60]} |")
                continue
            cells = [
                str(r["n"]),
                r["solver"],
                _fmt(1e3 * r["t_raw"]),
                _fmt(1e3 * r["t_factor"]),
                _fmt(1e3 * r["floor"]),
                _fmt(1e3 * r["t_fwd_bwd"]),
                _fmt(r["t_fwd_bwd"] / r["floor"]),
                _fmt(r.get("iterations")),
            ]
            for impl in impls[1:]:
                o = by.get(_key(r, impl), {})
                ok = o.get("status") == "ok"
                cells += [
                    _fmt(1e3 * o["t_fwd_bwd"]) if ok else o.get("status", "-")[:30],
                    _fmt(r["t_fwd_bwd"] / o["t_fwd_bwd"]) if ok else "-",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    stages = [r for r in rows if r["family"] == "stages" and r.get("status") == "ok"]
    if stages:
        lines += [
            "",
            "## Where dqp's forward + backward spends its time (profiled, ms per call)",
            "",
            "| problem | solver | total | " + " | ".join(STAGES) + " | factorizations | path |",
            "|---|---|---|" + "---|" * len(STAGES) + "---|---|",
        ]
        for r in stages:
            lines.append(
                f"| {r['name']} | {r['solver']} | {_fmt(1e3 * r['t_profiled'])} | "
                + " | ".join(_fmt(1e3 * r[f"stage_{k}"]) for k in STAGES)
                + f" | {_fmt(r.get('factorizations'))} | {_fmt(r.get('polish_path'))} |"
            )
    loop = [r for r in rows if r["family"] == "loop"]
    if loop:
        lines += [
            "",
            "## Repeated calls (same pattern, new values; forward + backward, ms)",
            "",
            "| problem | solver | impl | calls | first | median of the rest | rest / first |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in loop:
            if r.get("status") != "ok":
                lines.append(f"| {r['name']} | {r['solver']} | {r['impl']} | {r['calls']} | {r['status'][:40]} | | |")
                continue
            lines.append(
                f"| {r['name']} | {r['solver']} | {r['impl']} | {r['calls']} | {_fmt(1e3 * r['t_first'])} | "
                f"{_fmt(1e3 * r['t_rest_median'])} | {_fmt(r['rest_over_first'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="two tiny problems, few repetitions (the smoke test)")
    ap.add_argument("--names", default=None, help="comma-separated Maros–Meszaros names")
    ap.add_argument("--solvers", default="piqp,clarabel")
    ap.add_argument("--dense-solvers", default="daqp,quadprog")
    ap.add_argument("--families", default="mm,dense,loop,stages,grid", help="which cell families to run")
    ap.add_argument("--grid", default="100", help="grid sides k of the grid-Laplacian cells (n = k²)")
    ap.add_argument("--grid-solvers", default="osqp,clarabel,piqp")
    ap.add_argument("--loop-solvers", default="osqp,piqp", help="forward solvers of the repeated-call loop")
    ap.add_argument("--loop-problem", default="PRIMALC1", help="the repeated-call loop's problem")
    ap.add_argument(
        "--stage-problems",
        default="HS21,QSCAGR7,QBANDM,CVXQP1_S,PRIMALC1",
        help="problems of the stage profile (family 'stages', dqp only)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--rounds", type=int, default=1, help="run every family this often, implementations in turn; times: the minimum"
    )
    ap.add_argument("--calls", type=int, default=100, help="calls of the repeated-call loop")
    ap.add_argument(
        "--mm-dir", default=os.environ.get("DQP_MAROS_MESZAROS", str(HERE.parent.parent / "shared/data/maros_meszaros"))
    )
    ap.add_argument("--libdqp-python", default=None, help="interpreter of a venv with libdqp==0.1.2")
    ap.add_argument("--compare-path", default=None, help="a directory whose dqp package is another build")
    ap.add_argument("--out", default=str(HERE / "results" / "blackbox_overhead"))
    ap.add_argument("--timeout", type=float, default=3000.0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cells", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    names = args.names.split(",") if args.names else list(SHORT_MM if args.short else DEFAULT_MM)
    if not Path(args.mm_dir).is_dir():
        names = []
    reps = 1 if args.short else args.reps
    fams = set(args.families.split(","))
    cells: List[Dict[str, Any]] = []
    for name in names if "mm" in fams else ():
        for solver in args.solvers.split(","):
            cells.append({"family": "mm", "name": name, "solver": solver, "dir": args.mm_dir})
    sizes, batches = ((10,), (1, 4)) if args.short else ((10, 50), (1, 32))
    for solver in args.dense_solvers.split(",") if "dense" in fams else ():
        for n in sizes:
            for B in batches:
                cells.append({"family": "dense", "solver": solver, "n": n, "B": B})
    if "grid" in fams:
        for k in (int(x) for x in args.grid.split(",")):
            for solver in args.grid_solvers.split(","):
                cells.append({"family": "grid", "k": k, "solver": solver})
    if "stages" in fams:
        for name in args.stage_problems.split(","):
            for solver in args.solvers.split(","):
                cells.append({"family": "stages", "name": name, "solver": solver, "dir": args.mm_dir})
    if names and "loop" in fams:
        loop_name = names[0] if args.short else args.loop_problem
        for solver in args.loop_solvers.split(","):
            cells.append(
                {
                    "family": "loop",
                    "name": loop_name,
                    "solver": solver,
                    "dir": args.mm_dir,
                    "calls": 4 if args.short else args.calls,
                }
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="blackbox_overhead_")).resolve()
    impls = [("ours", sys.executable, None)]
    if args.libdqp_python:
        impls.append(("libdqp", args.libdqp_python, None))
    if args.compare_path:
        impls.append(("compare", sys.executable, args.compare_path))
    rounds: List[List[Dict[str, Any]]] = []
    for _ in range(1 if args.short else args.rounds):
        rows = []
        # family by family, every implementation in turn: cells compared with each other run minutes
        # apart at most, not a whole run apart (the load of shared cores drifts)
        for family in dict.fromkeys(c["family"] for c in cells):
            group = [c for c in cells if c["family"] == family]
            for impl, python, pp in impls:
                if impl == "ours" or family != "stages":
                    rows += _run_impl(impl, python, group, reps, tmp, pp, args.timeout)
        rounds.append(rows)
    rows = _min_over_rounds(rounds)
    keys = sorted({k for r in rows for k in r})
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    text = report(rows, [i[0] for i in impls])
    cmd = "python experiments/blackbox_overhead.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    out.with_suffix(".md").write_text(text + f"\nCommand: `{cmd}`\n")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
