"""Building the fused kernel's source into device code, and keeping what was built on disk.

The CUDA build: NVRTC compiles the source straight to machine code (a CUBIN) for the device's
architecture, so the driver has nothing left to compile when it loads it. Compiling takes tens of
seconds per size class (each class fixes the register tile of the kernel at compile time), so
every CUBIN is written to the cache directory (:func:`cache_dir`) under a name derived from the
source, the architecture, the compile options and the NVRTC version: a later process on the machine
loads it in milliseconds, and a changed source or option never loads a stale one.

With ``wait=False`` (:attr:`KernelOptions.cuda_build` ``"background"``) a class that is neither
loaded nor on disk is compiled on a background thread (NVRTC runs without holding the GIL) and
:meth:`CudaBuilds.get` answers None until it is done, so the caller solves with the torch loop in
the meantime instead of waiting for the compiler.

The C++ build of the CPU path keeps its shared libraries in the same directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

__all__ = ["cache_dir", "CudaBuilds", "nvrtc_cubin", "device_arch"]

#: Bumped when the on-disk layout of a cached build changes.
_FORMAT = "1"


def cache_dir(env: Optional[str] = None, home: Optional[str] = None, tmp: Optional[str] = None) -> Path:
    """Where built kernels are kept.

    ``DQP_CACHE_DIR`` when set (``env`` overrides it); else ``$XDG_CACHE_HOME/dqp`` or
    ``~/.cache/dqp`` (``home`` overrides the cache home), kept across reboots; where that cannot be
    created, a directory of this user's in the temporary directory (``tmp``). Directories dqp
    creates are private (0700); one that another user owns or can write is not used (a fresh private
    temporary one is made instead), since a cached build is loaded and run.
    """
    env = os.environ.get("DQP_CACHE_DIR") if env is None else env
    if env:
        base = Path(env)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        return base
    tmp = tempfile.gettempdir() if tmp is None else tmp
    if home is None:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = os.getuid() if hasattr(os, "getuid") else "user"
    for base in (Path(home) / "dqp", Path(tmp) / f"dqp-{user}"):
        try:
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if _private(base) and os.access(base, os.W_OK):
            return base
    return Path(tempfile.mkdtemp(prefix="dqp-", dir=tmp))


def _private(path: Path) -> bool:
    """Whether ``path`` belongs to this user and no one else can write it."""
    if not hasattr(os, "getuid"):
        return True
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def device_arch(device: torch.device) -> str:
    """The device's real architecture for NVRTC, e.g. ``"sm_90"``."""
    props = torch.cuda.get_device_properties(device)
    return f"sm_{props.major}{props.minor}"


def _nvrtc() -> ctypes.CDLL:
    from torch.cuda import _utils

    return _utils._get_gpu_rtc_library()


def nvrtc_version() -> Tuple[int, int]:
    """The NVRTC library's version (major, minor)."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def nvrtc_cubin(source: str, arch: str, options: Sequence[str]) -> bytes:
    """Compile the CUDA ``source`` with NVRTC into a CUBIN for ``arch`` (``"sm_90"``); ``options``
    are NVRTC options (defines, ``-std=c++17``, ...). Raises RuntimeError with the compiler's log."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            err = lib.nvrtcGetErrorString(rc)
            raise RuntimeError(f"NVRTC {what} failed: {err.decode() if err else rc}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"dqp_fused_ipm.cu", 0, None, None), "setup")
    try:
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in options]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile the fused kernel ({arch}):\n{log.value.decode()[-4000:]}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "CUBIN size")
        image = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, image), "CUBIN")
        return image.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _load(image: bytes, names: Sequence[str], device: torch.device) -> Dict[str, object]:
    """Load a CUBIN on ``device`` and return its kernels ``names`` (callables taking tensors)."""
    from torch.cuda import _utils

    with torch.cuda.device(device):
        return _utils._cuda_load_module(image, list(names))


