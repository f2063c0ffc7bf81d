"""The kernel's C++ entry points (`cpu.extension()`, bn_cpu_ext.cpp) against the ctypes path.

Both call the same C kernel with the same (A, C, B): on every layout the outputs, statistics,
gradients and running statistics must be bitwise equal (the ctypes path is checked against
float64 in test_kernels_cpu.py). Then every call the C++ side must decline (so that the Python
path converts or raises its documented error), the public functions on the C++ path, and the
build's fallbacks in subprocesses.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from test_kernels_cpu import run_python

import batchnorm as bn
import batchnorm.functional as F
from batchnorm.kernels import cpu

ext = cpu.extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"C++ entry points: {cpu.extension_why_unavailable()}")

CL, CL3 = torch.channels_last, torch.channels_last_3d
EPS = 1e-5

def make(shape, fmt, dtype):
    x = (3 + 2 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def dense(shape, fmt=None):
    return lambda dtype: make(shape, fmt, dtype)


# (make_x(dtype), axis): each canonical (A, C, B) and both code paths of the kernel, then dense
# tensors that are contiguous in no memory format (`.to` keeps their strides).
LAYOUTS = [
    pytest.param(dense((4, 3, 5, 7)), 1, id="nchw"),
    pytest.param(dense((4, 3, 5, 7), CL), 1, id="nhwc"),
    pytest.param(dense((2, 3, 4, 5, 6), CL3), 1, id="ndhwc"),
    pytest.param(dense((2, 3, 4, 5, 6)), 1, id="ncdhw"),
    pytest.param(dense((67, 3)), 1, id="2d"),
    pytest.param(dense((20, 264)), 1, id="2d-c264"),
    pytest.param(dense((5, 3, 7)), 1, id="3d"),
    pytest.param(dense((4, 6, 3)), -1, id="nlc-axis-1"),
    pytest.param(dense((4, 6, 3)), 2, id="nlc-axis2"),
    pytest.param(dense((6, 1, 4, 4), CL), 1, id="c1-nhwc"),
    pytest.param(dense((9, 5, 7, 7)), 1, id="nchw-7x7"),
    pytest.param(dense((4, 3, 80, 80), CL), 1, id="mt-nhwc"),  # two threads
    pytest.param(dense((64, 41, 7, 7)), 1, id="mt-nchw-7x7"),
    pytest.param(dense((8, 64, 16, 16), CL), 1, id="pooled-nhwc"),  # outputs from the pool (>= 256 KiB)
    pytest.param(lambda dt: torch.randn(6, 50).t().to(dt), 1, id="transposed-2d"),
    pytest.param(lambda dt: torch.randn(4, 8, 5).transpose(1, 2).to(dt), 2, id="transposed-3d"),
    pytest.param(lambda dt: torch.randn(4, 3, 5, 5).permute(0, 2, 1, 3).to(dt), 2, id="permuted"),
    pytest.param(
        lambda dt: torch.randn(4, 3, 5, 5).contiguous(memory_format=CL).permute(3, 1, 2, 0).to(dt), 1, id="cl-perm"
    ),
]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]


def vectors(C):
    return torch.randn(C), torch.rand(C) + 0.5, torch.rand(C) + 0.5, torch.randn(C)  # mean, var, w, b


def bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a, b)


@pytest.fixture
def ctypes_path(monkeypatch):
    """A function that runs its argument with the C++ entry points switched off (the ctypes path)."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(cpu, "extension", lambda: None)
            return fn()

    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_x,axis", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_same_bits_as_the_ctypes_path(make_x, axis, dtype, affine, ctypes_path):
    """eval, training forward (running statistics updated in the same call) and backward."""
    x = make_x(dtype)
    C = x.shape[axis]
    mean, var, w, b = vectors(C)
    w, b = (w, b) if affine else (None, None)
    with torch.no_grad():
        y = ext.eval(x, mean, var, w, b, EPS, axis)
    y_ref = ctypes_path(lambda: cpu.eval_forward(x, mean, var, w, b, EPS, axis))
    bitwise(y, y_ref)
    assert y.stride() == x.stride()

    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, bmean, bvar, invstd, updated = ext.train(x, w, b, rm, rv, EPS, 0.1, axis)
    ref = ctypes_path(lambda: cpu.train_forward_update(x, w, b, EPS, axis, rm_ref, rv_ref, 0.1))
    for got, want in zip((y, bmean, bvar, invstd), ref[:4]):
        bitwise(got, want)
    assert updated == 1 and ref[4] is True
    bitwise(rm, rm_ref)
    bitwise(rv, rv_ref)

    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    dy = torch.empty_like(x).copy_(dy)  # x's strides
    for need_dx in (True, False):
        got = ext.backward(dy, x, w, bmean, invstd, axis, need_dx)
        want = ctypes_path(lambda need_dx=need_dx: cpu.train_backward(dy, x, w, bmean, invstd, axis, need_dx))
        assert (got[0] is None) == (not need_dx) == (want[0] is None)
        for a, e in zip(got, want):
            if e is not None:
                bitwise(a, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_layer_on_the_cxx_path_matches_the_ctypes_path_and_torch(fmt, dtype, ctypes_path, tol):
    """The public layer on both paths and torch's: training with autograd, without, then eval."""
    C = 6
    ours, ours_ctypes, theirs = bn.BatchNorm2d(C), bn.BatchNorm2d(C), torch.nn.BatchNorm2d(C)
    for layer in (ours, ours_ctypes):
        layer.load_state_dict(theirs.state_dict())
    # 76800 elements: above functional.NATIVE_MAX_ELEMS, so every step runs our kernel
    for training, grad in ((True, True), (True, False), (True, False), (False, False)):
        x = make((8, C, 40, 40), fmt, dtype)
        outs = []
        for layer, run in ((ours, lambda f: f()), (ours_ctypes, ctypes_path), (theirs, lambda f: f())):
            layer.train(training)
            xi = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = run(lambda layer=layer, xi=xi: layer(xi))
                dx = run(lambda y=y, xi=xi: torch.autograd.grad(y, xi, torch.ones_like(y))[0]) if grad else None
            outs.append((y.detach(), dx))
        for got, want in zip(outs[0], outs[1]):
            if want is not None:
                bitwise(got, want)
        torch.testing.assert_close(outs[0][0].float(), outs[2][0].float(), **tol(dtype))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bitwise(getattr(ours, name), getattr(ours_ctypes, name))
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-4, atol=1e-4)


