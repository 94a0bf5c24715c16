"""Maros–Meszaros study: forward + backward through every problem, dqp next to libdqp.

For each problem (``min ½xᵀPx + qᵀx s.t. l ≤ Ax ≤ u``, converted by :mod:`dqp.io` to
``Cz ≤ d, Az = b``) and each implementation, one worker subprocess (so a hang or a crash is
recorded, not fatal) does

1. a forward pass through the layer (sparse CSC inputs, every parameter requiring gradients),
2. a backward pass of ``loss = wᵀz`` with a fixed random ``w`` (seeded by the problem name),
3. KKT residuals computed here, independently of either library, from (z, λ, μ):
   primal feasibility ``max(‖max(Cz−d,0)‖∞, ‖Az−b‖∞)``, dual stationarity
   ``‖Pz+q+Aᵀλ+Cᵀμ‖∞``, complementarity ``max|μ_i (d−Cz)_i|``, dual sign ``max(−μ)``,
   each also relative to the size of the data,
4. the objective against a high-accuracy reference solve (Clarabel at 1e-12, falling back to
   ProxQP and HiGHS where Clarabel fails, then polished on its active set),
5. a directional central finite-difference check of ``∇_q loss`` and ``∇_d loss`` along a random
   direction, each perturbed problem re-solved with the reference solver, when the layer's
   solution is strictly complementary (no constraint with both slack and dual ≈ 0).

dqp runs in this interpreter's environment; libdqp (the reference implementation, which also
imports as ``dqp``) runs in its own venv, ``.peers/libdqp`` (``--libdqp-python``): this script
re-invokes itself there with ``--impl libdqp-worker``. Workers print one JSON line.

Outputs (``--out``, default ``experiments/results/maros_meszaros``): ``<out>.csv`` (one row per
problem × implementation), ``<out>.md`` (counts, worst residuals, per-problem table) and
``<out>.png`` (forward/backward time vs. size, failures marked).

Examples
--------
    python experiments/maros_meszaros.py --impl both --max-n 1000 --max-m 1000
    python experiments/maros_meszaros.py --impl ours --names HS21,HS35 --out /tmp/mm
    python experiments/maros_meszaros.py --impl both --timeout-per-problem 300 \\
        --out experiments/results/maros_meszaros_full          # all 137
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIBDQP_PY = REPO / ".peers" / "libdqp" / "bin" / "python"
DEFAULT_OUT = REPO / "experiments" / "results" / "maros_meszaros"
MARKER = "@@MM_RESULT "

logger = logging.getLogger("maros_meszaros")

# thresholds (documented in the README section)
FD_RTOL = 1e-3  # FD check passes if |fd − an| ≤ FD_RTOL·max(|fd|, |an|) + FD_ATOL
FD_ATOL = 1e-8
FD_STEPS = (1e-3, 1e-5, 1e-7)  # absolute steps along a unit direction (the closest agreement is kept)
STRICT_TOL = 1e-6  # weakly active: slack ≤ tol·(1+|d_i|) and μ_i ≤ tol·(1+‖μ‖∞)
# reference solvers, tried in order until one reports success (Clarabel stalls on QISRAEL)
REFERENCE_SOLVERS = (
    ("clarabel", dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10, max_iter=400)),
    ("proxqp", dict(eps_abs=1e-10, eps_rel=0.0)),
    # default tolerances: with 1e-10 HiGHS never returns on QISRAEL; the polish makes it exact anyway
    ("highs", dict(time_limit=60.0)),
)
KKT_OK = 1e-5  # a "success" whose relative KKT residual exceeds this is flagged inaccurate


# =============================================================================================
# Helpers usable in both environments (numpy/scipy only)
# =============================================================================================
def read_problem_npz(path: str) -> Dict[str, Any]:
    """Read the pickle-free .npz written by ``dqp.io.save_problem`` (numpy/scipy only)."""
    z = np.load(path)
    out: Dict[str, Any] = {"q": z["q"], "d": z["d"], "b": z["b"] if "b" in z.files else None}
    for k in ("P", "C", "A"):
        if f"{k}_data" in z.files:
            out[k] = sp.csc_matrix(
                (z[f"{k}_data"], z[f"{k}_indices"], z[f"{k}_indptr"]), shape=tuple(int(s) for s in z[f"{k}_shape"])
            )
        else:
            out[k] = None
    return out


def loss_weights(name: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.standard_normal(n) / math.sqrt(n)


def fd_direction(name: str, n: int, m: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    v = rng.standard_normal(n + m)
    v /= np.linalg.norm(v)
    return v[:n], v[n:]


def kkt_residuals(prob: Dict[str, Any], z: np.ndarray, lam: Optional[np.ndarray], mu: np.ndarray) -> Dict[str, float]:
    """Independent KKT residuals (absolute and relative to the data's scale)."""
    P, q, C, d, A, b = (prob[k] for k in ("P", "q", "C", "d", "A", "b"))
    Pz = P @ z
    stat = Pz + q
    prim = 0.0
    scale_p = 1.0
    if C is not None and C.shape[0]:
        Cz = C @ z
        prim = max(prim, float(np.max(np.maximum(Cz - d, 0.0))))
        scale_p = max(scale_p, float(np.max(np.abs(Cz))), float(np.max(np.abs(d))))
        Ctmu = C.T @ mu
        stat = stat + Ctmu
        slack = d - Cz
        comp = float(np.max(np.abs(mu * slack)))
        dneg = float(max(0.0, -np.min(mu)))
        scale_d = max(1.0, float(np.max(np.abs(Ctmu))))
    else:
        comp, dneg, scale_d = 0.0, 0.0, 1.0
    if A is not None and A.shape[0]:
        Az = A @ z
        prim = max(prim, float(np.max(np.abs(Az - b))))
        scale_p = max(scale_p, float(np.max(np.abs(Az))), float(np.max(np.abs(b))))
        Atl = A.T @ lam
        stat = stat + Atl
        scale_d = max(scale_d, float(np.max(np.abs(Atl))))
    dual = float(np.max(np.abs(stat))) if stat.size else 0.0
    scale_d = max(scale_d, float(np.max(np.abs(Pz))) if Pz.size else 0.0, float(np.max(np.abs(q))) if q.size else 0.0)
    return {
        "prim_res": prim,
        "dual_res": dual,
        "comp_res": comp,
        "dual_neg": dneg,
        "prim_rel": prim / scale_p,
        "dual_rel": dual / scale_d,
        "comp_rel": comp / max(1.0, scale_p * float(np.max(np.abs(mu))) if mu.size else 1.0),
    }


def weakly_active_count(prob: Dict[str, Any], z: np.ndarray, mu: np.ndarray, tol: float = STRICT_TOL) -> int:
    C, d = prob["C"], prob["d"]
    if C is None or not C.shape[0]:
        return 0
    slack = d - C @ z
    mu_scale = 1.0 + float(np.max(np.abs(mu)))
    weak = (slack <= tol * (1 + np.abs(d))) & (mu <= tol * mu_scale)
    return int(weak.sum())


def _solve_kkt(K: sp.spmatrix, rhs: np.ndarray) -> Optional[np.ndarray]:
    """Solve the reduced KKT system, or None if it is (numerically) singular.

    Dense LU up to 4000 unknowns, QDLDL above. SciPy's SuperLU is avoided on purpose: on exactly
    singular KKT matrices it prints BLAS "illegal value" errors and can segfault (seen on QGROW7).
    """
    N = K.shape[0]
    if N <= 4000:
        import scipy.linalg as sla

        try:
            lu, piv = sla.lu_factor(K.toarray(), check_finite=False)
        except Exception:  # noqa: BLE001
            return None
        diag = np.abs(np.diag(lu))
        if not np.all(np.isfinite(diag)) or diag.min() <= 1e-13 * max(diag.max(), 1e-300):
            return None
        x = sla.lu_solve((lu, piv), rhs, check_finite=False)
    else:
        try:
            import qdldl

            x = qdldl.Solver(sp.triu(K, format="csc")).solve(rhs)
        except Exception:  # noqa: BLE001 - zero pivot (singular) or qdldl missing
            return None
    if not np.all(np.isfinite(x)) or np.linalg.norm(K @ x - rhs) > 1e-8 * max(1.0, np.linalg.norm(rhs)):
        return None
    return x


def reference_solve(
    prob: Dict[str, Any], q: np.ndarray, d: np.ndarray
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], str]:
    """High-accuracy solve (first of REFERENCE_SOLVERS that succeeds), polished on its active set.

    Returns (z or None, μ or None, how) where how is 'polished:<solver>', 'raw:<solver>' (polish
    rejected or impossible: a singular reduced KKT) or a failure note.
    """
    import warnings

    import qpsolvers

    P, C, A, b = prob["P"], prob["C"], prob["A"], prob["b"]
    has_C = C is not None and C.shape[0] > 0
    problem = qpsolvers.Problem(P, q, C if has_C else None, d if has_C else None, A, b)
    sol, notes = None, []
    for solver, kw in REFERENCE_SOLVERS:
        if solver not in qpsolvers.available_solvers:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = qpsolvers.solve_problem(problem, solver=solver, **kw)
        except Exception as exc:  # noqa: BLE001 - record whatever the reference solver raises
            notes.append(f"{solver} raised {type(exc).__name__}")
            continue
        if s.found and s.x is not None and np.all(np.isfinite(s.x)):
            sol, used = s, solver
            break
        notes.append(f"{solver} not solved")
    if sol is None:
        return None, None, "no reference: " + ", ".join(notes)
    z = sol.x
    mu = np.zeros(C.shape[0] if has_C else 0) if sol.z is None else np.asarray(sol.z)
    if not has_C:
        J = np.zeros(0, dtype=int)
    else:
        slack = d - C @ z
        J = np.flatnonzero(mu > slack)
    n = P.shape[0]
    rows = [
        M
        for M in ((A if A is not None and A.shape[0] else None), (C[J] if has_C and len(J) else None))
        if M is not None
    ]
    Abar = sp.vstack(rows, format="csc") if rows else sp.csc_matrix((0, n))
    rhs_c = np.concatenate(
        [b if A is not None and A.shape[0] else np.zeros(0), d[J] if has_C and len(J) else np.zeros(0)]
    )
    k = Abar.shape[0]
    K = sp.bmat([[P, Abar.T], [Abar, None]], format="csc") if k else sp.csc_matrix(P)
    rhs = np.concatenate([-q, rhs_c])
    x = _solve_kkt(K, rhs)
    if x is None:
        return z, mu, f"raw:{used}"
    if not np.all(np.isfinite(x)):
        return z, mu, f"raw:{used}"
    zp = x[:n]
    scale = 1.0 + float(np.max(np.abs(rhs))) if rhs.size else 1.0
    ok = True
    # [P Abarᵀ; Abar 0][z; y] = [−q; c]  ⇔  Pz + q + Abarᵀy = 0, so y = (λ, μ_J) and μ_J must be ≥ 0
    if has_C and np.max(C @ zp - d) > 1e-9 * scale:
        ok = False
    if has_C and len(J):
        n_eq = A.shape[0] if A is not None else 0
        muJ = x[n + n_eq :]
        if np.min(muJ) < -1e-9 * max(1.0, float(np.max(np.abs(muJ)))):
            ok = False
    if not ok:
        return z, mu, f"raw:{used}"
    mu_p = np.zeros_like(mu)
    if has_C and len(J):
        mu_p[J] = x[n + (A.shape[0] if A is not None else 0) :]
    return zp, mu_p, f"polished:{used}"


