"""The variants of issue 4 on one process: ghost batches, batch renormalization, masks, frozen layers.

Every variant is compared with an oracle of its formula: plain BN applied per
chunk or to the gathered real elements (torch's autograd for the gradients,
`batchnorm.reference` for the outputs), `reference.renorm_forward` /
`renorm_backward` for batch renormalization, torchvision's FrozenBatchNorm2d
formula for frozen layers. All in float64 with small shapes (the general path), except the
ghost batches and masks on the CPU kernel (float32 and bfloat16 in the kernel's layouts, against
the same oracles in float64).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.testing import assert_close

import batchnorm as bn
from batchnorm import functional as functional_module
from batchnorm import reference as R
from batchnorm.functional import batch_norm
from batchnorm.kernels import cpu as cpu_kernel

f64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-5


def _close(actual, expected, **tol) -> None:
    """assert_close for tensors or arrays, float64 tolerances by default."""
    a = torch.as_tensor(np.asarray(actual.detach() if isinstance(actual, torch.Tensor) else actual))
    e = torch.as_tensor(np.asarray(expected.detach() if isinstance(expected, torch.Tensor) else expected))
    assert_close(a, e.to(a.dtype), **(tol or TOL))


def _randomize(layer: torch.nn.Module) -> torch.nn.Module:
    """Non-default parameters and running statistics, float64."""
    layer.double()
    C = layer.num_features
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(C, dtype=f64) + 0.5)
            layer.bias.copy_(torch.randn(C, dtype=f64))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(C, dtype=f64))
            layer.running_var.copy_(torch.rand(C, dtype=f64) + 0.5)
    return layer


def _copy_into(dst: torch.nn.Module, src: torch.nn.Module) -> torch.nn.Module:
    dst.double().load_state_dict(src.state_dict())
    return dst


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, **kw):
    """One forward/backward; returns (y, dx, dweight, dbias)."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad()
    y = layer(x, **kw)
    y.backward(dy)
    dw = layer.weight.grad.clone() if layer.weight is not None else None
    db = layer.bias.grad.clone() if layer.bias is not None else None
    return y.detach(), x.grad, dw, db


def _gather(t: torch.Tensor, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """The real elements as (M, C): (N, C, L) axis=1 or (N, L, C) axis=-1 -> (M, C)."""
    return t.transpose(1, 2)[mask] if axis == 1 else t[mask]


def _lengths_mask(lengths: list[int], L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (N, L)


# --------------------------------------------------------------------------- ghost batches

GHOST_CASES = {
    # name: (layer class, shape, k); chunks listed for the reader
    "2d-3+3+2": (bn.BatchNorm1d, (8, 3), 3),
    "3d-3+3+2": (bn.BatchNorm1d, (8, 3, 4), 3),
    "3d-4+4": (bn.BatchNorm1d, (8, 3, 4), 4),
    "4d-2+2+2+1": (bn.BatchNorm2d, (7, 2, 3, 2), 2),  # last chunk: 1 sample, 6 values per channel
}


@pytest.mark.parametrize("case", list(GHOST_CASES))
def test_ghost_equals_plain_bn_per_chunk(case):
    cls, shape, k = GHOST_CASES[case]
    C = shape[1]
    layer = _randomize(cls(C, virtual_batch_size=k)).train()
    x = torch.randn(shape, dtype=f64) * 2 + 1
    dy = torch.randn(shape, dtype=f64)
    y, dx, dw, db = _step(layer, x, dy)

    # Oracle: torch's functional BN on each chunk of k samples, autograd for the gradients.
    xr = x.clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    y_ref = torch.cat([F.batch_norm(c, None, None, w, b, True, 0.0, EPS) for c in xr.split(k)])
    y_ref.backward(dy)
    _close(y, y_ref)
    _close(dx, xr.grad)
    _close(dw, w.grad)
    _close(db, b.grad)
    # and the NumPy reference, chunk by chunk
    for xc, yc in zip(x.split(k), y.split(k)):
        _close(yc, R.forward(xc.numpy(), w.detach().numpy(), b.detach().numpy(), EPS)[0])


@pytest.mark.parametrize("k", [8, 9, 100])
def test_ghost_with_k_at_least_n_is_plain_bn(k):
    x = torch.randn(8, 3, 4, dtype=f64) * 2 + 1
    dy = torch.randn_like(x)
    ours = _randomize(bn.BatchNorm1d(3, virtual_batch_size=k)).train()
    torch_layer = _copy_into(torch.nn.BatchNorm1d(3), ours).train()
    for a, e in zip(_step(ours, x, dy), _step(torch_layer, x, dy)):
        _close(a, e)
    _close(ours.running_mean, torch_layer.running_mean)
    _close(ours.running_var, torch_layer.running_var)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_ghost_running_stats_are_the_whole_batchs(momentum):
    """The merged rule: one update per step from the whole batch's mean and unbiased variance."""
    ours = _randomize(bn.BatchNorm1d(3, momentum=momentum, virtual_batch_size=3)).train()
    torch_layer = _copy_into(torch.nn.BatchNorm1d(3, momentum=momentum), ours).train()
    for step in range(2):
        x = torch.randn(8, 3, 4, dtype=f64) * (step + 1) + step
        x[:3] += 5.0  # the chunks' means differ: averaging the chunks' variances would be far off
        chunk_avg = torch.stack([c.var((0, 2)) for c in x.split(3)]).mean(0)
        assert (chunk_avg - x.var((0, 2))).abs().min() > 1.0
        ours(x)
        torch_layer(x)
        _close(ours.running_mean, torch_layer.running_mean)
        _close(ours.running_var, torch_layer.running_var)
        assert int(ours.num_batches_tracked) == int(torch_layer.num_batches_tracked) == step + 1


def test_ghost_single_value_chunk_raises():
    layer = bn.BatchNorm1d(3, virtual_batch_size=3).double().train()
    x = torch.randn(7, 3, dtype=f64)  # chunks of 3, 3, 1 samples: the last has one value per channel
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match=r"single value per channel.*virtual_batch_size=3"):
        layer(x)
    assert torch.equal(layer.running_mean, before)
    assert int(layer.num_batches_tracked) == 0


# ghost batches on the CPU kernel (float32 / bfloat16 in the kernel's layouts): one kernel call
# runs every ghost batch (`batchnorm._kernel_variants`); the oracle is the same as above, in float64

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"CPU kernel: {cpu_kernel.why_unavailable()}")
KERNEL_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])

