"""The layers: state and bookkeeping only; the math is `functional.batch_norm`.

`BatchNorm1d/2d/3d` subclass torch's classes, so `isinstance` holds, the
constructor, buffers, state_dict keys and `repr` are torch's, and checkpoints
load both ways. `BatchNorm` takes any rank and any channel axis.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _count_batch, _cumulative_factor, _reads_back_later, _recording, batch_norm_with_status
from .renorm import Renorm

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
    virtual_batch_size: int | None = None
    renorm: Renorm | None = None

    def __init__(self, *args, virtual_batch_size: int | None = None, renorm: Renorm | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
                raise TypeError(f"virtual_batch_size must be an int or None, got {virtual_batch_size!r}")
            if virtual_batch_size < 1:
                raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
            self.virtual_batch_size = virtual_batch_size
        if renorm is not None:
            if not isinstance(renorm, Renorm):
                raise TypeError(f"renorm must be a batchnorm.Renorm, got {type(renorm).__name__}")
            if not self.track_running_stats:
                raise ValueError(
                    "batch renormalization corrects batch statistics towards the running statistics: "
                    "it needs track_running_stats=True"
                )
            self.renorm = renorm

    def _sync_group(self, input: Tensor):
        """The process group to synchronize statistics over; None here, SyncBatchNorm overrides."""
        return None

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta; mask: True = real element (optional)."""
        self._check_input_dim(input)
        _check_num_features(self, input)
        # Each parameter and buffer is read once: nn.Module's attribute lookup costs ~0.3 us a time,
        # which on small tensors is a visible share of the call.
        running_mean, running_var, training = self.running_mean, self.running_var, self.training
        has_stats = running_mean is not None and running_var is not None
        if self.frozen or (not training and has_stats):
            # The running statistics normalize (eval mode, or a frozen layer in any mode).
            if not has_stats:
                raise ValueError(
                    "a frozen BN layer normalizes with its running statistics, but this one has none "
                    "(track_running_stats=False); unfreeze it or build it with track_running_stats=True"
                )
            w, b = self.weight, self.bias
            return batch_norm_with_status(
                input, running_mean, running_var, w, b, False, 0.0, self.eps, axis=self.axis, mask=mask
            )[0]
        tracked = self.num_batches_tracked
        tracking = training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        # While torch.compile / torch.export record, the step count stays a 0-dim tensor: a graph
        # has no Python number of a buffer (and a constant per step would recompile every step).
        # So on CUDA, where reading it back would make each step wait for the GPU.
        if tracking and tracked is not None and self.momentum is None:  # cumulative average
            factor = _cumulative_factor(tracked)
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch = training or (running_mean is None and running_var is None)
        keep = not training or self.track_running_stats
        renorm = None
        if use_batch and self.renorm is not None and tracking:
            step = 0 if tracked is None else tracked if _recording() or _reads_back_later(tracked) else int(tracked)
            renorm = self.renorm.limits(step)
        y, counted = batch_norm_with_status(
            input,
            running_mean if keep else None,
            running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
            axis=self.axis,
            mask=mask,
            # Ghost batches are a training device; inference (even on batch statistics) is plain BN.
            virtual_batch_size=self.virtual_batch_size if use_batch and training else None,
            renorm=renorm,
            process_group=self._sync_group(input) if use_batch else None,
        )
        if tracking and tracked is not None:
            _count_batch(tracked, counted)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + _variants_repr(self)


def _variants_repr(layer: _Forward) -> str:
    """What we add to torch's repr, only when set (so plain layers print exactly as torch's)."""
    parts = []
    if layer.virtual_batch_size is not None:
        parts.append(f"virtual_batch_size={layer.virtual_batch_size}")
    if layer.renorm is not None:
        parts.append(f"renorm={layer.renorm!r}")
    if layer.frozen:
        parts.append("frozen=True")
    return "".join(", " + p for p in parts)


def _retype(layer: torch.nn.Module, cls: type) -> torch.nn.Module:
    """The same layer state under another class: shares every tensor, copies the containers."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in layer.__dict__.items()})
    return new


def _check_num_features(layer: _BatchNorm, input: Tensor) -> None:
    """The channel axis must hold num_features values, with or without parameters.

    torch only notices a wrong channel count through the shape of weight or
    running_mean, and says so in their terms; we name the layer's contract.
    """
    axis = layer.axis % input.dim()
    if input.shape[axis] != layer.num_features:
        want = list(input.shape)
        want[axis] = layer.num_features
        raise ValueError(
            f"{type(layer).__name__}({layer.num_features}) expected input of shape {tuple(want)} "
            f"({layer.num_features} channels on axis {layer.axis}), got input of shape "
            f"{tuple(input.shape)} ({input.shape[axis]} channels). Check num_features, or the "
            "channel axis (axis=-1 for (N, L, C) data)"
        )


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
        virtual_batch_size: int | None = None,
        renorm: Renorm | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            virtual_batch_size=virtual_batch_size, renorm=renorm,
        )  # fmt: skip
        self.axis = axis

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2 or not -input.dim() <= self.axis < input.dim():
            raise ValueError(
                f"expected an input of at least 2 dimensions with channels on axis {self.axis}, "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )

    def extra_repr(self) -> str:
        return _BatchNorm.extra_repr(self) + f", axis={self.axis}" + _variants_repr(self)
