"""The layer inside DistributedDataParallel (examples/ddp_optnet.py).

On the CPU with the gloo backend and 2 processes: the DDP-trained parameters equal those of one
process trained on the full batch (each step's global batch = the ranks' batches together, the loss
averaged as DDP averages the gradients), and the example runs under ``torchrun``. With two or more
GPUs (marked ``cuda``): the example on NCCL, and a solve on ``cuda:1`` that leaves ``cuda:0`` alone.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ddp_optnet.py"
WORLD = 2
#: small problem, a few steps: the whole test takes seconds
CFG = dict(n_features=5, n=6, m=8, batch_per_rank=6, steps_data=3, epochs=2, lr=0.5)


def _example():
    spec = importlib.util.spec_from_file_location("ddp_optnet", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup(ex, solver):
    n_samples = WORLD * CFG["batch_per_rank"] * CFG["steps_data"]
    x, y = ex.make_data(n_samples, CFG["n_features"], CFG["n"], CFG["m"])
    model = ex.OptNetRegressor(CFG["n_features"], CFG["n"], CFG["m"], solver=solver)
    return model, ex.TensorDataset(x, y)


SOLVERS = ("ipm", "clarabel")


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ex = _example()
        for solver in SOLVERS:  # (one pair of processes for both: start-up dominates)
            model, data = _setup(ex, solver)
            ddp = ex.DDP(model)
            ex.train(
                ddp,
                data,
                batch_per_rank=CFG["batch_per_rank"],
                world=WORLD,
                ranks=[rank],
                epochs=CFG["epochs"],
                lr=CFG["lr"],
                device=torch.device("cpu"),
            )
            # every parameter used in the QP got a (finite, nonzero) gradient on this rank
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, (rank, name)
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out_file}.{solver}.{rank}")
            del ddp, model  # the reducer holds the process group (see the example)
            gc.collect()
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, timeout: float = 240.0) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"DDP workers did not finish in {timeout:.0f} s")


def test_ddp_gloo_equals_single_process_full_batch(tmp_path):
    """2 gloo processes, the batched IPM and Clarabel: the parameters after DDP training equal those
    of one process trained on each step's global batch, to 1e-10."""
    _spawn(_worker, (str(tmp_path / "init"), str(tmp_path / "params")))
    ex = _example()
    for solver in SOLVERS:
        ranks = [torch.load(f"{tmp_path / 'params'}.{solver}.{r}") for r in range(WORLD)]
        model, data = _setup(ex, solver)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ex.train(
            model,
            data,
            batch_per_rank=CFG["batch_per_rank"],
            world=WORLD,
            ranks=list(range(WORLD)),
            epochs=CFG["epochs"],
            lr=CFG["lr"],
            device=torch.device("cpu"),
        )
        for name, ref in model.state_dict().items():
            assert (ref - init[name]).abs().max() > 1e-3, name  # training moved every parameter
            for r in range(WORLD):
                err = (ranks[r][name] - ref).abs().max().item()
                assert err <= 1e-10, (solver, name, r, err)


def _torchrun(*args: str, nproc: int = WORLD, timeout: float = 240.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(EXAMPLE),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_example_runs_with_torchrun_on_cpu():
    """CI's short mode of the example under torchrun (the batched IPM on the CPU, gloo)."""
    out = _torchrun("--short", "--cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"[rank 0/{WORLD}] ipm on cpu (gloo)" in out.stdout
    assert "parameters equal on all ranks: True" in out.stdout


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.cuda
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA devices")
def test_example_runs_with_torchrun_on_gpus_nccl():
    out = _torchrun("--short", nproc=_gpus())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ipm on cuda:0 (nccl)" in out.stdout and "parameters equal on all ranks: True" in out.stdout


_ISOLATION = textwrap.dedent("""
    import torch
    from dqp import dQP
    from dqp.ipm_layer import solve_qp_batch
    torch.manual_seed(0)
    B, n, m = 64, 30, 30
    U = torch.randn(B, n, n, dtype=torch.float64)
    P = U @ U.mT / n + torch.eye(n, dtype=torch.float64)
    q, C = torch.randn(B, n, dtype=torch.float64), torch.randn(B, m, n, dtype=torch.float64)
    d = torch.rand(B, m, dtype=torch.float64)
    dev = torch.device("cuda", 1)                  # the current device stays cuda:0, never set
    layer = dQP.dQP_layer(qp_solver="dqp_ipm")
    for k in range(3):                             # the later calls replay cached CUDA graphs
        qk = (q + 0.1 * k).requires_grad_(True)
        z = layer(P, qk, C, d)[0]
        z.square().sum().backward()
        qg = (q + 0.1 * k).to(dev).requires_grad_(True)
        zg = layer(P.to(dev), qg, C.to(dev), d.to(dev))[0]
        zg.square().sum().backward()
        assert zg.device == dev
        assert torch.allclose(zg.cpu(), z, rtol=1e-8, atol=1e-9), k
        assert torch.allclose(qg.grad.cpu(), qk.grad, rtol=1e-6, atol=1e-8), k
    torch.cuda.synchronize(dev)
    assert torch.cuda.memory_reserved(0) == 0, torch.cuda.memory_reserved(0)
    import importlib.util, os
    if importlib.util.find_spec("pynvml") is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        import pynvml                              # no context of this process on cuda:0 either
        pynvml.nvmlInit()
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))
        assert os.getpid() not in [p.pid for p in procs], "this process has a context on cuda:0"
    print("isolated")
""")


@pytest.mark.cuda
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA devices")
def test_solve_on_cuda1_leaves_cuda0_alone():
    """Rank r on cuda:r (without torch.cuda.set_device) allocates nothing on cuda:0, and its cached
    CUDA graphs (captured on its own device) give the eager results on every call."""
    out = subprocess.run([sys.executable, "-c", _ISOLATION], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0 and "isolated" in out.stdout, out.stderr[-3000:]


@pytest.mark.slow
def test_scaling_study_runs_on_cpu(tmp_path):
    """experiments/ddp_scaling.py's sweep in its CPU check mode (1 and 2 gloo processes)."""
    out_md = tmp_path / "ddp_scaling.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "ddp_scaling.py"),
            "--sweep",
            "2",
            "--cpu",
            "--short",
            "--out",
            str(out_md),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out_md.read_text()
    for dt in ("float32", "float64"):
        for k in (1, 2):
            assert f"| {dt} | {k} | 16 | 8 |" in text
        assert f"| {dt} | 8 | ≥ 64 |" in text
