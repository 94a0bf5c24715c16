"""The polish's verdicts and work on every small Maros–Meszaros problem, next to another dqp build.

For each problem with n, m ≤ 1000 (``--max-size``) and each forward solver (PIQP and Clarabel at
1e-8, sparse input), one layer solves the problem: a first call with forward + backward of
``loss = Σ z`` (its ``layer.info``: verified, polish path, factorizations, active-set size; the
gradients' norms), then ``--reps`` forward calls whose minimum CPU time is the forward's time (a
layer called again on the same pattern: the warm-start state counts). Each implementation runs in a
worker process of its own, one thread.

Implementations: ``ours`` (this checkout) and optionally ``compare`` (``--compare-path``: a directory
whose ``dqp`` package is another build, e.g. an older commit laid out as an installed package). The
report lists verdicts lost and gained, the factorizations and forward time in all, and every cell
whose path, factorization count or active set differs.

Examples
--------
    python experiments/polish_sweep.py --short --out /tmp/ps                 # smoke (seconds)
    OMP_NUM_THREADS=1 python experiments/polish_sweep.py --compare-path /path/to/older/build
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
SHORT = ("HS21", "HS35", "QAFIRO")


def small_problems(directory: str, max_size: int) -> List[str]:
    """Names of the problems whose n and number of constraint rows are at most ``max_size``."""
    import scipy.io

    names = []
    for f in sorted(Path(directory).glob("*.mat")):
        mat = scipy.io.loadmat(f, variable_names=("P", "A"))
        if mat["P"].shape[0] <= max_size and mat["A"].shape[0] <= max_size:
            names.append(f.stem)
    return names


def _cell(name: str, solver: str, directory: str, reps: int) -> Dict[str, Any]:
    import blackbox_overhead as bo
    import torch

    prob = bo._mm_problem(name, directory)
    layer = bo._layer("ours", solver, True)
    rec: Dict[str, Any] = {"name": name, "solver": solver}
    args, leaves = bo._sparse_inputs(prob, True)
    layer(*args)[0].sum().backward()
    info = layer.info
    rec.update(
        status=info.status[0].name,
        verified=bool(info.verified[0]),
        path=info.polish_path[0],
        factorizations=int(info.factorizations[0]),
        n_active=int(np.sum(info.active[0])),
        grad_norms=[float(leaf.grad.norm()) for leaf in leaves if leaf.grad is not None],
    )
    inputs, _ = bo._sparse_inputs(prob, False)
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        with torch.no_grad():
            layer(*inputs)
        times.append(time.process_time() - t0)
    rec["t_fwd"] = min(times)
    return rec


def worker(args: argparse.Namespace) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))  # (blackbox_overhead's problem loaders)
    import dqp

    rows = []
    for name in args.names.split(","):
        for solver in args.solvers.split(","):
            try:
                rows.append(_cell(name, solver, args.dir, args.reps))
            except Exception as exc:  # a failing cell is reported, not fatal
                rows.append({"name": name, "solver": solver, "error": repr(exc)[:300]})
    version = getattr(dqp, "__version__", "?")
    print(json.dumps({"version": version, "rows": rows}))


def _run_impl(impl: str, args: argparse.Namespace, names: List[str]) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if impl == "compare":
        env["PYTHONPATH"] = args.compare_path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--dir", args.dir, "--reps", str(args.reps)]
    cmd += ["--names", ",".join(names), "--solvers", args.solvers]
    # (from outside the checkout: its root would shadow the build under test)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(ours: Dict[str, Any], other: Optional[Dict[str, Any]], command: str) -> str:
    a = {(r["name"], r["solver"]): r for r in ours["rows"]}
    lines = ["# The polish on small Maros–Meszaros problems", ""]
    lines.append(
        "One layer per problem and solver (sparse input, 1e-8): the first call's `layer.info` and the "
        "minimum CPU time of the forward over the repetitions (a layer called again on the same pattern). "
        f"dqp {ours['version']}" + ("" if other is None else f"; compare: dqp {other['version']} (another build)") + "."
    )
    lines.append("")
    ok = [r for r in a.values() if "error" not in r]
    solvers = sorted({r["solver"] for r in ok})
    lines += [
        "| solver | cells | verified | quick path | factorizations | forward time in all (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for s in solvers:
        rs = [r for r in ok if r["solver"] == s]
        lines.append(
            f"| {s} | {len(rs)} | {sum(r['verified'] for r in rs)} | {sum(r['path'] == 'quick' for r in rs)} | "
            f"{sum(r['factorizations'] for r in rs)} | {1e3 * sum(r['t_fwd'] for r in rs):.1f} |"
        )
    errors = [r for r in a.values() if "error" in r]
    if errors:
        lines += ["", "Cells that raised: " + ", ".join(f"{r['name']} ({r['solver']})" for r in errors) + "."]
    if other is not None:
        b = {(r["name"], r["solver"]): r for r in other["rows"]}
        both = [k for k in a if k in b and "error" not in a[k] and "error" not in b[k]]
        lost = [k for k in both if b[k]["verified"] and not a[k]["verified"]]
        gained = [k for k in both if a[k]["verified"] and not b[k]["verified"]]
        fa, fb = sum(a[k]["factorizations"] for k in both), sum(b[k]["factorizations"] for k in both)
        ta, tb = sum(a[k]["t_fwd"] for k in both), sum(b[k]["t_fwd"] for k in both)
        ratios = [a[k]["t_fwd"] / b[k]["t_fwd"] for k in both if b[k]["t_fwd"] > 0]
        ratio = statistics.median(ratios) if ratios else float("nan")
        lines += [
            "",
            "## Next to the compared build",
            "",
            f"{len(both)} cells: verdicts lost {len(lost)}, gained {len(gained)}"
            + (f" ({', '.join(f'{n} ({s})' for n, s in gained)})" if gained else "")
            + f"; factorizations {fb} → {fa}; forward time in all {1e3 * tb:.1f} → {1e3 * ta:.1f} ms "
            f"(median cell ratio {ratio:.2f}).",
            "",
            "| problem | solver | verified | path | factorizations | active rows | forward ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in both:
            x, y = b[k], a[k]
            if (x["verified"], x["path"], x["factorizations"], x["n_active"]) == (
                y["verified"],
                y["path"],
                y["factorizations"],
                y["n_active"],
            ):
                continue
            lines.append(
                f"| {k[0]} | {k[1]} | {x['verified']} → {y['verified']} | {x['path']} → {y['path']} | "
                f"{x['factorizations']} → {y['factorizations']} | {x['n_active']} → {y['n_active']} | "
                f"{1e3 * x['t_fwd']:.2f} → {1e3 * y['t_fwd']:.2f} |"
            )
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="three tiny problems, one repetition (the smoke test)")
    ap.add_argument("--dir", default=None, help="the Maros–Meszaros .mat files (default: dqp.io.maros_meszaros_dir())")
    ap.add_argument("--max-size", type=int, default=1000)
    ap.add_argument("--solvers", default="piqp,clarabel")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare-path", default=None, help="a directory whose dqp package is another build")
    ap.add_argument("--out", default=str(HERE / "results" / "polish_sweep"))
    ap.add_argument("--timeout", type=float, default=3000.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--names", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dir is None:
        from dqp.io import maros_meszaros_dir

        found = maros_meszaros_dir()
        args.dir = str(found) if found is not None else str(HERE.parent / "tests" / "data" / "maros_meszaros")
    if args.worker:
        worker(args)
        return 0
    if args.short:
        args.reps = 1
    names = list(SHORT) if args.short else small_problems(args.dir, args.max_size)
    ours = _run_impl("ours", args, names)
    other = _run_impl("compare", args, names) if args.compare_path else None
    command = " ".join(["python experiments/polish_sweep.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(ours, other, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    rows = [dict(r, impl="ours") for r in ours["rows"]] + (
        [dict(r, impl="compare") for r in other["rows"]] if other else []
    )
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
