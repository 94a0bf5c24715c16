"""Weak scaling of one data-parallel training step with the QP layer (DistributedDataParallel).

One step = forward (the batched IPM on each rank's GPU) + backward + DDP's gradient all-reduce +
the optimizer step, for the model of ``examples/ddp_optnet.py`` (learnable Q, G, h; q from a linear
map), at a fixed batch per GPU. Weak-scaling efficiency at N GPUs = t(1 GPU) / t(N GPUs), each t
the median over the timed steps of the slowest rank's step. A second measurement finds the largest
batch per GPU whose step fits in the GPU's memory (doubling, then bisection; one process, the
model without the DDP wrapper, whose gradient buckets are the size of the parameters).

On a multi-GPU machine (NCCL; NVLink multicast is left off: NCCL_NVLS_ENABLE=0)::

    python experiments/ddp_scaling.py --sweep 8        # 1, 2, 4, 8 GPUs × float32/float64, B=1024,
                                                       # n=m=100, and the largest batch at n=m=50;
                                                       # writes experiments/results/ddp_scaling.md
    torchrun --nproc_per_node=4 experiments/ddp_scaling.py --batch 1024 --size 100 --dtype float32
    torchrun --nproc_per_node=1 experiments/ddp_scaling.py --max-batch --size 50

On the CPU (gloo; a check that the script runs, not a measurement)::

    python experiments/ddp_scaling.py --sweep 2 --cpu --short
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
N_FEATURES = 32


def _example():
    spec = importlib.util.spec_from_file_location("ddp_optnet", ROOT / "examples" / "ddp_optnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(model, opt, device, B: int, n: int, dtype):
    g = torch.Generator(device=device).manual_seed(1234 + (dist.get_rank() if dist.is_initialized() else 0))
    x = torch.randn(B, N_FEATURES, generator=g, device=device, dtype=dtype)
    y = 0.1 * torch.randn(B, n, generator=g, device=device, dtype=dtype)

    def step() -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _slowest(t: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return t
    v = torch.tensor([t], dtype=torch.float64, device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return float(v.item())


def time_steps(ddp_model, device, B: int, n: int, dtype, warmup: int, reps: int) -> list:
    """Seconds of each timed step (the slowest rank's)."""
    opt = torch.optim.SGD(ddp_model.parameters(), lr=1e-3)
    step = _step_fn(ddp_model, opt, device, B, n, dtype)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(_slowest(time.perf_counter() - t0, device))
    return times


def _fits(model, device, B: int, n: int, dtype) -> bool:
    """Whether one step at batch B runs on every rank (no out-of-memory error)."""
    from dqp.solvers.ipm import clear_graph_cache

    ok = True
    try:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        loss = _step_fn(model, opt, device, B, n, dtype)()
        if not bool(torch.isfinite(loss)):  # a step that "fits" must also be right
            raise RuntimeError(f"batch {B}: non-finite loss {loss.item()}")
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise
        ok = False
    clear_graph_cache()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if dist.is_initialized():
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def max_batch(model, device, n: int, dtype, start: int, limit: int, bisections: int = 4) -> int:
    """Largest per-GPU batch that fits: double from ``start`` up to ``limit``, then bisect (the
    largest one tried when even ``limit`` fits)."""
    lo, hi = 0, None
    B = start
    while B <= limit:
        if _fits(model, device, B, n, dtype):
            lo, B = B, 2 * B
        else:
            hi = B
            break
    if hi is None:
        return lo
    for _ in range(bisections):
        mid = (lo + hi) // 2
        if mid <= lo:
            break
        if _fits(model, device, mid, n, dtype):
            lo = mid
        else:
            hi = mid
    return lo


def run_cell(args) -> dict:
    """One measurement under torchrun (or one process): returns the record rank 0 writes."""
    ex = _example()
    rank, world, device, backend = ex._setup("ipm", args.cpu)
    dtype = getattr(torch, args.dtype)
    model = ex.OptNetRegressor(N_FEATURES, args.size, args.size, solver="ipm", dtype=dtype).to(device)
    ddp = ex.DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if backend else model
    rec = dict(
        world=world,
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        backend=backend or "none",
        dtype=args.dtype,
        n=args.size,
        m=args.size,
        torch=torch.__version__,
    )
    if args.max_batch:
        # (the plain model: an out-of-memory error inside DDP's backward leaves its reducer mid-reduction
        # and the other ranks waiting; DDP adds only its gradient buckets, the size of the parameters)
        best = max_batch(model, device, args.size, dtype, args.batch, args.limit)
        rec.update(kind="max_batch", max_batch_per_gpu=best, search_limit=args.limit)
    else:
        times = time_steps(ddp, device, args.batch, args.size, dtype, args.warmup, args.reps)
        rec.update(
            kind="step",
            batch_per_gpu=args.batch,
            step_s_median=statistics.median(times),
            step_s_min=min(times),
            reps=len(times),
        )
    del ddp, model
    gc.collect()
    if backend:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return rec


def _launch(nproc: int, cell_args: list, json_path: Path) -> None:
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        *cell_args,
        "--json",
        str(json_path),
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def sweep(args) -> None:
    """1, 2, 4, … up to ``args.sweep`` processes × dtypes; then the largest batch; a markdown table."""
    counts = sorted({k for k in (1, 2, 4, 8, 16) if k <= args.sweep} | {args.sweep})
    json_path = Path(args.out).with_suffix(".jsonl")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)
    extra = ["--cpu"] if args.cpu else []
    timing = ["--warmup", str(args.warmup), "--reps", str(args.reps)]
    for dt in ("float32", "float64"):
        for k in counts:
            _launch(
                k, ["--batch", str(args.batch), "--size", str(args.size), "--dtype", dt, *timing, *extra], json_path
            )
    for dt in ("float32", "float64"):
        _launch(
            1,
            [
                "--max-batch",
                "--size",
                str(args.max_batch_size),
                "--dtype",
                dt,
                "--batch",
                str(args.batch),
                "--limit",
                str(args.limit),
                *extra,
            ],
            json_path,
        )
    recs = [json.loads(line) for line in json_path.read_text().splitlines()]
    Path(args.out).write_text(table(recs, " ".join(sys.argv)))
    print(Path(args.out).read_text())