class CudaBuilds:
    """The built modules of one kernel source: in memory per device, on disk per architecture.

    Parameters
    ----------
    source : callable
        Returns the source text (read when first needed).
    names : sequence of str
        The kernels (``extern "C"``) every module provides; one compile serves them all.
    compile : callable, optional
        ``compile(source, arch, options) -> bytes``, default :func:`nvrtc_cubin`.
    load : callable, optional
        ``load(image, names, device) -> {name: kernel}``, default: the driver's module loader.
    directory : callable, optional
        Returns the cache directory, default :func:`cache_dir`.
    arch : callable, optional
        ``arch(device) -> str``, the architecture compiled for, default :func:`device_arch`.
    """

    def __init__(
        self,
        source: Callable[[], str],
        names: Sequence[str],
        compile: Optional[Callable[[str, str, Sequence[str]], bytes]] = None,
        load: Optional[Callable] = None,
        directory: Optional[Callable[[], Path]] = None,
        arch: Optional[Callable[[torch.device], str]] = None,
    ) -> None:
        self._source = source
        self._names = tuple(names)
        self._compile = nvrtc_cubin if compile is None else compile
        self._load = _load if load is None else load
        self._directory = cache_dir if directory is None else directory
        self._arch = device_arch if arch is None else arch
        self._lock = threading.Lock()
        self._loaded: Dict[tuple, Dict[str, object]] = {}
        self._pending: Dict[tuple, Future] = {}
        self._failed: Dict[tuple, str] = {}
        self._pool: Optional[ThreadPoolExecutor] = None

    def path(self, arch: str, options: Tuple[str, ...]) -> Path:
        """The cache file of the build for ``arch`` with ``options``."""
        try:
            version = "%d.%d" % nvrtc_version()
        except Exception:  # noqa: BLE001 - an injected compiler: no NVRTC needed to name its builds
            version = "?"
        ident = "\0".join((_FORMAT, self._source(), arch, version, *options))
        return self._directory() / f"dqp_cuda_{hashlib.sha256(ident.encode()).hexdigest()[:24]}.cubin"

    def failure(self, device: torch.device, options: Tuple[str, ...]) -> Optional[str]:
        """Why the build for ``device`` with ``options`` failed (None: it did not fail, or not yet)."""
        return self._failed.get((_index(device), tuple(options)))

    def get(self, device: torch.device, options: Tuple[str, ...], wait: bool = True) -> Optional[Dict[str, object]]:
        """The kernels built with ``options`` for ``device``: loaded, read from disk, or compiled.

        With ``wait=False`` a build that must be compiled starts in the background and None is
        returned until it is done. A failed build raises RuntimeError (every time, with the first
        failure's message); :meth:`failure` tells without raising.
        """
        key = (_index(device), tuple(options))
        image = None
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            if key in self._failed:
                raise RuntimeError(self._failed[key])
            job = self._pending.get(key)
            if job is None:
                try:
                    arch = self._arch(device)
                    path = self.path(arch, key[1])
                except Exception as exc:  # noqa: BLE001 - no CUDA, no NVRTC: kept as the failure
                    self._failed[key] = f"{type(exc).__name__}: {exc}"
                    raise RuntimeError(self._failed[key]) from exc
                image = _read(path)
                if image is None:
                    job = self._pending[key] = self._executor().submit(self._build, arch, key[1], path)
        if job is not None:
            if not wait and not job.done():
                return None
            try:
                image = job.result()
            except Exception as exc:  # noqa: BLE001 - kept and re-raised as one message
                with self._lock:
                    self._pending.pop(key, None)
                    self._failed[key] = f"{type(exc).__name__}: {exc}"
                raise RuntimeError(self._failed[key]) from exc
        return self._loaded_now(key, image, device)

    def _loaded_now(self, key: tuple, image: bytes, device: torch.device) -> Dict[str, object]:
        with self._lock:
            if key not in self._loaded:
                try:
                    self._loaded[key] = self._load(image, self._names, device)
                except Exception as exc:  # noqa: BLE001 - a CUBIN the driver refuses
                    self._failed[key] = f"loading the built kernel failed: {type(exc).__name__}: {exc}"
                    raise RuntimeError(self._failed[key]) from exc
                finally:
                    self._pending.pop(key, None)
            return self._loaded[key]

    def _build(self, arch: str, options: Tuple[str, ...], path: Path) -> bytes:
        logger.info("dqp fused IPM: compiling the CUDA kernel for %s (%s); kept in %s", arch, " ".join(options), path)
        image = self._compile(self._source(), arch, options)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(image)
            os.replace(tmp, path)  # (atomic: a concurrent reader sees the whole file or none)
        except OSError as exc:
            logger.warning("dqp fused IPM: the built kernel could not be cached in %s (%s)", path, exc)
            tmp.unlink(missing_ok=True)
        return image

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="dqp-nvrtc"
            )
        return self._pool


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _read(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except OSError:
        return None
