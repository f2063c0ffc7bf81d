"""Our layers inside recorded graphs: torch.compile(fullgraph=True) and torch.export.

While a graph is recorded, the CPU kernel runs as torch operators (kernels/cpu_ops.py) and the
running-statistics update is part of the graph (a select on "the batch is finite"), so there
is no graph break and export works in training too. Each graph's results must equal our eager
layer's bitwise (the same kernel) and torch's within float32 tolerance: outputs, gradients,
running statistics and num_batches_tracked, training then eval.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch

import batchnorm as bn
from batchnorm.kernels import cpu, cpu_ops

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel: {cpu.why_unavailable()}"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch"),  # torch.jit, imported by inductor
]

SHAPES = [pytest.param((4, 3, 5, 5), id="small"), pytest.param((8, 3, 40, 40), id="large")]
CL = torch.channels_last
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _seeded(make_layer=lambda: bn.BatchNorm2d(3)):
    """A layer with seeded random parameters, and an eager copy of it."""
    torch.manual_seed(0)
    ours = make_layer()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    return ours, copy.deepcopy(ours)


def _spy_on(monkeypatch, *names: str) -> list[str]:
    """A list that records the name of each call of these `cpu` functions."""
    calls: list[str] = []
    for name in names:
        function = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _f=function, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


def _step(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    dx, dw, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    return y.detach(), dx, dw, db


@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_layer_has_no_graph_break_and_matches_eager(shape):
    """fullgraph=True raises on any graph break; in training the results are our eager layer's,
    bitwise (the same kernel, as an operator)."""
    ours, eager = _seeded()
    theirs = torch.nn.BatchNorm2d(3)
    theirs.load_state_dict(ours.state_dict())
    torch.compiler.reset()
    compiled = torch.compile(ours, fullgraph=True)
    for training in (True, True, False):
        for layer in (ours, eager, theirs):
            layer.train(training)
        x, g = torch.randn(shape) * 2 + 1, torch.randn(shape)
        got, want, ref = _step(compiled, x, g), _step(eager, x, g), _step(theirs, x, g)
        for a, b, r in zip(got, want, ref):
            if training:  # the kernel's operator; eval with gradients is torch ops, fused by inductor
                assert torch.equal(a, b)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    for name in BUFFERS:
        assert torch.equal(getattr(ours, name), getattr(eager, name)), name
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 2
    with torch.no_grad():  # eval without gradients: the kernel's eval operator
        x = torch.randn(shape)
        assert torch.equal(compiled(x), eager(x))


LAYOUTS = [  # (layer, input) makers: the kernel's other layouts, and bfloat16
    pytest.param(lambda: bn.BatchNorm2d(4), lambda: torch.randn(8, 4, 20, 20).contiguous(memory_format=CL), id="nhwc"),
    pytest.param(
        lambda: bn.BatchNorm2d(4),
        lambda: torch.randn(8, 4, 20, 20).bfloat16().contiguous(memory_format=CL),
        id="nhwc-bf16",
    ),
    pytest.param(lambda: bn.BatchNorm(4, axis=-1), lambda: torch.randn(8, 20, 4), id="nlc-axis-1"),
]


@pytest.mark.parametrize("make_layer,make_x", LAYOUTS)
def test_compiled_layer_on_other_layouts(make_layer, make_x):
    """Output (and its strides), dx and the running statistics equal our eager layer's, bitwise."""
    torch.manual_seed(0)
    ours = make_layer()
    eager = copy.deepcopy(ours)
    torch.compiler.reset()
    compiled = torch.compile(ours, fullgraph=True)
    x = make_x()
    got, want = _step(compiled, x, torch.ones_like(x)), _step(eager, x, torch.ones_like(x))
    assert got[0].stride() == want[0].stride() == x.stride()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for name in BUFFERS:
        assert torch.equal(getattr(ours, name), getattr(eager, name)), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_layer_the_operators_do_not_take(training):
    """A float64 layer and input: the operators decline (the kernel takes float32 and bfloat16
    inputs), and the kernels give way to torch ops inside the graph instead of meeting fake
    tensors."""
    torch.manual_seed(0)
    ours = bn.BatchNorm2d(3).double().train(training)
    eager = copy.deepcopy(ours)
    x = torch.randn(8, 3, 10, 10).double()
    assert not cpu_ops.applies(x, 1, ours.weight, ours.bias)
    torch.compiler.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(ours, fullgraph=True)(x), eager(x))
    for name in BUFFERS:
        torch.testing.assert_close(getattr(ours, name), getattr(eager, name))


