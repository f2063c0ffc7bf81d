"""`batchnorm.functional.batch_norm`: gradients, reference as oracle, properties, dtypes, empty batches."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

import batchnorm as bn
from batchnorm import reference as R
from batchnorm.functional import batch_norm

f64 = torch.float64


def test_signature_is_torchs_plus_axis():
    ours = list(inspect.signature(batch_norm).parameters)
    theirs = list(inspect.signature(F.batch_norm).parameters)
    assert ours[: len(theirs)] == theirs
    assert inspect.signature(batch_norm).parameters["axis"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(batch_norm).parameters["axis"].default == 1


# --------------------------------------------------------------------------- gradients

GRAD_CASES = {
    "train-affine": dict(training=True, affine=True, bias=True, axis=1, shape=(4, 3, 2)),
    "train-plain": dict(training=True, affine=False, bias=False, axis=1, shape=(5, 2)),
    "train-weight-only": dict(training=True, affine=True, bias=False, axis=1, shape=(3, 2, 3)),
    "train-axis-last": dict(training=True, affine=True, bias=True, axis=-1, shape=(2, 4, 3)),
    "eval": dict(training=False, affine=True, bias=True, axis=1, shape=(3, 2, 2)),
    "eval-axis-last": dict(training=False, affine=True, bias=True, axis=-1, shape=(3, 2, 2)),
}


def _grad_inputs(case: dict):
    shape, axis = case["shape"], case["axis"]
    C = shape[axis]
    x = (torch.randn(shape, dtype=f64) * 2 + 1).requires_grad_()
    w = (torch.rand(C, dtype=f64) + 0.5).requires_grad_() if case["affine"] else None
    b = torch.randn(C, dtype=f64).requires_grad_() if case["bias"] else None
    rm, rv = None, None
    if not case["training"]:
        rm, rv = torch.randn(C, dtype=f64), torch.rand(C, dtype=f64) + 0.5

    def fn(*args):
        x, *rest = args
        w = rest.pop(0) if case["affine"] else None
        b = rest.pop(0) if case["bias"] else None
        return batch_norm(x, rm, rv, w, b, case["training"], 0.1, 1e-3, axis=axis)

    return fn, tuple(t for t in (x, w, b) if t is not None)


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(name):
    fn, inputs = _grad_inputs(GRAD_CASES[name])
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradgradcheck(name):
    fn, inputs = _grad_inputs(GRAD_CASES[name])
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_gradient_penalty_matches_torch():
    """d/dx ||d(sum y*g)/dx||^2 through our backward equals torch's double backward."""
    x = torch.randn(6, 3, 4, dtype=f64) + 2
    w, b = torch.rand(3, dtype=f64) + 0.5, torch.randn(3, dtype=f64)
    g = torch.randn(6, 3, 4, dtype=f64)
    results = []
    for fn in (batch_norm, F.batch_norm):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, None, None, ww, b, True)
        (dx,) = torch.autograd.grad((y * g).sum(), xx, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (xx, ww)))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- against the reference