PARAMS = {  # which of weight and bias exist, and which want a gradient
    "affine": (True, True, True, True),
    "weight-only": (True, False, True, False),
    "bias-only": (False, True, False, True),
    "plain": (False, False, False, False),
    "frozen-weight": (True, True, False, True),
}


@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_x,axis", [p for p in LAYOUTS if p.id in ("nchw", "nhwc", "2d", "nlc-axis-1")])
def test_autograd_node_same_bits_as_the_python_function(make_x, axis, dtype, params, ctypes_path):
    """functional.batch_norm with autograd: the C++ node (train_step) against the Python
    autograd.Function on the ctypes path: y, dx, dweight, dbias, running statistics."""
    has_w, has_b, grad_w, grad_b = PARAMS[params]
    x0 = make_x(dtype)
    C = x0.shape[axis]
    g = torch.empty_like(x0).copy_(torch.randn(x0.shape))
    w0, b0 = torch.rand(C) + 0.5, torch.randn(C)
    results = []
    for run in (lambda f: f(), ctypes_path):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_(grad_w) if has_w else None
        b = b0.clone().requires_grad_(grad_b) if has_b else None
        rm, rv = torch.zeros(C), torch.ones(C)

        def step(x=x, w=w, b=b, rm=rm, rv=rv):
            with F.use_backend("cpu"):
                y = F.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
            wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
            return y, torch.autograd.grad(y, wanted, g)

        y, grads = run(step)
        results.append((y, grads, rm, rv))
    (y1, g1, rm1, rv1), (y2, g2, rm2, rv2) = results
    assert y1.grad_fn is not None and type(y1.grad_fn).__name__ != type(y2.grad_fn).__name__  # two paths
    for a, e in [(y1.detach(), y2.detach()), *zip(g1, g2), (rm1, rm2), (rv1, rv2)]:
        bitwise(a, e)


