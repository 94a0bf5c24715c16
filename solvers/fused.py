"""Fused interior-point iterations: the whole IPM loop of the dual form in one kernel launch.

The torch loop of :func:`dqp.solvers.ipm.ipm_solve` runs each iteration as ~150 small kernels
(factorization, solves, element-wise work, reductions); at B=128, n=m=100 on an H100 that is
~430 µs of device time per step and ~60 % of a forward+backward call, bound by kernel count, not
arithmetic. Here one CUDA thread block solves one QP: the Schur matrix ``S = ĀP⁻¹Āᵀ + diag(0, W⁻¹)
+ δI`` and the iterate live in shared memory, and the block runs every iteration (residuals, the
convergence check with the infeasibility certificates, Cholesky, predictor, corrector, step) until
its QP is done. The algorithm is the torch loop's dual form (float64, checked every iteration),
which stays the reference: ``tests/test_fused.py`` compares the two.

With ``polish_rounds > 0`` (the layer, :mod:`dqp.ipm_layer`) the block goes on with the active-set
polish: the reduced KKT system's Schur complement is M restricted to the active rows, a masked copy
of the matrix already in shared memory, so each round is one more factorization and a few solves;
the accepted round's factor is written out for the backward.

When it runs (:data:`FUSED` ``"auto"``): float64, the dual form (P positive definite and well
conditioned, chosen by ``ipm_solve``), at least one constraint, no ``trace``, and

* on CUDA: 1 ≤ m + p ≤ :data:`KMAX` (128; S, M and the iterate in one block's shared memory, a
  register tile of S per thread) and the kernel for the size class built. The source
  (``fused_ipm.cu``) is compiled by NVRTC to machine code for the device at first use of a size
  class (tens of seconds; meanwhile the torch loop solves, :attr:`KernelOptions.cuda_build`) and
  kept in the cache directory (:func:`dqp.solvers.build_cache.cache_dir`), from where later
  processes load it in milliseconds.
* on the CPU: the same source compiled as plain C++ (``-DDQP_CPU``: a "block" is one thread, its
  factorization and solves plain loops), with the batch split dynamically (small chunks taken in turn) over
  ``torch.get_num_threads()`` threads, where a C++ compiler is available and m + p ≤ :attr:`KernelOptions.cpu_kmax`. It is faster than the
  torch loop there too (:attr:`KernelOptions.cpu_auto`). Without a compiler, or if the build fails (logged once),
  the CPU keeps the torch loop.

Everything else takes the torch loop. ``ipm_solve(fused=False)`` or ``KernelOptions(mode=False)`` forces the
torch loop; ``fused=True`` requires the kernel. Tests also build the CUDA code's register-tile
factorization as C++ (:attr:`KernelOptions.cpu_tiles`), so CI checks that logic too.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from dqp.errors import SettingsError, SolverNotAvailableError, Status
from dqp.solvers import build_cache as _build_cache

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = [
    "KernelOptions",
    "DEFAULT_THREADS",
    "smem_bytes",
    "fused_available",
    "solve_dual",
    "chol_block",
    "chol_block_available",
    "chol_solve_vec",
    "chol_solve_vec_available",
    "matrix_layout",
]

#: Threads per block of the helper kernels and the default of :attr:`KernelOptions.threads`, a
#: multiple of 32 (environment variable ``DQP_FUSED_THREADS``, read at import; default 384; the
#: kernel is compiled for it, ``-DDQP_THREADS``). Measured on an H200, n=m=100, float64: cycles per
#: block-iteration 293K with 384 threads, 324K with 512 (whose 128-register cap spills), 333K with
#: 256, 360K with 320, 403K with 448; ``ipm_solve`` at B=1024 17.9–18.4 ms against 19.6–19.7 ms with 512.
DEFAULT_THREADS = int(os.environ.get("DQP_FUSED_THREADS", "384"))
_MAXRED = 40  # reduction slots per warp (MAXRED in fused_ipm.cu, defined from here)


@dataclass(frozen=True)
class KernelOptions:
    """How the fused kernel is chosen and built (a frozen value; part of every cache key).

    Attributes
    ----------
    mode : {"auto", True, False}
        ``"auto"``: the kernel wherever it applies (module docstring); ``True``: required (on the
        CPU the C++ build, for tests; where it does not apply ``ipm_solve`` raises); ``False``:
        never (the torch loop). ``ipm_solve(fused=...)`` overrides it per call.
    threads : int
        Threads per block of the CUDA build, a multiple of 32 from 32 to 1024.
    nvrtc_options : tuple of str
        Diagnostics: extra NVRTC options for the CUDA build (``("-lineinfo",)`` for a profiler).
    cpu_auto : bool
        CPU: ``mode="auto"`` takes the C++ build where it can be built (a C++ compiler on the PATH
        or in ``CXX``; compiled on first use and cached) and m + p ≤ ``cpu_kmax``. Measured on a
        2-core x86-64 machine, 2 threads, qpth's generator, ``ipm_solve`` alone, torch loop vs C++
        build: n=m=50, B=128 171 vs 76 ms; n=m=100, B=128 ~400 vs ~240 ms; n=m=150, B=64 478 vs
        355 ms; n=m=200, B=32 389 vs 309 ms; n=m=300, B=16 524 vs 508 ms — hence the limit.
    cpu_kmax : int
        See ``cpu_auto``.
    cpu_tiles : bool
        The C++ build: ``False`` its own loops over the triangle (one library for every k, built
        with ``-O3 -march=native``); ``True``: the CUDA code's register-tile factorization and
        solves, built per k, so that CPU tests exercise that logic.
    cpu_function : callable, optional
        Tests: a function of k that returns the C++ function the CPU path calls instead of the
        build's ``dqp_ipm_dual_cpu`` (the same arguments; e.g. a multi-threaded test build's).
    cpu_threads : int, optional
        Threads the CPU build splits the batch over; None: ``torch.get_num_threads()``.
    cpu_split : {"dynamic", "static"}
        How the CPU build splits the batch over its threads: small chunks taken in turn
        (``"dynamic"``), so that a thread on a busy core does less and more threads are never
        slower than fewer; or one contiguous range per thread (``"static"``, for comparison).
    compiler : str, optional
        The C++ compiler of the CPU build; None: ``CXX``, else ``c++``, ``g++`` or ``clang++`` on the PATH.
    cuda_build : {"background", "wait"}
        CUDA, ``mode="auto"``: what a solve does when its size class's kernel is not built yet
        (neither loaded nor in the cache directory). ``"background"``: the build starts on a
        background thread and the solve (and every one until the build is done) runs the torch
        loop, so the first call of a new size takes the torch loop's time instead of the
        compiler's; ``"wait"``: the solve waits for the build. ``fused=True`` always waits.
    """

    mode: Union[str, bool] = "auto"
    threads: int = DEFAULT_THREADS
    nvrtc_options: Tuple[str, ...] = ()
    cpu_auto: bool = True
    cpu_kmax: int = 256
    cpu_tiles: bool = False
    cpu_function: Optional[Callable] = None
    cpu_threads: Optional[int] = None
    cpu_split: str = "dynamic"
    compiler: Optional[str] = None
    cuda_build: str = "background"

    def __post_init__(self) -> None:
        if self.mode not in (True, False, "auto"):
            raise SettingsError(f"KernelOptions.mode must be 'auto', True or False, got {self.mode!r}.")
        _threads(self.threads)
        if self.cpu_split not in ("dynamic", "static"):
            raise SettingsError(f"KernelOptions.cpu_split must be 'dynamic' or 'static', got {self.cpu_split!r}.")
        if self.cuda_build not in ("background", "wait"):
            raise SettingsError(f"KernelOptions.cuda_build must be 'background' or 'wait', got {self.cuda_build!r}.")
        object.__setattr__(self, "nvrtc_options", tuple(self.nvrtc_options))


_SRC = Path(__file__).with_name("fused_ipm.cu")
_lock = threading.Lock()
_cuda_kernels: Dict[tuple, object] = {}
#: The CUDA builds of the source (one module per size class provides all three kernels).
_builds = _build_cache.CudaBuilds(lambda: _source(), ("dqp_ipm_dual", "dqp_chol_block", "dqp_chol_solve_vec"))
_cpu_libs: Dict[tuple, ctypes.CDLL] = {}


def _threads(threads: Optional[int] = None) -> int:
    """Threads per block (``threads`` or :data:`DEFAULT_THREADS`), checked: a multiple of 32 in [32, 1024]."""
    t = DEFAULT_THREADS if threads is None else threads
    if not (isinstance(t, int) and 32 <= t <= 1024 and t % 32 == 0):
        raise SettingsError(
            f"fused IPM: threads per block (KernelOptions.threads or DQP_FUSED_THREADS) "
            f"must be a multiple of 32 from 32 to 1024, got {t!r}."
        )
    return t


DEFAULT_KERNEL = KernelOptions()


def smem_bytes(n: int, m: int, p: int, threads: Optional[int] = None) -> int:
    """Shared memory (bytes) one block needs (the layout at the top of the kernel): M and S in one
    k×(k|1) array (with slack), 13 k-vectors, 11 n-vectors and a per-warp n-vector scratch, 3 m-vectors, the
    reduction scratch and a flag."""
    threads = _threads(threads)
    k = m + p
    nwarps = threads // 32
    rr, rc = _tiles(k, "cuda", threads)
    pad = 32 * rc + nwarps * rr  # DQP_PAD
    words = k * (k | 1) + pad + 13 * k + (11 + nwarps) * n + 3 * (m + 1) + (nwarps + 1) * _MAXRED + 1
    return 8 * words


def _source() -> str:
    """The kernel source with the Status codes (from :class:`dqp.errors.Status`) and the reduction
    size defined."""
    defs = "".join(f"#define ST_{s.name} {int(s)}\n" for s in Status) + f"#define MAXRED {_MAXRED}\n"
    return defs + _SRC.read_text()


#: Largest k = m + p the kernel takes on CUDA: each thread holds a ⌈k/(threads/32)⌉×⌈k/32⌉ tile of
#: S in registers (11×4 doubles at k = 128 with 384 threads); larger tiles would spill.
KMAX = 128


def _tiles(k: int, device_type: str, threads: Optional[int] = None) -> Tuple[int, int]:
    """(DQP_RR, DQP_RC): a thread's tile of S, rows × columns (the kernel's thread grid is 32 lanes
    × threads/32 warps on CUDA, one thread in the C++ build)."""
    if device_type == "cuda":
        return -(-k // (_threads(threads) // 32)), -(-k // 32)
    return k, k


def _max_smem(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 49152))


_cpu_build_ok: Dict[Optional[str], bool] = {}  # per compiler (KernelOptions.compiler)


def _compiler(compiler: Optional[str] = None) -> Optional[str]:
    """The C++ compiler: ``compiler``, else ``CXX``, else one on the PATH (None: none found)."""
    if compiler:
        return compiler
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cuda_build_available(
    device: torch.device, k: int, opts: KernelOptions = DEFAULT_KERNEL, wait: Optional[bool] = None
) -> bool:
    """Whether the kernel for this device and size class is built (loaded, read from the cache
    directory, or compiled now). ``wait`` (default: ``opts.cuda_build == "wait"``) False: a build
    that must be compiled starts in the background and the answer is False until it is done, so
    the solve takes the torch loop meanwhile. A failure (no NVRTC, a driver older than the
    compiler, ...) is logged once and the answer is then always False."""
    wait = opts.cuda_build == "wait" if wait is None else wait
    flags = _cuda_flags(k, False, opts.threads, opts.nvrtc_options)
    if _builds.failure(device, flags) is not None:
        return False
    try:
        return _builds.get(device, flags, wait=wait) is not None
    except Exception as exc:  # noqa: BLE001 - any compile/load failure means: no kernel here (logged once:
        # the failure is kept and answered above from now on)
        logger.warning("dqp fused IPM: the CUDA kernel could not be built (%s); the torch loop runs instead", exc)
        return False


def _cpu_build_available(compiler: Optional[str] = None) -> bool:
    """Whether the C++ build (loops) exists or can be made with ``compiler``
    (:attr:`KernelOptions.compiler`); a failure is logged once and the automatic choice then keeps
    the torch loop."""
    if compiler not in _cpu_build_ok:
        if _compiler(compiler) is None:
            _cpu_build_ok[compiler] = False
        else:
            try:
                _cpu_library(0, tiles=False, compiler=compiler)
                _cpu_build_ok[compiler] = True
            except SolverNotAvailableError as exc:
                logger.warning("dqp fused IPM: the C++ build failed, the CPU keeps the torch loop: %s", exc)
                _cpu_build_ok[compiler] = False
    return _cpu_build_ok[compiler]


def fused_available(
    device: torch.device,
    dtype: torch.dtype,
    n: int,
    m: int,
    p: int,
    opts: KernelOptions = DEFAULT_KERNEL,
    wait: Optional[bool] = None,
) -> bool:
    """Whether the fused kernel can solve this problem shape on ``device`` (CUDA, float64, at least
    one and at most :data:`KMAX` constraints, the block's shared memory within the device's limit,
    the kernel built: ``wait`` as in :func:`_cuda_build_available`; the CPU's C++ build as ``opts``
    allow)."""
    if dtype != torch.float64 or m + p == 0 or n == 0:
        return False
    if device.type == "cuda":
        return (
            m + p <= KMAX
            and smem_bytes(n, m, p, opts.threads) <= _max_smem(device)
            and _cuda_build_available(device, m + p, opts, wait)
        )
    if device.type == "cpu":
        return opts.cpu_auto and m + p <= opts.cpu_kmax and _cpu_build_available(opts.compiler)
    return False


def _set_smem(kernel, nbytes: int) -> None:
    """Opt the kernel in to ``nbytes`` of dynamic shared memory (above the 48 KiB default)."""
    if hasattr(kernel, "set_shared_memory_config"):
        kernel.set_shared_memory_config(nbytes)
        return
    # older torch: cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8) ourselves
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library

    _check_cuda(_get_gpu_runtime_library().cuFuncSetAttribute(kernel.func, 8, ctypes.c_int(nbytes)))
    kernel._max_shared_mem_bytes = nbytes


def _cuda_flags(k: int, profile: bool, threads: Optional[int], nvrtc_options: Tuple[str, ...]) -> Tuple[str, ...]:
    """The NVRTC options of the build for size class k: the register tile and block size are
    compile-time constants of the kernel."""
    threads = _threads(threads)
    rr, rc = _tiles(k, "cuda", threads)
    return (
        "-std=c++17",
        f"-DDQP_RR={rr}",
        f"-DDQP_RC={rc}",
        f"-DDQP_THREADS={threads}",
        *(("-DDQP_PROFILE",) if profile else ()),
        *nvrtc_options,
    )


def _cuda_kernel(
    device: torch.device,
    k: int,
    profile: bool = False,
    threads: Optional[int] = None,
    name: str = "dqp_ipm_dual",
    nvrtc_options: Tuple[str, ...] = (),
):
    """The kernel ``name`` of the source for this device and size class, built for ``threads`` per
    block (default :data:`DEFAULT_THREADS`: the launch must use the same number, the kernel's block
    size is a constant); compiled now if it is not built yet."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    flags = _cuda_flags(k, profile, threads, tuple(nvrtc_options))
    key = (idx, flags, name)
    kern = _cuda_kernels.get(key)
    if kern is None:
        kern = _builds.get(device, flags, wait=True)[name]
        with _lock:
            if key not in _cuda_kernels:
                with torch.cuda.device(idx):
                    _set_smem(kern, _max_smem(device))
                _cuda_kernels[key] = kern
    return kern


