"""The paper's math in NumPy: the oracle every fast path is tested against.

Ioffe & Szegedy 2015 (arXiv 1502.03167), for a channel whose m values in the
mini-batch B are x_1..x_m:

Algorithm 1, the transform (training):

    mu_B      = 1/m * sum_i x_i
    sigma2_B  = 1/m * sum_i (x_i - mu_B)**2          (biased)
    x_hat_i   = (x_i - mu_B) / sqrt(sigma2_B + eps)
    y_i       = gamma * x_hat_i + beta

Algorithm 2, inference: the same affine map with the statistics of the whole
training data in place of the batch's, E[x] and the unbiased Var[x]:

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma * E[x] / sqrt(Var[x] + eps))

Statistics are per channel over every other axis: for an (N, C, H, W) input a
channel's "mini-batch" is its N*H*W values. Every function takes `axis`, the
channel axis, so (N, L, C) sequences use axis=-1.

Everything is float64 unless the caller passes another float dtype; this file
imports NumPy and nothing else, so a reader can follow it line by line.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from .moments import Moments, merge_all

__all__ = [
    "Cache",
    "RenormCache",
    "backward",
    "backward_paper",
    "batch_moments",
    "batch_stats",
    "forward",
    "forward_inference",
    "population_statistics",
    "renorm_backward",
    "renorm_forward",
    "update_running_stats",
]


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _reduce_axes(x: np.ndarray, axis: int) -> tuple[int, ...]:
    axis = axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != axis)


def _per_channel(v: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """Reshape a (C,) vector to broadcast against x along the channel axis."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(v).reshape(shape)


def batch_moments(x: np.ndarray, axis: int = 1) -> Moments:
    """(count, mean, M2) per channel, computed in two passes (exact, no cancellation)."""
    x = _as_float(x)
    dims = _reduce_axes(x, axis)
    count = x.size // x.shape[axis] if x.shape[axis] else 0
    mean = x.mean(axis=dims) if count else np.zeros(x.shape[axis], x.dtype)
    dev = x - _per_channel(mean, x, axis)
    m2 = (dev * dev).sum(axis=dims)
    return Moments(np.full(x.shape[axis], count, dtype=x.dtype), mean, m2)


