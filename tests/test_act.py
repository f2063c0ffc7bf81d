"""BN + (residual) + ReLU layers: the same numbers as the composite, fused where Triton runs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import batchnorm as bn


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_act_layer_equals_composite(residual, channels_last):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    r = torch.randn_like(x) if residual else None
    fused = bn.BatchNormAct2d(6, dtype=torch.float64)
    plain = torch.nn.BatchNorm2d(6, dtype=torch.float64)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.5, 0.5)
        plain.load_state_dict(fused.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra = rb = None
    if residual:
        ra, rb = r.clone().requires_grad_(), r.clone().requires_grad_()
    ya = fused(xa, residual=ra)
    yb = torch.relu(plain(xb) + (rb if residual else 0))
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    inputs_a = [xa, fused.weight, fused.bias] + ([ra] if residual else [])
    inputs_b = [xb, plain.weight, plain.bias] + ([rb] if residual else [])
    for a, b in zip(torch.autograd.grad(ya, inputs_a, g), torch.autograd.grad(yb, inputs_b, g)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused.running_var, plain.running_var)
    assert list(fused.state_dict()) == list(plain.state_dict())


def _pair(make_layer, dtype=torch.float32):
    """A fused layer with seeded parameters and its composite twin: our plain layer of the same class
    and state (relu(BN(x) + residual) in three steps)."""
    torch.manual_seed(0)
    fused = make_layer()
    if fused.affine:
        with torch.no_grad():
            fused.weight.uniform_(0.5, 1.5)
            fused.bias.uniform_(-0.5, 0.5)
    fused = fused.to(dtype)
    plain = copy.deepcopy(fused)
    plain.__class__ = fused.__class__.__mro__[2]  # BatchNormAct2d -> BatchNorm2d (ours)
    return fused, plain


def _composite(plain, x, residual):
    y = plain(x)
    return torch.relu(y if residual is None else y + residual)


def _act_step(layer, fused, x, r, g, training: bool) -> tuple:
    """One step of the fused layer, or of a composite twin (`_composite`): (y, *gradients) while
    training (for x, weight and bias if affine, the residual r if any; upstream g), (y,) in eval
    under no_grad. The output keeps x's strides."""
    layer.train(training)
    xa = x.clone().requires_grad_()
    ra = None if r is None else r.clone().requires_grad_()

    def run():
        return layer(xa, residual=ra) if layer is fused else _composite(layer, xa, ra)

    if not training:
        with torch.no_grad():
            return (run(),)
    y = run()
    assert y.stride() == x.stride()
    wrt = [xa] + ([layer.weight, layer.bias] if layer.affine else []) + ([ra] if ra is not None else [])
    return (y, *torch.autograd.grad(y, wrt, g))


