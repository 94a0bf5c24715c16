"""The fused IPM kernel (dqp.solvers.fused, solvers/fused_ipm.cu) against the torch loop.

On the CPU the kernel runs its C++ build (the same source with one thread per block; the default
there where a compiler exists), in two variants: the CPU's own loops and the CUDA code's register
tiles (``KernelOptions.cpu_tiles``), so CI checks the kernel's logic: statuses, iteration counts and iterates equal
to the torch loop's, which checks every iteration on the CPU as the kernel does. A test build
(-DDQP_CPU_THREADS) runs the CUDA code with several warps of real threads per block, its warp
shuffles emulated, against the one-thread build. The CUDA tests (marked, skipped without a GPU)
run the real kernel.
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

import dqp.solvers.fused as fused
from dqp.errors import SettingsError, SolverNotAvailableError, Status
from dqp.ipm_layer import solve_qp_batch as _solve_qp_batch
from dqp.linsolve.cholesky import CholeskyFactor, CholeskyOptions
from dqp.solvers.ipm import IPMOptions, KernelOptions, graph_stats
from dqp.solvers.ipm import ipm_solve as _ipm_solve

from test_ipm import EMU, _rel, known_qp

DEFAULT = IPMOptions()


def ipm_solve(*args, options: IPMOptions = DEFAULT, **kw):
    return _ipm_solve(*args, options=options, **kw)


def solve_qp_batch(*args, options: IPMOptions = DEFAULT, **kw):
    return _solve_qp_batch(*args, options=options, **kw)


def _kernel_emu(**kernel) -> IPMOptions:
    """Graphs emulated on the CPU (test_ipm.EMU) with the kernel's default mode ("auto")."""
    return EMU().replace(kernel=dict(mode="auto", **kernel))


F64, F32 = torch.float64, torch.float32

needs_cxx = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
    reason="the kernel's C++ build needs a C++ compiler",
)
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _qpth_problem(B, n, m, seed=0, device="cpu"):
    """qpth's benchmark generator (Q = UᵀU + 1e-3 I, h = G z0 + s0): ill-conditioned Q."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = U.mT @ U + 1e-3 * torch.eye(n, dtype=F64)
    G = torch.randn(B, m, n, generator=g, dtype=F64)
    h = (G @ torch.randn(B, n, 1, generator=g, dtype=F64)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=F64)
    p = torch.randn(B, n, generator=g, dtype=F64)
    return [t.to(device) for t in (Q, p, G, h)]


def _same_as_loop(data, tol=1e-8, device="cpu", options=DEFAULT, **kw):
    kw.setdefault("form", "dual")  # (m > n: "auto" would take the primal form, which has no kernel)
    kw["options"] = options
    loop = ipm_solve(*data, fused=False, check_every=1, **kw)
    fus = ipm_solve(*data, fused=True, **kw)
    assert loop.form == fus.form == "dual"
    assert torch.equal(fus.status, loop.status)
    if device == "cpu":  # (the same arithmetic up to summation order: the same iterations)
        assert torch.equal(fus.iterations, loop.iterations)
    ok = fus.status == int(Status.SOLVED)
    for a, b in ((fus.z, loop.z), (fus.mu, loop.mu), (fus.lam, loop.lam), (fus.s, loop.s)):
        if a is not None and a.numel() and bool(ok.any()):
            assert _rel(a[ok], b[ok]) <= tol
    return fus, loop


# (n, m, p, shared): inequalities and equalities, inequality-only, equality-only, m > n,
# shared matrices with batched vectors
CASES = [(8, 10, 3, False), (12, 9, 0, False), (10, 0, 4, False), (6, 15, 2, False), (9, 11, 2, True)]


@pytest.fixture(params=[False, True], ids=["loops", "tiles"])
def cpu_build(request):
    """Both C++ builds: the CPU's own loops, and the CUDA code's register tiles (cpu_tiles): the options."""
    return IPMOptions(kernel=KernelOptions(cpu_tiles=request.param))


@needs_cxx
@pytest.mark.parametrize("n,m,p,shared", CASES)
def test_cpu_build_matches_torch_loop(n, m, p, shared, cpu_build):
    P, q, C, d, A, b, z0, lam0, mu0 = known_qp(6, n, m, p, seed=n + m + p)
    if shared:
        P, C, A = P[0], C[0], A[0]
        z0 = None
    data = (P, q, C if m else None, d if m else None, A if p else None, b if p else None)
    fus, _ = _same_as_loop(data, options=cpu_build)
    assert bool((fus.status == int(Status.SOLVED)).all())
    if z0 is not None:
        assert _rel(fus.z, z0) <= 1e-6  # the known solution


@needs_cxx
def test_cpu_build_qpth_generator_and_infeasible_element(cpu_build):
    Q, p, G, h = _qpth_problem(10, 20, 20, seed=4)
    G, h = G.clone(), h.clone()
    G[3, 1] = -G[3, 0]
    h[3, 0] = h[3, 1] = -1.0  # g·z ≤ −1 and −g·z ≤ −1
    fus, _ = _same_as_loop((Q, p, G, h, None, None), tol=1e-7, options=cpu_build)
    expect = torch.full((10,), int(Status.SOLVED))
    expect[3] = int(Status.PRIMAL_INFEASIBLE)
    assert torch.equal(fus.status, expect)


@needs_cxx
def test_cpu_build_iteration_limit():
    P, q, C, d, A, b, *_ = known_qp(4, 8, 10, 2, seed=1)
    fus, loop = _same_as_loop((P, q, C, d, A, b), tol=1e-12, max_iter=2)
    assert bool((fus.status == int(Status.MAX_ITER)).all()) and bool((fus.iterations == 2).all())


@needs_cxx
def test_layer_gradients_with_the_fused_forward():
    """solve_qp_batch(fused=True): the polish and the backward see the same IPM point, so z and every
    gradient agree with the torch loop's to round-off."""
    P, q, C, d, A, b, *_ = known_qp(5, 7, 9, 2, seed=3)
    w = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = {}
    for flag in (True, False):
        ins = [t.clone().requires_grad_() for t in (P, q, C, d, A, b)]
        z = solve_qp_batch(*ins, fused=flag)[0]
        (w * z).sum().backward()
        out[flag] = [z.detach()] + [t.grad for t in ins]
    for a, b in zip(out[True], out[False]):
        assert _rel(a, b) <= 1e-9


@needs_cxx
def test_graphed_setup_hands_the_kernel_a_minimal_state(monkeypatch):
    """With the setup as a (here: emulated) CUDA graph and the kernel to follow, the graph returns
    only the state the kernel reads; the result is the one of the eager setup, and a torch-loop call
    of the same shape gets the whole state from a graph of its own."""
    import dqp.solvers.ipm as ipm
    from dqp.solvers.ipm.start import _FUSED_STATE

    P, q, C, d, A, b, *_ = known_qp(5, 7, 9, 2, seed=5)
    eager = ipm_solve(P, q, C, d, A, b, fused=True, cuda_graph=False)
    opts = _kernel_emu()
    ipm.clear_graph_cache()
    c0 = graph_stats()
    seen = {}
    real = fused.solve_dual

    def spy(*a, **k):
        seen["state"] = sorted(a[12])
        return real(*a, **k)

    monkeypatch.setattr(fused, "solve_dual", spy)  # (a spy: the state the kernel is handed)
    g = ipm_solve(P, q, C, d, A, b, fused=True, options=opts)
    assert seen["state"] == sorted(_FUSED_STATE)
    assert graph_stats()["captures"] - c0["captures"] == 1  # the setup graph only
    assert torch.equal(g.status, eager.status) and torch.equal(g.iterations, eager.iterations)
    assert _rel(g.z, eager.z) <= 1e-12 and _rel(g.mu, eager.mu) <= 1e-12
    loop = ipm_solve(P, q, C, d, A, b, fused=False, check_every=1, options=opts)
    assert graph_stats()["captures"] - c0["captures"] == 3  # + its setup and iterations
    assert torch.equal(loop.status, g.status)
    ipm.clear_graph_cache()


