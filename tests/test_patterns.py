"""The per-pattern cache of checked sparse structures (dqp.patterns) and validation that uses it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import dqp
from dqp import dQP
from dqp.errors import LayoutError, NonFiniteError, NotSymmetricError
from dqp.patterns import CheckedPattern, PatternCache


def _csc(M):
    M = sp.csc_matrix(M)
    M.sort_indices()
    return M.indptr.astype(np.int64), M.indices.astype(np.int64), M.data


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, ptr, idx):
        self.calls += 1


def test_cache_hit_miss_and_new_shape():
    cache, check = PatternCache(size=8), _Counter()
    ptr, idx, _ = _csc(np.array([[1.0, 2.0], [0.0, 3.0]]))
    first = cache.get(ptr, idx, (2, 2), check)
    assert check.calls == 1 and len(cache) == 1
    again = cache.get(ptr.copy(), idx.copy(), (2, 2), check)  # equal arrays, other objects: a hit
    assert again is first and check.calls == 1
    other = cache.get(*_csc(np.eye(2))[:2], (2, 2), check)  # another pattern: a miss
    assert other is not first and check.calls == 2
    wider = cache.get(ptr, idx, (3, 2), check)  # same arrays, another shape: a miss
    assert wider is not first and check.calls == 3 and len(cache) == 3


def test_cache_is_bounded_oldest_out():
    cache, check = PatternCache(size=2), _Counter()
    pats = [_csc(np.diag(np.arange(1.0, k + 2)))[:2] for k in range(3)]
    for k, (ptr, idx) in enumerate(pats):
        cache.get(ptr, idx, (k + 1, k + 1), check)
    assert len(cache) == 2 and check.calls == 3
    cache.get(*pats[0], (1, 1), check)  # evicted: checked again
    assert check.calls == 4
    cache.clear()
    assert len(cache) == 0


def test_cache_keeps_at_most_its_entry_budget():
    cache, check = PatternCache(size=8, max_entries=20), _Counter()
    small = _csc(np.eye(3))[:2]  # 4 + 3 entries
    big = _csc(np.ones((4, 4)))[:2]  # 5 + 16 entries: over the budget, checked but not kept
    cache.get(*small, (3, 3), check)
    pat = cache.get(*big, (4, 4), check)
    assert pat.shape == (4, 4) and len(cache) == 1
    cache.get(*big, (4, 4), check)
    assert check.calls == 3
    two = _csc(np.eye(2))[:2]  # 3 + 2 entries: fits beside the first
    cache.get(*two, (2, 2), check)
    cache.get(*small, (3, 3), check)
    assert len(cache) == 2 and check.calls == 4


def test_a_failed_check_is_not_kept():
    cache = PatternCache()

    def bad(ptr, idx):
        raise LayoutError("malformed")

    ptr, idx, _ = _csc(np.eye(3))
    for _ in range(2):
        with pytest.raises(LayoutError):
            cache.get(ptr, idx, (3, 3), bad)
    assert len(cache) == 0


def test_asymmetry_matches_dense():
    rng = np.random.default_rng(0)
    for trial in range(20):
        M = sp.random(6, 6, density=0.5, random_state=trial, format="csc")
        M = M + M.T if trial % 2 else M  # symmetric patterns and values half the time
        ptr, idx, vals = _csc(M)
        vals = vals + (0.0 if trial % 2 else rng.standard_normal(len(vals)))
        D = sp.csc_matrix((vals, idx, ptr), shape=(6, 6)).toarray()
        assert CheckedPattern(ptr, idx, (6, 6)).asymmetry(vals) == pytest.approx(np.abs(D - D.T).max(), abs=0)


def test_non_canonical_pattern_defers_the_symmetry_check():
    ptr, idx = np.array([0, 2, 3]), np.array([1, 0, 1])  # column 0: rows unsorted
    assert CheckedPattern(ptr, idx, (2, 2)).asymmetry(np.ones(3)) is None


def test_arrays_are_copies():
    ptr, idx, _ = _csc(np.eye(2))
    pat = CheckedPattern(ptr, idx, (2, 2))
    ptr[0], idx[0] = 7, 7
    assert pat.ccol[0] == 0 and pat.rows[0] == 0


def _layer_inputs(P, C, d):
    t = lambda M: dqp.sparse_csc_tensor(
        torch.tensor(M.indptr, dtype=torch.int64),
        torch.tensor(M.indices, dtype=torch.int64),
        torch.tensor(M.data),
        M.shape,
    )
    P, C = sp.csc_matrix(P), sp.csc_matrix(C)
    P.sort_indices()
    C.sort_indices()
    return t(P), torch.ones(P.shape[0], dtype=torch.float64), t(C), torch.tensor(d, dtype=torch.float64)


def test_values_are_checked_on_every_call_of_a_known_pattern():
    layer = dQP.dQP_layer(settings=dQP.build_settings(solve_type="sparse", qp_solver="clarabel"))
    P = np.array([[2.0, 0.5], [0.5, 1.0]])
    C, d = np.array([[1.0, 1.0]]), np.array([1.0])
    z = layer(*_layer_inputs(P, C, d))[0]
    assert torch.isfinite(z).all()
    Pa = P.copy()
    Pa[0, 1] = 0.7  # same pattern, asymmetric values
    with pytest.raises(NotSymmetricError):
        layer(*_layer_inputs(Pa, C, d))
    Cn = C.copy()
    Cn[0, 0] = np.nan  # same pattern, a NaN
    with pytest.raises(NonFiniteError):
        layer(*_layer_inputs(P, Cn, d))


def test_a_malformed_pattern_is_caught_after_a_good_one_of_the_same_shape():
    layer = dQP.dQP_layer(settings=dQP.build_settings(solve_type="sparse", qp_solver="clarabel"))
    P, q, C, d = _layer_inputs(np.eye(2), np.array([[1.0, 1.0]]), np.array([1.0]))
    layer(P, q, C, d)
    bad = torch.sparse_csc_tensor(
        torch.tensor([0, 1, 2]),
        torch.tensor([0, 5]),
        torch.ones(2, dtype=torch.float64),
        (2, 2),
        check_invariants=False,
    )
    with pytest.raises(LayoutError, match="row_indices must lie in"):
        layer(bad, q, C, d)
