"""Where the time of a batched dqp QP layer call goes, for a few IPM variants (one device run).

For qpth's generator (experiments/bench_qpth.py) at the issue-3 acceptance cells, times
``dqp.qpth.QPFunction`` forward+backward (median of ``--reps``), the IPM alone, and splits one
profiled call by the ``dqp::*`` ranges the library records (IPM setup/replays/eager iterations,
polish, backward), for each variant:

* ``solve``: ``trsm`` (two triangular solves per right-hand side), ``inverse`` (the Cholesky
  factor's explicit inverse), ``blocked<nb>`` (blocked Cholesky and solves with block size nb,
  :mod:`dqp.linsolve.blocked`), ``old`` (the inverse policy without the blocked path) or ``auto``
  (the shipped policy: :data:`dqp.solvers.ipm.INVERSE_SOLVE`, :data:`dqp.solvers.ipm.BLOCKED`);
  a suffix ``-nc`` switches the tail compaction off (:data:`dqp.solvers.ipm.COMPACT`), ``-pe`` the
  polish and backward graphs (:data:`dqp.ipm_layer.POLISH_GRAPH`), ``-ns`` the graph per step
  (:data:`dqp.solvers.ipm.SPLIT_GRAPHS`), ``-ng`` the setup graph (:data:`dqp.solvers.ipm.SETUP_GRAPH`),
  ``-pg`` raises :data:`dqp.ipm_layer.POLISH_GRAPH_MAX_WORK` to 2e7 and ``-nt`` switches the tail checks
  off (:data:`dqp.solvers.ipm.TAIL_CHECKS`), in the order ``auto-nc-pe-ns-ng-pg-nt``;
* ``check_every``: iterations per CUDA-graph replay (one host read of the "all done" flag each);
* ``compile``: the captured iteration compiled with ``torch.compile`` first (``ipm_solve(compile=True)``).

Usage::

    python experiments/gpu_probe.py --device cuda --out /tmp/probe.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qpth import _times as _timed, make_problems  # noqa: E402


def set_solve_variant(solve: str) -> None:
    """Set the IPM's factorization/solve policy switches for a probe variant name."""
    import dqp.solvers.ipm as ipm
    import dqp.ipm_layer as lay
    ipm.INVERSE_SOLVE, ipm.BLOCKED, ipm.BLOCK_SIZE, ipm.COMPACT = "auto", "auto", None, True
    ipm.SPLIT_GRAPHS = ipm.SETUP_GRAPH = ipm.TAIL_CHECKS = lay.POLISH_GRAPH = True
    if solve.endswith("-nt"):                       # checks every check_every steps, also in the tail
        ipm.TAIL_CHECKS = False
        solve = solve[:-3]
    lay.POLISH_GRAPH_MAX_WORK = 2_000_000
    if solve.endswith("-pg"):                       # polish and backward graphs up to B·k² = 2e7
        lay.POLISH_GRAPH_MAX_WORK = 20_000_000
        solve = solve[:-3]
    if solve.endswith("-ng"):                       # eager IPM setup
        ipm.SETUP_GRAPH = False
        solve = solve[:-3]
    if solve.endswith("-ns"):                       # one graph per replay (not one per step)
        ipm.SPLIT_GRAPHS = False
        solve = solve[:-3]
    if solve.endswith("-pe"):                       # eager polish and backward
        lay.POLISH_GRAPH = False
        solve = solve[:-3]
    if solve.endswith("-nc"):                       # without tail compaction
        ipm.COMPACT = False
        solve = solve[:-3]
    if solve == "inverse":
        ipm.INVERSE_SOLVE, ipm.BLOCKED = "always", "never"
    elif solve == "trsm":
        ipm.INVERSE_SOLVE, ipm.BLOCKED = "never", "never"
    elif solve == "old":
        ipm.BLOCKED = "never"
    elif solve.startswith("blocked"):
        ipm.INVERSE_SOLVE, ipm.BLOCKED, ipm.BLOCK_SIZE = "never", "always", int(solve[len("blocked"):])
    elif solve != "auto":
        raise ValueError(f"unknown solve variant {solve!r}")