BF16_LAYERS = [  # (layer maker, input shape, the kernel functions training must call)
    pytest.param(lambda: bn.BatchNorm2d(4), (8, 4, 10, 10), {"train_forward_update", "train_backward"}, id="plain"),
    pytest.param(
        lambda: bn.BatchNorm2d(4, virtual_batch_size=4), (8, 4, 10, 10), {"ghost_forward", "ghost_backward"}, id="ghost"
    ),
    pytest.param(
        lambda: bn.BatchNorm2d(4, renorm=bn.Renorm.fixed(1.5, 0.5)),
        (8, 4, 10, 10),
        {"statistics", "apply", "train_backward"},
        id="renorm",
    ),
]


@pytest.mark.parametrize("make_layer,shape,kernels", BF16_LAYERS)
def test_compiled_bfloat16_layer_runs_the_kernel(make_layer, shape, kernels, monkeypatch):
    """A layer converted to bfloat16 (parameters and running statistics): the graph hands the
    operators float32 copies, so the kernel runs, training then eval, and the results follow our
    eager layer's within bfloat16 rounding, gradients and buffers in bfloat16."""
    calls = _spy_on(monkeypatch, *sorted(kernels | {"eval_forward"}))
    ours, eager = _seeded(lambda: make_layer().bfloat16())
    torch.compiler.reset()
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(2):
        x, g = torch.randn(shape).bfloat16() * 2 + 1, torch.randn(shape).bfloat16()
        calls.clear()
        got = _step(compiled, x, g)
        assert kernels <= set(calls), calls
        for a, b in zip(got, _step(eager, x, g)):
            assert a.dtype == b.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1.6e-2)
    for name in BUFFERS:
        assert getattr(ours, name).dtype == getattr(eager, name).dtype
        torch.testing.assert_close(getattr(ours, name), getattr(eager, name), rtol=1.6e-2, atol=1.6e-2)
    ours.eval()
    eager.eval()
    calls.clear()
    with torch.no_grad():
        x = torch.randn(shape).bfloat16()
        y = compiled(x)
        assert calls == ["eval_forward"]
        torch.testing.assert_close(y, eager(x), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES)
def test_exported_layer_matches_eager(shape, training):
    ours, eager = _seeded()
    ours.train(training)
    eager.train(training)
    exported = torch.export.export(ours, (torch.randn(shape),)).module()
    x = torch.randn(shape) * 2 + 1
    with torch.no_grad():
        assert torch.equal(exported(x), eager(x))
    for name in BUFFERS:
        assert torch.equal(getattr(exported, name), getattr(eager, name)), name


