"""SyncBatchNorm on every torch.distributed backend: gloo on the CPU as well as NCCL on GPUs.

Each process computes (count, mean, M2) per channel of its own batch; one
all_gather of the packed moments merges them with Chan's formula
(`batchnorm.moments`, never E[x^2] - E[x]^2 across ranks), so every process
normalizes with the statistics of the concatenated global batch and updates
identical running statistics. The backward all-reduces the two per-channel
sums it needs (sum g, sum g * x_hat) once. Input gradients are exactly those
of BN over the global batch; parameter gradients stay local, as in PyTorch
(DistributedDataParallel averages them). Uneven batches and processes with an
empty batch work; `process_group` restricts the synchronisation to a subgroup.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _recording
from .modules import BatchNorm, _retype, _variants_repr

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


_MISMATCH = "SyncBatchNorm: the processes disagree on the channel count"
_SAME_LAYER = "build the same layer and feed it inputs with num_features channels"


class SyncBatchNorm(BatchNorm):
    r"""Drop-in for `torch.nn.SyncBatchNorm` that works on any backend (gloo included) and device.

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta with E and Var over the
    batch concatenated across the processes of `process_group` (default: the
    whole world) in training; running statistics in eval. Without an
    initialized process group, or with one process, it is plain BN.

    Same constructor, buffers and state_dict keys as torch's; also
    `virtual_batch_size`, `renorm`, `axis` and `layer(x, mask=...)` as the
    other layers. It is deliberately not a subclass of torch.nn.SyncBatchNorm:
    DistributedDataParallel refuses those on the CPU ("SyncBatchNorm layers
    only work with GPU modules"). On the first synchronized forward the processes compare their
    channel counts, so a mismatched model gives a clear error on every rank
    instead of a hang (RuntimeError where that forward is compiled). Compiled,
    also with fullgraph=True, the collectives are part of the graphs.
    """

    _peers_checked: bool = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        **options,
    ) -> None:
        """torch.nn.SyncBatchNorm's arguments; `options` are BatchNorm's keywords (axis, bias, variants)."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.process_group = process_group

    def extra_repr(self) -> str:  # torch's SyncBatchNorm repr, plus what we add when it is set
        axis = f", axis={self.axis}" if self.axis != 1 else ""
        return _BatchNorm.extra_repr(self) + axis + _variants_repr(self)

    def _sync_group(self, input: Tensor):
        """The process group to synchronize over in this forward, or None for plain BN."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return None
        if not self._peers_checked:
            self._check_peers(input, group)
        return group

    def _check_peers(self, input: Tensor, group) -> None:
        """One small all_gather: every rank must bring the same channel count (and its input must match).

        Inside a graph torch.compile records, a runtime assert on the gathered table (RuntimeError,
        no per-rank detail: the graph has no Python values of it); the flag set afterwards makes
        the next call recompile once without the check.
        """
        channels = input.shape[self.axis % input.dim()] if input.dim() >= 2 else -1
        mine = torch.tensor([self.num_features, channels], dtype=torch.long, device=_device(self))
        world = dist.get_world_size(group)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        if _recording():
            table = torch.stack(parts)
            agree = (table == table[0]).all() & (table[:, 0] == table[:, 1]).all()
            detail = "num_features, or the input's channels"
            torch._assert_async(agree, f"{_MISMATCH} ({detail}); every process must {_SAME_LAYER}")
            self._peers_checked = True
            return
        table = torch.stack(parts).tolist()
        if any(row != table[0] or row[0] != row[1] for row in table):
            desc = ", ".join(
                f"rank {i}: num_features {f}, input channels {c}" for i, (f, c) in enumerate(table)
            )
            raise ValueError(f"{_MISMATCH} ({desc}); every process must {_SAME_LAYER}")
        self._peers_checked = True

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        return convert_sync_batchnorm(module, process_group)


def _device(layer: nn.Module) -> torch.device:
    for t in layer.buffers():
        return t.device
    # gloo needs CPU tensors; NCCL needs the current GPU
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BN layer (torch's, ours, torch's SyncBatchNorm) by `batchnorm.SyncBatchNorm`.

    Same API as torch.nn.SyncBatchNorm.convert_sync_batchnorm: recursive, in
    place on the children, returns the (possibly new) root. Every tensor,
    device, dtype, requires_grad and training flag is kept (the layers share
    the tensors), and our layers keep their axis and variants.
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = _retype(module, SyncBatchNorm)
        out.process_group = process_group
        out.__dict__.pop("_peers_checked", None)
        return out
    if isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        return module
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