def probe_cell(B: int, n: int, device: str, variant: Dict, reps: int) -> Dict:
    import dqp.solvers.ipm as ipm
    from dqp.qpth import QPFunction
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    set_solve_variant(variant["solve"])
    ps = make_problems(B, n, n, 0, device)
    Q, p, G, h, w = ps.Q, ps.p, ps.G, ps.h, ps.w
    e = torch.empty(0, dtype=Q.dtype, device=device)
    kw = dict(check_every=variant["check_every"], compile=variant["compile"])
    t0 = time.perf_counter()
    res = ipm.ipm_solve(Q, p, G, h, **kw)
    sync()
    t_first = time.perf_counter() - t0
    it = res.iterations.double()
    t_ipm = _timed(lambda: ipm.ipm_solve(Q, p, G, h, **kw), reps, sync)

    # the layer with the same IPM options
    from dqp.ipm_layer import solve_qp_batch
    leaves = [x.detach().requires_grad_(True) for x in (Q, p, G, h)]

    def fb():
        z = solve_qp_batch(*leaves, None, None, **kw)[0]
        return torch.autograd.grad((z * w).sum(), leaves)

    with torch.no_grad():
        t_fwd = _timed(lambda: solve_qp_batch(Q, p, G, h, None, None, **kw), reps, sync)

    def bwd_only():
        z = solve_qp_batch(*leaves, None, None, **kw)[0]
        loss = (z * w).sum()
        sync()
        t0 = time.perf_counter()
        torch.autograd.grad(loss, leaves)
        sync()
        return time.perf_counter() - t0
    t_bwd = [bwd_only() for _ in range(reps)]
    g0 = dict(ipm._graph_stats)
    t_fb = _timed(fb, reps, sync)
    g1 = dict(ipm._graph_stats)
    layer = QPFunction(verbose=-1, check_Q_spd=False)
    t_qpf = _timed(lambda: torch.autograd.grad((layer(*leaves, e, e) * w).sum(), leaves), reps, sync)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fb()
        sync()
    ev = prof.key_averages()
    ranges = {}
    for x in ev:
        if x.key.startswith("dqp::"):
            dev_t = getattr(x, "device_time_total", None)
            if dev_t is None:
                dev_t = getattr(x, "cuda_time_total", 0.0)
            ranges[x.key] = dict(count=x.count, cpu_ms=x.cpu_time_total / 1e3, dev_ms=dev_t / 1e3)
    launches = sum(x.count for x in ev if x.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                      "cuLaunchKernelEx", "cudaGraphLaunch"))
    graph_launches = sum(x.count for x in ev if x.key == "cudaGraphLaunch")
    top = ev.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12,
                   max_name_column_width=50)
    if cuda:
        # where the host spends its time (synchronizations, allocations, launches)
        top += "\n" + ev.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50)
    return dict(B=B, n=n, variant=variant, first_call_s=t_first, ipm_ms=1e3 * statistics.median(t_ipm),
                fb_ms=1e3 * statistics.median(t_fb), fb_min_ms=1e3 * min(t_fb),
                fwd_ms=1e3 * statistics.median(t_fwd), bwd_ms=1e3 * statistics.median(t_bwd),
                qpfunction_ms=1e3 * statistics.median(t_qpf),
                iters_median=float(it.median()), iters_max=float(it.max()),
                statuses=sorted(set(res.status.tolist())), form=res.form,
                graph_captures=g1["captures"] - g0["captures"], graph_hits=g1["hits"] - g0["hits"],
                compactions=g1["compactions"] - g0["compactions"],
                ranges=ranges, launches=launches, graph_launches=graph_launches, top=top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cells", default="128x100,1024x100,128x500")
    ap.add_argument("--variants", default="trsm:4:0,trsm:4:1,inverse:4:0,inverse:4:1",
                    help="solve:check_every:compile list")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)
    lines = [f"### dqp layer probe on {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}"
             f" (torch {torch.__version__})", "",
             "| B | n=m | solve | check_every, compile | fwd+bwd (solve_qp_batch) | QPFunction fwd+bwd | ipm_solve / forward "
             "(no grad) / backward alone | iters med/max "
             "| ranges (cpu ms / device ms) | launches (graph) | first call |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = []
    for cell in args.cells.split(","):
        B, n = (int(x) for x in cell.split("x"))
        for vs in args.variants.split(","):
            solve, ce, comp = vs.split(":")
            ce, comp = int(ce), bool(int(comp))
            v = dict(solve=solve, check_every=ce, compile=comp)
            try:
                r = probe_cell(B, n, args.device, v, args.reps)
            except Exception as exc:  # noqa: BLE001 - report and go on
                import traceback
                traceback.print_exc()
                lines.append(f"| {B} | {n} | {solve} | {ce}, {comp} | failed: {type(exc).__name__}: {exc} ||||||")
                continue
            results.append(r)
            rg = "; ".join(f"{k[5:]} ×{v_['count']}: {v_['cpu_ms']:.2f}/{v_['dev_ms']:.2f}"
                           for k, v_ in sorted(r["ranges"].items()))
            lines.append(f"| {B} | {n} | {solve} | {ce}, {comp} | {r['fb_ms']:.2f} ms (min {r['fb_min_ms']:.2f}) "
                         f"| {r['qpfunction_ms']:.2f} ms | {r['ipm_ms']:.2f} / {r['fwd_ms']:.2f} / {r['bwd_ms']:.2f} ms | {r['iters_median']:.0f}/"
                         f"{r['iters_max']:.0f} {r['statuses']} | {rg} | {r['launches']} "
                         f"({r['graph_launches']}; captures {r['graph_captures']}, hits {r['graph_hits']}, "
                         f"compactions {r['compactions']}) "
                         f"| {r['first_call_s']:.1f} s |")
            print(lines[-1], flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    lines.append("")
    for r in results:
        lines += [f"#### B={r['B']} n={r['n']} {r['variant']}", "```", r["top"], "```", ""]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            [{k: v for k, v in r.items() if k != "top"} for r in results], indent=1))


if __name__ == "__main__":
    main()
