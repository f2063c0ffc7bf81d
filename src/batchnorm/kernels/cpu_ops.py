"""The CPU kernel as torch operators, for torch.compile and torch.export.

A graph that torch.compile or torch.export records holds operators only. The kernel called
directly (through C++ or ctypes) is not one: Dynamo breaks the graph there, and torch.export,
which allows no break, fails on the fake tensors it traces with. Registered as operators
(`torch.library.custom_op`) with fake implementations (shapes and strides only) and an autograd
formula, the kernel runs inside compiled and exported graphs:

    batchnorm::cpu_train(x, weight?, bias?, running_mean?, running_var?, eps, momentum, axis)
        -> (y, mean, invstd, new_running_mean, new_running_var, counted)
        y = (x - mean) * invstd * weight + bias with the batch's mean and invstd (float32 (C,));
        new running = (1 - momentum) * running + momentum * batch (unbiased variance), the old
        values for a non-finite batch (empty without running statistics); counted: 0-dim bool,
        False only for a non-finite batch. The caller copies the new statistics into its buffers
        (an operator with an autograd formula may not mutate its inputs).
    batchnorm::cpu_backward(dy, x, weight?, mean, invstd, axis) -> (dx, s1, s2)
        s1 = sum(dy), s2 = sum(dy * (x - mean)); dweight = s2 * invstd, dbias = s1.
    batchnorm::cpu_eval(x, mean, var, weight?, bias?, eps, axis) -> y
        y = x * scale + shift, scale = weight * (var + eps)**-1/2, shift = bias - mean * scale.
    batchnorm::cpu_masked_train(x, mask, weight?, bias?, eps, axis) -> (y, mean, var, invstd)
    batchnorm::cpu_masked_backward(dy, x, mask, weight?, mean, invstd, axis) -> (dx, s1, s2)
    batchnorm::cpu_masked_eval(x, mask, mean, var, weight?, bias?, eps, axis) -> y
        The same over the real values of a mask (`cpu.masked_forward`): statistics and sums from
        them, 0 at the padding; no running statistics (the caller updates them from mean, var).
    batchnorm::cpu_ghost_train(x, weight?, bias?, eps, axis, k) -> (y, mean, invstd, total_mean, total_m2)
    batchnorm::cpu_ghost_backward(dy, x, weight?, mean, invstd, axis, k) -> (dx, s1, s2)
        Ghost batches of k samples (`cpu.ghost_forward`): the statistics and sums (G, C), row g
        for ghost batch g, and the whole batch's float64 mean and M2 (C,); no running statistics
        (the caller updates them from the latter).

    batchnorm::cpu_relu_train(x, residual?, weight?, bias?, running_mean?, running_var?, eps, momentum, axis)
        -> (y, mean, invstd, scale_shift, new_running_mean, new_running_var, counted)
        y = relu(BN(x) + residual) from one apply pass (`cpu.train_forward_relu`); the rest as
        cpu_train's, and scale_shift (2, C), the apply pass's, for the backward.
    batchnorm::cpu_relu_backward(dy, x, y?, weight?, mean, invstd, scale_shift, axis) -> (dx, s1, s2, g)
        y None (no residual): BN's backward with dy gated by the forward's ReLU test recomputed
        from x; g empty. Else g = dy where y > 0 (the residual's gradient), then BN's backward of g.
    batchnorm::cpu_relu_eval(x, residual?, mean, var, weight?, bias?, eps, axis) -> y
        relu(cpu_eval + residual) in one pass.

Batch renormalization's operator, `batchnorm::cpu_renorm_train`, is in `_kernel_variants`
beside the eager form it shares its forward with.

`functional` uses them only while torch.compile or torch.export traces, for inputs the kernel
takes as they are (`applies`). In eager mode the C++ entry points are cheaper: an operator
call through the dispatcher and back into Python costs several microseconds more.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import cpu

__all__ = [
    "applies",
    "cpu_backward",
    "cpu_eval",
    "cpu_ghost_backward",
    "cpu_ghost_train",
    "cpu_masked_backward",
    "cpu_masked_eval",
    "cpu_masked_train",
    "cpu_relu_backward",
    "cpu_relu_eval",
    "cpu_relu_train",
    "cpu_train",
    "operands",
    "wanted_grads",
]


def applies(
    x: Tensor, axis: int, *vectors: Tensor | None, running: tuple[Tensor | None, Tensor | None] = (None, None)
) -> bool:
    """Whether the operators take this call: the kernel loaded, x a float32/bfloat16 CPU tensor
    in a kernel layout, the per-channel vectors float32 (C,) contiguous or None, the running
    statistics both None or both buffers the kernel updates.

    Pure reads of shapes and strides (not `cpu.layout`, whose memo dict would make Dynamo guard
    on it and recompile whenever it grows); the kernel is loaded (built if need be) at trace time
    (`cpu.loaded_for_graphs`).
    """
    if not cpu.loaded_for_graphs() or x.dtype not in cpu._DTYPES or not x.is_cpu or x.layout != torch.strided:
        return False
    acb = cpu._layout(x, axis)
    if acb is None:
        return False
    C = acb[1]
    if not all(v is None or cpu._float32_vector(v, C) for v in vectors):
        return False
    rm, rv = running
    if (rm is None) != (rv is None):
        return False
    return rm is None or (cpu.can_update(rm, C) and cpu.can_update(rv, C))


def operands(
    x: Tensor,
    axis: int,
    *vectors: Tensor | None,
    running: tuple[Tensor | None, Tensor | None] | None = None,
    masked: bool = False,
) -> tuple[Tensor | None, ...] | None:
    """The per-channel vectors (then the running statistics, where `running` is given) as the
    operators take them for x, or None where the operators do not take the call (`applies`; with
    masked, also a layout whose order follows the mask's: `cpu.masked_layout`).

    bfloat16 and float16 vectors are cast to float32 first: inside a graph the cast is an op that
    autograd differentiates (a bfloat16 weight gets its gradient in bfloat16), and the caller
    copies new running statistics back into its buffers. float64 ones stay, and decline: a
    float32 update would lose their precision.
    """
    vectors = tuple(map(_float32, vectors))
    stats = (None, None) if running is None else (_float32(running[0]), _float32(running[1]))
    if not applies(x, axis, *vectors, running=stats):
        return None
    if masked and not cpu.masked_layout(x, axis, cpu._layout(x, axis)):
        return None
    return vectors if running is None else (*vectors, *stats)


def _float32(v: Tensor | None) -> Tensor | None:
    return v.float() if v is not None and v.dtype in (torch.bfloat16, torch.float16) else v


def _vector(x: Tensor, axis: int) -> Tensor:
    return x.new_empty(x.shape[axis], dtype=torch.float32)


# Functional (autograd formulas need that): the training operators update copies of the running
# statistics, which the caller copies into its buffers; empty when none were given. Returns the
# copies, and what the kernel call takes for them (the copies, or None and None).
def _new_running(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None):
    if running_mean is None:
        empty = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
        return *empty, (None, None)
    copies = running_mean.clone(), running_var.clone()
    return *copies, copies


def _fake_running(x: Tensor, running_mean: Tensor | None, axis: int) -> tuple[Tensor, Tensor]:
    n = 0 if running_mean is None else x.shape[axis]
    return x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def _counted(updated: bool | None) -> Tensor:
    """The operators' `counted`: False only for a non-finite batch (warned of here, at run time)."""
    if updated is False:
        warnings.warn(cpu.NOT_FINITE_MESSAGE, RuntimeWarning, stacklevel=3)
    return torch.tensor(updated is not False)


@torch.library.custom_op("batchnorm::cpu_train", mutates_args=(), device_types="cpu")
def cpu_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    momentum: float,
    axis: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    new_mean, new_var, fused = _new_running(x, running_mean, running_var)
    y, mean, _, invstd, updated = cpu.train_forward_update(x, weight, bias, eps, axis, *fused, momentum)
    return y, mean, invstd, new_mean, new_var, _counted(updated)


@cpu_train.register_fake
def _(x, weight, bias, running_mean, running_var, eps, momentum, axis):
    stats = _fake_running(x, running_mean, axis)
    return cpu._empty_like(x), _vector(x, axis), _vector(x, axis), *stats, x.new_empty((), dtype=torch.bool)


@torch.library.custom_op("batchnorm::cpu_backward", mutates_args=(), device_types="cpu")
def cpu_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, axis: int
) -> tuple[Tensor, Tensor, Tensor]:
    dx, s1, s2 = cpu.train_backward(dy, x, weight, mean, invstd, axis, True)
    return dx, s1, s2


