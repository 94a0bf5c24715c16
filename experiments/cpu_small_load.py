"""Small and mid-size batches on the CPU with another process busy on one core: 1 and 2 torch threads.

A torch operation that starts a parallel region waits for the worker thread that shares the busy
core, so a solve of a few small QPs can take many times its work. ``IPMOptions.cpu_serial_max_work``
runs such batches on one thread; this study measures ``dqp.qpth.QPFunction`` (float64, qpth's
generator, forward + backward of ``Σ w·z``) at 1 and 2 threads, with no load and with one busy
process, for this checkout and optionally another build (``--compare-path``: a directory whose
``dqp`` package is, e.g., an older commit laid out as an installed package).

Each (implementation, load) runs in its own worker process, which takes 1 and 2 threads in turn
for every repetition (a change of the machine's load meets both alike); the configurations run in
turn for ``--rounds`` rounds; times are wall-clock medians over the repetitions, then the median
over the rounds.

Usage::

    python experiments/cpu_small_load.py --rounds 3 --compare-path /path/to/old/site
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
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
CELLS = ((1, 10), (1, 50), (1, 100), (8, 50), (16, 100), (32, 50), (128, 50), (128, 100))
SHORT_CELLS = ((1, 10), (4, 10))


def worker(reps: int, cells) -> Dict[str, float]:
    """Every cell at 1 and 2 torch threads, the two taken in turn for each repetition (so that a
    change of the machine's load meets both alike); medians, ms."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_qpth import make_problems
    from dqp.qpth import QPFunction

    f = QPFunction(verbose=-1, check_Q_spd=False)
    out: Dict[str, object] = {}
    for B, n in cells:
        ps = make_problems(B, n, n, 0, "cpu")
        leaves = [getattr(ps, k).detach().requires_grad_(True) for k in ("Q", "p", "G", "h")]
        e = torch.empty(0, dtype=torch.float64)

        def run():
            z = f(*leaves, e, e)
            return z.detach(), torch.autograd.grad((z * ps.w).sum(), leaves)

        ts: Dict[int, List[float]] = {1: [], 2: []}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            z, grads = run()
            out[f"{B}x{n}:{threads}:z"] = z.flatten().tolist()
            out[f"{B}x{n}:{threads}:grad_p"] = grads[1].flatten().tolist()
        for _ in range(reps if B * n < 2000 else max(reps // 4, 3)):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                run()
                ts[threads].append(time.perf_counter() - t0)
        for threads in (1, 2):
            out[f"{B}x{n}:{threads}"] = statistics.median(ts[threads]) * 1e3
    return out


def _run(impl: str, reps: int, compare: Optional[str], short: bool) -> Dict[str, float]:
    env = dict(os.environ)
    if impl == "compare":
        env["PYTHONPATH"] = compare + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", "--reps", str(reps)] + (["--short"] if short else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/", timeout=900)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _max_diff(a: List[float], b: List[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def report(rows: List[dict], impls: List[str], cells) -> str:
    lines = [
        "# Small and mid-size CPU batches under load: 1 and 2 threads",
        "",
        f"`python experiments/cpu_small_load.py {' '.join(sys.argv[1:])}` (float64, qpth's generator, "
        "forward + backward, wall-clock ms, medians; load: one other process spinning on a core).",
        "",
        "| cell (B×n) | impl | load | 1 thread | 2 threads | 2 / 1 | max diff z, ∇p (1 vs 2 threads) |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in [f"{B}x{n}" for B, n in cells]:
        for impl in impls:
            for load in ("none", "busy"):
                (r,) = [x for x in rows if x["impl"] == impl and x["load"] == load]
                t1, t2 = r[f"{cell}:1"], r[f"{cell}:2"]
                diff = max(_max_diff(r[f"{cell}:1{k}"], r[f"{cell}:2{k}"]) for k in (":z", ":grad_p"))
                lines.append(f"| {cell} | {impl} | {load} | {t1:.2f} | {t2:.2f} | {t2 / t1:.2f} | {diff:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--compare-path", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_small_load"))
    ap.add_argument("--short", action="store_true", help="two tiny cells, one round, few repetitions (smoke)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cells = SHORT_CELLS if a.short else CELLS
    if a.short:
        a.rounds, a.reps = 1, 3
    if a.worker:
        print(json.dumps(worker(a.reps, cells)))
        return 0
    impls = ["ours"] + (["compare"] if a.compare_path else [])
    per: Dict[tuple, List[dict]] = {}
    for _ in range(a.rounds):
        for load in ("none", "busy"):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                for impl in impls:
                    per.setdefault((impl, load), []).append(_run(impl, a.reps, a.compare_path, a.short))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    rows = []
    for (impl, load), runs in per.items():
        row = {"impl": impl, "load": load}
        row.update(
            {k: runs[0][k] if k.endswith(("z", "grad_p")) else statistics.median(r[k] for r in runs) for k in runs[0]}
        )
        rows.append(row)
    text = report(rows, impls, cells)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