@needs_cxx
def test_a_fallback_leaves_the_other_elements_to_the_kernels_polish():
    """Element 1's two identical rows make its reduced system singular (a fallback, polished by
    the torch code); element 0, weakly degenerate (x₂ ≤ 0 active with μ ≈ 1e-8), keeps the
    kernel's polish: z, the active set and the gradients are those of the torch path and of
    element 0 solved alone."""
    P = torch.eye(2, dtype=F64).expand(2, 2, 2).clone()
    q = torch.tensor([[-1.0, -1e-8], [-3.0, 0.0]], dtype=F64)
    C = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]], dtype=F64)
    d = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=F64)
    res = ipm_solve(P, q, C, d, fused=True, form="dual", polish_rounds=3, eps=1e-8)
    assert res.polish["fallback"].tolist() == [False, True]

    def run(batch, fused_flag):
        ins = [t.clone().requires_grad_() for t in batch]
        z, _, _, _, active = solve_qp_batch(*ins, fused=fused_flag, form="dual")
        z[:, 1].sum().backward()
        return [z.detach(), active] + [t.grad for t in ins]

    got, ref = run((P, q, C, d), True), run((P, q, C, d), False)
    alone = run((P[:1], q[:1], C[:1], d[:1]), True)
    for a, b, c in zip(got, ref, alone):
        assert torch.equal(a, b) if a.dtype == torch.bool else _rel(a, b) <= 1e-10
        assert torch.equal(a[:1], c) if a.dtype == torch.bool else _rel(a[:1], c) <= 1e-10
    assert got[1][0].tolist() == [True, False] and abs(float(got[0][0, 1])) <= 1e-14


@needs_cxx
def test_graphed_layer_with_the_kernel_interleaved_calls():
    """With (emulated) CUDA graphs and the kernel: two forward calls of one shape, then their two
    backward calls in reverse order, give each call's own gradients (the setup graph's outputs that
    the call does not keep are reused buffers, the backward graph's inputs are copied per call),
    and the backward graph gets the polish's few raw tensors."""
    import dqp.solvers.ipm as ipm
    from dqp.solvers.ipm.graphs import _FN_GRAPHS

    data = [_qpth_problem(6, 9, 12, seed=s) for s in (7, 8)]
    w = torch.randn(6, 9, dtype=F64, generator=torch.Generator().manual_seed(3))
    opts = _kernel_emu()

    def grads(eager):
        outs = []
        for d in data:
            ins = [t.clone().requires_grad_() for t in d]
            z = solve_qp_batch(*ins, fused=True, form="dual", cuda_graph=not eager, options=opts)[0]
            outs.append((ins, z))
        res = []
        for ins, z in reversed(outs):
            (w * z).sum().backward()
            res.append([z.detach()] + [t.grad for t in ins])
        return res

    ref = grads(eager=True)
    ipm.clear_graph_cache()
    c0 = graph_stats()
    got = grads(eager=False)
    for a, b in zip(got, ref):
        for x, y in zip(a, b):
            assert _rel(x, y) <= 1e-10
    # one backward graph, replayed by the second call; its inputs (names in the cache key)
    bwd = [
        {e[0] for e in key if isinstance(e, tuple) and len(e) == 4 and isinstance(e[0], str)}
        for key in _FN_GRAPHS
        if key[0] == "dqp_backward"
    ]
    assert len(bwd) == 1 and graph_stats()["hits"] - c0["hits"] >= 1
    assert all("LS" in n and "Abar" not in n and "HiAbt" not in n for n in bwd)
    ipm.clear_graph_cache()


@pytest.mark.parametrize(
    "device,tol",
    [
        pytest.param("cpu", 1e-10, marks=needs_cxx, id="cpu-emulated-graphs"),
        pytest.param("cuda", 1e-8, marks=cuda, id="cuda"),
    ],
)
def test_deferred_setup_test_that_fails_solves_again(monkeypatch, device, tol):
    """The graphed setup's dual-form test is read after the kernel's launch (on CUDA from pinned
    memory); where it fails (here an element with an indefinite P) the kernel's answer is dropped
    and the solve starts again with the test first (the primal form, torch loop); later calls of
    that shape test first, with no wasted kernel run."""
    import dqp.solvers.ipm as ipm
    from dqp.solvers.ipm.graphs import _SETUP_DEFER_FAILED

    P, q, C, d, A, b, *_ = known_qp(4, 7, 9, 2, seed=6, device=device)
    P = P.clone()
    P[2] = -P[2]
    eager = ipm_solve(P, q, C, d, A, b, cuda_graph=False)
    assert eager.form == "primal"
    opts = _kernel_emu() if device == "cpu" else DEFAULT
    ipm.clear_graph_cache()
    runs = []
    real = fused.solve_dual
    monkeypatch.setattr(fused, "solve_dual", lambda *a, **k: runs.append(1) or real(*a, **k))  # (counts launches)
    for _ in range(2):
        g = ipm_solve(P, q, C, d, A, b, options=opts)
        assert len(runs) == 1 and g.form == "primal" and not g.fused
        assert torch.equal(g.status, eager.status) and _rel(g.z, eager.z) <= tol
    assert len(_SETUP_DEFER_FAILED) == 1
    ipm.clear_graph_cache()
    assert not _SETUP_DEFER_FAILED


@needs_cxx
def test_auto_on_cpu_takes_the_cpp_build_unless_switched_off():
    P, q, C, d, A, b, *_ = known_qp(3, 5, 6, 1, seed=0)
    res = ipm_solve(P, q, C, d, A, b)
    assert bool((res.status == 0).all()) and res.fused
    res = ipm_solve(P, q, C, d, A, b, options=IPMOptions(kernel=KernelOptions(cpu_auto=False)))
    assert bool((res.status == 0).all()) and not res.fused
    res = ipm_solve(P, q, C, d, A, b, fused=None, options=IPMOptions(kernel=KernelOptions(mode=False)))
    assert bool((res.status == 0).all()) and not res.fused


def test_auto_on_cpu_keeps_the_torch_loop_when_the_build_fails(caplog):
    P, q, C, d, A, b, *_ = known_qp(3, 5, 6, 1, seed=0)
    opts = IPMOptions(kernel=KernelOptions(compiler="false"))  # a "compiler" that always fails
    with caplog.at_level("WARNING", logger="dqp.solvers.fused"):
        res = ipm_solve(P, q, C, d, A, b, options=opts)
    assert bool((res.status == 0).all()) and not res.fused
    assert fused._cpu_build_ok["false"] is False and "C++ build failed" in caplog.text


@pytest.mark.parametrize("what", ["float32", "primal", "trace", "bad_value"])
def test_fused_true_where_it_does_not_apply_raises(what):
    P, q, C, d, A, b, *_ = known_qp(3, 5, 6, 1, seed=0)
    kw = dict(fused=True)
    if what == "float32":
        P, q, C, d, A, b = (t.float() for t in (P, q, C, d, A, b))
        match = "float32"
    elif what == "primal":
        kw["form"] = "primal"
        match = "primal form"
    elif what == "trace":
        kw["trace"] = []
        match = "trace"
    else:
        kw["fused"] = "yes"
        match = "fused must be"
    with pytest.raises(SettingsError, match=match):
        ipm_solve(P, q, C, d, A, b, **kw)


