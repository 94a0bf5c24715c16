#!/usr/bin/env python3
"""qpth-style benchmark of dqp's batched interior-point layer against qpth, qpax and cuPIQP.

Problems follow the generator of the qpth/OptNet benchmark (no equality constraints)::

    Q = UᵀU + 1e-3·I   (U standard normal, n×n)      p ~ N(0, 1)
    G ~ N(0, 1) (m×n)   z0 ~ N(0, 1)   s0 ~ U(0, 1)   h = G z0 + s0

Each cell (device, dtype, B, n=m, method) times one forward + backward pass of
``loss = Σ w·z`` (w a fixed random weight) with respect to Q, p, G and h: the median of
``--reps`` synchronized repetitions after a warm-up call. The gradients are compared with an
independent float64 reference computed here: Clarabel solves each problem to high accuracy,
the active set is polished with exact equality-constrained KKT solves in NumPy, and the
gradient is the adjoint of that reduced KKT system (nothing of dqp is used for it). The data
are rounded to float32-representable values once, so one reference serves both dtypes.

Methods
-------
dqp   ``dqp.qpth.QPFunction`` (the drop-in replacement for ``qpth.qp.QPFunction``)
dqp_layer  ``dqp.dQP.dQP_layer`` with ``qp_solver="dqp_ipm"`` (the same engine through the main
      door: its input checks and per-element diagnostics included)
qpth  ``qpth.qp.QPFunction`` (PDIPM_BATCHED), if importable
qpax  ``qpax.solve_qp_primal`` under ``jax.jit(jax.value_and_grad(Σ w·vmap(solve)))``, if
      importable; note that qpax differentiates a *relaxed* QP (``target_kappa=1e-3``) by
      design, so its gradient differs from the exact one at the 1e-2 level.
cupiqp  ``cupiqp.torch.DenseSolverLayer`` (CUDA only), if importable: set up once per cell with
      the cell's data (``settings.enable_grad = True``), then called with ``P, c, G, h_u``; its
      default tolerances (float64 1e-8 / 1e-9, float32 1e-4).

``check_Q_spd=False`` is passed to both torch layers (the check is an eigen-decomposition,
not solver work); all other options are each library's defaults.

Outputs (in ``--out``): ``qpth_<tag>.csv`` (one row per cell), ``qpth_<tag>.md`` (tables with
speedups dqp vs each peer) and ``qpth_<tag>.png`` (time vs n, one panel per B, log scale).

Examples
--------
    python experiments/bench_qpth.py --short --out /tmp/b           # seconds
    python experiments/bench_qpth.py --device cuda --dtypes float64,float32 --out results/
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# JAX must not grab most of the GPU before torch runs; set before any jax import.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402

log = logging.getLogger("bench_qpth")

DTYPES = {"float64": torch.float64, "float32": torch.float32}
ALL_METHODS = ("dqp", "dqp_layer", "qpth", "qpax", "cupiqp")
PARAMS = ("Q", "p", "G", "h")


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
@dataclass
class ProblemSet:
    """A batch of B problems (float64, float32-representable) plus loss weights, on a device."""

    Q: torch.Tensor
    p: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor

    @property
    def B(self) -> int:
        return self.Q.shape[0]


def make_problems(B: int, n: int, m: int, seed: int, device: str) -> ProblemSet:
    """qpth's generator, float64 arithmetic, then rounded to float32-representable values."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(dtype=torch.float64, device=device, generator=g)
    U = torch.randn(B, n, n, **kw)
    Q = U.mT @ U
    del U
    Q.diagonal(dim1=-2, dim2=-1).add_(1e-3)
    G = torch.randn(B, m, n, **kw)
    z0 = torch.randn(B, n, **kw)
    s0 = torch.rand(B, m, **kw)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    p = torch.randn(B, n, **kw)
    w = torch.randn(B, n, **kw)
    r = lambda x: x.to(torch.float32).to(torch.float64)  # noqa: E731
    Q = r(0.5 * (Q + Q.mT))
    return ProblemSet(Q=Q, p=r(p), G=r(G), h=r(h), w=r(w))


# --------------------------------------------------------------------------------------------
# Independent float64 reference: Clarabel + active-set polish + adjoint of the reduced KKT
# --------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Reference solution and gradients for the first k problems of a set (NumPy, float64)."""

    idx: np.ndarray  # problems used (non-degenerate ones)
    z: np.ndarray
    grads: Dict[str, np.ndarray]
    n_degenerate: int
    n_total: int


def _clarabel_solve(Q: np.ndarray, p: np.ndarray, G: np.ndarray, h: np.ndarray):
    import clarabel
    from scipy import sparse

    s = clarabel.DefaultSettings()
    s.verbose = False
    s.max_iter = 200
    for name in ("tol_gap_abs", "tol_gap_rel", "tol_feas", "tol_ktratio"):
        setattr(s, name, 1e-11)
    solver = clarabel.DefaultSolver(
        sparse.csc_matrix(np.triu(Q)), p, sparse.csc_matrix(G), h, [clarabel.NonnegativeConeT(G.shape[0])], s
    )
    sol = solver.solve()
    return np.asarray(sol.x), np.asarray(sol.z), np.asarray(sol.s), str(sol.status)


