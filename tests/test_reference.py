"""`batchnorm.reference`, the oracle, checked against torch and against finite differences."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchnorm import reference as R


def _other_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis 1: (N, C, *) -> (0, 2, 3, ...)."""
    return (0, *range(2, x.ndim))


SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 2), (2, 3, 2, 3, 2)]


def _torch_train(x: np.ndarray, gamma, beta, eps: float, axis: int = 1) -> np.ndarray:
    """torch's training-mode batch_norm in float64, channels moved to axis 1 and back."""
    t = torch.from_numpy(x).movedim(axis, 1)
    y = F.batch_norm(t, None, None, torch.from_numpy(gamma), torch.from_numpy(beta), True, 0.0, eps)
    return y.movedim(1, axis).numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_torch_float64(shape, rng):
    x = rng.normal(3.0, 2.0, shape)
    C = shape[1]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    y, cache = R.forward(x, gamma, beta, eps=1e-5)
    assert y.dtype == np.float64 and y.shape == x.shape
    np.testing.assert_allclose(y, _torch_train(x, gamma, beta, 1e-5), rtol=1e-12, atol=1e-12)
    per_channel = (1, C) + (1,) * (x.ndim - 2)
    np.testing.assert_allclose(
        cache.x_hat * gamma.reshape(per_channel) + beta.reshape(per_channel), y, atol=1e-12
    )
    np.testing.assert_allclose(cache.invstd, 1 / np.sqrt(x.var(_other_axes(x)) + 1e-5), rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_forward_any_axis(axis, rng):
    x = rng.normal(-2.0, 3.0, (4, 5, 3))
    C = x.shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    y, _ = R.forward(x, gamma, beta, axis=axis)
    np.testing.assert_allclose(y, _torch_train(x, gamma, beta, 1e-5, axis), rtol=1e-12, atol=1e-12)


def test_forward_axis_last_equals_transposed(rng):
    x = rng.normal(size=(4, 6, 3))  # (N, L, C)
    y_last, _ = R.forward(x, axis=-1)
    y_first, _ = R.forward(x.transpose(0, 2, 1), axis=1)  # (N, C, L)
    np.testing.assert_allclose(y_last, y_first.transpose(0, 2, 1), atol=1e-14)


def test_forward_defaults_and_integer_input():
    x = np.arange(10).reshape(5, 2)  # integers become float64
    y, cache = R.forward(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(0), 8.0 / (8.0 + 1e-5), rtol=1e-12)  # biased var 8
    np.testing.assert_array_equal(cache.gamma, [1.0, 1.0])


def test_batch_stats_are_mean_and_biased_var(rng):
    x = rng.normal(size=(7, 3, 2))
    mean, var = R.batch_stats(x)
    np.testing.assert_allclose(mean, x.mean((0, 2)), rtol=1e-14)
    np.testing.assert_allclose(var, x.var((0, 2)), rtol=1e-13)  # ddof=0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_inference_matches_torch_eval(shape, rng):
    x = rng.normal(1.0, 2.0, shape)
    C = shape[1]
    mean, var = rng.normal(size=C), rng.uniform(0.5, 2.0, C)
    gamma, beta = rng.normal(size=C), rng.normal(size=C)
    y = R.forward_inference(x, mean, var, gamma, beta, eps=1e-3)
    want = F.batch_norm(*(torch.from_numpy(a) for a in (x, mean, var, gamma, beta)), False, 0.1, 1e-3)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-12, atol=1e-12)


def _loss(x, gamma, beta, dy, eps, axis):
    return float((R.forward(x, gamma, beta, eps, axis)[0] * dy).sum())


