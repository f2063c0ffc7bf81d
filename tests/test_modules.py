"""The layers are drop-ins: isinstance, state_dict both ways, repr, copies, pickles, conventions."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.testing import assert_close

import batchnorm as bn

PAIRS = {
    "1d": (torch.nn.BatchNorm1d, bn.BatchNorm1d, (6, 4, 5)),
    "2d": (torch.nn.BatchNorm2d, bn.BatchNorm2d, (3, 4, 3, 5)),
    "3d": (torch.nn.BatchNorm3d, bn.BatchNorm3d, (2, 4, 3, 2, 3)),
}
CONFIGS = {
    "default": dict(),
    "no-affine": dict(affine=False),
    "no-bias": dict(bias=False),
    "no-track": dict(track_running_stats=False),
    "momentum-none": dict(momentum=None, eps=1e-3),
}


def _trained(layer: torch.nn.Module, shape, steps: int = 3) -> torch.nn.Module:
    """A few training steps and perturbed parameters, so no tensor is at its default."""
    layer.train()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
        for _ in range(steps):
            layer(torch.randn(shape) * 2 + 1)
    return layer.eval()


@pytest.mark.parametrize("kind", list(PAIRS))
def test_isinstance_of_torch_class(kind):
    torch_cls, our_cls, _ = PAIRS[kind]
    layer = our_cls(4)
    assert isinstance(layer, torch_cls)
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(bn.BatchNorm(4), torch.nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(PAIRS))
def test_state_dict_keys_and_repr_identical(kind, config):
    torch_cls, our_cls, _ = PAIRS[kind]
    theirs, ours = torch_cls(4, **CONFIGS[config]), our_cls(4, **CONFIGS[config])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    for (na, a), (nb, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert na == nb and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(PAIRS))
def test_torch_checkpoint_loads_into_ours(kind, config):
    torch_cls, our_cls, shape = PAIRS[kind]
    theirs = _trained(torch_cls(4, **CONFIGS[config]), shape)
    ours = our_cls(4, **CONFIGS[config])
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    result = ours.load_state_dict(torch.load(buf))
    assert not result.missing_keys and not result.unexpected_keys
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    ours.eval()
    x = torch.randn(shape)
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(PAIRS))
def test_our_checkpoint_loads_into_torch(kind, config):
    torch_cls, our_cls, shape = PAIRS[kind]
    ours = _trained(our_cls(4, **CONFIGS[config]), shape)
    theirs = torch_cls(4, **CONFIGS[config])
    result = theirs.load_state_dict(ours.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for name, t in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], t), name
    theirs.eval()
    x = torch.randn(shape)
    assert_close(theirs(x), ours(x))


def test_checkpoint_inside_a_model_loads_both_ways():
    def model(norm):
        conv1, conv2 = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)
        return torch.nn.Sequential(conv1, norm(4), torch.nn.ReLU(), conv2)

    theirs, ours = model(torch.nn.BatchNorm2d), model(bn.BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    theirs(x)  # one training step moves the running statistics
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    assert_close(ours(x), theirs(x))
    ours.train()
    ours(x * 2)
    theirs.load_state_dict(ours.state_dict())
    assert int(theirs[1].num_batches_tracked) == 2
    assert_close(theirs.eval()(x), ours.eval()(x))


def test_generic_layer_shares_torchs_state_dict():
    theirs = _trained(torch.nn.BatchNorm1d(4), (5, 4, 3))
    ours = bn.BatchNorm(4, axis=-1)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 3, 4)  # (N, L, C)
    assert_close(ours.eval()(x), theirs(x.transpose(1, 2)).transpose(1, 2))
    back = torch.nn.BatchNorm1d(4)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.running_var, theirs.running_var)


def test_generic_layer_repr_names_the_axis():
    assert "axis=-1" in repr(bn.BatchNorm(8, axis=-1))
    assert repr(bn.BatchNorm(8)).startswith("BatchNorm(8, eps=1e-05, momentum=0.1")


@pytest.mark.parametrize("kind", list(PAIRS))
def test_deepcopy_is_independent_and_equal(kind):
    _, our_cls, shape = PAIRS[kind]
    layer = _trained(our_cls(4), shape)
    clone = copy.deepcopy(layer)
    assert type(clone) is type(layer)
    x = torch.randn(shape)
    assert torch.equal(clone(x), layer(x))
    clone.train()
    clone(x)
    assert int(clone.num_batches_tracked) == int(layer.num_batches_tracked) + 1
    assert not torch.equal(clone.running_mean, layer.running_mean)  # buffers were copied, not shared


@pytest.mark.parametrize("kind", list(PAIRS))
def test_pickle_and_torch_save_whole_layer(kind):
    _, our_cls, shape = PAIRS[kind]
    layer = _trained(our_cls(4, momentum=None), shape)
    x = torch.randn(shape)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(layer))
    for other in (loaded, unpickled):
        assert type(other) is our_cls and other.momentum is None
        assert torch.equal(other(x), layer(x))
        for name, t in layer.state_dict().items():
            assert torch.equal(other.state_dict()[name], t), name


def test_generic_layer_pickles_with_its_axis():
    layer = bn.BatchNorm(3, axis=-1)
    other = pickle.loads(pickle.dumps(layer))
    assert other.axis == -1
    x = torch.randn(4, 5, 3)
    assert torch.equal(other(x), layer(x))


def test_dtype_and_device_arguments_and_to():
    layer = bn.BatchNorm2d(3, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.running_var.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.long
    assert layer(torch.randn(2, 3, 2, 2, dtype=torch.float64)).dtype == torch.float64
    layer = bn.BatchNorm2d(3, device="cpu").double()
    assert layer.running_mean.dtype == torch.float64


def test_momentum_none_is_cumulative_average():
    layer = bn.BatchNorm1d(2, momentum=None, dtype=torch.float64)
    batches = [torch.randn(5, 2, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for x in batches:
        layer(x)
    assert_close(layer.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    assert_close(layer.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert int(layer.num_batches_tracked) == 4


def test_eval_without_running_stats_uses_batch_statistics():
    layer = bn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2) * 5 + 3
    y = layer(x)
    assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert layer.running_mean is None and layer.num_batches_tracked is None


def test_eval_uses_running_statistics_and_leaves_them():
    layer = _trained(bn.BatchNorm2d(3), (4, 3, 2, 2))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    y = layer(x)
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    want = (x - layer.running_mean.view(1, 3, 1, 1)) * scale.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    assert_close(y, want)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_in_a_model_backward_reaches_every_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), bn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    model(torch.randn(8, 5)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")  # deprecated in torch 2.13, still used
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (8, 4, 48, 48)], ids=["small", "large"])
def test_torch_jit_trace_records_the_whole_layer(shape, training, grad):
    """A trace records torch operators only: the kernels must give way, or the traced graph would
    return an uninitialized tensor. Outputs and running statistics of the traced layer on a new
    input equal the layer's own, on both sides of NATIVE_MAX_ELEMS."""
    layer = bn.BatchNorm2d(4).train(training)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.weight.uniform_(0.5, 1.5)
    twin = copy.deepcopy(layer)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(layer, torch.randn(shape), check_trace=False)
    layer.load_state_dict(twin.state_dict())  # the trace ran the layer once
    x = torch.randn(shape) * 3 + 1
    with torch.no_grad():
        assert_close(traced(x), twin(x), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        assert_close(getattr(traced, name), getattr(twin, name), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # torch.jit, imported by inductor
def test_layer_under_torch_compile_matches_torch():
    """torch.compile of our layer (the kernel as an operator in the graph) computes what torch's layer does:
    small and larger inputs, training then eval (tests/test_compile.py has fullgraph and export)."""
    torch.manual_seed(0)
    ours, theirs = bn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    compiled = torch.compile(ours)
    for shape in [(2, 4, 3, 3), (8, 4, 48, 48)]:  # 72 and 73728 elements: both sides of NATIVE_MAX_ELEMS
        x = (torch.randn(shape) * 2 + 1).requires_grad_()
        ya, yb = compiled(x), theirs(x)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, (x, ours.weight, ours.bias), g)
        gb = torch.autograd.grad(yb, (x, theirs.weight, theirs.bias), g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-6)
    ours.eval()
    theirs.eval()
    x = torch.randn(8, 4, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), theirs(x), rtol=1e-5, atol=1e-5)
