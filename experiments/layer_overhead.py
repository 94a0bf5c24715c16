"""The layer's overhead on the batched path: ``dQP_layer(qp_solver="dqp_ipm")`` against
``dqp.qpth.QPFunction`` (the same engine), interleaved in one process.

qpth's generator (experiments/bench_qpth.py), float64, forward + backward of ``Σ w·z``, the two
doors called in turn for ``--rounds`` rounds after a warm-up; prints per cell the medians and the
ratio layer / QPFunction. ``--info`` also reads ``layer.info`` after every call (its lists are
materialized on first access: that cost is shown apart).

Usage::

    OMP_NUM_THREADS=1 python experiments/layer_overhead.py --device cpu --rounds 15
    python experiments/layer_overhead.py --device cuda --rounds 50 --batches 1 128 1024 --sizes 10 100 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qpth import make_problems  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    ap.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process: this process's CPU time (CPU only, one thread: less sensitive to other "
        "processes on a shared machine)",
    )
    ap.add_argument("--info", action="store_true", help="read layer.info (every list) after each call")
    args = ap.parse_args()
    from dqp import dQP
    from dqp.qpth import QPFunction

    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm"))
    door = QPFunction(verbose=-1, check_Q_spd=False)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    print(
        f"device {args.device}, threads {torch.get_num_threads()}, {args.clock} clock, float64 fwd+bwd, medians over "
        f"{args.rounds} rounds, ms"
    )
    print("| B | n=m | dQP_layer | QPFunction | layer / QPFunction |")
    print("|---|---|---|---|---|")
    for B in args.batches:
        for n in args.sizes:
            ps = make_problems(B, n, n, 0, args.device)
            e = torch.empty(0, dtype=torch.float64, device=args.device)

            def run(which) -> float:
                leaves = [x.detach().requires_grad_(True) for x in (ps.Q, ps.p, ps.G, ps.h)]
                _sync(args.device)
                t0 = clock()
                if which == "layer":
                    z = layer(*leaves, None, None)[0]
                else:
                    z = door(*leaves, e, e)
                torch.autograd.grad((z * ps.w).sum(), leaves)
                if which == "layer" and args.info:
                    info = layer.info
                    _ = (info.status, info.verified, info.primal_residual, info.complementarity_margin)
                _sync(args.device)
                return clock() - t0

            for w in ("layer", "door"):
                run(w)
            ta, tb = [], []
            for _ in range(args.rounds):
                ta.append(run("layer"))
                tb.append(run("door"))
            a, b = 1e3 * statistics.median(ta), 1e3 * statistics.median(tb)
            print(f"| {B} | {n} | {a:.2f} | {b:.2f} | {a / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