@cpu_backward.register_fake
def _(dy, x, weight, mean, invstd, axis):
    return cpu._empty_like(x), _vector(x, axis), _vector(x, axis)


def wanted_grads(ctx, needs: tuple[bool, ...], dx: Tensor, dweight: Tensor, dbias: Tensor) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias), each None where autograd wants none (`needs`: x's, weight's, bias's
    entries of ctx.needs_input_grad) or the parameter is None (ctx.has_weight, ctx.has_bias, which
    the operator's setup stored): the autograd formulas' common tail."""
    need_x, need_w, need_b = needs
    return (
        dx if need_x else None,
        dweight if need_w and ctx.has_weight else None,
        dbias if need_b and ctx.has_bias else None,
    )


def _train_setup(ctx, inputs, output) -> None:
    x, weight, bias, _, _, _, _, axis = inputs
    mean, invstd = output[1], output[2]
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.axis, ctx.has_weight, ctx.has_bias = axis, weight is not None, bias is not None


def _train_backward(ctx, dy, *_):  # gradients of y only: the other outputs are statistics
    x, weight, mean, invstd = ctx.saved_tensors
    dx, s1, s2 = cpu_backward(dy, x, weight, mean, invstd, ctx.axis)
    return *wanted_grads(ctx, ctx.needs_input_grad[:3], dx, s2 * invstd, s1), None, None, None, None, None


cpu_train.register_autograd(_train_backward, setup_context=_train_setup)


@torch.library.custom_op("batchnorm::cpu_eval", mutates_args=(), device_types="cpu")
def cpu_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> Tensor:
    return cpu.eval_forward(x, mean, var, weight, bias, eps, axis)


@cpu_eval.register_fake
def _(x, mean, var, weight, bias, eps, axis):
    return cpu._empty_like(x)


@torch.library.custom_op("batchnorm::cpu_masked_train", mutates_args=(), device_types="cpu")
def cpu_masked_train(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return cpu.masked_forward(x, mask, weight, bias, eps, axis)


@cpu_masked_train.register_fake
def _(x, mask, weight, bias, eps, axis):
    return cpu._empty_like(x), _vector(x, axis), _vector(x, axis), _vector(x, axis)


@torch.library.custom_op("batchnorm::cpu_masked_backward", mutates_args=(), device_types="cpu")
def cpu_masked_backward(
    dy: Tensor, x: Tensor, mask: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, axis: int
) -> tuple[Tensor, Tensor, Tensor]:
    dx, s1, s2 = cpu.masked_backward(dy, x, mask, weight, mean, invstd, axis, True)
    return dx, s1, s2


@cpu_masked_backward.register_fake
def _(dy, x, mask, weight, mean, invstd, axis):
    return cpu._empty_like(x), _vector(x, axis), _vector(x, axis)


def _masked_setup(ctx, inputs, output) -> None:
    x, mask, weight, bias, _, axis = inputs
    ctx.save_for_backward(x, mask, weight, output[1], output[3])
    ctx.axis, ctx.has_weight, ctx.has_bias = axis, weight is not None, bias is not None


def _masked_backward(ctx, dy, *_):  # gradients of y only
    x, mask, weight, mean, invstd = ctx.saved_tensors
    dx, s1, s2 = cpu_masked_backward(dy, x, mask, weight, mean, invstd, ctx.axis)
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    dx, dw, db = wanted_grads(ctx, (need_x, need_w, need_b), dx, s2 * invstd, s1)
    return dx, None, dw, db, None, None


cpu_masked_train.register_autograd(_masked_backward, setup_context=_masked_setup)


@torch.library.custom_op("batchnorm::cpu_masked_eval", mutates_args=(), device_types="cpu")
def cpu_masked_eval(
    x: Tensor,
    mask: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    return cpu.masked_eval(x, mask, mean, var, weight, bias, eps, axis)


@cpu_masked_eval.register_fake
def _(x, mask, mean, var, weight, bias, eps, axis):
    return cpu._empty_like(x)


def _ghost_stats(x: Tensor, axis: int, k: int) -> Tensor:
    return x.new_empty((-(-x.shape[0] // k), x.shape[axis]), dtype=torch.float32)  # (G, C)


@torch.library.custom_op("batchnorm::cpu_ghost_train", mutates_args=(), device_types="cpu")
def cpu_ghost_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return cpu.ghost_forward(x, weight, bias, eps, axis, k)


@cpu_ghost_train.register_fake
def _(x, weight, bias, eps, axis, k):
    totals = (x.new_empty(x.shape[axis], dtype=torch.float64) for _ in range(2))
    return cpu._empty_like(x), _ghost_stats(x, axis, k), _ghost_stats(x, axis, k), *totals


@torch.library.custom_op("batchnorm::cpu_ghost_backward", mutates_args=(), device_types="cpu")
def cpu_ghost_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, axis: int, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    dx, s1, s2 = cpu.ghost_backward(dy, x, weight, mean, invstd, axis, k, True)
    return dx, s1, s2


@cpu_ghost_backward.register_fake
def _(dy, x, weight, mean, invstd, axis, k):
    return cpu._empty_like(x), _ghost_stats(x, axis, k), _ghost_stats(x, axis, k)


def _ghost_setup(ctx, inputs, output) -> None:
    x, weight, bias, _, axis, k = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])  # mean, invstd
    ctx.axis, ctx.k, ctx.has_weight, ctx.has_bias = axis, k, weight is not None, bias is not None


def _ghost_backward(ctx, dy, *_):  # gradients of y only; the parameters' add up over the ghost batches
    x, weight, mean, invstd = ctx.saved_tensors
    dx, s1, s2 = cpu_ghost_backward(dy, x, weight, mean, invstd, ctx.axis, ctx.k)
    return *wanted_grads(ctx, ctx.needs_input_grad[:3], dx, (s2 * invstd).sum(0), s1.sum(0)), None, None, None


cpu_ghost_train.register_autograd(_ghost_backward, setup_context=_ghost_setup)


@torch.library.custom_op("batchnorm::cpu_relu_train", mutates_args=(), device_types="cpu")
def cpu_relu_train(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    momentum: float,
    axis: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    new_mean, new_var, fused = _new_running(x, running_mean, running_var)
    y, mean, _, invstd, updated, gate = cpu.train_forward_relu(x, residual, weight, bias, eps, axis, *fused, momentum)
    return y, mean, invstd, gate, new_mean, new_var, _counted(updated)


@cpu_relu_train.register_fake
def _(x, residual, weight, bias, running_mean, running_var, eps, momentum, axis):
    stats = _fake_running(x, running_mean, axis)
    gate = x.new_empty((2, x.shape[axis]), dtype=torch.float32)
    return cpu._empty_like(x), _vector(x, axis), _vector(x, axis), gate, *stats, x.new_empty((), dtype=torch.bool)


@torch.library.custom_op("batchnorm::cpu_relu_backward", mutates_args=(), device_types="cpu")
def cpu_relu_backward(
    dy: Tensor,
    x: Tensor,
    y: Tensor | None,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    gate: Tensor,
    axis: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if y is None:
        dx, s1, s2 = cpu.train_backward(dy, x, weight, mean, invstd, axis, True, relu_gate=gate)
        return dx, s1, s2, x.new_empty(0)
    g = torch.ops.aten.threshold_backward.grad_input(dy, y, 0, grad_input=cpu._empty_like(x))
    dx, s1, s2 = cpu.train_backward(g, x, weight, mean, invstd, axis, True)
    return dx, s1, s2, g


@cpu_relu_backward.register_fake
def _(dy, x, y, weight, mean, invstd, gate, axis):
    g = x.new_empty(0) if y is None else cpu._empty_like(x)
    return cpu._empty_like(x), _vector(x, axis), _vector(x, axis), g


def _relu_setup(ctx, inputs, output) -> None:
    x, residual, weight, bias, _, _, _, _, axis = inputs
    y, mean, invstd, gate = output[:4]
    ctx.save_for_backward(x, y if residual is not None else None, weight, mean, invstd, gate)
    ctx.axis, ctx.has_weight, ctx.has_bias = axis, weight is not None, bias is not None


def _relu_backward(ctx, dy, *_):  # gradients of y only
    x, y, weight, mean, invstd, gate = ctx.saved_tensors
    dx, s1, s2, g = cpu_relu_backward(dy, x, y, weight, mean, invstd, gate, ctx.axis)
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    dx, dw, db = wanted_grads(ctx, (need_x, need_w, need_b), dx, s2 * invstd, s1)
    return dx, g if need_r and y is not None else None, dw, db, None, None, None, None, None


cpu_relu_train.register_autograd(_relu_backward, setup_context=_relu_setup)


@torch.library.custom_op("batchnorm::cpu_relu_eval", mutates_args=(), device_types="cpu")
def cpu_relu_eval(
    x: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    return cpu.eval_forward(x, mean, var, weight, bias, eps, axis, relu=True, residual=residual)


@cpu_relu_eval.register_fake
def _(x, residual, mean, var, weight, bias, eps, axis):
    return cpu._empty_like(x)