def test_solve_dual_rejects_what_it_cannot_run():
    P, q, C, d, *_ = known_qp(2, 4, 5, 0, seed=0)
    st = dict(z=q.clone(), s=d.clone(), mu=d.clone(), lam=q.new_zeros(2, 0), delta=q.new_ones(2))
    kw = dict(
        max_iter=5,
        stall_iters=5,
        separate_steps=True,
        eps=1e-9,
        eps_inf=1e-7,
        step_fraction=0.99,
        reg_d=1e-12,
        wlo=1e-60,
    )
    norms = dict(pscale=q.new_ones(2), qnorm=q.new_ones(2))
    M = torch.eye(5, dtype=F64)
    with pytest.raises(SettingsError, match="float64 data only"):
        fused.solve_dual(P.float(), q.float(), C.float(), d.float(), None, None, M, M, q, d, norms, M[0, 0], st, **kw)
    with pytest.raises(SettingsError, match="no constraints"):
        fused.solve_dual(P, q, None, None, None, None, M, M, q, d, norms, M[0, 0], st, **kw)
    with pytest.raises(SettingsError, match="no build for device type"):
        fused.solve_dual(
            P.to("meta"), q.to("meta"), C.to("meta"), d.to("meta"), None, None, M, M, q, d, norms, M[0, 0], st, **kw
        )
    with pytest.raises(SettingsError, match="needs row_scale"):
        fused.solve_dual(P, q, C, d, None, None, M, M, q, d, norms, M[0, 0], st, polish_rounds=3, **kw)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_polish_rounds_are_checked(bad):
    P, q, C, d, *_ = known_qp(2, 4, 5, 0, seed=0)
    with pytest.raises(SettingsError, match="polish_rounds must be an integer >= 0"):
        ipm_solve(P, q, C, d, polish_rounds=bad)


def _torch_polish(P, q, C, d, A, b, res, rounds=3):
    """dqp.ipm_polish's masked polish (the one its CUDA graph runs) from the IPM point of ``res``."""
    from dqp.ipm_polish import _polish_masked, classify_active

    solved = res.status == int(Status.SOLVED)
    act = classify_active(C, res.s, res.mu) & solved.unsqueeze(-1) if C is not None else None
    return _polish_masked(P, q, C, d, A, b, res.z, res.lam, res.mu, act, solved, res.factors, rounds, DEFAULT)


@needs_cxx
@pytest.mark.parametrize("eps", [1e-8, 1e-3, 1e-2])
@pytest.mark.parametrize("n,m,p,shared", CASES)
def test_kernel_polish_matches_the_torch_polish(n, m, p, shared, eps, cpu_build):
    """ipm_solve(polish_rounds=3) with the kernel: from the same IPM point, the same active sets,
    accepted elements, fallbacks and polished point as the torch polish, and its factor of the
    reduced system (loose eps: misclassified rows, so that later rounds and fallbacks occur)."""
    _check_kernel_polish(_polish_data(n, m, p, shared), eps, options=cpu_build)


@needs_cxx
@pytest.mark.parametrize("eps,rounds", [(1e-2, 3), (1e-1, 3), (1e-1, 1)])
def test_kernel_polish_fallbacks_and_rejections(eps, rounds, cpu_build):
    """Loose IPM tolerances on qpth's generator: some elements fall back (a reduced system fails
    the pivot test) and some solved ones are rejected after every round; the kernel agrees with the
    torch polish on both, and a rejected element keeps its IPM point."""
    data = _qpth_problem(64, 20, 30, seed=1) + [None, None]
    res, base, pol, fb = _check_kernel_polish(data, eps, rounds, options=cpu_build)
    solved = base.status == int(Status.SOLVED)
    assert bool(fb.any()) and bool((solved & ~pol & ~fb).any())


@needs_cxx
def test_kernel_polish_fallback_in_a_later_round(cpu_build):
    """m = 2n, eps = 1e-2: some elements pass the first round's pivot test and fail a later
    round's (their flags: fallback and ok); the kernel agrees with the torch polish there too, and
    the layer gives the torch path's z and gradients."""
    data = _qpth_problem(64, 10, 20, seed=0) + [None, None]
    res, *_ = _check_kernel_polish(data, 1e-2, 3, options=cpu_build)
    assert bool((res.polish["fallback"] & res.polish["ok"]).any())
    w = torch.randn(64, 10, dtype=F64, generator=torch.Generator().manual_seed(4))
    out = {}
    for flag in (True, False):
        ins = [t.clone().requires_grad_() for t in data[:4]]
        z = solve_qp_batch(*ins, fused=flag, form="dual", eps=1e-2, on_failure="mask", options=cpu_build)[0]
        (w * z).sum().backward()
        out[flag] = [z.detach()] + [t.grad for t in ins]
    for a, b in zip(out[True], out[False]):
        assert _rel(a, b) <= 1e-8


def _polish_data(n, m, p, shared, B=16, device="cpu"):
    # (inequalities only: qpth's generator, degenerate enough for later rounds; else a known QP)
    if m and not p:
        data = _qpth_problem(B, n, m, seed=n + m) + [None, None]
    else:
        P, q, C, d, A, b, *_ = known_qp(B, n, m, p, seed=n + m + p)
        data = [P, q, C if m else None, d if m else None, A, b]
    if shared:
        data = [t[0] if t is not None and i in (0, 2, 4) else t for i, t in enumerate(data)]
    return [None if t is None else t.to(device) for t in data]


def _check_kernel_polish(data, eps, rounds=3, options=DEFAULT):
    kw = dict(fused=True, form="dual", eps=eps, options=options)
    base = ipm_solve(*data, **kw)
    res = ipm_solve(*data, polish_rounds=rounds, **kw)
    assert torch.equal(res.status, base.status)
    z, lam, mu, act, kkt, pol, fb = _torch_polish(*data, base, rounds=rounds)
    kp = res.polish
    assert torch.equal(kp["polished"], pol) and torch.equal(kp["fallback"], fb)
    assert torch.equal(kp["ok"], kkt.ok)
    if data[2] is not None:
        assert torch.equal(kp["active"], act)
    assert bool(pol.any())
    ok = pol & ~fb
    assert _rel(res.z[ok], z[ok]) <= 1e-10
    for a, t in ((res.mu, mu), (res.lam, lam)):
        if t is not None:
            assert _rel(a[ok], t[ok]) <= 1e-9
    keep = ~fb & (base.status == int(Status.SOLVED))
    assert _rel(kp["LS"][keep], torch.tril(kkt.LS.L)[keep]) <= 1e-10
    assert torch.equal(res.z[~pol], base.z[~pol])  # not accepted: the IPM point
    return res, base, pol, fb


@needs_cxx
def test_layer_takes_the_kernels_polish_and_falls_back_where_it_must(monkeypatch):
    """solve_qp_batch with the kernel polishes in the kernel (no torch polish runs) and its
    gradients match the torch loop's; where the kernel reports a fallback (eps = 1e-2 on this batch:
    an element's reduced system fails the pivot test) the torch polish runs instead."""
    import dqp.ipm_layer as il

    calls = []
    real = il.polish
    monkeypatch.setattr(il, "polish", lambda *a, **k: calls.append(1) or real(*a, **k))  # (a spy)
    Q, p, G, h = _qpth_problem(64, 20, 30, seed=1)
    w = torch.randn(64, 20, dtype=F64, generator=torch.Generator().manual_seed(2))
    for eps, torch_polish in ((None, False), (1e-2, True)):
        out = {}
        for flag in (True, False):
            calls.clear()
            ins = [t.clone().requires_grad_() for t in (Q, p, G, h)]
            diag = {}
            z = solve_qp_batch(*ins, fused=flag, form="dual", eps=eps, on_failure="mask", diagnostics=diag)[0]
            (w * z).sum().backward()
            out[flag] = [z.detach(), diag["verified"]] + [t.grad for t in ins]
            if flag:
                assert bool(calls) == torch_polish
        assert torch.equal(out[True][1], out[False][1])
        for a, b in zip(out[True][:1] + out[True][2:], out[False][:1] + out[False][2:]):
            assert _rel(a, b) <= 1e-8


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)  # (no compiler on the PATH)
    with pytest.raises(SolverNotAvailableError, match="needs a C\\+\\+ compiler"):
        fused._cpu_library(7, compiler="")


