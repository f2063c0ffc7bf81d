"""BN + ReLU and BN + residual add + ReLU in one layer: the tail of a ResNet block.

    y = relu(BN(x) + residual)        (residual optional)

On CUDA with Triton the training forward is one fused pass after the
statistics and the backward recomputes the ReLU mask from x and the saved
statistics instead of storing it (`kernels.triton_bn.train_forward_act`);
everywhere else, and with masks, ghost batches, renorm or SyncBN, it is the
composite relu(BN(x) + residual) with the same numbers. PyTorch eager has no
such fused layer (it never calls cuDNN's fused BN-add-activation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import _pick_path
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _Forward

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormActNd"]


class _FusedAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, axis, running_mean, running_var, momentum):
        from .kernels import triton_bn

        y, mean, invstd = triton_bn.train_forward_act(
            x, weight, bias, eps, axis, residual, "relu", running_mean, running_var, momentum
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd, residual)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import triton_bn

        x, weight, bias, mean, invstd, residual = ctx.saved_tensors
        dx, dw, db, dres = triton_bn.train_backward_act(
            dy, x, weight, bias, mean, invstd, ctx.axis, residual, ctx.needs_input_grad[0]
        )
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, dres if ctx.needs_input_grad[3] else None, None, None, None, None, None


class _ActMixin:
    """forward(x, residual=None, mask=None) = relu(BN(x) + residual)."""

    def forward(self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if residual is not None and residual.shape != input.shape:
            raise ValueError(f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        if self._fusable(input, mask):
            self._check_input_dim(input)
            factor = self.momentum
            if self.momentum is None:
                factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
            y = _FusedAct.apply(
                input, self.weight, self.bias, residual, self.eps, self.axis % input.dim(),
                self.running_mean, self.running_var, factor,
            )  # fmt: skip
            self.num_batches_tracked.add_(1)
            return y
        y = _Forward.forward(self, input, mask)
        if residual is not None:
            y = y + residual
        return torch.relu(y)

    def _fusable(self, input: Tensor, mask: Tensor | None) -> bool:
        plain = (
            self.training
            and self.track_running_stats
            and not self.frozen
            and mask is None
            and self.virtual_batch_size is None
            and self.renorm is None
            and self._sync_group(input) is None
        )
        return plain and input.is_cuda and _pick_path(input, self.axis % input.dim()) == "triton"


class BatchNormAct1d(_ActMixin, BatchNorm1d):
    """relu(BatchNorm1d(x) + residual); state, arguments and checkpoints of BatchNorm1d."""


class BatchNormAct2d(_ActMixin, BatchNorm2d):
    """relu(BatchNorm2d(x) + residual), the ResNet block tail; state and checkpoints of BatchNorm2d.

    >>> layer = BatchNormAct2d(8)
    >>> layer(torch.randn(4, 8, 5, 5), residual=torch.randn(4, 8, 5, 5)).min() >= 0
    tensor(True)
    """


class BatchNormAct3d(_ActMixin, BatchNorm3d):
    """relu(BatchNorm3d(x) + residual); state, arguments and checkpoints of BatchNorm3d."""


class BatchNormActNd(_ActMixin, BatchNorm):
    """relu(BatchNorm(x, axis=...) + residual) for any rank and channel axis."""