def fd_check(prob: Dict[str, Any], w: np.ndarray, grad_q: np.ndarray, grad_d: np.ndarray, name: str) -> Dict[str, Any]:
    """Central FD of loss = wᵀz along a random unit direction in (q, d), re-solving with the reference."""
    n, m = prob["P"].shape[0], len(prob["d"])
    dq, dd = fd_direction(name, n, m)
    an = float(grad_q @ dq + (grad_d @ dd if m else 0.0))
    best = None
    hows = set()
    for h in FD_STEPS:
        zp, _, how_p = reference_solve(prob, prob["q"] + h * dq, prob["d"] + h * dd)
        zm, _, how_m = reference_solve(prob, prob["q"] - h * dq, prob["d"] - h * dd)
        hows.update([how_p, how_m])
        if zp is None or zm is None:
            continue
        fd = float(w @ (zp - zm) / (2 * h))
        err = abs(fd - an)
        if best is None or err < best[0]:
            best = (err, fd, h)
    if best is None:
        return {"fd_status": "error", "fd_note": "; ".join(sorted(hows)), "fd_an": an}
    err, fd, h = best
    ok = err <= FD_RTOL * max(abs(fd), abs(an)) + FD_ATOL
    return {
        "fd_status": "pass" if ok else "fail",
        "fd_an": an,
        "fd_num": fd,
        "fd_h": h,
        "fd_rel_err": err / max(abs(fd), abs(an), 1e-300),
        "fd_note": "/".join(sorted(hows)),
    }


