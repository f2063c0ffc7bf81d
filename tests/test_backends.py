"""Every backend of functional.batch_norm passes the same parity checks against torch."""

from __future__ import annotations

import pytest
import torch

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.kernels import cpu as cpu_kernel
from batchnorm.kernels import triton_bn

# "triton" runs these CPU tensors in triton's interpreter (conftest sets TRITON_INTERPRET=1 where
# there is no GPU); test_parity.py and test_act.py run it on every layout and on the act layers.
BACKENDS = ["auto", "composite", "torch", "cpu", "triton"]


def _supported(backend: str, x: torch.Tensor) -> bool:
    if backend == "cpu":
        return cpu_kernel.supports(x, 1)
    if backend == "triton":
        if not triton_bn.available():
            pytest.skip(f"Triton kernels unavailable: {triton_bn.why_unavailable()}")
        return triton_bn.supports(x, 1)
    return True


CASES = [
    ((6, 4, 5, 5), torch.float64, False),
    ((6, 4, 5, 5), torch.float32, False),
    ((6, 4, 5, 5), torch.float32, True),
    ((8, 5), torch.float32, False),
    ((4, 3, 7), torch.bfloat16, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype, channels_last", CASES)
def test_backend_parity_train_then_eval(backend, shape, dtype, channels_last):
    torch.manual_seed(0)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if not _supported(backend, x):
        with pytest.raises(RuntimeError, match=f"backend '{backend}' was forced.*{x.dtype}"), F.use_backend(backend):
            bn.BatchNorm(shape[1], device=device)(x)
        return
    C = shape[1]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours = bn.BatchNorm(C, dtype=pdtype, device=device)
    ref = (torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d)(C, dtype=pdtype, device=device)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    with F.use_backend(backend):
        for _ in range(2):
            xa = x.clone().requires_grad_(True)
            xb = x.clone().requires_grad_(True)
            ya, yb = ours(xa), ref(xb)
            g = torch.randn_like(yb)
            ga = torch.autograd.grad(ya, (xa, ours.weight, ours.bias), g)
            gb = torch.autograd.grad(yb, (xb, ref.weight, ref.bias), g)
            torch.testing.assert_close(ya.float(), yb.float(), rtol=tol, atol=tol)
            for a, b in zip(ga, gb):
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 10)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=tol, atol=tol)
        ours.eval()
        ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x).float(), ref(x).float(), rtol=tol, atol=tol)
        if channels_last:
            assert ours(x).is_contiguous(memory_format=torch.channels_last)


def test_backend_switch_is_scoped_and_validated():
    assert F.get_backend() in F.BACKENDS
    before = F.get_backend()
    with F.use_backend("torch"):
        assert F.get_backend() == "torch"
    assert F.get_backend() == before
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        F.set_backend("cudnn")


def test_auto_picks_the_kernel_where_it_runs():
    x = torch.randn(4, 3, 5, 5)
    expected = "cpu" if cpu_kernel.available() else "composite"
    assert F._pick_path(x, 1) == expected
    assert F._pick_path(x.double(), 1) == "composite"  # the kernel takes float32 and bfloat16


