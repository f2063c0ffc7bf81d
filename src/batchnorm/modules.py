"""The layers: state and bookkeeping only; the math is `functional.batch_norm`.

`BatchNorm1d/2d/3d` subclass torch's classes, so `isinstance` holds, the
constructor, buffers, state_dict keys and `repr` are torch's, and checkpoints
load both ways. `BatchNorm` takes any rank and any channel axis.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import batch_norm_with_status

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _Forward:
    """torch's `_BatchNorm.forward`, routed through our functional core.

    Differences from torch, all on bad input: the checks run before any state
    changes, and a batch with non-finite statistics neither updates the
    running statistics nor counts in `num_batches_tracked`.

    A frozen layer (`frozen = True`, see `batchnorm.freeze_batchnorm`)
    normalizes with its running statistics in training too and never updates
    them: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,
    torchvision's FrozenBatchNorm2d for any rank. weight and bias train or
    not as their requires_grad says.
    """

    axis: int = 1
    frozen: bool = False

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.frozen:
            if self.running_mean is None or self.running_var is None:
                raise ValueError(
                    "a frozen BN layer normalizes with its running statistics, but this one has none "
                    "(track_running_stats=False); unfreeze it or build it with track_running_stats=True"
                )
            return batch_norm_with_status(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
                axis=self.axis,
            )[0]
        tracking = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if tracking and self.num_batches_tracked is not None and self.momentum is None:
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)  # cumulative average
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        y, counted = batch_norm_with_status(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
            axis=self.axis,
        )
        if tracking and counted and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", frozen=True" if self.frozen else "")


def _check_rank(input: Tensor, ranks: tuple[int, ...], layout: str) -> None:
    if input.dim() not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(
            f"expected {want} input {layout}, got {input.dim()}D input of shape {tuple(input.shape)}"
        )


class BatchNorm1d(_Forward, torch.nn.BatchNorm1d):
    r"""Drop-in `torch.nn.BatchNorm1d` on our core: (N, C) or (N, C, L) input.

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta, statistics per channel
    over N (and L). Same arguments, buffers and numbers as torch's layer.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        _check_rank(input, (2, 3), "(N, C) or (N, C, L)")


class BatchNorm2d(_Forward, torch.nn.BatchNorm2d):
    r"""Drop-in `torch.nn.BatchNorm2d` on our core: (N, C, H, W) input, any memory format.

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta, statistics per channel
    over N, H, W. channels_last input gives channels_last output.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        _check_rank(input, (4,), "(N, C, H, W)")


class BatchNorm3d(_Forward, torch.nn.BatchNorm3d):
    r"""Drop-in `torch.nn.BatchNorm3d` on our core: (N, C, D, H, W) input."""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_rank(input, (5,), "(N, C, D, H, W)")


class BatchNorm(_Forward, _BatchNorm):
    r"""Batch normalization for any rank and any channel axis.

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta, statistics per index
    of `axis` over every other axis. `axis=1` is torch's layout (N, C, *);
    `axis=-1` takes (N, L, C) sequences and channels-last data stored that
    way, with no transpose. Buffers and state_dict keys are those of
    torch's BatchNorm layers.

    >>> layer = BatchNorm(16, axis=-1)
    >>> layer(torch.randn(4, 10, 16)).shape
    torch.Size([4, 10, 16])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        axis: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.axis = axis

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2 or not -input.dim() <= self.axis < input.dim():
            raise ValueError(
                f"expected an input of at least 2 dimensions with channels on axis {self.axis}, "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )

    def extra_repr(self) -> str:
        frozen = ", frozen=True" if self.frozen else ""
        return _BatchNorm.extra_repr(self) + f", axis={self.axis}" + frozen