CPU_CASES = [  # (layer class and its arguments, input shape, memory format)
    pytest.param((bn.BatchNormAct2d, 6), (4, 6, 5, 5), None, id="nchw"),
    pytest.param((bn.BatchNormAct2d, 6), (4, 6, 5, 5), torch.channels_last, id="nhwc"),
    pytest.param((bn.BatchNormAct2d, 16), (8, 16, 7, 7), None, id="nchw-7x7"),
    pytest.param((bn.BatchNormAct1d, 40), (64, 40), None, id="2d"),
    pytest.param((bn.BatchNormAct1d, 8), (4, 8, 30), None, id="ncl"),
    pytest.param((bn.BatchNormAct3d, 4), (2, 4, 3, 5, 6), torch.channels_last_3d, id="ndhwc"),
    pytest.param((bn.BatchNormActNd, 12), (4, 10, 12), None, id="nlc-axis-1"),
]
OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param({"affine": False}, id="no-affine"),
    pytest.param({"momentum": None}, id="cumulative"),
]
TORCH_LAYERS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("layer,shape,fmt", CPU_CASES)
def test_cpu_act_layer_is_fused_and_equals_the_composite_bitwise(layer, shape, fmt, residual, options, act_calls):
    """float32 on the CPU kernel: three training steps then eval under no_grad, against our plain
    layer + add + relu. Outputs, every gradient (x, weight, bias, residual), the running statistics
    and the step count are bitwise the same: the fused pass does the same float32 operations; the
    backward is torch's ReLU backward then the same kernel (or the same sums, gated). torch's
    layer + add + relu agrees within float32 at every step (channels on axis 1)."""
    cls, C = layer
    axis = {"axis": -1} if cls is bn.BatchNormActNd else {}
    fused, plain = _pair(lambda: cls(C, **axis, **options))
    theirs = TORCH_LAYERS[len(shape)](C, **options) if not axis else None  # (by rank)
    if theirs is not None:
        theirs.load_state_dict(plain.state_dict())
    calls = act_calls
    for step in range(4):
        x = torch.randn(shape).contiguous(memory_format=fmt or torch.contiguous_format) * 2 + 1
        r = torch.randn(shape) if residual else None
        g = torch.randn(shape)
        results = [_act_step(layer_, fused, x, r, g, step < 3) for layer_ in (fused, plain, theirs) if layer_]
        for a, b in zip(results[0], results[1]):
            assert torch.equal(a, b)
        for name, buffer in plain.named_buffers():
            assert torch.equal(getattr(fused, name), buffer), name
        if theirs is not None:
            for a, b in zip(results[0], results[2]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max().item()))
            for name, buffer in theirs.named_buffers():
                torch.testing.assert_close(getattr(fused, name), buffer, rtol=1e-5, atol=1e-6)
    steps = ["train_forward_relu"] if residual else ["train_forward_relu", "train_backward"]
    assert fused.num_batches_tracked == 3 and calls == steps * 3 + ["eval_forward"]


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
def test_cpu_act_layer_in_bfloat16(residual, act_calls):
    """A bfloat16 layer (bfloat16 parameters and buffers, which the kernel leaves to the caller to
    update): fused, within bfloat16 rounding of the composite, gradients and buffers bfloat16."""
    fused, plain = _pair(lambda: bn.BatchNormAct2d(8), torch.bfloat16)
    calls = act_calls
    x = torch.randn(4, 8, 6, 6).to(torch.bfloat16).requires_grad_()
    r = torch.randn(4, 8, 6, 6).to(torch.bfloat16).requires_grad_() if residual else None
    ya, yb = fused(x, residual=r), _composite(plain, x, r)
    assert calls == ["train_forward_relu"] and ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya, yb, rtol=1.6e-2, atol=1.6e-2)
    g = torch.randn_like(ya)
    wrt = [x, fused.weight] + ([r] if residual else [])
    wrt_plain = [x, plain.weight] + ([r] if residual else [])
    for a, b in zip(torch.autograd.grad(ya, wrt, g), torch.autograd.grad(yb, wrt_plain, g)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    assert fused.running_var.dtype == torch.bfloat16
    torch.testing.assert_close(fused.running_var, plain.running_var)
    assert fused.num_batches_tracked == 1


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
def test_cpu_act_layer_has_a_double_backward(residual, act_calls):
    """create_graph=True (gradient penalties): the fused layer's gradients can be differentiated
    again, and both orders agree with the composite's within float32 rounding."""
    fused, plain = _pair(lambda: bn.BatchNormAct2d(3))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, requires_grad=True) if residual else None
    c = torch.randn(4, 3, 5, 5)  # dy = c + 2y: not 0 where the ReLU cut, so the mask matters
    results = []
    for layer, y in ((fused, fused(x, residual=r)), (plain, _composite(plain, x, r))):
        wrt = [x, layer.weight, layer.bias] + ([r] if residual else [])
        grads = torch.autograd.grad((y * c + y.pow(2)).sum(), wrt, create_graph=True)
        results.append((*grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), wrt)))
    assert act_calls[:1] == ["train_forward_relu"]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_cpu_act_layer_keeps_its_state_on_a_nonfinite_batch(act_calls):
    fused, _ = _pair(lambda: bn.BatchNormAct2d(3))
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 2, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        fused(x)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k
    fused.momentum = None  # the cumulative average counts the batches it took
    fused(torch.randn(4, 3, 5, 5))
    fused(torch.randn(4, 3, 5, 5))
    assert fused.num_batches_tracked == 2 and act_calls == ["train_forward_relu"] * 3


