"""Four variants on the CPU kernel: ghost batches, batch renormalization, masks and SyncBN.

Ghost batches (`virtual_batch_size=k`): samples [g*k, (g+1)*k) form ghost batch g (the last
may be smaller), normalized with its own statistics; the parameter gradients add up over the
ghost batches, and the running statistics follow the whole batch (Chan's merge of the ghost
batches' moments). Where axis 0 is outermost in memory (contiguous, channels_last, (N, L, C)),
a ghost batch is a dense block of x, so the CPU kernel takes it as it is: one call runs the ghost
batches one after the other, each as plain BN on its block of x and of the output (forward:
its statistics, then y; backward: its two sums, then dx).

Batch renormalization (`renorm=(r_max, d_max)`, Ioffe 2017): with sigma = sqrt(running_var +
eps), r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - running_mean) / sigma,
-d_max, d_max), constants for the gradient,

    y = w * (x_hat * r + d) + b = (w * r) * x_hat + (w * d + b),

plain BN with weight w*r and bias w*d + b once the batch's statistics are known: one kernel
call for the statistics (x read once; float64 mean and variance, as the forward centres with),
one apply pass (x read, y written): the three passes of plain BN's forward. The backward is
plain BN's with weight w*r: dx, and dw = r * sum(dy * x_hat) + d * sum(dy), db = sum(dy).

Masks (`mask`, x's shape without the channel axis): the kernel's masked entries run plain BN's
passes selecting on the mask's bytes: statistics and sums from the real values, 0 written at
the padding (whose values are never read). Over a contiguous x whose channels are not last
((N, C, L) with axis 1, (N, C, H, W)), each (sample, channel) plane holds real values and
padding at the same positions in every channel; where the channels are last ((N, L, C) with
axis=-1, channels_last, 2-D), a mask element is a whole row of C values, and padded rows are
skipped.

SyncBN (`process_group`): the kernel's statistics of the local batch, the general path's
all_gather of the packed moments (so the global batch's mean and variance), then one apply pass
with them (`cpu.apply`). The backward: the local sums from the kernel, the general path's
all_reduce of sum(g) and sum(g * x_hat) (g = dy * weight), then the dx pass with coefficients
from the global sums (`cpu.input_grad`). The collectives carry the same tensors (float32, the
same shapes and meaning) as the general path's, so a process whose batch the kernel does not
take (an empty one, another layout) still synchronizes with the others.

The general path (`_general.py`) computes all of them with torch ops, 2-8x slower
(benchmarks/variants_speed.py).

While torch.compile or torch.export record a call (`traced`), ghost batches, renorm and masks
run as the kernel's operators (`cpu_ops`, and `_cpu_renorm_train` here); SyncBN's collectives
take the general path there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._general import check_counts_no_single_value, check_shapes_no_single_value, gather_moments, no_double_backward
from .kernels import cpu, cpu_ops
from .moments import Moments

__all__ = ["ghost_applies", "ghost_train", "masked_train", "renorm_train", "sync_train"]


def ghost_applies(x: Tensor, layout: tuple[int, int, int] | None) -> bool:
    """Whether the kernel takes x's ghost batches: it takes x (`layout`, from `cpu.layout`) and
    axis 0 is outermost in memory, so every slice along it is a dense block."""
    return layout is not None and x.dim() >= 2 and (x.shape[0] == 1 or x.stride(0) * x.shape[0] == x.numel())


class _GhostTrain(torch.autograd.Function):  # y, and the whole batch's mean and M2, float64 (C,)
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, k: int):
        y, mean, invstd, total_mean, total_m2 = cpu.ghost_forward(x, weight, bias, eps, axis, k)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.k = k
        return _forward_done(ctx, axis, weight, bias, y, total_mean, total_m2)

    @staticmethod
    def backward(ctx, dy: Tensor, _mean: Tensor, _m2: Tensor):
        no_double_backward()
        x, weight, mean, invstd = ctx.saved_tensors
        dx, s1, s2 = cpu.ghost_backward(dy, x, weight, mean, invstd, ctx.axis, ctx.k, ctx.needs_input_grad[0])
        # over the ghost batches: dbias = sum(dy), dweight = sum(dy * x_hat), x_hat with each one's invstd
        return (*_gradients(ctx, dx, (s2 * invstd).sum(0), s1.sum(0)), None, None, None)


def ghost_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, k: int, traced: bool = False
) -> tuple[Tensor, Moments]:
    """Training-mode BN over ghost batches of k samples on the CPU kernel (check `ghost_applies` first).

    Returns y and the moments (count, mean, M2) of all values, float64 (C,), for the running
    statistics: the ghost batches' own, merged (by the kernel). traced: torch.compile or
    torch.export records the call (check `cpu_ops.operands` too): the kernel's operators.
    """
    N = x.shape[0]
    per = x.numel() // (N * x.shape[axis])  # values per (sample, channel)
    check_shapes_no_single_value(N, k, per)
    if traced:
        y, _, _, mean, m2 = torch.ops.batchnorm.cpu_ghost_train(x, weight, bias, eps, axis, k)
    else:
        y, mean, m2 = _GhostTrain.apply(x, weight, bias, eps, axis, k)
    return y, Moments(torch.tensor([N * per], dtype=torch.float64), mean, m2)


def _renorm_forward(x, weight, bias, eps: float, axis: int, running_mean, running_var, r_max, d_max):
    """y, the batch's float64 mean and var, and what the backward takes: float32 (C,) scale = w * r
    (plain BN's weight there), mean, invstd, r and d. r_max, d_max: floats or 0-dim tensors."""
    mean, _, invstd, mean64, var64 = cpu.statistics(x, eps, axis)
    scale, r, d, *coefficients = cpu.renorm_coefficients(
        mean64, var64, running_mean, running_var, weight, bias, eps, float(r_max), float(d_max)
    )
    return cpu.apply(x, *coefficients, axis), mean64, var64, scale, mean, invstd, r, d


def _renorm_param_grads(s1: Tensor, s2: Tensor, invstd: Tensor, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """(dweight, dbias) from plain BN's backward sums s1 = sum(dy), s2 = sum(dy * (x - mean))."""
    return r * s2 * invstd + d * s1, s1


class _RenormTrain(torch.autograd.Function):  # y, and the batch's mean and var, float64
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, axis: int, running_mean, running_var, r_max: float, d_max: float):
        y, mean64, var64, *saved = _renorm_forward(x, weight, bias, eps, axis, running_mean, running_var, r_max, d_max)
        ctx.save_for_backward(x, *saved)
        return _forward_done(ctx, axis, weight, bias, y, mean64, var64)

    @staticmethod
    def backward(ctx, dy: Tensor, _mean: Tensor, _var: Tensor):
        no_double_backward()
        x, scale, mean, invstd, r, d = ctx.saved_tensors
        dx, s1, s2 = cpu.train_backward(dy, x, scale, mean, invstd, ctx.axis, ctx.needs_input_grad[0])
        return (*_gradients(ctx, dx, *_renorm_param_grads(s1, s2, invstd, r, d)), None, None, None, None, None, None)


@torch.library.custom_op("batchnorm::cpu_renorm_train", mutates_args=(), device_types="cpu")
def _cpu_renorm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: Tensor,
    d_max: Tensor,
    eps: float,
    axis: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch renormalization's forward as an operator, for graphs torch.compile or torch.export
    record: `_renorm_forward`'s outputs, y and the float64 (C,) mean and var first. Its r and d,
    computed inside from the running statistics, are outputs the graph saves: never recomputed
    after the same graph updated those buffers (see `_general._kept`)."""
    return _renorm_forward(x, weight, bias, eps, axis, running_mean, running_var, r_max, d_max)


@_cpu_renorm_train.register_fake
def _(x, weight, bias, running_mean, running_var, r_max, d_max, eps, axis):
    C = x.shape[axis]
    f64 = (x.new_empty(C, dtype=torch.float64) for _ in range(2))
    return cpu._empty_like(x), *f64, *(x.new_empty(C, dtype=torch.float32) for _ in range(5))


def _renorm_op_setup(ctx, inputs, output) -> None:
    x, weight, bias, _, _, _, _, _, axis = inputs
    ctx.save_for_backward(x, *output[3:])  # scale, mean, invstd, r, d
    ctx.axis, ctx.has_weight, ctx.has_bias = axis, weight is not None, bias is not None


def _renorm_op_backward(ctx, dy, *_):  # gradients of y only: the other outputs are statistics
    x, scale, mean, invstd, r, d = ctx.saved_tensors
    dx, s1, s2 = torch.ops.batchnorm.cpu_backward(dy, x, scale, mean, invstd, ctx.axis)
    grads = cpu_ops.wanted_grads(ctx, ctx.needs_input_grad[:3], dx, *_renorm_param_grads(s1, s2, invstd, r, d))
    return *grads, None, None, None, None, None, None


_cpu_renorm_train.register_autograd(_renorm_op_backward, setup_context=_renorm_op_setup)


def renorm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    running_mean: Tensor,
    running_var: Tensor,
    renorm: tuple[float, float] | tuple[Tensor, Tensor],
    traced: bool = False,
) -> tuple[Tensor, Moments]:
    """Training-mode batch renormalization on the CPU kernel (x in a layout `cpu.layout` takes).

    Returns y and the moments (count, mean, M2) of the batch, float64, for the running
    statistics (which r and d read before they are updated). traced: torch.compile or
    torch.export records the call (check `cpu_ops.operands` too): its operator, and `renorm` may
    be 0-dim tensors (a layer's schedule).
    """
    m = x.numel() // x.shape[axis]  # values per channel
    check_shapes_no_single_value(m, None, 1)
    if traced:
        limits = (torch.as_tensor(v, dtype=torch.float64) for v in renorm)
        y, mean, var, *_ = _cpu_renorm_train(x, weight, bias, running_mean, running_var, *limits, eps, axis)
    else:
        y, mean, var = _RenormTrain.apply(x, weight, bias, eps, axis, running_mean, running_var, *renorm)
    count = torch.tensor([m], dtype=torch.float64)
    return y, Moments(count, mean, var * count)


class _MaskedTrain(torch.autograd.Function):  # y, and the real values' mean and var
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, mask: Tensor):
        y, mean, var, invstd = cpu.masked_forward(x, mask, weight, bias, eps, axis)
        ctx.save_for_backward(x, mask, weight, mean, invstd)
        return _forward_done(ctx, axis, weight, bias, y, mean, var)

    @staticmethod
    def backward(ctx, dy: Tensor, _mean: Tensor, _var: Tensor):
        no_double_backward()
        x, mask, weight, mean, invstd = ctx.saved_tensors
        dx, s1, s2 = cpu.masked_backward(dy, x, mask, weight, mean, invstd, ctx.axis, ctx.needs_input_grad[0])
        return (*_gradients(ctx, dx, s2 * invstd, s1), None, None, None)


def masked_train(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, traced: bool = False
) -> tuple[Tensor, Moments]:
    """Training-mode BN over the real values of x on the CPU kernel (check `cpu.masked_layout`
    first; mask: bool, x's shape without the channel axis, checked by the caller).

    Returns y (0 at the padding) and the moments (count, mean, M2) of the real values, float64,
    for the running statistics. traced: torch.compile or torch.export records the call (check
    `cpu_ops.operands` with masked): the kernel's operators, and the count a value of the graph, its
    single-value test a runtime assert.
    """
    if traced:
        count = mask.sum(dtype=torch.float64).reshape(1)
        check_counts_no_single_value(count, x.shape[0], None)
        y, mean, var, _ = torch.ops.batchnorm.cpu_masked_train(x, mask, weight, bias, eps, axis)
    else:
        m = int(mask.sum())  # real values per channel
        check_shapes_no_single_value(m, None, 1)
        y, mean, var = _MaskedTrain.apply(x, weight, bias, eps, axis, mask)
        count = torch.tensor([m], dtype=torch.float64)
    return y, Moments(count, mean.double(), var.double() * count)


class _SyncTrain(torch.autograd.Function):  # y, and the global batch's (count, mean, M2), float32 (C,)
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, group):
        C = x.shape[axis]
        mean, var, _, _, _ = cpu.statistics(x, eps, axis)
        count = torch.full((1, C), float(x.numel() // C))  # (1, C) float32: the general path's packing
        total = gather_moments(Moments(count, mean[None], var[None] * count), group)
        check_counts_no_single_value(total.count, x.shape[0], None)
        mean_g = total.mean[0].double()
        invstd = torch.rsqrt(total.biased_var[0].double() + eps)
        scale = invstd if weight is None else invstd * weight.double()
        shift = torch.zeros_like(scale) if bias is None else bias.double()
        y = cpu.apply(x, *cpu.centred(mean_g, scale, shift), axis)
        ctx.save_for_backward(x, weight, mean_g.float(), invstd.float(), total.count[0])
        ctx.group = group
        return _forward_done(ctx, axis, weight, bias, y, total.count[0], total.mean[0], total.m2[0])

    @staticmethod
    def backward(ctx, dy: Tensor, _count: Tensor, _mean: Tensor, _m2: Tensor):
        no_double_backward()
        x, weight, mean, invstd, n = ctx.saved_tensors
        dy = cpu.in_layout_of(dy, x)  # (copied once, if at all, for both passes)
        _, s1, s2 = cpu.train_backward(dy, x, None, mean, invstd, ctx.axis, False)  # local: sum dy, sum dy*(x-mean)
        dx = None
        if ctx.needs_input_grad[0]:  # (the general path all-reduces only then too)
            w = 1.0 if weight is None else weight.float()
            g_sums = torch.stack([s1, s2 * invstd]) * w
            dist.all_reduce(g_sums[:, None], group=ctx.group)  # sum(g), sum(g * x_hat) of the global batch
            n = n + (n == 0)  # dx = k * dy + b * (x - mean) + c:
            k, b, c = invstd * w, -invstd * invstd * g_sums[1] / n, -invstd * g_sums[0] / n
            dx = cpu.input_grad(dy, x, mean, k, b, c, ctx.axis)
        return (*_gradients(ctx, dx, s2 * invstd, s1), None, None, None)  # parameter gradients stay local


def sync_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, group
) -> tuple[Tensor, Moments]:
    """Training-mode SyncBN on the CPU kernel (x in a layout `cpu.layout` takes, with elements):
    y normalized with the statistics of the batch concatenated over `group`'s processes, and
    their moments (count, mean, M2) for the running statistics."""
    y, count, mean, m2 = _SyncTrain.apply(x, weight, bias, eps, axis, group)
    return y, Moments(count, mean, m2)


def _forward_done(ctx, axis: int, weight: Tensor | None, bias: Tensor | None, y: Tensor, *stats: Tensor):
    """The bookkeeping the Functions share: the axis, the parameters' dtypes; the statistics they
    return beside y need no gradient."""
    ctx.axis = axis
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(*stats)
    return y, *stats


def _gradients(ctx, dx: Tensor | None, dw: Tensor, db: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias), the latter two float32 (C,) in their parameters' dtypes where wanted."""
    need_w, need_b = ctx.needs_input_grad[1:3]
    return (
        dx,
        dw.to(ctx.weight_dtype) if need_w and ctx.weight_dtype is not None else None,
        db.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None,
    )
