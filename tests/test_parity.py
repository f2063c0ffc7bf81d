"""Our layers against torch.nn.BatchNorm1d/2d/3d: same numbers on every mode.

Each case runs several training steps and then one eval step on both layers,
starting from the same parameters, and compares the output, the input
gradient, the weight and bias gradients and every buffer after each step.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import batchnorm as bn

C = 3
# (rank, memory format): NCHW everywhere, channels_last for 4-D and 5-D.
LAYOUTS = {
    "2d": (2, torch.contiguous_format),
    "3d": (3, torch.contiguous_format),
    "4d": (4, torch.contiguous_format),
    "4d-channels_last": (4, torch.channels_last),
    "5d": (5, torch.contiguous_format),
    "5d-channels_last_3d": (5, torch.channels_last_3d),
}
SHAPES = {2: (7, C), 3: (4, C, 5), 4: (3, C, 4, 5), 5: (2, C, 3, 4, 2)}  # small, uneven
CLASSES = {
    2: (torch.nn.BatchNorm1d, bn.BatchNorm1d),
    3: (torch.nn.BatchNorm1d, bn.BatchNorm1d),
    4: (torch.nn.BatchNorm2d, bn.BatchNorm2d),
    5: (torch.nn.BatchNorm3d, bn.BatchNorm3d),
}
AFFINE = {
    "affine": dict(affine=True),
    "no-affine": dict(affine=False),
    "no-bias": dict(affine=True, bias=False),
}
# input dtype -> parameter / buffer dtype (bfloat16 input with float32 params is mixed precision)
DTYPES = {
    "float64": (torch.float64, torch.float64),
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.float32),
}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
TRAIN_STEPS = 3


def _make_pair(rank: int, param_dtype: torch.dtype, device: str = "cpu", **kwargs):
    """A torch layer and ours, with the same non-trivial parameters."""
    torch_cls, our_cls = CLASSES[rank]
    theirs = torch_cls(C, dtype=param_dtype, **kwargs)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.copy_(torch.rand(C) + 0.5)
        if theirs.bias is not None:
            theirs.bias.copy_(torch.randn(C))
    ours = our_cls(C, dtype=param_dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(device), ours.to(device)


def _input(rank: int, fmt: torch.memory_format, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(SHAPES[rank], dtype=torch.float64) * 2.0 + 3.0
    return x.to(device, dtype).contiguous(memory_format=fmt)


def _step_and_compare(theirs, ours, x: torch.Tensor, fmt, out_tol: dict, acc_tol: dict) -> None:
    """One forward and backward on both layers; compare everything they produce."""
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    assert yb.dtype == ya.dtype and yb.shape == ya.shape
    assert_close(yb, ya, **out_tol)
    if fmt is not torch.contiguous_format:
        assert ya.is_contiguous(memory_format=fmt)  # torch keeps it: so must we
        assert yb.is_contiguous(memory_format=fmt)

    # dy in y's memory format, as the next layer gives it. (With a contiguous dy
    # and channels_last bfloat16 input torch's own bias gradient is off by ~1e-2:
    # it is the oracle that is less exact there, not us.)
    g = torch.randn(ya.shape, dtype=torch.float64).to(ya.device, ya.dtype).contiguous(memory_format=fmt)
    # torch.autograd.grad hands back the gradients as computed (x.grad would be
    # re-laid out to match x), so the memory format of dx is checked too.
    names = [n for n in ("weight", "bias") if getattr(theirs, n) is not None]
    assert names == [n for n in ("weight", "bias") if getattr(ours, n) is not None]
    dxa, *dpa = torch.autograd.grad(ya, [xa, *(getattr(theirs, n) for n in names)], g)
    dxb, *dpb = torch.autograd.grad(yb, [xb, *(getattr(ours, n) for n in names)], g)
    assert dxb.dtype == dxa.dtype
    # dx = k * (m dy - sum dy - x_hat sum(dy x_hat)): scale the absolute tolerance with |dx|
    scale = float(dxa.abs().max().float()) + 1.0
    assert_close(dxb, dxa, rtol=out_tol["rtol"], atol=out_tol["atol"] * scale)
    if dxa.is_contiguous(memory_format=fmt):
        assert dxb.is_contiguous(memory_format=fmt)
    for name, a, b in zip(names, dpa, dpb):
        assert_close(b, a, **acc_tol, msg=lambda m, name=name: f"{name} grad: {m}")

    for name in BUFFERS:
        ba, bb = getattr(theirs, name), getattr(ours, name)
        assert (ba is None) == (bb is None), name
        if ba is not None:
            assert bb.dtype == ba.dtype, name
            assert_close(bb, ba, **acc_tol)


# "auto" as users run it: these small inputs take torch's kernel (functional.NATIVE_MAX_ELEMS);
# "cpu" forces our C kernel on the same inputs.
DTYPE_PATHS = [("float64", "auto"), ("float32", "auto"), ("float32", "cpu"), ("bfloat16", "auto"), ("bfloat16", "cpu")]


@pytest.mark.parametrize("dtype_name, backend", DTYPE_PATHS, ids=[f"{d}-{b}" for d, b in DTYPE_PATHS])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("momentum", [0.1, None, 0.3], ids=["m0.1", "mNone", "m0.3"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_torch_training_then_eval(layout, momentum, affine, track, dtype_name, backend, tol):
    with bn.functional.use_backend(backend):
        _train_then_eval(layout, momentum, affine, track, dtype_name, tol)


def _train_then_eval(layout, momentum, affine, track, dtype_name, tol, device="cpu"):
    rank, fmt = LAYOUTS[layout]
    in_dtype, param_dtype = DTYPES[dtype_name]
    theirs, ours = _make_pair(
        rank, param_dtype, device, momentum=momentum, track_running_stats=track, **AFFINE[affine]
    )
    out_tol = tol(in_dtype)
    # Parameter gradients and running statistics are sums over m values, in the
    # parameters' dtype: tight in float64, a little looser in float32.
    acc_tol = tol(torch.float64) if param_dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)

    for _ in range(TRAIN_STEPS):
        _step_and_compare(theirs, ours, _input(rank, fmt, in_dtype, device), fmt, out_tol, acc_tol)
    if track:
        assert int(ours.num_batches_tracked) == TRAIN_STEPS
        assert not torch.equal(ours.running_mean.cpu(), torch.zeros(C, dtype=param_dtype))  # stats did move

    theirs.eval()
    ours.eval()
    _step_and_compare(theirs, ours, _input(rank, fmt, in_dtype, device), fmt, out_tol, acc_tol)


# The Triton kernels through the layers: on the GPU, or in triton's interpreter on CPU tensors (the
# "triton" backend takes those under TRITON_INTERPRET=1, which conftest sets where there is no GPU).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


TRITON_VARIANTS = [("affine", "float32"), ("no-affine", "float32"), ("no-bias", "float32"), ("affine", "bfloat16")]


@pytest.mark.parametrize("path", ["split", "channel"])
@pytest.mark.parametrize("affine, dtype_name", TRITON_VARIANTS, ids=[f"{a}-{d}" for a, d in TRITON_VARIANTS])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_path_matches_torch_training_then_eval(layout, affine, dtype_name, path, tol, triton_calls, monkeypatch):
    """Both paths of the kernels' training step (triton_bn.path_override): the split reduction,
    or one program per channel block."""
    from batchnorm.kernels import triton_bn

    monkeypatch.setattr(triton_bn, "path_override", path)
    with bn.functional.use_backend("triton"):
        _train_then_eval(layout, 0.1, affine, True, dtype_name, tol, TRITON_DEVICE)
    # every training step on the kernels (eval with gradients wanted takes differentiable torch ops)
    assert triton_calls == ["train_forward", "train_backward"] * TRAIN_STEPS


@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("momentum", [None, 0.3], ids=["mNone", "m0.3"])
@pytest.mark.parametrize("layout", ["2d", "4d-channels_last"])
def test_triton_path_momentum_and_tracking(layout, momentum, track, tol, triton_calls):
    with bn.functional.use_backend("triton"):
        _train_then_eval(layout, momentum, "affine", track, "float32", tol, TRITON_DEVICE)
    assert triton_calls[: 2 * TRAIN_STEPS] == ["train_forward", "train_backward"] * TRAIN_STEPS


@pytest.mark.parametrize("act", [False, True], ids=["bn", "act"])
def test_triton_path_running_var_of_a_nearly_constant_channel(act, triton_calls, monkeypatch):
    """A channel of variance ~1e-12 (eps 1e-5): the running variance as torch's float64 layer
    keeps it, to float32's digits, not what invstd = (var + eps)**-1/2 leaves of it. The update is
    the kernels' one launch (`triton_bn.update_running`), not the torch ops' fallback."""
    from batchnorm.kernels import triton_bn

    flags = []
    update = triton_bn.update_running
    monkeypatch.setattr(triton_bn, "update_running", lambda *a, **k: flags.append(update(*a, **k)) or flags[-1])
    ours = (bn.BatchNormAct2d if act else bn.BatchNorm2d)(C, momentum=1.0).to(TRITON_DEVICE)
    theirs = torch.nn.BatchNorm2d(C, momentum=1.0, dtype=torch.float64)
    x = torch.randn(4, C, 3, 3, dtype=torch.float64) * 2
    x[:, 0] = x[:, 0] * 5e-7 + 0.25
    with bn.functional.use_backend("triton"):
        ours(x.float().to(TRITON_DEVICE))
    theirs(x.float().double())
    assert triton_calls == ["train_forward_act" if act else "train_forward"]
    assert len(flags) == 1 and isinstance(flags[0], torch.Tensor) and bool(flags[0])
    assert_close(ours.running_var.double().cpu(), theirs.running_var, rtol=1e-4, atol=0)
    assert_close(ours.running_mean.double().cpu(), theirs.running_mean, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_generic_axis_last_equals_batchnorm1d_on_transposed(dtype, momentum, tol):
    """BatchNorm(C, axis=-1) on (N, L, C) is torch's BatchNorm1d on (N, C, L)."""
    N, L = 4, 6
    theirs = torch.nn.BatchNorm1d(C, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(C) + 0.5)
        theirs.bias.copy_(torch.randn(C))
    ours = bn.BatchNorm(C, momentum=momentum, dtype=dtype, axis=-1)
    ours.load_state_dict(theirs.state_dict())
    acc_tol = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)

    for training in (True, True, True, False):
        theirs.train(training)
        ours.train(training)
        x = (torch.randn(N, L, C, dtype=torch.float64) * 3 + 5).to(dtype)  # (N, L, C)
        xa = x.transpose(1, 2).detach().clone().requires_grad_()  # (N, C, L)
        xb = x.detach().clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        assert yb.shape == (N, L, C)
        assert_close(yb, ya.transpose(1, 2), **tol(dtype))
        g = torch.randn(N, L, C, dtype=dtype)
        ya.backward(g.transpose(1, 2))
        yb.backward(g)
        assert_close(xb.grad, xa.grad.transpose(1, 2), **acc_tol)
        assert_close(ours.weight.grad, theirs.weight.grad, **acc_tol)
        assert_close(ours.bias.grad, theirs.bias.grad, **acc_tol)
        ours.zero_grad()
        theirs.zero_grad()
        for name in BUFFERS:
            assert_close(getattr(ours, name), getattr(theirs, name), **acc_tol)
    assert int(ours.num_batches_tracked) == 3