def test_autograd_node_double_backward_matches_torch():
    """A gradient penalty (create_graph=True) through the C++ node: its backward is recomputed
    from x with differentiable ops, as torch's double backward (float32 tolerance)."""
    x0 = torch.randn(8, 3, 5, 5) + 2
    w0, b0 = torch.rand(3) + 0.5, torch.randn(3)
    g = torch.randn(8, 3, 5, 5)
    results = []
    for fn in (F.batch_norm, torch.nn.functional.batch_norm):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = fn(x, None, None, w, b, True)
        dx, dw, _ = torch.autograd.grad((y * g).sum(), (x, w, b), create_graph=True)
        results.append((y, *torch.autograd.grad(dx.square().sum() + dw.square().sum(), (x, w))))
    assert "Train" in type(results[0][0].grad_fn).__name__ or "Cpp" in type(results[0][0].grad_fn).__name__
    for ours, theirs in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-4)


def test_autograd_node_takes_any_upstream_gradient_layout():
    """An expanded gradient (y.sum()) or one in another memory order is copied into x's order."""
    x0 = torch.randn(4, 3, 6, 6).contiguous(memory_format=CL)
    w0 = torch.rand(3) + 0.5
    for make_loss in (lambda y: y.sum(), lambda y: (y * torch.randn(4, 3, 6, 6)).sum(), lambda y: y[:, :, :3].sum()):
        grads = []
        for fn in (F.batch_norm, torch.nn.functional.batch_norm):
            x = x0.clone().requires_grad_()
            w = w0.clone().requires_grad_()
            torch.manual_seed(2)  # the same random upstream gradient for both
            (dx, dw) = torch.autograd.grad(make_loss(fn(x, None, None, w, None, True)), (x, w))
            grads.append((dx, dw))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-4)


def test_autograd_node_refuses_an_input_modified_in_place():
    x = torch.randn(8, 3, 4, 4)
    w = torch.ones(3, requires_grad=True)
    y = F.batch_norm(x, None, None, w, None, True)
    x.add_(1)  # x is saved for the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_no_grad_training_is_one_cxx_call(monkeypatch):
    """Training under no_grad reaches the kernel without the Python path (nothing below is called)."""
    x = torch.randn(16, 4, 5, 5)
    rm, rv = torch.zeros(4), torch.ones(4)

    def fail(*args, **kwargs):
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(F, "_check_input", fail)
    with torch.no_grad():
        y = F.batch_norm(x, rm, rv, training=True, momentum=0.5)
        torch.testing.assert_close(rm, 0.5 * x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        F.batch_norm(x, rm, rv, training=False)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)


def test_running_statistics_updates_bump_their_version_counters():
    """As torch's in-place updates do, so that a saved running buffer that changed is caught."""
    rm, rv = torch.zeros(3), torch.ones(3)
    before = rm._version, rv._version
    with torch.no_grad():
        F.batch_norm(torch.randn(8, 3, 4, 4), rm, rv, training=True)
    assert rm._version > before[0] and rv._version > before[1]


def test_nonfinite_batch_on_the_cxx_path_keeps_the_running_statistics():
    layer = bn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 4] = float("nan")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="left unchanged"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(4, 3, 5, 5))  # a finite batch counts again, silently
    assert int(layer.num_batches_tracked) == 1