def test_compile_failure_is_a_clear_error(tmp_path):
    with pytest.raises(SolverNotAvailableError, match="compiling the kernel failed"):
        fused._cpu_library(7, compiler="false", cache_dir=tmp_path)  # a "compiler" that always fails


def test_tiles_and_shared_memory():
    assert fused._tiles(100, "cuda", 256) == (13, 4) and fused._tiles(100, "cuda", 512) == (7, 4)
    assert fused._tiles(128, "cuda", 256) == (16, 4) and fused._tiles(100, "cpu") == (100, 100)
    # (k = n = 100: S and M in one 100×101 array, the rest 20–40 KiB: with 256 threads two blocks
    # fit an H100/H200 SM (228 KiB), with 512 one; k = KMAX fits one block)
    assert 2 * fused.smem_bytes(100, 100, 0, threads=256) <= 228 * 1024
    assert fused.smem_bytes(100, 100, 0, threads=512) <= 227 * 1024
    assert fused.smem_bytes(fused.KMAX, fused.KMAX, 0, threads=512) <= 227 * 1024
    cpu = torch.device("cpu")
    assert not fused.fused_available(cpu, F64, 10, 0, 0)  # no constraints
    assert not fused.fused_available(cpu, F32, 10, 10, 0)  # float64 only
    assert not fused.fused_available(cpu, F64, 10, KernelOptions().cpu_kmax + 1, 0)  # too large for the C++ build


# ------------------------------------------------------------------------------------------------
# CUDA: the real kernel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,p,shared", CASES)
@pytest.mark.parametrize("_", [0], ids=["cuda"])
def test_cuda_kernel_matches_torch_loop(n, m, p, shared, _):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    P, q, C, d, A, b, z0, *_r = known_qp(6, n, m, p, seed=n + m + p, device="cuda")
    if shared:
        P, C, A = P[0], C[0], A[0]
    data = (P, q, C if m else None, d if m else None, A if p else None, b if p else None)
    fus, _l = _same_as_loop(data, tol=1e-7, device="cuda")
    assert bool((fus.status == int(Status.SOLVED)).all())
    if not shared:
        assert _rel(fus.z, z0) <= 1e-6


for _mark in cuda:
    test_cuda_kernel_matches_torch_loop = _mark(test_cuda_kernel_matches_torch_loop)


@pytest.mark.parametrize("eps", [1e-8, 1e-2])
@pytest.mark.parametrize("n,m,p,shared", CASES + [(100, 100, 0, False), (60, 120, 8, False)])
def test_cuda_kernel_polish_matches_the_torch_polish(n, m, p, shared, eps):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_kernel_polish(_polish_data(n, m, p, shared, B=32, device="cuda"), eps)


for _mark in cuda:
    test_cuda_kernel_polish_matches_the_torch_polish = _mark(test_cuda_kernel_polish_matches_the_torch_polish)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,m,p", [(100, 100, 0), (60, 120, 8)])
def test_cuda_kernel_large_tiles(n, m, p):
    """k = 100 and k = KMAX = 128: several 32-row blocks in the solves, multi-row tiles per thread."""
    P, q, C, d, A, b, z0, *_ = known_qp(8, n, m, p, seed=3, device="cuda")
    fus, _l = _same_as_loop((P, q, C, d, A if p else None, b if p else None), tol=1e-7, device="cuda")
    assert bool((fus.status == int(Status.SOLVED)).all()) and _rel(fus.z, z0) <= 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_uses_the_kernel_and_gradients_match():
    Q, p, G, h = _qpth_problem(64, 30, 30, seed=2, device="cuda")
    calls = []
    real = fused.solve_dual

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    w = torch.randn(64, 30, dtype=F64, device="cuda")
    out = {}
    # (cuda_build="wait": the first call of this size class waits for its build instead of taking
    # the torch loop while it compiles)
    wait = IPMOptions(kernel=KernelOptions(cuda_build="wait"))
    for flag in (None, False):
        ins = [t.clone().requires_grad_() for t in (Q, p, G, h)]
        fused.solve_dual = spy
        try:
            z = solve_qp_batch(*ins, fused=flag, options=wait)[0]
        finally:
            fused.solve_dual = real
        (w * z).sum().backward()
        out[flag] = [z.detach()] + [t.grad for t in ins]
    assert len(calls) == 1  # the automatic choice took the kernel
    for a, b in zip(out[None], out[False]):
        assert _rel(a, b) <= 1e-8


def test_float32_widening_for_the_kernel_is_cuda_only_and_optional():
    import dqp.ipm_layer as lay

    P, q, C, d, A, b, *_ = known_qp(3, 5, 6, 1, seed=0, dtype=F32)
    assert not lay._fused_widen(P, C, A, {})  # CPU: the kernel is not automatic
    assert not lay._fused_widen(P, C, A, {"fused": False})


@needs_cxx
def test_float32_data_widened_for_the_kernel():
    """Float32 data where the float64 kernel applies (required here on the CPU, fused=True, with the
    GPU's float32 path otherwise): solved, polished and differentiated in float64, returned in
    float32 — the same answer and gradients as float64 data, to float32 rounding."""
    import dqp.ipm_layer as lay

    opts = IPMOptions(widen_on_cpu=False)
    assert lay._fused_widen(*(t.float() for t in known_qp(2, 6, 8, 2)[0:5:2]), {"fused": True, "options": opts})
    P, q, C, d, A, b, *_ = known_qp(4, 6, 8, 2, seed=9)
    w = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = {}
    for dt in (F32, F64):
        ins = [t.to(dt).clone().requires_grad_() for t in (P, q, C, d, A, b)]
        z = solve_qp_batch(*ins, fused=True, options=opts)[0]
        (w.to(dt) * z).sum().backward()
        assert z.dtype == dt and all(t.grad.dtype == dt for t in ins)
        out[dt] = [z.detach().double()] + [t.grad.double() for t in ins]
    for a, b_ in zip(out[F32], out[F64]):
        assert _rel(a, b_) <= 1e-5


def test_threads_per_block_are_checked():
    for bad in (16, 100, 2048, "512"):
        with pytest.raises(SettingsError, match="multiple of 32"):
            fused._threads(bad)
        with pytest.raises(SettingsError, match="KernelOptions.threads"):
            KernelOptions(threads=bad)
    assert fused.smem_bytes(10, 10, 0) == fused.smem_bytes(10, 10, 0, threads=fused.DEFAULT_THREADS)
    assert fused.smem_bytes(10, 10, 0, threads=1024) > fused.smem_bytes(10, 10, 0, threads=64)


@needs_cxx
def test_refine_is_not_run_by_the_kernel():
    P, q, C, d, A, b, *_ = known_qp(3, 5, 6, 1, seed=0)
    with pytest.raises(SettingsError, match="refine=1"):
        ipm_solve(P, q, C, d, A, b, fused=True, refine=1)
    res = ipm_solve(P, q, C, d, A, b, refine=1)
    assert bool((res.status == 0).all()) and not res.fused  # auto: the torch loop


def test_cuda_build_failure_keeps_the_torch_loop(caplog):
    # (an NVRTC option no compiler knows: the build fails with or without a GPU here)
    opts = KernelOptions(nvrtc_options=("--dqp-no-such-option",), cuda_build="wait")
    with caplog.at_level("WARNING", logger="dqp.solvers.fused"):
        assert not fused._cuda_build_available(torch.device("cuda", 0), 50, opts)
        assert not fused._cuda_build_available(torch.device("cuda", 0), 50, opts)  # remembered
    assert caplog.text.count("could not be built") == 1