def reference_one(
    Q: np.ndarray, p: np.ndarray, G: np.ndarray, h: np.ndarray, w: np.ndarray, degenerate_tol: float = 1e-7
):
    """Exact solution and gradient of ``Σ w·z`` for one problem.

    Returns ``(z, grads, degenerate)``. The active set J starts from Clarabel's solution
    (μ_i > s_i) and is repaired until the equality-constrained solve on J is primal feasible
    with μ_J ≥ 0. Then, with K = [[Q, G_Jᵀ], [G_J, 0]] and y = K⁻¹ [w; 0]:
    ∇p = −y_z, ∇h_J = y_μ, ∇Q = −½(y_z zᵀ + z y_zᵀ), ∇G_J = −(μ_J y_zᵀ + y_μ zᵀ), zero on ¬J.
    """
    n, m = Q.shape[0], G.shape[0]
    z0, mu0, s0, status = _clarabel_solve(Q, p, G, h)
    if "Solved" not in status:
        raise RuntimeError(f"reference Clarabel status {status}")
    J = mu0 > s0
    scale_h = 1.0 + np.abs(h)
    for _ in range(50):
        Gj = G[J]
        k = Gj.shape[0]
        K = np.zeros((n + k, n + k))
        K[:n, :n] = Q
        K[:n, n:] = Gj.T
        K[n:, :n] = Gj
        sol = np.linalg.solve(K, np.concatenate([-p, h[J]]))
        z, muJ = sol[:n], sol[n:]
        viol = (G @ z - h > 1e-12 * scale_h) & ~J
        neg = np.zeros(m, dtype=bool)
        neg[np.flatnonzero(J)[muJ < -1e-12 * (1.0 + np.abs(muJ).max(initial=0.0))]] = True
        if not viol.any() and not neg.any():
            break
        J = (J | viol) & ~neg
    else:
        raise RuntimeError("reference active-set repair did not converge")
    mu = np.zeros(m)
    mu[J] = muJ
    slack = h - G @ z
    margin = min(
        np.min(muJ, initial=np.inf) / (1.0 + np.abs(mu).max()), np.min(slack[~J] / scale_h[~J], initial=np.inf)
    )
    y = np.linalg.solve(K, np.concatenate([w, np.zeros(k)]))
    yz, ymu = y[:n], y[n:]
    gQ = -0.5 * (np.outer(yz, z) + np.outer(z, yz))
    gG = np.zeros((m, n))
    gG[J] = -(np.outer(muJ, yz) + np.outer(ymu, z))
    gh = np.zeros(m)
    gh[J] = ymu
    grads = {"Q": gQ, "p": -yz, "G": gG, "h": gh}
    return z, grads, bool(margin < degenerate_tol)


def compute_reference(ps: ProblemSet, k: int) -> Reference:
    """Reference for the first ``k`` problems; degenerate ones are excluded from error stats."""
    k = min(k, ps.B)
    arrs = {name: getattr(ps, name)[:k].cpu().numpy() for name in ("Q", "p", "G", "h", "w")}
    keep, zs, gs, ndeg = [], [], {name: [] for name in PARAMS}, 0
    for i in range(k):
        z, g, deg = reference_one(arrs["Q"][i], arrs["p"][i], arrs["G"][i], arrs["h"][i], arrs["w"][i])
        if deg:
            ndeg += 1
            continue
        keep.append(i)
        zs.append(z)
        for name in PARAMS:
            gs[name].append(g[name])
    n = ps.Q.shape[-1]
    stack = lambda xs, shape: np.stack(xs) if xs else np.zeros((0,) + shape)  # noqa: E731
    return Reference(
        idx=np.asarray(keep, dtype=int),
        z=stack(zs, (n,)),
        grads={name: stack(gs[name], getattr(ps, name).shape[1:]) for name in PARAMS},
        n_degenerate=ndeg,
        n_total=k,
    )


def errors_vs_reference(ref: Reference, z: np.ndarray, grads: Dict[str, np.ndarray]) -> Tuple[float, Dict[str, float]]:
    """(relative z error, relative gradient error per parameter) on the reference subset.

    Relative errors are ‖x − x_ref‖_F / ‖x_ref‖_F over the stacked subset; ∇Q is compared
    through its symmetric part (Q enters symmetric, so only that part is meaningful).
    """
    if len(ref.idx) == 0:
        return float("nan"), {name: float("nan") for name in PARAMS}

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        nb = np.linalg.norm(b)
        return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))

    ez = rel(z[ref.idx], ref.z)
    eg = {}
    for name in PARAMS:
        g = grads[name][ref.idx]
        if name == "Q":
            g = 0.5 * (g + np.swapaxes(g, -1, -2))
        eg[name] = rel(g, ref.grads[name])
    return ez, eg


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
class Method:
    """A benchmarked layer: ``prepare`` builds a closure running one forward+backward."""

    name = ""

    def available(self) -> Tuple[bool, str]:
        raise NotImplementedError

    def version(self) -> str:
        return ""

    def prepare(
        self, ps: ProblemSet, dtype: torch.dtype, device: str
    ) -> Tuple[Callable[[], object], Callable[[object], Tuple[np.ndarray, Dict]]]:
        """Return ``(run, fetch)``: ``run()`` does fwd+bwd and syncs; ``fetch(out)`` → numpy."""
        raise NotImplementedError


