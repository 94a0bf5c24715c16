"""The fused IPM kernel on a GPU: agreement with the torch loop, and where a call's time goes.

For each cell (qpth's generator, float64): the fused kernel and the torch loop solve the same batch
(statuses, iterations, max |Δz|, |Δμ|); then the medians of ``ipm_solve`` alone and of
``QPFunction`` forward+backward with and without the kernel (alternating, CUDA-synchronized).
Extra cells: equality constraints, shared matrices, an infeasible element inside a batch.

    python experiments/fused_check.py [--cells 128x100,1024x100] [--reps 10] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import dqp.solvers.fused as fused_mod
from dqp.qpth import QPFunction
from dqp.solvers.ipm import ipm_solve


def gen(B, n, m, p=0, seed=0, device="cuda", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    Q = U.mT @ U + 1e-3 * torch.eye(n, dtype=torch.float64)
    G = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(B, n, generator=g, dtype=torch.float64)
    s0 = torch.rand(B, m, generator=g, dtype=torch.float64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    pv = torch.randn(B, n, generator=g, dtype=torch.float64)
    A = b = None
    if p:
        A = torch.randn(B, p, n, generator=g, dtype=torch.float64)
        b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    cv = lambda t: None if t is None else t.to(device=device, dtype=dtype)   # noqa: E731
    return tuple(cv(t) for t in (Q, pv, G, h, A, b))


def sync_time(fn, reps):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def agree(data, **kw):
    r0 = ipm_solve(*data, fused=False, **kw)
    r1 = ipm_solve(*data, fused=True, **kw)
    same_status = bool((r0.status == r1.status).all())
    out = dict(status_equal=same_status, status_fused=torch.bincount(r1.status, minlength=6).tolist(),
               status_torch=torch.bincount(r0.status, minlength=6).tolist(),
               iters_fused_max=int(r1.iterations.max()), iters_torch_max=int(r0.iterations.max()),
               iters_mean_fused=float(r1.iterations.double().mean()), iters_mean_torch=float(r0.iterations.double().mean()))
    ok = (r0.status == 0) & (r1.status == 0)
    if bool(ok.any()):
        out["dz_max"] = float((r0.z - r1.z)[ok].abs().max())
        if r0.mu is not None:
            out["dmu_max"] = float((r0.mu - r1.mu)[ok].abs().max())
        if r0.lam is not None:
            out["dlam_max"] = float((r0.lam - r1.lam)[ok].abs().max())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="128x100,1024x100,128x50,128x128")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    t = time.perf_counter()
    fused_mod._cuda_kernel(dev, 100)
    print(f"kernel compile {time.perf_counter() - t:.2f} s", flush=True)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cells={}, extra={})

    # extra cells: equalities, shared matrices, an infeasible element
    Q, pv, G, h, A, b = gen(64, 40, 60, 10, seed=3)
    res["extra"]["equalities"] = agree((Q, pv, G, h, A, b))
    res["extra"]["shared"] = agree((Q[0], pv, G[0], h[0], A[0], b[0]))     # shared matrices and bounds, batched q
    h2 = h.clone()
    G2 = G.clone()
    G2[5, 1] = -G2[5, 0]
    h2[5, 0], h2[5, 1] = -1.0, -1.0        # g·z ≤ −1 and −g·z ≤ −1: infeasible
    res["extra"]["infeasible_5"] = agree((Q, pv, G2, h2, None, None))
    print(json.dumps(res["extra"], indent=1), flush=True)

    qf = QPFunction(verbose=-1, check_Q_spd=False)
    for cell in a.cells.split(","):
        B, n = (int(x) for x in cell.split("x"))
        data = gen(B, n, n, seed=1)
        info = agree(data)
        Q, pv, G, h, _, _ = data
        e = torch.empty(0, device=dev, dtype=torch.float64)
        w = torch.randn(B, n, device=dev, dtype=torch.float64)

        def fb(flag):
            old = fused_mod.FUSED
            fused_mod.FUSED = flag
            try:
                Qr, pr, Gr, hr = (t.clone().requires_grad_() for t in (Q, pv, G, h))
                z = qf(Qr, pr, Gr, hr, e, e)
                (w * z).sum().backward()
            finally:
                fused_mod.FUSED = old

        def ipm(flag):
            ipm_solve(Q, pv, G, h, fused=flag)
        for f in ("auto", False):       # warm-up (compile, graph capture)
            fb(f)
            fb(f)
        tim = {"fwdbwd_fused": [], "fwdbwd_torch": [], "ipm_fused": [], "ipm_torch": []}
        for _ in range(a.reps):
            tim["fwdbwd_fused"].append(sync_time(lambda: fb("auto"), 1))
            tim["fwdbwd_torch"].append(sync_time(lambda: fb(False), 1))
            tim["ipm_fused"].append(sync_time(lambda: ipm(True), 1))
            tim["ipm_torch"].append(sync_time(lambda: ipm(False), 1))
        info.update({k: 1e3 * statistics.median(v) for k, v in tim.items()})
        # where the fused call's time goes: the profiler's device time of the kernel
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ipm(True)
            torch.cuda.synchronize()
        ker = [ev for ev in prof.key_averages() if "dqp_ipm_dual" in ev.key]
        if ker:
            info["kernel_ms"] = ker[0].device_time_total / 1e3 if hasattr(ker[0], "device_time_total") else ker[0].cuda_time_total / 1e3
        # per-phase clock cycles per block-iteration (the -DDQP_PROFILE build, one call)
        fused_mod.PROFILE = torch.zeros(8, dtype=torch.int64, device=dev)
        r = ipm_solve(Q, pv, G, h, fused=True)
        torch.cuda.synchronize()
        prof = fused_mod.PROFILE.cpu().tolist()
        fused_mod.PROFILE = None
        nit = float(r.iterations.sum())
        names = ["products", "check", "S+My", "cholesky", "predictor", "corrector", "step"]
        info["cycles_per_iter"] = {nm: prof[i] / nit for i, nm in enumerate(names)}
        res["cells"][cell] = info
        print(cell, json.dumps(info), flush=True)
    with open(os.path.join(a.out, "fused_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n| cell | status equal | iters fused/torch (max) | max dz | ipm fused ms | ipm torch ms | kernel ms | fwd+bwd fused ms | fwd+bwd torch ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, i in res["cells"].items():
        print(f"| {c} | {i['status_equal']} | {i['iters_fused_max']}/{i['iters_torch_max']} | {i.get('dz_max', float('nan')):.1e} | "
              f"{i['ipm_fused']:.2f} | {i['ipm_torch']:.2f} | {i.get('kernel_ms', float('nan')):.2f} | "
              f"{i['fwdbwd_fused']:.2f} | {i['fwdbwd_torch']:.2f} |")
    _print_prof(res)


def _print_prof(res):
    print("\ncycles per block-iteration (thread 0's clock, -DDQP_PROFILE)")
    for c, i in res["cells"].items():
        print(c, " ".join(f"{k} {v:.0f}" for k, v in i.get("cycles_per_iter", {}).items()))


if __name__ == "__main__":
    main()