def test_concurrent_calls_from_python_threads():
    """The entry points release the GIL around the kernel: two Python threads training and
    evaluating their own layers at once get exactly what each gets alone."""
    x = torch.randn(16, 8, 24, 24)
    layers = [bn.BatchNorm2d(8) for _ in range(2)]
    expected = []
    for layer in [copy.deepcopy(layer) for layer in layers]:  # each alone, from the same state
        expected.append([_train_eval(layer, x) for _ in range(5)])
    results: list = [None, None]

    def work(i):
        results[i] = [_train_eval(layers[i], x) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got, want in zip(results, expected):
        assert got is not None
        for a, e in zip(got, want):
            for ta, te in zip(a, e):
                bitwise(ta, te)


def _train_eval(layer, x):
    layer.train()
    xi = x.clone().requires_grad_()
    y = layer(xi)
    (dx,) = torch.autograd.grad(y, xi, torch.ones_like(y))
    layer.eval()
    with torch.no_grad():
        z = layer(x)
    return y.detach(), dx, z, layer.running_mean.clone()


# --------------------------------------------------------------------------- what it declines

x4 = torch.randn(4, 3, 5, 5)
V = torch.ones(3)


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.randn(4, 3, 5, 5)


DECLINED_EVAL = [
    pytest.param(lambda: (x4.double(), V, V, None, None, EPS, 1), id="float64"),
    pytest.param(lambda: (x4.half(), V, V, None, None, EPS, 1), id="float16"),
    pytest.param(lambda: (x4[:, :, ::2], V, V, None, None, EPS, 1), id="strided"),
    pytest.param(lambda: (x4[:0], V, V, None, None, EPS, 1), id="empty"),
    pytest.param(lambda: (torch.randn(3), V, V, None, None, EPS, 0), id="1d"),
    pytest.param(lambda: (x4, V, V, None, None, EPS, 4), id="axis-out-of-range"),
    pytest.param(lambda: (x4, torch.ones(4), V, None, None, EPS, 1), id="mean-size"),
    pytest.param(lambda: (x4, V, torch.ones(1, 3), None, None, EPS, 1), id="var-2d"),
    pytest.param(lambda: (x4, V, V.double(), None, None, EPS, 1), id="var-float64"),
    pytest.param(lambda: (x4, V, torch.ones(6)[::2], None, None, EPS, 1), id="var-strided"),
    pytest.param(lambda: (x4, V, V, torch.ones(3, dtype=torch.bfloat16), None, EPS, 1), id="weight-bf16"),
    pytest.param(lambda: (x4, None, None, None, None, EPS, 1), id="no-statistics"),
    pytest.param(lambda: (x4, V, V, torch.ones(3, requires_grad=True), None, EPS, 1), id="weight-wants-grad"),
    pytest.param(lambda: (x4.clone().requires_grad_(), V, V, None, None, EPS, 1), id="input-wants-grad"),
    pytest.param(lambda: (x4.to("meta"), V, V, None, None, EPS, 1), id="meta"),
    pytest.param(lambda: (_fake(), V, V, None, None, EPS, 1), id="fake-tensor"),
]


@pytest.mark.parametrize("make_args", DECLINED_EVAL)
def test_eval_declines(make_args):
    assert ext.eval(*make_args()) is None


DECLINED_TRAIN = [  # (x, w, b, running_mean, running_var, eps, momentum, axis)
    pytest.param(lambda: (x4.double(), None, None, None, None, EPS, 0.1, 1), id="float64"),
    pytest.param(lambda: (x4, None, None, None, None, 0.0, 0.1, 1), id="eps-0"),
    pytest.param(lambda: (x4, None, None, None, None, EPS, 1.5, 1), id="momentum-1.5"),
    pytest.param(lambda: (x4, None, None, None, None, EPS, float("nan"), 1), id="momentum-nan"),
    pytest.param(lambda: (torch.randn(1, 3, 1, 1), None, None, None, None, EPS, 0.1, 1), id="one-value"),
    pytest.param(lambda: (x4, None, None, V.clone(), None, EPS, 0.1, 1), id="mean-without-var"),
    pytest.param(lambda: (x4, None, None, V.double(), V.double(), EPS, 0.1, 1), id="stats-float64"),
    pytest.param(lambda: (x4, None, None, V.clone().requires_grad_(), V.clone(), EPS, 0.1, 1), id="stats-grad"),
    pytest.param(lambda: (x4, torch.ones(4), None, None, None, EPS, 0.1, 1), id="weight-size"),
    pytest.param(lambda: (x4, torch.ones(3, requires_grad=True).double(), None, None, None, EPS, 0.1, 1), id="w-f64"),
    pytest.param(lambda: (_fake(), None, None, None, None, EPS, 0.1, 1), id="fake-tensor"),
]


@pytest.mark.parametrize("entry", ["train", "train_step"])
@pytest.mark.parametrize("make_args", DECLINED_TRAIN)
def test_train_declines(make_args, entry):
    assert getattr(ext, entry)(*make_args()) is None


def test_backward_declines_dy_of_another_layout_or_dtype():
    x = torch.randn(4, 3, 5, 5)
    mean, invstd = x.mean((0, 2, 3)), torch.ones(3)
    assert ext.backward(torch.randn(4, 3, 5, 5).contiguous(memory_format=CL), x, None, mean, invstd, 1, True) is None
    assert ext.backward(torch.randn(4, 3, 5, 5).double(), x, None, mean, invstd, 1, True) is None
    assert ext.backward(torch.randn(4, 3, 5, 4), x, None, mean, invstd, 1, True) is None
    assert ext.backward(torch.randn(4, 3, 5, 5), x, None, mean.double(), invstd, 1, True) is None


def test_public_errors_are_unchanged():
    """The C++ side declines what the Python path rejects, so its messages still reach the user."""
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="running_mean has shape"):
        F.batch_norm(x4, torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="momentum must be in"):
        F.batch_norm(x4, torch.zeros(3), torch.ones(3), training=True, momentum=2.0)
    with pytest.raises(TypeError, match="floating-point"):
        F.batch_norm(x4.int(), torch.zeros(3), torch.ones(3))
    with pytest.raises(TypeError, match=r"torch\.Tensor input"):
        F.batch_norm([[1.0, 2.0]], torch.zeros(2), torch.ones(2))