@st.composite
def _bn_cases(draw):
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    assume(math.prod(shape) // shape[axis] > 1)  # more than one value per channel
    offset = draw(st.sampled_from([0.0, 1e3, -1e3, 1e4, -1e4]))
    spread = draw(st.sampled_from([1e-2, 1.0, 1e2, 1e3]))
    affine = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return shape, axis, offset, spread, affine, momentum, seed


@settings(max_examples=30, deadline=None)
@given(case=_bn_cases())
def test_training_matches_reference(case):
    shape, axis, offset, spread, affine, momentum, seed = case
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = rng.normal(offset, spread, shape)
    gamma = rng.uniform(0.5, 1.5, C) if affine else None
    beta = rng.normal(size=C) if affine else None
    dy = rng.normal(size=shape)
    rm0, rv0 = rng.normal(size=C), rng.uniform(0.5, 2.0, C)

    y_ref, cache = R.forward(x, gamma, beta, 1e-5, axis)
    dx_ref, dg_ref, db_ref = R.backward(dy, cache)
    rm_ref, rv_ref = R.update_running_stats(rm0, rv0, x, momentum, axis=axis)

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(gamma, requires_grad=True) if affine else None
    bt = torch.tensor(beta, requires_grad=True) if affine else None
    rm, rv = torch.tensor(rm0), torch.tensor(rv0)
    y = batch_norm(xt, rm, rv, wt, bt, True, momentum, 1e-5, axis=axis)
    y.backward(torch.tensor(dy))

    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-8, atol=1e-8)
    dx_scale = np.abs(dx_ref).max() + 1.0
    np.testing.assert_allclose(xt.grad.numpy(), dx_ref, rtol=1e-7, atol=1e-8 * dx_scale)
    if affine:
        np.testing.assert_allclose(wt.grad.numpy(), dg_ref, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(bt.grad.numpy(), db_ref, rtol=1e-10, atol=1e-10)
    # running_var carries the offset's rounding: compare relative to the data's magnitude
    np.testing.assert_allclose(rm.numpy(), rm_ref, rtol=1e-10, atol=1e-10 * (abs(offset) + 1))
    np.testing.assert_allclose(rv.numpy(), rv_ref, rtol=1e-7, atol=1e-9 * (abs(offset) + spread) ** 2)


@settings(max_examples=30, deadline=None)
@given(case=_bn_cases())
def test_eval_matches_reference(case):
    shape, axis, offset, spread, affine, _, seed = case
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = rng.normal(offset, spread, shape)
    mean, var = rng.normal(offset, spread, C), rng.uniform(0.5, 2.0, C) * spread**2
    gamma = rng.uniform(0.5, 1.5, C) if affine else None
    beta = rng.normal(size=C) if affine else None
    want = R.forward_inference(x, mean, var, gamma, beta, 1e-5, axis)
    rm, rv = torch.tensor(mean), torch.tensor(var)
    got = batch_norm(
        torch.tensor(x), rm, rv, *(None if a is None else torch.tensor(a) for a in (gamma, beta)),
        False, 0.1, 1e-5, axis=axis,
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9 * (abs(offset) / spread + 1))
    np.testing.assert_array_equal(rm.numpy(), mean)  # eval never touches the statistics
    np.testing.assert_array_equal(rv.numpy(), var)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("axis", [1, -1])
def test_training_output_has_zero_mean_unit_variance(dtype, axis):
    x = (torch.randn(16, 4, 5, dtype=f64) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1) + 7).to(dtype)
    if axis == -1:
        x = x.transpose(1, 2).contiguous()  # (N, L, C)
    y = batch_norm(x, None, None, training=True, eps=1e-5, axis=axis).double()
    dims = (0, 2) if axis == 1 else (0, 1)
    atol = 1e-12 if dtype == f64 else 5e-5
    assert_close(y.mean(dims), torch.zeros(4, dtype=f64), atol=atol, rtol=0)
    # biased variance var / (var + eps): 1 up to eps over the channel's variance
    var = x.double().var(dims, correction=0)
    assert_close(y.var(dims, correction=0), var / (var + 1e-5), atol=atol, rtol=0)
    assert_close(y.var(dims, correction=0)[1:], torch.ones(3, dtype=f64), atol=2e-3, rtol=0)


def test_worked_example_one_to_five():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=f64).view(5, 1)  # (N=5, C=1)
    rm, rv = torch.zeros(1, dtype=f64), torch.ones(1, dtype=f64)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0, eps=1e-5)
    assert float(rm) == pytest.approx(3.0)  # mean 3
    assert float(rv) == pytest.approx(2.5)  # unbiased 2.5 stored, ...
    mean, var = R.batch_stats(x.numpy())
    assert float(mean[0]) == 3.0 and float(var[0]) == 2.0  # ... biased 2 normalises
    assert_close(y.view(5), torch.tensor([-1.41, -0.71, 0.0, 0.71, 1.41], dtype=f64), atol=5e-3, rtol=0)
    assert_close(y.view(5), torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=f64) / math.sqrt(2 + 1e-5))


def test_momentum_one_stores_the_batch_statistics():
    x = torch.randn(8, 3, 4, dtype=f64) * 3 + 2
    rm, rv = torch.randn(3, dtype=f64), torch.rand(3, dtype=f64)
    batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert_close(rm, x.mean((0, 2)))
    assert_close(rv, x.var((0, 2), correction=1))


