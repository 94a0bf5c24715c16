"""Tuning of the batched interior-point engine: one frozen value, passed down explicitly.

:class:`IPMOptions` holds every engine parameter that is not a user setting (those live in
:class:`dqp.settings.Settings`): the linear-algebra policies (:class:`CholeskyOptions`), the fused
kernel's (:class:`KernelOptions`), the CUDA-graph machinery and the layer's polish. Every field has
a measured default; two configurations can live in one process, and every cache keys on the
options object (it is hashable).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from dqp.linsolve.cholesky import CholeskyOptions
from dqp.solvers.fused import KernelOptions

from dqp.errors import SettingsError

__all__ = ["IPMOptions", "CholeskyOptions", "KernelOptions", "DEFAULT_OPTIONS"]


@dataclass(frozen=True)
class IPMOptions:
    """Engine tuning of the batched IPM and its layer (defaults measured; see each field).

    Attributes
    ----------
    linalg : CholeskyOptions
        How batched Cholesky factors are computed and used (inverse, blocked path, kernels, CPU
        fast paths).
    kernel : KernelOptions
        Whether and how the fused kernel runs (``mode`` ``"auto"``, True or False, threads, CPU build).
    setup_products : {"auto", "solve", "inverse"}
        How the dual form's one-time products ``P⁻¹Āᵀ`` and ``M = ĀP⁻¹Āᵀ`` are formed for a batched
        P on CUDA: solves with P's factor, or through ``X = L⁻¹`` (mostly matrix products: ``W =
        XĀᵀ``, ``P⁻¹Āᵀ = XᵀW``, ``M = WᵀW``); ``"auto"``: the inverse where the factor carries
        neither an inverse nor block inverses and k ≥ n. Measured on an H200, float64, k = n, ms:
        B=1024, n=100: solve 1.22, inverse 0.83; B=128, n=100 (the factor has its inverse): 0.12 vs
        0.39; B=128, n=500 (blocked): 2.78 vs 3.50. (The CPU and a shared P always solve.)
    setup_graph, setup_graph_max_work :
        On CUDA, run the dual form's setup (P's factorization, the conditioning test, the start) as
        a cached CUDA graph where ``B·k² ≤ setup_graph_max_work`` (k = max(n, m + p)): its ~250
        small operations cost ~3 ms of host time eagerly (B=128, n=m=100, H100).
    graph_cache_size, graph_cache_max_bytes :
        The captured iterations kept (LRU), and the device memory their static data may hold (a
        problem larger than that is captured per call without caching).
    split_graphs : bool
        One CUDA graph per IPM step (and one for the check), replayed in sequence, instead of one
        for all: the host launches later steps while the device runs the first (the launch of a
        ~900-kernel graph takes ~0.8 ms of host time, H100).
    tail_checks, tail_fraction :
        Check more often in the tail of a solve (once at most ``tail_fraction`` of the batch runs:
        after 1, 1, 2, 4, … steps), for batches too small for the tail compaction. On qpth's
        generator (B=128, n=m=100, H100, forward+backward): 17.7 vs 19.5 ms.
    compact, compact_fraction, compact_min_work :
        Tail compaction of the captured iterations: once at most ``compact_fraction`` of the batch
        runs, continue on those instances alone (padded to a power of two ≥ 8), where
        ``B·k² ≥ compact_min_work``.
    graphs : {"cuda", "emulate"}
        ``"cuda"``: the captured-graph code paths (``ipm_solve(cuda_graph=True)``, the graphed setup,
        polish and backward) on CUDA devices. ``"emulate"``: those code paths on any device, each
        "graph" replayed by running its Python function on the static buffers — the same data flow
        without a capture, to test and debug the graph machinery on the CPU.
    fn_graph_cache_size, fn_graph_max_bytes :
        Whole functions replayed as cached CUDA graphs (the layer's polish and backward, the
        setup): how many are kept and the device memory they may hold (None: a tenth of the device's).
    widen_on_cpu : bool
        Layer, CPU, float32/float16 data: solve in float64 throughout (see :mod:`dqp.ipm_layer`).
    widen_on_cuda : bool or None
        Layer, CUDA, float32/float16 data: solve in float64 throughout and cast the answer and the
        gradients back. None (default): where the fused float64 kernel takes the widened problem,
        and on GPUs that run float64 at half the float32 rate or better (compute capability 6.0,
        7.0, 8.0, 9.0, 10.0: P100, V100, A100, H100/H200, B200), where the float64 torch loop is
        faster than the float32 one (fewer iterations, no float32 stalls re-solved in float64:
        H100, B=128, n=m=200, 86 ms float32 against 29 ms float64). True: always; False: never
        (the float32 IPM with a float64 polish).
    polished_eps : float
        Layer: IPM tolerance (float64) when the polish follows. Measured on qpth's generator
        (B=128, n=m=100 and 200): 2 fewer iterations for the slowest element than 1e-9, the same
        active sets, z within 5e-15 and gradients within 1e-15.
    polish_stage_eps : float, pair of floats or None
        Layer, where the fused kernel polishes (float64): the IPM first stops at this looser
        tolerance and polishes; an element whose polished point is rejected goes on to the IPM
        tolerance and is polished again. On qpth's generator and nearly-LP problems: bitwise the
        one-stage results in 10–16 % fewer iterations. None: one stage.
    polish_graph, polish_graph_max_work, backward_graph_max_work :
        Layer, CUDA: the polish and the backward as cached CUDA graphs for float64 dual-form
        batches with ``B·k² ≤ polish_graph_max_work`` (after the kernel's polish: the backward up
        to ``backward_graph_max_work``). H100, B=128, n=m=100: 25.8 → 18.7 ms forward+backward.
    host_max_work : int
        Layer, CUDA data: a batch whose work ``B·k³`` (``k = n + m + p``) is at most this is solved
        on the host CPU, copies included (:mod:`dqp.ipm_host`): a few small QPs are latency-bound on
        the GPU. 0: never.
    cpu_serial_max_work : int
        Layer, CPU data: a batch whose work ``B·k³`` is at most this runs its torch operations on one
        thread, while the fused kernel's C++ build keeps the caller's threads (:mod:`dqp.cpu_threads`).
        Up to there a second thread gained nothing for the torch operations on an idle machine
        (2 cores, up to 128 QPs with n = m = 50), and waited for a core another process kept busy:
        1.3–3.1× slower than one thread before (``experiments/results/cpu_small_load.md``). 0: never.
    outer : {"auto", "matmul", "mul"}
        How the gradients' outer products ``u vᵀ + w xᵀ`` are formed (:func:`dqp.gradients.dense_grads`).
    """

    linalg: CholeskyOptions = field(default_factory=CholeskyOptions)
    kernel: KernelOptions = field(default_factory=KernelOptions)
    setup_products: str = "auto"
    setup_graph: bool = True
    setup_graph_max_work: int = 20_000_000
    graph_cache_size: int = 8
    graph_cache_max_bytes: int = 2 * 1024**3
    split_graphs: bool = True
    tail_checks: bool = True
    tail_fraction: float = 0.1
    compact: bool = True
    compact_fraction: float = 0.25
    compact_min_work: int = 4_000_000
    graphs: str = "cuda"
    fn_graph_cache_size: int = 16
    fn_graph_max_bytes: Optional[int] = None
    widen_on_cpu: bool = True
    widen_on_cuda: Optional[bool] = None
    polished_eps: float = 1e-8
    polish_stage_eps: Union[None, float, Tuple[float, float]] = 1e-5
    polish_graph: bool = True
    polish_graph_max_work: int = 2_000_000
    backward_graph_max_work: int = 20_000_000
    host_max_work: int = 0
    cpu_serial_max_work: int = 200_000_000
    outer: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.linalg, CholeskyOptions):
            raise SettingsError(f"IPMOptions.linalg must be a CholeskyOptions, got {type(self.linalg).__name__}.")
        if not isinstance(self.kernel, KernelOptions):
            raise SettingsError(f"IPMOptions.kernel must be a KernelOptions, got {type(self.kernel).__name__}.")
        if self.setup_products not in ("auto", "solve", "inverse"):
            raise SettingsError(
                f"IPMOptions.setup_products must be 'auto', 'solve' or 'inverse', got {self.setup_products!r}."
            )
        if self.graphs not in ("cuda", "emulate"):
            raise SettingsError(f"IPMOptions.graphs must be 'cuda' or 'emulate', got {self.graphs!r}.")
        if self.widen_on_cuda not in (None, True, False):
            raise SettingsError(f"IPMOptions.widen_on_cuda must be None, True or False, got {self.widen_on_cuda!r}.")
        if self.outer not in ("auto", "matmul", "mul"):
            raise SettingsError(f"IPMOptions.outer must be 'auto', 'matmul' or 'mul', got {self.outer!r}.")
        for name in ("host_max_work", "cpu_serial_max_work"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise SettingsError(f"IPMOptions.{name} must be a non-negative int (0: never), got {value!r}.")
        if not self.polished_eps > 0:
            raise SettingsError(f"IPMOptions.polished_eps must be positive, got {self.polished_eps!r}.")
        if isinstance(self.polish_stage_eps, list):
            object.__setattr__(self, "polish_stage_eps", tuple(self.polish_stage_eps))
        for name in ("tail_fraction", "compact_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"IPMOptions.{name} must be in [0, 1], got {getattr(self, name)!r}.")

    def replace(self, **changes) -> "IPMOptions":
        """A copy with ``changes``; ``linalg``/``kernel`` may be given as dicts of their fields."""
        for name in ("linalg", "kernel"):
            if isinstance(changes.get(name), dict):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)


DEFAULT_OPTIONS = IPMOptions()