# --------------------------------------------------------------------------- build and fallback

CHECK = """
    import torch
    import batchnorm.functional as F
    from batchnorm.kernels import cpu
    x = torch.randn(8, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        y = F.batch_norm(x, rm, rv, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    print(cpu.available(), cpu.extension() is not None, cpu.extension_why_unavailable(), sep="|")
"""


def test_env_var_turns_the_cxx_path_off_and_the_kernel_still_runs():
    proc = run_python(CHECK, BATCHNORM_NO_EXTENSION="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split("|") == ["True", "False", "disabled by BATCHNORM_NO_EXTENSION=1"]


def test_cxx_compiler_failure_is_reported_and_the_kernel_still_runs(tmp_path):
    proc = run_python(CHECK, BATCHNORM_CACHE=str(tmp_path), CXX="false")
    assert proc.returncode == 0, proc.stderr
    kernel, has_ext, why = proc.stdout.strip().split("|", 2)
    assert (kernel, has_ext) == ("True", "False")
    assert why.startswith("compiling the C++ entry points failed")


# --------------------------------------------------------------------------- BN + ReLU (act layers)

ACT_LAYOUTS = [
    p for p in LAYOUTS if p.id in ("nchw", "nhwc", "2d", "nlc-axis-1", "mt-nhwc", "nchw-7x7", "pooled-nhwc")
]


def _act_pair(C, axis, dtype):
    """Two BatchNormActNd layers of the same state: one runs the C++ entry points, the other the
    Python path (act._ext_call patched away for it)."""
    torch.manual_seed(0)
    a = bn.BatchNormActNd(C, axis=axis)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        a.bias.uniform_(-0.5, 0.5)
    return a, copy.deepcopy(a)


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_x,axis", ACT_LAYOUTS)
def test_act_layer_cxx_path_same_bits_as_the_python_path(make_x, axis, dtype, residual, monkeypatch):
    """act_train_step (the TrainRelu node) and act_eval against act.py's _CpuAct and
    cpu.eval_forward: outputs, the gradients of x, weight, bias and residual, the buffers, over
    two training steps then eval under no_grad, bitwise; the C++ path is the one taken."""
    from batchnorm import act

    monkeypatch.setattr(act, "FUSED_MIN_ELEMS", 0)
    monkeypatch.setattr(act, "FUSED_MIN_ELEMS_CTYPES", 0)
    ext_call, calls = act._ext_call, []

    def spy(e, name, *args):
        out = ext_call(e, name, *args)
        calls.append((name, out is not None))
        return out

    x0 = make_x(dtype)
    cxx, python = _act_pair(x0.shape[axis], axis, torch.float32)
    for step in range(3):
        x = make_x(dtype) if step else x0
        r = torch.randn_like(x, dtype=torch.float32).to(dtype) if residual else None
        g = torch.randn_like(x, dtype=torch.float32).to(dtype)
        results = []
        for layer, call in ((cxx, spy), (python, lambda *a: None)):
            monkeypatch.setattr(act, "_ext_call", call)
            layer.train(step < 2)
            if step == 2:
                with torch.no_grad():
                    results.append((layer(x, residual=r),))
                continue
            xa = x.clone().requires_grad_()
            ra = r.clone().requires_grad_() if residual else None
            y = layer(xa, residual=ra)
            wrt = [xa, layer.weight, layer.bias] + ([ra] if residual else [])
            results.append((y.detach(), *torch.autograd.grad(y, wrt, g)))
        for a, b in zip(*results):
            assert torch.equal(a, b)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(cxx, name), getattr(python, name)), name
    assert calls == [("act_train_step", True)] * 2 + [("act_eval", True)]


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
def test_act_node_double_backward_matches_the_python_path(residual, monkeypatch):
    from batchnorm import act

    monkeypatch.setattr(act, "FUSED_MIN_ELEMS", 0)
    cxx, python = _act_pair(3, 1, torch.float32)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, requires_grad=True) if residual else None
    c = torch.randn(4, 3, 5, 5)
    results = []
    for layer, call in ((cxx, act._ext_call), (python, lambda *a: None)):
        monkeypatch.setattr(act, "_ext_call", call)
        y = layer(x, residual=r)
        assert type(y.grad_fn).__name__ == ("CppFunction" if layer is cxx else "_CpuActBackward")
        wrt = [x, layer.weight, layer.bias] + ([r] if residual else [])
        grads = torch.autograd.grad((y * c + y.pow(2)).sum(), wrt, create_graph=True)
        results.append((*grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), wrt)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_act_entries_decline_what_the_python_path_must_take():
    """A residual of another layout or dtype, bfloat16 running statistics, a gradient wanted in
    eval, one value per channel: None (the Python path copies, updates, raises)."""
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=CL)
    rm, rv, w, b = torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)
    assert ext.act_train_step(x, torch.randn(4, 3, 5, 5), w, b, rm, rv, EPS, 0.1, 1) is None
    assert ext.act_train_step(x, x.double(), w, b, rm, rv, EPS, 0.1, 1) is None
    assert ext.act_train_step(x, None, w, b, rm.bfloat16(), rv.bfloat16(), EPS, 0.1, 1) is None
    assert ext.act_train_step(x[:1, :, :1, :1], None, w, b, rm, rv, EPS, 0.1, 1) is None
    assert ext.act_eval(x, torch.randn(4, 3, 5, 5), rm, rv, w, b, EPS, 1) is None
    assert ext.act_eval(x, None, rm, rv, w.requires_grad_(), b, EPS, 1) is None
    assert ext.act_train_step(x, x.clone(), w, b, rm, rv, EPS, 0.1, 1) is not None