def test_generic_axis_last_on_nhwc_equals_batchnorm2d(tol):
    """Channels-last data stored as (N, H, W, C), axis=-1, is BatchNorm2d on its permute."""
    theirs = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    ours = bn.BatchNorm(C, axis=-1, dtype=torch.float64)
    for _ in range(2):
        x = torch.randn(2, 4, 5, C, dtype=torch.float64) + 2  # (N, H, W, C)
        assert_close(ours(x), theirs(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **tol(torch.float64))
    for name in BUFFERS:
        assert_close(getattr(ours, name), getattr(theirs, name), **tol(torch.float64))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_path_eval_without_grad(layout, dtype_name, tol, triton_calls):
    """Inference (no gradient wanted) on the kernels' one pass, y = x * scale + shift."""
    rank, fmt = LAYOUTS[layout]
    in_dtype, param_dtype = DTYPES[dtype_name]
    theirs, ours = _make_pair(rank, param_dtype, TRITON_DEVICE)
    mean, var = torch.randn(C), torch.rand(C) + 0.5
    with torch.no_grad():
        for layer in (theirs, ours):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    theirs.eval()
    ours.eval()
    x = _input(rank, fmt, in_dtype, TRITON_DEVICE)
    with bn.functional.use_backend("triton"), torch.no_grad():
        yb = ours(x)
    assert triton_calls == ["eval_forward"]
    assert yb.dtype == in_dtype and yb.is_contiguous(memory_format=fmt)
    assert_close(yb, theirs(x), **tol(in_dtype))

