"""Tests for dqp.io: the Maros–Meszaros loader, the conversion to dqp's form, and load_problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch

from dqp.errors import InputError, NonFiniteError, NotSymmetricError, ShapeError
from dqp.io import (
    INFINITY_BOUND,
    QPProblem,
    list_maros_meszaros,
    load_maros_meszaros,
    load_problem,
    maros_meszaros_dir,
    save_problem,
)

REPO = Path(__file__).resolve().parent.parent
MM_DIR = REPO / "tests" / "data" / "maros_meszaros"  # a small subset shipped with the tests

SMALL = ["HS21", "HS35", "HS118", "TAME", "DUALC1", "QAFIRO", "GENHS28"]


def _write_mm(path: Path, **overrides) -> Path:
    """A tiny valid Maros–Meszaros .mat file (HS21-like) with fields replaced/removed."""
    data = {
        "P": sp.csc_matrix(np.array([[2.0, 1.0], [1.0, 4.0]])),
        "q": np.array([[1.0], [-1.0]]),
        "r": np.array([[3.0]]),
        "A": sp.csc_matrix(np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])),
        "l": np.array([[1.0], [-1e20], [0.0]]),
        "u": np.array([[1.0], [5.0], [np.inf]]),
        "n": np.array([[2]]),
        "m": np.array([[3]]),
    }
    for k, v in overrides.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    scipy.io.savemat(str(path), data)
    return path


# ------------------------------------------------------------------ real collection
@pytest.mark.parametrize("name", SMALL)
def test_load_small_problem_shapes_and_symmetry(name):
    prob = load_maros_meszaros(MM_DIR / f"{name}.mat")
    raw = scipy.io.loadmat(str(MM_DIR / f"{name}.mat"))
    n, m = int(raw["n"].ravel()[0]), int(raw["m"].ravel()[0])
    assert prob.name == name
    assert prob.P.shape == (n, n) and prob.A.shape == (m, n)
    assert prob.q.shape == (n,) and prob.l.shape == (m,) and prob.u.shape == (m,)
    assert sp.isspmatrix_csc(prob.P) and sp.isspmatrix_csc(prob.A)
    assert prob.P.dtype == np.float64 and prob.q.dtype == np.float64
    assert prob.P.nnz > 0 and (prob.P != prob.P.T).nnz == 0
    np.testing.assert_array_equal(prob.P.toarray(), np.asarray(raw["P"].toarray(), dtype=float))
    assert prob.r == pytest.approx(float(np.asarray(raw["r"]).ravel()[0]))


@pytest.mark.parametrize("name", SMALL)
def test_conversion_preserves_feasibility(name):
    prob = load_maros_meszaros(MM_DIR / f"{name}.mat")
    qp = prob.to_qp()
    finite_l = np.abs(prob.l) < INFINITY_BOUND
    finite_u = np.abs(prob.u) < INFINITY_BOUND
    eq = finite_l & finite_u & (prob.l == prob.u)
    assert qp.n_eq == int(eq.sum())
    assert qp.n_ineq == int((finite_u & ~eq).sum() + (finite_l & ~eq).sum())
    assert qp.C.shape == (qp.n_ineq, qp.n) and qp.d.shape == (qp.n_ineq,)
    assert np.all(np.abs(qp.d) < INFINITY_BOUND)
    rng = np.random.default_rng(0)
    # points at several scales, some feasible some not: violations must agree exactly
    for scale in (0.0, 0.1, 1.0, 10.0, 1e3):
        x = scale * rng.standard_normal(prob.n)
        assert qp.violation(x) == pytest.approx(prob.violation(x), rel=1e-12, abs=1e-12)
        assert qp.objective(x) == pytest.approx(prob.objective(x), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", ["HS21", "HS118", "DUALC1"])
def test_conversion_optimum_is_feasible(name):
    """The optimum of the original problem (solved independently) is feasible after conversion."""
    qpsolvers = pytest.importorskip("qpsolvers")
    prob = load_maros_meszaros(MM_DIR / f"{name}.mat")
    # solve the original two-sided form with clarabel through qpsolvers' G/h/A/b with both sides
    qp = prob.to_qp()
    sol = qpsolvers.solve_qp(qp.P, qp.q, qp.C, qp.d, qp.A, qp.b, solver="clarabel")
    assert sol is not None
    assert prob.violation(sol) < 1e-6
    assert qp.violation(sol) < 1e-6
    # shifting the point far along −A row of an active bound violates both forms the same way
    x_bad = sol + 1e3
    assert prob.violation(x_bad) == pytest.approx(qp.violation(x_bad), rel=1e-12)


@pytest.mark.parametrize("sparse", [True, False])
def test_to_torch_matches_scipy(sparse):
    qp = load_maros_meszaros(MM_DIR / "HS118.mat").to_qp()
    P, q, C, d, A, b = qp.to_torch(dtype=torch.float64, sparse=sparse)
    if sparse:
        assert P.layout == torch.sparse_csc and C.layout == torch.sparse_csc
        np.testing.assert_array_equal(P.values().numpy(), qp.P.data)
        np.testing.assert_array_equal(C.row_indices().numpy(), qp.C.indices)
        np.testing.assert_array_equal(C.ccol_indices().numpy(), qp.C.indptr)
        P, C = P.to_dense(), C.to_dense()
    np.testing.assert_array_equal(P.numpy(), qp.P.toarray())
    np.testing.assert_array_equal(C.numpy(), qp.C.toarray())
    np.testing.assert_array_equal(d.numpy(), qp.d)
    assert A is None and b is None  # HS118 has no equality rows
    (P32, q32, *_), leaves = qp.to_torch(dtype=torch.float32, sparse=sparse, requires_grad=True, return_leaves=True)
    assert P32.dtype == torch.float32 and P32.requires_grad and q32.requires_grad
    assert set(leaves) == {"P", "q", "C", "d"}
    assert all(t.is_leaf and t.requires_grad for t in leaves.values())
    # gradients reach the leaves (for sparse: the values, in CSC order)
    dense_P = P32.to_dense() if sparse else P32
    (2.0 * dense_P).sum().backward()
    expected = np.full(qp.P.nnz, 2.0) if sparse else np.full((qp.n, qp.n), 2.0)
    np.testing.assert_array_equal(leaves["P"].grad.numpy(), expected)


def test_to_torch_with_equalities():
    qp = load_maros_meszaros(MM_DIR / "GENHS28.mat").to_qp()
    assert qp.n_eq > 0
    _, _, _, _, A, b = qp.to_torch(sparse=True)
    np.testing.assert_array_equal(A.to_dense().numpy(), qp.A.toarray())
    np.testing.assert_array_equal(b.numpy(), qp.b)


def test_list_filters_and_sorts():
    everything = list_maros_meszaros(MM_DIR)
    assert len(everything) == len(list(MM_DIR.glob("*.mat")))
    small = list_maros_meszaros(MM_DIR, max_n=1000, max_m=1000)
    assert 0 < len(small) < len(everything)
    assert all(e.n <= 1000 and e.m <= 1000 for e in small)
    sizes = [e.n + e.m for e in everything]
    assert sizes == sorted(sizes)
    e = small[0]
    prob = load_maros_meszaros(e)  # entries are path-like
    assert (prob.n, prob.m) == (e.n, e.m)
    only_n = list_maros_meszaros(MM_DIR, max_n=10)
    assert only_n and all(x.n <= 10 for x in only_n)
    assert any(x.m > 10 for x in only_n)  # max_n alone does not filter m


def test_default_dir_from_environment(monkeypatch):
    monkeypatch.setenv("DQP_MAROS_MESZAROS_DIR", str(MM_DIR))
    assert maros_meszaros_dir() == MM_DIR
    monkeypatch.setenv("DQP_MAROS_MESZAROS_DIR", str(REPO / "docs"))  # no .mat files there: not chosen
    assert maros_meszaros_dir() != REPO / "docs"


def test_load_problem_mat_equals_to_qp():
    a = load_problem(MM_DIR / "HS35.mat")
    b = load_maros_meszaros(MM_DIR / "HS35.mat").to_qp()
    assert (a.C != b.C).nnz == 0 and np.array_equal(a.d, b.d)


# ------------------------------------------------------------------ synthetic files
def test_conversion_rules_on_synthetic(tmp_path):
    prob = load_maros_meszaros(_write_mm(tmp_path / "t.mat"))
    qp = prob.to_qp()
    # row 0: l == u == 1 → equality; row 1: only u=5 → x0 ≤ 5; row 2: only l=0 → −x1 ≤ 0
    np.testing.assert_array_equal(qp.A.toarray(), [[1.0, 1.0]])
    np.testing.assert_array_equal(qp.b, [1.0])
    np.testing.assert_array_equal(qp.C.toarray(), [[1.0, 0.0], [0.0, -1.0]])
    np.testing.assert_array_equal(qp.d, [5.0, 0.0])
    np.testing.assert_array_equal(qp.ineq_rows, [1, 2])
    np.testing.assert_array_equal(qp.ineq_signs, [1, -1])
    np.testing.assert_array_equal(qp.eq_rows, [0])
    assert prob.r == 3.0 and qp.r == 3.0


def test_two_sided_row_gives_two_inequalities(tmp_path):
    f = _write_mm(tmp_path / "t.mat", l=np.array([[-2.0], [-1e20], [0.0]]), u=np.array([[3.0], [1e20], [np.inf]]))
    qp = load_maros_meszaros(f).to_qp()
    assert qp.A is None and qp.b is None
    # row 0 twice (upper then lower), row 1 dropped, row 2 lower
    np.testing.assert_array_equal(qp.ineq_rows, [0, 0, 2])
    np.testing.assert_array_equal(qp.d, [3.0, 2.0, 0.0])


def test_upper_triangle_is_mirrored(tmp_path):
    f = _write_mm(tmp_path / "t.mat", P=sp.csc_matrix(np.array([[2.0, 1.0], [0.0, 4.0]])))
    P = load_maros_meszaros(f).P.toarray()
    np.testing.assert_array_equal(P, [[2.0, 1.0], [1.0, 4.0]])


def test_integer_arrays_become_float(tmp_path):
    f = _write_mm(tmp_path / "t.mat", q=np.array([[1], [2]], dtype=np.uint8), r=np.array([[-100]], dtype=np.int16))
    prob = load_maros_meszaros(f)
    assert prob.q.dtype == np.float64 and prob.r == -100.0


@pytest.mark.parametrize("key", ["P", "q", "A", "l", "u"])
def test_missing_key_raises_with_name(tmp_path, key):
    f = _write_mm(tmp_path / "t.mat", **{key: None})
    with pytest.raises(InputError, match=f"'{key}'") as info:
        load_maros_meszaros(f)
    assert str(f) in str(info.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_maros_meszaros(tmp_path / "nope.mat")


def test_corrupt_file_raises(tmp_path):
    f = tmp_path / "bad.mat"
    f.write_bytes(b"this is not a mat file at all" * 10)
    with pytest.raises(InputError, match="Could not read"):
        load_maros_meszaros(f)


@pytest.mark.parametrize(
    "override, error, pattern",
    [
        ({"q": np.ones((3, 1))}, ShapeError, "'q'.*length 3"),
        ({"l": np.zeros((2, 1))}, ShapeError, "'l'.*length 2"),
        ({"A": sp.csc_matrix(np.ones((3, 3)))}, ShapeError, "'A'.*shape"),
        ({"n": np.array([[7]])}, ShapeError, "n=7"),
        ({"P": sp.csc_matrix(np.array([[2.0, 1.0], [3.0, 4.0]]))}, NotSymmetricError, "not symmetric"),
        ({"P": sp.csc_matrix(np.ones((2, 3)))}, ShapeError, "square"),
        ({"q": np.array([[np.nan], [0.0]])}, NonFiniteError, "NaN"),
        ({"l": np.array([[np.nan], [0.0], [0.0]])}, NonFiniteError, "NaN"),
        ({"l": np.array([[2.0], [0.0], [0.0]])}, InputError, "l > u"),
    ],
)
def test_bad_data_raises_typed_error(tmp_path, override, error, pattern):
    f = _write_mm(tmp_path / "t.mat", **override)
    with pytest.raises(error, match=pattern):
        load_maros_meszaros(f)


def test_list_missing_dir_raises(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_maros_meszaros(tmp_path / "none")


def test_list_non_mm_file_raises(tmp_path):
    scipy.io.savemat(str(tmp_path / "x.mat"), {"foo": np.ones(2)})
    with pytest.raises(InputError, match="missing the variable"):
        list_maros_meszaros(tmp_path)


def test_list_filters_synthetic(tmp_path):
    _write_mm(tmp_path / "a.mat")
    assert [e.name for e in list_maros_meszaros(tmp_path, max_n=2, max_m=3)] == ["a"]
    assert list_maros_meszaros(tmp_path, max_m=2) == []


# ------------------------------------------------------------------ load_problem (.npz)
def _qp() -> QPProblem:
    return QPProblem(
        name="x",
        P=sp.csc_matrix(np.array([[2.0, 0.5], [0.5, 1.0]])),
        q=np.array([1.0, -1.0]),
        C=sp.csc_matrix(np.array([[1.0, 2.0], [0.0, -1.0], [1.0, 0.0]])),
        d=np.array([1.0, 0.0, 4.0]),
        A=sp.csc_matrix(np.array([[1.0, 1.0]])),
        b=np.array([0.5]),
        r=2.0,
    )


def test_save_load_roundtrip(tmp_path):
    qp = _qp()
    f = save_problem(tmp_path / "p.npz", qp)
    back = load_problem(f)
    for a, b in ((back.P, qp.P), (back.C, qp.C), (back.A, qp.A)):
        np.testing.assert_array_equal(a.toarray(), b.toarray())
    for a, b in ((back.q, qp.q), (back.d, qp.d), (back.b, qp.b)):
        np.testing.assert_array_equal(a, b)
    assert back.r == 2.0 and back.name == "p"


def test_npz_dense_and_optional_keys(tmp_path):
    f = tmp_path / "dense.npz"
    np.savez(f, P=np.eye(3), q=np.ones(3))
    qp = load_problem(f)
    assert qp.n == 3 and qp.n_ineq == 0 and qp.A is None
    assert qp.C.shape == (0, 3)


def test_npz_libdqp_names_with_pickle(tmp_path):
    f = tmp_path / "lib.npz"
    np.savez(
        f, Q=sp.csc_matrix(np.eye(2)), q=np.zeros(2), G=sp.csc_matrix(np.ones((1, 2))), h=np.ones(1), A=None, b=None
    )
    with pytest.raises(InputError, match="allow_pickle=True"):
        load_problem(f)
    qp = load_problem(f, allow_pickle=True)
    assert qp.n_ineq == 1 and qp.A is None
    np.testing.assert_array_equal(qp.C.toarray(), [[1.0, 1.0]])


@pytest.mark.parametrize("drop", ["P", "q"])
def test_npz_missing_required_key(tmp_path, drop):
    arrays = {"P": np.eye(2), "q": np.ones(2)}
    arrays.pop(drop)
    f = tmp_path / "m.npz"
    np.savez(f, **arrays)
    with pytest.raises(InputError, match=f"missing the required key '{drop}'") as info:
        load_problem(f)
    assert str(f) in str(info.value)


@pytest.mark.parametrize("have, lack", [("C", "d"), ("d", "C"), ("A", "b"), ("b", "A")])
def test_npz_half_pair(tmp_path, have, lack):
    arrays = {"P": np.eye(2), "q": np.ones(2), have: np.ones((1, 2)) if have in "CA" else np.ones(1)}
    f = tmp_path / "h.npz"
    np.savez(f, **arrays)
    with pytest.raises(InputError, match=f"missing the key '{lack}'"):
        load_problem(f)


@pytest.mark.parametrize(
    "arrays, error, pattern",
    [
        ({"P": np.eye(2), "q": np.ones(3)}, ShapeError, "'q'"),
        ({"P": np.eye(2), "q": np.ones(2), "C": np.ones((1, 3)), "d": np.ones(1)}, ShapeError, "'C'"),
        ({"P": np.eye(2), "q": np.ones(2), "C": np.ones((2, 2)), "d": np.ones(1)}, ShapeError, "'d'"),
        ({"P": np.eye(2), "q": np.array([np.inf, 0.0])}, NonFiniteError, "'q'"),
        ({"P": np.array([[1.0, 2.0], [0.5, 1.0]]), "q": np.ones(2)}, NotSymmetricError, "symmetric"),
    ],
)
def test_npz_bad_data(tmp_path, arrays, error, pattern):
    f = tmp_path / "b.npz"
    np.savez(f, **arrays)
    with pytest.raises(error, match=pattern):
        load_problem(f)


def test_npz_inconsistent_csc_components(tmp_path):
    f = tmp_path / "c.npz"
    np.savez(
        f,
        P_data=np.ones(2),
        P_indices=np.array([0, 5]),
        P_indptr=np.array([0, 1, 2]),
        P_shape=np.array([2, 2]),
        q=np.ones(2),
    )
    with pytest.raises(InputError, match="CSC components"):
        load_problem(f)


def test_load_problem_unknown_extension(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("1 2 3")
    with pytest.raises(InputError, match="unknown extension"):
        load_problem(f)


def test_load_problem_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_problem(tmp_path / "none.npz")
    f = tmp_path / "bad.npz"
    f.write_bytes(b"garbage" * 20)
    with pytest.raises(InputError, match="Could not read"):
        load_problem(f)


@pytest.mark.parametrize("grad_layout", ["csc_same_pattern", "dense"])
def test_csc_from_values_backward(grad_layout):
    """to_torch's CSC constructor hands the values their gradient (fast path and gather path)."""
    from dqp.io import _csc_from_values

    M = sp.csc_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 5.0]]))
    ccol, row = torch.tensor(M.indptr, dtype=torch.int64), torch.tensor(M.indices, dtype=torch.int64)
    vals = torch.tensor(M.data, requires_grad=True)
    T = _csc_from_values(ccol, row, vals, M.shape)
    G = torch.arange(9, dtype=torch.float64).reshape(3, 3)  # gradient wrt the dense matrix entries

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return torch.zeros((), dtype=torch.float64)

        @staticmethod
        def backward(ctx, g):
            if grad_layout == "dense":
                return G
            cols = torch.repeat_interleave(torch.arange(3), ccol.diff())
            return torch.sparse_csc_tensor(ccol, row, G[row, cols], size=(3, 3))

    Probe.apply(T).backward()
    rows, cols = M.nonzero()  # CSC order for a canonical csc_matrix: by column, then row
    order = np.lexsort((rows, cols))
    expected = G.numpy()[rows[order], cols[order]]
    np.testing.assert_array_equal(vals.grad.numpy(), expected)