def test_kernel_options_cuda_build_is_checked():
    with pytest.raises(SettingsError, match="cuda_build must be 'background' or 'wait', got 'later'"):
        KernelOptions(cuda_build="later")


@needs_cxx
def test_cpu_pool_is_remade_after_fork(monkeypatch):
    """A pool inherited through fork has no threads: the batch split makes a new one (the pid it was
    made in differs), and the answers are those of one thread."""
    P, q, C, d, A, b, *_ = known_qp(6, 7, 9, 2, seed=4)
    two = IPMOptions(kernel=KernelOptions(cpu_threads=2))
    r1 = ipm_solve(P, q, C, d, A, b, fused=True, options=two)
    old = fused._pool
    monkeypatch.setattr(fused, "_pool_pid", -1)  # as if inherited from a parent
    r2 = ipm_solve(P, q, C, d, A, b, fused=True, options=two)
    assert fused._pool is not old and fused._pool_pid > 0
    r3 = ipm_solve(P, q, C, d, A, b, fused=True, options=IPMOptions(kernel=KernelOptions(cpu_threads=1)))
    for r in (r2, r3):
        assert torch.equal(r.status, r1.status) and torch.equal(r.z, r1.z)


@needs_cxx
def test_cpu_fused_under_a_forked_dataloader_worker():
    """The CPU build in a forked child process (DataLoader workers fork after the parent used it),
    with the batch split over the child's own pool."""
    import multiprocessing as mp

    P, q, C, d, A, b, *_ = known_qp(4, 6, 8, 1, seed=6)
    ipm_solve(
        P, q, C, d, A, b, fused=True, options=IPMOptions(kernel=KernelOptions(cpu_threads=2))
    )  # the parent's pool
    assert fused._pool is not None
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        st = pool.apply_async(_child_solve, ((P, q, C, d, A, b),)).get(timeout=60)
    assert st == [0, 0, 0, 0]


def _child_solve(data):
    # as a DataLoader worker: one torch (OpenMP) thread — OpenMP used before a fork hangs in the
    # child — while the fused build still splits the batch over 2 threads of its own pool
    torch.set_num_threads(1)
    return ipm_solve(*data, fused=True, options=IPMOptions(kernel=KernelOptions(cpu_threads=2))).status.tolist()


_threaded_libs: dict = {}


