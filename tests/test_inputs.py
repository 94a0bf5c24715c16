"""Bad input gets a specific, explained error (never a silent NaN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dqp
from dqp import dQP
from conftest import random_qp


@pytest.fixture
def layer():
    return dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel"))


@pytest.fixture
def prob():
    P, q, C, d, A, b, *_ = random_qp(4, 5, 2, seed=0)
    return dict(P=P, q=q, C=C, d=d, A=A, b=b)


def call(layer, prob, **over):
    return layer(**{**prob, **over})


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(P=torch.eye(3, dtype=torch.float64)), dqp.ShapeError, ["P", "(..., 4, 4)"]),
        (dict(q=torch.zeros(4, 1, 1, dtype=torch.float64)), dqp.ShapeError, ["q", "(n,)"]),
        (dict(C=torch.zeros(5, 3, dtype=torch.float64)), dqp.ShapeError, ["C"]),
        (dict(d=torch.zeros(7, dtype=torch.float64)), dqp.ShapeError, ["C"]),
        (dict(b=torch.zeros(3, dtype=torch.float64)), dqp.ShapeError, ["A"]),
        (dict(d=None), dqp.ShapeError, ["C", "d"]),
        (dict(A=None), dqp.ShapeError, ["b", "A"]),
        (
            dict(
                q=torch.zeros(0, dtype=torch.float64),
                P=torch.zeros(0, 0, dtype=torch.float64),
                C=None,
                d=None,
                A=None,
                b=None,
            ),
            dqp.ShapeError,
            ["zero"],
        ),
        (
            dict(q=torch.zeros(3, 4, dtype=torch.float64), d=torch.zeros(2, 5, dtype=torch.float64)),
            dqp.ShapeError,
            ["Batch sizes"],
        ),
        (dict(q=torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=torch.float64)), dqp.NonFiniteError, ["q", "NaN"]),
        (dict(d=torch.full((5,), float("-inf"), dtype=torch.float64)), dqp.NonFiniteError, ["d", "-inf"]),
        (dict(d=torch.full((5,), float("nan"), dtype=torch.float64)), dqp.NonFiniteError, ["d", "NaN"]),
        (
            dict(P=torch.tensor([[1.0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)),
            dqp.NotSymmetricError,
            ["symmetric", "0.5 * (P + P"],
        ),
        (dict(q=torch.zeros(4, dtype=torch.float32)), dqp.LayoutError, ["dtype", "q"]),
        (dict(q=torch.zeros(4, dtype=torch.int64)), dqp.LayoutError, ["floating"]),
        (dict(P=[1, 2]), dqp.LayoutError, ["torch tensor"]),
        (dict(q=[0.0] * 4), dqp.LayoutError, ["dense torch tensor"]),
        (dict(P=torch.eye(4, dtype=torch.float64).to_sparse_csc()), dqp.LayoutError, ["solve_type='sparse'"]),
        (dict(P=None), dqp.ShapeError, ["required"]),
    ],
)
def test_bad_input_raises_specific_error(layer, prob, over, exc, words):
    with pytest.raises(exc) as info:
        call(layer, prob, **over)
    assert isinstance(info.value, dqp.DQPError)
    for w in words:
        assert w in str(info.value)


def test_nan_in_batch_names_the_element(layer, prob):
    q = prob["q"].expand(3, -1).clone()
    q[2, 1] = float("nan")
    with pytest.raises(dqp.NonFiniteError, match=r"batch elements \[2\]"):
        call(layer, prob, q=q)


def test_non_symmetric_in_batch_names_the_element(layer, prob):
    P = prob["P"].expand(3, -1, -1).clone()
    P[1, 0, 1] += 1.0
    with pytest.raises(dqp.NotSymmetricError, match=r"batch elements \[1\]"):
        call(layer, prob, P=P)


def test_check_psd(prob):
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel", check_PSD=True))
    P = -torch.eye(4, dtype=torch.float64)
    with pytest.raises(dqp.NotPSDError, match="positive semidefinite"):
        call(layer, prob, P=P)
    sparse = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel", check_PSD=True, solve_type="sparse"))
    with pytest.raises(dqp.NotPSDError):
        sparse(P.to_sparse_csc(), prob["q"])
    call(layer, prob)  # PSD passes


def test_sparse_input_errors(prob):
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel", solve_type="sparse"))
    P = prob["P"]
    with pytest.raises(dqp.LayoutError, match="to_sparse_csc"):
        layer(P, prob["q"])  # dense P with solve_type='sparse'
    leaf = torch.sparse_csc_tensor(
        P.to_sparse_csc().ccol_indices(),
        P.to_sparse_csc().row_indices(),
        P.to_sparse_csc().values(),
        P.shape,
        requires_grad=True,
    )
    with pytest.raises(dqp.LayoutError, match="leaf"):
        layer(leaf, prob["q"])
    with pytest.raises(dqp.ShapeError, match="empty list"):
        layer([], prob["q"])
    with pytest.raises(dqp.ShapeError, match="one shape"):
        layer([P.to_sparse_csc(), torch.eye(3, dtype=torch.float64).to_sparse_csc()], prob["q"])
    with pytest.raises(dqp.LayoutError, match="torch sparse tensor"):
        layer([P.to_sparse_csc(), "x"], prob["q"])
    with pytest.raises(dqp.ShapeError, match="2-D"):
        layer(P.unsqueeze(0).to_sparse_csc(), prob["q"])
    with pytest.raises(dqp.ShapeError, match=r"q has shape \(4,\) but P is 3 x 3"):
        layer(torch.eye(3, dtype=torch.float64).to_sparse_csc(), prob["q"])
    with pytest.raises(dqp.ShapeError, match="rows"):
        layer(P.to_sparse_csc(), prob["q"], prob["C"][:3].to_sparse_csc(), prob["d"])
    bad = P.clone()
    bad[0, 1] += 1
    with pytest.raises(dqp.NotSymmetricError):
        layer(bad.to_sparse_csc(), prob["q"])
    nan = P.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(dqp.NonFiniteError):
        layer(nan.to_sparse_csc(), prob["q"])
    with pytest.raises(dqp.LayoutError, match="solve_type='sparse'"):
        layer(P.to_sparse_csc(), prob["q"], prob["C"], prob["d"])  # dense C


def test_coo_and_csr_are_converted(prob):
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel", solve_type="sparse"))
    z1 = layer(prob["P"].to_sparse_coo(), prob["q"], prob["C"].to_sparse_csr(), prob["d"])[0]
    z2 = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel"))(prob["P"], prob["q"], prob["C"], prob["d"])[0]
    assert torch.allclose(z1, z2, atol=1e-9)


def test_device_mismatch_is_reported(prob):
    meta_q = torch.zeros(4, dtype=torch.float64, device="meta")
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel"))
    with pytest.raises(dqp.LayoutError, match="device"):
        call(layer, prob, q=meta_q)


def test_edge_cases_n1_zero_rows_empty_constraints():
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel", empty_batch=False))
    # n = 1 with a bound
    z, lam, mu, _, _ = layer(
        torch.ones(1, 1, dtype=torch.float64),
        torch.tensor([-3.0], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    assert torch.allclose(z, torch.tensor([1.0], dtype=torch.float64)) and torch.allclose(
        mu, torch.tensor([2.0], dtype=torch.float64)
    )
    # zero-row C and A behave like absent constraints
    P = torch.eye(2, dtype=torch.float64)
    q = torch.tensor([1.0, -1.0], dtype=torch.float64)
    z, lam, mu, _, _ = layer(
        P,
        q,
        torch.zeros(0, 2, dtype=torch.float64),
        torch.zeros(0, dtype=torch.float64),
        torch.zeros(0, 2, dtype=torch.float64),
        torch.zeros(0, dtype=torch.float64),
    )
    assert torch.allclose(z, -q) and lam.shape == (0,) and mu.shape == (0,)
    # a zero row in C with d >= 0 is harmless
    C = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    z, _, mu, _, _ = layer(P, q, C, torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert torch.allclose(z, torch.tensor([-2.0, 1.0], dtype=torch.float64), atol=1e-9)


def test_contradictory_bounds_are_infeasible():
    """l > u style contradictions: z <= -1 and z >= 1."""
    layer = dQP.dQP_layer(settings=dQP.build_settings(qp_solver="clarabel"))
    C = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    d = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    with pytest.raises(dqp.InfeasibleError, match="primal infeasible"):
        layer(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), C, d)


@pytest.mark.parametrize(
    "over, words",
    [
        (dict(q=torch.zeros(0, 4, dtype=torch.float64)), "empty"),
        (dict(d=torch.zeros(5, 1, 1, dtype=torch.float64)), "(m,) or (B, m)"),
        (dict(C=torch.zeros(1, 1, 5, 4, dtype=torch.float64)), "(k, n) or (B, k, n)"),
    ],
)
def test_more_shape_errors(layer, prob, over, words):
    with pytest.raises(dqp.ShapeError) as e:
        call(layer, prob, **over)
    assert words in str(e.value)


def test_batched_solver_pairings(prob):
    with pytest.raises(dqp.SettingsError, match="does not take sparse input"):
        dQP.dQP_layer(qp_solver="dqp_ipm", solve_type="sparse")(prob["P"].to_sparse_csc(), prob["q"])
    with pytest.raises(dqp.SettingsError, match="lin_solver='torch' or 'auto'"):
        dQP.dQP_layer(qp_solver="dqp_ipm", lin_solver="qdldl")(prob["P"], prob["q"])


@pytest.mark.parametrize(
    "dtype, words", [(torch.complex128, "dtype"), (torch.int64, "dtype"), (torch.float32, "dtype")]
)
def test_sparse_values_must_match_q_dtype(prob, dtype, words):
    layer = dQP.dQP_layer(qp_solver="clarabel", solve_type="sparse")
    P = prob["P"].to(dtype).to_sparse_csc()
    with pytest.raises(dqp.LayoutError, match=words):
        layer(P, prob["q"])


def test_meta_tensors_are_refused(prob):
    with pytest.raises(dqp.LayoutError, match="meta"):
        dQP.dQP_layer(qp_solver="clarabel")(prob["P"].to("meta"), prob["q"].to("meta"))


def test_check_psd_on_large_sparse_P_is_fast():
    import time

    import scipy.sparse as sp

    n = 3000
    T = sp.diags([-np.ones(n - 1), 2.5 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csc")
    layer = dQP.dQP_layer(qp_solver="clarabel", solve_type="sparse", check_PSD=True)
    q = torch.ones(n, dtype=torch.float64)
    t0 = time.perf_counter()
    layer(torch.tensor(T.toarray()).to_sparse_csc(), q)
    assert time.perf_counter() - t0 < 20
    with pytest.raises(dqp.NotPSDError):
        layer(torch.tensor((T - 3 * sp.eye(n)).toarray()).to_sparse_csc(), q)
