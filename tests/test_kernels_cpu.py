"""The compiled CPU kernel (`batchnorm.kernels.cpu`) against float64 torch.

Every entry point on every layout it accepts: NCHW, channels_last, channels_last_3d, 2-D,
3-D, (N, L, C) with axis=-1, other dense permutations; C = 1 and C = 3, odd sizes, both
code paths of the kernel (planes of B > 1 values, rows with B = 1, widened and tail rows),
one and two threads; float32 and bfloat16. Plus the 1e4-offset stability case, supports()
on layouts it must refuse, and the build's fallbacks (in subprocesses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from batchnorm.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel: {cpu.why_unavailable()}")

EPS = 1e-5
CL, CL3 = torch.channels_last, torch.channels_last_3d

# (shape, memory format or None, axis): each reaches a different canonical (A, C, B).
LAYOUTS = [
    pytest.param((4, 3, 5, 7), None, 1, id="nchw"),  # planes, B = 35
    pytest.param((4, 3, 5, 7), CL, 1, id="nhwc"),  # rows, C = 3 widened, tail rows
    pytest.param((3, 5, 7, 11), CL, 1, id="nhwc-c5"),
    pytest.param((2, 3, 4, 5, 6), CL3, 1, id="ndhwc"),
    pytest.param((2, 3, 4, 5, 6), None, 1, id="ncdhw"),
    pytest.param((16, 5), None, 1, id="2d"),  # rows, fewer rows than the widening wants
    pytest.param((67, 3), None, 1, id="2d-c3-tail"),
    pytest.param((20, 300), None, 1, id="2d-c300"),  # rows, not widened, C % 16 != 0
    pytest.param((20, 264), None, 1, id="2d-c264"),  # wide rows, C % 8 == 0 (inference: 256-bit rows)
    pytest.param((5, 3, 7), None, 1, id="3d-b7"),
    pytest.param((4, 6, 3), None, -1, id="nlc-axis-1"),
    pytest.param((6, 1, 4, 4), None, 1, id="c1"),
    pytest.param((6, 1, 4, 4), CL, 1, id="c1-nhwc"),
    pytest.param((37, 1), None, 1, id="2d-c1"),
    pytest.param((3, 2, 9000), None, 1, id="planes-chunked"),  # B over one chunk (f32 and bf16)
    pytest.param((9, 5, 7, 7), None, 1, id="nchw-7x7"),  # 45 whole planes: two batches of 16 and 13 alone
    pytest.param((2, 500, 4, 5), None, 1, id="nchw-b20-wide"),  # planes (rows too wide) of 20: overlapping tails
    pytest.param((67, 32), None, 1, id="2d-c32-pairs"),  # rows of 4 x 32 columns (bfloat16 eval in pairs), 3 tail rows
    # bfloat16 rows whose coefficients fill half of L1 take 4 rows at a time: dx from 1025 columns (2 blocks + 3
    # rows, a masked last vector), the relu backward's from 683, the training apply's from 1366, eval in pairs from 2049
    pytest.param((11, 1041), None, 1, id="2d-c1041-row-blocks"),
    pytest.param((6, 700), None, 1, id="2d-c700-relu-row-blocks"),
    pytest.param((6, 1401), None, 1, id="2d-c1401-apply-row-blocks"),
    pytest.param((7, 2080), None, 1, id="2d-c2080-pairs-row-blocks"),
]
# Big enough for two threads (the kernel gives each at least 32K elements).
LAYOUTS_MT = [
    pytest.param((4, 3, 80, 80), None, 1, id="mt-nchw"),
    pytest.param((4, 3, 80, 80), CL, 1, id="mt-nhwc-c3"),
    pytest.param((4, 64, 18, 18), CL, 1, id="mt-nhwc-c64"),
    pytest.param((1031, 77), None, 1, id="mt-2d-odd"),
    pytest.param((200, 512), None, 1, id="mt-2d-c512"),  # wide rows on two threads
    pytest.param((70, 1100), None, 1, id="mt-2d-c1100"),  # bfloat16 dx 4 rows at a time, 35 rows a thread
    pytest.param((2, 1, 180, 190), None, 1, id="mt-c1"),
    pytest.param((64, 200, 6), None, 1, id="mt-3d-b6"),  # rows path with B > 1
    pytest.param((64, 41, 7, 7), None, 1, id="mt-nchw-7x7"),  # 2624 planes in batches of 16, split unevenly
    # channel groups (run "2threads-groups"): groups of 4 planes of 28x28 (whole 64-value runs)
    pytest.param((4, 24, 28, 28), None, 1, id="mt-nchw-28x28"),
    pytest.param((8, 128, 7, 7), None, 1, id="mt-nchw-7x7-c128"),  # groups of 64 channels of 7x7
    pytest.param((4, 13, 32, 32), None, 1, id="mt-nchw-c13"),  # a shorter last group
    pytest.param((2, 8, 8256), None, 1, id="mt-planes-chunked"),  # several chunks per plane
    pytest.param((5, 32, 21, 21), CL, 1, id="mt-nhwc-c32-pairs"),  # as 2d-c32-pairs, on two threads, a tail row
]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]


def make(shape, fmt, dtype, offset=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def params(C, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.5 * torch.randn(C, generator=g), 0.5 * torch.randn(C, generator=g)


def reduce_dims(x, axis):
    return [d for d in range(x.dim()) if d != axis % x.dim()]


def out_tol(dtype):
    """Outputs: float32 to a few ulp of O(1) values; bfloat16 to one rounding (2**-8 relative)."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)