def _finite(*arrays: Optional[np.ndarray]) -> bool:
    return all(a is None or np.all(np.isfinite(a)) for a in arrays)


# =============================================================================================
# Worker (runs inside one implementation's environment)
# =============================================================================================
def _fast_csc(ccol, row, vals, size):
    """CSC tensor from a values leaf, with an O(nnz) backward.

    torch's own autograd node for ``torch.sparse_csc_tensor(ccol, row, vals)`` costs O(n²) in the
    backward (9 s at n = 10⁴, one thread), which would swamp both layers' backward times on the
    large problems. Same helper as ``dqp.io._csc_from_values`` (duplicated: this file also runs in
    libdqp's venv, where ``dqp`` is libdqp). Used for both implementations.
    """
    import torch

    class _CSC(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return torch.sparse_csc_tensor(ccol, row, v, size=size, dtype=v.dtype)

        @staticmethod
        def backward(ctx, grad):
            if (
                grad.layout == torch.sparse_csc
                and grad.values().shape == vals.shape
                and torch.equal(grad.ccol_indices(), ccol)
                and torch.equal(grad.row_indices(), row)
            ):
                return grad.values()
            dense = grad.to_dense() if grad.layout != torch.strided else grad
            cols = torch.repeat_interleave(torch.arange(size[1]), ccol.diff())
            return dense[row, cols]

    return _CSC.apply(vals)


def _torch_inputs(prob: Dict[str, Any], impl: str):
    """Torch tensors with gradients: CSC tensors built from value leaves (both implementations)."""
    import torch

    leaves = {}

    def mat(key):
        M = prob[key]
        if M is None:
            return None
        M = sp.csc_matrix(M)
        M.sort_indices()
        # gradients live on the values: the values are the leaf, the CSC tensor is built from them
        vals = torch.tensor(M.data, dtype=torch.float64, requires_grad=True)
        leaves[key] = vals
        return _fast_csc(
            torch.tensor(M.indptr, dtype=torch.int64), torch.tensor(M.indices, dtype=torch.int64), vals, M.shape
        )

    def vec(key):
        v = prob[key]
        if v is None:
            return None
        t = torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True)
        leaves[key] = t
        return t

    return (mat("P"), vec("q"), mat("C"), vec("d"), mat("A"), vec("b")), leaves


def _which_dqp(impl: str, dqp) -> str:
    """The package the worker imported as ``dqp``, by distribution and version (not a path)."""
    from importlib import metadata

    if impl == "libdqp":
        return f"libdqp {metadata.version('libdqp')}"
    return f"dqp {getattr(dqp, '__version__', '?')}"