def _dist_version(name: str) -> str:
    """The installed version of the distribution ``name`` ("?" when it cannot be read)."""
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def _importable(what: str, load: Callable[[], Any]) -> Tuple[bool, str]:
    """A method's ``available()`` answer: ``(True, "")`` when ``load()`` imports what it needs, else
    ``(False, why)`` (any import failure is reported, not raised)."""
    try:
        load()
    except Exception as exc:  # noqa: BLE001
        return False, f"{what} not importable: {exc!r}"
    return True, ""


class _TorchLayer(Method):
    def _layer(self):
        raise NotImplementedError

    def _cell_layer(self, ps, dtype, device):
        """The layer for one cell (a layer that needs the cell's data first overrides this)."""
        return self._layer()

    def prepare(self, ps, dtype, device):
        layer = self._cell_layer(ps, dtype, device)
        leaves = [getattr(ps, name).to(dtype).detach().requires_grad_(True) for name in PARAMS]
        w = ps.w.to(dtype)
        e = torch.empty(0, dtype=dtype, device=device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def run():
            z = layer(*leaves, e, e)
            grads = torch.autograd.grad((z * w).sum(), leaves)
            sync()
            return z.detach(), grads

        def fetch(out):
            z, grads = out
            return (z.double().cpu().numpy(), {name: g.double().cpu().numpy() for name, g in zip(PARAMS, grads)})

        return run, fetch


class DqpMethod(_TorchLayer):
    name = "dqp"

    def available(self):
        return _importable("dqp.qpth", lambda: importlib.import_module("dqp.qpth"))

    def version(self):
        import dqp

        return getattr(dqp, "__version__", "?")

    def _layer(self):
        from dqp.qpth import QPFunction

        return QPFunction(verbose=-1, check_Q_spd=False)

    def _cell_layer(self, ps, dtype, device):
        _build_kernel(ps, dtype, device)
        return self._layer()


def _build_kernel(ps, dtype, device) -> None:
    """Build the fused kernel's size class for this cell before it is timed, as a warm process has it:
    a first call otherwise solves with the torch loop while the class compiles in the background."""
    if not device.startswith("cuda"):
        return
    from dqp.ipm_layer import solve_qp_batch
    from dqp.solvers.ipm import IPMOptions, KernelOptions

    args = [getattr(ps, name)[:2].to(dtype) for name in PARAMS]
    solve_qp_batch(*args, options=IPMOptions(kernel=KernelOptions(cuda_build="wait")))


class DqpBatchMethod(_TorchLayer):
    """``dqp.ipm_layer.solve_qp_batch`` called directly (no qpth-API wrapper); not in the
    default method list, useful to see the wrapper's overhead."""

    name = "dqp_batch"

    def available(self):
        return _importable("dqp.ipm_layer", lambda: importlib.import_module("dqp.ipm_layer"))

    def version(self):
        return DqpMethod().version()

    def _layer(self):
        from dqp.ipm_layer import solve_qp_batch

        return lambda Q, p, G, h, A, b: solve_qp_batch(Q, p, G, h)[0]


class DqpLayerMethod(DqpMethod):
    """``dQP_layer(settings=build_settings(qp_solver="dqp_ipm"))``: the main door on the same engine
    (availability, version and kernel builds as :class:`DqpMethod`)."""

    name = "dqp_layer"

    def _layer(self):
        from dqp import dQP

        layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="dqp_ipm", empty_batch=False))
        return lambda Q, p, G, h, A, b: layer(Q, p, G, h)[0]


class CupiqpMethod(_TorchLayer):
    """cuPIQP's differentiable dense layer (GPU only)."""

    name = "cupiqp"

    def available(self):
        if not torch.cuda.is_available():
            return False, "cuPIQP runs on CUDA only"
        return _importable("cupiqp", lambda: importlib.import_module("cupiqp.torch"))

    def version(self):
        return f"{_dist_version('cupiqp')} (warp {_dist_version('warp-lang')})"

    def _cell_layer(self, ps, dtype, device):
        """Set up once with the cell's data; each call loads the values and solves."""
        if not device.startswith("cuda"):
            raise RuntimeError("cuPIQP runs on CUDA only")
        import cupiqp.torch

        layer = cupiqp.torch.DenseSolverLayer(dtype=dtype, device=device)
        layer.settings.enable_grad = True
        Q, p, G, h = (getattr(ps, name).to(dtype).contiguous() for name in PARAMS)
        layer.setup(Q, p, G=G, h_u=h)
        # (the output is a view of the layer's buffer, which the next call overwrites)
        return lambda Q, p, G, h, A, b: layer(P=Q, c=p, G=G, h_u=h).clone()


class _DqpBatchVariant(_TorchLayer):
    """``solve_qp_batch(..., **kw)``: dqp with non-default IPM options (the subclass's ``kw``)."""

    kw: Dict[str, Any] = {}

    def available(self):
        return DqpBatchMethod().available()

    def version(self):
        return DqpMethod().version()

    def _layer(self):
        from dqp.ipm_layer import solve_qp_batch

        kw = dict(self.kw)
        return lambda Q, p, G, h, A, b: solve_qp_batch(Q, p, G, h, **kw)[0]


class DqpCompileMethod(_DqpBatchVariant):
    """``solve_qp_batch(..., compile=True)``: the captured IPM iteration compiled with
    ``torch.compile`` (CUDA; the first call per shape compiles, which the warm-up absorbs)."""

    name = "dqp_compile"
    kw = dict(compile=True)


