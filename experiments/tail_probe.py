"""The parts of a ``dqp.qpth.QPFunction`` call around the fused kernel, for a few variants (one device run).

For qpth's generator (experiments/bench_qpth.py), float64, at the given cells: times forward+backward,
the forward alone and the backward alone (CUDA events around ``loss.backward()`` after a synchronized
forward), medians of ``--reps``, for each variant of the module switches:

* ``base``: the shipped policy;
* ``bwd-eager``: the backward not replayed as a CUDA graph (``dqp.ipm_layer.BACKWARD_GRAPH_MAX_WORK = 0``);
* ``setup-eager``: the IPM's setup not replayed as a CUDA graph (``dqp.solvers.ipm.SETUP_GRAPH = False``);
* ``bwd-refine0``: no refinement step in the backward's solve (for the cost of that step only: not a
  candidate default);
* ``stage<eps>`` (e.g. ``stage1e-3``): the kernel's first IPM stage stops at eps
  (``dqp.ipm_layer.POLISH_STAGE_EPS``); ``stages<eps1>:<eps2>``: three stages (eps1, eps2, then the IPM's);
* ``outer-mul``: the gradients' outer products by a product and ``addcmul_`` (``dqp.gradients.OUTER``);
* ``factor-always`` / ``factor-never``: batched Cholesky factors by ``dqp_chol_block`` wherever it
  runs / never (``dqp.solvers.ipm.FACTOR_KERNEL``);
* ``solve-never``: batched one-vector Cholesky solves by the library's triangular solves, not by
  ``dqp_chol_solve_vec`` (``dqp.solvers.ipm.SOLVE_KERNEL``);

and the kernels of one profiled backward, by name (count, device µs).

Usage::

    python experiments/tail_probe.py --cells 1024x100,128x100 --out /tmp/tail_probe.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qpth import make_problems  # noqa: E402


#: The module switches the variants change, as (module, attribute); their shipped values are read
#: once, before the first variant, and restored before each.
_SWITCHES = (("dqp.ipm_layer", "BACKWARD_GRAPH_MAX_WORK"), ("dqp.ipm_layer", "POLISH_STAGE_EPS"),
             ("dqp.ipm_layer", "_BWD_REFINE"), ("dqp.solvers.ipm", "SETUP_GRAPH"),
             ("dqp.solvers.ipm", "FACTOR_KERNEL"), ("dqp.solvers.ipm", "SOLVE_KERNEL"), ("dqp.gradients", "OUTER"))
_SHIPPED: dict = {}


def set_variant(name: str) -> None:
    import importlib
    import dqp.gradients as gr
    import dqp.ipm_layer as lay
    import dqp.solvers.ipm as ipm
    for mod, attr in _SWITCHES:
        m = importlib.import_module(mod)
        _SHIPPED.setdefault((mod, attr), getattr(m, attr, None))
        setattr(m, attr, _SHIPPED[mod, attr])
    if name.startswith("stages"):
        lay.POLISH_STAGE_EPS = tuple(float(t) for t in name[6:].split(":"))
    elif name.startswith("stage"):
        lay.POLISH_STAGE_EPS = float(name[5:])
    elif name == "outer-mul":
        gr.OUTER = "mul"
    elif name.startswith("factor-"):
        ipm.FACTOR_KERNEL = name[7:]
    elif name == "solve-never":
        ipm.SOLVE_KERNEL = "never"
    elif name == "bwd-eager":
        lay.BACKWARD_GRAPH_MAX_WORK = 0
    elif name == "setup-eager":
        ipm.SETUP_GRAPH = False
    elif name == "bwd-refine0":
        lay._BWD_REFINE = 0
    elif name != "base":
        raise SystemExit(f"unknown variant {name!r}")
    ipm.clear_graph_cache()


def _patch_refine() -> None:
    """Let the probe set the backward's refinement steps (dqp.ipm_layer._BWD_REFINE, None = default)."""
    import dqp.ipm_layer as lay
    orig = lay._backward_math

    def bm(kkt, *a, **k):
        r = getattr(lay, "_BWD_REFINE", None)
        if r is not None:
            kkt.refine = r
        return orig(kkt, *a, **k)
    lay._backward_math = bm


