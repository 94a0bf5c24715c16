"""libdqp drop-in compatibility: dqp called the way the dQP repository's scripts call libdqp.

Column vectors, ``Q=/G=/h=`` keywords, settings as a mapping (and plain dicts), the
``empty_batch=True`` default, libdqp's layer attributes, the compatibility modules
(``sparse_helper``, ``lin_solvers``, ``qp_diagnostic``, ``benchmark``), ``dQP.call_single_qpsolvers``
and the qpth gaps (``SpQPFunction``, masked failures, the non-SPD error as a ``RuntimeError``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import dqp
from dqp import dQP
from conftest import random_qp


def _leaves(*arrays):
    return [None if a is None else a.clone().requires_grad_() for a in arrays]


@pytest.fixture
def qp():
    P, q, C, d, A, b, *_ = random_qp(6, 5, 2, seed=3)
    return P, q, C, d, A, b


# ---------------------------------------------------------------------------------------------
# arguments: column vectors, keywords, shape errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [None, 3])
def test_column_vectors_give_identical_results(batch):
    P, q, C, d, A, b, *_ = random_qp(6, 5, 2, seed=1, batch=batch)
    layer = dQP.dQP_layer(qp_solver="clarabel")
    flat = _leaves(P, q, C, d, A, b)
    z1, lam1, mu1, _, _ = layer(*flat)
    (z1.sum() + mu1.sum()).backward()
    col = _leaves(P, q.unsqueeze(-1), C, d.unsqueeze(-1), A, b.unsqueeze(-1))
    z2, lam2, mu2, _, _ = layer(*col)
    (z2.sum() + mu2.sum()).backward()
    assert torch.equal(z1, z2) and torch.equal(lam1, lam2) and torch.equal(mu1, mu2)
    assert z2.shape == ((1, 6) if batch is None else (batch, 6))  # outputs keep dqp's shapes
    for a, c in zip(flat, col):
        assert c.grad.shape == c.shape
        assert torch.equal(a.grad, c.grad.reshape(a.shape))
    mixed = layer(P, q.unsqueeze(-1), C, d.unsqueeze(-1), A, b)  # libdqp's unit test mixes forms
    assert torch.equal(mixed.z, z1.detach())


def test_libdqp_keywords(qp):
    P, q, C, d, A, b = qp
    layer = dQP.dQP_layer(qp_solver="clarabel")
    ref = layer(P, q, C, d, A, b)
    out = layer(Q=P, q=q, G=C, h=d, A=A, b=b)
    assert torch.equal(ref.z, out.z) and torch.equal(ref.mu, out.mu)
    out = layer(P, q, G=C, h=d)  # mixing positional dqp names with libdqp keywords for others
    assert out.mu.shape == (1, 5)


@pytest.mark.parametrize("kw", [dict(Q=1), dict(G=1), dict(h=1)])
def test_argument_given_twice_raises(qp, kw):
    P, q, C, d, A, b = qp
    alias = next(iter(kw))
    name = {"Q": "P", "G": "C", "h": "d"}[alias]
    with pytest.raises(dqp.InputError, match=f"{name} was given twice, as {name} and as {alias}"):
        dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d, A, b, **{alias: {"Q": P, "G": C, "h": d}[alias]})


@pytest.mark.parametrize(
    "over, words",
    [
        (dict(q=torch.zeros(6, 2, dtype=torch.float64)), "Argument q has shape (6, 2) but P is 6 x 6"),
        (dict(d=torch.zeros(4, 1, dtype=torch.float64)), "Argument d has shape (4, 1) but C has 5 rows"),
        (dict(b=torch.zeros(2, 3, 1, dtype=torch.float64)), "Argument b has shape (2, 3, 1) but A has 2 rows"),
        (dict(C=torch.zeros(5, 4, dtype=torch.float64)), "Argument C has 4 columns but P, q, A give n = 6"),
        (dict(P=torch.eye(5, dtype=torch.float64)), "Argument P has shape (5, 5) but q, C, A give n = 6"),
        (dict(P=torch.zeros(6, 5, dtype=torch.float64)), "Argument P must be square, got 6 x 5"),
    ],
)
def test_shape_errors_name_the_wrong_argument(qp, over, words):
    args = dict(zip("PqCdAb", qp))
    args.update(over)
    with pytest.raises(dqp.ShapeError) as e:
        dQP.dQP_layer(qp_solver="clarabel")(**args)
    assert words in str(e.value)


def test_sparse_first_matrix_must_be_a_tensor(qp):
    with pytest.raises(dqp.LayoutError, match="must be a torch sparse tensor, got str"):
        dQP.dQP_layer(qp_solver="clarabel", solve_type="sparse")(["x"], qp[1])


def test_column_q_with_large_problem_is_not_blamed_on_p():
    # the report: q of shape (50, 1) was rejected with "Argument P has shape (50, 50)"
    P, q, C, d, *_ = random_qp(50, 10, 0, seed=0)
    out = dQP.dQP_layer(qp_solver="clarabel")(P, q.unsqueeze(-1), C, d.unsqueeze(-1))
    assert out.z.shape == (1, 50)


# ---------------------------------------------------------------------------------------------
# settings: mapping, dicts, defaults
# ---------------------------------------------------------------------------------------------
def test_settings_read_and_write_like_a_dict():
    s = dQP.build_settings(qp_solver="clarabel")
    assert s["qp_solver"] == "clarabel" and s["empty_batch"] is True
    s["eps_abs"] = 1e-7
    assert s["eps_abs"] == s.eps_abs == 1e-7
    assert dict(s)["eps_abs"] == 1e-7 and set(s.keys()) == set(dqp.settings.OPTIONS) and len(s) == len(s.keys())
    assert "eps_active" in s and s.get("nope", 5) == 5
    assert "clarabel" in s["available_qp_solvers"]
    layer = dQP.dQP_layer(settings=s)
    s["eps_abs"] = 1e-5  # a built layer keeps its own copy, as libdqp's layer copies the dict
    assert layer.settings.eps_abs == 1e-7


@pytest.mark.parametrize(
    "key, value, exc, words",
    [
        ("eps_abs", 2.0, dqp.SettingsError, "(0, 1)"),
        ("qp_solver", "no_such_solver", dqp.SettingsError, "no_such_solver"),
        ("qp_solver", "mosek", dqp.SolverNotAvailableError, "pip install"),
        ("eps_abss", 1e-3, dqp.SettingsError, "did you mean 'eps_abs'"),
        ("available_qp_solvers", [], dqp.SettingsError, "read-only"),
    ],
)
def test_settings_item_assignment_validates(key, value, exc, words):
    if key == "qp_solver" and value == "mosek":
        from dqp.solvers import available_solvers

        if "mosek" in available_solvers():
            pytest.skip("mosek is installed here")
    s = dQP.build_settings(qp_solver="clarabel")
    before = dict(s)
    with pytest.raises(exc, match=None) as e:
        s[key] = value
    assert words in str(e.value)
    assert dict(s) == before  # unchanged after a failed assignment


def test_settings_unknown_key_and_delete():
    s = dQP.build_settings()
    with pytest.raises(KeyError) as e:
        s["eps_abss"]
    assert isinstance(e.value, dqp.SettingsError) and "did you mean 'eps_abs'" in str(e.value)
    with pytest.raises(dqp.SettingsError, match="cannot be deleted"):
        del s["eps_abs"]
    with pytest.raises(dqp.SettingsError, match="Unknown option"):
        del s["nope"]
    with pytest.raises(Exception):  # attribute assignment stays an error (frozen)
        s.eps_abs = 1e-3


def test_layer_accepts_a_plain_dict(qp):
    P, q, C, d, A, b = qp
    ref = dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d, A, b)
    settings = dict(dQP.build_settings(qp_solver="clarabel"))
    settings["available_qp_solvers"] = ["clarabel"]  # libdqp's informational key is ignored
    out = dQP.dQP_layer(settings=settings)(P, q, C, d, A, b)
    assert torch.equal(ref.z, out.z)
    assert dQP.dQP_layer({"qp_solver": "clarabel", "eps_abs": 1e-7}).settings.eps_abs == 1e-7  # positional
    with pytest.raises(dqp.SettingsError, match="did you mean 'eps_abs'"):
        dQP.dQP_layer(settings={"eps_abss": 1e-7})
    with pytest.raises(dqp.SettingsError, match="must be strings"):
        dQP.dQP_layer(settings={1: 2})


def test_empty_batch_default_and_opt_out(qp):
    P, q, C, d, A, b = qp
    assert dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d, A, b).z.shape == (1, 6)
    out = dQP.dQP_layer(qp_solver="clarabel", empty_batch=False)(P, q, C, d, A, b)
    assert out.z.shape == (6,) and out.lam.shape == (2,) and out.mu.shape == (5,)


# ---------------------------------------------------------------------------------------------
# layer attributes
# ---------------------------------------------------------------------------------------------
def test_libdqp_attributes_unbatched(qp):
    P, q, C, d, A, b = qp
    layer = dQP.dQP_layer(qp_solver="clarabel", lin_solver="qdldl")
    assert layer.nActive is None and layer.x_star_np is None and layer.KKT_A_np is None
    assert layer.qp_solver == "clarabel"
    out = layer(P, q, C, d, A, b)
    z, lam, mu, _, _ = out
    assert torch.is_tensor(out.active) and out.active.shape == (1, 5)  # dqp's per-call mask, shaped like z
    assert np.array_equal(out.active[0].numpy(), layer.active)
    assert (layer.dim, layer.nIneq, layer.nEq, layer.nBatch) == (6, 5, 2, 1)
    assert isinstance(layer.active, np.ndarray) and layer.active.shape == (5,)
    assert layer.nActive == int(np.sum(layer.active)) == int((mu > 0).sum())
    assert np.array_equal(np.argwhere(layer.active).ravel(), np.flatnonzero(layer.active))
    assert layer.qp_solver == "clarabel" and layer.lin_solver == "qdldl"
    assert np.array_equal(layer.x_star_np, z[0].detach().numpy())
    assert np.array_equal(layer.mu_star_np, lam[0].detach().numpy())
    assert np.array_equal(layer.nu_star_with_inactive_np, mu[0].detach().numpy())
    assert np.array_equal(layer.nu_star_np, mu[0].detach().numpy()[layer.active])
    K = layer.KKT_A_np
    k = 6 + 2 + layer.nActive
    assert K.shape == (k, k) and np.allclose(K, K.T)
    x = np.linalg.solve(K, np.concatenate([-q.numpy(), b.numpy(), d.numpy()[layer.active]]))
    assert np.allclose(x[:6], layer.x_star_np, atol=1e-7)  # the reduced KKT system reproduces z


def test_libdqp_attributes_batched_sparse():
    P, q, C, d, A, b, *_ = random_qp(5, 4, 1, seed=2, batch=2)
    layer = dQP.dQP_layer(qp_solver="clarabel", solve_type="sparse")
    z, _, mu, _, _ = layer(
        [M.to_sparse_csc() for M in P], q, [M.to_sparse_csc() for M in C], d, [M.to_sparse_csc() for M in A], b
    )
    assert layer.nBatch == 2 and layer.active.shape == (2, 4) and layer.nActive.shape == (2,)
    assert layer.x_star_np.shape == (2, 5) and len(layer.nu_star_np) == 2
    Ks = layer.KKT_A_np
    assert len(Ks) == 2 and all(sp.issparse(K) and K.shape[0] == 5 + 1 + n for K, n in zip(Ks, layer.nActive))


@pytest.mark.parametrize(
    "name",
    [
        "nActive",
        "nBatch",
        "dim",
        "nIneq",
        "nEq",
        "qp_solver",
        "lin_solver",
        "x_star_np",
        "mu_star_np",
        "nu_star_np",
        "KKT_A_np",
    ],
)
def test_libdqp_attributes_are_read_only(name):
    layer = dQP.dQP_layer()
    with pytest.raises(AttributeError):
        setattr(layer, name, 1)


def test_inplace_edit_of_outputs_keeps_backward(qp):
    # libdqp's benchmark script does x.unsqueeze_(-1) before x.backward(...)
    P, q, C, d, A, b = _leaves(*qp)
    x, lam, mu, _, _ = dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d, A, b)
    x.unsqueeze_(-1)
    mu.unsqueeze_(-1)
    x.backward(torch.ones(x.shape))
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------
# compatibility modules
# ---------------------------------------------------------------------------------------------
def _save_libdqp_npz(path, with_eq=True):
    P, q, C, d, A, b, *_ = random_qp(6, 5, 2, seed=4)
    data = dict(
        Q=sp.csc_matrix(P.numpy()),
        q=q.numpy(),
        G=sp.csc_matrix(C.numpy()),
        h=d.numpy(),
        A=sp.csc_matrix(A.numpy()) if with_eq else None,
        b=b.numpy() if with_eq else None,
    )
    np.savez(path, **data)  # pickled SciPy matrices, as the dQP repository stores them
    return P, q, C, d, A, b


@pytest.mark.parametrize("with_eq", [True, False])
def test_initialize_torch_from_npz(tmp_path, with_eq):
    from dqp.sparse_helper import initialize_torch_from_npz

    P, q, C, d, A, b = _save_libdqp_npz(tmp_path / "prob.npz", with_eq)
    Qt, qt, Gt, ht, At, bt = initialize_torch_from_npz(tmp_path / "prob.npz")
    assert Qt.layout == torch.sparse_csc and torch.allclose(Qt.to_dense(), P)
    assert (At is None and bt is None) if not with_eq else torch.allclose(At.to_dense(), A)
    layer = dQP.dQP_layer(qp_solver="clarabel", solve_type="sparse")
    z, *_ = layer(Qt, qt, Gt, ht, At, bt)
    z.sum().backward()
    assert ht.grad.shape == (5,) and qt.grad.shape == (6,)
    ref = dQP.dQP_layer(qp_solver="clarabel")(P, q, C, d, *((A, b) if with_eq else (None, None)))
    assert torch.allclose(z, ref.z, atol=1e-8)


def test_initialize_torch_from_npz_missing_file(tmp_path):
    from dqp.sparse_helper import initialize_torch_from_npz

    with pytest.raises(dqp.InputError, match="does not exist"):
        initialize_torch_from_npz(tmp_path / "missing.npz")


def test_libdqp_top_level_names():
    from dqp import get_sparse_solvers, initialize_torch_from_npz  # libdqp's package exports them
    from dqp.sparse_helper import initialize_torch_from_npz as f

    assert initialize_torch_from_npz is f and "qdldl" in get_sparse_solvers()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dqp.nope


def test_csc_conversions():
    from dqp.sparse_helper import csc_scipy_to_torch, csc_torch_to_scipy

    M = sp.random(5, 4, density=0.4, random_state=0, format="csc")
    T = csc_scipy_to_torch(M)
    assert T.layout == torch.sparse_csc and np.allclose(csc_torch_to_scipy(T).toarray(), M.toarray())
    Tg = csc_scipy_to_torch(M, requires_grad=True)
    (Tg.to_dense() * torch.arange(20.0, dtype=torch.float64).reshape(5, 4)).sum().backward()  # graph reaches values
    with pytest.raises(dqp.LayoutError, match="to_sparse_csc"):
        csc_torch_to_scipy(torch.zeros(2, 2))


def test_lin_solver_lists_are_usable(qp):
    from dqp.lin_solvers import get_dense_solvers, get_sparse_solvers

    dense, sparse = get_dense_solvers(), get_sparse_solvers()
    assert "qdldl" in sparse and "scipy_lu" in dense and "torch" in dense and "torch" not in sparse
    P, q, C, d, A, b = qp
    for lin in sparse:  # as libdqp's unit test test_08 loops over them
        layer = dQP.dQP_layer(settings=dQP.build_settings(solve_type="sparse", lin_solver=lin))
        dv = d.clone().requires_grad_()
        z, *_ = layer(P.to_sparse_csc(), q, C.to_sparse_csc(), dv, A.to_sparse_csc(), b)
        z.sum().backward()
        assert torch.isfinite(dv.grad).all()
    for alias in ("scipy LU", "scipy LDL", "scipy SPLU"):  # libdqp's spellings
        assert dQP.build_settings(lin_solver=alias).lin_solver in dense


@pytest.mark.parametrize("sparse", [False, True])
def test_full_and_reduced_kkt_matrices(qp, sparse):
    from dqp.qp_diagnostic import get_full_D, get_reduced_KKT

    P, q, C, d, A, b = (t.numpy() for t in qp)
    layer = dQP.dQP_layer(qp_solver="clarabel")
    layer(*qp)
    x, nu = layer.x_star_np[:, None], layer.nu_star_with_inactive_np[:, None]  # columns, as the scripts pass
    mats = [sp.csc_matrix(M) for M in (P, C, A)] if sparse else [P, C, A]
    D = get_full_D(mats[0], q, mats[1], d, mats[2], b, x, nu, sparse)
    D = D.toarray() if sparse else D
    assert D.shape == (13, 13)
    assert np.allclose(D[:6, 8:], C.T * nu.ravel()) and np.allclose(D[8:, 8:], -np.diag(d - C @ x.ravel()))
    D0 = get_full_D(mats[0], q, mats[1], d, None, None, x, nu, sparse)
    assert D0.shape == (11, 11)
    K, active = get_reduced_KKT(mats[0], q, mats[1], d, mats[2], b, x, nu, sparse, 1e-6)
    assert np.array_equal(active, layer.active)
    assert np.allclose(K.toarray() if sparse else K, layer.KKT_A_np)


def test_benchmark_is_callable_and_routes_to_diagnose(tmp_path, monkeypatch):
    from dqp import benchmark
    from dqp.diagnose import DiagnosisReport

    P, q, C, d, A, b = (t.numpy() for t in random_qp(5, 4, 1, seed=0)[:6])
    monkeypatch.chdir(tmp_path)
    opts = dict(solvers=["clarabel"], lin_solvers=["qdldl"], repeat=1, plot=False)
    report = benchmark("random", P, q[:, None], C, d, A, b, **opts)  # libdqp passes column vectors
    assert isinstance(report, DiagnosisReport) and report.recommended is not None
    with pytest.warns(UserWarning, match="consensus"):
        report = benchmark("random", P, q, C, d, A, b, "osqp", **opts)
    assert {r.qp_solver for r in report.results} == {"clarabel", "osqp"}
    with pytest.raises(dqp.SettingsError):
        benchmark("random", P, q, C, d, A, b, "no_such_solver", **opts)
    with pytest.raises(dqp.InputError, match="existing .npz"):
        benchmark("not_a_file")
    _save_libdqp_npz(tmp_path / "saved.npz")
    assert benchmark.benchmark(str(tmp_path / "saved.npz"), **opts).n == 6


def test_call_single_qpsolvers():
    P, q, C, d, *_ = (t.numpy() for t in random_qp(4, 3, 0, seed=0)[:6])
    sol = dQP.call_single_qpsolvers(
        P, q[:, None], C, d[:, None], None, None, {"solver": "clarabel", "verbose": False, "initvals": None}
    )
    ref = dQP.dQP_layer(qp_solver="clarabel", empty_batch=False)(*(torch.tensor(a) for a in (P, q, C, d)))
    assert np.allclose(sol.x, ref.z.numpy(), atol=1e-6) and np.allclose(sol.z, ref.mu.numpy(), atol=1e-6)
    infeasible = (np.eye(2), np.zeros(2), np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([-1.0, -1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(dqp.SolverFailedError, match="did not find a solution"):
            dQP.call_single_qpsolvers(*infeasible, None, None, {"solver": "clarabel"})
    kw = dQP.set_solver_tolerance({}, "osqp", 1e-7, 0.0)
    assert kw["eps_abs"] == 1e-7 and kw["eps_rel"] == 0.0


# ---------------------------------------------------------------------------------------------
# qpth gaps
# ---------------------------------------------------------------------------------------------
def test_spqpfunction_imports_and_explains():
    from dqp.qpth import NotSupportedError, SpQPFunction  # also dqp.NotSupportedError

    with pytest.raises(NotImplementedError) as e:
        SpQPFunction(None, (4, 4), None, (2, 4), None, (1, 4), eps=1e-12)
    assert isinstance(e.value, NotSupportedError) and isinstance(e.value, dqp.DQPError)
    assert "QPFunction" in str(e.value) and "solve_type='sparse'" in str(e.value)


def test_non_spd_error_is_a_runtime_error():
    from dqp.qpth import QPFunction, QNotSPDError

    Q = torch.zeros(1, 2, 2, dtype=torch.float64)
    p = torch.ones(1, 2, dtype=torch.float64)
    G = -torch.eye(2, dtype=torch.float64).unsqueeze(0)
    h = torch.zeros(1, 2, dtype=torch.float64)
    e = torch.Tensor()
    with pytest.raises(RuntimeError) as info:  # qpth's RuntimeError('Q is not SPD.')
        QPFunction(verbose=-1)(Q, p, G, h, e, e)
    assert isinstance(info.value, QNotSPDError) and isinstance(info.value, dqp.NotPSDError)


def test_qpth_masked_failures():
    from dqp.qpth import QPFunction

    B, n = 3, 2
    Q = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    p = torch.ones(B, n, dtype=torch.float64, requires_grad=True)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64).expand(B, 2, n)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]], dtype=torch.float64)  # element 1 infeasible
    e = torch.Tensor()
    with pytest.raises(dqp.InfeasibleError, match="batch element 1"):
        QPFunction(verbose=-1)(Q, p, G, h, e, e)
    f = QPFunction(verbose=-1, on_failure="mask")
    z = f(Q, p, G, h, e, e)
    assert f.status.tolist()[1] != 0 and f.status.tolist()[0] == 0 == f.status.tolist()[2]
    assert torch.equal(z[1], torch.zeros(n, dtype=torch.float64)) and torch.isfinite(z).all()
    z.sum().backward()
    assert torch.equal(p.grad[1], torch.zeros(n, dtype=torch.float64))
    with pytest.raises(dqp.SettingsError, match="on_failure"):
        QPFunction(on_failure="ignore")


@pytest.mark.skipif("proxqp" not in __import__("dqp").solvers.available_solvers(), reason="proxsuite not installed")
def test_far_unverified_primary_gives_way_to_a_closer_second_opinion():
    # parameter_space.py's grid point θ = (5/6, 5/6) with proxqp at eps_abs=1e-4 and no refinement:
    # proxqp's point is far from the KKT conditions (it was then a SolverFailedError), Clarabel's is
    # close though not verifiable without repairs: Clarabel's point is returned
    G = torch.tensor(
        [[1, 0, -1], [-1, 0, -1], [0, 1, -1], [0, -1, -1], [0.75, 0.64, -1], [-0.75, -0.64, -1]], dtype=torch.float64
    )
    t = 5.0 / 6.0
    h = -1.0 + torch.tensor([t, -t, -t, t, t, -t], dtype=torch.float64)
    P, q = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    layer = dQP.dQP_layer(
        settings=dQP.build_settings(eps_active=1e-7, eps_abs=1e-4, eps_rel=0, qp_solver="proxqp", refine_active=False)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = layer(P, q.unsqueeze(-1), G, h.unsqueeze(-1), None, None).z
    ref = dQP.dQP_layer(qp_solver="clarabel")(P, q, G, h).z
    assert layer.info.status == [dqp.Status.SOLVED] and "fallback_solver 'clarabel'" in layer.info.messages[0]
    assert torch.allclose(z, ref, atol=1e-4)


def _small_qp():
    P = torch.eye(3, dtype=torch.float64)
    q = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)
    C = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([1.0, 0.2], dtype=torch.float64)
    return P, q, C, d


def test_last_call_attributes_agree_after_a_call_that_raises():
    """layer.info, layer.active and the libdqp attributes describe the same call, also when it raised."""
    P, q, C, d = _small_qp()
    layer = dQP.dQP_layer(qp_solver="clarabel", empty_batch=False)
    layer(P, q, C, d)
    C2 = torch.cat([C, -torch.ones(1, 3, dtype=torch.float64)])
    d2 = torch.cat([d, torch.tensor([-5.0], dtype=torch.float64)])
    with pytest.raises(dqp.InfeasibleError):
        layer(P, q, C2, d2)
    assert layer.info.status == [dqp.Status.PRIMAL_INFEASIBLE]
    assert layer.active.shape == (3,) and layer.nIneq == 3 and layer.nActive == 0
    assert layer.nu_star_with_inactive_np.shape[-1] == 3


def test_kkt_matrix_in_the_callers_scaling_with_normalized_constraints():
    """KKT_A_np holds the caller's rows (not the normalized ones), consistent with the duals returned."""
    P, q, C, d = _small_qp()
    A, b = torch.tensor([[0.0, 0.0, 4.0]], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    layer = dQP.dQP_layer(qp_solver="clarabel", empty_batch=False, normalize_constraints=True)
    z, lam, mu, _, _ = layer(P, q, C, d, A, b)
    J = layer.active
    K = layer.KKT_A_np
    K = K.toarray() if sp.issparse(K) else np.asarray(K)
    x = np.concatenate([z.detach().numpy(), lam.detach().numpy(), mu.detach().numpy()[J]])
    rhs = np.concatenate([-q.numpy(), b.numpy(), d.numpy()[J]])
    assert np.abs(K @ x - rhs).max() < 1e-9


def test_layer_settings_do_not_share_the_keyword_dict():
    s = dQP.build_settings(qp_solver="clarabel", qp_solver_keywords={"max_iter": 50})
    layer = dQP.dQP_layer(settings=s)
    s["qp_solver_keywords"]["max_iter"] = 1
    assert layer.settings.qp_solver_keywords == {"max_iter": 50}