def _central_difference(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f / d a, one coordinate at a time (a is tiny, so a Python loop is fine here)."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("shape, axis", [((5, 2), 1), ((3, 2, 3), 1), ((2, 3, 2), -1)], ids=str)
def test_backward_matches_finite_differences(shape, axis, rng):
    x = rng.normal(1.0, 2.0, shape)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    dy = rng.normal(size=shape)
    eps = 1e-3
    _, cache = R.forward(x, gamma, beta, eps, axis)
    dx, dgamma, dbeta = R.backward(dy, cache)
    f = lambda: _loss(x, gamma, beta, dy, eps, axis)  # noqa: E731
    np.testing.assert_allclose(dx, _central_difference(f, x), atol=1e-7)
    np.testing.assert_allclose(dgamma, _central_difference(f, gamma), atol=1e-7)
    np.testing.assert_allclose(dbeta, _central_difference(f, beta), atol=1e-7)
    # a batch-norm input gradient sums to zero per channel and is orthogonal to x_hat
    dims = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    np.testing.assert_allclose(dx.sum(dims), 0.0, atol=1e-10)


@pytest.mark.parametrize("shape, axis", [((6, 3), 1), ((3, 4, 5), 1), ((2, 3, 4, 2), -1)], ids=str)
def test_backward_paper_equals_backward(shape, axis, rng):
    x = rng.normal(5.0, 3.0, shape)
    C = shape[axis]
    gamma = rng.uniform(0.5, 1.5, C)
    dy = rng.normal(size=shape)
    _, cache = R.forward(x, gamma, None, 1e-5, axis)
    simplified = R.backward(dy, cache)
    paper = R.backward_paper(dy, x, gamma, 1e-5, axis)
    for a, b in zip(simplified, paper):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_backward_matches_torch_autograd(rng):
    x = rng.normal(2.0, 1.5, (4, 3, 5))
    gamma, beta, dy = rng.uniform(0.5, 1.5, 3), rng.normal(size=3), rng.normal(size=x.shape)
    _, cache = R.forward(x, gamma, beta)
    dx, dgamma, dbeta = R.backward(dy, cache)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    F.batch_norm(xt, None, None, gt, bt, True).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_update_running_stats_matches_torch(momentum, rng):
    C = 3
    layer = torch.nn.BatchNorm1d(C, momentum=momentum, dtype=torch.float64)
    mean, var = np.zeros(C), np.ones(C)
    for step, n in enumerate([4, 7, 2, 5]):
        x = rng.normal(3.0, 2.0, (n, C, 3))
        mean, var = R.update_running_stats(mean, var, x, momentum, num_batches_tracked=step)
        layer(torch.from_numpy(x))
        np.testing.assert_allclose(mean, layer.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(var, layer.running_var.numpy(), rtol=1e-12)


def test_update_running_stats_momentum_none_is_cumulative_average(rng):
    batches = [rng.normal(size=(5, 2)) for _ in range(4)]
    mean, var = np.zeros(2), np.ones(2)
    for step, x in enumerate(batches):
        mean, var = R.update_running_stats(mean, var, x, None, num_batches_tracked=step)
    np.testing.assert_allclose(mean, np.mean([b.mean(0) for b in batches], 0), rtol=1e-12)
    np.testing.assert_allclose(var, np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-12)


def test_update_running_stats_axis_last(rng):
    x = rng.normal(size=(4, 6, 3))  # (N, L, C)
    a = R.update_running_stats(np.zeros(3), np.ones(3), x, 0.5, axis=-1)
    b = R.update_running_stats(np.zeros(3), np.ones(3), x.transpose(0, 2, 1), 0.5, axis=1)
    np.testing.assert_allclose(a, b, rtol=1e-14)


@pytest.mark.parametrize("axis", [1, -1])
def test_population_statistics_over_uneven_batches_is_exact(axis, rng):
    sizes = [1, 7, 3, 16, 2]
    # batches with different means, so averaging batch variances would be wrong
    batches = [rng.normal(10.0 * i, 1.0 + i, (n, 4, 3)) for i, n in enumerate(sizes)]
    mean, var = R.population_statistics(iter(batches), axis=axis)
    data = np.concatenate(batches)
    dims = tuple(d for d in range(3) if d != axis % 3)
    np.testing.assert_allclose(mean, data.mean(dims), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, data.var(dims, ddof=1), rtol=1e-12, atol=1e-12)
    # The paper's average of unbiased batch variances differs here: the test can tell.
    naive = np.mean([b.var(dims, ddof=1) for b in batches if b.size > b.shape[axis]], 0)
    assert not np.allclose(naive, var, rtol=1e-2)


def test_population_statistics_single_batch_equals_batch_moments(rng):
    x = rng.normal(size=(9, 2, 2))
    mean, var = R.population_statistics([x])
    np.testing.assert_allclose(mean, x.mean((0, 2)), rtol=1e-14)
    np.testing.assert_allclose(var, x.var((0, 2), ddof=1), rtol=1e-13)


def test_population_statistics_needs_a_batch():
    with pytest.raises(ValueError, match="at least one"):
        R.population_statistics([])


@pytest.mark.parametrize("module", ["reference.py", "moments.py"])
def test_reference_imports_numpy_only(module):
    """The oracle must not lean on torch: it is what torch paths are checked against."""
    src = Path(R.__file__).with_name(module).read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported
    assert imported <= {"__future__", "numpy", "typing", "collections"}
