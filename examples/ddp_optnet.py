"""Data-parallel training of an OptNet-style model with the QP layer (DistributedDataParallel).

The model solves, per sample, ``z*(x) = argmin ½zᵀQz + q(x)ᵀz  s.t.  Gz ≤ h`` with learnable
``Q = LLᵀ + εI``, ``G``, ``h = G z0 + |s0| + 10⁻³`` (z0 stays strictly feasible) and ``q(x)`` from a
linear map, and regresses z* onto a teacher model's output. PyTorch's own machinery does the
distribution: ``torchrun`` starts one process per device, ``DistributedSampler`` splits the data,
``DistributedDataParallel`` all-reduces the gradients (NCCL on GPUs, gloo on CPUs). Nothing in dqp
is distributed: each process solves its own shard's QPs.

Two variants (``--solver``):

* ``ipm`` (default): the built-in batched interior-point method on each rank's device
  (``cuda:LOCAL_RANK`` when there are GPUs, else the CPU);
* ``clarabel``: a black-box solver (any qpsolvers backend) on CPU data, gloo.

Launch::

    torchrun --nproc_per_node=2 examples/ddp_optnet.py              # GPUs if present, else CPU
    torchrun --nproc_per_node=2 examples/ddp_optnet.py --solver clarabel
    torchrun --nproc_per_node=2 examples/ddp_optnet.py --short      # a few seconds (CI)

Without ``torchrun`` it runs as one process (world size 1).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dqp import dQP


class OptNetRegressor(nn.Module):
    """Linear map → QP layer with learnable Q, G, h; returns z* (B, n)."""

    def __init__(
        self,
        n_features: int,
        n: int,
        m: int,
        solver: str = "ipm",
        dtype=torch.float64,
        seed: int = 0,
        eps: float = 1e-3,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(n_features, n, dtype=dtype)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(n, n_features, generator=g, dtype=dtype) / n_features**0.5)
            self.fc.bias.copy_(0.1 * torch.randn(n, generator=g, dtype=dtype))
        self.L = nn.Parameter(torch.eye(n, dtype=dtype) + 0.1 * torch.randn(n, n, generator=g, dtype=dtype))
        self.G = nn.Parameter(torch.randn(m, n, generator=g, dtype=dtype) / n**0.5)
        self.z0 = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=dtype))
        self.s0 = nn.Parameter(0.2 + 0.1 * torch.rand(m, generator=g, dtype=dtype))
        self.eps = eps
        self.qp = dQP.dQP_layer(qp_solver="dqp_ipm" if solver == "ipm" else solver)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.L.shape[0]
        Q = self.L @ self.L.T + self.eps * torch.eye(n, dtype=x.dtype, device=x.device)
        h = self.G @ self.z0 + self.s0.abs() + 1e-3
        return self.qp(Q, self.fc(x), self.G, h).z


def make_data(
    N: int, n_features: int, n: int, m: int, dtype=torch.float64, seed: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and a teacher model's solutions (on the CPU; the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, n_features, generator=g, dtype=dtype)
    teacher = OptNetRegressor(n_features, n, m, solver="clarabel", dtype=dtype, seed=seed + 100)
    with torch.no_grad():
        y = teacher(x)
    return x, y


def batches(
    dataset: TensorDataset, batch_per_rank: int, world: int, ranks: Sequence[int], epoch: int, seed: int = 0
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The training batches of ``ranks`` (concatenated) for one epoch, as ``DistributedSampler`` splits
    the data among ``world`` processes: one rank in a DDP process; every rank in the single-process
    run that DDP's result must equal."""
    loaders = []
    for r in ranks:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        loaders.append(DataLoader(dataset, batch_size=batch_per_rank, sampler=sampler, drop_last=True))
    for parts in zip(*loaders):
        yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    batch_per_rank: int,
    world: int,
    ranks: Sequence[int],
    epochs: int,
    lr: float,
    device: torch.device,
    log=None,
) -> List[float]:
    """Plain SGD on the mean squared error; returns the loss of every step (this process's batches)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        for xb, yb in batches(dataset, batch_per_rank, world, ranks, epoch):
            xb, yb = xb.to(device), yb.to(device)
            loss = nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients all-reduced (averaged) here
            opt.step()
            losses.append(loss.item())
        if log is not None:
            log(f"epoch {epoch}: loss {losses[-1]:.6f}")
    return losses


def _setup(solver: str, force_cpu: bool) -> Tuple[int, int, torch.device, Optional[str]]:
    """(rank, world, device, backend) from torchrun's environment; no process group without it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    on_gpu = solver == "ipm" and not force_cpu and torch.cuda.is_available()
    device = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    backend = None
    if "RANK" in os.environ:
        backend = "nccl" if on_gpu else "gloo"
        dist.init_process_group(backend)
    return rank, world, device, backend


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--solver",
        default="ipm",
        help="'ipm' (batched, rank's device) or a qpsolvers backend on CPU data, e.g. 'clarabel'",
    )
    ap.add_argument("--short", action="store_true", help="a few seconds (CI); also DQP_EXAMPLES_SHORT=1")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU (gloo) even with GPUs")
    ap.add_argument("--n-var", type=int, default=20, help="QP variables (and the output size)")
    ap.add_argument("--n-ineq", type=int, default=20, help="QP inequalities")
    ap.add_argument("--batch", type=int, default=64, help="samples per rank and step")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    short = args.short or os.environ.get("DQP_EXAMPLES_SHORT") == "1"
    if short:
        args.n_var, args.n_ineq, args.batch, args.epochs = 6, 8, 8, 2
    dtype = getattr(torch, args.dtype)
    rank, world, device, backend = _setup(args.solver, args.cpu)
    log = (lambda s: print(f"[rank 0/{world}] {s}", flush=True)) if rank == 0 else None
    n_features = 8
    x, y = make_data(world * args.batch * (4 if short else 16), n_features, args.n_var, args.n_ineq, dtype)
    model = OptNetRegressor(n_features, args.n_var, args.n_ineq, solver=args.solver, dtype=dtype).to(device)
    if backend is not None:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if log:
        log(
            f"{args.solver} on {device} ({backend or 'one process'}), n={args.n_var} m={args.n_ineq}, "
            f"{args.batch} samples per rank and step, {args.dtype}"
        )
    t0 = time.perf_counter()
    losses = train(
        model,
        TensorDataset(x, y),
        batch_per_rank=args.batch,
        world=world,
        ranks=[rank],
        epochs=args.epochs,
        lr=0.5,
        device=device,
        log=log,
    )
    elapsed = time.perf_counter() - t0
    # every parameter of the QP received a gradient on this rank, and DDP kept the replicas equal
    params = list(model.parameters())
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    if backend is not None:
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        spread = flat.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        low = flat.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if log:
            log(f"parameters equal on all ranks: {bool(torch.equal(spread, low))}")
        # DDP's reducer holds the process group: free it first, while the interpreter is alive (a gloo
        # group destroyed during interpreter shutdown can deadlock on the GIL)
        del model, params, flat, spread, low
        gc.collect()
        dist.destroy_process_group()
    if log:
        log(f"loss {losses[0]:.6f} -> {losses[-1]:.6f} in {len(losses)} steps, {elapsed:.1f} s")
    return losses[-1]


if __name__ == "__main__":
    main()