def test_small_inputs_take_the_composite_under_auto(act_calls, monkeypatch):
    """Below act.FUSED_MIN_ELEMS_CTYPES elements (without the C++ entry points) the composite
    (fixed costs decide there), from it the fused passes; with the "cpu" backend forced, the
    fused passes at any size."""
    monkeypatch.setattr(bn.act, "FUSED_MIN_ELEMS_CTYPES", 1 << 18)  # (act_calls: the Python path)
    monkeypatch.setattr(bn.act.cpu, "extension", lambda: None)
    fused, plain = _pair(lambda: bn.BatchNormAct2d(4))
    for shape, want in (((4, 4, 8, 8), []), ((64, 4, 32, 32), ["train_forward_relu"])):
        x, r = torch.randn(shape), torch.randn(shape)
        act_calls.clear()
        torch.testing.assert_close(fused(x, residual=r), _composite(plain, x, r))
        assert act_calls == want
    act_calls.clear()
    with bn.functional.use_backend("cpu"):
        fused(torch.randn(4, 4, 8, 8))
    assert act_calls == ["train_forward_relu"]


def test_cpu_act_layer_gives_way_where_it_must(act_calls):
    """The composite runs (with its errors and promotions) where the fused pass would differ: one
    value per channel, a residual of another dtype, a mask, eval with gradients wanted, the torch backend."""
    fused, _ = _pair(lambda: bn.BatchNormAct1d(3))
    calls = act_calls
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fused(torch.randn(1, 3))
    x = torch.randn(4, 3, 6)
    y = fused(x, residual=torch.randn(4, 3, 6, dtype=torch.float64))
    assert y.dtype == torch.float64  # as relu(BN(x) + residual) promotes
    mask = torch.ones(4, 6, dtype=torch.bool)
    fused(x, mask=mask)
    fused.eval()
    fused(x)  # weight requires grad: the composite keeps it differentiable
    with bn.functional.use_backend("torch"):
        fused.train()
        fused(x)
    assert calls == []
    with torch.no_grad():
        fused.eval()
        fused(x)
    assert calls == ["eval_forward"]