def worker(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    impl = "ours" if args.impl == "ours-worker" else "libdqp"
    prob = read_problem_npz(args.problem_npz)
    name = args.name
    n = prob["P"].shape[0]
    m = len(prob["d"])
    p = 0 if prob["A"] is None else prob["A"].shape[0]
    rec: Dict[str, Any] = {
        "name": name,
        "impl": impl,
        "solver": args.solver,
        "n": n,
        "m_ineq": m,
        "p_eq": p,
        "nnz": int(
            prob["P"].nnz
            + (prob["C"].nnz if prob["C"] is not None else 0)
            + (prob["A"].nnz if prob["A"] is not None else 0)
        ),
    }
    import dqp
    from dqp import dQP

    rec["module"] = _which_dqp(impl, dqp)
    (P, q, C, d, A, b), leaves = _torch_inputs(prob, impl)
    if impl == "ours":
        settings = dQP.build_settings(solve_type="sparse", qp_solver=args.solver, time=True, empty_batch=False)
    else:
        settings = dQP.build_settings(
            solve_type="sparse", qp_solver=args.solver, lin_solver=args.libdqp_lin_solver, empty_batch=False
        )
    layer = dQP.dQP_layer(settings=settings)
    w = loss_weights(name, n)
    stage = "forward"
    try:
        # timed twice in this fresh process: the first (cold) call also loads libraries (Pardiso's
        # first use costs ~1 s here); the second, on fresh leaves, is the one reported
        t_cold = None
        for rep in range(2 if args.warm else 1):
            if rep:
                (P, q, C, d, A, b), leaves = _torch_inputs(prob, impl)
                layer = dQP.dQP_layer(settings=settings)
            stage = "forward"
            t0 = time.perf_counter()
            out = layer(P, q, C, d, A, b)
            t_fwd = time.perf_counter() - t0
            z, lam, mu = out[0], out[1], out[2]
            stage = "backward"
            loss = (z.reshape(-1) * torch.as_tensor(w)).sum()
            t0 = time.perf_counter()
            loss.backward()
            t_bwd = time.perf_counter() - t0
            if not rep:
                t_cold = (t_fwd, t_bwd)
        rec["t_forward_cold"], rec["t_backward_cold"] = t_cold
    except Exception as exc:  # noqa: BLE001 - the study records every failure with its class
        cls = type(exc)
        rec.update(
            status="error",
            stage=stage,
            error_class=cls.__name__,
            error_module=cls.__module__,
            error_msg=str(exc).strip().replace("\n", " | ")[:400],
        )
        try:
            from dqp.errors import DQPError  # ours only

            rec["typed"] = impl == "ours" and isinstance(exc, DQPError)
        except ImportError:
            rec["typed"] = False
        return rec
    zn = z.detach().reshape(-1).numpy().astype(np.float64)
    lamn = None if (lam is None or p == 0) else lam.detach().reshape(-1).numpy().astype(np.float64)
    mun = np.zeros(0) if (mu is None or m == 0) else mu.detach().reshape(-1).numpy().astype(np.float64)
    gq = leaves["q"].grad
    gd = leaves["d"].grad if "d" in leaves else None
    gq = np.zeros(n) if gq is None else gq.detach().numpy()
    gd = np.zeros(m) if gd is None else gd.detach().numpy()
    other_grads = []
    for k in ("P", "C", "A", "b"):
        if k in leaves and leaves[k].grad is not None:
            other_grads.append(leaves[k].grad.detach().numpy())
    rec.update(t_forward=t_fwd, t_backward=t_bwd, bwd_fwd_ratio=t_bwd / t_fwd if t_fwd > 0 else float("nan"))
    finite = _finite(zn, lamn, mun, gq, gd, *other_grads)
    rec["finite"] = finite
    if not finite:
        rec.update(
            status="nan",
            stage="output",
            error_class="SilentNaN",
            error_msg="non-finite value in z, duals or gradients without an exception",
        )
        return rec
    rec["status"] = "ok"
    rec.update(kkt_residuals(prob, zn, lamn, mun))
    rec["n_active"] = int(np.sum(mun > 0)) if m else 0
    rec["n_weak"] = weakly_active_count(prob, zn, mun)
    if impl == "ours":
        info = getattr(layer, "info", None)
        if info is not None:
            for key in ("kkt_path", "verified", "n_weakly_active", "refine_iterations"):
                v = getattr(info, key, None)
                if isinstance(v, list) and v:
                    rec[f"info_{key}"] = v[0] if not isinstance(v[0], np.generic) else v[0].item()
    else:
        rec["libdqp_non_differentiable"] = bool(getattr(layer, "non_differentiable", False))
    # objective vs the high-accuracy reference
    obj = float(0.5 * zn @ (prob["P"] @ zn) + prob["q"] @ zn)
    rec["objective"] = obj
    if not args.no_reference and n <= args.fd_max_n:
        zr, mur, how = reference_solve(prob, prob["q"], prob["d"])
        rec["ref_how"] = how
        if zr is not None:
            obj_ref = float(0.5 * zr @ (prob["P"] @ zr) + prob["q"] @ zr)
            rec.update(
                objective_ref=obj_ref,
                obj_rel_err=abs(obj - obj_ref) / max(1.0, abs(obj_ref)),
                z_err_vs_ref=float(np.max(np.abs(zn - zr))) / max(1.0, float(np.max(np.abs(zr)))),
                n_weak_ref=weakly_active_count(prob, zr, mur) if how.startswith("polished") else -1,
            )
        # strict complementarity is judged on the polished reference solution (the same for every
        # implementation), not on each implementation's own (possibly less accurate) duals
        if args.no_fd:
            rec["fd_status"] = "off"
        elif zr is None or not how.startswith("polished"):
            rec["fd_status"] = "skipped"
            rec["fd_note"] = f"reference not polished ({how}): strict complementarity unknown"
        elif rec["n_weak_ref"] > 0:
            rec["fd_status"] = "skipped"
            rec["fd_note"] = f"{rec['n_weak_ref']} weakly active constraint(s): not strictly complementary"
        else:
            rec.update(fd_check(prob, w, gq, gd, name))
    else:
        rec["fd_status"] = "off"
    return rec


# =============================================================================================
# Driver
# =============================================================================================
def run_worker(impl: str, python: str, npz: Path, name: str, args: argparse.Namespace, solver: str) -> Dict[str, Any]:
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--impl",
        f"{impl}-worker",
        "--problem-npz",
        str(npz),
        "--name",
        name,
        "--solver",
        solver,
        "--threads",
        str(args.threads),
        "--fd-max-n",
        str(args.fd_max_n),
        "--libdqp-lin-solver",
        args.libdqp_lin_solver,
    ]
    if args.no_fd:
        cmd.append("--no-fd")
    if args.no_reference:
        cmd.append("--no-reference")
    if args.warm:
        cmd.append("--warm")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(args.threads)
    if impl == "libdqp":
        env.pop("PYTHONPATH", None)
    cwd = tempfile.gettempdir()  # never the repo root: libdqp must not see our dqp/ on sys.path
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_per_problem, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {
            "name": name,
            "impl": impl,
            "solver": solver,
            "status": "timeout",
            "error_class": "Timeout",
            "error_msg": f"no result within {args.timeout_per_problem} s (killed)",
            "wall": time.perf_counter() - t0,
        }
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(MARKER):
            rec = json.loads(line[len(MARKER) :])
            rec["wall"] = wall
            return rec
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return {
        "name": name,
        "impl": impl,
        "solver": solver,
        "status": "crash",
        "error_class": f"Crash(rc={proc.returncode})",
        "error_msg": " | ".join(tail)[:400],
        "wall": wall,
    }


