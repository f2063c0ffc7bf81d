"""Exact population statistics for every BN layer: the paper's Algorithm 2, done exactly.

For each BN layer, over all values x of a channel that the layer sees while the
model runs over the data:

    E[x]   = mean of all values,      Var[x] = unbiased variance of all values

computed by merging each batch's (count, mean, M2) with Chan's formula
(`batchnorm.moments`), so uneven batches and the spread of the batch means are
accounted for. `torch.optim.swa_utils.update_bn` and fvcore's PreciseBN average
per-batch variances instead, which misses the variance of the batch means:
with batches that differ in mean their variance comes out too small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..moments import Moments, merge, merge_stacked
from ._common import batchnorm_layers, channel_axis, feed

__all__ = ["batch_moments", "population_statistics"]


def batch_moments(x: torch.Tensor, axis: int = 1) -> Moments:
    """(count, mean, M2) per channel of one batch, in float64, two-pass."""
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    x = x.detach().to(torch.float64)
    C = x.shape[axis]
    count = x.numel() // C if C else 0
    if count == 0:
        z = x.new_zeros(C)
        return Moments(z.clone(), z.clone(), z)
    mean = x.mean(dims)
    shape = [1] * x.dim()
    shape[axis] = C
    m2 = ((x - mean.view(shape)) ** 2).sum(dims)
    return Moments(torch.full_like(mean, float(count)), mean, m2)


def _all_ranks(mom: Moments, layer: nn.Module) -> Moments:
    """Merge the moments of every rank of the layer's process group (SyncBN under torch.distributed)."""
    import torch.distributed as dist

    from ..distributed import SyncBatchNorm

    synced = isinstance(layer, (nn.SyncBatchNorm, SyncBatchNorm))
    if not (synced and dist.is_available() and dist.is_initialized()):
        return mom
    group = getattr(layer, "process_group", None)
    world = dist.get_world_size(group)
    packed = torch.stack([mom.count, mom.mean, mom.m2])  # (3, C)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    stacked = torch.stack(gathered)  # (world, 3, C)
    return merge_stacked(stacked[:, 0], stacked[:, 1], stacked[:, 2])


def population_statistics(
    model: nn.Module,
    loader: Any,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    update: bool = True,
) -> dict[str, Moments]:
    """Recompute every BN layer's running_mean and running_var exactly over the data.

    The model runs over `loader` (at most `max_batches` batches) without
    gradients, with its BN layers in training mode so each normalizes with its
    batch's statistics, as during training (the convention of PreciseBN and
    update_bn); other modules keep their mode. Each BN layer's inputs are
    merged exactly; then running_mean = E[x] and running_var = Var[x]
    (unbiased), as PyTorch stores them. SyncBatchNorm layers (torch's or
    ours) under torch.distributed merge across the ranks of their process
    group, so every rank gets the statistics of all the data; every rank must
    then call this function, with its share of the data.

    Loader items may be tensors (the input), tuples/lists (first element is the
    input) or dicts (keyword arguments); `forward(model, item)` handles anything
    else. The model is left as found: training flags, momentum,
    num_batches_tracked and every other buffer; only running_mean and
    running_var change (nothing changes with update=False).

    Returns {layer name: Moments(count, mean, M2)} in float64; the unbiased
    variance is `.unbiased_var`. Raises ValueError for an empty loader or a
    model without BN layers that track running statistics.

    >>> stats = population_statistics(model, loader)          # doctest: +SKIP
    >>> stats["layer1.0.bn1"].count[0]                         # values per channel # doctest: +SKIP
    """
    layers = [
        (n, m) for n, m in batchnorm_layers(model) if m.track_running_stats and m.running_mean is not None
    ]
    if not layers:
        raise ValueError(
            "population_statistics found no BN layer with running statistics in the model "
            "(torch.nn.BatchNorm*, batchnorm.BatchNorm*, SyncBatchNorm with track_running_stats=True)"
        )

    totals: dict[str, Moments | None] = {n: None for n, _ in layers}
    saved = {
        n: (
            m.training,
            m.momentum,
            m.running_mean.clone(),
            m.running_var.clone(),
            None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
        )
        for n, m in layers
    }

    def hook_for(name: str, layer: nn.Module):
        def hook(_module, args):
            mom = batch_moments(args[0], channel_axis(layer))
            totals[name] = mom if totals[name] is None else merge(totals[name], mom)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in layers]
    try:
        for _, m in layers:
            m.train()
        batches = feed(model, loader, forward, max_batches, progress, "population statistics")
    finally:
        for h in handles:
            h.remove()
        for n, m in layers:  # restore everything the pass may have touched
            training, momentum, rm, rv, nbt = saved[n]
            m.train(training)
            m.momentum = momentum
            with torch.no_grad():
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)
    if batches == 0:
        raise ValueError("population_statistics got an empty loader: it yielded no batches")

    result: dict[str, Moments] = {}
    for n, m in layers:
        total = totals[n]
        if total is None:  # the layer was not reached by the forward pass
            continue
        total = _all_ranks(total, m)
        result[n] = total
        if update:
            with torch.no_grad():
                m.running_mean.copy_(total.mean.to(m.running_mean))
                m.running_var.copy_(total.unbiased_var.to(m.running_var))
    return result