KERNEL_GHOST_CASES = {  # name: (layer maker, x maker, k)
    "2d-3+3+2": (lambda: bn.BatchNorm1d(3), lambda: torch.randn(8, 3), 3),
    "3d-3+3+2": (lambda: bn.BatchNorm1d(3), lambda: torch.randn(8, 3, 4), 3),
    "nchw-2+2+2+1": (lambda: bn.BatchNorm2d(2), lambda: torch.randn(7, 2, 3, 2), 2),
    "nhwc-3+3+1": (lambda: bn.BatchNorm2d(4), lambda: torch.randn(7, 4, 3, 2).contiguous(memory_format=CL), 3),
    "nlc-axis-1-4+2": (lambda: bn.BatchNorm(3, axis=-1), lambda: torch.randn(6, 5, 3), 4),
    "wide-rows-16x4": (lambda: bn.BatchNorm1d(300), lambda: torch.randn(64, 300), 16),
    "planes-7x7-8x2": (lambda: bn.BatchNorm2d(64), lambda: torch.randn(16, 64, 7, 7), 8),
    "k-above-n": (lambda: bn.BatchNorm1d(3), lambda: torch.randn(5, 3, 4), 9),
    # 11 ghost batches (the last of 40) of small blocks: with 2 threads each takes whole ones
    "per-thread-10x96+40": (lambda: bn.BatchNorm1d(64), lambda: torch.randn(1000, 64), 96),
}
CL = torch.channels_last


def _seeded_float_layer(make_layer) -> torch.nn.Module:
    """make_layer()'s float32 layer after torch.manual_seed(0), with non-default weight, bias and
    running mean."""
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1)
    return layer


def _spy(monkeypatch, module, name: str) -> list[int]:
    """Counts the calls of module.name (so a test knows which path ran)."""
    calls: list[int] = []
    function = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _spy_ghost_kernel(monkeypatch) -> list[int]:
    """Counts the ghost batches' kernel calls: the C++ entry point's (where it takes the call) or
    cpu.ghost_forward's."""
    calls = _spy(monkeypatch, cpu_kernel, "ghost_forward")
    ext = cpu_kernel.extension()
    if ext is not None:
        step = ext.ghost_train_step

        def counted(*args):
            out = step(*args)
            if out is not None:
                calls.append(1)
            return out

        monkeypatch.setattr(ext, "ghost_train_step", counted)
    return calls


def _per_chunk_oracle(layer, x, dy, k):
    """torch's BN per chunk of k samples in float64, autograd for the gradients; (y, dx, dw, db)."""
    axis = layer.axis % x.dim()
    xr = x.detach().double().requires_grad_()
    w = layer.weight.detach().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_()
    chunks = []
    for c in xr.split(k):  # channels to axis 1 for F.batch_norm, and back
        c1 = c.movedim(axis, 1)
        chunks.append(F.batch_norm(c1, None, None, w, b, True, 0.0, EPS).movedim(1, axis))
    y = torch.cat(chunks)
    y.backward(dy.double())
    return y.detach(), xr.grad, w.grad, b.grad


@needs_kernel
@KERNEL_DTYPES
@pytest.mark.parametrize("case", list(KERNEL_GHOST_CASES))
def test_ghost_on_the_kernel_equals_plain_bn_per_chunk(case, dtype, monkeypatch):
    make_layer, make_x, k = KERNEL_GHOST_CASES[case]
    layer = _seeded_float_layer(make_layer)
    layer.virtual_batch_size = k
    whole = copy.deepcopy(layer)  # the running statistics follow the whole batch: plain BN's
    whole.virtual_batch_size = None
    whole.double()
    x = (make_x() * 2 + 1).to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    calls = _spy_ghost_kernel(monkeypatch)
    got = _step(layer, x, dy)
    assert calls, "the ghost batches did not run on the kernel"
    assert got[0].stride() == x.stride() and got[1].stride() == x.stride()
    whole(x.double())
    _assert_one_step_matches(layer, got, _per_chunk_oracle(layer, x, dy, k), whole, dtype)


