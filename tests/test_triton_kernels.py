"""The Triton kernels (`batchnorm.kernels.triton_bn`) against torch in float64.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1, which this module sets
before the kernels are first loaded (so on tiny shapes: each program runs as numpy). With CUDA
the same tests run on the GPU, and the `gpu`-marked class adds larger shapes (`pytest -m gpu`).
Everything skips, with the reason, when triton is missing or cannot run here.

Each case compares every output: y, mean, invstd, the updated running statistics, dx, dweight,
dbias (and dresidual for the fused BN + add + ReLU) with F.batch_norm / autograd in float64.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled

from batchnorm.kernels import triton_bn as tb

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def _interpreter_runs() -> str | None:
    """None if triton can run a kernel here, else why not."""
    if not tb.available():
        return tb.why_unavailable()
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _double(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

        x = torch.ones(3, device=DEVICE)
        _double[(1,)](x, 3, BLOCK=4)
        assert x.tolist() == [2.0, 2.0, 2.0]
    except Exception as e:  # the interpreter (or the GPU compiler) cannot run here
        return f"triton cannot run a kernel: {type(e).__name__}: {e}"
    return None


DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
_WHY = _interpreter_runs()


@pytest.fixture(autouse=True)
def _needs_triton(request):
    """Skip, with the reason, where triton cannot run; the import test runs everywhere."""
    if _WHY is not None and request.function is not test_import_needs_no_triton:
        pytest.skip(f"Triton kernels unavailable: {_WHY}")


@pytest.fixture(params=["split", "channel"])
def path(request, monkeypatch):
    """Each training-step path in turn: the split reduction, its merge and the elementwise pass
    (three launches per direction), or the whole-channel kernels (one)."""
    monkeypatch.setattr(tb, "path_override", request.param)
    return request.param


# --------------------------------------------------------------------------- the oracle


def _reference(x, weight, bias, rm, rv, momentum, eps, axis, dy, residual=None, relu=False):
    """Everything the kernels compute, from torch in float64 (channels moved to dim 1 for F.batch_norm)."""
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.detach().double().requires_grad_()
    bd = None if bias is None else bias.detach().double().requires_grad_()
    rd = None if residual is None else residual.detach().double().requires_grad_()
    rmd = None if rm is None else rm.double()
    rvd = None if rv is None else rv.double()
    y = F.batch_norm(xd.movedim(axis, 1), rmd, rvd, wd, bd, True, momentum, eps).movedim(1, axis)
    if rd is not None:
        y = y + rd
    if relu:
        y = torch.relu(y)
    y.backward(dy.double())
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    var, mean = torch.var_mean(xd.detach(), dims, correction=0)
    return dict(
        y=y.detach(),
        mean=mean,
        invstd=torch.rsqrt(var + eps),
        running_mean=rmd,
        running_var=rvd,
        dx=xd.grad,
        dweight=None if wd is None else wd.grad,
        dbias=bd.grad if bd is not None else dy.double().sum(dims),  # (no bias: only without relu)
        dresidual=None if rd is None else rd.grad,
    )


def _close(name, got, want, dtype):
    assert got is not None, name
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def _make(shape, axis, dtype, channels_last=False, affine=True, running=True, offset=0.0):
    C = shape[axis]
    x = (torch.randn(shape) * 2 + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = torch.randn(C) if affine else None
    b = torch.randn(C) if affine else None
    rm = torch.randn(C) if running else None
    rv = torch.rand(C) + 0.5 if running else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return x.to(DEVICE), to(w), to(b), to(rm), to(rv)


def _check_train(shape, axis, dtype, channels_last=False, affine=True, running=True, momentum=0.1, offset=0.0):
    x, w, b, rm, rv = _make(shape, axis, dtype, channels_last, affine, running, offset)
    dy = torch.randn(shape).to(dtype).to(DEVICE)
    ref = _reference(x, w, b, rm, rv, momentum, 1e-5, axis, dy)
    y, mean, invstd = tb.train_forward(x, w, b, 1e-5, axis, rm, rv, momentum)
    dx, dw, db = tb.train_backward(dy, x, w, mean, invstd, axis)
    assert y.dtype == dx.dtype == x.dtype
    assert y.stride() == x.stride() and dx.stride() == x.stride()  # no layout change
    assert mean.dtype == invstd.dtype == db.dtype == torch.float32
    for name, got in (("y", y), ("mean", mean), ("invstd", invstd), ("dx", dx), ("dbias", db)):
        _close(name, got, ref[name], dtype)
    if affine:
        _close("dweight", dw, ref["dweight"], dtype)
    else:
        assert dw is None
    if running:
        _close("running_mean", rm, ref["running_mean"], torch.float32)
        _close("running_var", rv, ref["running_var"], torch.float32)


# --------------------------------------------------------------------------- training parity

CASES = [
    pytest.param((3, 5, 4, 3), 1, False, id="nchw"),
    pytest.param((3, 5, 4, 3), 1, True, id="channels_last"),
    pytest.param((2, 3, 2, 3, 2), 1, True, id="channels_last_3d"),
    pytest.param((6, 7), 1, False, id="2d"),
    pytest.param((4, 1, 5), 1, False, id="C=1"),
    pytest.param((2, 5, 3), -1, False, id="NLC-axis-1"),
    pytest.param((1, 9, 40), 1, False, id="one-sample-long-rows"),
]


@pytest.mark.parametrize(("shape", "axis", "channels_last"), CASES)
def test_train_forward_backward_float32(shape, axis, channels_last, path):
    _check_train(shape, axis, torch.float32, channels_last)


def test_without_affine_or_running_stats(path):
    _check_train((3, 5, 4, 3), 1, torch.float32, affine=False, running=False)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.3])
def test_momentum(momentum, path):
    _check_train((4, 3, 5), 1, torch.float32, channels_last=False, momentum=momentum)


@pytest.mark.parametrize(
    ("dtype", "channels_last"),
    [pytest.param(torch.bfloat16, True, id="bf16-channels_last"), pytest.param(torch.float16, False, id="f16")],
)
def test_half_inputs_accumulate_in_float32(dtype, channels_last, path):
    """Half x and dy with float32 weight, bias and running statistics (mixed precision)."""
    _check_train((3, 5, 4, 3), 1, dtype, channels_last)


def _check_large_offset(shape, channels_last=False):
    """Mean 1e4, std 2 in float32: E[x^2] - E[x]^2 would lose every digit of the variance (x^2 ~ 1e8).

    The variance (invstd) must keep float32 precision. y, dx and dweight are only as good as float32
    values of 1e4 allow (as in functional.py and torch): the float32 mean carries up to
    1e4 * 2**-24 ~ 6e-4 of rounding, which x - mean passes on; their atol says how far.
    """
    x, w, b, rm, rv = _make(shape, 1, torch.float32, channels_last, offset=1e4)
    dy = torch.randn(shape, device=DEVICE)
    ref = _reference(x, w, b, rm, rv, 0.1, 1e-5, 1, dy)
    y, mean, invstd = tb.train_forward(x, w, b, 1e-5, 1, rm, rv, 0.1)
    dx, dw, db = tb.train_backward(dy, x, w, mean, invstd, 1)
    torch.testing.assert_close(invstd.double().cpu(), ref["invstd"].cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(rv.double().cpu(), ref["running_var"].cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double().cpu(), ref["mean"].cpu(), rtol=1e-7, atol=0)
    # y = x*scale + shift: |x*scale| ~ 1e4 * scale rounds to 2**-24 of that, twice.
    ulps = 1e4 * 2**-22
    atol_y = ulps * float((w * invstd).abs().max())
    torch.testing.assert_close(y.double().cpu(), ref["y"].cpu(), rtol=0, atol=atol_y)
    # dx = k*dy + b*(x - mean) + c: the mean's rounding times b = -w * invstd**2 * dweight / m.
    m = x.numel() // x.shape[1]
    atol_dx = ulps * float((w * invstd**2 * dw).abs().max()) / m + 1e-5
    torch.testing.assert_close(dx.double().cpu(), ref["dx"].cpu(), rtol=1e-5, atol=atol_dx)
    # dweight = invstd * sum(dy * (x - mean)): the mean's rounding times invstd * sum(dy).
    atol_dw = ulps * float((invstd * db).abs().max()) + 1e-5
    torch.testing.assert_close(dw.double().cpu(), ref["dweight"].cpu(), rtol=1e-5, atol=atol_dw)
    _close("dbias", db, ref["dbias"], torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_large_offset_keeps_variance(channels_last, path):
    _check_large_offset((4, 3, 6, 5), channels_last)


@pytest.mark.parametrize(
    "tuning",
    [
        # 6 (NCHW) / 9 (channels_last) tiles per channel block in 4 / 7 splits of 2 tiles:
        # the last splits get none; several merge chunks of 4 partials.
        pytest.param(
            tb.Tuning(tile=8, max_block_c=2, programs=20, merge_block_s=4, merge_block_c=2), id="empty-splits"
        ),
        pytest.param(tb.Tuning(tile=4096, max_block_c=128, programs=1), id="one-tile"),
        pytest.param(tb.Tuning(tile=4, max_block_c=1, programs=3, merge_block_s=1, merge_block_c=1), id="tiny-tiles"),
    ],
)
def test_tilings_agree(monkeypatch, tuning, path):
    """Splits that get no tile, a single tile per channel, many tiny tiles: the same results."""
    monkeypatch.setattr(tb, "tuning_override", tuning)
    C = 5 if tuning.tile > 4 else 3  # (fewer programs to interpret for the tiny tiles)
    _check_train((3, C, 4, 3), 1, torch.float32, channels_last=False)
    _check_train((3, C, 4, 3), 1, torch.float32, channels_last=True)


def test_autotuned_path(monkeypatch):
    """BATCHNORM_TRITON_AUTOTUNE=1 runs the autotuned kernels (under the interpreter: no timing)."""
    monkeypatch.setenv("BATCHNORM_TRITON_AUTOTUNE", "1")
    _check_train((3, 5, 4, 3), 1, torch.float32, channels_last=True)


# --------------------------------------------------------------------------- fused BN + (add) + ReLU


@pytest.mark.parametrize("residual", [False, True], ids=["bn-relu", "bn-add-relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_act(residual, channels_last, path):
    shape = (3, 5, 4, 3)
    x, w, b, rm, rv = _make(shape, 1, torch.float32, channels_last)
    r = torch.randn(shape, device=DEVICE) if residual else None
    dy = torch.randn(shape, device=DEVICE)
    ref = _reference(x, w, b, rm, rv, 0.1, 1e-5, 1, dy, r, relu=True)
    y, mean, invstd = tb.train_forward_act(x, w, b, 1e-5, 1, r, "relu", rm, rv, 0.1)
    dx, dw, db, dr = tb.train_backward_act(dy, x, w, b, mean, invstd, 1, r)
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    assert (y >= 0).all() and (y == 0).any()
    got = dict(y=y, mean=mean, invstd=invstd, dx=dx, dweight=dw, dbias=db, dresidual=dr)
    got.update(running_mean=rm, running_var=rv)
    for name, value in got.items():
        if name == "dresidual" and not residual:
            assert value is None
            continue
        _close(name, value, ref[name], torch.float32)


def test_fused_act_none_is_plain_bn():
    x, w, b, _, _ = _make((3, 5, 4, 3), 1, torch.float32)
    y1, _, _ = tb.train_forward_act(x, w, b, 1e-5, 1, None, None)
    y2, _, _ = tb.train_forward(x, w, b, 1e-5, 1)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_fused_residual_in_another_layout(path):
    """A contiguous residual with a channels_last x is copied into x's layout; results the same."""
    shape = (2, 3, 3, 4)
    x, w, b, _, _ = _make(shape, 1, torch.float32, channels_last=True)
    r = torch.randn(shape, device=DEVICE)
    dy = torch.randn(shape, device=DEVICE)
    ref = _reference(x, w, b, None, None, 0.1, 1e-5, 1, dy, r, relu=True)
    y, mean, invstd = tb.train_forward_act(x, w, b, 1e-5, 1, r)
    dx, _, _, dr = tb.train_backward_act(dy, x, w, b, mean, invstd, 1, r)
    for name, got in (("y", y), ("dx", dx), ("dresidual", dr)):
        _close(name, got, ref[name], torch.float32)