def test_compiled_layer_skips_a_nonfinite_batch():
    """The graph's own finite test: the running statistics stay, the batch is not counted."""
    ours, _ = _seeded()
    torch.compiler.reset()
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(8, 3, 40, 40))
        before = {name: getattr(ours, name).clone() for name in BUFFERS}
        x = torch.randn(8, 3, 40, 40)
        x[0, 1, 2, 3] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the operator warns at run time
            compiled(x)
    for name in BUFFERS:
        assert torch.equal(getattr(ours, name), before[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_operators_pass_opcheck(dtype):
    """torch.library.opcheck: schema, fake implementations (shapes, strides), autograd formula."""
    x = torch.randn(4, 3, 5, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.library.opcheck(cpu_ops.cpu_train, (x, w, b, rm, rv, 1e-5, 0.1, 1))
    torch.library.opcheck(cpu_ops.cpu_train, (x.requires_grad_(), w.requires_grad_(), b, None, None, 1e-5, 0.1, 1))
    x = x.detach()
    mean, invstd = torch.randn(3), torch.rand(3) + 0.5
    torch.library.opcheck(cpu_ops.cpu_backward, (torch.randn_like(x), x, w.detach(), mean, invstd, 1))
    torch.library.opcheck(cpu_ops.cpu_eval, (x, mean, torch.rand(3) + 0.5, w.detach(), None, 1e-5, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_masked_operators_pass_opcheck(dtype):
    x = torch.randn(4, 3, 10).to(dtype)
    mask = _lengths_mask([10, 3, 0, 7], 10)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    torch.library.opcheck(cpu_ops.cpu_masked_train, (x, mask, w, b, 1e-5, 1))
    torch.library.opcheck(cpu_ops.cpu_masked_train, (x.requires_grad_(), mask, w.requires_grad_(), None, 1e-5, 1))
    x = x.detach()
    mean, invstd = torch.randn(3), torch.rand(3) + 0.5
    torch.library.opcheck(cpu_ops.cpu_masked_backward, (torch.randn_like(x), x, mask, w.detach(), mean, invstd, 1))
    torch.library.opcheck(cpu_ops.cpu_masked_eval, (x, mask, mean, torch.rand(3) + 0.5, w.detach(), None, 1e-5, 1))


def test_applies_only_to_what_the_kernel_takes():
    x = torch.randn(4, 3, 5, 5)
    v = torch.ones(3)
    assert cpu_ops.applies(x, 1, v, None, running=(v.clone(), v.clone()))
    assert not cpu_ops.applies(x.double(), 1)
    assert not cpu_ops.applies(x[:, :, ::2], 1)
    assert not cpu_ops.applies(x, 1, torch.ones(3, dtype=torch.float64))
    assert not cpu_ops.applies(x, 1, running=(v.clone(), None))
    assert not cpu_ops.applies(x, 1, running=(v.double(), v.double()))


def _lengths_mask(lengths, L):
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]


VARIANTS = [  # (layer maker, (x, mask) maker): the general path's variants, and momentum=None
    pytest.param(
        lambda: bn.BatchNorm2d(3, virtual_batch_size=4), lambda: (torch.randn(16, 3, 5, 5), None), id="ghost4"
    ),
    # N = 16 in ghost batches of 8: inductor miscompiled the index_add_ group sums this took before
    pytest.param(
        lambda: bn.BatchNorm2d(3, virtual_batch_size=8), lambda: (torch.randn(16, 3, 5, 5), None), id="ghost8"
    ),
    pytest.param(
        lambda: bn.BatchNorm2d(3, virtual_batch_size=5), lambda: (torch.randn(16, 3, 5, 5), None), id="ragged"
    ),
    # limits that move each step: the schedule must be computed in the graph, not baked in
    pytest.param(
        lambda: bn.BatchNorm2d(3, renorm=bn.Renorm(1.5, 0.5, warmup_steps=1, r_max_steps=3, d_max_steps=3)),
        lambda: (torch.randn(16, 3, 5, 5), None),
        id="renorm",
    ),
    pytest.param(
        lambda: bn.BatchNorm2d(3, virtual_batch_size=8, renorm=bn.Renorm.fixed(1.2, 0.3)),
        lambda: (torch.randn(16, 3, 5, 5), None),
        id="ghost-renorm",
    ),
    pytest.param(lambda: bn.BatchNorm2d(3, momentum=None), lambda: (torch.randn(16, 3, 5, 5), None), id="cumulative"),
    pytest.param(
        lambda: bn.BatchNorm(3, axis=-1),
        lambda: (torch.randn(6, 10, 3), _lengths_mask([10, 7, 3, 10, 2, 5], 10)),
        id="mask-nlc",
    ),
    pytest.param(  # the kernel's masked operators
        lambda: bn.BatchNorm1d(3),
        lambda: (torch.randn(6, 3, 10), _lengths_mask([10, 7, 3, 0, 2, 5], 10)),
        id="mask-ncl",
    ),
    pytest.param(
        lambda: bn.BatchNorm1d(3, virtual_batch_size=3),
        lambda: (torch.randn(6, 3, 10), _lengths_mask([10, 7, 3, 10, 2, 5], 10)),
        id="mask-ghost",
    ),
]


def _masked_step(layer, params, x, mask, g):
    """(y, dx, dweight, dbias) of one training call; params: the module holding the parameters."""
    x = x.clone().requires_grad_()
    y = layer(x) if mask is None else layer(x, mask)
    return (y.detach(), *torch.autograd.grad(y, (x, params.weight, params.bias), g))


@pytest.mark.parametrize("make_layer,make_input", VARIANTS)
def test_compiled_variants_match_eager(make_layer, make_input):
    """Ghost batches, batch renormalization, masks and momentum=None compile with fullgraph=True,
    once for every training step (the step count stays a tensor in the graph), and give our eager
    layer's outputs, gradients and buffers, training then eval. With renorm, the gradients need
    r and d from before the graph's own update of the buffers (`_general._kept`)."""
    ours, eager = _seeded(make_layer)
    torch.compiler.reset()
    # (imported here: at collection it would load triton before test_triton_kernels sets TRITON_INTERPRET)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    for _ in range(4):
        x, mask = make_input()
        x = x * 2 + 1
        g = torch.randn_like(x)
        got, want = (_masked_step(layer, params, x, mask, g) for layer, params in ((compiled, ours), (eager, eager)))
        for a, b in zip(got, want):  # float32 sums in another order
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for name in BUFFERS:
            torch.testing.assert_close(getattr(ours, name), getattr(eager, name), rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 4
    assert counter.frame_count == 1  # one graph for all four steps
    ours.eval()
    eager.eval()
    x, mask = make_input()
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x) if mask is None else compiled(x, mask), eager(x) if mask is None else eager(x, mask)
        )


@pytest.mark.parametrize("layout", ["nlc", "ncl"])
def test_compiled_mask_with_a_single_value_raises_and_keeps_the_statistics(layout):
    """A mask that leaves one real value: inside the graph a runtime assert (RuntimeError, the
    eager ValueError's message); the running statistics and the count stay as they were. (N, C, L)
    runs the kernel's masked operators, (N, L, C) torch ops."""
    torch.manual_seed(0)
    make = (lambda: bn.BatchNorm(3, axis=-1)) if layout == "nlc" else (lambda: bn.BatchNorm1d(3))
    layer = make()
    torch.compiler.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 6, 3) if layout == "nlc" else torch.randn(3, 3, 6)
    compiled(x, torch.ones(3, 6, dtype=torch.bool))
    before = {name: getattr(layer, name).clone() for name in BUFFERS}
    one = torch.zeros(3, 6, dtype=torch.bool)
    one[1, 2] = True
    for grad in (False, True):
        with pytest.raises(RuntimeError, match="single real value per channel"):
            compiled(x.clone().requires_grad_(grad), one)
        for name in BUFFERS:
            assert torch.equal(getattr(layer, name), before[name]), name
    with pytest.raises(ValueError, match="single real value per channel"):
        make()(x, one)  # eager: the ValueError itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_compiled_mask_runs_the_kernel(layout, dtype, monkeypatch):
    """A mask over (N, C, L) planes or (N, L, C) rows: the compiled layer calls the masked kernel
    (through its operators) in training and in eval, and gives the eager layer's training results
    bitwise (the same kernel). A bfloat16 layer too: its operators take float32 copies."""
    calls = _spy_on(monkeypatch, "masked_forward", "masked_backward", "masked_eval")
    torch.manual_seed(0)
    ours = (bn.BatchNorm1d(4) if layout == "ncl" else bn.BatchNorm(4, axis=-1)).to(dtype)
    eager = copy.deepcopy(ours)
    torch.compiler.reset()
    compiled = torch.compile(ours, fullgraph=True)
    shape = (5, 4, 33) if layout == "ncl" else (5, 33, 4)
    x, g = (torch.randn(shape) * 2 + 1).to(dtype), torch.randn(shape).to(dtype)
    mask = _lengths_mask([33, 20, 1, 0, 17], 33)
    got = _masked_step(compiled, ours, x, mask, g)
    assert {"masked_forward", "masked_backward"} <= set(calls)
    for a, b in zip(got, _masked_step(eager, eager, x, mask, g)):
        assert torch.equal(a, b)
    ours.eval()
    calls.clear()
    with torch.no_grad():  # (the running statistics: the graph's update rounds in another order)
        y = compiled(x, mask)
        assert calls == ["masked_eval"]
        rtol, atol = (1e-5, 1e-6) if dtype is torch.float32 else (1.6e-2, 1.6e-2)
        torch.testing.assert_close(y, eager.eval()(x, mask), rtol=rtol, atol=atol)


@pytest.mark.parametrize("make_layer,make_input", VARIANTS)
def test_exported_variants_match_eager(make_layer, make_input):
    """torch.export of the variants in training: the exported module's outputs and buffers follow
    our eager layer's over three calls (renorm's limits move at the third)."""
    torch.manual_seed(0)
    ours = make_layer()
    eager = copy.deepcopy(ours)
    x, mask = make_input()
    args = (x,) if mask is None else (x, mask)
    exported = torch.export.export(ours, args).module()
    for _ in range(3):
        x, mask = make_input()
        args = (x * 2 + 1,) if mask is None else (x * 2 + 1, mask)
        with torch.no_grad():
            torch.testing.assert_close(exported(*args), eager(*args), rtol=1e-5, atol=1e-5)
    for name in BUFFERS:
        torch.testing.assert_close(getattr(exported, name), getattr(eager, name), rtol=1e-5, atol=1e-6)
    assert int(exported.num_batches_tracked) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ghost_and_renorm_operators_pass_opcheck(dtype):
    from batchnorm import _kernel_variants

    x = torch.randn(10, 3, 4, 4).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    for k in (4, 5):  # ragged: a last ghost batch of 2, and even
        torch.library.opcheck(cpu_ops.cpu_ghost_train, (x, w, b, 1e-5, 1, k))
        grads = (x.clone().requires_grad_(), w.requires_grad_(), None)
        torch.library.opcheck(cpu_ops.cpu_ghost_train, (*grads, 1e-5, 1, k))
        w = w.detach()
        G = -(-10 // k)
        mean, invstd = torch.randn(G, 3), torch.rand(G, 3) + 0.5
        torch.library.opcheck(cpu_ops.cpu_ghost_backward, (torch.randn_like(x), x, w, mean, invstd, 1, k))
    limits = torch.tensor(1.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    args = (torch.randn(3) * 0.1, torch.rand(3) + 0.5, *limits, 1e-5, 1)
    torch.library.opcheck(_kernel_variants._cpu_renorm_train, (x, w, b, *args))
    grads = (x.clone().requires_grad_(), w.requires_grad_(), b)
    torch.library.opcheck(_kernel_variants._cpu_renorm_train, (*grads, *args))


KERNEL_VARIANTS = [  # (layer maker, x maker, the kernel functions the compiled layer must call)
    pytest.param(
        lambda: bn.BatchNorm2d(3, virtual_batch_size=4),
        lambda: torch.randn(16, 3, 5, 5),
        {"ghost_forward", "ghost_backward"},
        id="ghost",
    ),
    pytest.param(
        lambda: bn.BatchNorm2d(3, virtual_batch_size=5),
        lambda: torch.randn(12, 3, 5, 5).contiguous(memory_format=CL),
        {"ghost_forward", "ghost_backward"},
        id="ghost-ragged-nhwc",
    ),
    pytest.param(
        lambda: bn.BatchNorm1d(6, virtual_batch_size=8), lambda: torch.randn(32, 6), {"ghost_forward"}, id="ghost-2d"
    ),
    pytest.param(
        lambda: bn.BatchNorm2d(3, renorm=bn.Renorm(1.5, 0.5, warmup_steps=1, r_max_steps=3, d_max_steps=3)),
        lambda: torch.randn(16, 3, 5, 5),
        {"statistics", "apply", "train_backward"},
        id="renorm",
    ),
    pytest.param(
        lambda: bn.BatchNorm(4, axis=-1, renorm=bn.Renorm.fixed(1.2, 0.3)),
        lambda: torch.randn(6, 10, 4),
        {"statistics", "apply", "train_backward"},
        id="renorm-nlc",
    ),
]


@pytest.mark.parametrize("make_layer,make_x,kernels", KERNEL_VARIANTS)
def test_compiled_ghost_and_renorm_run_the_kernel(make_layer, make_x, kernels, monkeypatch):
    """Ghost batches and batch renormalization alone, compiled: the graph calls the CPU kernel
    through their operators (not the general path's torch ops) and gives our eager layer's
    outputs and gradients bitwise, the buffers within rounding, over three steps (renorm's
    limits move)."""
    calls = _spy_on(monkeypatch, "ghost_forward", "ghost_backward", "statistics", "apply", "train_backward")
    ours, eager = _seeded(make_layer)
    torch.compiler.reset()
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(3):
        x = make_x() * 2 + 1
        g = torch.randn_like(x)
        calls.clear()
        got = _step(compiled, x, g)
        assert kernels <= set(calls), calls
        want = _step(eager, x, g)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for name in BUFFERS:
            torch.testing.assert_close(getattr(ours, name), getattr(eager, name), rtol=1e-6, atol=1e-7)


def test_layout_traces_with_symbolic_strides():
    """`cpu._layout` (which `cpu_ops.applies` runs while a graph is recorded) on dense permutations
    whose strides are symbolic (dynamic shapes): a graph, no Dynamo "sort with non-constant keys"
    error, and the layout of eager."""
    f = torch.compile(lambda x: x * cpu._layout(x, 1)[2], dynamic=True, fullgraph=True)
    torch.compiler.reset()
    for shape in [(4, 3, 5, 6), (2, 5, 3, 3)]:
        nhwc = torch.randn(shape).contiguous(memory_format=CL)
        nhcw = torch.randn(shape).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # (N, H, C, W) in memory
        for x, B in ((nhwc, 1), (nhcw, shape[3])):
            assert cpu._layout(x, 1) == (x.numel() // (shape[1] * B), shape[1], B)
            assert torch.equal(f(x), x * B)


def test_a_process_whose_first_call_is_compiled_runs_the_kernel():
    """The kernel is loaded while the first graph is traced (`cpu.loaded_for_graphs`): a fresh
    process that never called a layer eagerly still gets the kernel's operators in its graphs."""
    script = """
import torch, batchnorm as bn
from batchnorm.kernels import cpu
assert cpu._lib is None, "loaded before the test"
calls = []
forward = cpu.train_forward_update
cpu.train_forward_update = lambda *a, **k: calls.append(1) or forward(*a, **k)
torch.compile(bn.BatchNorm2d(3), fullgraph=True)(torch.randn(4, 3, 5, 5))
assert calls, "the graph holds torch ops, not the kernel"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


ACT_LAYERS = [  # (layer maker, x maker, residual?)
    pytest.param(lambda: bn.BatchNormAct2d(3), lambda: torch.randn(8, 3, 6, 6), False, id="relu-nchw"),
    pytest.param(lambda: bn.BatchNormAct2d(3), lambda: torch.randn(8, 3, 6, 6), True, id="add-relu-nchw"),
    pytest.param(
        lambda: bn.BatchNormAct2d(3), lambda: torch.randn(8, 3, 6, 6).contiguous(memory_format=CL), True, id="add-nhwc"
    ),
    pytest.param(lambda: bn.BatchNormAct1d(6), lambda: torch.randn(16, 6), False, id="relu-2d"),
    pytest.param(
        lambda: bn.BatchNormAct2d(3).to(torch.bfloat16),
        lambda: torch.randn(8, 3, 6, 6).to(torch.bfloat16),
        True,
        id="add-relu-bf16",
    ),
]


@pytest.mark.parametrize("make_layer,make_x,residual", ACT_LAYERS)
def test_compiled_act_layer_runs_the_fused_kernel(make_layer, make_x, residual, act_calls):
    """BatchNormAct compiled with fullgraph=True: the graph calls the fused passes through the
    operators batchnorm::cpu_relu_* (inductor's code for BN followed by a ReLU was 5-10x slower
    than our eager layer on the CPU) and gives our eager layer's outputs, gradients (the
    residual's too) and float32 buffers bitwise, three training steps then eval."""
    calls = act_calls
    ours, eager = _seeded(make_layer)
    torch.compiler.reset()
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(3):
        x = make_x() * 2 + 1
        r = torch.randn_like(x) if residual else None
        g = torch.randn_like(x)
        results = []
        for layer in (compiled, eager):
            xa = x.clone().requires_grad_()
            ra = r.clone().requires_grad_() if residual else None
            calls.clear()
            y = layer(xa, residual=ra)
            wrt = [xa, layer.weight, layer.bias] + ([ra] if residual else [])
            results.append((y.detach(), *torch.autograd.grad(y, wrt, g)))
            if layer is compiled:  # the gated backward without a residual; with one, torch's ReLU backward first
                assert calls == ["train_forward_relu"] + ([] if residual else ["train_backward"]), calls
        for a, b in zip(*results):
            assert torch.equal(a, b)
        for name in BUFFERS:  # a bfloat16 buffer: updated in float32 in the graph, in bfloat16 eagerly
            rtol = 0 if x.dtype == torch.float32 else 8e-3
            torch.testing.assert_close(getattr(ours, name), getattr(eager, name), rtol=rtol, atol=0)
    ours.eval(), eager.eval()
    with torch.no_grad():
        calls.clear()
        tol = 0 if x.dtype == torch.float32 else 1.6e-2  # (bfloat16: from buffers a rounding apart)
        torch.testing.assert_close(compiled(x, residual=r), eager(x, residual=r), rtol=tol, atol=tol)
        assert calls == ["eval_forward", "eval_forward"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_exported_act_layer_matches_eager(training):
    ours, eager = _seeded(lambda: bn.BatchNormAct2d(3))
    ours.train(training), eager.train(training)
    x, r = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)
    exported = torch.export.export(ours, (x,), {"residual": r}).module()
    x = x * 2 + 1
    with torch.no_grad():
        assert torch.equal(exported(x, residual=r), eager(x, residual=r))
    for name in BUFFERS:
        assert torch.equal(getattr(exported, name), getattr(eager, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_act_operators_pass_opcheck(dtype):
    x = torch.randn(4, 3, 5, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 3, 5, 5).to(dtype)  # contiguous: copied into x's layout inside
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    for residual in (None, r):
        torch.library.opcheck(cpu_ops.cpu_relu_train, (x, residual, w, b, rm, rv, 1e-5, 0.1, 1))
        grads = (x.clone().requires_grad_(), None if residual is None else residual.clone().requires_grad_())
        torch.library.opcheck(cpu_ops.cpu_relu_train, (*grads, w.clone().requires_grad_(), b, None, None, 1e-5, 0.1, 1))
        torch.library.opcheck(cpu_ops.cpu_relu_eval, (x, residual, rm, rv, w, None, 1e-5, 1))
    y, mean, _, invstd, _, gate = cpu.train_forward_relu(x, None, w, b, 1e-5, 1)
    for saved in (None, y):
        torch.library.opcheck(cpu_ops.cpu_relu_backward, (torch.randn_like(x), x, saved, w, mean, invstd, gate, 1))