def test_momentum_zero_keeps_the_running_statistics():
    rm, rv = torch.randn(3, dtype=f64), torch.rand(3, dtype=f64)
    before = rm.clone(), rv.clone()
    batch_norm(torch.randn(8, 3, dtype=f64), rm, rv, training=True, momentum=0.0)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_float32_stable_at_mean_1e4():
    """Mean 1e4, std 1 in float32: no E[x^2] - E[x]^2 cancellation anywhere."""
    x = (1e4 + torch.randn(256, 4, 8, dtype=f64)).float()
    rm, rv = torch.zeros(4), torch.ones(4)
    xg = x.clone().requires_grad_()
    y = batch_norm(xg, rm, rv, training=True, momentum=1.0)
    dy = torch.randn_like(x)
    y.backward(dy)

    x64 = x.double().numpy()  # the very same float32 values, exactly, in float64
    y_ref, cache = R.forward(x64, eps=1e-5)
    dx_ref, _, _ = R.backward(dy.double().numpy(), cache)
    # y = x * scale + shift rounds terms of size |mean| / std = 1e4 in float32: a few
    # units in the last place of 1e4 (~1e-3) is the floor. A cancelling variance
    # would be off by a factor of order 1 here, and y with it.
    ulp = float(np.spacing(np.float32(1e4)))  # 9.8e-4
    assert np.abs(y.detach().double().numpy() - y_ref).max() < 3 * ulp
    assert np.abs(xg.grad.double().numpy() - dx_ref).max() < 1e-3
    var_ref = x64.var((0, 2), ddof=1)
    np.testing.assert_allclose(rv.numpy(), var_ref, rtol=2e-3)
    # The check has teeth: the one-pass formula in float32 is far off on this data.
    naive = (x * x).mean((0, 2)) - x.mean((0, 2)) ** 2
    assert np.abs(naive.double().numpy() - x64.var((0, 2))).max() > 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_input_with_float32_params_matches_torch(dtype, training, tol):
    C = 4
    x = (torch.randn(6, C, 5, 3) * 2 + 3).to(dtype)
    g = torch.randn(6, C, 5, 3).to(dtype)
    w0, b0 = torch.rand(C) + 0.5, torch.randn(C)
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    outs = []
    for fn in (batch_norm, F.batch_norm):
        xx, w, b = x.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = rm0.clone(), rv0.clone()
        y = fn(xx, rm, rv, w, b, training, 0.1, 1e-5)
        y.backward(g)
        outs.append((y, xx.grad, w.grad, b.grad, rm, rv))
    (y, dx, dw, db, rm, rv), (ty, tdx, tdw, tdb, trm, trv) = outs
    assert y.dtype == dtype and dx.dtype == dtype
    assert rm.dtype == torch.float32 and dw.dtype == torch.float32
    assert_close(y, ty, **tol(dtype))
    assert_close(dx, tdx, rtol=tol(dtype)["rtol"], atol=tol(dtype)["atol"] * (float(tdx.abs().max()) + 1))
    assert_close(dw, tdw, rtol=1e-4, atol=1e-3)
    assert_close(db, tdb, rtol=1e-4, atol=1e-3)
    assert_close(rm, trm, rtol=1e-5, atol=1e-5)
    assert_close(rv, trv, rtol=1e-5, atol=1e-5)
    if training:
        assert not torch.equal(rm, rm0)  # the statistics did move, in float32


# --------------------------------------------------------------------------- zero-size batches


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_zero_size_batch_like_torch(shape, training):
    theirs = torch.nn.BatchNorm2d(3)
    ours = bn.BatchNorm2d(3)
    for layer in (theirs, ours):
        layer.train(training)
        with torch.no_grad():
            layer.running_mean.fill_(0.5)
            layer.running_var.fill_(2.0)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    xs = [torch.randn(shape, requires_grad=True) for _ in range(2)]
    ys = [layer(x) for layer, x in zip((theirs, ours), xs)]
    for y in ys:
        y.sum().backward()
    ya, yb = ys
    assert yb.shape == ya.shape == shape and yb.dtype == ya.dtype
    assert xs[1].grad is not None and xs[1].grad.shape == shape
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert torch.equal(ours.running_var, before["running_var"])
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
    assert torch.equal(ours.running_mean, theirs.running_mean)
    for name in ("weight", "bias"):
        grad = getattr(ours, name).grad
        assert grad is not None and torch.equal(grad, torch.zeros(3))
        assert torch.equal(grad, getattr(theirs, name).grad)


def test_zero_size_batch_functional():
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(torch.empty(0, 3), rm, rv, training=True)
    assert y.shape == (0, 3)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
