"""Where the B = 1024 and n = m = 500 acceptance cells lose time, on a GPU (issue 3).

Three probes, each printed as a small table (and written to ``--out``):

1. **occupancy**: the fused kernel built for each configuration in ``--configs``, ``THREADS`` or
   ``THREADS:OPTION+OPTION`` (threads per block, extra NVRTC options such as ``-DDQP_SOLVE_BLOCKED=0``):
   registers per thread, local memory, blocks per SM the driver reports for the launch's shared
   memory, the median time of ``ipm_solve`` (polish on) and of a ``QPFunction`` forward+backward
   at n = m = 100, B ∈ {128, 1024}, and the clock cycles per block-iteration of the Cholesky phase
   and of the whole iteration (the ``-DDQP_PROFILE`` build, B = 128). (Session 8's first two runs,
   results/kernel_probe_session8_run{1,2}.md, also tried two resident blocks per SM and a
   factorization with two columns per barrier: both slower, removed.)
2. **setup**: the dual form's one-time products (``_DualNewton``: ``P⁻¹Āᵀ``, ``M = ĀP⁻¹Āᵀ``)
   with :data:`dqp.solvers.ipm.SETUP_PRODUCTS` ``"solve"`` and ``"inverse"``, and P's Cholesky.
3. **profile**: the CUDA kernels of one ``QPFunction`` forward+backward per ``--profile-cells`` (default B = 128, n = m = 500)
   (torch.profiler, the top entries by device time; the chrome trace goes to ``--out``).

    python experiments/kernel_probe.py [--configs 384,512] [--skip setup,profile] [--reps 15] [--out DIR]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import time

import torch

import dqp.solvers.fused as fused_mod
from dqp.qpth import QPFunction
from dqp.solvers.ipm import clear_graph_cache, ipm_solve
from fused_check import gen as _gen
from fused_check import sync_time


def gen(B, n, m, seed=0, device="cuda"):
    """qpth's generator (fused_check.gen), without equalities: (Q, p, G, h)."""
    return _gen(B, n, m, seed=seed, device=device)[:4]


def med_time(fn, reps):
    """Median ms of ``fn`` over ``reps`` CUDA-synchronized calls, after one warm-up call."""
    fn()
    return 1e3 * sync_time(fn, reps)


def fwd_bwd(data):
    Q, p, G, h = (t.clone().requires_grad_() for t in data)
    e = torch.empty(0, dtype=Q.dtype, device=Q.device)

    def run():
        z = QPFunction()(Q, p, G, h, e, e)
        z.sum().backward()
    return run


def kernel_attrs(kern, threads, smem):
    """(registers per thread, local bytes per thread, max resident blocks per SM)."""
    from torch.cuda._utils import _get_gpu_runtime_library
    lib = _get_gpu_runtime_library()
    out = []
    for attr in (4, 3):          # CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
        v = ctypes.c_int(0)
        lib.cuFuncGetAttribute(ctypes.byref(v), attr, kern.func)
        out.append(v.value)
    nb = ctypes.c_int(0)
    lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(nb), kern.func, threads, ctypes.c_size_t(smem))
    return out[0], out[1], nb.value