# --------------------------------------------------------------------------- ghost batches

GHOST_CASES = [  # (shape, memory format, k): even and ragged ghost batches, planes and rows
    pytest.param((16, 3, 5, 5), None, 4, id="nchw"),
    pytest.param((12, 3, 5, 5), CL, 5, id="nhwc-ragged"),
    pytest.param((64, 40), None, 16, id="2d"),
    pytest.param((34, 7), None, 8, id="2d-ragged"),  # a last ghost batch of 2
    pytest.param((8, 6, 9), None, 8, id="one-ghost-batch"),
    pytest.param((32, 64, 8, 8), CL, 8, id="pooled"),  # outputs from the pool
]


@pytest.mark.parametrize("track", [True, False], ids=["running", "no-running"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,fmt,k", GHOST_CASES)
def test_ghost_batches_cxx_path_same_bits_as_the_python_path(shape, fmt, k, dtype, track, ctypes_path):
    """functional.batch_norm with virtual_batch_size: ghost_train_step (the GhostTrain node) against
    _GhostTrain on the ctypes path, two steps: y, dx, dweight, dbias, running statistics, bitwise;
    and under no_grad (the kernel alone)."""
    C = shape[1]
    w0, b0 = torch.rand(C) + 0.5, torch.randn(C)
    results = []
    for run in (lambda f: f(), ctypes_path):
        rm, rv = (torch.zeros(C), torch.ones(C)) if track else (None, None)
        out = []
        for step in range(2):
            torch.manual_seed(step)
            x = make(shape, fmt, dtype).requires_grad_()
            w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
            g = torch.randn(shape).to(dtype)

            def train(x=x, w=w, b=b, g=g, rm=rm, rv=rv):
                with F.use_backend("cpu"):
                    y = F.batch_norm(x, rm, rv, w, b, training=True, virtual_batch_size=k)
                    with torch.no_grad():
                        y_ng = F.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=k)
                return y, y_ng, *torch.autograd.grad(y, (x, w, b), g)

            out.append(run(train))
        results.append((out, rm, rv))
    (out1, rm1, rv1), (out2, rm2, rv2) = results
    assert type(out1[0][0].grad_fn).__name__ == "CppFunction" and type(out2[0][0].grad_fn).__name__ != "CppFunction"
    for step1, step2 in zip(out1, out2):
        for a, e in zip(step1, step2):
            bitwise(a.detach(), e.detach())
    if track:
        bitwise(rm1, rm2)
        bitwise(rv1, rv2)


def test_ghost_batches_cxx_path_keeps_the_statistics_of_a_nonfinite_batch_and_refuses_double_backward():
    layer = bn.BatchNorm2d(3, virtual_batch_size=4)
    x = torch.randn(8, 3, 4, 4)
    x[5, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and layer.num_batches_tracked == 0
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "CppFunction"
    with pytest.raises(RuntimeError, match="double backward"):  # as the Python path: at create_graph=True
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_ghost_train_step_declines_what_the_python_path_must_take():
    """A ghost batch of one value per channel (ValueError there), the channels on axis 0, axis 0
    not outermost in memory (the general path): None."""
    C = 3
    args = (torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C), EPS, 0.1)
    assert ext.ghost_train_step(torch.randn(9, C), *args, 1, 4) is None  # last ghost batch: 1 sample
    assert ext.ghost_train_step(torch.randn(C, 8), *args, 0, 4) is None
    assert ext.ghost_train_step(torch.randn(C, 8).t(), *args, 1, 4) is None  # axis 0 not outermost
    assert ext.ghost_train_step(torch.randn(8, C), *args, 1, 0) is None
    assert ext.ghost_train_step(torch.randn(8, C), *args, 1, 4) is not None


# ----------------------------------------------------------------------------- the output pool

POOLED = (8, 64, 16, 16)  # 512 KiB of float32: pooled (bn_cpu_ext.cpp, POOL_MIN_BYTES = 256 KiB)


@pytest.fixture
def pool_limit():
    """Set the pool's limit for one test; the pool is emptied before and after."""
    cpu.set_output_pool_limit(0)
    yield cpu.set_output_pool_limit
    cpu.set_output_pool_limit(0)
    cpu.set_output_pool_limit(cpu._output_pool_limit())


def _eval(x):
    C = x.shape[1]
    with torch.no_grad():
        return ext.eval(x, torch.zeros(C), torch.ones(C), None, None, 0.0, 1)


def test_an_output_takes_the_buffer_of_a_freed_one(pool_limit):
    pool_limit(64 << 20)
    x = make(POOLED, CL, torch.float32)
    y = _eval(x)
    address = y.data_ptr()
    assert ext.output_pool()[:2] == (0, 0)
    del y
    assert ext.output_pool()[:2] == (x.nbytes, 1)
    y = _eval(x)
    assert y.data_ptr() == address and ext.output_pool()[:2] == (0, 0)
    assert y.stride() == x.stride()
    bitwise(y, x)
    small = _eval(make((4, 3, 5, 7), None, torch.float32))  # under the minimum: torch's allocator
    del small
    assert ext.output_pool()[:2] == (0, 0)


def test_pooled_buffers_are_reused_and_results_stay_exact(pool_limit, ctypes_path):
    """Each call writes its output over the buffer of the last call's dead output (stale values):
    training with autograd and eval, three times, bitwise as the ctypes path."""
    pool_limit(64 << 20)
    x = make(POOLED, CL, torch.float32)
    _, _, w, b = vectors(x.shape[1])
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    for step in range(3):
        y, bmean, _, invstd, _ = ext.train(x, w, b, None, None, EPS, 0.1, 1)
        dx = ext.backward(dy, x, w, bmean, invstd, 1, True)[0]
        assert len({y.data_ptr(), dx.data_ptr(), x.data_ptr(), dy.data_ptr()}) == 4  # live: never shared
        want = ctypes_path(lambda: cpu.train_forward_update(x, w, b, EPS, 1, None, None, 0.1))
        bitwise(y, want[0])
        want_dx = ctypes_path(lambda m=bmean, s=invstd: cpu.train_backward(dy, x, w, m, s, 1, True))
        bitwise(dx, want_dx[0])
        bitwise(_eval(x), x)
        del y, dx
        if step:
            assert ext.output_pool()[1] >= 2  # y's and dx's buffers, taken again next step


def test_the_pool_keeps_at_most_its_limit(pool_limit):
    x = make(POOLED, CL, torch.float32)
    pool_limit(2 * x.nbytes)
    outputs = [_eval(x) for _ in range(5)]
    del outputs
    kept, buffers, limit = ext.output_pool()
    assert (kept, buffers, limit) == (2 * x.nbytes, 2, 2 * x.nbytes)
    pool_limit(x.nbytes)  # lowering the limit frees at once
    assert ext.output_pool()[:2] == (x.nbytes, 1)
    with pytest.raises(ValueError, match="expected a number of bytes >= 0, got -1"):
        pool_limit(-1)
    assert ext.output_pool()[:2] == (x.nbytes, 1)  # a refused limit changes nothing
    pool_limit(0)  # off: nothing is kept
    assert ext.output_pool()[:2] == (0, 0)
    y = _eval(x)
    del y
    assert ext.output_pool()[:2] == (0, 0)
    bigger = make((16, 64, 16, 16), CL, torch.float32)
    pool_limit(x.nbytes)
    y = _eval(bigger)  # more than the whole limit: freed, not kept
    del y
    assert ext.output_pool()[:2] == (0, 0)


def test_pooled_outputs_are_ordinary_tensors(pool_limit, tmp_path):
    """resize_, shared memory, saving and numpy views work on them as on torch's own outputs."""
    pool_limit(64 << 20)
    x = make(POOLED, None, torch.float32)
    y = _eval(x)
    y.resize_(2 * x.numel())
    assert torch.equal(y[: x.numel()], x.flatten())
    z = _eval(x)
    z.share_memory_()
    assert z.is_shared() and torch.equal(z, x)
    torch.save(z, tmp_path / "z.pt")
    assert torch.equal(torch.load(tmp_path / "z.pt"), x)
    view = _eval(x).numpy()  # the array keeps the buffer alive
    _eval(x)
    assert (view == x.numpy()).all()


@pytest.mark.parametrize(
    "value,mib", [("", cpu.DEFAULT_OUTPUT_POOL_MB), ("0", 0), ("1.5", 1.5), (" 16 ", 16)], ids=repr
)
def test_pool_limit_from_the_environment(monkeypatch, value, mib):
    monkeypatch.setenv("BATCHNORM_OUTPUT_POOL_MB", value)
    assert cpu._output_pool_limit() == int(mib * (1 << 20))


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf"])
def test_bad_pool_limit_warns_and_keeps_the_default(monkeypatch, value):
    monkeypatch.setenv("BATCHNORM_OUTPUT_POOL_MB", value)
    with pytest.warns(UserWarning, match=f"BATCHNORM_OUTPUT_POOL_MB={value!r} is not a size in MiB"):
        assert cpu._output_pool_limit() == cpu.DEFAULT_OUTPUT_POOL_MB << 20


def test_a_forked_child_starts_its_own_pool():
    """The child cannot trust the parent's lock (a parent thread may have held it at the fork): it
    gets a new pool, and outputs freed in the child go there."""
    result = run_python(
        """
        import os, torch
        from batchnorm.kernels import cpu
        ext = cpu.extension()
        x = torch.randn(8, 64, 16, 16)
        with torch.no_grad():
            y = ext.eval(x, torch.zeros(64), torch.ones(64), None, None, 0.0, 1)
            z = ext.eval(x, torch.zeros(64), torch.ones(64), None, None, 0.0, 1)
        del z
        print("parent", *ext.output_pool()[:2], flush=True)
        pid = os.fork()
        if pid == 0:
            print("child", *ext.output_pool()[:2], flush=True)
            del y
            print("child", *ext.output_pool()[:2], flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent", *ext.output_pool()[:2], flush=True)
        """
    )
    assert result.returncode == 0, result.stderr
    n = 8 * 64 * 16 * 16 * 4
    assert result.stdout.split("\n")[:4] == [f"parent {n} 1", "child 0 0", f"child {n} 1", f"parent {n} 1"]


def test_the_python_paths_take_their_outputs_from_the_pool(pool_limit):
    """cpu._empty_like (the variants' ctypes calls, the operators inside compiled graphs) allocates
    through the same pool; a tensor that is not dense keeps torch's allocator and x's strides."""
    pool_limit(64 << 20)
    x = make(POOLED, CL, torch.float32)
    y = cpu._empty_like(x)
    address = y.data_ptr()
    assert y.stride() == x.stride() and y.dtype == x.dtype
    del y
    assert ext.output_pool()[:2] == (x.nbytes, 1)
    assert cpu._empty_like(x).data_ptr() == address
    sliced = torch.randn(8, 64, 16, 64)[..., ::2]
    out = cpu._empty_like(sliced)
    assert out.shape == sliced.shape and out.stride() == sliced.stride()
    del out
    assert ext.output_pool()[:2] == (x.nbytes, 1)  # only x's buffer, back from the call above
