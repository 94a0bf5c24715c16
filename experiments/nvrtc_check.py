"""Compile the fused kernel with NVRTC on a machine without a GPU: does it build for sm_90, and with
how many registers and spills (ptxas -v)? NVRTC needs no GPU; its pip wheel is enough:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \\
        --platform manylinux2014_x86_64 -d /tmp/nvrtc nvidia-cuda-nvrtc-cu12
    cd /tmp/nvrtc && python3 -m zipfile -e nvidia_cuda_nvrtc_cu12-*.whl x
    python experiments/nvrtc_check.py --lib /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib [--rev HEAD~3 --rev HEAD]

With no --rev: the working tree's kernel for a few (k, threads) builds. With --rev: that commit's
solvers/fused_ipm.cu (k=100, 384 threads), to compare registers and spills across changes.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import subprocess
import sys

import dqp.solvers.fused as fm


def compile_kernel(lib, src: str, k: int, threads: int, extra=()):
    """(return code, log) of NVRTC for sm_90 with the build's defines and ptxas -v."""
    rr, rc = fm._tiles(k, "cuda", threads)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"dqp_ipm_dual.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [b"-std=c++17", f"-DDQP_RR={rr}".encode(), f"-DDQP_RC={rc}".encode(), f"-DDQP_THREADS={threads}".encode(),
            b"--gpu-architecture=sm_90", b"--ptxas-options=-v"] + [e.encode() for e in extra]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return res, log.value.decode()


def summary(log: str) -> str:
    """ptxas' registers and spills, per entry function (dqp_ipm_dual, dqp_chol_block)."""
    out, fn = [], "?"
    for line in log.splitlines():
        if "Compiling entry function" in line:
            fn = line.split("'")[1]
        elif "registers" in line or "spill" in line:
            out.append(f"{fn}: {line.split(':', 1)[-1].strip()}")
    return " / ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, help="directory holding libnvrtc.so.*")
    ap.add_argument("--rev", action="append", default=[])
    a = ap.parse_args()
    so = sorted(glob.glob(os.path.join(a.lib, "libnvrtc.so*")))
    if not so:
        raise SystemExit(f"no libnvrtc.so* in {a.lib}")
    lib = ctypes.CDLL(so[0])
    defs = fm._source()[: len(fm._source()) - len(fm._SRC.read_text())]
    bad = 0
    if a.rev:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for rev in a.rev:
            src = subprocess.check_output(["git", "-C", repo, "show", f"{rev}:solvers/fused_ipm.cu"]).decode()
            res, log = compile_kernel(lib, defs + src, 100, 384)
            bad += res != 0
            print(f"{rev}: rc {res} | {summary(log) if res == 0 else log[-1500:]}")
    else:
        for k, threads, extra in ((100, 384, ()), (128, 384, ()), (64, 384, ()), (13, 384, ()), (100, 512, ()),
                                  (100, 384, ("-DDQP_PROFILE",))):
            res, log = compile_kernel(lib, fm._source(), k, threads, extra)
            bad += res != 0
            print(f"k={k} threads={threads} {' '.join(extra)}: rc {res} | {summary(log) if res == 0 else log[-1500:]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