def _threaded_library(threads: int, k: int):
    """The kernel source built with -DDQP_CPU_THREADS (C++20, std::barrier): a block is ``threads``
    real threads (warps of 32, their shuffles and reductions emulated), the tile sizes of the CUDA
    build for k. Exports dqp_chol_upper_threads (factorization and solve) and dqp_ipm_dual_threads
    (the whole kernel, dqp_ipm_dual_cpu's arguments), and dqp_threads_schedule (how the threads
    run: 0 at once, ±1 one at a time; see the top of fused_ipm.cu). Built once per (threads, k)
    and process."""
    import ctypes
    import subprocess
    import tempfile
    from pathlib import Path

    if (threads, k) in _threaded_libs:
        return _threaded_libs[threads, k]
    rr, rc = fused._tiles(k, "cuda", threads)
    d = Path(tempfile.mkdtemp(prefix="dqp-threads-"))
    src = d / "k.cpp"
    src.write_text(fused._source())
    lib = d / "k.so"
    cxx = fused._compiler()
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-pthread",
        "-shared",
        "-fPIC",
        "-DDQP_CPU",
        "-DDQP_CPU_TILES",
        "-DDQP_CPU_THREADS",
        f"-DDQP_THREADS={threads}",
        f"-DDQP_RR={rr}",
        f"-DDQP_RC={rc}",
        str(src),
        "-o",
        str(lib),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and ("c++20" in res.stderr or "barrier" in res.stderr):
        pytest.skip(f"the C++ compiler has no C++20 (std::barrier): {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    so = ctypes.CDLL(str(lib))
    ptr, i32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    so.dqp_chol_upper_threads.restype = ctypes.c_int
    so.dqp_chol_upper_threads.argtypes = [ptr] * 3 + [i32] * 2 + [ptr] * 3
    # (dqp_ipm_dual_cpu's signature, as fused._cpu_library declares it)
    so.dqp_threads_schedule.restype = None
    so.dqp_threads_schedule.argtypes = [ctypes.c_int]
    so.dqp_ipm_dual_threads.restype = None
    so.dqp_ipm_dual_threads.argtypes = (
        [ptr, i32] * 8 + [ptr] * 3 + [ptr] * 5 + [ptr] * 6 + [ptr] * 4 + [i32] * 7 + [f64] * 7 + [i32] * 3
    )
    so.dqp_chol_block_threads.restype = None
    so.dqp_chol_block_threads.argtypes = [ptr, i32, i32, i32, ptr, ptr, i32, i32, i32]
    _threaded_libs[threads, k] = so
    return so


def _threaded_chol_library(threads: int, k: int):
    """dqp_chol_upper_threads of :func:`_threaded_library` and W's slack (DQP_PAD)."""
    rr, rc = fused._tiles(k, "cuda", threads)
    return _threaded_library(threads, k).dqp_chol_upper_threads, 32 * rc + (threads // 32) * rr


@needs_cxx
@pytest.mark.parametrize("threads,k", [(64, 13), (128, 40), (384, 100), (384, 97), (384, 128)])
def test_register_tile_factorization_with_several_warps(threads, k):
    """chol_upper and chol_solve, the CUDA code's factorization and solve, run by several warps of
    real threads (CPU, one block; warp 0's shuffles emulated): the phases of tile rows, the owners'
    publication and the barriers give S = Ũᵀ D⁻¹ Ũ (Ũ in W's upper triangle, invd = 1/Ũ_jj) for the
    plain, the masked (polish) and an indefinite S, with M's lower triangle untouched, and the
    solve's lanes and 32-row blocks give S⁻¹x — k a multiple of the warp count (and of 32) or not."""
    fn, pad = _threaded_chol_library(threads, k)
    g = torch.Generator().manual_seed(k)
    ld = k | 1
    for case in ("plain", "masked", "indefinite"):
        G = torch.randn(k, k, generator=g, dtype=F64)
        M = G @ G.T / k
        Sd = 0.1 + torch.rand(k, generator=g, dtype=F64)
        cm = (torch.rand(k, generator=g) < 0.6).to(F64) if case == "masked" else None
        if case == "indefinite":
            Sd = Sd - 2.0 * float(torch.linalg.eigvalsh(M).max())
        W = torch.full((k * ld + pad,), float("nan"), dtype=F64)
        Wm = W[: k * ld].view(k, ld)
        Wm[:, :k] = 1e300 * torch.randn(k, k, generator=g, dtype=F64)  # garbage above
        low = torch.tril(torch.ones(k, k, dtype=torch.bool), -1)
        Wm[:, :k][low] = M[low]
        invd = torch.zeros(k, dtype=F64)
        Mdg = torch.diagonal(M).clone()  # (held: ctypes gets its pointer)
        x = torch.randn(k, generator=g, dtype=F64)
        xs = x.clone()
        ok = fn(
            W.data_ptr(),
            Mdg.data_ptr(),
            Sd.data_ptr(),
            k,
            ld,
            invd.data_ptr(),
            None if cm is None else cm.data_ptr(),
            xs.data_ptr(),
        )
        assert torch.equal(Wm[:, :k][low], M[low])  # the lower triangle (M) untouched
        if case == "indefinite":
            assert ok == 0
            continue
        assert ok == 1
        S = (M * cm[:, None] * cm[None, :] if cm is not None else M) + torch.diag(Sd)
        U = torch.linalg.cholesky(S).T  # S = UᵀU, U upper
        Ut = torch.diagonal(U)[:, None] * U  # Ũ = D^{1/2} U
        got = torch.triu(Wm[:, :k])
        assert (got - Ut).abs().max() <= 1e-12 * Ut.abs().max()
        assert (invd - 1.0 / torch.diagonal(Ut)).abs().max() <= 1e-12 * (1.0 / torch.diagonal(Ut)).abs().max()
        ref = torch.linalg.solve(S, x)
        assert (xs - ref).abs().max() <= 1e-10 * ref.abs().max()


@needs_cxx
@pytest.mark.parametrize("threads,k,nb,schedule", [(384, 300, 128, "free"), (64, 90, 40, "up"), (64, 90, 40, "down")])
def test_blocked_diagonal_kernel_with_several_warps(threads, k, nb, schedule):
    """dqp_chol_block, the blocked factorization's diagonal step (register-tile factorization, the
    factor and its inverse formed in shared memory), run by several warps of real threads per block
    (CPU, -DDQP_CPU_THREADS, NaN-filled shared memory; serialized schedules make races show): the
    library's factor and info through blocked_cholesky, blocks of the built size and a smaller last one."""
    from dqp.linsolve.blocked import blocked_cholesky, block_starts

    lib = _threaded_library(threads, nb)
    g = torch.Generator().manual_seed(k)
    X = torch.randn(3, k, k, generator=g, dtype=F64)
    M = X @ X.mT / k + 0.1 * torch.eye(k, dtype=F64)
    M[2, k - 5, k - 5] = -1.0  # not positive definite from row k − 5
    diag = lambda W, j0, j1, info: fused.chol_block(
        W,
        j0,
        j1,
        info,
        tile=nb,  # noqa: E731
        cpu_function=lambda tile: lib.dqp_chol_block_threads,
        cpu_threads=2,
    )
    lib.dqp_threads_schedule(_SCHEDULES[schedule])
    try:
        L, dinv, info = blocked_cholesky(M, nb, diag_factor=diag)
    finally:
        lib.dqp_threads_schedule(0)
    L0, info0 = torch.linalg.cholesky_ex(M)
    assert info.tolist() == info0.tolist() == [0, 0, k - 4]
    assert _rel(L[:2], L0[:2]) <= 1e-13 and torch.equal(L.triu(1), torch.zeros_like(L))
    for (j0, j1), D in zip(block_starts(k, nb), dinv):
        eye = torch.eye(j1 - j0, dtype=F64).expand(2, -1, -1)
        assert (D[:2] @ L[:2, j0:j1, j0:j1] - eye).abs().max() <= 1e-12
        assert torch.equal(D.triu(1), torch.zeros_like(D)) and bool(torch.isfinite(D).all())


def _nearly_lp(B, n, seed=0):
    """Q = 1e-3 UᵀU/n + 1e-4 I (ill-conditioned, nearly an LP), m = 2n inequalities with many
    active at the solution: at a loose IPM tolerance the polish rejects some elements' points."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = 1e-3 * U.mT @ U / n + 1e-4 * torch.eye(n, dtype=F64)
    G = torch.randn(B, 2 * n, n, generator=g, dtype=F64)
    h = (G @ torch.randn(B, n, 1, generator=g, dtype=F64)).squeeze(-1) + torch.rand(B, 2 * n, generator=g, dtype=F64)
    return Q, torch.randn(B, n, generator=g, dtype=F64), G, h


@needs_cxx
def test_two_stage_polish_matches_one_stage(cpu_build):
    """ipm_solve(polish_eps=1e-5, eps=1e-8): the elements whose polish rejects the 1e-5 point go on
    to 1e-8 along the one-stage iterates (same iteration counts) and are polished again; the
    result — statuses, polished elements, z, active sets, the backward's factor — is that of one
    stage at 1e-8, in fewer iterations."""
    data = _nearly_lp(64, 50)
    kw = dict(fused=True, form="dual", polish_rounds=3, options=cpu_build)
    one = ipm_solve(*data, eps=1e-8, **kw)
    loose = ipm_solve(*data, eps=1e-5, **kw)
    two = ipm_solve(*data, eps=1e-8, polish_eps=1e-5, **kw)
    rej = (loose.status == int(Status.SOLVED)) & ~loose.polish["polished"]
    assert 0 < int(rej.sum()) < 64  # the second stage ran for some elements
    assert bool(one.polish["polished"].all())
    assert torch.equal(two.status, one.status) and torch.equal(two.polish["polished"], one.polish["polished"])
    assert torch.equal(two.polish["active"], one.polish["active"])
    assert (two.z - one.z).abs().max() <= 1e-13 * one.z.abs().max()
    assert (two.polish["LS"] - one.polish["LS"]).abs().max() <= 1e-13 * one.polish["LS"].abs().max()
    assert torch.equal(two.iterations[rej], one.iterations[rej])
    assert bool((two.iterations <= one.iterations).all()) and int(two.iterations.sum()) < int(one.iterations.sum())
    # without the polish there is no second stage: polish_eps is ignored
    plain = ipm_solve(*data, eps=1e-8, fused=True, form="dual", polish_eps=1e-5, options=cpu_build)
    assert torch.equal(
        plain.iterations, ipm_solve(*data, eps=1e-8, fused=True, form="dual", options=cpu_build).iterations
    )


@needs_cxx
def test_layer_two_stage_gradients_are_one_stage_gradients():
    """The layer's two stages (IPMOptions.polish_stage_eps) change iteration counts, not answers: z
    and the gradients equal those of one stage on a batch where the loose point is rejected for some."""
    data = _nearly_lp(32, 40, seed=3)
    loose = ipm_solve(*data, eps=1e-5, fused=True, form="dual", polish_rounds=3)
    assert int((~loose.polish["polished"]).sum()) > 0  # (the second stage has work here)
    w = torch.randn(32, 40, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = {}
    for stage_eps in (None, 1e-5):
        ins = [t.clone().requires_grad_() for t in data]
        diag = {}
        z = solve_qp_batch(
            *ins, fused=True, form="dual", diagnostics=diag, options=IPMOptions(polish_stage_eps=stage_eps)
        )[0]
        (z * w).sum().backward()
        out[stage_eps] = (z.detach(), [t.grad for t in ins], diag["iterations"], diag["verified"])
    (z1, g1, it1, v1), (z2, g2, it2, v2) = out[None], out[1e-5]
    assert bool(v1.all()) and torch.equal(v1, v2)
    assert (z2 - z1).abs().max() <= 1e-13 * z1.abs().max()
    for a, b in zip(g2, g1):
        assert (a - b).abs().max() <= 1e-11 * b.abs().max()
    assert int(it2.sum()) < int(it1.sum())


def test_polish_eps_is_checked():
    P, q, C, d, *_ = known_qp(2, 4, 5, 0, seed=0)
    for bad in (0.0, (1e-5, 1e-3), (1e-3, 1e-4, 1e-5), (), (1e-3, -1.0)):
        with pytest.raises(SettingsError, match="polish_eps must be a positive tolerance"):
            ipm_solve(P, q, C, d, polish_eps=bad)


@needs_cxx
def test_three_stage_polish_matches_one_stage(cpu_build):
    """ipm_solve(polish_eps=(1e-3, 1e-5), eps=1e-8): stops and polishes at 1e-3, then where rejected
    at 1e-5, then at 1e-8, along the one-stage iterates; the result is that of one stage, in fewer
    iterations than one stage, and the elements that reach the last stage take its iterations."""
    data = _nearly_lp(64, 50)
    kw = dict(fused=True, form="dual", polish_rounds=3, options=cpu_build)
    one = ipm_solve(*data, eps=1e-8, **kw)
    three = ipm_solve(*data, eps=1e-8, polish_eps=(1e-3, 1e-5), **kw)
    mid = ipm_solve(*data, eps=1e-5, polish_eps=1e-3, **kw)
    rej = (mid.status == int(Status.SOLVED)) & ~mid.polish["polished"]  # rejected at 1e-3 and 1e-5
    rej1 = ~ipm_solve(*data, eps=1e-3, **kw).polish["polished"]
    assert int(rej1.sum()) > int(rej.sum()) > 0  # all three stages ran
    assert torch.equal(three.status, one.status) and torch.equal(three.polish["polished"], one.polish["polished"])
    assert torch.equal(three.polish["active"], one.polish["active"])
    assert (three.z - one.z).abs().max() <= 1e-13 * one.z.abs().max()
    assert torch.equal(three.iterations[rej], one.iterations[rej])
    assert torch.equal(three.iterations[rej1 & ~rej], mid.iterations[rej1 & ~rej])
    assert int(three.iterations.sum()) < int(one.iterations.sum())


@needs_cxx
@pytest.mark.parametrize("n,m,p,shared", CASES)
def test_kernel_starting_point_is_the_setups(n, m, p, shared, cpu_build, monkeypatch):
    """The kernel's own starting point (solve_dual(start=True), what ipm_solve runs) is _init's (the
    W = I system's z, λ and the shifted s, μ): one step from either gives the same iterate."""
    from dqp.linsolve.cholesky import cholesky
    from dqp.solvers.ipm.problem import _prepare
    from dqp.solvers.ipm.start import _init

    P, q, C, d, A, b, *_ = known_qp(6, n, m, p, seed=n + m + p)
    if shared:
        P, C, A = P[0], C[0], A[0]
    data = (P, q, C if m else None, d if m else None, A if p else None, b if p else None)
    seen = {}
    real = fused.solve_dual

    def spy(*a, **k):
        seen.update(a=a, k=k)
        return real(*a, **k)

    monkeypatch.setattr(fused, "solve_dual", spy)  # (a spy: the arguments the kernel is given)
    ipm_solve(*data, fused=True, form="dual", options=cpu_build)
    Pb, qb, Cb, db, Ab, bb, B, nn, mm, pp = _prepare(*data)
    torch_state = _init(Pb, qb, Cb, db, Ab, bb, B, nn, mm, pp, "dual", cholesky(Pb)[0])[-1]
    kw = dict(seen["k"], max_iter=1, polish_rounds=0)
    args = list(seen["a"])
    own = real(*args, **dict(kw, start=True))
    args[12] = {k: v.clone() for k, v in torch_state.items()}
    given = real(*args, **dict(kw, start=False))
    assert torch.equal(own["iters"], given["iters"]) and bool((own["iters"] == 1).all())
    for key in ("z", "s", "mu", "lam"):
        if given[key].numel():
            assert (own[key] - given[key]).abs().max() <= 1e-9 * (1 + given[key].abs().max()), key
    # and the state ipm_solve hands the kernel holds no starting point of its own (placeholders)
    assert bool((seen["a"][12]["z"] == 0).all())


# (threads, n, m, p, B, options, schedule): k = 13, 40, 38 — not multiples of 32, 13 and 38 not of
# the warp count either; the IPM alone, the polish, and two stages (polish_eps = 0.1: on these
# batches the loose point of some elements is rejected or fails the pivot test, and those go on to
# eps and polish again; in the end every element is polished). Schedules
# (dqp_threads_schedule): "free", the OS runs the threads at once; "up"/"down", one thread at a
# time, lowest/highest index first (deterministic: a read that misses a barrier reads a stale value
# in one of the two orders).
THREADED_CASES = [
    (64, 8, 10, 3, 3, dict(), "free"),
    (64, 8, 10, 3, 6, dict(polish_rounds=3, polish_eps=1e-1), "free"),
    (64, 8, 10, 3, 6, dict(polish_rounds=3, polish_eps=1e-1), "up"),
    (64, 8, 10, 3, 6, dict(polish_rounds=3, polish_eps=1e-1), "down"),
    (128, 12, 40, 0, 3, dict(polish_rounds=3), "free"),
    (128, 12, 40, 0, 2, dict(polish_rounds=3), "down"),
    (128, 20, 33, 5, 2, dict(polish_rounds=0), "free"),
    (128, 20, 33, 5, 4, dict(polish_rounds=3, polish_eps=1e-1), "free"),
    (384, 60, 60, 8, 2, dict(polish_rounds=3, polish_eps=1e-1), "free"),  # the CUDA build's block size
    (64, 8, 10, 3, 6, dict(polish_rounds=3, polish_eps=(3e-1, 1e-1)), "up"),  # three stages
]
_SCHEDULES = {"free": 0, "up": 1, "down": -1}


def _threaded_kernel_vs_one_thread(threads, n, m, p, B, opts, schedule):
    """ipm_solve with the threaded build's whole kernel (dqp_ipm_dual_threads in place of the C++
    build's dqp_ipm_dual_cpu, KernelOptions.cpu_function) against the one-thread tile build; checks
    everything but the polish's active sets, returns both results."""
    P, q, C, d, A, b, *_ = known_qp(B, n, m, p, seed=n + m + p)
    data = (P, q, C if m else None, d if m else None, A if p else None, b if p else None)
    kw = dict(fused=True, form="dual", **opts)
    tiles = IPMOptions(kernel=KernelOptions(cpu_tiles=True))
    ref = ipm_solve(*data, options=tiles, **kw)
    lib = _threaded_library(threads, m + p)
    calls = []

    def run(*args):
        calls.append((args[-5], args[-3], args[-2], args[-1]))  # (eps2, start, b0, b1)
        lib.dqp_ipm_dual_threads(*args)

    threaded = IPMOptions(kernel=KernelOptions(cpu_tiles=True, cpu_function=lambda k: run, cpu_threads=2))
    lib.dqp_threads_schedule(_SCHEDULES[schedule])
    try:
        got = ipm_solve(*data, options=threaded, **kw)
    finally:
        lib.dqp_threads_schedule(0)
    # start=True; the batch in chunks taken in turn by the two threads, every element once
    assert all(c[1] == 1 for c in calls) and sorted(r for c in calls for r in range(c[2], c[3])) == list(range(B))
    assert all((c[0] > 0) == ("polish_eps" in opts) for c in calls)  # eps2: two stages
    assert torch.equal(got.status, ref.status) and torch.equal(got.iterations, ref.iterations)
    assert bool((ref.status == int(Status.SOLVED)).all())
    for key in ("z", "s", "mu", "lam"):
        a, r = getattr(got, key), getattr(ref, key)
        if r is not None and r.numel():
            assert _rel(a, r) <= 1e-9, key
    if opts.get("polish_rounds"):
        for key in ("polished", "fallback", "ok"):
            assert torch.equal(got.polish[key], ref.polish[key]), key
        assert _rel(got.polish["LS"], ref.polish["LS"]) <= 1e-9
    return got, ref, data, dict(kw, options=tiles)


@needs_cxx
@pytest.mark.parametrize("threads,n,m,p,B,opts,schedule", THREADED_CASES)
def test_whole_kernel_with_several_warps(threads, n, m, p, B, opts, schedule):
    """The whole kernel (dqp_ipm_dual) run by several warps of real threads per block (CPU,
    -DDQP_CPU_THREADS: the block barrier, warp_sum/warp_max butterflies and shuffles of every warp
    emulated, the CUDA launch's shared memory, NaN-filled): through ipm_solve's own call of
    solve_dual (its start=True, eps2 for two stages; the batch split over the pool's threads, so
    blocks of two calls run at once), the same statuses, iteration counts, iterates and polish
    (flags, active sets, factor) as the one-thread tile build, up to summation order."""
    got, ref, data, kw = _threaded_kernel_vs_one_thread(threads, n, m, p, B, opts, schedule)
    if opts.get("polish_rounds"):
        assert torch.equal(got.polish["active"], ref.polish["active"])
        # (every element polished: its active set is written again on acceptance, after barriers —
        # see test_threaded_kernel_active_set_of_a_rejected_polish for the one written before)
        assert bool(ref.polish["polished"].all())
        if "polish_eps" in opts:  # (the cases exercise both stages)
            pe = opts["polish_eps"]
            loose = ipm_solve(*data, **dict(kw, eps=pe[-1] if isinstance(pe, tuple) else pe, polish_eps=None))
            again = ~loose.polish["polished"]
            assert bool(again.any())
            assert bool((got.iterations[again] > loose.iterations[again]).all())


@needs_cxx
def test_threaded_kernel_active_set_of_a_rejected_polish():
    """eps = 0.1, three rounds, p > 0: some elements' polish is rejected in every round and the
    kernel's active set for them is the classification at the IPM point (as the torch polish's,
    test_kernel_polish_matches_the_torch_polish). Run one thread at a time, lowest index first: the
    kernel's act_out once read the mask cm[p+i] another thread writes, before the barrier (a race
    on CUDA for p > 0; now act_out comes from s and μ)."""
    got, ref, *_ = _threaded_kernel_vs_one_thread(64, 8, 10, 3, 6, dict(polish_rounds=3, eps=1e-1), "up")
    assert not bool(ref.polish["polished"].all())
    assert torch.equal(got.polish["active"], ref.polish["active"])


@needs_cxx
@pytest.mark.parametrize("threads,k,schedule", [(384, 100, "free"), (64, 45, "up"), (64, 45, "down"), (128, 1, "free")])
def test_chol_solve_kernel_with_several_warps(threads, k, schedule):
    """dqp_chol_solve_vec, the batched (L Lᵀ)⁻¹ r of one launch, run by several warps of real threads
    per block (CPU, NaN-filled shared memory, serialized schedules): the library's solve, with
    garbage above L's diagonal (not read), row- and column-major factors, a shared factor (batch
    stride 0); and the C++ build."""
    lib = _threaded_library(threads, k)
    lib.dqp_chol_solve_vec_threads.restype = None
    lib.dqp_chol_solve_vec_threads.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
    ]
    g = torch.Generator().manual_seed(k)
    X = torch.randn(3, k, k, generator=g, dtype=F64)
    L0 = torch.linalg.cholesky(X @ X.mT / k + 0.1 * torch.eye(k, dtype=F64))
    L = (L0 + torch.triu(1e300 * torch.randn(3, k, k, generator=g, dtype=F64), 1)).contiguous()
    Lc = L.mT.contiguous().mT  # column-major
    r = torch.randn(3, k, generator=g, dtype=F64)
    ref = torch.cholesky_solve(r.unsqueeze(-1), L0).squeeze(-1)
    ref_shared = torch.cholesky_solve(r.unsqueeze(-1), L0[1]).squeeze(-1)
    for override in (lambda kk: lib.dqp_chol_solve_vec_threads, None):
        lib.dqp_threads_schedule(_SCHEDULES[schedule])
        try:
            x = fused.chol_solve_vec(L, r, cpu_function=override)
            xc = fused.chol_solve_vec(Lc, r, cpu_function=override)
            xs = fused.chol_solve_vec(L[1:2].expand(3, k, k), r, cpu_function=override)
        finally:
            lib.dqp_threads_schedule(0)
        assert _rel(x, ref) <= 1e-12 and _rel(xc, ref) <= 1e-12 and _rel(xs, ref_shared) <= 1e-12


def test_chol_solve_kernel_rejects_bad_arguments():
    L = torch.eye(4, dtype=F64).expand(2, 4, 4).contiguous()
    r = torch.ones(2, 4, dtype=F64)
    with pytest.raises(SettingsError, match="float64"):
        fused.chol_solve_vec(L.float(), r.float())
    with pytest.raises(SettingsError, match="strides"):
        fused.chol_solve_vec(torch.eye(8, dtype=F64).expand(2, 8, 8)[:, ::2, ::2], r)
    with pytest.raises(SettingsError, match="r must be"):
        fused.chol_solve_vec(L, r[:, :3])
    with pytest.raises(SettingsError, match="no build"):
        fused.chol_solve_vec(L.to("meta"), r.to("meta"))


def test_solve_kernel_policy():
    L = torch.eye(4, dtype=F64).expand(2, 4, 4).contiguous()
    r = torch.ones(2, 4, dtype=F64)
    assert not CholeskyFactor(L)._solve_by_kernel(r)  # CUDA only
    with pytest.raises(SettingsError, match="solve_kernel"):
        CholeskyOptions(solve_kernel="kernel")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 33, 100, 128])
