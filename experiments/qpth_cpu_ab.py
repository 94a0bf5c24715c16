"""dqp vs qpth on the CPU with alternating calls in one process (robust to a noisy shared machine).

The issue-3 CPU cell: qpth's generator (experiments/bench_qpth.py), forward + backward of
``Σ w·z`` through ``dqp.qpth.QPFunction`` and ``qpth.qp.QPFunction``, called in turn for
``--rounds`` rounds after one warm-up each; prints the medians and their ratio.

Usage::

    OMP_WAIT_POLICY=PASSIVE python experiments/qpth_cpu_ab.py --threads 1 --batch 128 --n 100
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qpth import _import_qpth, make_problems  # noqa: E402

log = logging.getLogger("qpth_cpu_ab")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fused", choices=("auto", "off"), default="auto",
                    help="the fused kernel's C++ build (auto, dqp.qpth.QPFunction) or the torch loop (off: "
                         "solve_qp_batch(fused=False))")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    qpth = _import_qpth()
    from dqp.qpth import QPFunction
    ps = make_problems(args.batch, args.n, args.n, 0, "cpu")
    e = torch.empty(0, dtype=torch.float64)

    def run(layer) -> float:
        leaves = [x.detach().requires_grad_(True) for x in (ps.Q, ps.p, ps.G, ps.h)]
        t0 = time.perf_counter()
        z = layer(*leaves, e, e)
        torch.autograd.grad((z * ps.w).sum(), leaves)
        return time.perf_counter() - t0

    ours = QPFunction(verbose=-1, check_Q_spd=False)
    if args.fused == "off":
        from dqp.ipm_layer import solve_qp_batch
        ours = lambda Q, p, G, h, A, b: solve_qp_batch(Q, p, G, h, fused=False)[0]     # noqa: E731
    theirs = qpth.qp.QPFunction(verbose=-1, check_Q_spd=False)
    run(ours), run(theirs)
    ta, tb = [], []
    for _ in range(args.rounds):
        ta.append(run(ours))
        tb.append(run(theirs))
    a, b = statistics.median(ta), statistics.median(tb)
    log.info("B=%d n=m=%d float64 fwd+bwd, %d thread(s), fused %s, %d rounds: dqp %.0f ms (min %.0f), qpth %.0f ms "
             "(min %.0f), qpth/dqp %.2f", args.batch, args.n, torch.get_num_threads(), args.fused, args.rounds,
             1e3 * a, 1e3 * min(ta), 1e3 * b, 1e3 * min(tb), b / a)


if __name__ == "__main__":
    main()
