"""Per-channel moments as (count, mean, M2), merged with Chan's formula.

One algebra serves every place where statistics are combined: the values of a
batch, the chunks of a ghost batch, the real elements under a mask, the ranks
of a process group, and the batches of a whole data set (the paper's
Algorithm 2). For two groups a and b with delta = mean_b - mean_a:

    n    = n_a + n_b
    mean = mean_a + delta * n_b / n
    M2   = M2_a + M2_b + delta**2 * n_a * n_b / n

(Chan, Golub & LeVeque 1979). M2 is the sum of squared deviations from the
mean, so the biased variance is M2 / n and the unbiased one M2 / (n - 1).
Unlike E[x^2] - E[x]^2 this never subtracts two large, nearly equal numbers,
so a mean of 1e4 with unit spread keeps its precision in float32.

The functions use arithmetic operators only, so they work unchanged on NumPy
arrays (the reference) and on torch tensors (the layers, SyncBN, the tools).
An empty group (n = 0) is the identity of the merge.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Moments(NamedTuple):
    """Counts, means and sums of squared deviations, one per channel."""

    count: Any  # (C,) or scalar
    mean: Any  # (C,)
    m2: Any  # (C,)

    @property
    def biased_var(self) -> Any:
        """M2 / n: what the paper normalizes with (0 for an empty group)."""
        return self.m2 / _nonzero(self.count)

    @property
    def unbiased_var(self) -> Any:
        """M2 / (n - 1): what `running_var` stores (Bessel's correction)."""
        return self.m2 / _nonzero(self.count - 1)


def _nonzero(n: Any) -> Any:
    # n + (n == 0): divides by 1 where n is 0, whatever the array type.
    return n + (n == 0)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan's parallel merge of two groups' moments (see the module docstring)."""
    n = a.count + b.count
    delta = b.mean - a.mean
    frac_b = b.count / _nonzero(n)  # 0 when both groups are empty
    mean = a.mean + delta * frac_b
    m2 = a.m2 + b.m2 + delta * delta * a.count * frac_b
    return Moments(n, mean, m2)


def merge_all(parts: Any) -> Moments:
    """Merge an iterable of Moments left to right; raises on an empty iterable."""
    it = iter(parts)
    try:
        total = next(it)
    except StopIteration:
        raise ValueError("merge_all needs at least one group of moments") from None
    for part in it:
        total = merge(total, part)
    return total


def merge_stacked(count: Any, mean: Any, m2: Any) -> Moments:
    """Merge K groups stacked along the first axis, all at once.

    count, mean, m2 have shape (K, C) (count may be (K, 1) or (K,) broadcast
    against C). This is Chan's merge written for many groups: the total mean
    is the count-weighted mean, and M2 adds each group's spread about its own
    mean to the spread of the group means about the total mean:

        M2 = sum_k M2_k + sum_k n_k * (mean_k - mean)**2

    which is exact (the pairwise formula, unrolled) and vectorised over K.
    """
    n = count.sum(0)
    mean_total = (count * mean).sum(0) / _nonzero(n)
    dev = mean - mean_total
    m2_total = m2.sum(0) + (count * dev * dev).sum(0)
    return Moments(n, mean_total, m2_total)
