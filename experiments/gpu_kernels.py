"""Per-kernel costs of the batched linear algebra an interior-point iteration uses (CUDA).

Times, for the batch shapes of the qpth benchmark, the operations the IPM's Newton step can be
built from: a batched Cholesky factorization, a Cholesky solve with one right-hand side (two
triangular solves), the explicit inverse of the factor or of the matrix, a batched matrix-vector
product, and a typical element-wise kernel. Each operation is captured ``--inner`` times in a
CUDA graph and replayed, so the numbers are device time without Python or launch overhead
(``eager`` columns: one synchronous call from Python, for comparison).

Usage (on a machine with CUDA)::

    python experiments/gpu_kernels.py --out experiments/results/gpu_kernels.md
    python experiments/gpu_kernels.py --blocked 32,64,128 --libs default --out .../gpu_blocked.md

The table decides how the IPM solves with its factor on the GPU (see solvers/ipm.py).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Tuple

import torch


def _graph_time(fn: Callable[[], object], inner: int, reps: int) -> float:
    """Device time (µs) of one ``fn()``, from CUDA-graph replays of ``inner`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e6


def _eager_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def _spd_system(B: int, k: int, dtype: torch.dtype):
    """A batch of SPD matrices S, their Cholesky factors L and L⁻¹, one right-hand side r, and the
    generator that made them (on CUDA)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(B, k, k, dtype=dtype, device=dev, generator=g)
    S = X @ X.mT / k + torch.eye(k, dtype=dtype, device=dev)
    L = torch.linalg.cholesky(S)
    Linv = torch.linalg.solve_triangular(L, torch.eye(k, dtype=dtype, device=dev).expand(B, k, k), upper=False)
    r = torch.randn(B, k, 1, dtype=dtype, device=dev, generator=g)
    return S, L, Linv, r, g


def ops_for(B: int, k: int, dtype: torch.dtype) -> Dict[str, Callable[[], object]]:
    dev = "cuda"
    S, L, Linv, r, g = _spd_system(B, k, dtype)
    Sinv = Linv.mT @ Linv
    v = torch.randn(B, k, dtype=dtype, device=dev, generator=g)
    w = torch.randn(B, k, dtype=dtype, device=dev, generator=g)
    I = torch.eye(k, dtype=dtype, device=dev).expand(B, k, k)
    out: Dict[str, Callable[[], object]] = {
        "cholesky_ex": lambda: torch.linalg.cholesky_ex(S),
        "chol_solve_1rhs (2 trsm)": lambda: torch.linalg.solve_triangular(
            L.mT, torch.linalg.solve_triangular(L, r, upper=False), upper=True),
        "cholesky_solve_1rhs": lambda: torch.cholesky_solve(r, L),
        "tri_inverse (trsm k rhs)": lambda: torch.linalg.solve_triangular(L, I, upper=False),
        "cholesky_inverse": lambda: torch.cholesky_inverse(L),
        "LinvT@Linv (bmm)": lambda: torch.matmul(Linv.mT, Linv),
        "inv_ex (LU)": lambda: torch.linalg.inv_ex(S),
        "bmv S⁻¹r": lambda: torch.matmul(Sinv, r),
        "bmv via (v·M).sum": lambda: (v.unsqueeze(-2) * Sinv).sum(-1),
        "2 bmv Linvᵀ(Linv r)": lambda: torch.matmul(Linv.mT, torch.matmul(Linv, r)),
        "elementwise addcmul (B,k)": lambda: torch.addcmul(v, w, v),
        "row amin (B,k)": lambda: v.amin(-1),
        "S + diag(w) (clone+add)": lambda: torch.diagonal(S.clone(), dim1=-2, dim2=-1).add_(w),
        "S + diag_embed(w)": lambda: S + torch.diag_embed(w),
    }
    return out


def blocked_ops_for(B: int, k: int, dtype: torch.dtype, nbs: List[int]) -> Dict[str, object]:
    """Library Cholesky/solves against the blocked ones of dqp.linsolve.blocked, per block size."""
    import dqp.solvers.fused as fused
    from dqp.linsolve.blocked import blocked_chol_solve, blocked_cholesky, diag_block_inverses
    S, L, Linv, r, _ = _spd_system(B, k, dtype)
    out: Dict[str, object] = {
        "cholesky_ex": lambda: torch.linalg.cholesky_ex(S),
        "solve: 2 trsm": lambda: torch.linalg.solve_triangular(
            L.mT, torch.linalg.solve_triangular(L, r, upper=False), upper=True),
        "solve: 2 bmv with L⁻¹": lambda: torch.matmul(Linv.mT, torch.matmul(Linv, r)),
    }
    for nb in nbs:
        if nb >= k:
            for name in (f"blocked_cholesky nb={nb}", f"diag_block_inverses nb={nb}", f"solve: blocked nb={nb}",
                         f"rel. residual ‖Sx − r‖∞/‖r‖∞, nb={nb}"):
                out[name] = "–"
            continue
        dinv = diag_block_inverses(L, nb)
        out[f"blocked_cholesky nb={nb}"] = (lambda nb=nb: blocked_cholesky(S, nb))
        out[f"diag_block_inverses nb={nb}"] = (lambda nb=nb: diag_block_inverses(L, nb))
        out[f"solve: blocked nb={nb}"] = (lambda dinv=dinv: blocked_chol_solve(L, dinv, r))
        Lb, db, _ = blocked_cholesky(S, nb)
        x = blocked_chol_solve(Lb, db, r)
        res = (torch.matmul(S, x) - r).abs().amax() / r.abs().amax()
        out[f"rel. residual ‖Sx − r‖∞/‖r‖∞, nb={nb}"] = f"{res.item():.1e}"     # a value, not timed
        # the diagonal blocks by the fused source's kernel (dqp.solvers.fused.chol_block)
        name = f"blocked_cholesky nb={nb}, kernel diagonal"
        if dtype == torch.float64 and fused.chol_block_available(S.device, dtype, nb):
            diag = (lambda W, j0, j1, info, nb=nb: fused.chol_block(W, j0, j1, info, tile=nb))
            out[name] = (lambda nb=nb, diag=diag: blocked_cholesky(S, nb, diag_factor=diag))
            Lk, dk, _ = blocked_cholesky(S, nb, diag_factor=diag)
            x = blocked_chol_solve(Lk, dk, r)
            res = (torch.matmul(S, x) - r).abs().amax() / r.abs().amax()
            out[f"rel. residual, nb={nb}, kernel diagonal"] = f"{res.item():.1e}"
        else:
            out[name] = "–"
    if dtype == torch.float64 and k <= fused.KMAX and fused.chol_block_available(S.device, dtype, k):
        # the whole factor and its inverse in one launch, against cholesky_ex + the inverse (k ≤ 128)
        eye = torch.eye(k, dtype=dtype, device=S.device).expand(B, k, k)
        info = torch.zeros(B, dtype=torch.int32, device=S.device)
        out["cholesky_ex + inverse (trsm)"] = lambda: torch.linalg.solve_triangular(
            torch.linalg.cholesky_ex(S)[0], eye, upper=False)
        out["chol_block: factor + inverse"] = lambda: fused.chol_block(S.clone(), 0, k, info)
        out["clone (in chol_block's time)"] = lambda: S.clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x100,1024x100,128x500", help="BxK list")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--libs", default="default,magma,cusolver")
    ap.add_argument("--out", default=None)
    ap.add_argument("--blocked", default=None, help="block sizes, e.g. 32,64,128: time the blocked "
                    "Cholesky/solves of dqp.linsolve.blocked instead of the library table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py needs CUDA")
    lines: List[str] = [f"### Batched linear-algebra kernels on {torch.cuda.get_device_name()} "
                        f"(torch {torch.__version__})", "",
                        "µs per call: CUDA-graph replay (device time) / eager call from Python.", ""]
    shapes: List[Tuple[int, int]] = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for lib in args.libs.split(","):
        if lib != "default":
            torch.backends.cuda.preferred_linalg_library(lib)
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            lines += [f"#### linalg library: {lib}, {dt}", "",
                      "| op | " + " | ".join(f"B={B} k={k}" for B, k in shapes) + " |",
                      "|---|" + "---|" * len(shapes)]
            table: Dict[str, List[str]] = {}
            for B, k in shapes:
                ops = (ops_for(B, k, dtype) if args.blocked is None else
                       blocked_ops_for(B, k, dtype, [int(x) for x in args.blocked.split(",")]))
                for name, fn in ops.items():
                    if isinstance(fn, str):
                        table.setdefault(name, []).append(fn)
                        continue
                    try:
                        gt = _graph_time(fn, args.inner, args.reps)
                        et = _eager_time(fn, args.reps)
                        cell = f"{gt:.1f} / {et:.1f}"
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        cell = f"failed ({type(exc).__name__})"
                    table.setdefault(name, []).append(cell)
                torch.cuda.empty_cache()
            lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in table.items()]
            lines.append("")
            print("\n".join(lines[-len(table) - 4:]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