def same_layout(a, b):
    return a.shape == b.shape and all(s == t for n, s, t in zip(a.shape, a.stride(), b.stride()) if n != 1)


def channel(v, x, axis):
    """A (C,) vector in float64, shaped to broadcast along x's channel axis."""
    view = [1] * x.dim()
    view[axis % x.dim()] = -1
    return v.double().view(view)


def reference_apply(x, mean, var, w, b, axis):
    """float64 (x - mean) / sqrt(var + eps) * w + b on the same (already rounded) values."""
    y = (x.double() - channel(mean, x, axis)) / torch.sqrt(channel(var, x, axis) + EPS)
    return y if w is None else y * channel(w, x, axis) + channel(b, x, axis)


def reference_forward(x, w, b, axis):
    """float64 torch on the same (already rounded) values: y, mean, biased var."""
    xd = x.double()
    dims = reduce_dims(x, axis)
    mean = xd.mean(dims)
    var = xd.var(dims, unbiased=False)
    return reference_apply(x, mean, var, w, b, axis), mean, var


# Inputs of a channel group in the "groups" runs: a few channels of the small tensors here.
GROUP_BYTES = 64 << 10


def set_threads(nthreads: int, streaming: bool | str):
    """Thread count, and whether outputs use streaming stores (forced on for small tensors);
    "groups": streaming, and the training passes by channel groups where the layout allows them
    (else phase by phase, as in the other runs)."""
    torch.set_num_threads(nthreads)
    cpu._set_streaming_threshold(0 if streaming else -1)
    cpu._set_channel_group_bytes(GROUP_BYTES if streaming == "groups" else 0)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    cpu._set_streaming_threshold(cpu._last_level_cache_bytes())
    cpu._set_channel_group_bytes(None)


# Small shapes run on one thread whatever is asked; both store kinds matter there.
SMALL = [pytest.param(1, False, id="regular-stores"), pytest.param(1, True, id="streaming")]
MT = [
    pytest.param(1, False, id="1thread"),
    pytest.param(2, False, id="2threads"),
    pytest.param(2, True, id="2threads-streaming"),
    pytest.param(2, "groups", id="2threads-groups"),
]
GRID = [
    pytest.param(*layout.values, dtype.values[0], affine, *run.values, id=f"{layout.id}-{dtype.id}-{aid}-{run.id}")
    for layouts, runs in ((LAYOUTS, SMALL), (LAYOUTS_MT, MT))
    for layout in layouts
    for dtype in DTYPES
    for affine, aid in ((True, "affine"), (False, "plain"))
    for run in runs
    if affine or layouts is LAYOUTS
]


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("shape,fmt,axis,dtype,affine,nthreads,streaming", GRID)
def test_train_forward_matches_float64(shape, fmt, axis, dtype, affine, nthreads, streaming, restore_threads):
    set_threads(nthreads, streaming)
    x = make(shape, fmt, dtype)
    C = shape[axis]
    w, b = params(C) if affine else (None, None)
    assert cpu.supports(x, axis)
    y, mean, var = cpu.train_forward(x, w, b, EPS, axis)
    y_ref, mean_ref, var_ref = reference_forward(x, w, b, axis)

    assert y.dtype == dtype and same_layout(y, x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (C,)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), y_ref, **out_tol(dtype))