def batch_stats(x: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """mu_B and the biased sigma2_B per channel (Algorithm 1, lines 1-2)."""
    mom = batch_moments(x, axis)
    return mom.mean, mom.biased_var


class Cache(NamedTuple):
    """What the backward pass needs from the forward pass."""

    x_hat: np.ndarray  # same shape as x
    invstd: np.ndarray  # (C,) 1 / sqrt(sigma2_B + eps)
    gamma: np.ndarray  # (C,)
    axis: int


def forward(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, Cache]:
    """Algorithm 1: normalize with the batch's own statistics, then scale and shift.

    x: any shape with channels on `axis`; gamma, beta: (C,) or None (1 and 0).
    Returns y (shape of x) and the Cache for `backward`.
    """
    x = _as_float(x)
    C = x.shape[axis]
    gamma = np.ones(C, x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    beta = np.zeros(C, x.dtype) if beta is None else np.asarray(beta, x.dtype)
    mean, var = batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - _per_channel(mean, x, axis)) * _per_channel(invstd, x, axis)
    y = _per_channel(gamma, x, axis) * x_hat + _per_channel(beta, x, axis)
    return y, Cache(x_hat, invstd, gamma, axis)


def forward_inference(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> np.ndarray:
    """Algorithm 2's output: y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta.

    mean and var are fixed per-channel statistics (running averages or
    `population_statistics`), so this is one affine map per channel.
    """
    x = _as_float(x)
    C = x.shape[axis]
    gamma = np.ones(C, x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    beta = np.zeros(C, x.dtype) if beta is None else np.asarray(beta, x.dtype)
    scale = gamma / np.sqrt(np.asarray(var, x.dtype) + eps)
    shift = beta - np.asarray(mean, x.dtype) * scale
    return x * _per_channel(scale, x, axis) + _per_channel(shift, x, axis)


def backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of Algorithm 1: (dx, dgamma, dbeta).

    The paper (section 3) writes the chain rule through sigma2_B and mu_B:

        dx_hat   = dy * gamma
        dsigma2  = sum(dx_hat * (x - mu) * -1/2 * (sigma2 + eps)**-3/2)
        dmu      = sum(dx_hat * -1/sqrt(sigma2 + eps)) + dsigma2 * sum(-2 (x - mu)) / m
        dx       = dx_hat / sqrt(sigma2 + eps) + dsigma2 * 2 (x - mu) / m + dmu / m

    Since sum(x - mu) = 0 the middle term of dmu vanishes. Substituting
    x - mu = x_hat * sigma (sigma = sqrt(sigma2 + eps)):

        dsigma2 = -1/(2 sigma2) * gamma * sum(dy * x_hat)      (with sigma2 + eps)
        dmu     = -gamma / sigma * sum(dy)

    and collecting terms gives one line that needs only two reductions,
    sum(dy) and sum(dy * x_hat), which are also dbeta and dgamma:

        dx = gamma / (m * sigma) * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))

    So the backward is one reduction pass and one elementwise pass.
    """
    x_hat, invstd, gamma, axis = cache
    dy = np.asarray(dy, x_hat.dtype)
    dims = _reduce_axes(x_hat, axis)
    m = x_hat.size // x_hat.shape[axis]
    dbeta = dy.sum(axis=dims)
    dgamma = (dy * x_hat).sum(axis=dims)
    k = _per_channel(gamma * invstd / m, x_hat, axis)
    dx = k * (m * dy - _per_channel(dbeta, x_hat, axis) - x_hat * _per_channel(dgamma, x_hat, axis))
    return dx, dgamma, dbeta


def backward_paper(
    dy: np.ndarray, x: np.ndarray, gamma: np.ndarray | None = None, eps: float = 1e-5, axis: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's section 3 chain rule, term by term, unsimplified.

    Kept as a second derivation: the tests check it equals `backward`.
    """
    x = _as_float(x)
    C = x.shape[axis]
    gamma = np.ones(C, x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    dims = _reduce_axes(x, axis)
    m = x.size // C
    mu, var = batch_stats(x, axis)
    xc = x - _per_channel(mu, x, axis)
    sigma2 = _per_channel(var + eps, x, axis)
    x_hat = xc / np.sqrt(sigma2)
    dx_hat = dy * _per_channel(gamma, x, axis)
    dsigma2 = (dx_hat * xc * -0.5 * sigma2**-1.5).sum(axis=dims, keepdims=True)
    dmu = (dx_hat * -1.0 / np.sqrt(sigma2)).sum(axis=dims, keepdims=True) + dsigma2 * (
        -2.0 * xc
    ).sum(axis=dims, keepdims=True) / m
    dx = dx_hat / np.sqrt(sigma2) + dsigma2 * 2.0 * xc / m + dmu / m
    return dx, (dy * x_hat).sum(axis=dims), np.asarray(dy).sum(axis=dims)


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    x: np.ndarray,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
    axis: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's running-statistics rule, returning the new (mean, var).

        running = (1 - f) * running + f * batch_statistic

    with f = momentum (the weight of the new batch; Keras and Flax call
    1 - f their momentum), or f = 1 / (num_batches_tracked + 1) when momentum
    is None, a cumulative average over the batches seen. The variance stored
    is the unbiased batch variance m / (m - 1) * sigma2_B, as in Algorithm 2;
    normalisation itself uses the biased one.
    """
    mom = batch_moments(x, axis)
    f = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
    new_mean = (1 - f) * np.asarray(running_mean) + f * mom.mean
    new_var = (1 - f) * np.asarray(running_var) + f * mom.unbiased_var
    return new_mean, new_var


def population_statistics(
    batches: Iterable[np.ndarray], axis: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2's E[x] and Var[x] over many batches, exactly.

    The paper averages batch means and batch variances (times m/(m-1)); that
    is exact only for equal batches and ignores the spread of the batch means
    when variances are averaged. Merging (count, mean, M2) with Chan's formula
    gives the mean and the unbiased variance of all values seen, whatever the
    batch sizes: the same numbers as concatenating the data first.
    """
    total = merge_all(batch_moments(b, axis) for b in batches)
    return total.mean, total.unbiased_var


class RenormCache(NamedTuple):
    """What `renorm_backward` needs from `renorm_forward`."""

    xc: np.ndarray  # x - mu_B, same shape as x
    sigma_b: np.ndarray  # (C,) sqrt(sigma2_B + eps)
    r: np.ndarray  # (C,) the clipped r, a constant for the gradient
    d: np.ndarray  # (C,) the clipped d, a constant for the gradient
    x_hat: np.ndarray  # same shape as x: (x - mu_B) / sigma_B * r + d
    gamma: np.ndarray  # (C,)
    axis: int


def renorm_forward(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    r_max: float,
    d_max: float,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, RenormCache]:
    """Batch Renormalization (Ioffe 2017, arXiv 1702.03275, Algorithm 1), training step.

    Per channel over the m values of the mini-batch B, with the moving
    averages mu = running_mean and sigma = sqrt(running_var + eps):

        mu_B    = 1/m sum x_i,     sigma_B = sqrt(1/m sum (x_i - mu_B)**2 + eps)
        r       = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
        d       = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        x_hat_i = (x_i - mu_B) / sigma_B * r + d
        y_i     = gamma * x_hat_i + beta

    r_max = 1, d_max = 0 give r = 1, d = 0: plain BN (Algorithm 1 of Ioffe &
    Szegedy 2015). Unclipped, x_hat = (x - mu) / sigma: the inference
    transform of the same state. The moving averages are inputs only; their
    update is not part of this function (see `update_running_stats`).

    x: any shape with channels on `axis`; running_mean, running_var, gamma,
    beta: (C,) (gamma, beta None for 1 and 0). Returns y and the cache for
    `renorm_backward`, which also holds r and d.
    """
    x = _as_float(x)
    C = x.shape[axis]
    gamma = np.ones(C, x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    beta = np.zeros(C, x.dtype) if beta is None else np.asarray(beta, x.dtype)
    mu_b, var_b = batch_stats(x, axis)
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(np.asarray(running_var, x.dtype) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - np.asarray(running_mean, x.dtype)) / sigma, -d_max, d_max)
    xc = x - _per_channel(mu_b, x, axis)
    x_hat = xc / _per_channel(sigma_b, x, axis) * _per_channel(r, x, axis) + _per_channel(d, x, axis)
    y = _per_channel(gamma, x, axis) * x_hat + _per_channel(beta, x, axis)
    return y, RenormCache(xc, sigma_b, r, d, x_hat, gamma, axis)


def renorm_backward(dy: np.ndarray, cache: RenormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of `renorm_forward`: (dx, dgamma, dbeta), the paper's chain rule with r, d constant.

    Ioffe 2017, section 3, per channel over the m values:

        dx_hat_i = dy_i * gamma
        dsigma_B = sum_i dx_hat_i * (x_i - mu_B) * (-r / sigma_B**2)
        dmu_B    = -r / sigma_B * sum_i dx_hat_i
        dx_i     = dx_hat_i * r / sigma_B + dsigma_B * (x_i - mu_B) / (m * sigma_B) + dmu_B / m
        dgamma   = sum_i dy_i * x_hat_i,    dbeta = sum_i dy_i

    (d sigma_B / d x_i = (x_i - mu_B) / (m sigma_B) and d mu_B / d x_i = 1/m;
    the dependence of sigma_B on mu_B drops out because sum (x_i - mu_B) = 0.)
    With r = 1 and d = 0 this is `backward`; r and d are not differentiated,
    so finite differences of `renorm_forward` do not give these numbers
    unless r and d are held fixed.
    """
    xc, sigma_b, r, _d, x_hat, gamma, axis = cache
    dy = np.asarray(dy, xc.dtype)
    dims = _reduce_axes(xc, axis)
    m = xc.size // xc.shape[axis]
    s_b, r_c = _per_channel(sigma_b, xc, axis), _per_channel(r, xc, axis)
    dx_hat = dy * _per_channel(gamma, xc, axis)
    dsigma_b = (dx_hat * xc).sum(axis=dims, keepdims=True) * (-r_c / s_b**2)
    dmu_b = -r_c / s_b * dx_hat.sum(axis=dims, keepdims=True)
    dx = dx_hat * r_c / s_b + dsigma_b * xc / (m * s_b) + dmu_b / m
    return dx, (dy * x_hat).sum(axis=dims), dy.sum(axis=dims)
