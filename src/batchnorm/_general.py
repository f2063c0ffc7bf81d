"""The general training path: ghost batches, masks, batch renormalization and SyncBN, composed.

One autograd Function covers every variant, because they differ only in
*which values share statistics* and in two per-group constants:

- ghost batches (`virtual_batch_size=k`): samples n of the batch axis fall in
  group g(n) = n // k; each group has its own mean and variance. The last group
  may be smaller than k.
- masks (`mask`, True = real element): sums and counts run over real elements
  only; padded positions output 0 and receive no gradient, whatever they hold
  (1e6, NaN).
- batch renormalization (`renorm=(r_max, d_max)`, Ioffe 2017): with
  sigma = sqrt(running_var + eps) and mu = running_mean,
      r = clip(sigma_B / sigma, 1/r_max, r_max),  d = clip((mu_B - mu) / sigma, -d_max, d_max)
      x_hat = (x - mu_B) / sigma_B * r + d
  r and d are constants for the gradient (stop_gradient in the paper).
- SyncBN (`process_group`): each process computes (count, mean, M2) of its
  values, one all_gather of the packed moments merges them with Chan's
  formula (`batchnorm.moments`), so every process normalizes with the
  statistics of the global batch; the backward all-reduces the two sums
  (sum g, sum g * x_hat) once. With ghost batches the groups stay local (each
  chunk is its own mini-batch) and only the running statistics are merged.

Per group g and channel c, with n_g real values, g_i = dy_i * gamma * r_g:

    y   = gamma * x_hat' + beta,          x_hat' = x_hat * r_g + d_g
    dx  = invstd_g / n_g * (n_g * g_i - sum_g(g) - x_hat_i * sum_g(g * x_hat))
    dgamma = sum(dy * x_hat'),   dbeta = sum(dy)      (local, as in PyTorch's SyncBN)

The running statistics are updated once per step from the moments of all
values (all groups, all processes) merged exactly: they estimate the data's
mean and variance, which is what inference uses, whatever k is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .moments import Moments, merge_stacked

__all__ = [
    "check_counts_no_single_value",
    "check_shapes_no_single_value",
    "gather_moments",
    "general_train",
    "no_double_backward",
]


def _bshape(x: Tensor, axis: int) -> list[int]:
    """Shape of a per-(sample, channel) tensor broadcasting against x: (N, 1.., C, 1..)."""
    shape = [1] * x.dim()
    shape[0] = x.shape[0]
    shape[axis] = x.shape[axis]
    return shape


@torch.library.custom_op("batchnorm::kept", mutates_args=())
def _kept(t: Tensor) -> Tensor:
    """A copy of t that a compiled graph saves for the backward rather than recomputes.

    r and d come from buffers the same graph updates afterwards (the running statistics, and
    num_batches_tracked through the renorm schedule). AOTAutograd's partitioner (torch 2.13) may
    recompute a saved value in the backward from the graph's inputs, and then reads the buffers
    after their update: silently wrong gradients (pytorch/pytorch PR 197039, open). It does not
    recompute a custom operator's output.
    """
    return t.clone()


@_kept.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def _group_sum(per_sample: Tensor, k: int | None) -> Tensor:
    """(N, C) -> (G, C): sums over the ghost batches, k consecutive samples each (the last may have
    fewer); k None: one group.

    A reshape, not index_add_ by group index: inductor (torch 2.13, CPU) miscompiled the
    index_add_ form for some shapes (N = 16, k = 8: outputs off by a factor of ~700 under
    torch.compile with weights that require grad); it also reads better.
    """
    N, C = per_sample.shape
    if k is None:
        return per_sample.sum(0, keepdim=True)
    full = N // k * k
    sums = per_sample[:full].reshape(N // k, k, C).sum(1)
    if full < N:
        sums = torch.cat([sums, per_sample[full:].sum(0, keepdim=True)])
    return sums


def gather_moments(mom: Moments, group) -> Moments:
    """Merge (count, mean, M2) of shape (G, C) across the processes of `group`: one all_gather."""
    world = dist.get_world_size(group)
    packed = torch.stack([mom.count, mom.mean, mom.m2])  # (3, G, C)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed.contiguous(), group=group)
    stacked = torch.stack(parts)  # (world, 3, G, C)
    return merge_stacked(stacked[:, 0], stacked[:, 1], stacked[:, 2])


def no_double_backward() -> None:
    """RuntimeError in a variant's backward asked for a graph (create_graph=True)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward (create_graph=True) is supported for plain batch_norm only, not with "
            "mask, virtual_batch_size, renorm or process_group"
        )