@pytest.mark.parametrize("shape,fmt,axis", LAYOUTS + LAYOUTS_MT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_alone_equal_the_forwards_bitwise(shape, fmt, axis, dtype):
    """`statistics` (the forward without an output) gives the training forward's mean, var and
    invstd, bitwise, and the float64 mean and variance they round (the merge of float32 chunk
    sums); with those, `apply` gives the forward's y (batch renormalization)."""
    x = make(shape, fmt, dtype)
    y, mean, var, invstd, _ = cpu.train_forward_update(x, None, None, EPS, axis, None, None, 0.0)
    got = cpu.statistics(x, EPS, axis)
    for a, b in zip(got, (mean, var, invstd)):
        assert torch.equal(a, b)
    mean64, var64 = got[3:]
    assert mean64.dtype == var64.dtype == torch.float64
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    var_ref, mean_ref = torch.var_mean(x.double(), dims, correction=0)
    torch.testing.assert_close(mean64, mean_ref, rtol=1e-6, atol=1e-6)  # float32 chunk sums, merged in float64
    torch.testing.assert_close(var64, var_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(mean64.float(), mean) and torch.equal(var64.float(), var)
    one = torch.ones_like(mean64)
    y2 = cpu.apply(x, *cpu.centred(mean64, torch.rsqrt(var64 + EPS), 0 * one), axis)
    torch.testing.assert_close(y2.float(), y.float(), **out_tol(dtype))


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_forward_layout_matches_torch_memory_format(fmt):
    x = make((2, 16, 6, 6), fmt, torch.float32)
    y, _, _ = cpu.train_forward(x, None, None, EPS, 1)
    fmt = fmt or torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and y.stride() == x.stride()


# --------------------------------------------------------------------------- backward


def reference_backward(x, dy, w, b, axis):
    xd = x.double().contiguous().requires_grad_()
    wd = (torch.ones(x.shape[axis], dtype=torch.float64) if w is None else w.double()).requires_grad_()
    bd = (torch.zeros(x.shape[axis], dtype=torch.float64) if b is None else b.double()).requires_grad_()
    perm = list(range(x.dim()))
    perm[1], perm[axis % x.dim()] = perm[axis % x.dim()], perm[1]  # channels to dim 1 for F.batch_norm
    y = F.batch_norm(xd.permute(perm), None, None, wd, bd, training=True, eps=EPS).permute(perm)
    return torch.autograd.grad(y, (xd, wd, bd), dy.double().contiguous())


@pytest.mark.parametrize("shape,fmt,axis,dtype,affine,nthreads,streaming", GRID)
def test_train_backward_matches_float64_autograd(shape, fmt, axis, dtype, affine, nthreads, streaming, restore_threads):
    set_threads(nthreads, streaming)
    x = make(shape, fmt, dtype)
    dy = make(shape, fmt, dtype, seed=2)
    C = shape[axis]
    w, b = params(C) if affine else (None, None)
    _, mean, var = cpu.train_forward(x, w, b, EPS, axis)
    invstd = torch.rsqrt(var + EPS)
    dx, s1, s2 = cpu.train_backward(dy, x, w, mean, invstd, axis, need_dx=True)
    dx_ref, dw_ref, db_ref = reference_backward(x, dy, w, b, axis)

    assert dx.dtype == dtype and same_layout(dx, x)
    assert s1.dtype == s2.dtype == torch.float32 and s1.shape == s2.shape == (C,)
    scale = dw_ref.abs().max().item() + 1
    torch.testing.assert_close(s1.double(), db_ref, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close((s2 * invstd).double(), dw_ref, rtol=1e-4, atol=1e-5 * scale)
    tol = out_tol(dtype)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=tol["rtol"], atol=tol["atol"] * dx_ref.abs().max().item())

    none, t1, t2 = cpu.train_backward(dy, x, w, mean, invstd, axis, need_dx=False)
    assert none is None
    torch.testing.assert_close(t1, s1, rtol=0, atol=0)
    torch.testing.assert_close(t2, s2, rtol=0, atol=0)


@pytest.mark.parametrize("dy_dtype", [torch.float32, torch.float64])
def test_backward_copies_dy_of_another_layout(dy_dtype):
    """A contiguous (or float64) dy for a channels_last x: copied into x's layout first."""
    x = make((4, 8, 5, 5), CL, torch.float32)
    dy_cl = make((4, 8, 5, 5), CL, torch.float32, seed=3)
    dy_plain = dy_cl.contiguous().to(dy_dtype)
    w, _ = params(8)
    _, mean, var = cpu.train_forward(x, w, None, EPS, 1)
    invstd = torch.rsqrt(var + EPS)
    dx1, a1, b1 = cpu.train_backward(dy_cl, x, w, mean, invstd, 1)
    dx2, a2, b2 = cpu.train_backward(dy_plain, x, w, mean, invstd, 1)
    assert dx2.is_contiguous(memory_format=CL)
    torch.testing.assert_close(dx2, dx1)
    torch.testing.assert_close(a2, a1)
    torch.testing.assert_close(b2, b1)


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("shape,fmt,axis,dtype,affine,nthreads,streaming", [p for p in GRID if p.values[4]])
def test_inference_matches_float64(shape, fmt, axis, dtype, affine, nthreads, streaming, restore_threads):
    set_threads(nthreads, streaming)
    x = make(shape, fmt, dtype)
    C = shape[axis]
    scale, shift = params(C, seed=4)
    y = cpu.inference(x, scale, shift, axis)
    y_ref = x.double() * channel(scale, x, axis) + channel(shift, x, axis)
    assert y.dtype == dtype and same_layout(y, x)
    torch.testing.assert_close(y.double(), y_ref, **out_tol(dtype))


@pytest.mark.parametrize("shape,fmt,axis,dtype,affine,nthreads,streaming", [p for p in GRID if p.values[4]])
def test_eval_forward_matches_float64(shape, fmt, axis, dtype, affine, nthreads, streaming, restore_threads):
    """scale and shift computed inside the kernel from the running statistics."""
    set_threads(nthreads, streaming)
    x = make(shape, fmt, dtype)
    C = shape[axis]
    w, b = params(C, seed=5)
    g = torch.Generator().manual_seed(6)
    mean, var = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.1
    for weight, bias in ((w, b), (None, None)):
        y = cpu.eval_forward(x, mean, var, weight, bias, EPS, axis)
        y_ref = reference_apply(x, mean, var, weight, bias, axis)
        assert y.dtype == dtype and same_layout(y, x)
        torch.testing.assert_close(y.double(), y_ref, **out_tol(dtype))


# --------------------------------------------------------------------------- BN + ReLU in the apply pass


@pytest.mark.parametrize("shape,fmt,axis,dtype,affine,nthreads,streaming", [p for p in GRID if p.values[4]])
def test_relu_passes_equal_bn_then_add_then_relu(shape, fmt, axis, dtype, affine, nthreads, streaming, restore_threads):
    """relu(BN(x) + residual) written by the apply pass (training and eval) on every layout, store
    kind and thread count. float32: bitwise the separate passes (the same float32 operations in the
    same order). bfloat16: bitwise too without a residual (rounding is monotone); with one, within
    a rounding of float64 (the fused pass rounds once, the separate ones twice). NaN stays NaN,
    -inf gives 0; the statistics are the plain forward's."""
    set_threads(nthreads, streaming)
    x = make(shape, fmt, dtype)
    C = shape[axis]
    w, b = params(C)
    residual = make(shape, fmt, dtype, seed=3)
    flat = residual.view(-1) if residual.is_contiguous() else residual.permute(0, *range(2, x.dim()), 1).view(-1)
    flat[: min(3, flat.numel())] = torch.tensor([float("nan"), float("-inf"), float("inf")][: flat.numel()])
    g = torch.Generator().manual_seed(6)
    running = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.1
    plain_train = cpu.train_forward_update(x, w, b, EPS, axis, None, None, 0.0)
    plain_eval = cpu.eval_forward(x, *running, w, b, EPS, axis)
    for r in (None, residual):
        fused_train = cpu.train_forward_relu(x, r, w, b, EPS, axis)
        for a, want in zip(fused_train[1:4], plain_train[1:4]):
            assert torch.equal(a, want)
        fused_eval = cpu.eval_forward(x, *running, w, b, EPS, axis, relu=True, residual=r)
        train = (fused_train[0], plain_train[0], plain_train[1:3])
        for fused, plain, (mean, var) in (train, (fused_eval, plain_eval, running)):
            assert fused.dtype == dtype and same_layout(fused, x)
            composite = torch.relu(plain if r is None else plain + r)
            if dtype == torch.float32 or r is None:
                torch.testing.assert_close(fused, composite, rtol=0, atol=0, equal_nan=True)
            else:
                exact = torch.relu(reference_apply(x, mean, var, w, b, axis) + r.double())
                torch.testing.assert_close(fused.double(), exact, **out_tol(dtype), equal_nan=True)


@pytest.mark.parametrize("shape,fmt,axis,dtype,affine,nthreads,streaming", GRID)
def test_relu_backward_equals_relus_then_bns(shape, fmt, axis, dtype, affine, nthreads, streaming, restore_threads):
    """BN + ReLU's backward with the ReLU test recomputed from x and the forward's (scale, shift), in
    both passes, equals torch's ReLU backward (dy where y > 0) followed by BN's backward, bitwise:
    the same values are summed in the same order. Every layout, store kind, thread count and dtype."""
    set_threads(nthreads, streaming)
    x = make(shape, fmt, dtype)
    dy = make(shape, fmt, dtype, seed=2)
    C = shape[axis]
    w, b = params(C) if affine else (None, None)
    y, mean, _, invstd, _, gate = cpu.train_forward_relu(x, None, w, b, EPS, axis)
    assert gate.shape == (2, C) and gate.dtype == torch.float32
    got = cpu.train_backward(dy, x, w, mean, invstd, axis, relu_gate=gate)
    want = cpu.train_backward(torch.ops.aten.threshold_backward(dy, y, 0), x, w, mean, invstd, axis)
    assert same_layout(got[0], x)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert cpu.train_backward(dy, x, w, mean, invstd, axis, need_dx=False, relu_gate=gate)[0] is None


def test_relu_backward_checks_its_gate():
    x = make((4, 3, 5, 5), None, torch.float32)
    _, mean, _, invstd, _, gate = cpu.train_forward_relu(x, None, None, None, EPS, 1)
    with pytest.raises(ValueError, match=r"relu_gate must be train_forward_relu's float32 \(2, 3\)"):
        cpu.train_backward(x, x, None, mean, invstd, 1, relu_gate=gate[0])


def test_relu_pass_copies_a_residual_of_another_layout():
    x = make((4, 16, 6, 6), CL, torch.float32)
    r = make((4, 16, 6, 6), None, torch.float32, seed=3)
    y = cpu.train_forward_relu(x, r, None, None, EPS, 1)[0]
    want = cpu.train_forward_relu(x, r.to(memory_format=CL), None, None, EPS, 1)
    assert same_layout(y, x) and torch.equal(y, want[0])
    with pytest.raises(ValueError, match=r"residual has shape \(4, 16, 6\)"):
        cpu.eval_forward(x, torch.zeros(16), torch.ones(16), None, None, EPS, 1, relu=True, residual=r[..., 0])


# --------------------------------------------------------------------------- running statistics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,fmt,axis", [LAYOUTS[0].values, LAYOUTS[1].values, LAYOUTS[7].values])
def test_train_forward_update_applies_torchs_rule(shape, fmt, axis, dtype):
    x = make(shape, fmt, dtype, offset=2.0, scale=3.0)
    C = shape[axis]
    w, b = params(C)
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    y, mean, var, invstd, updated = cpu.train_forward_update(x, w, b, EPS, axis, rm, rv, 0.3)
    y_plain, mean_plain, var_plain = cpu.train_forward(x, w, b, EPS, axis)
    assert updated is True
    assert torch.equal(y, y_plain) and torch.equal(mean, mean_plain) and torch.equal(var, var_plain)
    torch.testing.assert_close(invstd, torch.rsqrt(var.double() + EPS).float(), rtol=1e-7, atol=0)
    m = x.numel() // C
    torch.testing.assert_close(rm, 0.7 * rm0 + 0.3 * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, 0.7 * rv0 + 0.3 * var * m / (m - 1), rtol=1e-6, atol=1e-6)
    # the same buffers through torch's own kernel
    rm_t, rv_t = rm0.clone(), rv0.clone()
    xt = x.float().movedim(axis, 1)
    F.batch_norm(xt, rm_t, rv_t, w, b, True, 0.3, EPS)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rm, rm_t, **tol)
    torch.testing.assert_close(rv, rv_t, **tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_train_forward_update_leaves_running_stats_on_a_nonfinite_batch(bad):
    x = make((4, 3, 5, 7), None, torch.float32)
    x[1, 2, 3, 4] = bad  # one channel only: the other two must not be updated either
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    *_, updated = cpu.train_forward_update(x, None, None, EPS, 1, rm, rv, 0.1)
    assert updated is False
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize(
    "make_buffers",
    [
        lambda C: (None, None),
        lambda C: (torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)),
        lambda C: (torch.zeros(2 * C)[::2], torch.ones(2 * C)[::2]),  # strided
        lambda C: (torch.zeros(C + 1), torch.ones(C + 1)),  # wrong length
        lambda C: (torch.zeros(C), None),
    ],
    ids=["none", "float64", "strided", "wrong-length", "only-mean"],
)
def test_train_forward_update_leaves_other_buffers_to_the_caller(make_buffers):
    x = make((4, 3, 5, 7), None, torch.float32)
    rm, rv = make_buffers(3)
    before = [None if t is None else t.clone() for t in (rm, rv)]
    _, mean, _, _, updated = cpu.train_forward_update(x, None, None, EPS, 1, rm, rv, 0.1)
    assert updated is None
    for t, t0 in zip((rm, rv), before):
        assert t is None or torch.equal(t, t0)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_update_running_from_mean_and_unbiased_equals_torchs_ops(stats_dtype):
    """The variants' update in one C call: torch's mul_/add_ rule on float32 buffers, bitwise;
    nothing written for a non-finite batch; None (the caller's torch ops) for what it does not take."""
    C = 37  # not a multiple of the vector width: the scalar tails too
    mean, unbiased = torch.randn(C, dtype=stats_dtype) * 5, torch.rand(C, dtype=stats_dtype) * 3
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    assert cpu.update_running_unbiased(mean, unbiased, rm, rv, 0.3) is True
    want_m = rm0.clone().mul_(1 - 0.3).add_(mean.float(), alpha=0.3)
    want_v = rv0.clone().mul_(1 - 0.3).add_(unbiased.float(), alpha=0.3)
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v)

    bad = unbiased.clone()
    bad[5] = float("inf")
    assert cpu.update_running_unbiased(mean, bad, rm, rv, 0.3) is False
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v)
    for args in (
        (mean, unbiased, rm.double(), rv.double(), 0.3),  # buffers of another dtype
        (mean, unbiased.float() if stats_dtype == torch.float64 else unbiased.double(), rm, rv, 0.3),
        (mean[:5], unbiased[:5], rm, rv, 0.3),  # another length
        (mean, unbiased, rm, rv, torch.tensor(0.3)),  # a tensor momentum (graphs)
    ):
        assert cpu.update_running_unbiased(*args) is None
    assert torch.equal(rm, want_m)


