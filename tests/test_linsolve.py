"""Linear solvers on their own: accuracy, interface errors, and the singular fallback."""

from __future__ import annotations


import numpy as np
import pytest

import dqp
from dqp.kkt import REGULARIZED, RobustKKT, assemble_kkt
from dqp.linsolve import available_linsolvers, get_linsolver, registered_linsolvers
from dqp.solvers import get_solver

CPU_SOLVERS = [n for n, c in registered_linsolvers().items() if not c.batched and c.is_available()]


def kkt_blocks(n=6, k=3, seed=0):
    g = np.random.default_rng(seed)
    L = g.standard_normal((n, n))
    P = L @ L.T + np.eye(n)
    G = g.standard_normal((k, n))
    return P, G


@pytest.mark.parametrize("name", CPU_SOLVERS)
@pytest.mark.parametrize("sparse", [False, True])
def test_linear_solvers_solve_kkt(name, sparse):
    P, G = kkt_blocks()
    K = assemble_kkt(P, None, G, sparse)
    rhs = np.random.default_rng(1).standard_normal((K.shape[0], 2))
    F = RobustKKT(P, None, G, sparse, get_linsolver(name))
    for j in range(2):
        x = F.solve(rhs[:, j])
        assert np.linalg.norm(K @ x - rhs[:, j]) < 1e-10 * np.linalg.norm(rhs[:, j])
    assert F.path == "direct"
    # several right-hand sides at once
    X = F.solve(rhs)
    assert X.shape == rhs.shape and np.linalg.norm(K @ X - rhs) < 1e-10 * np.linalg.norm(rhs)


@pytest.mark.parametrize("n,k", [(6, 3), (60, 20)])  # K below and above the size multiplied as a dense copy
def test_sparse_kkt_products_agree_with_the_dense_path(n, k):
    P, G = kkt_blocks(n, k)
    rhs = np.random.default_rng(2).standard_normal(n + k)
    dense = RobustKKT(P, None, G, False, get_linsolver("scipy_lu")).solve(rhs)
    F = RobustKKT(P, None, G, True, get_linsolver("qdldl"), quick=True)
    first, again = F.solve(rhs), F.solve(rhs)  # the second reuses the products' copy
    assert np.array_equal(first, again)
    assert np.linalg.norm(first - dense) <= 1e-12 * np.linalg.norm(dense)
    # a singular system: the equilibrated matrix replaces the first (the copy follows it)
    Gs = np.vstack([G, G[:1]])
    S = RobustKKT(P, None, Gs, True, get_linsolver("qdldl"), quick=True)
    b = assemble_kkt(P, None, Gs, False) @ np.ones(n + k + 1)  # consistent
    assert S.path == REGULARIZED and np.allclose(assemble_kkt(P, None, Gs, False) @ S.solve(b), b, atol=1e-9)


def test_cholesky_needs_block_size():
    P, G = kkt_blocks()
    with pytest.raises(ValueError, match="primal block size"):
        get_linsolver("scipy_cholesky").factor(assemble_kkt(P, None, G, False))


def test_ldl_rejects_singular_matrix():
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        get_linsolver("scipy_ldl").factor(np.zeros((3, 3)))


def test_singular_kkt_uses_regularized_path():
    P, G = kkt_blocks(k=2)
    G = np.vstack([G[0], G[0]])  # dependent rows
    F = RobustKKT(P, None, G, True, get_linsolver("qdldl"))
    assert F.path == REGULARIZED
    rhs = np.concatenate([np.ones(6), [1.0, 1.0]])  # consistent: equal right-hand sides for equal rows
    x = F.solve(rhs)
    assert F.residual < 1e-10 and np.all(np.isfinite(x))


def test_interface_errors():
    with pytest.raises(dqp.SettingsError, match="batched solver"):
        get_solver("dqp_ipm").solve(np.eye(2), np.zeros(2), None, None, None, None)
    with pytest.raises(dqp.SettingsError, match="element-wise solver"):
        get_solver("clarabel").solve_batch(None, None)


def test_available_linsolvers_are_importable():
    assert {"qdldl", "scipy_lu", "scipy_splu", "scipy_ldl", "scipy_cholesky"} <= set(available_linsolvers())


def test_batched_linsolver_has_no_elementwise_factor():
    with pytest.raises(dqp.SettingsError, match="batched"):
        get_linsolver("torch").factor(np.eye(2))


@pytest.mark.skipif("pardiso" not in available_linsolvers(), reason="pypardiso not installed")
def test_pardiso_factorizations_stay_independent():
    """One Pardiso instance per thread is reused; an older factorization must still solve its matrix."""
    P1, G1 = kkt_blocks(seed=1)
    P2, G2 = kkt_blocks(seed=2)
    K1, K2 = assemble_kkt(P1, None, G1, True), assemble_kkt(P2, None, G2, True)
    lin = get_linsolver("pardiso")
    F1 = lin.factor(K1)
    F2 = lin.factor(K2)
    r = np.arange(K1.shape[0], dtype=float)
    assert np.allclose(K1 @ F1.solve(r), r) and np.allclose(K2 @ F2.solve(r), r)
    assert np.allclose(K1 @ F1.solve(r), r)