class DqpLoopMethod(_DqpBatchVariant):
    """``solve_qp_batch(..., fused=False)``: the torch loop (CUDA graphs) instead of the fused
    kernel (dqp.solvers.fused), for a same-run comparison of the two."""

    name = "dqp_loop"
    kw = dict(fused=False)


class Dqp1StageMethod(_DqpBatchVariant):
    """``solve_qp_batch(..., polish_eps=None)``: one IPM stage to 1e-8 before the kernel's polish
    instead of the default two (``IPMOptions.polish_stage_eps``), for a same-run comparison."""

    name = "dqp_1stage"
    kw = dict(polish_eps=None)


class DqpLibDiagMethod(_DqpBatchVariant):
    """dqp with ``CholeskyOptions(block_diag="library")``: the blocked factorization's diagonal
    blocks by the library's Cholesky and triangular inverse instead of the fused source's kernel
    (the torch loop at k > 160 on CUDA), for a same-run comparison."""

    name = "dqp_libdiag"

    @property
    def kw(self):
        from dqp.solvers.ipm import IPMOptions

        return dict(options=IPMOptions().replace(linalg={"block_diag": "library"}))


def _import_qpth():
    """Import qpth; its package imports cvxpy eagerly (only for its CVXPY solver, unused here)."""
    try:
        import qpth  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "cvxpy":
            raise
        log.info(
            "qpth imports cvxpy eagerly; cvxpy is absent, so a stub module stands in "
            "(only qpth's CVXPY solver would use it; PDIPM_BATCHED is benchmarked)"
        )
        sys.modules["cvxpy"] = types.ModuleType("cvxpy")
        import qpth  # noqa: F401
    import qpth.qp

    return qpth


class QpthMethod(_TorchLayer):
    name = "qpth"

    def available(self):
        return _importable("qpth", _import_qpth)

    def version(self):
        return _dist_version("qpth")

    def _layer(self):
        qpth = _import_qpth()
        return qpth.qp.QPFunction(verbose=-1, check_Q_spd=False)


class QpaxMethod(Method):
    name = "qpax"

    def available(self):
        return _importable("jax/qpax", lambda: [importlib.import_module(m) for m in ("jax", "qpax")])

    def version(self):
        import jax

        return f"{_dist_version('qpax')} (jax {jax.__version__})"

    def prepare(self, ps, dtype, device):
        import jax

        jax.config.update("jax_enable_x64", True)
        # full-precision float32 matmuls (JAX uses TF32 on NVIDIA GPUs by default; torch does not)
        jax.config.update("jax_default_matmul_precision", "highest")
        import jax.numpy as jnp
        import qpax

        platform_ = "gpu" if device.startswith("cuda") else "cpu"
        try:
            dev = jax.devices(platform_)[0]
        except RuntimeError as exc:
            raise RuntimeError(f"JAX has no {platform_} device: {exc}") from exc
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        args = [jax.device_put(getattr(ps, name).cpu().numpy().astype(np_dtype), dev) for name in PARAMS + ("w",)]
        n = ps.Q.shape[-1]

        def loss(Q, q, G, h, w):
            A = jnp.zeros((0, n), Q.dtype)
            b = jnp.zeros((0,), Q.dtype)
            z = jax.vmap(lambda Q_, q_, G_, h_: qpax.solve_qp_primal(Q_, q_, A, b, G_, h_))(Q, q, G, h)
            return jnp.sum(z * w), z

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))

        def run():
            out = f(*args)
            jax.block_until_ready(out)
            return out

        def fetch(out):
            (_, z), grads = out
            return (
                np.asarray(z, dtype=np.float64),
                {name: np.asarray(g, dtype=np.float64) for name, g in zip(PARAMS, grads)},
            )

        return run, fetch


class DqpOptionsMethod(_DqpBatchVariant):
    """``solve_qp_batch(..., options=IPMOptions(**changes))``: dqp with other engine options, for a
    same-run comparison with the default."""

    def __init__(self, name: str, changes: Dict[str, Any]):
        self.name, self.changes = name, changes

    @property
    def kw(self):
        from dqp.solvers.ipm import IPMOptions

        return dict(options=IPMOptions(**self.changes))


#: The kernel's first IPM stage(s) before the polish (``IPMOptions.polish_stage_eps``): stops
#: and polishes at 1e-5 (the default), 1e-4, 1e-3, or 1e-3 then 1e-5 (three stages).
STAGE_METHODS = [
    DqpOptionsMethod(name, {"polish_stage_eps": eps})
    for name, eps in (("dqp_stage5", 1e-5), ("dqp_stage4", 1e-4), ("dqp_stage3", 1e-3), ("dqp_stage35", (1e-3, 1e-5)))
]


METHODS: Dict[str, Method] = {
    m.name: m
    for m in (
        DqpMethod(),
        DqpLayerMethod(),
        QpthMethod(),
        QpaxMethod(),
        CupiqpMethod(),
        DqpBatchMethod(),
        DqpCompileMethod(),
        DqpLoopMethod(),
        Dqp1StageMethod(),
        DqpLibDiagMethod(),
        *STAGE_METHODS,
    )
}


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------
@dataclass
class Cell:
    device: str
    dtype: str
    B: int
    n: int
    m: int
    method: str
    status: str = "ok"  # ok | skipped (...) | error: ... | unavailable
    time_median_s: float = float("nan")
    time_min_s: float = float("nan")
    time_max_s: float = float("nan")
    reps: int = 0
    z_rel_err: float = float("nan")
    grad_rel_err: float = float("nan")  # max over the four below
    err_Q: float = float("nan")
    err_p: float = float("nan")
    err_G: float = float("nan")
    err_h: float = float("nan")
    nonfinite: bool = False
    ref_problems: int = 0
    note: str = ""


