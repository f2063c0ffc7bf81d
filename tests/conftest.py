"""Shared fixtures of the core tests: seeded generators and per-dtype tolerances."""

from __future__ import annotations

import os

# Compile every graph afresh: inductor's on-disk caches key a graph without the Python source of
# a custom operator's autograd formula, so after such a change a warm cache serves the old one
# and a compiled-graph test can pass on code that no longer exists. (Set before torch reads it.)
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import numpy as np
import pytest
import torch

# Without a GPU, the Triton kernels run in triton's interpreter on CPU tensors: for the kernel tests
# (test_triton_kernels.py) and the "triton" backend's parity tests. Read once, at their first use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances against torch or the float64 reference, per input dtype. Half
# inputs are computed in float32 by both sides and rounded once, so they may
# differ by about one unit in the last place of a bfloat16 (2**-8 relative).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch generator state."""
    torch.manual_seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def tol():
    """tol(dtype) -> keyword tolerances for torch.testing.assert_close."""
    return lambda dtype: TOLERANCES[dtype]


@pytest.fixture
def act_calls(monkeypatch) -> list[str]:
    """The fused BN + ReLU entries of the CPU kernel called while the test runs, in order:
    "train_forward_relu", "train_backward" with a relu_gate, "eval_forward" with relu=True.
    Meanwhile the act layers take their Python path (not the C++ entry points, which
    test_extension.py compares with it) at any size."""
    from batchnorm import act
    from batchnorm.kernels import cpu

    monkeypatch.setattr(act, "FUSED_MIN_ELEMS", 0)
    monkeypatch.setattr(act, "FUSED_MIN_ELEMS_CTYPES", 0)
    monkeypatch.setattr(act, "_ext_call", lambda *args: None)

    calls: list[str] = []
    fused = {
        "train_forward_relu": lambda kwargs: True,
        "train_backward": lambda kwargs: kwargs.get("relu_gate") is not None,
        "eval_forward": lambda kwargs: bool(kwargs.get("relu")),
    }

    def spy(function, name):
        def call(*args, **kwargs):
            if fused[name](kwargs):
                calls.append(name)
            return function(*args, **kwargs)

        return call

    for name in fused:
        monkeypatch.setattr(cpu, name, spy(getattr(cpu, name), name))
    return calls


@pytest.fixture
def triton_calls(monkeypatch) -> list[str]:
    """The Triton kernels' entry points called while the test runs, by name, in order (not those
    one calls in turn: train_forward runs train_forward_act); skips the test (with the reason)
    where they cannot run: no triton, or no GPU and no interpreter."""
    from batchnorm.kernels import triton_bn

    if not triton_bn.available():
        pytest.skip(f"Triton kernels unavailable: {triton_bn.why_unavailable()}")
    calls: list[str] = []
    inside = [0]

    def spy(function, name):
        def call(*args, **kwargs):
            if not inside[0]:
                calls.append(name)
            inside[0] += 1
            try:
                return function(*args, **kwargs)
            finally:
                inside[0] -= 1

        return call

    training = ("train_forward", "train_backward", "train_forward_act", "train_backward_act")
    for name in (*training, "inference", "eval_forward"):
        monkeypatch.setattr(triton_bn, name, spy(getattr(triton_bn, name), name))
    return calls