COLUMNS = [
    "name",
    "impl",
    "solver",
    "n",
    "m_ineq",
    "p_eq",
    "nnz",
    "status",
    "stage",
    "error_class",
    "typed",
    "error_msg",
    "t_forward",
    "t_backward",
    "bwd_fwd_ratio",
    "prim_res",
    "dual_res",
    "comp_res",
    "dual_neg",
    "prim_rel",
    "dual_rel",
    "comp_rel",
    "n_active",
    "n_weak",
    "objective",
    "objective_ref",
    "obj_rel_err",
    "z_err_vs_ref",
    "n_weak_ref",
    "ref_how",
    "fd_status",
    "fd_rel_err",
    "fd_an",
    "fd_num",
    "fd_h",
    "fd_note",
    "info_kkt_path",
    "info_verified",
    "info_n_weakly_active",
    "info_refine_iterations",
    "libdqp_non_differentiable",
    "fastest_solver",
    "fastest_t_forward",
    "t_forward_cold",
    "t_backward_cold",
    "wall",
    "module",
]


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in COLUMNS})


def read_csv_rows(path: Path) -> List[Dict[str, Any]]:
    """Rows of an earlier run's CSV, with numbers and booleans restored (empty cells dropped)."""
    out = []
    with open(path) as f:
        for raw in csv.DictReader(f):
            row: Dict[str, Any] = {}
            for k, v in raw.items():
                if v == "" or v is None:
                    continue
                if v in ("True", "False"):
                    row[k] = v == "True"
                    continue
                try:
                    row[k] = (
                        int(v) if k in ("n", "m_ineq", "p_eq", "nnz", "n_active", "n_weak", "n_weak_ref") else float(v)
                    )
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


def _fmt(x: Any, spec: str = ".1e") -> str:
    if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def summarize(rows: List[Dict[str, Any]], impl: str) -> Dict[str, Any]:
    rs = [r for r in rows if r["impl"] == impl]
    ok = [r for r in rs if r["status"] == "ok"]
    s: Dict[str, Any] = {"problems": len(rs), "ok": len(ok)}
    s["typed_errors"] = sum(1 for r in rs if r["status"] == "error" and r.get("typed"))
    s["untyped_errors"] = sum(1 for r in rs if r["status"] == "error" and not r.get("typed"))
    s["silent_nan"] = sum(1 for r in rs if r["status"] == "nan")
    s["timeouts"] = sum(1 for r in rs if r["status"] == "timeout")
    s["crashes"] = sum(1 for r in rs if r["status"] == "crash")
    s["inaccurate"] = sum(
        1 for r in ok if max(r.get("prim_rel", 0), r.get("dual_rel", 0), r.get("comp_rel", 0)) > KKT_OK
    )
    s["obj_off"] = sum(1 for r in ok if (r.get("obj_rel_err") or 0) > 1e-6)
    s["unverified"] = sum(1 for r in ok if r.get("info_verified") is False) if impl == "ours" else "–"
    for k in ("pass", "fail", "skipped", "error"):
        s[f"fd_{k}"] = sum(1 for r in ok if r.get("fd_status") == k)
    for k in (
        "prim_res",
        "dual_res",
        "comp_res",
        "prim_rel",
        "dual_rel",
        "comp_rel",
        "obj_rel_err",
        "z_err_vs_ref",
        "fd_rel_err",
    ):
        vals = [(r.get(k), r["name"]) for r in ok if isinstance(r.get(k), (int, float))]
        s[f"worst_{k}"] = max(vals) if vals else (None, "")
    fw = [r["t_forward"] for r in ok]
    bw = [r["t_backward"] for r in ok]
    ratio = [r["bwd_fwd_ratio"] for r in ok if r["t_forward"] > 0]
    s["fwd_total"] = sum(fw)
    s["bwd_total"] = sum(bw)
    s["fwd_median"] = float(np.median(fw)) if fw else None
    s["bwd_median"] = float(np.median(bw)) if bw else None
    s["ratio_median"] = float(np.median(ratio)) if ratio else None
    s["ratio_max"] = max(ratio) if ratio else None
    by_class: Dict[str, int] = {}
    for r in rs:
        if r["status"] != "ok":
            by_class[r.get("error_class", r["status"])] = by_class.get(r.get("error_class", r["status"]), 0) + 1
    s["failures_by_class"] = by_class
    return s