# --------------------------------------------------------------------------- inference, layouts, errors


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inference(channels_last):
    x, w, b, rm, rv = _make((3, 5, 4, 3), 1, torch.float32, channels_last)
    scale = w * torch.rsqrt(rv + 1e-5)
    shift = b - rm * scale
    y = tb.inference(x, scale, shift, 1)
    want = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False, 0.1, 1e-5)
    assert y.stride() == x.stride()
    _close("y", y, want, torch.float32)
    # the block tail in the same pass: relu(BN(x) + residual), the residual in another layout
    residual = torch.randn(x.shape, device=DEVICE)
    y = tb.inference(x, scale, shift, 1, residual, "relu")
    assert y.stride() == x.stride()
    _close("y + residual, relu", y, torch.relu(want + residual.double()), torch.float32)
    assert (y == 0).any() and (y > 0).any()
    with pytest.raises(ValueError, match="act must be one of"):
        tb.inference(x, scale, shift, 1, act="gelu")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_eval_forward_takes_the_running_statistics(channels_last, dtype, affine):
    """eval_forward computes scale and shift in the kernel from the running statistics (float64
    ones here, float32 weight, bias): against torch in float64, with and without the residual +
    ReLU tail, and equal to inference() with the coefficients computed outside."""
    x, w, b, rm, rv = _make((3, 5, 4, 3), 1, dtype, channels_last, affine)
    rm, rv = rm.double() * 3, rv.double() * 1e-3  # far from 0 and 1, another dtype
    y = tb.eval_forward(x, rm, rv, w, b, 1e-5, 1)
    want = F.batch_norm(x.double(), rm, rv, None if w is None else w.double(), None if b is None else b.double(),
                        False, 0.1, 1e-5)  # fmt: skip
    assert y.dtype == x.dtype and y.stride() == x.stride()
    _close("y", y, want, dtype)
    residual = torch.randn(x.shape, device=DEVICE).to(dtype)
    y = tb.eval_forward(x, rm, rv, w, b, 1e-5, 1, residual, "relu")
    _close("relu(y + residual)", y, torch.relu(want + residual.double()), dtype)
    scale = torch.rsqrt(rv.float() + 1e-5) * (1 if w is None else w)
    shift = -rm.float() * scale + (0 if b is None else b)
    _close("vs inference", tb.eval_forward(x, rm, rv, w, b, 1e-5, 1), tb.inference(x, scale, shift, 1), dtype)
    with pytest.raises(ValueError, match=r"var must be \(5,\)"):
        tb.eval_forward(x, rm, rv[:4], w, b, 1e-5, 1)
    with pytest.raises(ValueError, match="act must be one of"):
        tb.eval_forward(x, rm, rv, w, b, 1e-5, 1, act="gelu")