def test_update_running_from_torchs_mean_and_invstd():
    """The running-statistics rule from torch's kernel's outputs equals the one inside our forward."""
    x = make((6, 4, 3, 5), None, torch.float32, offset=2.0, scale=3.0)
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, EPS)
    rm0, rv0 = torch.randn(4), torch.rand(4) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    assert cpu.update_running(mean, invstd, x.numel() // 4, EPS, rm, rv, 0.3) is True
    rm_k, rv_k = rm0.clone(), rv0.clone()
    cpu.train_forward_update(x, None, None, EPS, 1, rm_k, rv_k, 0.3)
    torch.testing.assert_close(rm, rm_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_k, rtol=1e-5, atol=1e-6)

    bad = invstd.clone()
    bad[2] = float("nan")
    before = rm.clone(), rv.clone()
    assert cpu.update_running(mean, bad, x.numel() // 4, EPS, rm, rv, 0.3) is False
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])

    f64 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert cpu.update_running(mean, invstd, x.numel() // 4, EPS, *f64, 0.3) is None  # the caller's job
    assert cpu.update_running(mean.double(), invstd, x.numel() // 4, EPS, rm, rv, 0.3) is None
    assert torch.equal(f64[0], torch.zeros(4)) and torch.equal(rm, before[0])


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("nthreads,streaming", MT)
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_large_offset_keeps_float32_precision(fmt, nthreads, streaming, restore_threads):
    """mean 1e4, std 1 in float32: E[x^2] - E[x]^2 would lose every digit of the variance."""
    set_threads(nthreads, streaming)
    x = make((16, 4, 32, 32), fmt, torch.float32, offset=1e4)
    y, mean, var = cpu.train_forward(x, None, None, EPS, 1)
    y_ref, mean_ref, var_ref = reference_forward(x, None, None, 1)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-7, atol=0)
    # y = (x - mean_hi) * scale + shift: the offset costs no precision in y either.
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def shifted_runs(shape, axis: int, period: int, every: int, level: float) -> torch.Tensor:
    """bfloat16 N(0, 1) with runs of `period` values along `axis` moved by `level`, the first run and
    then one in `every`: where the statistics' one pass takes its shift (a plane's first values;
    in rows, the mean of the blocks before) is far from the mean."""
    x = make(shape, None, torch.float64)
    moved = (torch.arange(shape[axis]) // period) % every == 0
    view = [1] * len(shape)
    view[axis] = -1
    return (x + level * moved.view(view)).to(torch.bfloat16)


@pytest.mark.parametrize("nthreads,streaming", MT[:2])
@pytest.mark.parametrize(
    "shape,axis,period,every,level",
    [
        pytest.param((2, 3, 8192), 2, 16, 1 << 20, 64.0, id="planes"),  # a plane's first 16 values only
        pytest.param((2048, 256), 0, 256, 2, 256.0, id="rows"),  # blocks of 256 rows at 256 and at 0 in turn
    ],
)
def test_bfloat16_statistics_keep_float32_precision(
    shape, axis, period, every, level, nthreads, streaming, restore_threads
):
    """bfloat16 statistics run in one pass (sums of x - shift and of its square) where the shift
    is close to the mean, and in two where it is not: either way the variance of the bfloat16
    values is float32-accurate, like float32's two passes."""
    set_threads(nthreads, streaming)
    x = shifted_runs(shape, axis, period, every, level)
    *_, mean64, var64 = cpu.statistics(x, EPS, 1)
    var_ref, mean_ref = torch.var_mean(x.double(), reduce_dims(x, 1), correction=0)
    torch.testing.assert_close(mean64, mean_ref, rtol=0, atol=1e-6 * var_ref.sqrt().max().item())
    torch.testing.assert_close(var64, var_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("nthreads,streaming", MT)
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_bfloat16_rounds_to_nearest_even(fmt, nthreads, streaming, restore_threads):
    """One rounding of the float32 result: torch's float32 -> bfloat16 conversion, inf and NaN too.

    (With AVX512-BF16 the kernel's conversion flushes results below 2**-126 to zero; none here.)
    """
    set_threads(nthreads, streaming)
    x = make((4, 16, 40, 40), fmt, torch.bfloat16)
    x[0, 0, 0, :7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, 1.0, -2.5, 0.0])
    scale, shift = params(16, seed=5)
    # a NaN whose low 16 bits are set: rounding its bits as a number's would carry into the sign (-0)
    scale[3] = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    y = cpu.inference(x, scale, shift, 1)
    # x * scale is exact in float64, so this is the fused multiply-add's float32 result
    y32 = (x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)).float()
    torch.testing.assert_close(y, y32.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)


GROUPED = [p for p in LAYOUTS_MT if p.id.startswith(("mt-nchw-28", "mt-nchw-7x7-c", "mt-nchw-c13", "mt-planes"))]


@pytest.mark.parametrize("shape,fmt,axis", GROUPED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_groups_equal_phase_by_phase_bitwise(shape, fmt, axis, dtype, restore_threads):
    """The training backward by channel groups (each thread takes a few channels through the
    gradient sums and dx while they are cached) gives the phase-by-phase results bitwise: the same
    units summed in the same order. With and without the ReLU's gate, two threads, streaming
    stores. Float32 only (bfloat16 runs phase by phase)."""
    x, dy = (make(shape, fmt, dtype, seed=s) for s in (0, 2))
    C = shape[axis]
    w, b = params(C)
    set_threads(2, "groups")
    G = cpu._channel_group(x, axis)
    if dtype == torch.bfloat16:
        assert G == 0
    else:
        assert 0 < G < C  # groups, at least two of them
    _, mean, _, invstd, _, gate = cpu.train_forward_relu(x, None, w, b, EPS, axis)
    results = {}
    for groups in (False, True):
        set_threads(2, "groups" if groups else True)
        bwd = cpu.train_backward(dy, x, w, mean, invstd, axis)
        gated = cpu.train_backward(dy, x, w, mean, invstd, axis, relu_gate=gate)
        results[groups] = [*bwd, *gated]
    assert len(results[True]) == 6
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_thread_count_changes_little(restore_threads):
    x = make((4, 1, 300, 300), None, torch.float32, offset=3.0)
    set_threads(1, False)
    _, m1, v1 = cpu.train_forward(x, None, None, EPS, 1)
    set_threads(2, False)
    _, m2, v2 = cpu.train_forward(x, None, None, EPS, 1)
    torch.testing.assert_close(m1, m2, rtol=1e-7, atol=0)
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- supports


@pytest.mark.parametrize(
    "make_x,axis",
    [
        # (C, N).t(): (N, C) with the channels outermost, canonical (1, C, N)
        pytest.param(lambda: make((6, 50), None, torch.float32).t(), 1, id="transposed-2d"),
        # (4, 8, 5).transpose(1, 2): channel dim 2 of (4, 5, 8), canonical (4, 8, 5)
        pytest.param(lambda: make((4, 8, 5), None, torch.float32).transpose(1, 2), 2, id="transposed-3d"),
        pytest.param(lambda: make((4, 3, 5, 5), None, torch.float32).permute(0, 2, 1, 3), 2, id="permuted"),
        pytest.param(lambda: make((4, 3, 5, 5), CL, torch.float32).permute(3, 1, 2, 0), 1, id="nhwc-permuted"),
    ],
)
def test_supports_dense_permutations_without_copy(make_x, axis):
    """Any dense tensor reads in memory order as (A, C, B): outputs keep its strides."""
    x = make_x()
    assert not x.is_contiguous() and cpu.supports(x, axis)
    y, mean, var = cpu.train_forward(x, None, None, EPS, axis)
    y_ref, mean_ref, var_ref = reference_forward(x, None, None, axis)
    assert y.stride() == x.stride()
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make_x,axis",
    [
        pytest.param(lambda: torch.randn(4, 3, 8, 8)[:, :, ::2], 1, id="strided-slice"),
        pytest.param(lambda: torch.randn(4, 3, 8, 8)[1:3, :, 2:6, :], 1, id="window"),
        pytest.param(lambda: torch.randn(1, 3, 1, 1).expand(4, 3, 5, 5), 1, id="expanded"),
        pytest.param(lambda: torch.randn(4, 8, 6)[:, :, :5].transpose(1, 2), 2, id="sliced-transposed"),
        pytest.param(lambda: torch.randn(4, 3, 8, 8, dtype=torch.float16), 1, id="float16"),
        pytest.param(lambda: torch.randn(4, 3, 8, 8, dtype=torch.float64), 1, id="float64"),
        pytest.param(lambda: torch.randint(0, 5, (4, 3, 8, 8)), 1, id="int"),
        pytest.param(lambda: torch.randn(0, 3, 8, 8), 1, id="empty"),
        pytest.param(lambda: torch.randn(4, 3, 8, 8), 4, id="axis-out-of-range"),
    ],
)
def test_supports_false(make_x, axis):
    x = make_x()
    assert not cpu.supports(x, axis)
    with pytest.raises(ValueError, match="supports"):
        cpu.train_forward(x, None, None, EPS, axis)


def test_wrong_parameter_size_raises():
    x = make((4, 3, 5, 5), None, torch.float32)
    with pytest.raises(ValueError, match="one value per channel, 3"):
        cpu.train_forward(x, torch.ones(4), None, EPS, 1)


# --------------------------------------------------------------------------- build and fallback


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


CHECK = """
    from batchnorm.kernels import cpu
    print(cpu.available(), cpu.library_path(), cpu.why_unavailable(), sep="|")
"""


def test_env_var_disables_the_kernel():
    proc = run_python(CHECK, BATCHNORM_NO_KERNEL="1")
    assert proc.returncode == 0, proc.stderr
    ok, _, why = proc.stdout.strip().split("|")
    assert ok == "False" and "BATCHNORM_NO_KERNEL=1" in why


def test_compiler_failure_is_reported_not_raised(tmp_path):
    proc = run_python(CHECK, BATCHNORM_CACHE=str(tmp_path), CC="false")
    assert proc.returncode == 0, proc.stderr
    ok, _, why = proc.stdout.strip().split("|")
    assert ok == "False" and "compiling the CPU kernel failed" in why


def test_concurrent_builds_of_the_portable_variant(tmp_path):
    """Two processes build at once into a fresh cache (as parallel test workers would), here the
    portable C variant (no AVX-512 code: compiler-vectorized loops, AVX2 streaming stores), and
    check it on a few layouts against float64 (the whole file: test_this_file_passes_on_the_portable_variant)."""
    env = {**os.environ, "BATCHNORM_CACHE": str(tmp_path), "BATCHNORM_KERNEL_CFLAGS": "-mno-avx512f"}
    env["BATCHNORM_NO_EXTENSION"] = "1"  # the ctypes path; test_extension.py builds the C++ one
    code = textwrap.dedent(
        """
        import torch
        from batchnorm.kernels import cpu
        assert cpu.available(), cpu.why_unavailable()
        cpu._set_streaming_threshold(0)
        cases = [((4, 3, 50, 50), None), ((4, 3, 50, 50), torch.channels_last), ((64, 200, 6), None),
                 ((3, 40, 49), None), ((1031, 77), None)]
        for dtype in (torch.float32, torch.bfloat16):
            for shape, fmt in cases:
                x = torch.randn(shape, dtype=torch.float64).to(dtype)
                x = x if fmt is None else x.contiguous(memory_format=fmt)
                dy = torch.randn(shape).to(dtype)
                y, mean, var = cpu.train_forward(x, None, None, 1e-5, 1)
                dims = [0] + list(range(2, x.dim()))
                xd = x.double()
                var_ref, mean_ref = torch.var_mean(xd, dims, correction=0)
                view = [1, -1] + [1] * (x.dim() - 2)
                y_ref = (xd - mean_ref.view(view)) / torch.sqrt(var_ref.view(view) + 1e-5)
                tol = 1e-5 if dtype == torch.float32 else 1.6e-2
                torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
                invstd = torch.rsqrt(var + 1e-5)
                dx, s1, s2 = cpu.train_backward(dy, x, None, mean, invstd, 1)
                torch.testing.assert_close(s1.double(), dy.double().sum(dims), rtol=1e-4, atol=1e-3)
                assert dx.stride() == x.stride()
                # relu(BN(x) + residual) in the apply pass, training and eval
                fused = cpu.train_forward_relu(x, dy, None, None, 1e-5, 1)[0]
                fused_eval = cpu.eval_forward(x, mean, var, None, None, 1e-5, 1, relu=True, residual=dy)
                y_eval = cpu.eval_forward(x, mean, var, None, None, 1e-5, 1)
                for got, plain in ((fused, y), (fused_eval, y_eval)):
                    composite = torch.relu(plain.double() + dy.double())
                    torch.testing.assert_close(got.double(), composite, rtol=tol, atol=tol)
                    assert got.stride() == x.stride()
                # relu(BN(x))'s backward with the ReLU test recomputed from x
                y_relu, _, _, _, _, gate = cpu.train_forward_relu(x, None, None, None, 1e-5, 1)
                gated = cpu.train_backward(dy, x, None, mean, invstd, 1, relu_gate=gate)
                g = torch.ops.aten.threshold_backward(dy, y_relu, 0)
                composite = cpu.train_backward(g, x, None, mean, invstd, 1)
                for a, e in zip(gated, composite):
                    torch.testing.assert_close(a, e, rtol=0, atol=0)
            # channel groups (float32), with regular stores here: bitwise the phase-by-phase passes
            torch.set_num_threads(2)
            x = torch.randn(4, 13, 32, 32).to(dtype)
            dy = torch.randn(4, 13, 32, 32).to(dtype)
            assert (0 < cpu._channel_group(x, 1) < 13) == (dtype == torch.float32)
            outs = []
            for nbytes in (None, 0):
                cpu._set_channel_group_bytes(nbytes)
                fwd = cpu.train_forward(x, None, None, 1e-5, 1)
                outs.append(fwd + cpu.train_backward(dy, x, None, fwd[1], torch.rsqrt(fwd[2] + 1e-5), 1))
            cpu._set_channel_group_bytes(None)
            for a, e in zip(*outs):
                assert torch.equal(a, e)
            # the masked kernels over (N, C, L) planes; padding NaN
            mask = torch.arange(50)[None] < torch.tensor([50, 20, 3, 37])[:, None]
            x = torch.randn(4, 3, 50).masked_fill(~mask[:, None], float("nan")).to(dtype)
            dy = torch.randn(4, 3, 50).to(dtype)
            y, mean, var, invstd = cpu.masked_forward(x, mask, None, None, 1e-5, 1)
            real = x.double().transpose(1, 2)[mask]  # (M, C)
            torch.testing.assert_close(mean.double(), real.mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(var.double(), real.var(0, unbiased=False), rtol=1e-5, atol=1e-6)
            dx, s1, s2 = cpu.masked_backward(dy, x, mask, None, mean, invstd, 1, True)
            torch.testing.assert_close(s1.double(), dy.double().transpose(1, 2)[mask].sum(0), rtol=1e-4, atol=1e-3)
            ye = cpu.masked_eval(x, mask, mean, var, None, None, 1e-5, 1)
            torch.testing.assert_close(ye.float(), y.float(), rtol=1e-2, atol=1e-2)
            for t in (y, dx, ye):
                assert not t.transpose(1, 2)[~mask].any() and torch.isfinite(t).all()
        print(cpu.library_path())
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip().startswith(str(tmp_path))
    assert len({out.strip() for out, _ in outs}) == 1
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith("bn_cpu.")]
    assert leftovers == ["bn_cpu.c"]


def test_the_kernel_compiles_without_avx2(tmp_path):
    """The source compiles for a CPU with neither AVX-512 nor AVX2 (cpu.py's flags without
    -march=native: baseline x86-64 here, as an ARM machine's compiler sees no x86 vector code
    either); this build once failed on a macro defined only for AVX2."""
    compiler = cpu._compiler("CC", ("cc", "gcc"))
    flags = [f for f in cpu.CFLAGS if not f.startswith("-march")]
    out = tmp_path / "libbn_generic.so"
    proc = subprocess.run([*compiler, *flags, "-o", str(out), str(cpu.SOURCE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


PORTABLE_VARIANTS = [  # (flags, the CPU capabilities where the native build is another variant)
    pytest.param("-mno-avx512f", ("AVX512",), id="avx2"),  # streaming stores, explicit AVX2 bfloat16 code
    pytest.param("-mno-avx512f -mno-avx2", ("AVX512", "AVX2"), id="no-avx2"),  # plain C: ARM, x86 before AVX2
]


@pytest.mark.parametrize("flags,native_elsewhere", PORTABLE_VARIANTS)
@pytest.mark.skipif(bool(os.environ.get("BATCHNORM_KERNEL_CFLAGS")), reason="already a run of a variant build")
def test_this_file_passes_on_the_portable_variant(flags, native_elsewhere):
    """Everything above, once more on the kernel a CPU without AVX-512 builds: with AVX2 (the portable
    C with its streaming stores and AVX2 bfloat16 code) and without (the plain C that ARM machines and
    x86 before AVX2 run), with the C++ entry points built against it."""
    if torch.backends.cpu.get_cpu_capability() not in native_elsewhere:
        pytest.skip("this CPU's own build is this variant: the file above ran on it")
    env = {**os.environ, "BATCHNORM_KERNEL_CFLAGS": flags}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "not portable_variant"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
