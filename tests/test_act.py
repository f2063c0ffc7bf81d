"""BN + (residual) + ReLU layers: the same numbers as the composite, fused where Triton runs."""

from __future__ import annotations

import pytest
import torch

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


def test_act_layer_checks_the_residual():
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        bn.BatchNormAct2d(3)(torch.randn(2, 3, 4, 4), residual=torch.randn(2, 3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_act_on_gpu_matches_composite():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12, device="cuda", requires_grad=True)
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