def _assert_one_step_matches(layer, got, want, stats_layer, dtype) -> None:
    """(y, dx, dw, db) against a float64 oracle at the dtype's tolerance; the running statistics
    against a float64 layer's after the same batch; one batch counted."""
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, e in zip(got, want):
        _close(a.float(), e.float(), **tol)
    _close(layer.running_mean, stats_layer.running_mean.float(), rtol=1e-5, atol=1e-6)
    _close(layer.running_var, stats_layer.running_var.float(), rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == 1


@needs_kernel
def test_ghost_on_the_kernel_parameter_gradients_without_dx(monkeypatch):
    """An input that needs no gradient (a first layer's): the kernel's sums alone, no dx."""
    calls = _spy_ghost_kernel(monkeypatch)
    torch.manual_seed(0)
    layer = _randomize(bn.BatchNorm2d(4, virtual_batch_size=3)).float().train()
    x, dy = torch.randn(8, 4, 3, 3) * 2 + 1, torch.randn(8, 4, 3, 3)
    layer(x).backward(dy)
    assert calls
    _, _, dw, db = _per_chunk_oracle(layer, x, dy, 3)
    _close(layer.weight.grad, dw.float(), rtol=1e-4, atol=1e-4)
    _close(layer.bias.grad, db.float(), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_ghost_on_the_kernel_matches_the_general_path():
    """Kernel and torch-ops general path (backend "composite") on the same float32 batch."""
    from batchnorm.functional import use_backend

    torch.manual_seed(0)
    x, dy = torch.randn(20, 6, 5, 5) * 3 - 2, torch.randn(20, 6, 5, 5)
    layers = [_randomize(bn.BatchNorm2d(6, virtual_batch_size=6)).float().train() for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    got = _step(layers[0], x, dy)
    with use_backend("composite"):
        want = _step(layers[1], x, dy)
    for a, e in zip(got, want):
        _close(a, e, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _close(getattr(layers[0], name), getattr(layers[1], name), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_ghost_on_the_kernel_errors_and_bad_batches(monkeypatch):
    calls = _spy_ghost_kernel(monkeypatch)
    layer = bn.BatchNorm1d(3, virtual_batch_size=3).train()
    with pytest.raises(ValueError, match=r"single value per channel.*virtual_batch_size=3"):
        layer(torch.randn(7, 3))  # chunks of 3, 3 and 1 samples
    assert not calls and int(layer.num_batches_tracked) == 0
    x = torch.randn(9, 3)
    x[4, 1] = float("nan")  # a non-finite batch: running statistics and count stay
    before = (layer.running_mean.clone(), layer.running_var.clone())
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        layer(x)
    assert calls and torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == 0
    xg = torch.randn(9, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(xg).square().sum(), xg, create_graph=True)


@needs_kernel
def test_ghost_with_the_batch_axis_inside_takes_the_general_path(monkeypatch):
    """Axis 0 not outermost in memory: a ghost batch is no dense block, the general path runs."""
    calls = _spy_ghost_kernel(monkeypatch)
    layer = bn.BatchNorm1d(3, virtual_batch_size=2).train()
    x = torch.randn(4, 8, 3).permute(1, 2, 0) * 2 + 1  # (8, 3, 4), strides (3, 1, 24)
    dy = torch.randn(8, 3, 4)
    got = _step(layer, x, dy)
    assert not calls
    for a, e in zip(got, _per_chunk_oracle(layer, x, dy, 2)):
        _close(a.float(), e.float(), rtol=1e-4, atol=1e-4)


def test_ghost_eval_ignores_k():
    ours = _randomize(bn.BatchNorm1d(3, virtual_batch_size=2)).train()
    ours(torch.randn(6, 3, 4, dtype=f64))
    torch_layer = _copy_into(torch.nn.BatchNorm1d(3), ours).eval()
    ours.eval()
    x = torch.randn(5, 3, 4, dtype=f64)
    dy = torch.randn_like(x)
    for a, e in zip(_step(ours, x, dy), _step(torch_layer, x, dy)):
        _close(a, e)
    # a single sample is fine in eval, whatever k
    _close(ours(x[:1]), torch_layer(x[:1]))


def test_ghost_eval_without_running_stats_uses_the_whole_batch():
    ours = bn.BatchNorm1d(3, track_running_stats=False, virtual_batch_size=2).double().eval()
    torch_layer = torch.nn.BatchNorm1d(3, track_running_stats=False).double().eval()
    x = torch.randn(6, 3, 4, dtype=f64) * 2 + 1
    _close(ours(x), torch_layer(x))


# --------------------------------------------------------------------------- batch renormalization


def _far_running_stats(x: torch.Tensor, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Running statistics far from the batch's, so that r and d clip on every channel."""
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=f64)[: mean.numel()]
    scale = torch.tensor([100.0, 0.01, 0.01, 100.0], dtype=f64)[: mean.numel()]
    return mean + 10 * sign * var.sqrt(), var * scale


@pytest.mark.parametrize(
    ("renorm", "nbt"),
    [
        (bn.Renorm.fixed(1.0, 0.0), 0),
        (bn.Renorm(), 0),  # the paper's warm-up
        (bn.Renorm(), 4_999),  # last step of the warm-up
    ],
    ids=["fixed-1-0", "warmup-start", "warmup-end"],
)
def test_renorm_with_unit_limits_is_plain_bn(renorm, nbt):
    x = torch.randn(6, 4, 3, dtype=f64) * 2 + 1
    ours = _randomize(bn.BatchNorm1d(4, momentum=0.2, renorm=renorm)).train()
    rm, rv = _far_running_stats(x)
    with torch.no_grad():
        ours.running_mean.copy_(rm)
        ours.running_var.copy_(rv)
        ours.num_batches_tracked.fill_(nbt)
    torch_layer = _copy_into(torch.nn.BatchNorm1d(4, momentum=0.2), ours).train()
    for step in range(2):
        x = torch.randn(6, 4, 3, dtype=f64) * (2 + step) + 1
        dy = torch.randn_like(x)
        for a, e in zip(_step(ours, x, dy), _step(torch_layer, x, dy)):
            _close(a, e)
        _close(ours.running_mean, torch_layer.running_mean)
        _close(ours.running_var, torch_layer.running_var)
        assert int(ours.num_batches_tracked) == int(torch_layer.num_batches_tracked) == nbt + step + 1


@pytest.mark.parametrize("axis", [1, -1])
def test_renorm_unclipped_training_output_is_the_inference_output(axis):
    """r, d unclipped: x_hat = (x - mu) / sigma, the eval transform of the state before the update."""
    x = torch.randn(6, 5, 3, dtype=f64) * 3 - 2  # channels: 5 on axis 1, 3 on axis -1
    C = x.shape[axis]
    rm, rv = torch.randn(C, dtype=f64), torch.rand(C, dtype=f64) + 0.5
    w, b = torch.rand(C, dtype=f64) + 0.5, torch.randn(C, dtype=f64)
    rm0, rv0 = rm.clone(), rv.clone()
    y_train = batch_norm(x, rm, rv, w, b, True, 0.0, EPS, axis=axis, renorm=(1e9, 1e9))
    y_eval = batch_norm(x, rm0, rv0, w, b, False, 0.0, EPS, axis=axis)
    _close(y_train, y_eval, rtol=1e-9, atol=1e-9)
    _close(rm, rm0)  # momentum 0: the state stays
    # plain BN gives a different output, so the comparison above has teeth
    assert (batch_norm(x, None, None, w, b, True, axis=axis) - y_eval).abs().max() > 0.1

    # the layer: the training output uses the state from before this step's update
    if axis == 1:
        layer = bn.BatchNorm1d(C, momentum=0.1, renorm=bn.Renorm.fixed(1e9, 1e9)).double()
        with torch.no_grad():
            layer.running_mean.copy_(rm0)
            layer.running_var.copy_(rv0)
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        _close(layer.train()(x), y_eval, rtol=1e-9, atol=1e-9)
        assert not torch.equal(layer.running_mean, rm0)


@pytest.mark.parametrize(("shape", "axis"), [((6, 4, 3), 1), ((5, 3, 4), -1), ((7, 4), 1)])
def test_renorm_clipped_matches_reference(shape, axis):
    x = torch.randn(shape, dtype=f64) * 2 + 1
    C = shape[axis]
    rm, rv = _far_running_stats(x, axis)
    w = (torch.rand(C, dtype=f64) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=f64).requires_grad_()
    xr = x.clone().requires_grad_()
    y = batch_norm(xr, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, axis=axis, renorm=(1.2, 0.1))
    dy = torch.randn_like(y)
    y.backward(dy)

    y_ref, cache = R.renorm_forward(
        x.numpy(), rm.numpy(), rv.numpy(), w.detach().numpy(), b.detach().numpy(), 1.2, 0.1, EPS, axis
    )
    dx_ref, dw_ref, db_ref = R.renorm_backward(dy.numpy(), cache)
    assert set(np.abs(cache.r).round(12)) <= {1.2, round(1 / 1.2, 12)}  # r clipped on every channel
    assert np.all(np.abs(cache.d) == 0.1)  # d clipped on every channel
    _close(y, y_ref)
    _close(xr.grad, dx_ref)
    _close(w.grad, dw_ref)
    _close(b.grad, db_ref)
    # the clipping changes the gradient: plain BN's differs
    dx_bn = R.backward(dy.numpy(), R.forward(x.numpy(), w.detach().numpy(), None, EPS, axis)[1])[0]
    assert np.abs(dx_bn - dx_ref).max() > 1e-3


def test_reference_renorm_backward_is_autograd_with_stop_gradient():
    """renorm_backward (the paper's chain rule) against torch autograd with r and d detached."""
    x = torch.randn(5, 3, 4, dtype=f64) * 2 + 1
    rm, rv = torch.tensor([0.5, -1.0, 3.0], dtype=f64), torch.tensor([2.0, 0.5, 9.0], dtype=f64)
    gamma, beta = torch.rand(3, dtype=f64) + 0.5, torch.randn(3, dtype=f64)
    r_max, d_max = 1.3, 0.4
    xr, g, bt = (t.clone().requires_grad_() for t in (x, gamma, beta))
    var, mu = torch.var_mean(xr, dim=(0, 2), correction=0, keepdim=True)
    sigma_b = (var + EPS).sqrt()
    sigma = (rv + EPS).sqrt().view(1, 3, 1)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm.view(1, 3, 1)) / sigma).clamp(-d_max, d_max).detach()
    y = g.view(1, 3, 1) * ((xr - mu) / sigma_b * r + d) + bt.view(1, 3, 1)
    dy = torch.randn_like(y)
    y.backward(dy)

    y_ref, cache = R.renorm_forward(x.numpy(), rm.numpy(), rv.numpy(), gamma.numpy(), beta.numpy(), r_max, d_max)
    dx_ref, dg_ref, db_ref = R.renorm_backward(dy.numpy(), cache)
    _close(y_ref, y)
    _close(dx_ref, xr.grad)
    _close(dg_ref, g.grad)
    _close(db_ref, bt.grad)
    _close(cache.r, r.flatten())
    _close(cache.d, d.flatten())


def test_reference_renorm_limits():
    """r_max = 1, d_max = 0 is Algorithm 1; unclipped is Algorithm 2 with the running statistics."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (6, 3, 4))
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    dy = rng.normal(size=x.shape)
    y, cache = R.renorm_forward(x, rm, rv, gamma, beta, 1.0, 0.0)
    y_bn, cache_bn = R.forward(x, gamma, beta)
    np.testing.assert_allclose(y, y_bn, rtol=1e-12, atol=1e-12)
    for a, e in zip(R.renorm_backward(dy, cache), R.backward(dy, cache_bn)):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)
    y_free, _ = R.renorm_forward(x, rm, rv, gamma, beta, 1e9, 1e9)
    np.testing.assert_allclose(y_free, R.forward_inference(x, rm, rv, gamma, beta), rtol=1e-10, atol=1e-10)


SCHEDULE = bn.Renorm(r_max=3.0, d_max=5.0, warmup_steps=2, r_max_steps=6, d_max_steps=4)


@pytest.mark.parametrize(
    "renorm", [bn.Renorm(), bn.Renorm.fixed(2.0, 1.0), bn.Renorm(warmup_steps=10, r_max_steps=5, d_max_steps=20)]
)
def test_renorm_limits_of_a_tensor_step_equal_the_numbers(renorm):
    for step in (0, 1, 4, 5, 9, 10, 11, 15, 20, 4999, 5000, 5001, 24_999, 25_000, 40_000, 10**6):
        assert tuple(v.item() for v in renorm.limits(torch.tensor(step))) == renorm.limits(step), step


@pytest.mark.parametrize(
    ("step", "limits"),
    [(0, (1.0, 0.0)), (2, (1.0, 0.0)), (3, (1.5, 2.5)), (4, (2.0, 5.0)), (6, (3.0, 5.0)), (50, (3.0, 5.0))],
)
def test_renorm_schedule_follows_num_batches_tracked(step, limits):
    assert SCHEDULE.limits(step) == pytest.approx(limits)
    x = torch.randn(6, 4, 3, dtype=f64) * 2 + 1
    layer = _randomize(bn.BatchNorm1d(4, renorm=SCHEDULE)).train()
    rm, rv = _far_running_stats(x)
    with torch.no_grad():
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
        layer.num_batches_tracked.fill_(step)
    expected = batch_norm(x, rm.clone(), rv.clone(), layer.weight, layer.bias, True, 0.1, EPS, renorm=limits)
    _close(layer(x), expected)
    assert int(layer.num_batches_tracked) == step + 1
    # a neighbouring step's limits would give another output (clipping is active)
    if step in (3, 4):
        other = SCHEDULE.limits(step + 1)
        rm2, rv2 = rm.clone(), rv.clone()
        y_other = batch_norm(x, rm2, rv2, layer.weight, layer.bias, True, 0.1, EPS, renorm=other)
        assert (y_other - expected).abs().max() > 0.1


# batch renormalization alone on the CPU kernel (float32 / bfloat16): plain BN with weight w*r and
# bias w*d + b after a statistics call; the oracle is the same layer in float64 (the general path)

KERNEL_RENORM_CASES = {  # name: (layer maker, x maker)
    "2d": (lambda renorm: bn.BatchNorm1d(3, renorm=renorm), lambda: torch.randn(8, 3)),
    "nchw": (lambda renorm: bn.BatchNorm2d(4, renorm=renorm), lambda: torch.randn(6, 4, 3, 3)),
    "nhwc": (
        lambda renorm: bn.BatchNorm2d(4, renorm=renorm),
        lambda: torch.randn(6, 4, 3, 3).contiguous(memory_format=CL),
    ),
    "nlc-axis-1": (lambda renorm: bn.BatchNorm(3, axis=-1, renorm=renorm), lambda: torch.randn(5, 7, 3)),
}


@needs_kernel
@KERNEL_DTYPES
@pytest.mark.parametrize("renorm", [bn.Renorm.fixed(1.5, 0.5), bn.Renorm()], ids=["clipping", "warm-up"])
@pytest.mark.parametrize("case", list(KERNEL_RENORM_CASES))
def test_renorm_on_the_kernel_equals_the_general_path(case, renorm, dtype, monkeypatch):
    make_layer, make_x = KERNEL_RENORM_CASES[case]
    layer = _seeded_float_layer(lambda: make_layer(renorm))
    x = (make_x() * 2 + 1).to(dtype)
    with torch.no_grad():  # running statistics far from the batch's: r and d clip on every channel
        rm, rv = _far_running_stats(x.double(), layer.axis)
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
    oracle = copy.deepcopy(layer).double()  # float64: the general path
    dy = torch.randn(x.shape).to(dtype)
    calls = _spy(monkeypatch, cpu_kernel, "statistics")
    got = _step(layer, x, dy)
    assert calls, "batch renormalization did not run on the kernel"
    assert got[0].stride() == x.stride()
    _assert_one_step_matches(layer, got, _step(oracle, x.double(), dy.double()), oracle, dtype)


def _near_running_stats(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running statistics near the batch's: r = 0.82 or 1.29 and d = -+0.5 sigma_B / sigma, unclipped."""
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=f64)[: mean.numel()]
    return mean + 0.5 * sign * var.sqrt(), var * (1.0 + 0.5 * sign)


@needs_kernel
@pytest.mark.parametrize("offset", [1.0, 1e5], ids=["offset-1", "offset-1e5"])
@pytest.mark.parametrize("case", list(KERNEL_RENORM_CASES))
def test_unclipped_renorm_on_the_kernel_equals_the_general_path(case, offset, monkeypatch):
    """Limits that never clip, running statistics near the batch's: r != 1 and d != 0 as computed
    (d from the running sigma, not the batch's). Offset by 1e5, float32 y keeps its precision
    only through the apply pass's centring (the float32 mean's rounding is up to 4e-3); there the
    output alone is compared (the backward's sums carry that rounding, as plain BN's do)."""
    make_layer, make_x = KERNEL_RENORM_CASES[case]
    layer = _seeded_float_layer(lambda: make_layer(bn.Renorm.fixed(1e9, 1e9)))
    x = make_x() * 2 + offset
    with torch.no_grad():
        rm, rv = _near_running_stats(x.double(), layer.axis)
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
    oracle = copy.deepcopy(layer).double()  # float64: the general path
    dy = torch.randn(x.shape)
    calls = _spy(monkeypatch, cpu_kernel, "statistics")
    got = _step(layer, x, dy)
    assert calls, "batch renormalization did not run on the kernel"
    want = _step(oracle, x.double(), dy.double())
    if offset == 1.0:
        _assert_one_step_matches(layer, got, want, oracle, torch.float32)
    else:
        _close(got[0], want[0].float(), rtol=1e-4, atol=1e-4)


def test_renorm_needs_running_stats():
    x = torch.randn(4, 3, dtype=f64)
    with pytest.raises(ValueError, match="running_mean/running_var are None"):
        batch_norm(x, None, None, training=True, renorm=(2.0, 1.0))
    with pytest.raises(ValueError, match="track_running_stats=True"):
        bn.BatchNorm1d(3, track_running_stats=False, renorm=bn.Renorm())
    with pytest.raises(ValueError, match="r_max >= 1"):
        batch_norm(x, torch.zeros(3, dtype=f64), torch.ones(3, dtype=f64), training=True, renorm=(0.5, 1.0))


# --------------------------------------------------------------------------- masks

MASK_LAYOUTS = {
    # name: (layer factory, axis, shape)
    "NCL-axis1": (lambda C: bn.BatchNorm1d(C, momentum=0.3), 1, (4, 3, 5)),
    "NLC-axis-1": (lambda C: bn.BatchNorm(C, momentum=0.3, axis=-1), -1, (4, 5, 3)),
}
LENGTHS = [5, 2, 4, 3]  # real steps per sequence, L = 5


def _masked_input(shape, axis, pad: float):
    """x with `pad` at the padded positions, the mask (N, L) and its broadcast to x's shape."""
    mask = _lengths_mask(LENGTHS, 5)
    x = torch.randn(shape, dtype=f64) * 2 + 1
    m = mask.unsqueeze(axis).expand_as(x)
    return x.masked_fill(~m, pad), mask, m


@pytest.mark.parametrize("pad", [0.0, 1e6, float("nan")], ids=["pad0", "pad1e6", "padnan"])
@pytest.mark.parametrize("layout", list(MASK_LAYOUTS))
def test_mask_equals_bn_over_real_elements(layout, pad):
    make, axis, shape = MASK_LAYOUTS[layout]
    C = shape[axis]
    layer = _randomize(make(C)).train()
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x, mask, m = _masked_input(shape, axis, pad)
    dy = torch.randn(shape, dtype=f64)
    y, dx, dw, db = _step(layer, x, dy, mask=mask)

    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert torch.isfinite(dw).all() and torch.isfinite(db).all()
    assert torch.equal(y[~m], torch.zeros_like(y[~m]))
    assert torch.equal(dx[~m], torch.zeros_like(dx[~m]))

    # Oracle: BN over the gathered real values only, (M, C).
    xr = _gather(x, mask, axis).clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    rm, rv = rm0.clone(), rv0.clone()
    y_ref = F.batch_norm(xr, rm, rv, w, b, True, 0.3, EPS)
    y_ref.backward(_gather(dy, mask, axis))
    _close(_gather(y, mask, axis), R.forward(xr.detach().numpy(), w.detach().numpy(), b.detach().numpy(), EPS)[0])
    _close(_gather(y, mask, axis), y_ref)
    _close(_gather(dx, mask, axis), xr.grad)
    _close(dw, w.grad)
    _close(db, b.grad)
    _close(layer.running_mean, rm)
    _close(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("layout", list(MASK_LAYOUTS))
def test_mask_in_eval_zeroes_padding(layout):
    make, axis, shape = MASK_LAYOUTS[layout]
    layer = _randomize(make(shape[axis])).eval()
    x, mask, m = _masked_input(shape, axis, 1e6)
    y = layer(x, mask=mask)
    assert torch.equal(y[~m], torch.zeros_like(y[~m]))
    _close(y[m], layer(x)[m])


def test_mask_errors():
    layer = bn.BatchNorm1d(3).double()
    x = torch.randn(4, 3, 5, dtype=f64)
    with pytest.raises(ValueError, match=r"without the channel axis.*expected \(4, 5\).*got mask of shape \(4, 3, 5\)"):
        layer(x, mask=torch.ones(4, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \(4, 5\)"):
        layer(x, mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor.*torch.float32"):
        layer(x, mask=torch.ones(4, 5))
    layer.eval()
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        layer(x, mask=torch.ones(4, 5, dtype=torch.long))
    layer.train()
    one_real = torch.zeros(4, 5, dtype=torch.bool)
    one_real[0, 0] = True
    with pytest.raises(ValueError, match="single real value per channel"):
        layer(x, mask=one_real)


# a mask alone on the CPU kernel's masked entries: rows where each mask element is a row of x with
# the channels last ((N, L, C) with axis=-1, channels_last, 2-D), planes where the channels are
# not last (contiguous (N, C, L), (N, C, H, W))


def _long_mask(N: int, L: int) -> torch.Tensor:
    """(N, L) lengths that leave whole float32 chunks of 4096 values without a real value."""
    return _lengths_mask([L, 4000, 100, 4097][:N], L)


KERNEL_MASK_CASES = {  # name: (layer maker, x maker, mask maker)
    "nlc-axis-1": (
        lambda: bn.BatchNorm(3, axis=-1),
        lambda: torch.randn(6, 10, 3),
        lambda: _lengths_mask([10, 7, 3, 10, 2, 5], 10),
    ),
    "nhwc": (
        lambda: bn.BatchNorm2d(4),
        lambda: torch.randn(5, 4, 3, 3).contiguous(memory_format=CL),
        lambda: torch.rand(5, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.6,
    ),
    "2d": (
        lambda: bn.BatchNorm1d(3),
        lambda: torch.randn(9, 3),
        lambda: torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1]).bool(),
    ),
    "nlc-rows-threads": (  # 2 threads, blocks of 256 rows, whole blocks of padding (length 0 and 3)
        lambda: bn.BatchNorm(40, axis=-1),
        lambda: torch.randn(64, 300, 40),
        lambda: _lengths_mask([300, 0, 3, 150, 299, 1, 77, 260] * 8, 300),
    ),
    "ncl-planes": (
        lambda: bn.BatchNorm1d(3),
        lambda: torch.randn(6, 3, 37),
        lambda: _lengths_mask([37, 30, 3, 0, 1, 17], 37),  # a sequence of length 0
    ),
    "ncl-planes-of-2": (
        lambda: bn.BatchNorm1d(4),
        lambda: torch.randn(9, 4, 2),
        lambda: _lengths_mask([2, 1, 0, 2, 1, 2, 2, 1, 1], 2),
    ),
    "nchw-planes-random": (
        lambda: bn.BatchNorm2d(5),
        lambda: torch.randn(4, 5, 3, 4),
        lambda: torch.rand(4, 3, 4, generator=torch.Generator().manual_seed(2)) < 0.5,
    ),
    "ncl-planes-chunks": (  # planes of two float32 chunks; some chunks all padding
        lambda: bn.BatchNorm1d(2),
        lambda: torch.randn(4, 2, 8000),
        lambda: _long_mask(4, 8000),
    ),
}


def _spy_general_path(monkeypatch) -> list[int]:
    return _spy(monkeypatch, functional_module, "general_train")


def _masked_oracle(layer, x, mask, dy, running=None):
    """BN of the real elements in float64 (torch's, autograd), zeros at the padding; and the
    running statistics of a torch layer fed the real elements, from `running` (mean, var)."""
    axis = layer.axis % x.dim()
    xr = x.detach().double().requires_grad_()
    w = layer.weight.detach().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_()
    real = xr.movedim(axis, -1)[mask]  # (M, C)
    y = torch.zeros_like(xr.movedim(axis, -1))
    y[mask] = F.batch_norm(real, None, None, w, b, True, 0.0, EPS)
    y = y.movedim(-1, axis)
    y.backward(dy.double().nan_to_num())
    stats = torch.nn.BatchNorm1d(x.shape[axis]).double()
    if running is not None:
        stats.running_mean.copy_(running[0])
        stats.running_var.copy_(running[1])
    stats(real.detach())
    return (y.detach(), xr.grad, w.grad, b.grad), stats


@needs_kernel
@KERNEL_DTYPES
@pytest.mark.parametrize("case", list(KERNEL_MASK_CASES))
def test_mask_on_the_kernel_equals_bn_over_real_elements(case, dtype, monkeypatch):
    make_layer, make_x, make_mask = KERNEL_MASK_CASES[case]
    layer = _seeded_float_layer(make_layer)
    x, mask = (make_x() * 2 + 1).to(dtype), make_mask()
    fmt = CL if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
    pad = ~mask.unsqueeze(layer.axis % x.dim()).expand(x.shape)
    x = x.masked_fill(pad, float("nan")).contiguous(memory_format=fmt)  # padding is never read
    dy = torch.randn(x.shape).to(dtype)
    calls = _spy_general_path(monkeypatch)
    planes = _spy(monkeypatch, cpu_kernel, "masked_forward")  # planes and rows alike
    running = (layer.running_mean.clone(), layer.running_var.clone())
    got = _step(layer, x, dy, mask=mask)
    assert not calls, "the mask took the general path"
    assert planes, "the masked kernel did not run"
    assert got[0].stride() == x.stride()
    assert not got[0][pad].any() and not got[1][pad].any()  # zeros, no gradient at the padding
    want, stats = _masked_oracle(layer, x, mask, dy, running)
    _assert_one_step_matches(layer, got, want, stats, dtype)


def _assert_single_value_raises_and_all_padding_gives_zeros(layer, x, dy) -> None:
    """A mask (N, L) with one real value raises; an all-padding one gives zero outputs and
    gradients and leaves the running statistics as they were."""
    one = torch.zeros(4, 5, dtype=torch.bool)
    one[2, 3] = True
    with pytest.raises(ValueError, match="single real value per channel"):
        layer(x, mask=one)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    y, dx, dw, db = _step(layer, x, dy, mask=torch.zeros(4, 5, dtype=torch.bool))
    assert not y.any() and not dx.any() and not dw.any() and not db.any()
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


@needs_kernel
def test_mask_on_the_kernel_edge_cases(monkeypatch):
    calls = _spy_general_path(monkeypatch)
    x, dy = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    _assert_single_value_raises_and_all_padding_gives_zeros(bn.BatchNorm(3, axis=-1), x, dy)
    assert not calls
    # a dense (N, C, L) with L outermost, and one in float64: the general path
    for x, mask in (
        (torch.randn(12, 6, 3).permute(1, 2, 0), _lengths_mask([12, 7, 3, 12, 2, 5], 12)),
        (torch.randn(6, 3, 5, dtype=f64), _lengths_mask([5, 3, 1, 5, 2, 4], 5)),
    ):
        calls.clear()
        dy = torch.randn(x.shape, dtype=x.dtype)
        got = _step(bn.BatchNorm1d(3), x, dy, mask=mask)
        assert calls
        for a, e in zip(got, _masked_oracle(bn.BatchNorm1d(3), x, mask, dy)[0]):
            _close(a.float(), e.float(), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_mask_on_the_planes_kernel_edge_cases(monkeypatch):
    calls = _spy_general_path(monkeypatch)
    planes = _spy(monkeypatch, cpu_kernel, "masked_forward")
    layer = bn.BatchNorm1d(3)
    _assert_single_value_raises_and_all_padding_gives_zeros(layer, torch.randn(4, 3, 5), torch.randn(4, 3, 5))
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(4, 3, 20)
    mask = _lengths_mask([20, 5, 11, 1], 20)
    bad = x.clone()
    bad[1, 0, 2] = float("inf")  # a real value: the running statistics refuse the batch
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        layer(bad, mask=mask)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])

    # an input without grad: the parameter gradients alone (no dx); no double backward
    layer = _seeded_float_layer(lambda: bn.BatchNorm1d(3))
    dy = torch.randn(x.shape)
    layer(x, mask=mask).backward(dy)
    (_, _, want_dw, want_db), _ = _masked_oracle(layer, x, mask, dy)
    _close(layer.weight.grad, want_dw.float(), rtol=1e-4, atol=1e-4)
    _close(layer.bias.grad, want_db.float(), rtol=1e-4, atol=1e-4)
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(xg, mask=mask), xg, dy, create_graph=True)
    assert not calls and len(planes) == 4  # every training call after the single-value one


EVAL_MASK_LAYOUTS = {  # name: (layer maker, x maker (N = 6 samples, 3 channels), mask shape)
    "ncl-planes": (lambda: bn.BatchNorm1d(3), lambda: torch.randn(6, 3, 37), (6, 37)),
    "nlc-rows": (lambda: bn.BatchNorm(3, axis=-1), lambda: torch.randn(6, 37, 3), (6, 37)),
    "nhwc-rows": (lambda: bn.BatchNorm2d(3), lambda: torch.randn(6, 3, 5, 4).contiguous(memory_format=CL), (6, 5, 4)),
    "2d-rows": (lambda: bn.BatchNorm1d(3), lambda: torch.randn(6, 3), (6,)),
}


@needs_kernel
@KERNEL_DTYPES
@pytest.mark.parametrize("layout", list(EVAL_MASK_LAYOUTS))
def test_mask_in_eval_on_the_kernel(layout, dtype, monkeypatch):
    """Eval with a mask: one kernel pass, 0 at the (NaN) padding, over planes ((N, C, L)) or rows
    (channels last: one mask element per row)."""
    calls = _spy(monkeypatch, cpu_kernel, "masked_eval")
    make_layer, make_x, mask_shape = EVAL_MASK_LAYOUTS[layout]
    layer = _seeded_float_layer(make_layer).eval()
    axis = layer.axis % len(make_x().shape)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(3)) < 0.6
    mask.view(6, -1)[3] = False  # a sample that is all padding
    x0 = make_x()
    pad = ~mask.unsqueeze(axis).expand(x0.shape)
    x = (x0 * 2 + 1).masked_fill(pad, float("nan")).to(dtype)
    with torch.no_grad():
        y = layer(x, mask=mask)
    assert calls and y.dtype == dtype and y.stride() == x.stride()
    assert not y[pad].any()
    view = [1] * x.dim()
    view[axis] = 3
    scale = layer.weight.double() / torch.sqrt(layer.running_var.double() + EPS)
    want = (x.double().nan_to_num() - layer.running_mean.double().view(view)) * scale.view(view)
    want = want + layer.bias.double().view(view)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    _close(y.float()[~pad], want.float()[~pad], **tol)
    # with gradients wanted (a frozen layer being fine-tuned): differentiable torch ops, the same values
    y2, dx, dw, db = _step(layer, x, torch.ones(x.shape, dtype=dtype), mask=mask)
    assert len(calls) == 1 and not y2[pad].any() and not dx[pad].any() and dw.abs().sum() > 0
    _close(db, torch.full((3,), float(mask.sum())))  # sum(dy) over the real values, dy = 1
    _close(y2.float(), y.float(), **tol)


def test_mask_with_ghost_batches_gradcheck():
    x = torch.randn(5, 2, 3, dtype=f64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)  # (N, L)
    w = (torch.rand(2, dtype=f64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=f64, requires_grad=True)

    def fn(x, w, b):
        return batch_norm(x, None, None, w, b, True, 0.1, 1e-3, mask=mask, virtual_batch_size=2)

    assert gradcheck(fn, (x, w, b))
    # and the output is per-chunk masked BN
    y = fn(x, w, b).detach()
    for xc, yc, mc in zip(x.detach().split(2), y.split(2), mask.split(2)):
        ref = R.forward(_gather(xc, mc, 1).numpy(), w.detach().numpy(), b.detach().numpy(), 1e-3)[0]
        _close(_gather(yc, mc, 1), ref)


def test_mask_ghost_renorm_gradcheck_when_clipped():
    """With r and d clipped on every chunk and channel they are locally constant: the true gradient."""
    x = torch.randn(5, 4, 3, dtype=f64) * 2 + 1  # (N, L, C), axis=-1
    mask = _lengths_mask([4, 2, 3, 4, 2], 4)
    rm = torch.tensor([30.0, -30.0, 30.0], dtype=f64)
    rv = torch.full((3,), 1e-3, dtype=f64)
    x.requires_grad_()

    def fn(x):
        return batch_norm(
            x,
            rm.clone(),
            rv.clone(),
            None,
            None,
            True,
            0.1,
            1e-3,
            axis=-1,
            mask=mask,
            virtual_batch_size=2,
            renorm=(1.5, 0.5),
        )

    assert gradcheck(fn, (x,))


# --------------------------------------------------------------------------- frozen


def _frozen_formula(x, layer, axis):
    """torchvision's FrozenBatchNorm2d: scale = w * rsqrt(rv + eps), y = x * scale + (b - rm * scale)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    scale = layer.weight * (layer.running_var + layer.eps).rsqrt()
    shift = layer.bias - layer.running_mean * scale
    return x * scale.view(shape) + shift.view(shape)


FROZEN_CASES = {
    "2d": (lambda: bn.BatchNorm2d(3), 1, (2, 3, 4, 4)),
    "1d-NC": (lambda: bn.BatchNorm1d(3), 1, (1, 3)),  # one sample: fine, no batch statistics
    "NLC": (lambda: bn.BatchNorm(3, axis=-1), -1, (2, 5, 3)),
}


@pytest.mark.parametrize("case", list(FROZEN_CASES))
def test_frozen_training_uses_running_stats(case):
    make, axis, shape = FROZEN_CASES[case]
    layer = _randomize(make()).train()
    layer.frozen = True
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, dtype=f64) * 2 + 1
    dy = torch.randn_like(x)
    y, dx, dw, db = _step(layer, x, dy)

    ref_layer = _copy_into(make(), layer)
    xr = x.clone().requires_grad_()
    y_ref = _frozen_formula(xr, ref_layer, axis)
    y_ref.backward(dy)
    _close(y, y_ref)
    _close(dx, xr.grad)
    _close(dw, ref_layer.weight.grad)
    _close(db, ref_layer.bias.grad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    _close(y, layer.eval()(x))


def test_frozen_with_mask():
    layer = _randomize(bn.BatchNorm(3, axis=-1)).train()
    layer.frozen = True
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x, mask, m = _masked_input((4, 5, 3), -1, 1e6)
    y = layer(x, mask=mask)
    assert torch.equal(y[~m], torch.zeros_like(y[~m]))
    _close(y[m], _frozen_formula(x, layer, -1).detach()[m])
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_frozen_and_eval_with_nan_padding_give_finite_parameter_gradients():
    layer = _randomize(bn.BatchNorm(3, axis=-1)).train()
    layer.frozen = True
    x, mask, _ = _masked_input((4, 5, 3), -1, float("nan"))
    layer(x, mask=mask).sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_frozen_without_running_stats_raises():
    layer = bn.BatchNorm1d(3, track_running_stats=False)
    layer.frozen = True
    with pytest.raises(ValueError, match="track_running_stats=True"):
        layer(torch.randn(4, 3))


# --------------------------------------------------------------------------- composition


def test_mask_ghost_renorm_compose():
    """One layer with all three equals masked renorm BN per chunk, against the pre-step running statistics."""
    k, r_max, d_max = 2, 1.5, 0.5
    layer = bn.BatchNorm1d(3, momentum=0.2, virtual_batch_size=k, renorm=bn.Renorm.fixed(r_max, d_max))
    layer = _randomize(layer).train()
    x, mask, _ = _masked_input((4, 3, 5), 1, float("nan"))  # (N, C, L)
    x = torch.cat([x, x[:1] * 0.5])  # N = 5: chunks of 2, 2, 1 samples
    mask = torch.cat([mask, mask[:1]])  # (N, L)
    m = mask.unsqueeze(1).expand_as(x)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([5.0, -5.0, 0.0], dtype=f64))
        layer.running_var.copy_(torch.tensor([0.05, 20.0, 1.0], dtype=f64))
    rm0, rv0 = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    w, b = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    dy = torch.randn_like(x)
    y, dx, dw, db = _step(layer, x, dy, mask=mask)

    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert torch.equal(y[~m], torch.zeros_like(y[~m]))
    dw_ref, db_ref, clipped = np.zeros(3), np.zeros(3), 0
    for xc, yc, dxc, dyc, mc in zip(x.split(k), y.split(k), dx.split(k), dy.split(k), mask.split(k)):
        # the chunk's real values (M, C) as a batch of M samples: channels on axis 1
        y_ref, cache = R.renorm_forward(_gather(xc, mc, 1).numpy(), rm0, rv0, w, b, r_max, d_max, EPS)
        dx_ref, dwc, dbc = R.renorm_backward(_gather(dyc, mc, 1).numpy(), cache)
        _close(_gather(yc, mc, 1), y_ref)
        _close(_gather(dxc, mc, 1), dx_ref)
        dw_ref, db_ref = dw_ref + dwc, db_ref + dbc
        clipped += int(np.sum(np.abs(cache.d) == d_max))
    _close(dw, dw_ref)
    _close(db, db_ref)
    assert clipped > 0
    real = _gather(x, mask, 1)  # (M, C): the running statistics see every real value of the batch
    _close(layer.running_mean, 0.8 * rm0 + 0.2 * real.mean(0).numpy())
    _close(layer.running_var, 0.8 * rv0 + 0.2 * real.var(0).numpy())


def test_generic_layer_takes_the_variants():
    layer = bn.BatchNorm(3, axis=-1, virtual_batch_size=2, renorm=bn.Renorm.fixed(1.5, 0.5)).double()
    assert layer.virtual_batch_size == 2 and layer.renorm == bn.Renorm.fixed(1.5, 0.5)
    assert "virtual_batch_size=2" in repr(layer)
    x = torch.randn(5, 4, 3, dtype=f64)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    expected = batch_norm(
        x, rm, rv, layer.weight, layer.bias, True, 0.1, EPS, axis=-1, virtual_batch_size=2, renorm=(1.5, 0.5)
    )
    _close(layer.train()(x), expected)


# --------------------------------------------------------------------------- drop-in


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (bn.BatchNorm1d, torch.nn.BatchNorm1d),
        (bn.BatchNorm2d, torch.nn.BatchNorm2d),
        (bn.BatchNorm3d, torch.nn.BatchNorm3d),
    ],
)
def test_variants_keep_torchs_state_dict_and_repr(ours, theirs):
    layer = ours(4, virtual_batch_size=2, renorm=bn.Renorm())
    reference = theirs(4)
    assert list(layer.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(_randomize(layer).float().state_dict())
    layer.load_state_dict(reference.state_dict())

    assert repr(ours(4)) == repr(theirs(4))
    text = repr(layer)
    assert "virtual_batch_size=2" in text
    assert "renorm=Renorm(r_max=3.0, d_max=5.0" in text
    assert "frozen" not in text
    layer.frozen = True
    assert repr(layer).endswith("frozen=True)")
    plain = repr(ours(4, momentum=None))
    assert "virtual_batch_size" not in plain and "renorm" not in plain and "frozen" not in plain
