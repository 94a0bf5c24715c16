"""Blocked batched Cholesky and solves (dqp.linsolve.blocked) and the IPM's choice of them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import dqp.solvers.ipm as ipm
from dqp.errors import SettingsError
from dqp.ipm_layer import solve_qp_batch
from dqp.linsolve.blocked import block_starts, blocked_chol_solve, blocked_cholesky, diag_block_inverses, tri_inverse
from dqp.linsolve.cholesky import CholeskyOptions, cholesky
from dqp.solvers.ipm import IPMOptions, KernelOptions

F64 = torch.float64
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


#: These tests are of the torch loop; the fused kernel (which the float64 dual form takes by
#: default where it can be built) has tests/test_fused.py.
LOOP = IPMOptions(kernel=KernelOptions(mode=False))


def _spd(B, k, seed=0, device="cpu", dtype=F64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, k, k, generator=g, dtype=F64)
    return (X @ X.mT / k + 0.1 * torch.eye(k, dtype=F64)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,k,nb", [(4, 100, 32), (3, 50, 64), (2, 130, 40), (5, 7, 3), (2, 300, 128)])
def test_blocked_cholesky_and_solve_match_library(device, B, k, nb):
    M = _spd(B, k, seed=k, device=device)
    L0 = torch.linalg.cholesky(M)
    L, dinv, info = blocked_cholesky(M, nb)
    assert (info == 0).all()
    assert torch.allclose(L, L0, rtol=0, atol=1e-12)
    assert torch.equal(L.triu(1), torch.zeros_like(L))  # a clean lower factor
    assert len(dinv) == len(block_starts(k, nb))
    g = torch.Generator().manual_seed(1)
    for r in (torch.randn(B, k, generator=g, dtype=F64), torch.randn(B, k, 3, generator=g, dtype=F64)):
        r = r.to(device)
        x = blocked_chol_solve(L, dinv, r)
        x0 = torch.cholesky_solve(r.unsqueeze(-1) if r.dim() == 2 else r, L0)
        assert x.shape == r.shape
        assert torch.allclose(x, x0.reshape(r.shape), rtol=1e-10, atol=1e-10)


def test_blocked_cholesky_overwrites_only_when_asked():
    M = _spd(3, 90)
    keep = M.clone()
    L, _, _ = blocked_cholesky(M, 32)
    assert torch.equal(M, keep) and L.data_ptr() != M.data_ptr()
    L2, _, _ = blocked_cholesky(M, 32, overwrite=True)
    assert L2.data_ptr() == M.data_ptr() and torch.allclose(L2, L, rtol=0, atol=1e-14)


def test_blocked_cholesky_reports_first_bad_pivot_like_the_library():
    M = _spd(3, 70, seed=2)
    M[1, 45, 45] = -1.0  # leading minor 46 of element 1 is not positive definite
    _, _, info = blocked_cholesky(M, 16)
    _, info0 = torch.linalg.cholesky_ex(M)
    assert info.tolist() == info0.tolist() == [0, 46, 0]


def test_triangular_inverse_by_halves():
    L = torch.linalg.cholesky(_spd(2, 200, seed=3))
    X = tri_inverse(L)  # 200 > TRI_INVERSE_LEAF: split recursively
    eye = torch.eye(200, dtype=F64).expand(2, 200, 200)
    assert torch.allclose(X @ L, eye, rtol=0, atol=1e-10)
    assert torch.equal(X.triu(1), torch.zeros_like(X))
    D = diag_block_inverses(L, 64)
    assert [t.shape[-1] for t in D] == [64, 64, 64, 8]


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="nb must be"):
        block_starts(10, 0)


def test_blocked_policy():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = CholeskyOptions()
    assert auto.use_blocked((128, 500, 500), cuda)  # measured: blocked faster
    assert auto.use_blocked((128, 200, 200), cuda)
    assert not auto.use_blocked((1024, 100, 100), cuda)  # measured: library faster
    assert not auto.use_blocked((128, 100, 100), cuda)  # the explicit inverse's range
    assert not auto.use_blocked((128, 500, 500), cpu)  # CPU: LAPACK
    assert not auto.use_blocked((500, 500), cuda)  # shared factor
    assert auto.block_size_for(200) == 64 and auto.block_size_for(500) == 128
    always = CholeskyOptions(blocked="always")
    assert always.use_blocked((2, 100, 100), cpu) and not always.use_blocked((2, 40, 40), cpu)  # k ≤ nb: no blocks
    assert not CholeskyOptions(blocked="never").use_blocked((128, 500, 500), cuda)
    with pytest.raises(SettingsError, match="blocked"):
        CholeskyOptions(blocked="sometimes")
    with pytest.raises(SettingsError, match="block_size"):
        CholeskyOptions(block_size=0)


needs_cxx = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
    reason="the kernel's C++ build needs a C++ compiler",
)


def _kernel_diag(nb):
    import dqp.solvers.fused as fused

    return lambda W, j0, j1, info: fused.chol_block(W, j0, j1, info, tile=nb)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_cxx), *DEVICES[1:]])
@pytest.mark.parametrize("B,k,nb", [(3, 300, 128), (2, 200, 64), (4, 90, 37), (2, 128, 128), (3, 5, 2)])
def test_kernel_diagonal_blocks_match_library(device, B, k, nb):
    """The diagonal blocks factorized and inverted by the fused source's dqp_chol_block (the C++
    build on the CPU, the register tiles on CUDA) give the library's factor, inverses with
    X L_jj = I, clean triangles and, for a matrix that is not positive definite, the library's
    info — also where the last block is smaller than the one the kernel is built for."""
    M = _spd(B, k, seed=k + nb, device=device)
    L0 = torch.linalg.cholesky(M)
    L, dinv, info = blocked_cholesky(M, nb, diag_factor=_kernel_diag(nb))
    assert (info == 0).all()
    assert torch.allclose(L, L0, rtol=0, atol=1e-12)
    assert torch.equal(L.triu(1), torch.zeros_like(L))
    for (j0, j1), D in zip(block_starts(k, nb), dinv):
        eye = torch.eye(j1 - j0, dtype=F64, device=device).expand(B, -1, -1)
        assert torch.allclose(D @ L[:, j0:j1, j0:j1], eye, rtol=0, atol=1e-12)
        assert torch.equal(D.triu(1), torch.zeros_like(D))
    r = torch.randn(B, k, generator=torch.Generator().manual_seed(2), dtype=F64).to(device)
    x = blocked_chol_solve(L, dinv, r)
    assert torch.allclose(x, torch.cholesky_solve(r.unsqueeze(-1), L0).squeeze(-1), rtol=1e-10, atol=1e-10)
    bad = M.clone()
    bad[1, k // 2, k // 2] = -1.0
    bad[0, k - 1, k - 1] = float("nan")
    _, _, info = blocked_cholesky(bad, nb, diag_factor=_kernel_diag(nb))
    _, info0 = torch.linalg.cholesky_ex(bad.cpu())  # (LAPACK: a NaN pivot fails; cuSOLVER may pass it on)
    assert info.tolist() == info0.tolist() and info0[1] > 0 and info0[0] == k


@needs_cxx
def test_chol_block_rejects_bad_arguments():
    import dqp.solvers.fused as fused

    W = _spd(2, 20)
    info = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(SettingsError, match="contiguous"):
        fused.chol_block(W.transpose(1, 2), 0, 10, info)
    with pytest.raises(SettingsError, match="float64"):
        fused.chol_block(W.float(), 0, 10, info)
    with pytest.raises(SettingsError, match="j0 < j1"):
        fused.chol_block(W, 10, 5, info)
    with pytest.raises(SettingsError, match="tile"):
        fused.chol_block(W, 0, 10, info, tile=8)
    with pytest.raises(SettingsError, match="int32"):
        fused.chol_block(W, 0, 10, info.long())
    with pytest.raises(SettingsError, match="device type"):
        fused.chol_block(W.to("meta"), 0, 10, info.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_chol_block_rejects_blocks_larger_than_the_kernel_holds():
    import dqp.solvers.fused as fused

    W = _spd(2, 200, device="cuda")
    with pytest.raises(SettingsError, match="at most"):
        fused.chol_block(W, 0, 150, torch.zeros(2, dtype=torch.int32, device="cuda"))


def test_block_diag_policy():
    M = _spd(2, 100)
    assert CholeskyOptions(block_diag="library").diag_factor(M, 64) is None
    assert CholeskyOptions(block_diag="auto").diag_factor(M, 64) is None  # the kernel: CUDA only
    assert CholeskyOptions(block_diag="auto").diag_factor(M.float(), 64) is None
    assert callable(CholeskyOptions(block_diag="kernel").diag_factor(M, 64))
    with pytest.raises(SettingsError, match="block_diag"):
        CholeskyOptions(block_diag="fast")


@pytest.mark.parametrize(
    "device,diag",
    [
        ("cpu", "library"),
        pytest.param("cpu", "kernel", marks=needs_cxx),
        *[pytest.param("cuda", dg, marks=DEVICES[1].marks) for dg in ("library", "kernel")],
    ],
)
def test_layer_with_blocked_path_matches_plain(device, diag):
    """Forward and gradients of the IPM layer (IPM, polish, backward) with every batched Cholesky
    factorization and solve on the blocked path (diagonal blocks by the library or by the kernel)
    equal those with the library's plain factorization."""
    base = LOOP.replace(linalg={"block_diag": diag, "cpu_fast_paths": False, "block_size": 16})
    _layer_same_across(device, base, "blocked")


