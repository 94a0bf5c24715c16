"""B=128, n=m=500 on a GPU: does graphing the setup, the polish and the backward pay there?

That cell runs the torch loop (k = 500 is above the kernel's limit), and in session 8's trace
70 ms of device work filled a 92 ms call: the eager setup (~670 kernels), polish (~900) and
backward (~150) wait on the host. Their CUDA graphs are off there by the work limits
(``SETUP_GRAPH_MAX_WORK``, ``POLISH_GRAPH_MAX_WORK``, ``BACKWARD_GRAPH_MAX_WORK``) and bounded by
the graph memory budget (``FN_GRAPH_MAX_BYTES``). Per variant: the median forward+backward
(QPFunction, CUDA-synchronized), the peak device memory, and the largest gradient difference
against the default.

    python experiments/n500_probe.py [--B 128] [--n 500] [--reps 7] [--out DIR]
"""
from __future__ import annotations

import argparse
import os

import torch

import dqp.ipm_layer as il
import dqp.solvers.ipm as ipm
from dqp.qpth import QPFunction
from fused_check import gen, sync_time

BIG = 10 ** 12
VARIANTS = {
    "default": {},
    "polish+backward graphed": {(il, "POLISH_GRAPH_MAX_WORK"): BIG, (il, "BACKWARD_GRAPH_MAX_WORK"): BIG,
                                (ipm, "FN_GRAPH_MAX_BYTES"): 48 * 1024 ** 3},
    "+ setup graphed": {(il, "POLISH_GRAPH_MAX_WORK"): BIG, (il, "BACKWARD_GRAPH_MAX_WORK"): BIG,
                        (ipm, "FN_GRAPH_MAX_BYTES"): 48 * 1024 ** 3, (ipm, "SETUP_GRAPH_MAX_WORK"): BIG},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    Q, p, G, h, _, _ = gen(a.B, a.n, a.n, seed=0)
    e = torch.empty(0, dtype=Q.dtype, device=Q.device)
    w = torch.randn(a.B, a.n, dtype=Q.dtype, device=Q.device, generator=torch.Generator(Q.device).manual_seed(1))
    grads = {}

    def fwd_bwd():
        ins = [t.clone().requires_grad_() for t in (Q, p, G, h)]
        z = QPFunction()(*ins, e, e)
        (z * w).sum().backward()
        return [t.grad for t in ins]

    lines = [f"# n=m={a.n}, B={a.B}, float64, forward+backward ({torch.cuda.get_device_name()})\n",
             "| variant | median ms | peak memory GiB | max gradient difference vs default |", "|---|---|---|---|"]
    for name, knobs in VARIANTS.items():
        saved = {k: getattr(*k) for k in knobs}
        for (mod, attr), v in knobs.items():
            setattr(mod, attr, v)
        ipm.clear_graph_cache()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            g = fwd_bwd()
            fwd_bwd()                                   # (captures happen in the first calls)
            t = 1e3 * sync_time(fwd_bwd, a.reps)
            peak = torch.cuda.max_memory_allocated() / 1024 ** 3
            grads[name] = g
            ref = grads["default"]
            diff = max(float((x - r).abs().max() / r.abs().max()) for x, r in zip(g, ref))
            lines.append(f"| {name} | {t:.1f} | {peak:.1f} | {diff:.1e} |")
        except Exception as exc:  # noqa: BLE001 - report and go on
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | | |")
        finally:
            for (mod, attr), v in saved.items():
                setattr(mod, attr, v)
        print(lines[-1], flush=True)
    ipm.clear_graph_cache()
    with open(os.path.join(a.out, "n500_probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