@pytest.mark.parametrize("extension", [True, False], ids=["cxx", "ctypes"])
@pytest.mark.parametrize("shape", [(64, 8), (4, 8, 5, 5)])
def test_auto_gives_small_float32_calls_to_torchs_kernel(shape, extension, monkeypatch):
    """Up to NATIVE_MAX_ELEMS[mode] elements torch's kernel has less fixed cost per call than ours
    through Python and ctypes; through our C++ entry points (cpu.extension) ours has less."""
    if extension and cpu_kernel.extension() is None:
        pytest.skip(f"no C++ entry points: {cpu_kernel.extension_why_unavailable()}")
    if not extension:
        monkeypatch.setattr(cpu_kernel, "extension", lambda: None)
    small_eval, small_train = ("ours", "ours") if extension else ("_torch_eval", "_torch_train")
    calls = []
    for name in ("_torch_train", "_torch_eval"):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    C = shape[1]
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    small = torch.randn(shape)

    def path(*args, **kwargs) -> str:
        calls.clear()
        F.batch_norm(*args, **kwargs)
        return calls[0] if calls else "ours"

    before = rm.clone()
    assert path(small, rm, rv, w, b, True) == small_train
    assert not torch.equal(rm, before)  # the running statistics move on this path too
    with torch.no_grad():
        assert path(small, rm, rv, w, b, True) == "ours"  # no autograd: our kernel, one call
        assert path(small, rm, rv, w, b, False) == small_eval
        assert path(small.bfloat16(), rm, rv, w, b, False) == small_eval
        assert path(small, rm, rv, w.double(), b, False) == "ours"  # params torch's kernel does not take
    big = torch.randn(F.NATIVE_MAX_ELEMS["train_grad"] // C + 1, C)
    assert path(big, rm, rv, w, b, True) == "ours"
    # bfloat16 training: torch's kernel with float32 parameters (mixed precision: float32 statistics);
    # without parameters it would return invstd in bfloat16, so ours
    assert path(small.bfloat16(), rm, rv, w, b, True) == small_train
    assert path(small.bfloat16(), rm, rv, None, None, True) == "ours"
    with F.use_backend("cpu"):  # forcing the kernel still means the kernel
        assert path(small, rm, rv, w, b, True) == "ours"


def test_only_cpu_tensors_ask_the_cpp_entry_points(monkeypatch):
    """A tensor on another device (meta here; CUDA for users) never asks for the C++ entry points:
    a CUDA user's first call would build them (about 15 s), and each call ask them in vain."""
    asked = []
    monkeypatch.setattr(cpu_kernel, "extension", lambda: asked.append(1))
    x = torch.empty(4, 3, 5, 5, device="meta")
    y = F.batch_norm(x, torch.zeros(3, device="meta"), torch.ones(3, device="meta"), training=False)
    z = F.batch_norm(x, None, None, training=True)
    assert y.shape == z.shape == x.shape and asked == []
    F.batch_norm(torch.randn(4, 3, 5, 5), torch.zeros(3), torch.ones(3), training=False)
    assert asked == [1]  # (a CPU tensor does)


def test_auto_gives_small_cuda_calls_to_torchs_kernel(monkeypatch):
    """On a CUDA device up to NATIVE_MAX_ELEMS_CUDA[mode] elements in every mode (the host decides
    there, and torch's kernel with our rule takes less of it), not while a graph is recorded; the
    same dtype, parameter and axis conditions as on the CPU. (The rule alone, on a stand-in for a
    CUDA tensor; the gpu-marked test below runs it on a GPU.)"""

    class Cuda:
        is_cpu, is_cuda = False, True

        def __init__(self, n: int, dtype: torch.dtype = torch.float32) -> None:
            self.n, self.dtype = n, dtype

        def numel(self) -> int:
            return self.n

    w, w64 = torch.ones(4), torch.ones(4, dtype=torch.float64)
    limits = F.NATIVE_MAX_ELEMS_CUDA
    for mode in ("train_grad", "train", "eval"):
        assert F._native_is_cheaper(mode, Cuda(limits[mode]), 1, w, w)
        assert not F._native_is_cheaper(mode, Cuda(limits[mode] + 1), 1, w, w)
        assert not F._native_is_cheaper(mode, Cuda(64), -1, w, w)  # another axis
        assert F._native_is_cheaper(mode, Cuda(64, torch.float16), 1, w, w)  # (not on the CPU)
        assert not F._native_is_cheaper(mode, Cuda(64, torch.float64), 1, w, w)
        assert not F._native_is_cheaper(mode, Cuda(64), 1, w64, w)
        with F.use_backend("composite"):  # a forced backend is that backend
            assert not F._native_is_cheaper(mode, Cuda(64), 1, w, w)
    assert F._native_is_cheaper("train", Cuda(64, torch.bfloat16), 1, w, None)
    assert not F._native_is_cheaper("train", Cuda(64, torch.bfloat16), 1, None, None)
    assert not F._native_is_cheaper("train", Cuda(64, torch.float16), 1, None, None)
    monkeypatch.setattr(F, "_recording", lambda: True)
    assert not F._native_is_cheaper("train", Cuda(64), 1, w, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_runs_small_cuda_layers_on_torchs_kernel(monkeypatch):
    """A small CUDA layer under "auto": torch's kernel for the step and eval, the running statistics
    and count as torch's layer's, and the update one Triton launch."""
    calls = []
    for name in ("_torch_train", "_torch_eval"):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    update = triton_bn.update_running
    monkeypatch.setattr(triton_bn, "update_running", lambda *a, **k: calls.append("update") or update(*a, **k))
    ours, theirs = bn.BatchNorm2d(8).cuda(), torch.nn.BatchNorm2d(8).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    ours(x).sum().backward()
    theirs(x).sum().backward()
    with torch.no_grad():
        ours.eval()(x)
    assert calls == ["_torch_train", "update", "_torch_eval"]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_axis_output_keeps_the_input_layout(backend):
    """BatchNorm(axis=-1) on contiguous (N, L, C): y and dx contiguous too, on every path."""
    x = torch.randn(4, 6, 8, requires_grad=True)
    layer = bn.BatchNorm(8, axis=-1)
    with F.use_backend(backend):
        for training in (True, False):
            layer.train(training)
            y = layer(x)
            assert y.is_contiguous(), (training, y.stride())
            (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
            assert dx.shape == x.shape
