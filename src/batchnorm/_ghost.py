"""Ghost batches on the CPU kernel: every ghost batch in one kernel call, as plain BN on its block of x.

With `virtual_batch_size=k`, samples [g*k, (g+1)*k) form ghost batch g (the last may be
smaller), normalized with its own statistics; the parameter gradients add up over the ghost
batches, and the running statistics follow the whole batch (Chan's merge of the ghost batches'
moments). Where axis 0 is outermost in memory (contiguous, channels_last, (N, L, C)), a ghost
batch is a dense block of x, so the CPU kernel takes it as it is: one call runs the ghost
batches one after the other, each as plain BN on its block of x and of the output (forward:
its statistics, then y; backward: its two sums, then dx). The general path (`_general.py`)
computes the same with torch ops, 2-8x slower (benchmarks/variants_speed.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import cpu
from .moments import Moments, merge_stacked

__all__ = ["applies", "ghost_train"]


def applies(x: Tensor, layout: tuple[int, int, int] | None) -> bool:
    """Whether the kernel takes x's ghost batches: it takes x (`layout`, from `cpu.layout`) and
    axis 0 is outermost in memory, so every slice along it is a dense block."""
    return layout is not None and x.dim() >= 2 and (x.shape[0] == 1 or x.stride(0) * x.shape[0] == x.numel())


class _GhostTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, k: int):
        y, mean, var, invstd = cpu.ghost_forward(x, weight, bias, eps, axis, k)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.axis, ctx.k = axis, k
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _mean: Tensor, _var: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True) is supported for plain batch_norm only, not with "
                "mask, virtual_batch_size, renorm or process_group"
            )
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, s1, s2 = cpu.ghost_backward(dy, x, weight, mean, invstd, ctx.axis, ctx.k, need_x)
        # over the ghost batches: dbias = sum(dy), dweight = sum(dy * x_hat), x_hat with each one's invstd
        dw = (s2 * invstd).sum(0).to(weight.dtype) if need_w and weight is not None else None
        db = s1.sum(0).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return dx, dw, db, None, None, None


def ghost_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int, k: int
) -> tuple[Tensor, Moments]:
    """Training-mode BN over ghost batches of k samples on the CPU kernel (check `applies` first).

    Returns y and the moments (count, mean, M2) of all values, float64 (C,), for the running
    statistics: the ghost batches' own, merged.
    """
    y, mean, var = _GhostTrain.apply(x, weight, bias, eps, axis, k)
    per = x.numel() // (x.shape[0] * x.shape[axis])  # values per (sample, channel)
    N = x.shape[0]
    count = torch.tensor([min(k, N - s) * per for s in range(0, N, k)], dtype=torch.float64)[:, None]
    mean, var = mean.double(), var.double()
    return y, merge_stacked(count, mean, var * count)