def test_cuda_chol_solve_kernel_matches_library(k):
    """On CUDA: dqp_chol_solve_vec against the library's solve (a batch, a shared factor), the
    routing of CholeskyFactor.solve, and the IPM layer's gradients with and without it."""
    g = torch.Generator().manual_seed(k)
    X = torch.randn(5, k, k, generator=g, dtype=F64)
    L = torch.linalg.cholesky(X @ X.mT / k + 0.1 * torch.eye(k, dtype=F64)).cuda().contiguous()
    r = torch.randn(5, k, generator=g, dtype=F64).cuda()
    ref = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    assert _rel(fused.chol_solve_vec(L, r), ref) <= 1e-12
    assert _rel(fused.chol_solve_vec(L.mT.contiguous().mT, r), ref) <= 1e-12  # column-major
    Lx, _ = torch.linalg.cholesky_ex(L @ L.mT)  # the library's layout
    fx, fl = CholeskyFactor(Lx), CholeskyFactor(L)
    assert fx._solve_by_kernel(r) and _rel(fx.solve(r), ref) <= 1e-10
    assert fl._solve_by_kernel(r) and _rel(fl.solve(r), ref) <= 1e-12
    xs = fused.chol_solve_vec(L[2:3].expand(5, k, k), r)
    assert _rel(xs, torch.cholesky_solve(r.unsqueeze(-1), L[2]).squeeze(-1)) <= 1e-12
    with pytest.raises(SettingsError, match="at most"):
        fused.chol_solve_vec(
            torch.eye(fused.KMAX + 1, dtype=F64, device="cuda").expand(1, -1, -1).contiguous(),
            torch.ones(1, fused.KMAX + 1, dtype=F64, device="cuda"),
        )
    if k == 100:
        from test_blocked import LOOP, _layer_same_across

        _layer_same_across("cuda", LOOP, "solve_kernel", modes=("never", "auto"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("widen", [None, False])
def test_cuda_float32_beyond_the_kernel_size_is_solved_in_float64(widen):
    """k = 150 > KMAX: float32 data on a full-rate-float64 GPU take the float64 torch loop (default),
    or the float32 IPM with a float64 polish (widen_on_cuda=False); both answers and gradients are
    float32 tensors that agree with the float64 solve."""
    P, q, C, d, A, b, *_ = known_qp(4, 30, 150, 0, seed=11, device="cuda")
    opts = IPMOptions(widen_on_cuda=widen)
    ref = solve_qp_batch(P, q, C, d, options=opts)[0]
    args = [t.float().requires_grad_() for t in (P, q, C, d)]
    z = solve_qp_batch(*args, options=opts)[0]
    z.sum().backward()
    assert z.dtype == torch.float32 and args[1].grad.dtype == torch.float32
    assert _rel(z.double(), ref) <= 1e-5