def estimate_time(done: Sequence[Cell], method: str, dtype: str, B: int, n: int) -> Optional[float]:
    """Estimated seconds of one fwd+bwd, from measured cells of the same method and dtype.

    Same B: extrapolate in n from the two largest smaller n with their measured exponent
    (clamped to [0.5, 3]; with a single point, exponent 3 on the CPU and 2 on a GPU, where small
    sizes are overhead-bound and a cubic law overestimates by far). Same n, smaller B: t·B/B'.
    The smaller estimate is used (skip only when even the optimistic estimate is over budget).
    """
    ests = []
    same = [c for c in done if c.method == method and c.dtype == dtype and c.status == "ok"]
    by_n = sorted((c for c in same if c.B == B and c.n < n), key=lambda c: c.n)
    if by_n:
        c1 = by_n[-1]
        k = 3.0 if c1.device == "cpu" else 2.0
        if len(by_n) >= 2:
            c0 = by_n[-2]
            if c0.time_median_s > 0 and c1.n > c0.n:
                k = math.log(c1.time_median_s / c0.time_median_s) / math.log(c1.n / c0.n)
                k = min(max(k, 0.5), 3.0)
        ests.append(c1.time_median_s * (n / c1.n) ** k)
    by_b = [c for c in same if c.n == n and c.B < B]
    if by_b:
        c = max(by_b, key=lambda c: c.B)
        ests.append(c.time_median_s * B / c.B)
    return min(ests) if ests else None


#: Extra warm-up on a GPU (see :func:`run_cell`): calls until this many seconds, at most WARMUP_CALLS.
WARMUP_S = 0.5
WARMUP_CALLS = 20


