"""The CPU build of the fused kernel under load: static vs dynamic split of the batch, 1 and 2 threads,
with and without another process busy on one core, and qpth beside it — interleaved in one process.

qpth's generator (experiments/bench_qpth.py), forward + backward of ``Σ w·z``; dqp through
:func:`dqp.ipm_layer.solve_qp_batch` (the engine of ``dqp.qpth.QPFunction``) with
``KernelOptions(cpu_split=...)``. Every round runs every cell once, without and then with a busy
process (``python -c "while True: pass"``, started for that half of the round and stopped after),
so machine noise spreads over all cells alike; the table gives medians over the rounds.

Usage::

    OMP_WAIT_POLICY=PASSIVE python experiments/cpu_load_ab.py --rounds 7 --batch 128 --n 100
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qpth import _import_qpth, make_problems  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--qpth-rounds", type=int, default=3)
    args = ap.parse_args()
    from dqp.ipm_layer import solve_qp_batch
    from dqp.solvers.ipm import IPMOptions, KernelOptions

    qpth = _import_qpth()
    ps = make_problems(args.batch, args.n, args.n, 0, "cpu")
    e = torch.empty(0, dtype=torch.float64)
    opts = {s: IPMOptions(kernel=KernelOptions(cpu_split=s)) for s in ("static", "dynamic")}
    theirs = qpth.qp.QPFunction(verbose=-1, check_Q_spd=False)

    def run(split) -> float:
        leaves = [x.detach().requires_grad_(True) for x in (ps.Q, ps.p, ps.G, ps.h)]
        t0 = time.perf_counter()
        if split == "qpth":
            z = theirs(*leaves, e, e)
        else:
            z = solve_qp_batch(*leaves, options=opts[split])[0]
        torch.autograd.grad((z * ps.w).sum(), leaves)
        return time.perf_counter() - t0

    cells = [(t, s) for t in (1, 2) for s in ("static", "dynamic", "qpth")]
    times = {(load, t, s): [] for load in (False, True) for t, s in cells}
    for t, s in cells:  # warm-up (builds, caches)
        torch.set_num_threads(t)
        run(s)
    for r in range(args.rounds):
        for load in (False, True):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load else None
            try:
                time.sleep(0.2 if load else 0.0)
                for t, s in cells:
                    if s == "qpth" and r >= args.qpth_rounds:
                        continue
                    torch.set_num_threads(t)
                    times[(load, t, s)].append(run(s))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    print(
        f"B={args.batch} n=m={args.n} float64 fwd+bwd, medians over {args.rounds} rounds (qpth {args.qpth_rounds}), ms"
    )
    print("| load | threads | dqp static | dqp dynamic | qpth | qpth/dqp dynamic |")
    print("|---|---|---|---|---|---|")
    for load in (False, True):
        for t in (1, 2):
            med = {s: 1e3 * statistics.median(times[(load, t, s)]) for s in ("static", "dynamic", "qpth")}
            print(
                f"| {'one busy process' if load else 'none'} | {t} | {med['static']:.0f} | {med['dynamic']:.0f} "
                f"| {med['qpth']:.0f} | {med['qpth'] / med['dynamic']:.2f} |"
            )


if __name__ == "__main__":
    main()