def check_shapes_no_single_value(N: int, k: int | None, per: int) -> None:
    """ValueError if a group of N samples in groups of k (None: one group), `per` values per sample
    and channel, has a single value per channel (variance 0). From the shapes alone: no value of a
    graph and no device sync."""
    smallest = N - (-(-N // k) - 1) * k if k is not None else N  # the last ghost batch is the smallest
    if smallest * per == 1:
        raise ValueError(_single_value_message(N, k))


def check_counts_no_single_value(count: Tensor, N: int, k: int | None) -> None:
    """The same test from the groups' counts (G, C), where a mask or other processes decide them;
    while torch.compile / torch.export record, a runtime assert in the graph (RuntimeError with
    the same message)."""
    from .functional import _recording  # (functional imports this module)

    if _recording():
        torch._assert_async((count != 1).all(), _single_value_message(N, k))
    elif bool((count == 1).any()):
        raise ValueError(_single_value_message(N, k))


def _single_value_message(N: int, k: int | None) -> str:
    if k is None:
        return "the batch has a single real value per channel in training; BN cannot normalize it"
    return (
        "a group of the batch has a single value per channel in training (with "
        f"virtual_batch_size={k}, the last chunk of a batch of {N} has {N % k or k} sample(s), "
        "or the mask leaves one real value): its variance is 0 and BN cannot normalize it. "
        "Choose virtual_batch_size dividing the batch, drop the ragged last batch, or use "
        "eval mode / GroupNorm"
    )


class _GeneralTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, axis, mask, k, renorm, running_mean, running_var, group):
        N, C = x.shape[0], x.shape[axis]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        spatial = [d for d in range(x.dim()) if d not in (0, axis)]
        bshape = _bshape(x, axis)
        xf = x.to(acc)
        per = x.numel() // max(N * C, 1)  # values per (sample, channel)

        if mask is not None:
            m = mask.unsqueeze(axis)  # (N, 1.., 1, 1..) broadcasting over channels
            xf = torch.where(m, xf, torch.zeros((), dtype=acc, device=x.device))
            cnt = m.to(acc).sum(spatial).reshape(N, 1) if spatial else m.to(acc).reshape(N, 1)
        else:
            m = None
            cnt = torch.full((N, 1), float(per), dtype=acc, device=x.device)

        chunk = k if N > 0 else None  # samples per ghost batch; None: one group
        gid = None if chunk is None else torch.arange(N, device=x.device) // chunk  # for gathers (G, C) -> (N, C)
        s1 = xf.sum(spatial) if spatial else xf  # (N, C)
        s1 = s1.reshape(N, C)
        count = _group_sum(cnt.expand(N, C), chunk)  # (G, C)
        sum1 = _group_sum(s1, chunk)
        mean = sum1 / (count + (count == 0))
        mean_n = mean[gid] if gid is not None else mean.expand(N, C)  # (N, C)
        dev = xf - mean_n.reshape(bshape)
        if m is not None:
            dev = torch.where(m, dev, torch.zeros((), dtype=acc, device=x.device))
        sq = (dev * dev).sum(spatial).reshape(N, C) if spatial else (dev * dev).reshape(N, C)
        m2 = _group_sum(sq, chunk)
        local = Moments(count, mean, m2)

        sync = group is not None
        if sync and k is None:
            norm = gather_moments(local, group)  # the global batch's statistics
            total = norm
        else:
            norm = local
            flat = merge_stacked(local.count, local.mean, local.m2)  # all chunks of this process
            total = (
                flat
                if not sync
                else gather_moments(Moments(flat.count[None], flat.mean[None], flat.m2[None]), group)
            )
            total = Moments(total.count.reshape(-1), total.mean.reshape(-1), total.m2.reshape(-1))
        if total.count.dim() == 2:
            total = Moments(total.count[0], total.mean[0], total.m2[0])

        # The counts follow from the shapes: each group local, or (SyncBN) this process's share
        # alone has 2 values per channel; else they are read (on CUDA a read waits for the GPU).
        if m is None and not (sync and k is None and N * per < 2):
            check_shapes_no_single_value(N, k, per)
        else:
            check_counts_no_single_value(norm.count, N, k)

        var = norm.biased_var
        invstd = torch.rsqrt(var + eps)  # (G, C)
        r = d = None
        if renorm is not None:
            r_max, d_max = renorm
            sigma = torch.sqrt(running_var.to(acc) + eps)
            r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((norm.mean - running_mean.to(acc)) / sigma).clamp(-d_max, d_max)
            if torch.compiler.is_compiling():
                r, d = _kept(r), _kept(d)
        w = weight.to(acc) if weight is not None else None
        scale = invstd if r is None else invstd * r  # x_hat' = (x - mean) * scale + d
        g_scale = scale if w is None else scale * w
        shift = -norm.mean * g_scale
        if d is not None:
            shift = shift + (d if w is None else d * w)
        if bias is not None:
            shift = shift + bias.to(acc)
        if gid is not None:
            g_scale_n, shift_n = g_scale[gid], shift[gid]
        else:
            g_scale_n, shift_n = g_scale.expand(N, C), shift.expand(N, C)
        y = torch.addcmul(shift_n.reshape(bshape), xf, g_scale_n.reshape(bshape))
        if m is not None:
            y = torch.where(m, y, torch.zeros((), dtype=acc, device=x.device))

        ctx.save_for_backward(
            xf,
            weight,
            norm.mean,
            invstd,
            r if r is not None else invstd,
            d if d is not None else invstd,
            mask,
            gid,
            norm.count,
        )
        ctx.has_renorm = r is not None
        ctx.axis, ctx.chunk, ctx.group, ctx.sync_groups = axis, chunk, group, sync and k is None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(total.count, total.mean, total.m2)
        return y.to(x.dtype), total.count, total.mean, total.m2

    @staticmethod
    def backward(ctx, dy, _c, _m, _m2):
        no_double_backward()
        xf, weight, mean, invstd, r, d, mask, gid, count = ctx.saved_tensors
        axis = ctx.axis
        N, C = xf.shape[0], xf.shape[axis]
        spatial = [dd for dd in range(xf.dim()) if dd not in (0, axis)]
        bshape = _bshape(xf, axis)
        acc = xf.dtype

        def per_group(v: Tensor) -> Tensor:  # (G, C) -> broadcast against x
            return (v[gid] if gid is not None else v.expand(N, C)).reshape(bshape)

        def sum_groups(t: Tensor) -> Tensor:  # x-shaped -> (G, C)
            s = t.sum(spatial) if spatial else t
            return _group_sum(s.reshape(N, C), ctx.chunk)

        g = dy.to(acc)
        m = mask.unsqueeze(axis) if mask is not None else None
        if m is not None:
            g = torch.where(m, g, torch.zeros((), dtype=acc, device=g.device))
        x_hat = (xf - per_group(mean)) * per_group(invstd)
        if m is not None:
            x_hat = torch.where(m, x_hat, torch.zeros((), dtype=acc, device=g.device))

        dbeta_g = sum_groups(g)  # (G, C) sum dy
        dxhat_g = sum_groups(g * x_hat)  # (G, C) sum dy * x_hat
        dw = db = None
        if weight is not None and ctx.needs_input_grad[1]:
            dgamma = dxhat_g * r + dbeta_g * d if ctx.has_renorm else dxhat_g
            dw = dgamma.sum(0).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dbeta_g.sum(0).to(ctx.bias_dtype)

        dx = None
        if ctx.needs_input_grad[0]:
            k = r if ctx.has_renorm else torch.ones_like(invstd)
            if weight is not None:
                k = k * weight.to(acc)
            a = dbeta_g * k  # sum g with g = dy * gamma * r
            b = dxhat_g * k  # sum g * x_hat
            if ctx.sync_groups:
                packed = torch.stack([a, b])
                dist.all_reduce(packed, group=ctx.group)
                a, b = packed[0], packed[1]
            n = count + (count == 0)
            coef = invstd / n
            dx = per_group(coef * n * k) * g - per_group(coef * a) - x_hat * per_group(coef * b)
            if m is not None:
                dx = torch.where(m, dx, torch.zeros((), dtype=acc, device=dx.device))
            dx = dx.to(ctx.x_dtype)
        return dx, dw, db, None, None, None, None, None, None, None, None


def general_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    mask: Tensor | None,
    virtual_batch_size: int | None,
    renorm: tuple[float, float] | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    process_group,
) -> tuple[Tensor, Moments]:
    """Training-mode BN with any combination of the variants; returns y and the moments of all values."""
    y, count, mean, m2 = _GeneralTrain.apply(
        x, weight, bias, eps, axis, mask, virtual_batch_size, renorm, running_mean, running_var, process_group
    )
    return y, Moments(count, mean, m2)