def occupancy(configs, reps, lines):
    dev = torch.device("cuda")
    cells = {B: gen(B, 100, 100) for B in (128, 1024)}
    lines.append("## occupancy (n = m = 100, float64; ms, medians)")
    lines.append("| configuration | regs | local B | blocks/SM | smem KiB | ipm B=128 | ipm B=1024 "
                 "| fwd+bwd B=128 | fwd+bwd B=1024 | cycles/iter: cholesky, all |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    ref = {}
    t0 = fused_mod.THREADS, fused_mod.NVRTC_OPTIONS
    for cfg in configs:
        # "THREADS" or "THREADS:OPTION+OPTION" (extra NVRTC options, e.g. 384:-DDQP_SOLVE_BLOCKED=0)
        t = int(cfg.split(":")[0])
        fused_mod.THREADS = t
        fused_mod.NVRTC_OPTIONS = tuple(cfg.split(":", 1)[1].split("+")) if ":" in cfg else ()
        clear_graph_cache()
        try:
            kern = fused_mod._cuda_kernel(dev, 100)
        except Exception as exc:  # noqa: BLE001 - report and go on
            lines.append(f"| {cfg} | build failed: {type(exc).__name__}: {str(exc)[:200]} |")
            continue
        smem = fused_mod.smem_bytes(100, 100, 0)
        regs, local, nb = kernel_attrs(kern, t, smem)
        row = [cfg, str(regs), str(local), str(nb), f"{smem / 1024:.1f}"]
        for B in (128, 1024):
            r = ipm_solve(*cells[B], polish_rounds=3)
            ref.setdefault(B, r.z)          # (Δz: against the first configuration)
            dz = float((r.z - ref[B]).abs().max())
            row.append(f"{med_time(lambda: ipm_solve(*cells[B], polish_rounds=3), reps):.2f} (Δz {dz:.0e})")
        for B in (128, 1024):
            row.append(f"{med_time(fwd_bwd(cells[B]), reps):.2f}")
        fused_mod.PROFILE = torch.zeros(8, dtype=torch.int64, device=dev)
        r = ipm_solve(*cells[128], polish_rounds=3)
        torch.cuda.synchronize()
        prof = fused_mod.PROFILE.cpu().tolist()
        fused_mod.PROFILE = None
        nit = float(r.iterations.sum())
        row.append(f"{prof[3] / nit:.0f}, {sum(prof[:7]) / nit:.0f}")
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    fused_mod.THREADS, fused_mod.NVRTC_OPTIONS = t0
    clear_graph_cache()


def setup_products(reps, lines):
    import dqp.solvers.ipm as ipm
    lines.append("\n## setup products (float64, ms, medians; k = n): _DualNewton by SETUP_PRODUCTS")
    lines.append("| B x n | P's Cholesky (_cholesky) | solve | inverse | max rel diff of M |")
    lines.append("|---|---|---|---|---|")
    saved = ipm.SETUP_PRODUCTS
    for B, n in ((128, 100), (1024, 100), (128, 500)):
        Q, _, G, _ = gen(B, n, n)
        L = ipm._cholesky(Q)[0]
        Ms, row = [], [f"{B}x{n}", f"{med_time(lambda: ipm._cholesky(Q), reps):.3f}"]
        for how in ("solve", "inverse"):
            ipm.SETUP_PRODUCTS = how
            Ms.append(ipm._DualNewton(L, Q, G, None, B, n, n, 0, 0.0).M)
            row.append(f"{med_time(lambda: ipm._DualNewton(L, Q, G, None, B, n, n, 0, 0.0), reps):.3f}")
        ipm.SETUP_PRODUCTS = saved
        rel = float(((Ms[0] - Ms[1]).abs().amax((-2, -1)) / Ms[0].abs().amax((-2, -1))).max())
        row.append(f"{rel:.1e}")
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)


def profile_cell(B, n, lines, top, out):
    """torch.profiler of one QPFunction forward+backward at (B, n = m): the top kernels by device
    time (and the chrome trace in ``out``)."""
    from torch.profiler import ProfilerActivity, profile
    run = fwd_bwd(gen(B, n, n))
    run()
    run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(out, f"trace_{B}x{n}.json"))
    lines.append(f"\n## profile: QPFunction fwd+bwd, B = {B}, n = m = {n} (wall {wall:.1f} ms unprofiled)")
    lines.append("```")
    lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))
    lines.append("```")
    print("\n".join(lines[-3:]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="384,512")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--skip", default="", help="comma-separated probes to skip: occupancy,setup,profile")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--profile-cells", default="128x500", help="BxN list for the profile probe")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    lines = [f"# kernel probe on {torch.cuda.get_device_name()}, torch {torch.__version__}\n"]
    if "occupancy" not in skip:
        occupancy(a.configs.split(","), a.reps, lines)
    if "setup" not in skip:
        setup_products(a.reps, lines)
    if "profile" not in skip:
        for cell in a.profile_cells.split(","):
            B, n = (int(x) for x in cell.split("x"))
            profile_cell(B, n, lines, a.top, a.out)
    with open(os.path.join(a.out, "kernel_probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