def write_markdown(rows: List[Dict[str, Any]], path: Path, impls: List[str], command: str, solver: str) -> str:
    names = sorted(
        {r["name"] for r in rows},
        key=lambda nm: (
            next((r.get("n", 0) + r.get("m_ineq", 0) + r.get("p_eq", 0)) for r in rows if r["name"] == nm and "n" in r)
            if any("n" in r for r in rows if r["name"] == nm)
            else 0
        ),
    )
    sums = {i: summarize(rows, i) for i in impls}
    L = [
        f"# Maros–Meszaros: forward + backward, {len(names)} problems",
        "",
        f"Command: `{command})  ",
        f"Forward solver: `{solver}` for every implementation; loss = wᵀz (fixed random w); "
        f"KKT residuals computed by the script from (z, λ, μ); FD = directional central difference in (q, d) "
        f"re-solved with the reference solver (Clarabel at 1e-12, else ProxQP at 1e-10, else HiGHS) + active-set polish, steps {FD_STEPS} (closest kept), run only where the polished reference solution is strictly complementary (pass: |fd−an| ≤ {FD_RTOL:g}·max(|fd|,|an|) + {FD_ATOL:g}).",
        "",
        "## Counts",
        "",
        "| | " + " | ".join(impls) + " |",
        "|---|" + "---|" * len(impls),
    ]
    labels = [
        ("problems", "problems run"),
        ("ok", "forward + backward succeeded"),
        ("typed_errors", "typed dqp error (DQPError)"),
        ("untyped_errors", "other exception"),
        ("silent_nan", "silent NaN/Inf (no exception)"),
        ("timeouts", "timeout (killed)"),
        ("crashes", "crash (no result)"),
        ("inaccurate", f"succeeded but relative KKT residual > {KKT_OK:g}"),
        ("obj_off", "succeeded but objective off the reference by > 1e-6 (relative)"),
        ("unverified", "succeeded, layer.info.verified False (ours only)"),
        ("fd_pass", "FD check passed"),
        ("fd_fail", "FD check failed"),
        ("fd_skipped", "FD skipped (reference not strictly complementary, or its reduced KKT singular)"),
        ("fd_error", "FD reference solve failed"),
    ]
    for key, lab in labels:
        L.append(f"| {lab} | " + " | ".join(str(sums[i][key]) for i in impls) + " |")
    L += [
        "",
        "## Worst residuals over the successful problems",
        "",
        "| residual | " + " | ".join(impls) + " |",
        "|---|" + "---|" * len(impls),
    ]
    for key, lab in [
        ("prim_res", "primal feasibility (abs)"),
        ("dual_res", "stationarity ‖Pz+q+Aᵀλ+Cᵀμ‖∞ (abs)"),
        ("comp_res", "complementarity max|μᵢsᵢ| (abs)"),
        ("prim_rel", "primal (relative)"),
        ("dual_rel", "stationarity (relative)"),
        ("comp_rel", "complementarity (relative)"),
        ("obj_rel_err", "objective vs reference (relative)"),
        ("z_err_vs_ref", "‖z − z_ref‖∞ / max(1, ‖z_ref‖∞)"),
        ("fd_rel_err", "FD relative error (checked problems)"),
    ]:
        L.append(
            f"| {lab} | "
            + " | ".join(f"{_fmt(sums[i]['worst_' + key][0])} ({sums[i]['worst_' + key][1]})" for i in impls)
            + " |"
        )
    warm = any(r.get("t_forward_cold") not in (None, "") for r in rows)
    L += [
        "",
        "## Timings (successful problems; seconds, 1 thread)",
        "",
        (
            "Each worker process ran forward + backward twice; the second (warm) call is reported, the first "
            "(cold: library loading included) is the last row."
            if warm
            else "One forward + backward per fresh worker process (cold: library loading included)."
        ),
        "",
        "| | " + " | ".join(impls) + " |",
        "|---|" + "---|" * len(impls),
    ]
    for key, lab, spec in [
        ("fwd_total", "forward, total", ".2f"),
        ("bwd_total", "backward, total", ".2f"),
        ("fwd_median", "forward, median", ".2e"),
        ("bwd_median", "backward, median", ".2e"),
        ("ratio_median", "backward/forward, median", ".3f"),
        ("ratio_max", "backward/forward, max", ".3f"),
    ]:
        L.append(f"| {lab} | " + " | ".join(_fmt(sums[i][key], spec) for i in impls) + " |")
    if warm:
        cold = {
            i: sum(
                float(r["t_forward_cold"])
                for r in rows
                if r["impl"] == i and r["status"] == "ok" and r.get("t_forward_cold") not in (None, "")
            )
            for i in impls
        }
        L.append("| forward, total, cold first call | " + " | ".join(_fmt(cold[i], ".2f") for i in impls) + " |")
    if len(impls) == 2:
        both = [
            (a, b)
            for a in rows
            if a["impl"] == impls[0] and a["status"] == "ok"
            for b in rows
            if b["impl"] == impls[1] and b["name"] == a["name"] and b["status"] == "ok"
        ]
        if both:
            rf = [b["t_forward"] / a["t_forward"] for a, b in both if a["t_forward"] > 0]
            rb = [b["t_backward"] / a["t_backward"] for a, b in both if a["t_backward"] > 0]
            L.append(
                f"| {impls[1]}/{impls[0]} time ratio on the {len(both)} problems both solved (median, forward / backward) | "
                f"{_fmt(float(np.median(rf)), '.2f')} | {_fmt(float(np.median(rb)), '.2f')} |"
            )
    fast = [r for r in rows if r.get("fastest_solver")]
    if fast:
        L += ["", "## Fastest solver per problem (forward + backward succeeded)", ""]
        for i in impls:
            fi = [r for r in fast if r["impl"] == i]
            if not fi:
                continue
            wins: Dict[str, int] = {}
            for r in fi:
                wins[r["fastest_solver"]] = wins.get(r["fastest_solver"], 0) + 1
            sp_up = [
                r["t_forward"] / r["fastest_t_forward"]
                for r in fi
                if r["status"] == "ok" and r.get("fastest_t_forward")
            ]
            rescued = sum(1 for r in fi if r["status"] != "ok")
            L.append(
                f"- **{i}**: fastest = "
                + ", ".join(f"{k} × {v}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1]))
                + (f"; median forward speed-up over `{solver}` {float(np.median(sp_up)):.2f}×" if sp_up else "")
                + f"; {rescued} problem(s) that failed with `{solver}` went through with another solver"
            )
    L += ["", "## Failures by class", ""]
    for i in impls:
        fc = sums[i]["failures_by_class"]
        L.append(
            f"- **{i}**: " + (", ".join(f"{k} × {v}" for k, v in sorted(fc.items(), key=lambda kv: -kv[1])) or "none")
        )
    L += [
        "",
        "## Per problem",
        "",
        "Status, forward / backward time (ms), worst relative KKT residual, FD result.",
        "",
        "| problem | n | m (ineq) | p (eq) | "
        + " | ".join(f"{i}: status | {i}: fwd ms | {i}: bwd ms | {i}: KKT rel | {i}: FD" for i in impls)
        + " |",
        "|---|---|---|---|" + "---|---|---|---|---|" * len(impls),
    ]
    for nm in names:
        rr = {r["impl"]: r for r in rows if r["name"] == nm}
        base = next((r for r in rr.values() if "n" in r), {})
        cells = [nm, str(base.get("n", "")), str(base.get("m_ineq", "")), str(base.get("p_eq", ""))]
        for i in impls:
            r = rr.get(i)
            if r is None:
                cells += ["–"] * 5
                continue
            st = "ok" if r["status"] == "ok" else f"**{r.get('error_class', r['status'])}**"
            kkt = max(r.get("prim_rel", 0), r.get("dual_rel", 0), r.get("comp_rel", 0)) if r["status"] == "ok" else None
            fd = r.get("fd_status", "–") if r["status"] == "ok" else "–"
            if fd == "fail":
                fd = f"fail ({_fmt(r.get('fd_rel_err'))})"
            cells += [
                st,
                _fmt(1e3 * r["t_forward"], ".1f") if r["status"] == "ok" else "–",
                _fmt(1e3 * r["t_backward"], ".1f") if r["status"] == "ok" else "–",
                _fmt(kkt),
                fd,
            ]
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "## Error messages", ""]
    for r in rows:
        if r["status"] != "ok":
            L.append(f"- {r['name']} ({r['impl']}): `{r.get('error_class')}`: {str(r.get('error_msg', ''))[:300]}")
    text = "\n".join(L) + "\n"
    path.write_text(text)
    return text