def test_act_layer_checks_the_residual():
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        bn.BatchNormAct2d(3)(torch.randn(2, 3, 4, 4), residual=torch.randn(2, 3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_act_on_gpu_matches_composite():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    x = torch.randn(8, 16, 24, 24, device="cuda", requires_grad=True)  # (above NATIVE_MAX_ELEMS_CUDA)
    r = torch.randn_like(x, requires_grad=True)
    fused = bn.BatchNormAct2d(16).cuda()
    plain = torch.nn.BatchNorm2d(16).cuda()
    plain.load_state_dict(fused.state_dict())
    assert fused._fusable(x, None)
    ya, yb = fused(x, residual=r), torch.relu(plain(x) + r)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ya)
    for a, b in zip(torch.autograd.grad(ya, (x, r, fused.weight), g), torch.autograd.grad(yb, (x, r, plain.weight), g)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused.running_mean, plain.running_mean, rtol=1e-4, atol=1e-5)


# The Triton path (_FusedAct): on the GPU, or in triton's interpreter on CPU tensors with the
# "triton" backend forced (conftest sets TRITON_INTERPRET=1 where there is no GPU).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_CASES = [  # every layout with the default options, the other options on one (the interpreter is slow)
    pytest.param(*case.values, option.values[0], id=f"{case.id}-{option.id}")
    for case in CPU_CASES
    for option in OPTIONS
    if case.id in ("nchw", "nhwc", "2d", "ndhwc", "nlc-axis-1") and (option.id == "default" or case.id == "nhwc")
]


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("layer,shape,fmt,options", TRITON_CASES)
def test_triton_act_layer_equals_the_composite(layer, shape, fmt, options, residual, triton_calls):
    """Three training steps on the fused kernels, then eval under no_grad, against our plain layer
    + add + relu on torch's kernel: outputs, every gradient (x, weight, bias, residual), the running
    statistics and the step count, within float32 rounding."""
    cls, C = layer
    axis = {"axis": -1} if cls is bn.BatchNormActNd else {}
    fused, plain = _pair(lambda: cls(C, **axis, **options))
    fused, plain = fused.to(TRITON_DEVICE), plain.to(TRITON_DEVICE)
    for step in range(4):
        x = torch.randn(shape).contiguous(memory_format=fmt or torch.contiguous_format) * 2 + 1
        x = x.to(TRITON_DEVICE)
        r = torch.randn(shape, device=TRITON_DEVICE) if residual else None
        g = torch.randn(shape, device=TRITON_DEVICE)
        results = []
        for layer_, backend in ((fused, "triton"), (plain, "torch")):
            with bn.functional.use_backend(backend):
                results.append(_act_step(layer_, fused, x, r, g, step < 3))
                if layer_ is fused:  # eval under no_grad: one pass, relu(x * scale + shift + r)
                    with torch.set_grad_enabled(step < 3):
                        assert fused._fused_path(x, r, None) == ("triton" if step < 3 else "triton-eval")
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (1 + b.abs().max().item()))
        for name, buffer in plain.named_buffers():
            torch.testing.assert_close(getattr(fused, name), buffer, rtol=1e-5, atol=1e-6, msg=name)
    assert fused.num_batches_tracked == 3
    assert triton_calls == ["train_forward_act", "train_backward_act"] * 3 + ["eval_forward"]


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
def test_triton_act_layer_in_bfloat16(residual, triton_calls):
    """bfloat16 input with float32 parameters (mixed precision): within bfloat16 rounding."""
    fused, plain = _pair(lambda: bn.BatchNormAct2d(8))
    fused, plain = fused.to(TRITON_DEVICE), plain.to(TRITON_DEVICE)
    x = torch.randn(4, 8, 6, 6, device=TRITON_DEVICE).to(torch.bfloat16).requires_grad_()
    r = None
    if residual:  # BN(x) + r rounds once fused, twice in the composite: keep it away from the ReLU's 0
        with torch.no_grad():
            pre = F.batch_norm(x.float(), None, None, plain.weight, plain.bias, training=True)
            r = torch.randn_like(pre)
            r = torch.where((pre + r).abs() < 0.1, r + 0.25 * (pre + r).sign() + 0.125, r)
        r = r.to(torch.bfloat16).requires_grad_()
    with bn.functional.use_backend("triton"):
        ya = fused(x, residual=r)
    yb = _composite(plain, x, r)
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya, yb, rtol=1.6e-2, atol=1.6e-2)
    g = torch.randn_like(ya)
    wrt = [x, fused.weight] + ([r] if residual else [])
    wrt_plain = [x, plain.weight] + ([r] if residual else [])
    for a, b in zip(torch.autograd.grad(ya, wrt, g), torch.autograd.grad(yb, wrt_plain, g), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * (1 + b.abs().max().item()))
    torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-3, atol=1e-3)
    assert triton_calls == ["train_forward_act", "train_backward_act"]


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
def test_triton_act_layer_has_a_double_backward(residual, triton_calls):
    """create_graph=True: the gradients can be differentiated again, as the composite's."""
    fused, plain = _pair(lambda: bn.BatchNormAct2d(3))
    fused, plain = fused.to(TRITON_DEVICE), plain.to(TRITON_DEVICE)
    x = torch.randn(4, 3, 5, 5, device=TRITON_DEVICE, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, device=TRITON_DEVICE, requires_grad=True) if residual else None
    c = torch.randn(4, 3, 5, 5, device=TRITON_DEVICE)  # dy = c + 2y: not 0 where the ReLU cut
    results = []
    for layer, backend in ((fused, "triton"), (plain, "torch")):
        with bn.functional.use_backend(backend):
            y = fused(x, residual=r) if layer is fused else _composite(plain, x, r)
        wrt = [x, layer.weight, layer.bias] + ([r] if residual else [])
        grads = torch.autograd.grad((y * c + y.pow(2)).sum(), wrt, create_graph=True)
        results.append((*grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), wrt)))
    assert triton_calls[:1] == ["train_forward_act"]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in triton's interpreter