def run_cell(cell: Cell, method: Method, ps: ProblemSet, ref: Optional[Reference], reps: int, budget_s: float) -> None:
    """Warm up, then time up to ``reps`` repetitions (fewer if the budget runs out).

    The warm-up is one call (JIT compilation, handles, allocator, graph captures), then on a GPU
    more calls until ``WARMUP_S`` seconds have passed (at most ``WARMUP_CALLS``): right after a
    compilation or a host-side pause the device's clocks and the host threads take a few calls to
    settle (measured on an H200: dqp's first cell of a run, B=128, min 5.0 ms, median 7.9 ms,
    max 11.8 ms over 9 calls after a single warm-up; the same cell later in the run 5.4–5.6 ms).
    Every method gets the same warm-up."""
    device, dtype = cell.device, DTYPES[cell.dtype]
    prev_threads = torch.get_num_threads()
    if method.name == "qpth" and device == "cpu" and cell.n > 150 and prev_threads > 1:
        # Known MKL trap on this CPU build: batched LU (qpth's lu_factor) on matrices >~160
        # with several threads fails ("DLASWP") and can hang; one thread works.
        torch.set_num_threads(1)
        cell.note = "qpth ran with 1 thread (MKL batched-LU bug with >1 thread)"
    try:
        run, fetch = method.prepare(ps, dtype, device)
        t0 = time.perf_counter()
        out = run()  # warm-up (JIT compilation, handles, allocator)
        warm = time.perf_counter() - t0
        if device.startswith("cuda"):
            t1, extra = time.perf_counter(), 0
            while extra < WARMUP_CALLS and time.perf_counter() - t1 < min(WARMUP_S, 0.1 * budget_s):
                del out
                out = run()
                extra += 1
        z, grads = fetch(out)
        del out
        cell.nonfinite = bool(not np.isfinite(z).all() or any(not np.isfinite(g).all() for g in grads.values()))
        if ref is not None:
            cell.z_rel_err, eg = errors_vs_reference(ref, z, grads)
            for name, e in eg.items():
                setattr(cell, f"err_{name}", e)
            cell.grad_rel_err = max(eg.values())
            cell.ref_problems = len(ref.idx)
        del z, grads
        times: List[float] = []
        spent = min(warm, 0.5 * budget_s)  # (a compiling warm-up must not eat the repetitions)
        for _ in range(reps):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
            del out
            spent += times[-1]
            if spent + times[-1] > budget_s:
                break
        cell.reps = len(times)
        cell.time_median_s = statistics.median(times)
        cell.time_min_s, cell.time_max_s = min(times), max(times)
    except Exception as exc:  # noqa: BLE001 - a failing cell must not stop the study
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        cell.status = f"error: {msg}"
        log.warning("%s %s B=%d n=%d %s failed: %s", device, cell.dtype, cell.B, cell.n, method.name, msg)
    finally:
        torch.set_num_threads(prev_threads)
        _free(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if "jax" in sys.modules:
        try:
            sys.modules["jax"].clear_caches()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _fmt_t(c: Optional[Cell]) -> str:
    if c is None:
        return "—"
    if c.status != "ok":
        return c.status
    t = c.time_median_s
    s = f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"
    return s + (" (NaN!)" if c.nonfinite else "")


def _fmt_e(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.1e}"


def _ratio(a: Optional[Cell], b: Optional[Cell]) -> str:
    """``a``'s time over ``b``'s (e.g. ``1.04×``), or — where either did not run."""
    if not (a and b and a.status == "ok" and b.status == "ok"):
        return "—"
    return f"{a.time_median_s / b.time_median_s:.2f}×"


def _dtype_table(cells: List[Cell], ours: Sequence[str]) -> List[str]:
    """Markdown lines: float32 time over float64 time, per cell, for dqp's methods."""
    if {"float32", "float64"} - {c.dtype for c in cells} or not ours:
        return []
    get = {(c.method, c.dtype, c.B, c.n): c for c in cells}
    head = ["B", "n=m"] + [f"{m} float32 / float64" for m in ours]
    md = ["#### float32 time / float64 time", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for B, n in dict.fromkeys((c.B, c.n) for c in cells):
        row = [str(B), str(n)] + [_ratio(get.get((m, "float32", B, n)), get.get((m, "float64", B, n))) for m in ours]
        md.append("| " + " | ".join(row) + " |")
    return md + [""]


def write_outputs(
    cells: List[Cell], out: str, tag: str, meta: Dict[str, str], methods: Sequence[str], plot: bool = True
) -> str:
    """Write CSV and markdown (and a PNG if matplotlib is there); return the markdown text."""
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, f"qpth_{tag}.csv")
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(asdict(cells[0]).keys()) if cells else ["device"])
        wr.writeheader()
        for c in cells:
            wr.writerow(asdict(c))
    md = [
        f"### qpth-style benchmark: {tag}",
        "",
        "Forward + backward of `Σ w·z` w.r.t. Q, p, G, h (median wall time). "
        "`err` = max relative error of the gradients (Q sym. part, p, G, h) vs the float64 "
        "Clarabel + active-set KKT reference on the first problems of the batch.",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    ours = ["dqp"] if "dqp" in methods else [m for m in methods if m.startswith("dqp")]
    peers = [m for m in methods if not m.startswith("dqp")]
    door = "dqp" in methods and "dqp_layer" in methods  # (the layer's cost over QPFunction's)
    for dtype in dict.fromkeys(c.dtype for c in cells):
        sub = [c for c in cells if c.dtype == dtype]
        head = (
            ["B", "n=m"]
            + [f"{m} time" for m in methods]
            + [f"{o} vs {p}" for o in ours for p in peers]
            + (["dqp_layer / dqp"] if door else [])
            + [f"{m} err" for m in methods]
        )
        md += [f"#### {dtype}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for B in dict.fromkeys(c.B for c in sub):
            for n in dict.fromkeys(c.n for c in sub if c.B == B):
                get = {c.method: c for c in sub if c.B == B and c.n == n}
                row = [str(B), str(n)] + [_fmt_t(get.get(m)) for m in methods]
                for o in ours:
                    d = get.get(o)
                    for p in peers:
                        c = get.get(p)
                        if d and c and d.status == "ok" and c.status == "ok":
                            r = c.time_median_s / d.time_median_s
                            row.append(f"{r:.1f}×" if r >= 1 else f"{r:.2g}×")
                        else:
                            row.append("—")
                if door:
                    row.append(_ratio(get.get("dqp_layer"), get.get("dqp")))
                row += [_fmt_e(get[m].grad_rel_err) if m in get else "—" for m in methods]
                md.append("| " + " | ".join(row) + " |")
        md.append("")
        worst = []
        for m in methods:
            errs = {
                name: max(
                    (
                        getattr(c, f"err_{name}")
                        for c in sub
                        if c.method == m and math.isfinite(getattr(c, f"err_{name}"))
                    ),
                    default=float("nan"),
                )
                for name in PARAMS
            }
            worst.append(f"{m}: " + ", ".join(f"∇{k} {_fmt_e(v)}" for k, v in errs.items()))
        md += ["Worst gradient error per parameter — " + "; ".join(worst) + ".", ""]
    md += _dtype_table(cells, [m for m in methods if m.startswith("dqp")])
    notes = [f"- {c.dtype} B={c.B} n={c.n} {c.method}: {c.note}" for c in cells if c.note]
    if notes:
        md += ["Notes:", ""] + notes + [""]
    text = "\n".join(md)
    with open(os.path.join(out, f"qpth_{tag}.json"), "w") as f:
        json.dump({"meta": meta, "methods": list(methods)}, f, indent=1)
    with open(os.path.join(out, f"qpth_{tag}.md"), "w") as f:
        f.write(text + "\n")
    if plot:
        _plot(cells, os.path.join(out, f"qpth_{tag}.png"), tag, methods, meta)
    return text


def load_cells(csv_path: str) -> List[Cell]:
    """Read the cells back from a CSV written by :func:`write_outputs`."""
    types_ = {f.name: f.type for f in Cell.__dataclass_fields__.values()}
    cells = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            kw = {}
            for k, v in row.items():
                t = types_.get(k)
                if t in (int, "int"):
                    kw[k] = int(v)
                elif t in (float, "float"):
                    kw[k] = float(v)
                elif t in (bool, "bool"):
                    kw[k] = v == "True"
                elif t is not None:
                    kw[k] = v
            cells.append(Cell(**kw))
    return cells


def remake(csv_path: str, out: str, tag: str, plot: bool = True) -> str:
    """Rewrite markdown/PNG from a CSV (and its JSON metadata, when present)."""
    cells = load_cells(csv_path)
    meta, methods = {}, list(dict.fromkeys(c.method for c in cells))
    js = os.path.splitext(csv_path)[0] + ".json"
    if os.path.exists(js):
        with open(js) as f:
            d = json.load(f)
        meta, methods = d["meta"], d["methods"]
    return write_outputs(cells, out, tag, meta, methods, plot=plot)


def _plot(
    cells: List[Cell], path: str, tag: str, methods: Sequence[str], meta: Optional[Dict[str, str]] = None
) -> None:
    """One panel per batch size: median forward+backward time against n = m, log-log.

    The title names the device and the versions (from ``meta``) so that a plot read on its own
    says where its numbers come from.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot (pip install matplotlib)")
        return
    Bs = list(dict.fromkeys(c.B for c in cells))
    if not Bs:
        return
    fig, axes = plt.subplots(1, len(Bs), figsize=(4.2 * len(Bs), 3.6), squeeze=False)
    styles = {"float64": "-", "float32": "--"}
    colors = {"dqp": "C0", "qpth": "C1", "qpax": "C2", "dqp_batch": "C3", "dqp_layer": "C4", "cupiqp": "C5"}
    for ax, B in zip(axes[0], Bs):
        for m in methods:
            for dtype in dict.fromkeys(c.dtype for c in cells):
                pts = sorted(
                    (c.n, c.time_median_s)
                    for c in cells
                    if c.B == B and c.method == m and c.dtype == dtype and c.status == "ok"
                )
                if pts:
                    ax.plot(
                        *zip(*pts), styles.get(dtype, ":"), marker="o", ms=3, color=colors.get(m), label=f"{m} {dtype}"
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"batch size B = {B}")
        ax.set_xlabel("problem size n = m (variables = inequalities)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("forward + backward time [s], median")
    axes[0][-1].legend(fontsize=7)
    meta = meta or {}
    device = meta.get("gpu") or meta.get("host") or str(cells[0].device)
    peers = [m for m in methods if not m.startswith("dqp")]
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", *peers) if k in meta)
    fig.suptitle(f"dqp vs {' vs '.join(peers)}, qpth's random QPs: {device}\n{versions}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Profile of dqp (where the time goes)
# --------------------------------------------------------------------------------------------
def _times(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> List[float]:
    """Wall times (s) of ``reps`` synchronized calls after one warm-up call."""
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return ts


def _timed(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    return statistics.median(_times(fn, reps, sync))


def profile_dqp(ps: ProblemSet, dtype: torch.dtype, device: str, reps: int) -> List[str]:
    """Markdown lines: IPM-only / forward / fwd+bwd times, iterations, launches, syncs, top ops."""
    from torch.profiler import ProfilerActivity, profile

    from dqp.qpth import QPFunction
    from dqp.solvers.ipm import ipm_solve

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    Q, p, G, h, w = (getattr(ps, k).to(dtype) for k in ("Q", "p", "G", "h", "w"))
    e = torch.empty(0, dtype=dtype, device=device)
    layer = QPFunction(verbose=-1, check_Q_spd=False)
    res = ipm_solve(Q, p, G, h)
    it = res.iterations.double()
    t_ipm = _timed(lambda: ipm_solve(Q, p, G, h), reps, sync)
    with torch.no_grad():
        t_fwd = _timed(lambda: layer(Q, p, G, h, e, e), reps, sync)
    leaves = [x.detach().requires_grad_(True) for x in (Q, p, G, h)]

    def fb():
        z = layer(*leaves, e, e)
        return torch.autograd.grad((z * w).sum(), leaves)

    t_fb = _timed(fb, reps, sync)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fb()
        sync()
    ev = prof.key_averages()
    count = {x.key: x.count for x in ev}
    launches = sum(
        c
        for k, c in count.items()
        if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    )
    syncs = {k: c for k, c in count.items() if "Synchronize" in k or "Memcpy" in k}
    from torch.autograd import DeviceType

    dev_time = (
        sum(x.self_device_time_total for x in ev if x.device_type == DeviceType.CUDA) / 1e6 if cuda else float("nan")
    )
    lines = [
        f"- B={ps.B} n=m={ps.Q.shape[-1]} {dtype}: ipm_solve {t_ipm * 1e3:.3g} ms, "
        f"forward (no grad) {t_fwd * 1e3:.3g} ms, forward+backward {t_fb * 1e3:.3g} ms; "
        f"IPM form '{res.form}', iterations median {it.median().item():.0f} / max "
        f"{it.max().item():.0f}; statuses {sorted(set(res.status.tolist()))}",
        f"  - one fwd+bwd under the profiler: {launches} kernel launches, GPU busy "
        f"{dev_time * 1e3:.3g} ms (sum of kernel times), sync/copy calls {syncs}",
    ]
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = ev.table(sort_by=sort, row_limit=18, max_name_column_width=48)
    lines += ["", "```", table, "```", ""]
    return lines


def run_profile(
    args: argparse.Namespace, device: str, dtypes: List[str], sizes: List[int], batches: List[int], tag: str
) -> None:
    out = [
        f"### dqp profile ({tag})",
        "",
        f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""),
        "",
    ]
    for B in batches:
        for n in sizes:
            ps = make_problems(B, n, n, seed=args.seed + 1000 * B + n, device=device)
            for dtype in dtypes:
                try:
                    lines = profile_dqp(ps, DTYPES[dtype], device, args.reps)
                except Exception as exc:  # noqa: BLE001
                    lines = [f"- B={B} n={n} {dtype}: profile failed: {exc!r}"]
                log.info("%s", lines[0])
                out += lines
            del ps
            _free(device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"qpth_profile_{tag}.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(line for line in out if line.startswith(("-", "  -"))))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def _csv_list(s: str, conv=str) -> List:
    return [conv(x) for x in s.split(",") if x.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--sizes", default="10,50,100,200,500", help="n = m values")
    ap.add_argument("--batches", default="1,128,1024")
    ap.add_argument(
        "--cells", default="", help="more (B, n) cells beside the grid, as BxN, comma-separated (e.g. 8192x50)"
    )
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up")
    ap.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds per cell: skip a cell whose estimated warm-up + one rep "
        "exceeds it, and stop repetitions when it is spent",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=float("inf"),
        help="seconds for the whole study; later cells are skipped (results so far are written after every cell)",
    )
    ap.add_argument("--ref-count", type=int, default=8, help="problems per batch checked against the float64 reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--short", action="store_true", help="tiny grid for a smoke test (n=m in {10, 20}, B in {1, 8}, 2 reps)"
    )
    ap.add_argument("--tag", default=None, help="file name tag (default: the device)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). Under CPU load from other "
        "processes, set OMP_WAIT_POLICY=PASSIVE or use 1 thread: spinning "
        "OpenMP workers make tiny batched matmuls ~1000x slower",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--remake",
        metavar="CSV",
        default=None,
        help="only rewrite the markdown/PNG (tag from --tag) from a CSV of an earlier run",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: profile dqp on the grid (IPM-only / forward / "
        "backward split, iterations, kernel launches, syncs, top ops)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.short:
        args.sizes, args.batches, args.reps = "10,20", "1,8", 2
        args.ref_count = min(args.ref_count, 4)
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Cell]:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    dtypes = _csv_list(args.dtypes)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    sizes = _csv_list(args.sizes, int)
    batches = _csv_list(args.batches, int)
    tag = args.tag or device.split(":")[0]

    if args.remake:
        print(remake(args.remake, args.out, tag, plot=not args.no_plot))
        return []
    if args.profile:
        run_profile(args, device, dtypes, sizes, batches, tag)
        return []

    methods: List[str] = []
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + list(argv or sys.argv[1:])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
    }
    if device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        meta["load average at start"] = "%.1f %.1f %.1f" % os.getloadavg()
    for name in _csv_list(args.methods):
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {sorted(METHODS)}")
        ok, why = METHODS[name].available()
        if ok:
            methods.append(name)
            meta[name] = METHODS[name].version()
        else:
            log.warning("method %s unavailable: %s", name, why)
            meta[name] = f"unavailable ({why})"
    if not methods:
        raise SystemExit("no method available")

    grid = [(B, n) for B in batches for n in sizes]
    grid += [tuple(int(x) for x in c.lower().split("x")) for c in _csv_list(args.cells)]
    cells: List[Cell] = []
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(grid) * len(dtypes) * len(methods), desc="cells", file=sys.stderr)
    except ImportError:
        bar = None
    start = time.perf_counter()
    for B, n in grid:
        m = n
        ps = make_problems(B, n, m, seed=args.seed + 1000 * B + n, device=device)
        t0 = time.perf_counter()
        ref = compute_reference(ps, args.ref_count) if args.ref_count > 0 else None
        if ref is not None:
            log.info(
                "B=%d n=m=%d: reference on %d problems (%d degenerate excluded) in %.1f s",
                B,
                n,
                len(ref.idx),
                ref.n_degenerate,
                time.perf_counter() - t0,
            )
        for dtype in dtypes:
            for name in methods:
                cell = Cell(device=device, dtype=dtype, B=B, n=n, m=m, method=name)
                est = estimate_time(cells, name, dtype, B, n)
                if time.perf_counter() - start > args.deadline:
                    cell.status = "skipped (deadline)"
                elif est is not None and 2 * est > args.budget:
                    cell.status = f"skipped (est. {est:.3g} s)"
                else:
                    run_cell(cell, METHODS[name], ps, ref, args.reps, args.budget)
                cells.append(cell)
                log.info(
                    "%s %s B=%d n=m=%d %-5s %s  grad err %s  z err %s%s",
                    device,
                    dtype,
                    B,
                    n,
                    name,
                    _fmt_t(cell),
                    _fmt_e(cell.grad_rel_err),
                    _fmt_e(cell.z_rel_err),
                    f"  [{cell.note}]" if cell.note else "",
                )
                if bar is not None:
                    bar.update(1)
                write_outputs(cells, args.out, tag, meta, methods, plot=False)
        del ps, ref
        _free(device)
    if bar is not None:
        bar.close()
    meta["wall time of the study"] = f"{time.perf_counter() - start:.0f} s"
    if hasattr(os, "getloadavg"):
        meta["load average at end"] = "%.1f %.1f %.1f" % os.getloadavg()
    text = write_outputs(cells, args.out, tag, meta, methods, plot=not args.no_plot)
    print(text)  # the final table (CLI output)
    return cells


if __name__ == "__main__":
    main()