def _layer_same_across(device, base, setting, modes=("never", "always")):
    """The IPM layer's z and gradients (qpth's generator, B=6, n=m=40) are the same, to 1e-10, for
    each value of ``base.linalg.<setting>`` in ``modes``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from bench_qpth import make_problems

    ps = make_problems(6, 40, 40, 0, device)
    out = []
    for mode in modes:
        opts = base.replace(linalg={setting: mode})
        ipm.clear_graph_cache()
        leaves = [x.detach().requires_grad_(True) for x in (ps.Q, ps.p, ps.G, ps.h)]
        z = solve_qp_batch(*leaves, None, None, options=opts)[0]
        out.append((z, torch.autograd.grad((z * ps.w).sum(), leaves)))
    ipm.clear_graph_cache()
    (z0, g0) = out[0]
    for z1, g1 in out[1:]:
        assert torch.allclose(z0, z1, rtol=0, atol=1e-10)
        for a, b in zip(g0, g1):
            assert ((a - b).abs().max() / (1 + a.abs().max())).item() < 1e-10


@pytest.mark.parametrize(
    "parent,child",
    [("inverse", "inverse"), ("blocked", "blocked"), ("blocked", "plain"), ("inverse", "plain"), ("plain", "blocked")],
)
@pytest.mark.parametrize("with_factors", [True, False])
def test_absorb_keeps_factor_inverses(parent, child, with_factors):
    """The polish's retry merges a sub-batch factorization into the batch's (BatchedKKT.absorb):
    the batch's factors keep their inverses for the new rows — taken over, or computed where the
    sub-batch was factorized another way — and solves equal a fresh factorization."""
    from dqp.linsolve.torch_batched import BatchedKKT

    def policy(mode):
        return CholeskyOptions(
            inverse_solve="always" if mode == "inverse" else "never",
            blocked="always" if mode == "blocked" else "never",
            block_size=8,
            cpu_fast_paths=False,
        )

    g = torch.Generator().manual_seed(0)
    B, n, m = 6, 24, 20
    P = _spd(B, n, seed=4)
    C = torch.randn(B, m, n, generator=g, dtype=F64)
    a0 = torch.rand(B, m, generator=g) < 0.5
    a1 = torch.rand(B, m, generator=g) < 0.5
    idx, rows = torch.tensor([1, 4]), torch.tensor([0, 1])
    factors = None
    if with_factors:
        L, _ = cholesky(P.clone(), policy(parent))
        PiCt = torch.cholesky_solve(C.mT, torch.linalg.cholesky(P))
        factors = dict(L=L, PiAbt=PiCt, M=C @ PiCt)
    kkt = BatchedKKT(P, None, C, a0, factors=factors, options=policy(parent))
    sub = BatchedKKT(
        P[idx],
        None,
        C[idx],
        a1[idx],
        factors=None if factors is None else {k: (v.index(idx) if k == "L" else v[idx]) for k, v in factors.items()},
        options=policy(child),
    )
    kkt.absorb(idx, sub, rows)
    merged = a0.clone()
    merged[idx] = a1[idx]
    ref = BatchedKKT(P, None, C, merged, options=policy("plain"))
    if parent == "inverse":
        assert kkt.LS.inverse is not None
    if parent == "blocked":
        assert kkt.LS.block_inverses is not None
    gz, gmu = torch.randn(B, n, generator=g, dtype=F64), torch.randn(B, m, generator=g, dtype=F64)
    yz, _, ymu = kkt.solve(gz, None, gmu, refine=0)
    rz, _, rmu = ref.solve(gz, None, gmu, refine=0)
    assert torch.allclose(yz, rz, rtol=1e-9, atol=1e-9) and torch.allclose(ymu, rmu, rtol=1e-9, atol=1e-9)


def test_factor_kernel_policy():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    always = CholeskyOptions(factor_kernel="always")
    assert not always.factor_by_kernel((8, 50, 50), cpu, F64)  # CUDA only
    assert not always.factor_by_kernel((50, 50), cuda, F64)  # batched factors only
    assert not CholeskyOptions(factor_kernel="never").factor_by_kernel((8, 50, 50), cuda, F64)
    assert not CholeskyOptions().factor_by_kernel((1024, 100, 100), cuda, F64)  # no inverse for this much work
    with pytest.raises(SettingsError, match="factor_kernel"):
        CholeskyOptions(factor_kernel="kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("fused_on", [False, True])
def test_layer_with_kernel_factors_matches_library(fused_on):
    """The IPM layer's forward and gradients with every batched Cholesky factor of size ≤ KMAX by
    dqp_chol_block (FACTOR_KERNEL="always") equal those with the library's (the torch loop and
    the fused kernel's setup); a non-positive-definite matrix is reported by both alike."""
    _layer_same_across("cuda", LOOP.replace(kernel={"mode": fused_on}), "factor_kernel", ("never", "always"))
    M = _spd(3, 30, device="cuda")
    M[1, 4, 4] = -1.0
    L, info = cholesky(M, CholeskyOptions(factor_kernel="always"))
    _, info_lib = torch.linalg.cholesky_ex(M)
    assert info.tolist() == info_lib.tolist() and info[1] > 0
    assert torch.allclose(L.L[0] @ L.L[0].mT, M[0])
    assert torch.allclose(L.inverse[2] @ L.L[2], torch.eye(30, dtype=F64, device="cuda"))
