"""(count, mean, M2) and Chan's merge: equal to direct computation, on NumPy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm.moments import Moments, merge, merge_all, merge_stacked
from batchnorm.reference import batch_moments


def _direct(x: np.ndarray) -> Moments:
    """Moments of (n, C) data straight from the definition."""
    mean = x.mean(0)
    return Moments(np.full(x.shape[1], x.shape[0], dtype=x.dtype), mean, ((x - mean) ** 2).sum(0))


def _assert_moments_close(a: Moments, b: Moments, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    for got, want in zip(a, b):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol)


def _empty(C: int) -> Moments:
    return Moments(np.zeros(C), np.zeros(C), np.zeros(C))


def test_merge_equals_direct_computation(rng):
    a, b = rng.normal(5.0, 2.0, (7, 3)), rng.normal(-3.0, 0.5, (2, 3))
    merged = merge(_direct(a), _direct(b))
    _assert_moments_close(merged, _direct(np.concatenate([a, b])))
    np.testing.assert_allclose(merged.biased_var, np.concatenate([a, b]).var(0), rtol=1e-12)
    np.testing.assert_allclose(merged.unbiased_var, np.concatenate([a, b]).var(0, ddof=1), rtol=1e-12)


def test_merge_is_associative_and_commutative(rng):
    a, b, c = (_direct(rng.normal(i, 1 + i, (n, 2))) for i, n in enumerate([3, 10, 1]))
    left = merge(merge(a, b), c)
    _assert_moments_close(merge(a, merge(b, c)), left)
    _assert_moments_close(merge(c, merge(b, a)), left)


def test_empty_group_is_the_identity(rng):
    a = _direct(rng.normal(size=(5, 3)))
    _assert_moments_close(merge(_empty(3), a), a, rtol=0, atol=0)
    _assert_moments_close(merge(a, _empty(3)), a, rtol=0, atol=0)
    both = merge(_empty(3), _empty(3))
    _assert_moments_close(both, _empty(3), rtol=0, atol=0)  # no 0/0 NaN
    assert np.all(both.biased_var == 0) and np.all(both.unbiased_var == 0)


def test_merge_all_equals_concatenation_and_needs_a_group(rng):
    parts = [rng.normal(i, 1.0, (n, 4)) for i, n in enumerate([1, 2, 5, 8])]
    _assert_moments_close(merge_all(_direct(p) for p in parts), _direct(np.concatenate(parts)))
    with pytest.raises(ValueError, match="at least one"):
        merge_all([])


def test_merge_stacked_equals_merge_all(rng):
    sizes = [3, 1, 6, 0, 4]  # an empty group among them
    groups = [_direct(rng.normal(2.0 * i, 1.0, (n, 3))) if n else _empty(3) for i, n in enumerate(sizes)]
    count = np.stack([g.count for g in groups])  # (K, C)
    mean = np.stack([g.mean for g in groups])
    m2 = np.stack([g.m2 for g in groups])
    _assert_moments_close(merge_stacked(count, mean, m2), merge_all(groups))
    # counts given once per group, (K, 1), broadcast against C; the count comes back (1,)
    once = merge_stacked(count[:, :1], mean, m2)
    whole = merge_all(groups)
    np.testing.assert_array_equal(once.count, [sum(sizes)])
    np.testing.assert_allclose(once.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(once.m2, whole.m2, rtol=1e-12)


def test_works_on_torch_tensors(rng):
    a, b = rng.normal(1.0, 2.0, (6, 3)), rng.normal(4.0, 1.0, (3, 3))
    ma, mb = _direct(a), _direct(b)
    ta, tb = (Moments(*(torch.from_numpy(np.asarray(v)) for v in m)) for m in (ma, mb))
    merged = merge(ta, tb)
    assert all(isinstance(v, torch.Tensor) for v in merged)
    _assert_moments_close(Moments(*(v.numpy() for v in merged)), merge(ma, mb))
    stacked = merge_stacked(*(torch.stack([x, y]) for x, y in zip(ta, tb)))
    assert isinstance(stacked.mean, torch.Tensor)
    _assert_moments_close(Moments(*(v.numpy() for v in stacked)), merge(ma, mb))
    assert isinstance(merged.unbiased_var, torch.Tensor)
    np.testing.assert_allclose(merged.unbiased_var.numpy(), np.concatenate([a, b]).var(0, ddof=1))


def test_merge_keeps_float32_precision_at_large_offsets():
    """Mean 1e4, unit spread, float32: M2 stays accurate (no E[x^2] - E[x]^2)."""
    x64 = 1e4 + np.random.default_rng(1).standard_normal((4000, 2))
    x32 = x64.astype(np.float32)
    parts = np.array_split(x32, 7)
    total = merge_all(batch_moments(p, axis=1) for p in parts)
    assert total.mean.dtype == np.float32
    want = x32.astype(np.float64).var(0, ddof=1)
    np.testing.assert_allclose(total.unbiased_var, want, rtol=1e-3)
    naive = (x32 * x32).mean(0) - x32.mean(0) ** 2  # the cancelling formula, in float32
    assert np.abs(naive - want).max() > 1e-2  # it is visibly wrong here: the check is sharp


def test_batch_moments_matches_direct(rng):
    x = rng.normal(3.0, 1.0, (5, 2, 4))  # channel axis 1
    flat = x.transpose(0, 2, 1).reshape(-1, 2)  # (N*L, C)
    _assert_moments_close(batch_moments(x, axis=1), _direct(flat))
    _assert_moments_close(batch_moments(x.transpose(0, 2, 1), axis=-1), _direct(flat))


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(lambda s: sum(s) > 1),
    offset=st.floats(-1e4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_any_partition_merges_to_the_whole(sizes, offset, seed):
    data = np.random.default_rng(seed).normal(offset, 1.0, (sum(sizes), 2))
    parts = np.split(data, np.cumsum(sizes)[:-1])
    groups = [_direct(p) if len(p) else _empty(2) for p in parts]
    whole = _direct(data)
    _assert_moments_close(merge_all(groups), whole, rtol=1e-9, atol=1e-8)
    K = len(groups)
    stacked = merge_stacked(*(np.stack([g[i] for g in groups]).reshape(K, -1) for i in range(3)))
    _assert_moments_close(stacked, whole, rtol=1e-9, atol=1e-8)