def test_triton_act_layer_keeps_its_state_on_a_nonfinite_batch(triton_calls):
    """As the CPU kernel's and the plain layer's: a batch with Inf leaves every buffer as it was
    (num_batches_tracked too), with a warning."""
    fused, _ = _pair(lambda: bn.BatchNormAct2d(3))
    fused = fused.to(TRITON_DEVICE)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(4, 3, 5, 5, device=TRITON_DEVICE)
    x[0, 1, 2, 2] = float("inf")
    with bn.functional.use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="NaN or Inf"):
            fused(x)
        for k, v in fused.state_dict().items():
            assert torch.equal(v, before[k]), k
        fused.momentum = None  # the cumulative average counts the batches it took
        fused(torch.randn(4, 3, 5, 5, device=TRITON_DEVICE))
        fused(torch.randn(4, 3, 5, 5, device=TRITON_DEVICE))
    assert fused.num_batches_tracked == 2 and triton_calls == ["train_forward_act"] * 3


def test_triton_act_layer_checks_as_the_plain_layer(triton_calls):
    """One value per channel in training is torch's ValueError, before any kernel runs."""
    fused = bn.BatchNormAct2d(3).to(TRITON_DEVICE)
    with bn.functional.use_backend("triton"), pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 3, 1, 1, device=TRITON_DEVICE))
    assert triton_calls == [] and fused.num_batches_tracked == 0


def test_small_cuda_inputs_take_the_composite_on_torchs_kernel(triton_calls, monkeypatch):
    """Where the plain layer gives a call to torch's kernel (small CUDA inputs under "auto":
    `_native_is_cheaper`, forced here), the act layer takes the composite instead of its fused
    kernels (the plain layer, the add, the ReLU): torch's outputs, gradients and buffers."""
    from batchnorm import act
    from batchnorm.kernels import triton_bn

    acts = []  # the `act` argument of each eval_forward call: "relu" only from the fused path
    eval_forward = triton_bn.eval_forward
    monkeypatch.setattr(
        triton_bn, "eval_forward", lambda *a, **k: acts.append(a[8] if len(a) > 8 else None) or eval_forward(*a, **k)
    )
    x = torch.randn(4, 3, 5, 5, device=TRITON_DEVICE, requires_grad=True)
    r = torch.randn_like(x)
    fused, theirs = bn.BatchNormAct2d(3).to(TRITON_DEVICE), torch.nn.BatchNorm2d(3).to(TRITON_DEVICE)
    monkeypatch.setattr(act, "_native_is_cheaper", lambda *args: True)
    with bn.functional.use_backend("triton"):
        y = fused(x, residual=r)
        (dx,) = torch.autograd.grad(y.sum(), x)
        with torch.no_grad():
            y_eval = fused.eval()(x, residual=r)
    assert triton_calls == ["train_forward", "train_backward", "eval_forward"] and acts == [None]  # the plain layer's
    want = torch.relu(theirs(x) + r)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(dx, torch.autograd.grad(want.sum(), x)[0])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(theirs, name), msg=name)
    torch.testing.assert_close(y_eval, torch.relu(theirs.eval()(x) + r))
    monkeypatch.setattr(act, "_native_is_cheaper", lambda *args: False)  # (the rule's other side)
    with bn.functional.use_backend("triton"), torch.no_grad():
        fused.train()(x, residual=r)
    assert triton_calls[3:] == ["train_forward_act"]
