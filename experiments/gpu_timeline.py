"""Timeline of one ``dqp.qpth.QPFunction`` forward+backward call on the GPU: where the wall time goes.

For qpth's generator (experiments/bench_qpth.py) at the given cells, warms the layer up, times
forward+backward (median of ``--reps``), then records one call with ``torch.profiler`` (CPU and
CUDA activities) and reduces the trace to:

* the wall time of the call, the time the GPU is busy (union of kernel and copy intervals) and the
  idle time, split by the ``dqp::*`` range (or "outside") the host was in when each idle gap began;
* each ``dqp::*`` range: host time, device time inside its host window;
* the kernels run while the host was inside each range (count and summed device time), so that
  e.g. the kernels of one iteration-graph replay can be read off.

The chrome trace of each call is written gzipped next to ``--out`` for a closer look
(``chrome://tracing`` or https://ui.perfetto.dev).

Usage::

    python experiments/gpu_timeline.py --cells 128x100,1024x100 --out /tmp/timeline.md
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qpth import _times, make_problems  # noqa: E402


def _union(iv: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[Tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def summarize(trace: Dict) -> str:
    """Markdown summary of one recorded call (see the module docstring)."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
              if e.get("cat") == "user_annotation" and e["name"].startswith("dqp::")]
    top = [e for e in ev if e.get("cat") == "cpu_op" and e["name"] in ("IPMQPFunction", "autograd::engine::evaluate_function: IPMQPFunctionBackward")]
    if not gpu:
        return "(no device activity recorded)\n"
    t0 = min(min(a for a, _, _ in gpu), min((e["ts"] for e in ev if e.get("cat") == "cpu_op"), default=1e30))
    t1 = max(b for _, b, _ in gpu)
    busy = _union([(a, b) for a, b, _ in gpu])
    busy_t = sum(b - a for a, b in busy)

    def where(t: float) -> str:
        inner = [r for r in ranges if r[0] <= t < r[1]]
        return min(inner, key=lambda r: r[1] - r[0])[2] if inner else "outside dqp:: ranges"

    gaps = defaultdict(float)
    prev = t0
    for a, b in busy:
        if a > prev:
            gaps[where(prev)] += a - prev
        prev = b
    lines = [f"wall (first host op → last device op) {1e-3 * (t1 - t0):.2f} ms; device busy {1e-3 * busy_t:.2f} ms; "
             f"idle {1e-3 * (t1 - t0 - busy_t):.2f} ms; top-level ops: "
             + ", ".join(f"{e['name'].split(':')[-1].strip()} {1e-3 * e['dur']:.2f} ms" for e in top), "",
             "| idle gap begins in | idle ms |", "|---|---|"]
    for k, v in sorted(gaps.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {1e-3 * v:.2f} |")
    # kernels launched while the host was inside each range: attribute by the launching runtime call
    corr = {e["args"].get("correlation"): e for e in ev if e.get("cat") == "cuda_runtime" and "args" in e}
    per = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for e in ev:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        rt = corr.get(e.get("args", {}).get("correlation"))
        rng = where(rt["ts"]) if rt is not None else "?"
        c = per[rng][e["name"][:70]]
        c[0] += 1
        c[1] += e["dur"]
    lines += ["", "| range (host) | host ms | launches | device ms of its kernels |", "|---|---|---|---|"]
    host = defaultdict(float)
    cnt = defaultdict(int)
    for a, b, name in ranges:
        host[name] += b - a
        cnt[name] += 1
    for name in sorted(set(host) | set(per)):
        dev = sum(v[1] for v in per[name].values())
        nl = sum(v[0] for v in per[name].values())
        lines.append(f"| {name} ×{cnt.get(name, 0)} | {1e-3 * host.get(name, 0.0):.2f} | {nl} | {1e-3 * dev:.2f} |")
    for name in sorted(per):
        lines += ["", f"kernels launched in {name}:", "", "| kernel | count | device ms |", "|---|---|---|"]
        for k, (c, d) in sorted(per[name].items(), key=lambda kv: -kv[1][1])[:25]:
            lines.append(f"| `{k}` | {c} | {1e-3 * d:.3f} |")
    # host ops outside replays: the largest by self time
    return "\n".join(lines) + "\n"


def run_cell(B: int, n: int, dtype: torch.dtype, reps: int, outdir: Path) -> str:
    from dqp.qpth import QPFunction
    from torch.profiler import ProfilerActivity, profile

    ps = make_problems(B, n, n, 0, "cuda")
    Q, p, G, h, w = (x.to(dtype) for x in (ps.Q, ps.p, ps.G, ps.h, ps.w))
    e = torch.empty(0, dtype=dtype, device="cuda")
    leaves = [x.detach().requires_grad_(True) for x in (Q, p, G, h)]
    layer = QPFunction(verbose=-1, check_Q_spd=False)

    def fb():
        return torch.autograd.grad((layer(*leaves, e, e) * w).sum(), leaves)
    ts = _times(fb, reps, torch.cuda.synchronize)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fb()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as td:
        f = os.path.join(td, "t.json")
        prof.export_chrome_trace(f)
        with open(f) as fh:
            trace = json.load(fh)
    tag = f"timeline_B{B}_n{n}_{str(dtype).split('.')[-1]}"
    with gzip.open(outdir / f"{tag}.json.gz", "wt") as fh:
        json.dump(trace, fh)
    try:
        summary = summarize(trace)
    except Exception as exc:  # noqa: BLE001 (the trace is saved; summarize it later with --from-trace)
        summary = f"(summary failed: {exc!r})\n"
    return (f"### B={B}, n=m={n}, {dtype}: fwd+bwd median {1e3 * statistics.median(ts):.2f} ms "
            f"(min {1e3 * min(ts):.2f})\n\n" + summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="128x100,1024x100")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", required=True)
    ap.add_argument("--from-trace", default=None, help="summarize a saved (gzipped) trace instead")
    a = ap.parse_args()
    if a.from_trace:
        with gzip.open(a.from_trace, "rt") as fh:
            print(summarize(json.load(fh)))
        return
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, a.dtype)
    parts = [f"## dqp timeline on {torch.cuda.get_device_name()} (torch {torch.__version__}), {time.strftime('%Y-%m-%d')}\n"]
    for cell in a.cells.split(","):
        B, n = (int(x) for x in cell.split("x"))
        parts.append(run_cell(B, n, dtype, a.reps, out.parent))
        print(parts[-1], flush=True)
    out.write_text("\n".join(parts))


if __name__ == "__main__":
    main()
