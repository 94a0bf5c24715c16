"""Host vs device time of one dqp forward+backward on the GPU (where the wall time of a small
batch goes when the device idles): synchronized wall times of the forward, the backward and both;
the host time of each (until the call returns, device not awaited); the time of ``ipm_solve`` with
and without the in-kernel polish between CUDA events (setup, kernel and host gaps); and a cProfile
of the host's Python.

Usage::

    python experiments/host_probe.py --cells 128x100 --reps 30 --out /tmp/host_probe.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qpth import make_problems  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="128x100")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from dqp.qpth import QPFunction
    from dqp.solvers.ipm import ipm_solve
    dev = "cuda"
    sync = torch.cuda.synchronize
    lines = []
    for cell in args.cells.split(","):
        B, n = (int(x) for x in cell.split("x"))
        ps = make_problems(B, n, n, 0, dev)
        Q, p, G, h, w = (getattr(ps, k).double() for k in ("Q", "p", "G", "h", "w"))
        e = torch.empty(0, dtype=Q.dtype, device=dev)
        layer = QPFunction(verbose=-1, check_Q_spd=False)
        leaves = [x.detach().requires_grad_(True) for x in (Q, p, G, h)]
        for _ in range(3):
            z = layer(*leaves, e, e)
            torch.autograd.grad((z * w).sum(), leaves)
        sync()
        rec = {k: [] for k in ("fwd wall", "fwd host", "bwd wall", "bwd host", "fwd+bwd wall")}
        for _ in range(args.reps):
            sync()
            t0 = time.perf_counter()
            z = layer(*leaves, e, e)
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            loss = (z * w).sum()
            t3 = time.perf_counter()
            torch.autograd.grad(loss, leaves)
            t4 = time.perf_counter()
            sync()
            t5 = time.perf_counter()
            rec["fwd host"].append(t1 - t0)
            rec["fwd wall"].append(t2 - t0)
            rec["bwd host"].append(t4 - t3)
            rec["bwd wall"].append(t5 - t3)
            rec["fwd+bwd wall"].append(t5 - t0)
        lines.append(f"## B={B}, n=m={n}, float64 (median of {args.reps}, ms)")
        lines += [f"{k:14s} {1e3 * statistics.median(v):7.3f}  (min {1e3 * min(v):.3f})" for k, v in rec.items()]
        for rounds in (0, 3):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ts = []
            for _ in range(10):
                ev[0].record()
                ipm_solve(Q, p, G, h, eps=1e-8, polish_rounds=rounds)
                ev[1].record()
                sync()
                ts.append(ev[0].elapsed_time(ev[1]))
            lines.append(f"ipm_solve(polish_rounds={rounds}) events {statistics.median(ts):.3f} ms")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            z = layer(*leaves, e, e)
            torch.autograd.grad((z * w).sum(), leaves)
        sync()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(45)
        lines.append("cProfile of 20 fwd+bwd calls, by tottime:")
        lines.append(s.getvalue())
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(60)
        lines.append("by cumulative:")
        lines.append(s.getvalue())
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