def run_cell(B: int, n: int, variants, reps: int, kernels: bool = True) -> str:
    from dqp.qpth import QPFunction
    ps = make_problems(B, n, n, 0, "cuda")
    Q, p, G, h = ps.Q, ps.p, ps.G, ps.h
    e = torch.empty(0, dtype=Q.dtype, device="cuda")
    f = QPFunction(verbose=-1, check_Q_spd=False)
    lines = [f"## B={B}, n=m={n}, float64 (median of {reps}, ms)\n",
             "| variant | fwd+bwd wall | fwd wall | bwd device (events) | bwd wall |", "|---|---|---|---|---|"]
    kern_tables = []
    for v in variants:
        set_variant(v)
        Qr = Q.clone().requires_grad_(True)
        pr = p.clone().requires_grad_(True)
        Gr = G.clone().requires_grad_(True)
        hr = h.clone().requires_grad_(True)

        def fb():
            z = f(Qr, pr, Gr, hr, e, e)
            (z * ps.w).sum().backward()

        def fwd():
            with torch.no_grad():
                f(Q, p, G, h, e, e)
        for _ in range(2):
            fb()
        torch.cuda.synchronize()
        t_fb, t_f, t_bd, t_bw = [], [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            fb()
            torch.cuda.synchronize()
            t_fb.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fwd()
            torch.cuda.synchronize()
            t_f.append(time.perf_counter() - t0)
            z = f(Qr, pr, Gr, hr, e, e)
            loss = (z * ps.w).sum()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            loss.backward()
            b.record()
            torch.cuda.synchronize()
            t_bw.append(time.perf_counter() - t0)
            t_bd.append(a.elapsed_time(b) / 1e3)
        med = lambda t: 1e3 * statistics.median(t)  # noqa: E731
        lines.append(f"| {v} | {med(t_fb):.3f} | {med(t_f):.3f} | {med(t_bd):.3f} | {med(t_bw):.3f} |")
        if kernels and v in ("base", "bwd-eager"):
            from torch.profiler import ProfilerActivity, profile
            z = f(Qr, pr, Gr, hr, e, e)
            loss = (z * ps.w).sum()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                loss.backward()
                torch.cuda.synchronize()
            agg = defaultdict(lambda: [0, 0.0])
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    agg[ev.name[:70]][0] += 1
                    agg[ev.name[:70]][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
            tab = [f"\nkernels of one backward ({v}): total {sum(r[1][1] for r in rows):.0f} µs\n",
                   "| kernel | count | device µs |", "|---|---|---|"]
            tab += [f"| `{k}` | {c} | {t:.0f} |" for k, (c, t) in rows[:25]]
            kern_tables.append("\n".join(tab))
    if kernels:
        # host time of the backward: cProfile of 10 calls (the base variant)
        import cProfile
        import io
        import pstats
        set_variant("base")
        losses = []
        for _ in range(10):
            z = f(Qr, pr, Gr, hr, e, e)
            losses.append((z * ps.w).sum())
        torch.cuda.synchronize()
        pr_ = cProfile.Profile()
        pr_.enable()
        for loss in losses:
            loss.backward()
        torch.cuda.synchronize()
        pr_.disable()
        buf = io.StringIO()
        pstats.Stats(pr_, stream=buf).sort_stats("tottime").print_stats(22)
        kern_tables.append("\nhost profile of 10 backward calls (base), by tottime:\n```\n"
                           + "\n".join(buf.getvalue().strip().splitlines()[-30:]) + "\n```")
    return "\n".join(lines + kern_tables) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="1024x100,128x100")
    ap.add_argument("--variants", default="base,bwd-eager,setup-eager,bwd-refine0")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel tables")
    a = ap.parse_args()
    _patch_refine()
    parts = [f"# tail probe on {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n"]
    for cell in a.cells.split(","):
        B, n = (int(x) for x in cell.split("x"))
        parts.append(run_cell(B, n, a.variants.split(","), a.reps, not a.no_kernels))
        print(parts[-1], flush=True)
        if a.out:
            Path(a.out).write_text("\n".join(parts))         # (after each cell: a time limit keeps the rest)


if __name__ == "__main__":
    main()