def plot(csv_path: Path, png_path: Path) -> bool:
    """Forward and backward time vs. problem size, per implementation, failures marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = {"ours": "tab:blue", "libdqp": "tab:orange"}
    for ax, key, title in ((axes[0], "t_forward", "forward"), (axes[1], "t_backward", "backward")):
        ymin = min((float(r[key]) for r in rows if r["status"] == "ok" and r[key]), default=1e-4)
        for impl in sorted({r["impl"] for r in rows}):
            rs = [r for r in rows if r["impl"] == impl and r.get("n")]
            ok = [r for r in rs if r["status"] == "ok"]
            bad = [r for r in rs if r["status"] != "ok"]
            size = lambda r: int(r["n"]) + int(r["m_ineq"]) + int(r["p_eq"])  # noqa: E731

            def flagged(r):  # succeeded, but the KKT residual or the objective says the answer is off
                kkt = max(float(r[k] or 0) for k in ("prim_rel", "dual_rel", "comp_rel"))
                return kkt > KKT_OK or float(r.get("obj_rel_err") or 0) > 1e-6 or r.get("fd_status") == "fail"

            good = [r for r in ok if not flagged(r)]
            off = [r for r in ok if flagged(r)]
            name = "dqp" if impl == "ours" else impl
            ax.scatter(
                [size(r) for r in good],
                [float(r[key]) for r in good],
                s=14,
                c=colors.get(impl),
                label=f"{name} ok",
                alpha=0.8,
            )
            if off:
                ax.scatter(
                    [size(r) for r in off],
                    [float(r[key]) for r in off],
                    s=60,
                    facecolors="none",
                    edgecolors=colors.get(impl),
                    linewidths=1.5,
                    label=f"{name} returned, but KKT/objective/FD off",
                )
            if bad:
                ax.scatter(
                    [size(r) for r in bad],
                    [ymin * 0.3] * len(bad),
                    marker="x",
                    s=30,
                    c=colors.get(impl),
                    label=f"{name} failed",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("problem size n + m + p (variables + inequalities + equalities)")
        ax.set_title(f"{title} time [s], one problem per process, 1 thread")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Maros–Meszaros collection, dqp vs libdqp, both with Clarabel forward at their default tolerances "
        "(CPU, x86_64)\nx = failed (drawn at the bottom); circled = returned, but the KKT residual, the "
        "objective or the finite-difference check is off",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return True


def _git_state() -> str:
    """Commit of the checkout, plus the dqp source files with uncommitted changes (runs are
    taken while the library is being developed)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dqp", "solvers", "linsolve"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"commit {head}" + (f", uncommitted changes in {', '.join(dirty)}" if dirty else ", clean")


def driver(args: argparse.Namespace) -> int:
    from dqp.io import list_maros_meszaros, load_maros_meszaros, maros_meszaros_dir, save_problem

    data_dir = Path(args.data_dir) if args.data_dir else maros_meszaros_dir()
    if data_dir is None:
        logger.error("Maros–Meszaros data not found; pass --data-dir")
        return 2
    entries = list_maros_meszaros(data_dir, max_n=args.max_n, max_m=args.max_m)
    if args.exclude_within is not None:  # complement of --max-n/--max-m (to split a full sweep)
        entries = [e for e in entries if e.n > args.exclude_within or e.m > args.exclude_within]
    if args.names:
        want = {s.strip().upper() for s in args.names.split(",") if s.strip()}
        entries = [e for e in entries if e.name.upper() in want]
    if args.limit:
        entries = entries[: args.limit]
    impls = ["ours", "libdqp"] if args.impl == "both" else [args.impl]
    libdqp_py = str(args.libdqp_python)
    if "libdqp" in impls and not Path(libdqp_py).exists():
        logger.error(
            "libdqp venv not found at %s (python -m venv .peers/libdqp && .peers/libdqp/bin/pip install "
            "-c constraints.txt libdqp)",
            libdqp_py,
        )
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python experiments/maros_meszaros.py " + " ".join(sys.argv[1:])
    command += f"` (code: {_git_state()}"
    fastest = [s.strip() for s in args.fastest_over.split(",") if s.strip()] if args.fastest_over else []
    rows: List[Dict[str, Any]] = []
    try:
        from tqdm import tqdm  # type: ignore

        it = tqdm(entries, desc="Maros–Meszaros")
    except ImportError:
        it = entries
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, e in enumerate(it):
            try:
                qp = load_maros_meszaros(e.path).to_qp()
            except Exception as exc:  # noqa: BLE001 - a bad file is recorded, not fatal
                for impl in impls:
                    rows.append(
                        {
                            "name": e.name,
                            "impl": impl,
                            "solver": args.solver,
                            "status": "error",
                            "error_class": type(exc).__name__,
                            "error_msg": str(exc)[:400],
                            "typed": True,
                        }
                    )
                continue
            npz = save_problem(Path(tmp) / f"{e.name}.npz", qp)
            for impl in impls:
                py = sys.executable if impl == "ours" else libdqp_py
                rec = run_worker(impl, py, npz, e.name, args, args.solver)
                rec.setdefault("n", qp.n)
                rec.setdefault("m_ineq", qp.n_ineq)
                rec.setdefault("p_eq", qp.n_eq)
                if fastest:
                    best = None
                    for s in fastest:
                        r2 = rec if s == args.solver else run_worker(impl, py, npz, e.name, args, s)
                        if r2["status"] == "ok" and (best is None or r2["t_forward"] < best[1]):
                            best = (s, r2["t_forward"])
                    if best:
                        rec["fastest_solver"], rec["fastest_t_forward"] = best
                rows.append(rec)
            line = "; ".join(
                f"{r['impl']}: {r['status']}"
                + (
                    f" ({r.get('error_class')})"
                    if r["status"] != "ok"
                    else f" fwd {1e3 * r['t_forward']:.1f} ms bwd {1e3 * r['t_backward']:.1f} ms"
                )
                for r in rows[-len(impls) :]
            )
            msg = f"[{k + 1}/{len(entries)}] {e.name} (n={qp.n}, m={qp.n_ineq}, p={qp.n_eq}): {line}"
            if hasattr(it, "write"):
                it.write(msg)
            else:
                logger.info(msg)
            if (k + 1) % 10 == 0:  # checkpoint the CSV so a long run leaves something behind
                write_csv(rows, out.with_suffix(".csv"))
    write_csv(rows, out.with_suffix(".csv"))
    text = write_markdown(rows, out.with_suffix(".md"), impls, command, args.solver)
    _plot_any(out, Path(libdqp_py))
    logger.info("done in %.0f s; wrote %s(.csv/.md/.png)", time.perf_counter() - t_start, out)
    print(text.split("## Per problem")[0])
    ours = summarize(rows, "ours") if "ours" in impls else None
    return 1 if ours and ours["silent_nan"] else 0