def table(recs: list, command: str) -> str:
    steps = [r for r in recs if r["kind"] == "step"]
    lines = [
        "# Data-parallel training step with the QP layer: weak scaling",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {steps[0]['gpu'] if steps else '?'}; backend {steps[-1]['backend'] if steps else '?'}; "
        f"torch {recs[0]['torch']}. One step = forward (batched IPM) + backward + all-reduce + SGD step; "
        f"median of the slowest rank's step time.",
        "",
        "| dtype | GPUs | batch per GPU | n = m | step (ms) | samples/s | weak-scaling efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for dt in ("float32", "float64"):
        rows = sorted((r for r in steps if r["dtype"] == dt), key=lambda r: r["world"])
        base = next((r["step_s_median"] for r in rows if r["world"] == 1), None)
        for r in rows:
            eff = f"{100 * base / r['step_s_median']:.1f} %" if base else "-"
            lines.append(
                f"| {dt} | {r['world']} | {r['batch_per_gpu']} | {r['n']} | {1e3 * r['step_s_median']:.2f} | "
                f"{r['world'] * r['batch_per_gpu'] / r['step_s_median']:.0f} | {eff} |"
            )
    lines += ["", "| dtype | n = m | largest batch per GPU (one step fits) |", "|---|---|---|"]
    for r in recs:
        if r["kind"] == "max_batch":
            at_limit = 2 * r["max_batch_per_gpu"] > r["search_limit"]
            lines.append(f"| {r['dtype']} | {r['n']} | {'≥ ' if at_limit else ''}{r['max_batch_per_gpu']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=int, default=0, help="run the whole study on 1..N processes (launches torchrun)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "ddp_scaling.md"))
    ap.add_argument("--batch", type=int, default=1024, help="batch per GPU (the start of --max-batch's search)")
    ap.add_argument("--size", type=int, default=100, help="QP variables = inequalities (n = m)")
    ap.add_argument("--max-batch-size", type=int, default=50, help="n = m of the largest-batch search")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-batch", action="store_true", help="find the largest batch per GPU instead of timing")
    ap.add_argument("--limit", type=int, default=1 << 21, help="largest batch --max-batch tries")
    ap.add_argument("--cpu", action="store_true", help="CPU and gloo (a check that the script runs)")
    ap.add_argument("--short", action="store_true", help="tiny sizes (with --cpu: seconds)")
    ap.add_argument("--json", default=None, help="append rank 0's record (JSON lines) here")
    args = ap.parse_args(argv)
    if args.short:
        args.batch, args.size, args.max_batch_size, args.warmup, args.reps, args.limit = 16, 8, 8, 1, 3, 64
    if args.sweep:
        sweep(args)
    else:
        run_cell(args)


if __name__ == "__main__":
    main()