def _cpu_library(
    k: int, tiles: bool = False, compiler: Optional[str] = None, cache_dir: Optional[Path] = None
) -> ctypes.CDLL:
    """The kernel compiled as C++ (``-DDQP_CPU``) into a shared library, cached by source hash
    (and by k for the tile build, ``tiles``: :attr:`KernelOptions.cpu_tiles`), with ``compiler``
    (:func:`_compiler`) in ``cache_dir`` (:func:`dqp.solvers.build_cache.cache_dir`)."""
    key = (k if tiles else 0, compiler, cache_dir)
    with _lock:
        if key in _cpu_libs:
            return _cpu_libs[key]
        cxx = _compiler(compiler)
        if cxx is None:
            raise SolverNotAvailableError(
                "fused IPM on the CPU: the kernel's C++ build needs a C++ compiler (c++, g++ or clang++) "
                "on the PATH, or set CXX; or use fused=False (the torch loop)."
            )
        src = _source()
        # (the build is -march=native: a cache directory shared between machines must not hand one
        # machine's library to another, so the host and the compiler are part of the name)
        ident = "\0".join((src, cxx, platform.node(), platform.machine(), platform.processor()))
        tag = hashlib.sha256(ident.encode()).hexdigest()[:16]
        name = f"dqp_fused_ipm_{tag}_tiles{k}.so" if tiles else f"dqp_fused_ipm_{tag}.so"
        out = (Path(cache_dir) if cache_dir is not None else _build_cache.cache_dir()) / name
        if not out.exists():
            # (per-process file names: concurrent first builds do not read each other's partial files)
            cpp = out.with_suffix(f".{os.getpid()}.{threading.get_ident()}.cpp")
            cpp.write_text(src)
            tmp = out.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.so")
            if tiles:
                rr, rc = _tiles(k, "cpu")
                flags = ["-O2", "-DDQP_CPU_TILES", f"-DDQP_RR={rr}", f"-DDQP_RC={rc}"]
            else:
                flags = ["-O3", "-march=native"]
            cmd = [cxx, *flags, "-shared", "-fPIC", "-std=c++17", "-DDQP_CPU", str(cpp), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0 and "-march=native" in cmd:  # (a compiler without it)
                cmd.remove("-march=native")
                res = subprocess.run(cmd, capture_output=True, text=True)
            cpp.unlink(missing_ok=True)
            if res.returncode != 0:
                raise SolverNotAvailableError(
                    f"fused IPM on the CPU: compiling the kernel failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}"
                )
            os.replace(tmp, out)
        lib = ctypes.CDLL(str(out))
        fn = lib.dqp_ipm_dual_cpu
        ptr, i32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
        fn.argtypes = [ptr, i32] * 8 + [ptr] * 3 + [ptr] * 5 + [ptr] * 6 + [ptr] * 4 + [i32] * 7 + [f64] * 7 + [i32] * 3
        fn.restype = None
        cb = lib.dqp_chol_block_cpu
        cb.argtypes = [ptr, i32, i32, i32, ptr, ptr, i32, i32, i32]
        cb.restype = None
        cs = lib.dqp_chol_solve_vec_cpu
        cs.argtypes = [ptr, i32, i32, i32, ptr, i32, i32, i32]
        cs.restype = None
        _cpu_libs[key] = lib
        return lib


_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = 0


#: Chunks per thread of the CPU build's dynamic split (:attr:`KernelOptions.cpu_split`).
_CHUNKS_PER_THREAD = 8


def _run_cpu(fn, args: list, B: int, threads: Optional[int] = None, split: str = "dynamic") -> None:
    """Run the C++ build over the batch on ``threads`` threads (default ``torch.get_num_threads()``;
    the calling thread is one of them; ctypes drops the GIL during each call).

    ``split="dynamic"``: the batch is cut into about ``_CHUNKS_PER_THREAD`` chunks per thread, which
    the threads take in turn until none is left, so a thread slowed down (a core shared with another
    process) takes fewer. ``"static"``: one contiguous range per thread.
    """
    global _pool, _pool_pid
    nt = max(1, min(torch.get_num_threads() if threads is None else int(threads), B))
    if nt == 1:
        fn(*args, 0, B)
        return
    with _lock:
        # (a pool inherited through fork, e.g. by a DataLoader worker, has no threads: a new one)
        if _pool is None or _pool._max_workers < nt - 1 or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=nt - 1, thread_name_prefix="dqp-fused")
            _pool_pid = os.getpid()
        pool = _pool
    if split == "static":
        cuts = [B * i // nt for i in range(nt + 1)]
        futures = [pool.submit(fn, *args, cuts[i], cuts[i + 1]) for i in range(1, nt)]
        fn(*args, cuts[0], cuts[1])
    else:
        chunk = max(1, -(-B // (nt * _CHUNKS_PER_THREAD)))
        starts = iter(range(0, B, chunk))
        take = threading.Lock()

        def work() -> None:
            while True:
                with take:
                    b0 = next(starts, None)
                if b0 is None:
                    return
                fn(*args, b0, min(b0 + chunk, B))

        futures = [pool.submit(work) for _ in range(nt - 1)]
        work()
    for f in futures:
        f.result()


def _mat(M: Optional[Tensor], like: Tensor) -> Tuple[Tensor, int]:
    """A matrix argument: contiguous rows and its batch stride (0 for a shared matrix); ``like``
    stands in for an absent one (the kernel does not read it)."""
    if M is None:
        return like, 0
    M = M.contiguous()
    return M, (M.shape[-2] * M.shape[-1] if M.dim() == 3 else 0)


def _vec(v: Optional[Tensor], like: Tensor) -> Tuple[Tensor, int]:
    """A (B, ·) vector argument: unit stride in the last dimension and its batch stride; ``like``
    stands in for an absent one."""
    if v is None:
        return like, 0
    if v.dim() == 1:
        return v.contiguous(), 0
    if v.stride(-1) != 1 or (v.stride(0) not in (0, v.shape[-1]) and v.shape[0] > 1):
        v = v.contiguous()
    return v, (v.stride(0) if v.shape[0] > 1 else 0)


def solve_dual(
    P: Tensor,
    q: Tensor,
    C: Optional[Tensor],
    d: Optional[Tensor],
    A: Optional[Tensor],
    b: Optional[Tensor],
    M: Tensor,
    PiAbt: Tensor,
    Piq: Tensor,
    g: Tensor,
    norms: Dict[str, Optional[Tensor]],
    Md: Tensor,
    state: Dict[str, Tensor],
    *,
    max_iter: int,
    stall_iters: int,
    separate_steps: bool,
    eps: float,
    eps_inf: float,
    step_fraction: float,
    reg_d: float,
    wlo: float,
    polish_rounds: int = 0,
    row_scale: Optional[Tensor] = None,
    eps2: Optional[float] = None,
    eps_mid: Optional[float] = None,
    start: bool = False,
    profile: Optional[Tensor] = None,
    opts: KernelOptions = DEFAULT_KERNEL,
) -> Dict[str, Tensor]:
    """Run the interior-point iterations of the dual form from ``state`` (the starting point of
    :func:`dqp.solvers.ipm._init`) to the end, in one launch.

    Parameters are the row-scaled data and the dual form's tensors as ``ipm_solve`` holds them
    (``M = ĀP⁻¹Āᵀ``, ``PiAbt = P⁻¹Āᵀ``, ``Piq = P⁻¹q``, ``g = ĀP⁻¹q`` with ``Ā = [A; C]``; ``Md`` the
    largest |diagonal| of M), and the options of :func:`dqp.solvers.ipm.ipm_solve`. Returns
    ``z, s, mu, lam, status, iters`` (new tensors). ``profile`` (CUDA, int64 of 8 zeros): the kernel
    built with ``-DDQP_PROFILE`` adds the clock cycles of each phase of an iteration there.

    ``polish_rounds > 0``: the kernel goes on with the polish of :func:`dqp.ipm_layer.polish`
    (Cholesky path, at most that many rounds) from the IPM point; ``row_scale`` (B, k) are the row
    norms of ``[A; C]`` that undo the scaling. ``z, mu, lam`` are then the polished point where it
    was accepted, and the result has ``active`` (B, m) bool, ``pflag`` (B,) int64 (1: polished,
    2: a round's factorization failed BatchedKKT's pivot test, the caller must polish that element;
    4: the first round's factorization passed it) and ``LS`` (B, k, k), the lower Cholesky factor of the accepted reduced
    system (else of the first round's) in the caller's scaling.

    ``start``: the kernel computes the starting point itself (that of
    :func:`dqp.solvers.ipm._init`, which then need not); the state's z, s, mu, lam are not read.

    ``eps2 < eps`` (with ``polish_rounds > 0``): two stages. The IPM stops at ``eps`` and
    polishes; where the polish rejects a solved element's point, that element's IPM goes on to
    ``eps2`` (the iterates of a single stage at ``eps2``) and polishes again. ``iters`` counts both.
    ``eps2 < eps_mid < eps``: three stages, the second stop and polish at ``eps_mid``.
    """
    B, n, m, p = _sizes(P, q, C, A)
    rounds = int(polish_rounds)
    one = P.new_zeros(1)  # (stands in for every absent argument and output: the kernel does not touch it)
    inputs = _inputs(P, q, C, d, A, b, M, PiAbt, Piq, g, norms, Md, state, one)
    out, outputs = _outputs(P, B, n, m, p, rounds, row_scale, one)
    ints = [n, m, p, max_iter, stall_iters, bool(separate_steps), rounds]
    floats = [eps, eps_inf, step_fraction, reg_d, wlo, eps2 or 0.0, eps_mid or 0.0]  # (0: no such stage)
    scalars = [int(v) for v in ints] + [float(v) for v in floats] + [int(bool(start))]
    if B:
        _launch(inputs + outputs, scalars, B, (n, m, p), profile, opts, one)
    return out


def _sizes(P: Tensor, q: Tensor, C: Optional[Tensor], A: Optional[Tensor]) -> Tuple[int, int, int, int]:
    """``(B, n, m, p)`` of a problem :func:`solve_dual` takes; a :class:`SettingsError` for one it
    cannot (not float64, no build for the device, no constraints)."""
    dev, dt = P.device, P.dtype
    if dt != torch.float64:
        raise SettingsError(f"fused IPM: float64 data only (got {dt}); use fused=False.")
    if dev.type not in ("cuda", "cpu"):
        raise SettingsError(f"fused IPM: no build for device type {dev.type!r}; use fused=False.")
    B, n = q.shape
    m = 0 if C is None else C.shape[-2]
    p = 0 if A is None else A.shape[-2]
    if m + p == 0:
        raise SettingsError("fused IPM: the problem has no constraints (the dual form needs some); use fused=False.")
    return B, n, m, p


def _inputs(P, q, C, d, A, b, M, PiAbt, Piq, g, norms, Md, state, one: Tensor) -> list:
    """The kernel's input arguments in its order: the data and the dual form's tensors (each matrix
    and vector with its batch stride), the norms of the convergence check and the starting state."""
    B, n = q.shape
    m, p = (0 if C is None else C.shape[-2]), (0 if A is None else A.shape[-2])
    zero = one.expand(B)
    nrm = torch.stack(
        [
            norms["pscale"].expand(B),
            norms["qnorm"].expand(B),
            zero if norms.get("bnorm") is None else norms["bnorm"].expand(B),
            zero if norms.get("dnorm") is None else norms["dnorm"].expand(B),
            Md.expand(B),
        ],
        dim=-1,
    )
    data = [*_mat(P, one), *_vec(q, one), *_mat(C, one), *_vec(d, one), *_mat(A, one), *_vec(b, one)]
    dual = [*_mat(M, one), *_mat(PiAbt, one), Piq.expand(B, n).contiguous(), g.expand(B, m + p).contiguous(), nrm]
    start = [
        state["z"].contiguous(),
        state["s"].contiguous() if m else one,
        state["mu"].contiguous() if m else one,
        state["lam"].contiguous() if p else one,
        state["delta"].contiguous(),
    ]
    return data + dual + start


def _outputs(
    P: Tensor, B: int, n: int, m: int, p: int, rounds: int, row_scale: Optional[Tensor], one: Tensor
) -> Tuple[Dict[str, Tensor], list]:
    """The kernel's output buffers: ``(out, args)``, the result dict of :func:`solve_dual` and the
    launch arguments in the kernel's order (the polish's row norms, an input, among them)."""
    dev, dt, k = P.device, P.dtype, m + p
    out = dict(
        z=torch.empty(B, n, dtype=dt, device=dev),
        s=torch.empty(B, m, dtype=dt, device=dev),
        mu=torch.empty(B, m, dtype=dt, device=dev),
        lam=torch.empty(B, p, dtype=dt, device=dev),
        status=torch.empty(B, dtype=torch.int64, device=dev),
        iters=torch.empty(B, dtype=torch.int64, device=dev),
    )
    # (an absent output gets the dummy: the kernel writes s, μ only when m > 0 and λ when p > 0)
    args = [out["z"], out["s"] if m else one, out["mu"] if m else one, out["lam"] if p else one]
    args += [out["status"], out["iters"]]
    if not rounds:
        return out, args + [one, one, one, one]
    if row_scale is None or tuple(row_scale.shape[-1:]) != (k,):
        raise SettingsError("fused IPM: polish_rounds > 0 needs row_scale, the (B, k) row norms of [A; C].")
    out.update(
        active=torch.empty(B, m, dtype=torch.bool, device=dev),
        pflag=torch.empty(B, dtype=torch.int64, device=dev),
        LS=torch.empty(B, k, k, dtype=dt, device=dev),
    )
    sc = row_scale.to(dt).expand(B, k).contiguous()
    return out, args + [sc, out["active"] if m else one, out["pflag"], out["LS"]]


def _launch(
    tensors: list,
    scalars: list,
    B: int,
    nmp: Tuple[int, int, int],
    profile: Optional[Tensor],
    opts: KernelOptions,
    one: Tensor,
) -> None:
    """Launch the kernel over the batch: a thread block per problem on CUDA, the C++ build's
    threads on the CPU. ``nmp``: the problem's sizes ``(n, m, p)``."""
    dev, (n, m, p) = tensors[0].device, nmp
    k = m + p
    if dev.type == "cuda":
        # (the kernel is compiled for exactly the block size it is launched with)
        threads = _threads(opts.threads)
        kern = _cuda_kernel(dev, k, profile is not None, threads=threads, nvrtc_options=opts.nvrtc_options)
        prof = [profile if profile is not None else one]  # (read only by a -DDQP_PROFILE build)
        with torch.cuda.device(dev):
            kern(
                grid=(B, 1, 1),
                block=(threads, 1, 1),
                args=tensors + scalars + prof,
                shared_mem=smem_bytes(n, m, p, threads),
                stream=torch.cuda.current_stream(dev),
            )
    else:
        fn = (
            _cpu_library(k, opts.cpu_tiles, opts.compiler).dqp_ipm_dual_cpu
            if opts.cpu_function is None
            else opts.cpu_function(k)
        )
        _run_cpu(
            fn,
            [a.data_ptr() if isinstance(a, Tensor) else a for a in tensors] + scalars,
            B,
            opts.cpu_threads,
            opts.cpu_split,
        )


# ---- the diagonal blocks of the blocked Cholesky factorization (dqp.linsolve.blocked)


def chol_block_words(nb: int, threads: Optional[int] = None) -> int:
    """Shared memory (doubles) of one block of ``dqp_chol_block`` for an nb × nb block
    (DQP_CHOL_BLOCK_WORDS in fused_ipm.cu)."""
    threads = _threads(threads)
    rr, rc = _tiles(nb, "cuda", threads)
    return nb * (nb | 1) + 32 * rc + (threads // 32) * rr + 4 * nb + 1


_helper_ok: set = set()


def _helper_available(
    device: torch.device, dtype: torch.dtype, k: int, words: int, name: str, what: str, instead: str
) -> bool:
    """Whether the helper kernel ``name`` of the fused source runs for size k here: on CUDA, float64,
    1 ≤ k ≤ :data:`KMAX`, ``words`` doubles of shared memory within the device's limit, and the
    kernel builds (a failure is logged once, ``what`` failed and ``instead`` runs)."""
    if device.type != "cuda" or dtype != torch.float64 or not 1 <= k <= KMAX:
        return False
    flags = _cuda_flags(k, False, None, ())
    key = (device.index if device.index is not None else torch.cuda.current_device(), flags, name, words)
    if key in _helper_ok:  # (asked per solve: the verdict is kept)
        return True
    if 8 * words > _max_smem(device) or _builds.failure(device, flags) is not None:
        return False
    try:
        _cuda_kernel(device, k, name=name)
        _helper_ok.add(key)
        return True
    except Exception as exc:  # noqa: BLE001 - any compile/load failure: the library's routine
        logger.warning("dqp %s: the kernel could not be built (%s); %s runs instead", what, exc, instead)
        return False


def _launch_per_matrix(name: str, device: torch.device, tile: int, B: int, args: list, words) -> None:
    """Launch the helper kernel ``name`` (built for the size class ``tile``) with one thread block of
    :data:`DEFAULT_THREADS` threads per matrix, ``words(tile, threads)`` doubles of shared memory each."""
    threads = _threads()  # (read once: the kernel is compiled for the block size it is launched with)
    kern = _cuda_kernel(device, tile, threads=threads, name=name)
    with torch.cuda.device(device):
        kern(
            grid=(B, 1, 1),
            block=(threads, 1, 1),
            args=args,
            shared_mem=8 * words(tile, threads),
            stream=torch.cuda.current_stream(device),
        )


def chol_block_available(device: torch.device, dtype: torch.dtype, nb: int) -> bool:
    """Whether :func:`chol_block` runs for blocks of up to ``nb`` rows here: on CUDA, float64,
    nb ≤ :data:`KMAX` and the kernel builds (a failure is logged once, as for the IPM kernel)."""
    return _helper_available(
        device,
        dtype,
        nb,
        chol_block_words(nb),
        "dqp_chol_block",
        "blocked Cholesky (diagonal blocks)",
        "the library's factorization",
    )


def chol_block(
    W: Tensor,
    j0: int,
    j1: int,
    info: Tensor,
    tile: Optional[int] = None,
    cpu_function: Optional[Callable] = None,
    cpu_threads: Optional[int] = None,
) -> Tensor:
    """Factorize the diagonal blocks ``W[:, j0:j1, j0:j1]`` in place and return their inverses.

    The kernel's register-tile factorization, one thread block per matrix (the blocked
    factorization's diagonal step, :func:`dqp.linsolve.blocked.blocked_cholesky`).

    Parameters
    ----------
    W : (B, k, k) float64 tensor, contiguous
        Its diagonal block's lower triangle is read; the block becomes L, the lower Cholesky
        factor, with zeros above the diagonal.
    j0, j1 : int
        The block's rows and columns, ``j1 − j0 ≤`` :data:`KMAX` on CUDA.
    info : (B,) int32 tensor
        Updated in place where it is 0 and a pivot of the block is not positive and finite: ``j0``
        + the 1-based index of the first one (``torch.linalg.cholesky_ex``'s convention for W).
    tile : int, optional
        The size class the kernel is built for (≥ j1 − j0, default j1 − j0): a blocked
        factorization passes its block size, so that a smaller last block reuses the build.
    cpu_function : callable, optional
        Tests: a function of the tile size class that returns the C++ function the CPU path calls
        instead of the build's ``dqp_chol_block_cpu`` (e.g. a multi-threaded test build's).
    cpu_threads : int, optional
        Threads the CPU build splits the batch over (default ``torch.get_num_threads()``).

    Returns
    -------
    (B, j1 − j0, j1 − j0) tensor
        ``L⁻¹`` of each block, lower, zeros above the diagonal.
    """
    B, k = W.shape[0], W.shape[-1]
    nb = j1 - j0
    tile = nb if tile is None else int(tile)
    if W.dim() != 3 or W.shape[-2] != k or not W.is_contiguous() or W.dtype != torch.float64:
        raise SettingsError(
            f"chol_block: W must be a contiguous (B, k, k) float64 tensor, got {tuple(W.shape)} "
            f"{W.dtype}{'' if W.is_contiguous() else ', not contiguous'}."
        )
    if not (0 <= j0 < j1 <= k and nb <= tile) or info.dtype != torch.int32 or tuple(info.shape) != (B,):
        raise SettingsError(
            f"chol_block: need 0 ≤ j0 < j1 ≤ k and j1 − j0 ≤ tile, info (B,) int32; got j0={j0}, "
            f"j1={j1}, k={k}, tile={tile}, info {tuple(info.shape)} {info.dtype}."
        )
    Dinv = torch.empty(B, nb, nb, dtype=W.dtype, device=W.device)
    if B == 0:
        return Dinv
    base = W.view(-1)[j0 * k + j0 :]  # the block's first entry; row stride k, batch stride k²
    if W.device.type == "cuda":
        if tile > KMAX:
            raise SettingsError(f"chol_block: blocks of at most {KMAX} rows on CUDA, got tile={tile}.")
        _launch_per_matrix(
            "dqp_chol_block", W.device, tile, B, [base, k * k, k, nb, Dinv, info, int(j0)], chol_block_words
        )
    elif W.device.type == "cpu":
        fn = _cpu_library(tile).dqp_chol_block_cpu if cpu_function is None else cpu_function(tile)
        _run_cpu(fn, [base.data_ptr(), k * k, k, nb, Dinv.data_ptr(), info.data_ptr(), int(j0)], B, cpu_threads)
    else:
        raise SettingsError(f"chol_block: no build for device type {W.device.type!r}.")
    return Dinv


def chol_solve_words(k: int, threads: Optional[int] = None) -> int:
    """Shared memory (doubles) of one block of ``dqp_chol_solve_vec`` (DQP_CHOL_SOLVE_WORDS in fused_ipm.cu)."""
    threads = _threads(threads)
    rr, rc = _tiles(k, "cuda", threads)
    return k * (k | 1) + 32 * rc + (threads // 32) * rr + 3 * k


def chol_solve_vec_available(device: torch.device, dtype: torch.dtype, k: int) -> bool:
    """Whether :func:`chol_solve_vec` runs for k × k factors here: on CUDA, float64, k ≤ :data:`KMAX`
    and the kernel builds (a failure is logged once; the library's triangular solves run instead)."""
    return _helper_available(
        device,
        dtype,
        k,
        chol_solve_words(k),
        "dqp_chol_solve_vec",
        "batched Cholesky solve",
        "the library's triangular solves",
    )


def matrix_layout(L: Tensor) -> Optional[int]:
    """0: each (k, k) matrix of L is row-major, 1: column-major, None: neither (or k = 1: 0)."""
    k = L.shape[-1]
    if L.stride(0) not in (0, k * k) and L.shape[0] > 1:
        return None
    if k == 1 or (L.stride(-1) == 1 and L.stride(-2) == k):
        return 0
    if L.stride(-2) == 1 and L.stride(-1) == k:
        return 1
    return None


def chol_solve_vec(
    L: Tensor, r: Tensor, cpu_function: Optional[Callable] = None, cpu_threads: Optional[int] = None
) -> Tensor:
    """``(L Lᵀ)⁻¹ r`` for a batch of lower Cholesky factors and one vector each, in one launch.

    One thread block per matrix reads L's lower triangle once into shared memory and runs both
    triangular solves there (the fused kernel's ``chol_solve``), where the library's batched
    ``trsm`` reads L twice.

    Parameters
    ----------
    L : (B, k, k) float64 tensor
        Lower-triangular factors (the strict upper triangle is not read), each matrix dense in
        row-major or column-major order (strides ``(k², k, 1)`` or ``(k², 1, k)``; a batch stride of
        0 for one shared factor); k ≤ :data:`KMAX` on CUDA.
    r : (B, k) tensor of L's dtype and device
    cpu_function : callable, optional
        Tests: a function of k that returns the C++ function the CPU path calls instead of the
        build's ``dqp_chol_solve_vec_cpu`` (e.g. a multi-threaded test build's).
    cpu_threads : int, optional
        Threads the CPU build splits the batch over (default ``torch.get_num_threads()``).

    Returns
    -------
    (B, k) tensor
    """
    if L.dim() != 3 or L.shape[-2] != L.shape[-1] or L.dtype != torch.float64:
        raise SettingsError(f"chol_solve_vec: L must be a (B, k, k) float64 tensor, got {tuple(L.shape)} {L.dtype}.")
    B, k = L.shape[0], L.shape[-1]
    cm = matrix_layout(L)
    if cm is None:
        raise SettingsError(
            f"chol_solve_vec: each matrix of L must be dense, row- or column-major (strides "
            f"(k², k, 1) or (k², 1, k), batch stride 0 for a shared one), got strides {L.stride()}."
        )
    if tuple(r.shape) != (B, k) or r.dtype != L.dtype or r.device != L.device:
        raise SettingsError(
            f"chol_solve_vec: r must be ({B}, {k}) {L.dtype} on {L.device}, got "
            f"{tuple(r.shape)} {r.dtype} on {r.device}."
        )
    x = r.clone(memory_format=torch.contiguous_format)
    if B == 0 or k == 0:
        return x
    sL = L.stride(0)
    if L.device.type == "cuda":
        if k > KMAX:
            raise SettingsError(f"chol_solve_vec: factors of at most {KMAX} rows on CUDA, got k={k}.")
        _launch_per_matrix("dqp_chol_solve_vec", L.device, k, B, [L, sL, k, cm, x, k], chol_solve_words)
    elif L.device.type == "cpu":
        fn = _cpu_library(k).dqp_chol_solve_vec_cpu if cpu_function is None else cpu_function(k)
        _run_cpu(fn, [L.data_ptr(), sL, k, cm, x.data_ptr(), k], B, cpu_threads)
    else:
        raise SettingsError(f"chol_solve_vec: no build for device type {L.device.type!r}.")
    return x