def report(args: argparse.Namespace) -> int:
    """Merge earlier CSVs (e.g. the n, m ≤ 1000 run and the rest) into one report."""
    rows: List[Dict[str, Any]] = []
    for p in args.merge.split(","):
        later = read_csv_rows(Path(p.strip()))
        redo = {(r["name"], r["impl"]) for r in later}
        rows = [r for r in rows if (r["name"], r["impl"]) not in redo] + later  # later runs override
    impls = [i for i in ("ours", "libdqp") if any(r["impl"] == i for r in rows)]
    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    command = f"python experiments/maros_meszaros.py --impl report --merge {args.merge} --out {args.out}"
    command += "` (merged runs; see their own reports for the code state"
    solver = ",".join(sorted({str(r.get("solver")) for r in rows}))
    text = write_markdown(rows, out.with_suffix(".md"), impls, command, solver)
    _plot_any(out, Path(args.libdqp_python))
    print(text.split("## Per problem")[0])
    return 0


def _plot_any(out: Path, libdqp_py: Path) -> None:
    """Plot with this interpreter's matplotlib, else with the libdqp venv's."""
    png = out.with_suffix(".png")
    if plot(out.with_suffix(".csv"), png):
        return
    if libdqp_py.exists():
        subprocess.run(
            [
                str(libdqp_py),
                str(Path(__file__).resolve()),
                "--impl",
                "plot",
                "--csv",
                str(out.with_suffix(".csv")),
                "--png",
                str(png),
            ],
            cwd=tempfile.gettempdir(),
            check=False,
        )
    if not png.exists():
        logger.warning("matplotlib not available: no plot written")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--impl",
        default="both",
        choices=["ours", "libdqp", "both", "ours-worker", "libdqp-worker", "plot", "report"],
        help="report: rebuild .md/.csv/.png at --out from the CSVs given with --merge",
    )
    ap.add_argument("--max-n", type=int, default=None)
    ap.add_argument("--max-m", type=int, default=None, help="max rows of l ≤ Ax ≤ u (the collection's m)")
    ap.add_argument("--names", default=None, help="comma-separated problem names")
    ap.add_argument(
        "--exclude-within",
        type=int,
        default=None,
        help="skip problems with n ≤ N and m ≤ N (the part a --max-n N --max-m N run covers)",
    )
    ap.add_argument("--merge", default=None, help="comma list of earlier CSVs whose rows are added to the report")
    ap.add_argument("--limit", type=int, default=None, help="first N problems (smallest first)")
    ap.add_argument("--timeout-per-problem", type=float, default=600.0)
    ap.add_argument("--solver", default="clarabel", help="forward solver for every implementation")
    ap.add_argument("--fastest-over", default="", help="comma list of solvers: also record the fastest successful one")
    ap.add_argument("--libdqp-python", default=str(DEFAULT_LIBDQP_PY))
    ap.add_argument("--libdqp-lin-solver", default="scipy SPLU", help="libdqp's lin_solver (its sparse default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--warm",
        action="store_true",
        help="time a second forward+backward in each worker (the first call, also recorded, loads libraries)",
    )
    ap.add_argument("--no-fd", action="store_true", help="skip the finite-difference check")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference solve (and FD)")
    ap.add_argument("--fd-max-n", type=int, default=5000, help="reference/FD only for n ≤ this")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output prefix (.csv/.md/.png)")
    # worker / plot internals
    ap.add_argument("--problem-npz", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--csv", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--png", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.impl in ("ours-worker", "libdqp-worker"):
        logging.getLogger().setLevel(logging.WARNING)
        rec = worker(args)
        sys.stdout.flush()
        print(MARKER + json.dumps(rec, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)), flush=True)
        return 0
    if args.impl == "plot":
        return 0 if plot(Path(args.csv), Path(args.png)) else 1
    if args.impl == "report":
        return report(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