def test_expanded_dy(path):
    """dy from y.sum().backward() is an expanded tensor (stride 0): copied into x's layout."""
    x, w, b, _, _ = _make((3, 5, 4, 3), 1, torch.float32, channels_last=True)
    dy = torch.ones((), device=DEVICE).expand(x.shape)
    ref = _reference(x, w, b, None, None, 0.1, 1e-5, 1, dy)
    _, mean, invstd = tb.train_forward(x, w, b, 1e-5, 1)
    dx, dw, db = tb.train_backward(dy, x, w, mean, invstd, 1)
    for name, got in (("dx", dx), ("dweight", dw), ("dbias", db)):
        _close(name, got, ref[name], torch.float32)


def test_need_dx_false(path):
    x, w, b, _, _ = _make((3, 5, 4), 1, torch.float32)
    dy = torch.randn(x.shape, device=DEVICE)
    _, mean, invstd = tb.train_forward(x, w, b, 1e-5, 1)
    dx, dw, db = tb.train_backward(dy, x, w, mean, invstd, 1, need_dx=False)
    dx2, dw2, db2 = tb.train_backward(dy, x, w, mean, invstd, 1)
    assert dx is None and dx2 is not None
    assert torch.equal(dw, dw2) and torch.equal(db, db2)


def test_properties_after_training_forward(path):
    """Every output channel has mean 0 and variance 1 (no affine); momentum 1 stores the batch stats."""
    x, _, _, rm, rv = _make((4, 3, 5, 2), 1, torch.float32, offset=3.0)
    y, mean, _ = tb.train_forward(x, None, None, 1e-5, 1, rm, rv, momentum=1.0)
    var, mu = torch.var_mean(y.double(), (0, 2, 3), correction=0)
    torch.testing.assert_close(mu, torch.zeros_like(mu), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)  # var/(var+eps)
    torch.testing.assert_close(rm, mean)
    torch.testing.assert_close(rv.double(), x.double().var((0, 2, 3), correction=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", [False, True], ids=["bn", "act"])
def test_return_var_keeps_the_digits_of_a_tiny_variance(act, path):
    """return_var gives the biased var as the kernel computed it: channels of variance 1e-12,
    1e-8 and 1 (eps 1e-5, where invstd**-2 - eps keeps no digit of the first) against float64's,
    and the kernel's own running update (momentum 1) stores it unbiased."""
    scale = torch.tensor([1e-6, 1e-4, 1.0]).view(1, 3, 1)
    x = (torch.randn(4, 3, 6, dtype=torch.float64) * scale + 0.25).float().to(DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    call = tb.train_forward_act if act else tb.train_forward
    extra = (None, "relu") if act else ()
    *_, invstd, var = call(x, None, None, 1e-5, 1, *extra, rm, rv, 1.0, return_var=True)
    want = x.double().cpu().var((0, 2), correction=0)
    torch.testing.assert_close(var.double().cpu(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(rv.double().cpu(), want * 24 / 23, rtol=1e-4, atol=0)
    torch.testing.assert_close(invstd, (var + 1e-5).rsqrt())
    assert len(call(x, None, None, 1e-5, 1, *extra)) == 3  # (y, mean, invstd) without return_var


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, in the interpreter: 3e38 * 7/6
@pytest.mark.parametrize("C", [5, 1500], ids=["C5", "C1500-blocks"])
@pytest.mark.parametrize("tensor_momentum", [False, True], ids=["float", "tensor"])
def test_update_running_all_channels_or_none(C, tensor_momentum):
    """update_running: PyTorch's rule on every channel (momentum a float or a 0-dim float64 tensor),
    and a batch with one non-finite channel (NaN, inf, or a var that overflows once unbiased) writes
    nothing; the outcome stays a 0-dim bool on the device, and the device's count of kept-out
    batches (given) goes up by one for each bad batch only."""
    m = 7
    mean, var = torch.randn(C, device=DEVICE), torch.rand(C, device=DEVICE) + 0.1
    rm0, rv0 = torch.randn(C, device=DEVICE), torch.rand(C, device=DEVICE) + 0.5
    momentum = torch.tensor(0.25, dtype=torch.float64, device=DEVICE) if tensor_momentum else 0.25
    skipped = torch.tensor(5, device=DEVICE)
    rm, rv = rm0.clone(), rv0.clone()
    flag = tb.update_running(mean, var, rm, rv, m, momentum, skipped)
    assert flag.dtype == torch.bool and flag.shape == () and flag.device == mean.device and bool(flag)
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * mean)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * var * (m / (m - 1)))
    assert int(skipped) == 5
    bads = ((C - 1, "mean", float("nan")), (0, "var", float("inf")), (C // 2, "var", 3e38))
    for i, (channel, field, bad) in enumerate(bads):
        batch = {"mean": mean.clone(), "var": var.clone()}
        batch[field][channel] = bad
        rm, rv = rm0.clone(), rv0.clone()
        flag = tb.update_running(batch["mean"], batch["var"], rm, rv, m, momentum, skipped)
        assert not bool(flag), (field, bad)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0), (field, bad)
        assert int(skipped) == 6 + i, (field, bad)
    assert bool(tb.update_running(mean, var, rm, rv, m, momentum))  # without a count: the same rule


def test_update_running_from_torchs_invstd():
    """eps given: the second vector is torch's invstd = (var + eps)**-1/2, and the variance is
    invstd**-2 - eps (0 where rounding makes it negative), as the C helper and the torch ops
    compute it in float64; a NaN invstd keeps the batch out."""
    m, eps = 9, 1e-3
    mean, var = torch.randn(6, device=DEVICE), torch.rand(6, device=DEVICE) + 0.01
    var[2] = 0.0  # a constant channel whose invstd came out above eps**-1/2 (rounding, exaggerated):
    invstd = (var.double() + eps).rsqrt().float()
    invstd[2] = eps**-0.5 * (1 + 1e-3)  # invstd**-2 - eps < 0, clamped to 0
    rm0, rv0 = torch.randn(6, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    assert bool(tb.update_running(mean, invstd, rm, rv, m, 0.5, eps=eps))
    want = (invstd.double().reciprocal().square() - eps).clamp_min(0.0) * (m / (m - 1))
    torch.testing.assert_close(rm, 0.5 * rm0 + 0.5 * mean)
    torch.testing.assert_close(rv.double(), 0.5 * rv0.double() + 0.5 * want, rtol=1e-6, atol=1e-9)
    assert float(rv[2]) == 0.5 * float(rv0[2])  # no negative variance from the rounding
    torch.testing.assert_close(rv.double(), 0.5 * rv0.double() + 0.5 * var.double() * m / (m - 1), rtol=1e-5, atol=1e-6)
    invstd[4] = float("nan")
    rm, rv = rm0.clone(), rv0.clone()
    assert not bool(tb.update_running(mean, invstd, rm, rv, m, 0.5, eps=eps))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_update_running_from_an_unbiased_variance():
    """m=None: var is the unbiased variance already (the variants' whole-batch statistics)."""
    mean, unbiased = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.1
    rm0, rv0 = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    assert bool(tb.update_running(mean, unbiased, rm, rv, None, 0.25))
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * mean)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * unbiased)
    assert tb.update_running(mean, unbiased, rm, rv, None, 0.25, eps=1e-5) is None  # invstd needs m


def test_update_running_declines_what_it_does_not_take():
    """None (the caller's torch ops then): float64 buffers, a non-contiguous one, one value per
    channel, a count of kept-out batches that is not int64."""
    mean, var = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    assert tb.update_running(mean, var, rm.double(), rv.double(), 5, 0.1) is None
    assert tb.update_running(mean, var, torch.zeros(8, device=DEVICE)[::2], rv, 5, 0.1) is None
    assert tb.update_running(mean, var, rm, rv, 1, 0.1) is None
    assert tb.update_running(mean, var, rm, rv, 5, 0.1, torch.zeros((), dtype=torch.int32, device=DEVICE)) is None
    assert torch.equal(rm, torch.zeros(4, device=DEVICE)) and torch.equal(rv, torch.ones(4, device=DEVICE))


def test_nonfinite_channel_keeps_its_running_stats(path):
    """A NaN in channel 1 leaves that channel's running statistics alone; the others update."""
    x, _, _, rm, rv = _make((4, 3, 5), 1, torch.float32)
    x[2, 1, 3] = float("nan")
    rm0, rv0 = rm.clone(), rv.clone()
    tb.train_forward(x, None, None, 1e-5, 1, rm, rv, 0.1)
    assert torch.equal(rm[1], rm0[1]) and torch.equal(rv[1], rv0[1])
    assert not torch.equal(rm[0], rm0[0]) and not torch.equal(rv[2], rv0[2])


def test_one_value_per_channel_skips_running_update(path):
    x, _, _, rm, rv = _make((1, 3), 1, torch.float32)
    rm0, rv0 = rm.clone(), rv.clone()
    y, _, _ = tb.train_forward(x, None, None, 1e-5, 1, rm, rv, 0.1)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    torch.testing.assert_close(y, torch.zeros_like(y), atol=1e-3, rtol=0)  # x - mean = 0


def test_supports_and_errors():
    x = torch.randn(3, 4, 5, device=DEVICE)
    assert tb.supports(x, 1) and tb.supports(x.transpose(1, 2), 2)
    assert not tb.supports(x[:, :, ::2], 1)  # not dense
    assert not tb.supports(x.double(), 1)
    assert not tb.supports(x[:0], 1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tb.train_forward(x.double(), None, None, 1e-5, 1)
    with pytest.raises(ValueError, match="not a dense"):
        tb.train_forward(x[:, :, ::2], None, None, 1e-5, 1)
    with pytest.raises(ValueError, match="non-empty"):
        tb.train_forward(x[:0], None, None, 1e-5, 1)
    with pytest.raises(ValueError, match="act must be"):
        tb.train_forward_act(x, None, None, 1e-5, 1, act="gelu")
    with pytest.raises(ValueError, match=r"weight must be \(4,\)"):
        tb.train_forward(x, torch.ones(5, device=DEVICE), None, 1e-5, 1)
    with pytest.raises(ValueError, match="dy has shape"):
        tb.train_backward(x[:1], x, None, torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), 1)


def test_tile_heuristics_split_whatever_c_is():
    """On an H100-like tuning, C=3 (8, 3, 224, 224) still fills the GPU: many splits per channel."""
    t = tb.Tuning(programs=528)
    A, C, B = 8, 3, 224 * 224
    shape = tb._tile_shape(A, C, B, t.tile, t.max_block_c)
    assert shape == (1, 1, 2048)
    assert tb._splits(A, C, B, shape, t) == 176  # 3 channels x 176 splits = 528 programs
    # channels_last (N*H*W, C, 1): rows of contiguous channels.
    assert tb._tile_shape(32 * 56 * 56, 64, 1, t.tile, t.max_block_c) == (32, 64, 1)
    # ResNet's last stage (32, 2048, 7, 7): 32 planes of 49 per tile.
    assert tb._tile_shape(32, 2048, 49, t.tile, t.max_block_c) == (32, 1, 64)


def test_whole_channel_rule():
    """On an H100-like tuning: the whole-channel kernels where the split reduction would give every
    channel block one split anyway (ResNet's 7x7 and 14x14 stages, NCHW: 2048 and 1024 channel
    blocks for 528 programs) or a block has at most `channel_tiles` tiles; the split path where the
    channel blocks are few and long."""
    t = tb.Tuning(programs=528)

    def whole(A, C, B):
        return tb._whole_channels(A, C, B, tb._tile_shape(A, C, B, t.tile, t.max_block_c), t)

    assert whole(32, 2048, 49) and whole(32, 1024, 196)  # one split per channel
    assert whole(128, 64, 1)  # 2-D (128, 64): one block of 4 tiles
    assert not whole(32, 64, 56 * 56) and not whole(8, 3, 224 * 224)  # NCHW, few channels
    assert not whole(32 * 49, 2048, 1) and not whole(4096, 1024, 1)  # channels_last / 2-D: 32 and 16 blocks
    assert not whole(512, 256, 1)  # 16 tiles per block


def test_device_tuning_made_once_per_device(monkeypatch):
    """On a GPU the tuning (4 programs per SM) is made at a device's first call and then reused: no
    property query and no new Tuning per launch. Two fake devices with 132 and 108 SMs."""
    queries = []

    def properties(device):
        queries.append(device.index)
        return SimpleNamespace(multi_processor_count={0: 132, 1: 108}[device.index])

    monkeypatch.setitem(tb._state, "interpret", False)
    monkeypatch.setattr(tb, "_device_tunings", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    on = [SimpleNamespace(device=torch.device("cuda", i)) for i in (0, 1)]
    first = [tb._tuning(x) for x in on]
    assert [t.programs for t in first] == [528, 432]
    assert [tb._tuning(x) for x in on for _ in range(3)] == [first[0]] * 3 + [first[1]] * 3
    assert queries == [0, 1]
    monkeypatch.setattr(tb, "tuning_override", tb._INTERPRETER_TUNING)  # the override still wins
    assert tb._tuning(on[0]) is tb._INTERPRETER_TUNING


class Launches(list):
    """Kernel names in launch order; `options`: (name, the launch's keyword arguments) alike."""

    def __init__(self) -> None:
        super().__init__()
        self.options: list[tuple[str, dict]] = []


@pytest.fixture
def launches(monkeypatch) -> Launches:
    """The kernels launched while the test runs, by name, in order."""
    calls = Launches()

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls.append(self.name)
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                calls.options.append((self.name, kwargs))
                return launch(*args, **kwargs)

            return run

    for name in tb._JIT:
        if name.endswith("_kernel"):
            monkeypatch.setattr(tb, name, Spy(name, getattr(tb, name)))
    return calls


@pytest.mark.parametrize(("C", "whole"), [(12, True), (2, False)], ids=["12-blocks", "2-blocks"])
def test_training_step_launches(monkeypatch, launches, C, whole):
    """One launch per direction on the whole-channel path, three on the split path, as the rule
    picks them (the interpreter's tuning: 6 programs, at most 2 tiles for the whole-channel kernels;
    NCHW (4, C, 5, 5) has C channel blocks of four tiles, one sample's plane each: 12 blocks take one
    split each, 2 would take three; the same tuning on a GPU)."""
    monkeypatch.setattr(tb, "tuning_override", tb._INTERPRETER_TUNING)
    x, w, b, rm, rv = _make((4, C, 5, 5), 1, torch.float32)
    t = tb._tuning(x)
    assert tb._whole_channels(4, C, 25, tb._tile_shape(4, C, 25, t.tile, t.max_block_c), t) == whole
    dy = torch.randn_like(x)
    ref = _reference(x, w, b, rm, rv, 0.1, 1e-5, 1, dy)
    y, mean, invstd = tb.train_forward(x, w, b, 1e-5, 1, rm, rv)
    dx, dw, db = tb.train_backward(dy, x, w, mean, invstd, 1)
    if whole:
        assert launches == ["_channel_forward_kernel", "_channel_backward_kernel"]
    else:
        forward = ["_stats_kernel", "_stats_merge_kernel", "_apply_kernel"]
        assert launches == [*forward, "_grad_reduce_kernel", "_grad_merge_kernel", "_dx_kernel"]
    for name, got in dict(y=y, dx=dx, dweight=dw, dbias=db, running_mean=rm, running_var=rv).items():
        _close(name, got, ref[name], torch.float32)
    monkeypatch.setattr(tb, "path_override", "whole")
    with pytest.raises(ValueError, match="path_override must be None, 'split' or 'channel'"):
        tb.train_forward(x, w, b, 1e-5, 1)


@pytest.mark.parametrize("path", ["split", "channel"])
def test_every_launch_states_fp_fusion(monkeypatch, launches, path):
    """Each kernel a training step (BN + add + ReLU), the running update and eval launch asks for FP
    fusion itself: not Triton's default, which changes in 3.10 (and 3.9 warns about on a GPU)."""
    monkeypatch.setattr(tb, "path_override", path)
    x, w, b, rm, rv = _make((4, 3, 5, 5), 1, torch.float32)
    r, dy = torch.randn_like(x), torch.randn_like(x)
    _, mean, invstd, var = tb.train_forward_act(x, w, b, 1e-5, 1, r, "relu", return_var=True)
    tb.train_backward_act(dy, x, w, b, mean, invstd, 1, r)
    tb.update_running(mean, var, rm, rv, 100, 0.1, torch.zeros((), dtype=torch.int64, device=DEVICE))
    tb.eval_forward(x, rm, rv, w, b, 1e-5, 1, r, "relu")
    forward, backward = ["_channel_forward_kernel"], ["_channel_backward_kernel"]
    if path == "split":
        forward, backward = (
            ["_stats_kernel", "_stats_merge_kernel", "_apply_kernel"],
            ["_grad_reduce_kernel", "_grad_merge_kernel", "_dx_kernel"],
        )
    assert launches == [*forward, *backward, "_running_kernel", "_apply_kernel"]
    assert [name for name, kw in launches.options if kw.get("enable_fp_fusion") is not True] == []


# --------------------------------------------------------------------------- compiles for a GPU

_AOT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from batchnorm.kernels import triton_bn as tb

tb._jit_kernels()
DATA = {"x_ptr", "y_ptr", "r_ptr", "dy_ptr", "dr_ptr", "g_ptr", "dx_ptr"}
FLOATS = {"m", "eps", "momentum", "unbias"}


def compile_(name, dtype, types=None, **constexprs):
    fn = getattr(tb, name)
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif types and a in types:
            sig[a] = types[a]
        elif a in DATA:
            sig[a] = "*" + dtype
        elif a in ("rmean_ptr", "rvar_ptr"):
            sig[a] = "*bf16"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32"
        else:
            sig[a] = "fp32" if a in FLOATS else "i32"
    options = {"num_warps": 4, **tb._OPTIONS}
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32), options=options)


# Triton turns an int argument equal to 1 into a constexpr: channels_last has B == 1, and
# N == 1, C == 1 or S == 1 happen; compile those too.
flags = dict(HAS_W=True, HAS_B=True)
cases = (
    ("fp32", (1, 1, 2048), False, {}),
    ("bf16", (32, 64, 1), True, dict(B=1)),
    ("fp16", (1, 1, 1024), False, dict(A=1, C=1, S=1)),
)
for dtype, blocks, int64, ones in cases:
    tile = dict(BLOCK_A=blocks[0], BLOCK_C=blocks[1], BLOCK_B=blocks[2], INT64=int64, **ones)
    no_s = {k: v for k, v in tile.items() if k != "S"}
    merge = {k: v for k, v in ones.items() if k != "A"}
    first = dtype == "fp32"  # the flag-less variants once
    compile_("_stats_kernel", dtype, **tile)
    compile_("_apply_kernel", dtype, **no_s, **flags, COEFS=1, HAS_RES=True, RELU=True)
    compile_("_apply_kernel", dtype, **no_s, **flags, COEFS=2, HAS_RES=False, RELU=False)
    if first:
        compile_("_apply_kernel", dtype, **no_s, COEFS=0, HAS_W=False, HAS_B=False, HAS_RES=False, RELU=False)
        compile_("_grad_reduce_kernel", dtype, **tile, HAS_W=False, HAS_B=False, RELU=False, HAS_RES=False)
    compile_("_grad_reduce_kernel", dtype, **tile, **flags, RELU=True, HAS_RES=True)
    compile_("_dx_kernel", dtype, **no_s, **flags, RELU=True)
    compile_("_channel_forward_kernel", dtype, **no_s, **flags, HAS_RES=True, RELU=True, HAS_RUNNING=not int64)
    compile_("_channel_backward_kernel", dtype, **no_s, **flags, RELU=True, HAS_RES=True, NEED_DX=True)
    if first:
        plain = dict(HAS_W=False, HAS_B=False, HAS_RES=False, RELU=False)
        compile_("_channel_forward_kernel", dtype, **no_s, **plain, HAS_RUNNING=False)
        compile_("_channel_backward_kernel", dtype, **no_s, **plain, NEED_DX=False)
    compile_("_stats_merge_kernel", dtype, HAS_RUNNING=not int64, BLOCK_S=32, BLOCK_C=128, INT64=int64, **merge)
    if dtype != "bf16":
        merge.pop("B", None)
        compile_("_grad_merge_kernel", dtype, HAS_W=first, BLOCK_S=32, BLOCK_C=128, **merge)
running = {"rmean_ptr": "*fp32", "rvar_ptr": "*fp32", "flag_ptr": "*u8", "momentum_ptr": "*fp64", "skipped_ptr": "*i64"}
for tensor_momentum in (False, True):
    for skipped in (False, True):
        flags = dict(MOMENTUM_PTR=tensor_momentum, HAS_SKIPPED=skipped, INVSTD=skipped and not tensor_momentum)
        compile_("_running_kernel", "fp32", running, **flags, BLOCK_C=1024)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The compiled (non-interpreter) path: every kernel and flag combination lowers to sm_90 cubin.

    Runs triton's compiler (and its bundled ptxas) ahead of time, no GPU needed, in a subprocess
    without TRITON_INTERPRET. Catches what the interpreter forgives (types of loop-carried values,
    constexpr misuse, int64 indexing). ~10 s the first time; triton's cache (keyed by the kernels'
    source and options, so never stale) makes reruns of unchanged kernels take ~3 s.
    """
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = os.path.join(tempfile.gettempdir(), "batchnorm-triton-sm90-cache")
    env.update(TRITON_CACHE_DIR=cache)  # (FP fusion: each compile states it, as each launch does)
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- import without triton


def test_import_needs_no_triton(monkeypatch):
    """A fresh copy of the module imports and reports unavailable when triton cannot be imported."""
    spec = importlib.util.find_spec("batchnorm.kernels.triton_bn")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec.loader.exec_module(mod)
    assert mod.tl is None and not mod._state  # importing touched nothing
    assert not mod.available()
    assert "triton cannot be imported" in mod.why_unavailable()
    assert not mod.supports(torch.randn(2, 3, device=DEVICE), 1)
    with pytest.raises(RuntimeError, match="not available"):
        mod.train_forward(torch.randn(2, 3, device=DEVICE), None, None, 1e-5, 1)


_FRESH = """
import sys
import torch
import batchnorm as bn

assert "batchnorm.kernels.triton_bn" not in sys.modules  # nothing has imported it yet
x = torch.randn(4, 3, 5, 5, device=sys.argv[1], requires_grad=True)
layer = bn.BatchNorm2d(3).to(x.device)
with bn.functional.use_backend(sys.argv[2]):
    layer(x).sum().backward()
    with torch.no_grad():
        layer.eval()(x)
print("ok", int(layer.num_batches_tracked))
"""


def test_a_fresh_process_takes_the_triton_path():
    """The first call in a new process finds the Triton kernels itself: until the seventeenth
    session functional looked triton_bn up as an attribute of batchnorm.kernels, which only an
    earlier import of the module had set (every test process had one; a user's on a GPU did not,
    and "auto" failed with AttributeError on its first CUDA tensor)."""
    env = dict(os.environ)
    backend = "auto"
    if DEVICE == "cpu":  # the interpreter: "auto" never sends a CPU tensor there, the forced backend does
        env["TRITON_INTERPRET"], backend = "1", "triton"
    code = [sys.executable, "-c", _FRESH, DEVICE, backend]
    proc = subprocess.run(code, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "1"], proc.stderr[-3000:]


# --------------------------------------------------------------------------- GPU, larger shapes


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (runs under the interpreter otherwise)")
class TestGPU:
    """The same comparisons at sizes where tiles, splits and merges are the GPU's."""

    @pytest.mark.parametrize(
        ("shape", "axis", "channels_last"),
        [
            ((32, 64, 56, 56), 1, False),
            ((32, 64, 56, 56), 1, True),
            ((8, 3, 224, 224), 1, False),
            ((32, 2048, 7, 7), 1, False),
            ((32, 2048, 7, 7), 1, True),
            ((4096, 1024), 1, False),
            ((32, 128, 512), 1, False),
            ((100000, 32), 1, False),
        ],
    )
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_train(self, shape, axis, channels_last, dtype):
        _check_train(shape, axis, dtype, channels_last)

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
    @pytest.mark.parametrize("residual", [False, True], ids=["bn-relu", "bn-add-relu"])
    def test_fused(self, channels_last, residual):
        shape = (32, 256, 28, 28)
        x, w, b, rm, rv = _make(shape, 1, torch.float32, channels_last)
        r = torch.randn(shape, device=DEVICE) if residual else None
        dy = torch.randn(shape, device=DEVICE)
        ref = _reference(x, w, b, rm, rv, 0.1, 1e-5, 1, dy, r, relu=True)
        y, mean, invstd = tb.train_forward_act(x, w, b, 1e-5, 1, r, "relu", rm, rv, 0.1)
        dx, dw, db, dr = tb.train_backward_act(dy, x, w, b, mean, invstd, 1, r)
        got = dict(y=y, dx=dx, dweight=dw, dbias=db, running_mean=rm, running_var=rv)
        if residual:
            got["dresidual"] = dr
        for name, value in got.items():
            _close(name, value, ref[name], torch.float32)

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
    def test_large_offset(self, channels_last):
        _check_large_offset((32, 64, 56, 56), channels_last)

    def test_autotuned(self, monkeypatch):
        monkeypatch.setenv("BATCHNORM_TRITON_AUTOTUNE", "1")
        _check_train((16, 64, 28, 28), 1, torch.float32, channels_last=True)
        _check_train((16, 64, 28, 28), 1, torch.bfloat16)


# --------------------------------------------------------------------------- the GPU session's A/B script


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's smoke run (on a GPU, gpu_check.sh paths runs it)")
def test_paths_benchmark_smoke(tmp_path):
    """benchmarks/triton_paths.py, which a GPU session runs (`gpu_check.sh paths`), on its tiny
    inputs in the interpreter: every input timed on both paths and torch's, the rule recorded."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "triton_paths.py")
    out = tmp_path / "paths.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--json", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and {r["rule"] for r in rows} == {"split", "channel"}
    for r in rows:
        for timing in (r["ms"], r["host_ms"], r["pipelined_ms"]):
            assert set(timing) == {"split", "channel", "torch", "torch-rule"} and all(v > 0 for v in timing.values())


def test_host_overhead_benchmark_smoke():
    """benchmarks/host_overhead.py (the host's share of a Triton step, kernels stubbed) runs and
    prints a positive median for each of its rows."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "host_overhead.py")
    proc = subprocess.run([sys.executable, script, "--repeats", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(line.rsplit(None, 2)[:2] for line in proc.stdout.splitlines())
    assert len(rows) == 23 and {"step, ours", "step, torch", "autograd's share, step"} <= set(rows)
    assert {"CUDA's rule, step, Triton path", "CUDA's rule, eval, torch's kernel"} <= set(rows)
    assert all(float(us) > 0 for us in rows.values())
