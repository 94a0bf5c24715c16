"""The on-disk cache of built kernels (dqp.solvers.build_cache), with an injected compiler and
loader so that it runs without a GPU; the CUDA tests exercise NVRTC itself."""

from __future__ import annotations

import threading

import pytest
import torch

from dqp.solvers.build_cache import CudaBuilds, cache_dir

DEV = torch.device("cuda", 0)
NAMES = ("k1", "k2")


class FakeToolchain:
    """Counts compiles; ``gate`` (an Event) holds a compile until it is set; ``fail`` makes it raise."""

    def __init__(self, gate=None, fail=False):
        self.compiles, self.gate, self.fail = [], gate, fail

    def compile(self, source, arch, options):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("NVRTC could not compile: error: unknown option")
        self.compiles.append((arch, options))
        return f"{arch}|{'|'.join(options)}|{source}".encode()

    def load(self, image, names, device):
        return {name: (name, image) for name in names}


def builds(tmp_path, tools, source="src", arch="sm_90"):
    return CudaBuilds(
        lambda: source, NAMES, compile=tools.compile, load=tools.load, directory=lambda: tmp_path, arch=lambda d: arch
    )


def test_a_build_is_compiled_once_and_read_from_disk_by_a_new_process(tmp_path):
    tools = FakeToolchain()
    first = builds(tmp_path, tools)
    kernels = first.get(DEV, ("-DA=1",))
    assert set(kernels) == set(NAMES) and len(tools.compiles) == 1
    assert first.get(DEV, ("-DA=1",)) is kernels and len(tools.compiles) == 1  # in memory
    assert len(list(tmp_path.glob("dqp_cuda_*.cubin"))) == 1
    again = builds(tmp_path, tools)  # (as a new process: nothing in memory)
    assert again.get(DEV, ("-DA=1",), wait=False)["k1"][1] == kernels["k1"][1]
    assert len(tools.compiles) == 1  # read from the cache directory, not compiled


def test_source_options_and_architecture_each_name_their_own_build(tmp_path):
    tools = FakeToolchain()
    builds(tmp_path, tools).get(DEV, ("-DA=1",))
    builds(tmp_path, tools).get(DEV, ("-DA=2",))
    builds(tmp_path, tools, source="changed").get(DEV, ("-DA=1",))
    builds(tmp_path, tools, arch="sm_80").get(DEV, ("-DA=1",))
    assert len(tools.compiles) == 4 and len(list(tmp_path.glob("dqp_cuda_*.cubin"))) == 4


def test_background_build_answers_none_until_done(tmp_path):
    gate = threading.Event()
    tools = FakeToolchain(gate=gate)
    b = builds(tmp_path, tools)
    assert b.get(DEV, ("-DA=1",), wait=False) is None  # compiling: the caller takes the torch loop
    assert b.get(DEV, ("-DA=1",), wait=False) is None  # (one build, not a second)
    gate.set()
    assert set(b.get(DEV, ("-DA=1",), wait=True)) == set(NAMES)
    assert len(tools.compiles) == 1 and b.get(DEV, ("-DA=1",), wait=False) is not None


def test_a_failed_build_is_kept_and_raised_each_time(tmp_path):
    b = builds(tmp_path, FakeToolchain(fail=True))
    assert b.failure(DEV, ("-DA=1",)) is None
    with pytest.raises(RuntimeError, match="unknown option"):
        b.get(DEV, ("-DA=1",))
    assert "unknown option" in b.failure(DEV, ("-DA=1",))
    with pytest.raises(RuntimeError, match="unknown option"):
        b.get(DEV, ("-DA=1",), wait=False)
    assert not list(tmp_path.glob("dqp_cuda_*"))  # nothing half-written is left


def test_no_device_is_a_kept_failure(tmp_path):
    def no_cuda(device):
        raise RuntimeError("Torch not compiled with CUDA enabled")

    b = CudaBuilds(lambda: "src", NAMES, compile=FakeToolchain().compile, directory=lambda: tmp_path, arch=no_cuda)
    with pytest.raises(RuntimeError, match="not compiled with CUDA"):
        b.get(DEV, ())
    assert "not compiled with CUDA" in b.failure(DEV, ())


def test_cache_directory_is_private(tmp_path):
    assert cache_dir(env=str(tmp_path / "mine")) == tmp_path / "mine"
    home = tmp_path / "home"
    d = cache_dir(env="", home=str(home), tmp=str(tmp_path))
    assert d == home / "dqp" and (d.stat().st_mode & 0o777) == 0o700
    d.chmod(0o777)  # writable by others: not used, the temporary directory's private one instead
    t = cache_dir(env="", home=str(home), tmp=str(tmp_path))
    assert t.parent == tmp_path and t != d and (t.stat().st_mode & 0o022) == 0
    t.chmod(0o777)  # that one too: a fresh private directory
    other = cache_dir(env="", home=str(home), tmp=str(tmp_path))
    assert other not in (d, t) and (other.stat().st_mode & 0o022) == 0


needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _real_builds(tmp_path, compile=None):
    import dqp.solvers.fused as fused

    kw = {} if compile is None else {"compile": compile}
    names = ("dqp_ipm_dual", "dqp_chol_block", "dqp_chol_solve_vec")
    return CudaBuilds(fused._source, names, directory=lambda: tmp_path, **kw)


@needs_cuda[0]
@needs_cuda[1]
def test_nvrtc_builds_machine_code_that_a_new_process_loads_without_compiling(tmp_path):
    import dqp.solvers.fused as fused

    flags = fused._cuda_flags(10, False, None, ())
    dev = torch.device("cuda", torch.cuda.current_device())
    kernels = _real_builds(tmp_path).get(dev, flags)
    assert set(kernels) == {"dqp_ipm_dual", "dqp_chol_block", "dqp_chol_solve_vec"}
    (image,) = tmp_path.glob("dqp_cuda_*.cubin")
    assert image.read_bytes()[:4] == b"\x7fELF"  # machine code, nothing left for the driver to compile

    def no_compiler(*args):
        raise AssertionError("compiled again instead of reading the cache directory")

    assert set(_real_builds(tmp_path, compile=no_compiler).get(dev, flags, wait=False)) == set(kernels)


@needs_cuda[0]
@needs_cuda[1]
def test_first_solve_of_a_new_size_takes_the_torch_loop_while_the_kernel_builds(tmp_path):
    from dqp.solvers.ipm import IPMOptions, KernelOptions, ipm_solve
    from test_ipm import known_qp

    import dqp.solvers.fused as fused

    # (a size class no other test builds: k = 37 → a 4×2 tile of 384 threads; an option that only
    # names a build of its own, so that it is not already built by an earlier test)
    kernel = KernelOptions(nvrtc_options=("-DDQP_TEST_BACKGROUND=1",))
    P, q, C, d, A, b, z0, *_ = known_qp(8, 20, 37, 0, seed=3, device="cuda")
    res = ipm_solve(P, q, C, d, fused=None, options=IPMOptions(kernel=kernel))
    assert bool((res.status == 0).all()) and not res.fused  # the build has only started
    assert fused._cuda_build_available(P.device, 37, KernelOptions(nvrtc_options=kernel.nvrtc_options), wait=True)
    res2 = ipm_solve(P, q, C, d, fused=None, options=IPMOptions(kernel=kernel))
    assert res2.fused and (res2.z - res.z).abs().max() <= 1e-6 * (1 + res.z.abs().max())
