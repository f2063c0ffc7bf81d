"""Batch normalization in Triton for CUDA (and on the CPU through TRITON_INTERPRET=1, for tests).

Per channel c over the m = numel / C values of every other axis (as `batchnorm.functional`):

    training forward    mean_c = 1/m sum x,  var_c = 1/m sum (x - mean_c)**2   (biased),
                        invstd_c = (var_c + eps)**-1/2
                        y = x * scale_c + shift_c,  scale_c = w_c * invstd_c,  shift_c = b_c - mean_c * scale_c
                        running_mean = (1 - momentum) * running_mean + momentum * mean_c
                        running_var  = (1 - momentum) * running_var  + momentum * m / (m - 1) * var_c
    training backward   s1_c = sum dy,  s2_c = sum dy * (x - mean_c),  dbias = s1,  dweight = s2 * invstd
                        dx = k*dy + b*(x - mean_c) + c,  k = w_c*invstd_c,  b = -k*invstd_c**2*s2_c/m,
                                                        c = -k*s1_c/m
                        (functional.py's k*dy + b*x + c' with c' = c - b*mean, kept centred so that
                        float32 keeps its precision when the data have a large offset)
    inference           y = x * scale_c + shift_c
    fused tail          y = relu(x * scale_c + shift_c [+ residual])  (the ResNet block's BN, add, ReLU);
                        its backward recomputes the ReLU mask from x, the saved statistics and the
                        residual instead of storing it.

Kernels (grid axis 0 is the long one; axis 1 walks channel blocks):

    _stats_kernel       grid (S, C-blocks). A split reduction over the N*H*W axis whatever C is:
                        program (s, cb) takes the s-th of S equal runs of tiles of its channel block,
                        reduces each tile in two passes (tile mean, then squared deviations from it)
                        and merges tiles with Chan's formula into float32 (count, mean, M2) partials.
    _stats_merge_kernel grid (C-blocks). Merges the S partials (Chan), then in its epilogue writes mean
                        and invstd and updates the running statistics in place (the fused update).
    _apply_kernel       grid (tiles, C-blocks). y = x*scale + shift [+ residual] [relu], scale and shift
                        given, or from mean and invstd (training) or the running var (eval).
    _grad_reduce_kernel grid (S, C-blocks). Partial s1, s2 (float32 tile accumulators), recomputing the
                        ReLU mask for the fused variant (and writing dresidual = dy * mask there).
    _grad_merge_kernel  grid (C-blocks). Sums the partials; dweight, dbias and the dx coefficients.
    _dx_kernel          grid (tiles, C-blocks). dx = k*dy + b*(x - mean) + c.
    _channel_forward_kernel, _channel_backward_kernel
                        grid (C-blocks). The whole-channel path: one program per channel block does
                        a direction's three steps over all its tiles (statistics, epilogue, apply;
                        s1 and s2, coefficients, dx), one launch instead of three, no partials. Taken
                        where the split reduction would give each channel block one split anyway,
                        or a block has few tiles (`_whole_channels`; `path_override` forces a path).
    _running_kernel     grid (1,). The layers' running-statistics rule (`update_running`): every
                        channel or none, the outcome a flag on the device.

Layout: every tensor is handled as a dense (A, C, B) block read in memory order, element (a, c, b)
at a*C*B + c*B + b: NCHW is (N, C, H*W), channels_last / channels_last_3d / (N, L, C) with axis=-1
are (N*H*W, C, 1), 2-D (N, C) is (N, C, 1). A tile is BLOCK_A x BLOCK_C x BLOCK_B; for B > 1 it runs
along b (contiguous H*W runs), for B == 1 along c (contiguous channel rows). No permute copies:
outputs get x's strides. `supports(x, axis)` says whether x is such a block.

Numerics: float32 accumulation for float16/bfloat16/float32 inputs; tile statistics in two passes
and Chan merges across tiles, splits and blocks of splits: never E[x^2] - E[x]^2. The statistics
are those of x - x[0, c, 0] (a per-channel pivot every program reads), so means and Chan's deltas
stay of the data's spread, not its offset, and float32 keeps the variance of 1e4 + N(0, 1) data.
Parameters and running statistics may be any float dtype (read as float32, running statistics
written back in their own dtype); mean, invstd and the parameter gradients come back as float32 (C,).

Non-finite batches: a channel whose batch mean or variance is not finite keeps its running
statistics (checked per channel, in the kernel). `functional.batch_norm` skips the whole update
with a warning instead; a caller that wants that exactly passes running_mean=None and calls
`update_running` with the mean and var (`return_var=True`): one launch, nothing read back.

Triton is imported lazily: importing this module never imports triton. The first `available()`,
`supports()` or kernel call imports it and compiles the module's kernel functions with
`triton.jit` (rebinding their module-level names), in interpreter mode if TRITON_INTERPRET=1 is set
at that moment (then the kernels take CPU tensors). Block sizes come from a heuristic
(`_tile_shape`); BATCHNORM_TRITON_AUTOTUNE=1 autotunes the tile of the four streaming kernels per
(A, C, B) instead (a few seconds per new shape on a GPU). Notes: benchmarks/triton_notes.md.

>>> import torch
>>> from batchnorm.kernels import triton_bn
>>> x = torch.randn(8, 3, 5, 5, device="cuda" if torch.cuda.is_available() else "cpu")
>>> if triton_bn.supports(x, axis=1):
...     y, mean, invstd = triton_bn.train_forward(x, None, None, 1e-5, axis=1)
...     assert torch.allclose(mean, x.mean((0, 2, 3)), atol=1e-5)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Tuning",
    "available",
    "eval_forward",
    "inference",
    "supports",
    "train_backward",
    "train_backward_act",
    "train_forward",
    "train_forward_act",
    "update_running",
    "why_unavailable",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTS = ("relu",)


def _check_act(act: str | None) -> None:
    if act not in (*_ACTS, None):
        raise ValueError(f"act must be one of {_ACTS} or None, got {act!r}")


# Bound by _load() on first use; the kernel functions below are plain Python until then.
triton: Any = None
tl: Any = None

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "loaded", "interpret", "why", "autotuned"


# =========================================================================== kernels
#
# Plain functions in Triton's language. _load() replaces each name listed in _JIT with
# triton.jit(function), so the kernels find their helpers (and `tl`) as module globals.


def _tile_offsets(ia, ib, c, A, C, B, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr):
    """Offsets and mask of tile (ia, ib) of the (A, C, B) block for channels c: shape (BLOCK_A, BLOCK_C, BLOCK_B)."""
    a = ia * BLOCK_A + tl.arange(0, BLOCK_A)
    b = ib * BLOCK_B + tl.arange(0, BLOCK_B)
    if INT64:  # numel >= 2**31: a*C*B would overflow int32
        a_ = a.to(tl.int64)
        c_ = c.to(tl.int64)
    else:
        a_ = a
        c_ = c
    offs = a_[:, None, None] * C * B + c_[None, :, None] * B + b[None, None, :]
    mask = (a < A)[:, None, None] & (c < C)[None, :, None] & (b < B)[None, None, :]
    return offs, mask


def _pivot(x_ptr, c, cmask, B, INT64: tl.constexpr):
    """x[0, c, 0] as float32: the per-channel shift of the statistics (the same in every program)."""
    if INT64:
        p = tl.load(x_ptr + c.to(tl.int64) * B, mask=cmask, other=0.0)
    else:
        p = tl.load(x_ptr + c * B, mask=cmask, other=0.0)
    return p.to(tl.float32)


def _reduce_ab(t):
    """(BLOCK_A, BLOCK_C, BLOCK_B) -> (BLOCK_C,): the sum over the reduced axes."""
    return tl.sum(tl.sum(t, axis=2), axis=0)


def _scale_shift(mean, invstd, w_ptr, b_ptr, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """scale = w * invstd, shift = b - mean * scale, in float32, in the order functional.py uses.

    Forward apply and the fused backward both call this, so the recomputed ReLU mask sees the
    very pre-activation values the forward produced.
    """
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return scale, shift


def _tiles_moments(x_ptr, c, pivot, A, C, B, start, end, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_B: tl.constexpr, INT64: tl.constexpr):  # fmt: skip
    """(count, mean - pivot, M2) of tiles [start, end) of channels c, float32 (BLOCK_C,) each: every
    tile in two passes (its mean, then squared deviations from it), merged with Chan's formula."""
    nb = tl.cdiv(B, BLOCK_B)
    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(start, end):
        ia = t // nb
        ib = t - ia * nb
        offs, mask = _tile_offsets(ia, ib, c, A, C, B, BLOCK_A, BLOCK_B, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(mask, x - pivot[None, :, None], 0.0)
        n_t = (tl.minimum(A - ia * BLOCK_A, BLOCK_A) * tl.minimum(B - ib * BLOCK_B, BLOCK_B)).to(tl.float32)
        mean_t = _reduce_ab(xs) / n_t  # pass 1: the tile's mean
        d = tl.where(mask, xs - mean_t[None, :, None], 0.0)
        m2_t = _reduce_ab(d * d)  # pass 2: squared deviations from it
        n = acc_n + n_t  # Chan: merge (n_t, mean_t, m2_t) into the accumulator
        delta = mean_t - acc_mean
        frac = n_t / n
        acc_mean += delta * frac
        acc_m2 += m2_t + delta * delta * acc_n * frac
        acc_n = n
    return acc_n, acc_mean, acc_m2


def _finish_stats(
    pivot, acc_mean, acc_m2, c, cmask,
    mean_ptr, invstd_ptr, var_ptr, rmean_ptr, rvar_ptr,
    m, eps, momentum, unbias, HAS_RUNNING: tl.constexpr,
):  # fmt: skip
    """The statistics' epilogue: mean, invstd and the biased var stored (and returned: mean, invstd),
    the running statistics updated in place per channel where finite (HAS_RUNNING)."""
    mean = pivot + acc_mean
    var = acc_m2 / m  # biased: normalizes
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, invstd, mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    if HAS_RUNNING:
        big = 3.4028234663852886e38  # float32 max: |v| <= big is False for inf and NaN
        ok = cmask & (tl.abs(mean) <= big) & (var <= big)
        rm = tl.load(rmean_ptr + c, mask=ok, other=0.0)
        rv = tl.load(rvar_ptr + c, mask=ok, other=0.0)
        new_rm = rm.to(tl.float32) * (1.0 - momentum) + momentum * mean
        new_rv = rv.to(tl.float32) * (1.0 - momentum) + momentum * (var * unbias)  # unbiased is stored
        tl.store(rmean_ptr + c, new_rm.to(rm.dtype), mask=ok)
        tl.store(rvar_ptr + c, new_rv.to(rv.dtype), mask=ok)
    return mean, invstd


def _saved_stats(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The backward's per-channel inputs as float32: (mean, invstd, scale, shift), scale and shift
    those of the forward's apply pass (`_scale_shift`), for the ReLU mask's recomputation."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    scale, shift = _scale_shift(mean, invstd, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    return mean, invstd, scale, shift


def _stats_kernel(
    x_ptr, cnt_ptr, mean_ptr, m2_ptr,  # x (A, C, B); partials (S, C) float32 each
    A, C, B, S,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """Partial (count, mean - pivot, M2) of split s for channel block cb (two-pass tiles, Chan across tiles).

    Statistics are taken of x - pivot (pivot = x[0, c, 0]), so tile means and the deltas of Chan's
    merges are numbers of the data's spread, not of its offset: float32 keeps the variance's
    digits for data such as 1e4 + N(0, 1), where the deltas between tile means of ~1e4 would not.
    """
    s = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    pivot = _pivot(x_ptr, c, cmask, B, INT64)
    nb = tl.cdiv(B, BLOCK_B)
    n_tiles = tl.cdiv(A, BLOCK_A) * nb
    per = tl.cdiv(n_tiles, S)
    start = s * per
    end = tl.minimum(start + per, n_tiles)
    acc_n, acc_mean, acc_m2 = _tiles_moments(x_ptr, c, pivot, A, C, B, start, end, BLOCK_A, BLOCK_C, BLOCK_B, INT64)
    out = s * C + c
    tl.store(cnt_ptr + out, acc_n, mask=cmask)
    tl.store(mean_ptr + out, acc_mean, mask=cmask)
    tl.store(m2_ptr + out, acc_m2, mask=cmask)


def _stats_merge_kernel(
    x_ptr,  # for the pivot x[0, c, 0]
    cnt_ptr, pmean_ptr, pm2_ptr,  # partials (S, C)
    mean_ptr, invstd_ptr, var_ptr,  # outputs (C,) float32
    rmean_ptr, rvar_ptr,  # running statistics (C,), updated in place if HAS_RUNNING
    S, C, B, m, eps, momentum, unbias,  # m: values per channel (float); unbias = m / (m - 1)
    HAS_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """Chan merge of the S partials; epilogue: mean, invstd, the biased var and the running-statistics update."""
    cb = tl.program_id(0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = s[:, None] * C + c[None, :]
        n = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
        mu = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        m2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        # A block of partials at once: exact two-pass over them (empty splits have n = 0) ...
        n_b = tl.sum(n, axis=0)
        mean_b = tl.sum(n * mu, axis=0) / tl.maximum(n_b, 1.0)
        dev = mu - mean_b[None, :]
        m2_b = tl.sum(m2 + n * dev * dev, axis=0)
        # ... then Chan's formula into the accumulator.
        tot = acc_n + n_b
        delta = mean_b - acc_mean
        frac = n_b / tl.maximum(tot, 1.0)
        acc_mean += delta * frac
        acc_m2 += m2_b + delta * delta * acc_n * frac
        acc_n = tot
    _finish_stats(
        _pivot(x_ptr, c, cmask, B, INT64), acc_mean, acc_m2, c, cmask,
        mean_ptr, invstd_ptr, var_ptr, rmean_ptr, rvar_ptr, m, eps, momentum, unbias, HAS_RUNNING,
    )  # fmt: skip


def _apply_tile(
    x_ptr, y_ptr, r_ptr, ia, ib, c, scale, shift, A, C, B,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """y = x * scale + shift [+ residual] [relu] on tile (ia, ib) of channels c."""
    offs, mask = _tile_offsets(ia, ib, c, A, C, B, BLOCK_A, BLOCK_B, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * scale[None, :, None] + shift[None, :, None]
    if HAS_RES:
        y = y + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y <= 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _apply_kernel(
    x_ptr, y_ptr, r_ptr,  # x, y, residual: (A, C, B) in one layout
    p0_ptr, p1_ptr,  # (C,): COEFS 0: scale, shift; 1: mean, invstd; 2: mean, var (running statistics)
    w_ptr, b_ptr,
    A, C, B, eps,
    COEFS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """y = x * scale + shift [+ residual] [relu] for one tile: one read (two with residual), one write.

    scale and shift as given (COEFS 0), or from the statistics (`_scale_shift`) with invstd given
    (1: the training forward) or (var + eps)**-1/2 of the running variance (2: eval)."""
    t = tl.program_id(0)
    cb = tl.program_id(1)
    nb = tl.cdiv(B, BLOCK_B)
    ia = t // nb
    ib = t - ia * nb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    p0 = tl.load(p0_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    p1 = tl.load(p1_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if COEFS == 0:
        scale = p0
        shift = p1
    else:
        invstd = p1 if COEFS == 1 else 1.0 / tl.sqrt(p1 + eps)
        scale, shift = _scale_shift(p0, invstd, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    _apply_tile(x_ptr, y_ptr, r_ptr, ia, ib, c, scale, shift, A, C, B, HAS_RES, RELU, BLOCK_A, BLOCK_B, INT64)


def _gated_grad(dy_ptr, x_ptr, r_ptr, offs, mask, scale, shift, RELU: tl.constexpr, HAS_RES: tl.constexpr):
    """(g, x) of a tile as float32: g = dy, or with RELU dy where x * scale + shift [+ residual] > 0
    (the forward's pre-activation, recomputed); masked lanes 0."""
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        pre = x * scale[None, :, None] + shift[None, :, None]
        if HAS_RES:
            pre = pre + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(pre > 0.0, g, 0.0)
    return g, x


def _tiles_grad_sums(
    dy_ptr, x_ptr, r_ptr, dr_ptr, c, mean, scale, shift, A, C, B, start, end,
    RELU: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """s1 = sum g, s2 = sum g * (x - mean) over tiles [start, end) of channels c ((BLOCK_C,) float32,
    from tile-shaped accumulators), g as `_gated_grad`'s; with RELU and HAS_RES also dresidual = g."""
    nb = tl.cdiv(B, BLOCK_B)
    acc1 = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_B], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_B], dtype=tl.float32)
    for t in range(start, end):
        ia = t // nb
        ib = t - ia * nb
        offs, mask = _tile_offsets(ia, ib, c, A, C, B, BLOCK_A, BLOCK_B, INT64)
        g, x = _gated_grad(dy_ptr, x_ptr, r_ptr, offs, mask, scale, shift, RELU, HAS_RES)
        if RELU and HAS_RES:
            tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)
        acc1 += g  # masked lanes hold g = 0
        acc2 += g * (x - mean[None, :, None])
    return _reduce_ab(acc1), _reduce_ab(acc2)


def _grad_reduce_kernel(
    dy_ptr, x_ptr, r_ptr, dr_ptr,  # (A, C, B) in one layout
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # (C,)
    part_ptr,  # (2, S, C) float32: s1, s2 partials
    A, C, B, S,
    RELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """Partial s1 = sum g, s2 = sum g * (x - mean) of split s, g = dy (or dy * relu mask, recomputed).

    With RELU and HAS_RES it also writes dresidual = g, which the dx kernel then reads as its g.
    """
    s = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, _, scale, shift = _saved_stats(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    nb = tl.cdiv(B, BLOCK_B)
    n_tiles = tl.cdiv(A, BLOCK_A) * nb
    per = tl.cdiv(n_tiles, S)
    start = s * per
    end = tl.minimum(start + per, n_tiles)
    s1, s2 = _tiles_grad_sums(
        dy_ptr, x_ptr, r_ptr, dr_ptr, c, mean, scale, shift, A, C, B, start, end,
        RELU, HAS_RES, BLOCK_A, BLOCK_C, BLOCK_B, INT64,
    )  # fmt: skip
    out = s * C + c
    tl.store(part_ptr + out, s1, mask=cmask)
    tl.store(part_ptr + S * C + out, s2, mask=cmask)


def _grad_coefficients(s1, s2, invstd, w_ptr, dw_ptr, db_ptr, c, cmask, m, HAS_W: tl.constexpr):
    """dweight = s2 * invstd and dbias = s1 stored; returns dx's coefficients k, b, c (module docstring)."""
    k = invstd
    if HAS_W:
        k = invstd * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dw_ptr + c, s2 * invstd, mask=cmask)
    tl.store(db_ptr + c, s1, mask=cmask)
    return k, -k * invstd * invstd * s2 / m, -k * s1 / m


def _grad_merge_kernel(
    part_ptr,  # (2, S, C) float32
    mean_ptr, invstd_ptr, w_ptr,  # (C,)
    dw_ptr, db_ptr, coef_ptr,  # outputs: (C,), (C,), (3, C) = k, b, c of dx
    S, C, m,
    HAS_W: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """s1, s2 summed over the splits; dweight = s2 * invstd, dbias = s1 and dx's coefficients."""
    cb = tl.program_id(0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = s[:, None] * C + c[None, :]
        s1 += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
        s2 += tl.sum(tl.load(part_ptr + S * C + offs, mask=mask, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    k, bc, cc = _grad_coefficients(s1, s2, invstd, w_ptr, dw_ptr, db_ptr, c, cmask, m, HAS_W)
    tl.store(coef_ptr + c, k, mask=cmask)
    tl.store(coef_ptr + C + c, bc, mask=cmask)
    tl.store(coef_ptr + 2 * C + c, cc, mask=cmask)


def _store_dx(dx_ptr, offs, mask, g, x, mean, k, bc, cc):
    """dx = k*g + b*(x - mean) + c on a tile (k, b, c: dx's coefficients, (BLOCK_C,))."""
    dx = k[None, :, None] * g + bc[None, :, None] * (x - mean[None, :, None]) + cc[None, :, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _dx_kernel(
    g_ptr, x_ptr, dx_ptr,  # (A, C, B) in one layout
    mean_ptr, invstd_ptr, w_ptr, b_ptr, coef_ptr,  # (C,), coef (3, C)
    A, C, B,
    RELU: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """dx = k*g + b*(x - mean) + c; with RELU, g = dy * mask recomputed from x (no residual case)."""
    t = tl.program_id(0)
    cb = tl.program_id(1)
    nb = tl.cdiv(B, BLOCK_B)
    ia = t // nb
    ib = t - ia * nb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, _, scale, shift = _saved_stats(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    k = tl.load(coef_ptr + c, mask=cmask, other=0.0)
    bc = tl.load(coef_ptr + C + c, mask=cmask, other=0.0)
    cc = tl.load(coef_ptr + 2 * C + c, mask=cmask, other=0.0)
    offs, mask = _tile_offsets(ia, ib, c, A, C, B, BLOCK_A, BLOCK_B, INT64)
    g, x = _gated_grad(g_ptr, x_ptr, x_ptr, offs, mask, scale, shift, RELU, False)
    _store_dx(dx_ptr, offs, mask, g, x, mean, k, bc, cc)


def _channel_forward_kernel(
    x_ptr, y_ptr, r_ptr,  # x, y, residual: (A, C, B) in one layout
    w_ptr, b_ptr,
    mean_ptr, invstd_ptr, var_ptr,  # outputs (C,) float32
    rmean_ptr, rvar_ptr,  # running statistics (C,), updated in place if HAS_RUNNING
    A, C, B, m, eps, momentum, unbias,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    HAS_RUNNING: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
    INT64: tl.constexpr,
):  # fmt: skip
    """The whole training forward of channel block cb in one program: the statistics of all its
    tiles (as _stats_kernel with one split), the epilogue (as _stats_merge_kernel's), then the
    apply pass over the same tiles, which a GPU's L2 cache still holds where the block is small."""
    cb = tl.program_id(0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    pivot = _pivot(x_ptr, c, cmask, B, INT64)
    nb = tl.cdiv(B, BLOCK_B)
    n_tiles = tl.cdiv(A, BLOCK_A) * nb
    _, acc_mean, acc_m2 = _tiles_moments(x_ptr, c, pivot, A, C, B, 0, n_tiles, BLOCK_A, BLOCK_C, BLOCK_B, INT64)
    mean, invstd = _finish_stats(
        pivot, acc_mean, acc_m2, c, cmask,
        mean_ptr, invstd_ptr, var_ptr, rmean_ptr, rvar_ptr, m, eps, momentum, unbias, HAS_RUNNING,
    )  # fmt: skip
    scale, shift = _scale_shift(mean, invstd, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    for t in range(0, n_tiles):
        ia = t // nb
        ib = t - ia * nb
        _apply_tile(x_ptr, y_ptr, r_ptr, ia, ib, c, scale, shift, A, C, B, HAS_RES, RELU, BLOCK_A, BLOCK_B, INT64)


def _channel_backward_kernel(
    dy_ptr, x_ptr, r_ptr, dr_ptr, dx_ptr,  # (A, C, B) in one layout
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # (C,)
    dw_ptr, db_ptr,  # outputs (C,) float32
    A, C, B, m,
    RELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """The whole training backward of channel block cb in one program: s1, s2 over all its tiles
    (writing dresidual with RELU and HAS_RES, as _grad_reduce_kernel), dweight, dbias and the
    coefficients (as _grad_merge_kernel), then dx over the same tiles (g recomputed from dy, x and
    the residual rather than read back from dresidual)."""
    cb = tl.program_id(0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, scale, shift = _saved_stats(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    nb = tl.cdiv(B, BLOCK_B)
    n_tiles = tl.cdiv(A, BLOCK_A) * nb
    s1, s2 = _tiles_grad_sums(
        dy_ptr, x_ptr, r_ptr, dr_ptr, c, mean, scale, shift, A, C, B, 0, n_tiles,
        RELU, HAS_RES, BLOCK_A, BLOCK_C, BLOCK_B, INT64,
    )  # fmt: skip
    k, bc, cc = _grad_coefficients(s1, s2, invstd, w_ptr, dw_ptr, db_ptr, c, cmask, m, HAS_W)
    if NEED_DX:
        for t in range(0, n_tiles):
            ia = t // nb
            ib = t - ia * nb
            offs, mask = _tile_offsets(ia, ib, c, A, C, B, BLOCK_A, BLOCK_B, INT64)
            g, x = _gated_grad(dy_ptr, x_ptr, r_ptr, offs, mask, scale, shift, RELU, HAS_RES)
            _store_dx(dx_ptr, offs, mask, g, x, mean, k, bc, cc)


def _unbiased_var(var_ptr, c, mask, eps, unbias, INVSTD: tl.constexpr):
    """m / (m - 1) * var at channels c, var read as such, or (INVSTD) from torch's kernel's
    invstd = (var + eps)**-1/2 as max(invstd**-2 - eps, 0), computed in float64."""
    v = tl.load(var_ptr + c, mask=mask, other=1.0)
    if INVSTD:
        i = v.to(tl.float64)
        v = 1.0 / (i * i) - eps
        v = tl.where(v < 0.0, 0.0, v).to(tl.float32)  # (tl.maximum would turn NaN into 0)
    return v * unbias


def _running_kernel(
    mean_ptr, var_ptr,  # the batch's mean and biased var (or invstd: INVSTD), float32 (C,)
    rmean_ptr, rvar_ptr,  # running statistics, float32 (C,), updated in place
    momentum_ptr, flag_ptr,  # momentum_ptr: a 0-dim float tensor (MOMENTUM_PTR); flag: 0-dim uint8, 1 = updated
    skipped_ptr,  # 0-dim int64: + 1 when the batch is kept out (HAS_SKIPPED)
    C, momentum, unbias, eps,  # unbias = m / (m - 1); eps: INVSTD's
    MOMENTUM_PTR: tl.constexpr, HAS_SKIPPED: tl.constexpr, INVSTD: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The layers' running-statistics rule in one program: every channel or none.

    Pass 1 counts the channels whose mean or unbiased variance is not finite; pass 2 writes
    running = (1 - momentum) * running + momentum * batch only if there were none. The flag says
    which, on the device: nothing is read back to the host. A kept-out batch also adds 1 to the
    device's count of them (atomically: layers on other streams share it), which the host reads
    every so often (`functional._report_skips`) instead of each step's flag.
    """
    big = 3.4028234663852886e38  # float32 max: |v| <= big is False for inf and NaN
    bad = tl.zeros([BLOCK_C], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        mu = tl.load(mean_ptr + c, mask=cmask, other=0.0)
        v = _unbiased_var(var_ptr, c, cmask, eps, unbias, INVSTD)
        bad += tl.where(cmask & ~((tl.abs(mu) <= big) & (tl.abs(v) <= big)), 1, 0)
    n_bad = tl.max(bad, axis=0)
    ok = (tl.zeros([BLOCK_C], dtype=tl.int32) + n_bad) == 0  # as a vector: it masks the stores
    f = tl.load(momentum_ptr).to(tl.float32) if MOMENTUM_PTR else momentum
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        wmask = (c < C) & ok
        mu = tl.load(mean_ptr + c, mask=wmask, other=0.0)
        v = _unbiased_var(var_ptr, c, wmask, eps, unbias, INVSTD)
        rm = tl.load(rmean_ptr + c, mask=wmask, other=0.0)
        rv = tl.load(rvar_ptr + c, mask=wmask, other=0.0)
        tl.store(rmean_ptr + c, rm * (1.0 - f) + mu * f, mask=wmask)
        tl.store(rvar_ptr + c, rv * (1.0 - f) + v * f, mask=wmask)
    tl.store(flag_ptr, (n_bad == 0).to(tl.uint8))
    if HAS_SKIPPED:
        tl.atomic_add(skipped_ptr, (n_bad != 0).to(tl.int64))


_JIT = (
    "_tile_offsets",
    "_pivot",
    "_reduce_ab",
    "_scale_shift",
    "_saved_stats",
    "_tiles_moments",
    "_finish_stats",
    "_apply_tile",
    "_gated_grad",
    "_tiles_grad_sums",
    "_grad_coefficients",
    "_store_dx",
    "_unbiased_var",
    "_stats_kernel",
    "_stats_merge_kernel",
    "_apply_kernel",
    "_grad_reduce_kernel",
    "_grad_merge_kernel",
    "_dx_kernel",
    "_channel_forward_kernel",
    "_channel_backward_kernel",
    "_running_kernel",
)
_STREAMING = ("_stats_kernel", "_apply_kernel", "_grad_reduce_kernel", "_dx_kernel")
# Every launch states FP fusion (a * b + c as one FMA) rather than take Triton's default, which
# 3.9 warns about on the first compile and 3.10 turns off: the kernels' results then do not
# change with the Triton version, and the fused backward recomputes the forward's pre-activation
# bit for bit (its ReLU mask) because both compile with the same setting.
_OPTIONS = {"enable_fp_fusion": True}


# =========================================================================== loading


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _load() -> bool:
    """Import triton and jit the kernels once; False (with the reason in _state) if impossible.

    Success is final (the kernels are compiled for one mode: CUDA, or the interpreter); a failure
    is looked at again if TRITON_INTERPRET has changed since.
    """
    if _state.get("loaded") is True:  # (every call asks: the environment is read only until then)
        return True
    interpret = _interpret_env()

    def known() -> bool:
        return _state.get("loaded") is True or ("loaded" in _state and _state["interpret"] == interpret)

    if known():
        return _state["loaded"]
    with _lock:
        if known():
            return _state["loaded"]
        why = None
        if os.environ.get("BATCHNORM_NO_TRITON", "0") == "1":
            why = "disabled by BATCHNORM_NO_TRITON=1"
        elif not interpret and not torch.cuda.is_available():
            why = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
        if why is None:
            try:
                _jit_kernels()
            except Exception as e:  # ImportError, or a broken install
                why = f"triton cannot be imported: {type(e).__name__}: {e}"
        _state.update(interpret=interpret, why=why)
        _state["loaded"] = why is None
        return _state["loaded"]


def _jit_kernels() -> None:
    """Import triton and rebind each name in _JIT to triton.jit(function), once.

    In interpreter mode if TRITON_INTERPRET=1 now. Called by _load(); a test calls it directly to
    compile the kernels for a GPU target on a machine without one.
    """
    global triton, tl
    if tl is not None:
        return
    import triton as triton_mod
    import triton.language as tl_mod

    g = globals()
    jitted = {name: triton_mod.jit(g[name]) for name in _JIT}  # all or none
    g.update(jitted)
    triton, tl = triton_mod, tl_mod


def available() -> bool:
    """True if triton imports and kernels can run: a CUDA device, or TRITON_INTERPRET=1 (CPU tensors)."""
    return _load()


def why_unavailable() -> str | None:
    """None if `available()`, else why not (no triton, no CUDA device, disabled)."""
    _load()
    return _state["why"]


def _device_type() -> str:
    return "cpu" if _state.get("interpret") else "cuda"


# =========================================================================== layout


def _canonical(x: Tensor, axis: int) -> tuple[int, int, int] | None:
    """(A, C, B) if x is a dense array that reads in memory order as contiguous (A, C, B), else None.

    Contiguous tensors (NCHW: (N, C, H*W)), channels_last(_3d) ((N*H*W, C, 1)) and every other dense
    permutation qualify; sliced, expanded or overlapping tensors do not.
    """
    if x.layout != torch.strided or x.dim() == 0 or not -x.dim() <= axis < x.dim():
        return None
    axis %= x.dim()
    shape, strides = x.shape, x.stride()
    C = shape[axis]
    if x.is_contiguous():
        return math.prod(shape[:axis]), C, math.prod(shape[axis + 1 :])
    dims = sorted((d for d in range(x.dim()) if shape[d] != 1), key=lambda d: strides[d])
    expected = 1
    for d in dims:  # dense: each stride is the product of the sizes inside it
        if strides[d] != expected:
            return None
        expected *= shape[d]
    if C == 1:
        return 1, 1, x.numel()
    B = math.prod(shape[d] for d in dims if strides[d] < strides[axis])
    return x.numel() // (B * C), C, B


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides on every dim of size > 1 (so the same memory order)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n != 1)


def _empty_like(x: Tensor) -> Tensor:
    """An uninitialized tensor with x's shape, strides and dtype."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _in_layout(t: Tensor, x: Tensor, name: str) -> Tensor:
    """t itself if it has x's dtype, device and memory layout, else a copy in x's layout (one more pass)."""
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}; expected the same")
    if t.dtype == x.dtype and t.device == x.device and _same_layout(t, x):
        return t
    return _empty_like(x).copy_(t)


def supports(x: Tensor, axis: int) -> bool:
    """True if the kernels are available and run on x as it is (no copy of x).

    x must be float32, float16 or bfloat16, non-empty, on a CUDA device (a CPU tensor under
    TRITON_INTERPRET=1) and dense (any memory format; see `_canonical`).
    """
    return (
        isinstance(x, Tensor)
        and x.dtype in _DTYPES
        and x.numel() > 0
        and available()
        and x.device.type == _device_type()
        and _canonical(x, axis) is not None
    )


def _prepare(x: Tensor, axis: int) -> tuple[int, int, int]:
    if not available():
        raise RuntimeError(f"the Triton kernels are not available: {why_unavailable()}")
    if not isinstance(x, Tensor) or x.dtype not in _DTYPES:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16 input, got {got}")
    if x.device.type != _device_type():
        raise ValueError(
            f"x is on {x.device} but the Triton kernels run on {_device_type()} tensors"
            + (" (TRITON_INTERPRET=1 is set)" if _state.get("interpret") else "")
        )
    if x.numel() == 0:
        raise ValueError(f"the Triton kernels need a non-empty input, got shape {tuple(x.shape)}")
    acb = _canonical(x, axis)
    if acb is None:
        raise ValueError(
            f"x of shape {tuple(x.shape)} and strides {x.stride()} is not a dense (A, C, B) block "
            f"around axis {axis} (sliced or expanded?); pass x.contiguous(), or check supports() first"
        )
    return acb


def _on(x: Tensor):
    """Launch on x's GPU (triton launches on the current device, not the tensors')."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _vector(t: Tensor | None, C: int, name: str, x: Tensor) -> Tensor | None:
    """A per-channel (C,) vector on x's device, contiguous (None stays None); any float dtype."""
    if t is None:
        return None
    if t.numel() != C or t.device != x.device:
        raise ValueError(f"{name} must be ({C},) on {x.device}, got shape {tuple(t.shape)} on {t.device}")
    return t if t.dim() == 1 and t.is_contiguous() else t.detach().reshape(C).contiguous()


# =========================================================================== tiles


@dataclass(frozen=True)
class Tuning:
    """Block-size heuristics. `tile`: elements per program tile (a power of 2); `max_block_c`: channels per
    tile in the channels-last layout (B == 1); `programs`: how many programs a split reduction aims for
    (splits S = programs / channel blocks); merge_block_*: the merge kernels' tile; num_warps;
    `channel_tiles`: the whole-channel kernels run where a channel block has at most this many tiles
    (besides where the split reduction would give it a single split anyway; `_whole_channels`)."""

    tile: int = 2048
    max_block_c: int = 64
    programs: int = 528  # 4 per SM of an H100; replaced by 4 * the device's SM count
    merge_block_s: int = 32
    merge_block_c: int = 128
    num_warps: int = 4
    channel_tiles: int = 4  # (an estimate: not yet measured on a GPU; benchmarks/triton_notes.md)


# Small tiles under the interpreter: each program runs as numpy, and tests then cover many tiles,
# splits and channel blocks on tiny shapes.
_INTERPRETER_TUNING = Tuning(
    tile=32, max_block_c=4, programs=6, merge_block_s=2, merge_block_c=4, num_warps=1, channel_tiles=2
)
tuning_override: Tuning | None = None  # set to force a Tuning (tests, experiments)
path_override: str | None = None  # "split" or "channel" forces that path (tests, experiments); None: the rule


_device_tunings: dict[int, Tuning] = {}  # per CUDA device index, made on its first call


def _tuning(x: Tensor) -> Tuning:
    """The tuning for x's device: `tuning_override`, the interpreter's, or the default with 4
    programs per SM. Kept per device, so a call costs no property query and no new Tuning (the
    dataclass alone took ~1 us on the development VM: host time, which bounds small layers)."""
    if tuning_override is not None:
        return tuning_override
    if _state.get("interpret"):
        return _INTERPRETER_TUNING
    index = x.device.index
    t = _device_tunings.get(index)
    if t is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        t = _device_tunings[index] = Tuning(programs=4 * sms)
    return t


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launch grids (triton.cdiv costs ~2 us a call on the host in triton 3.9)."""
    return -(-a // b)


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=4096)  # (a step asks twice per layer; ~4 us each time otherwise)
def _tile_shape(A: int, C: int, B: int, tile: int, max_block_c: int) -> tuple[int, int, int]:
    """(BLOCK_A, BLOCK_C, BLOCK_B) of about `tile` elements that streams contiguous memory.

    B > 1 (NCHW-like): runs of H*W along b (the longest run, of at least 64, whose tiles leave at
    most 1/8 of the lanes masked: B = 3136 takes 512, not 2048 with 23% idle), then rows of a, then
    more channels when the planes are small. B == 1 (channels last, 2-D): contiguous channel rows
    along c, rows of a.
    """
    if B > 1:
        top = min(_np2(B), tile)
        runs = [top >> i for i in range(top.bit_length()) if top >> i >= min(top, 64)]  # descending

        def used(bb: int) -> float:
            return B / (-(-B // bb) * bb)

        good = [bb for bb in runs if used(bb) >= 0.875]
        bb = good[0] if good else max(runs, key=lambda bb: (used(bb), bb))
        ba = min(_np2(A), max(1, tile // bb))
        bc = min(_np2(C), max(1, tile // (ba * bb)))
    else:
        bc = min(_np2(C), max_block_c)
        ba = min(_np2(A), max(1, tile // bc))
        bb = 1
    return ba, bc, bb


def _n_tiles(A: int, B: int, ba: int, bb: int) -> int:
    return -(-A // ba) * -(-B // bb)


def _splits(A: int, C: int, B: int, shape: tuple[int, int, int], t: Tuning) -> int:
    """S: splits of the N*H*W axis so that S * channel blocks ~ t.programs, at most one tile each."""
    ba, bc, bb = shape
    return max(1, min(-(-t.programs // -(-C // bc)), _n_tiles(A, B, ba, bb)))


def _whole_channels(A: int, C: int, B: int, shape: tuple[int, int, int], t: Tuning) -> bool:
    """Whether a training step runs the whole-channel kernels (one program per channel block, one
    launch per direction) instead of the split reduction, its merge and the elementwise pass (three).

    Where the split reduction gives each channel block one split (the channel blocks alone fill
    `t.programs`, or a block is one tile), the whole-channel kernel does the same work with the
    same programs and no partials: two launches fewer. Where a channel block has at most
    `t.channel_tiles` tiles, the call is too small for its launches' cost to be hidden.
    `path_override` forces either path.
    """
    if path_override is not None:
        if path_override not in ("split", "channel"):
            raise ValueError(f"path_override must be None, 'split' or 'channel', got {path_override!r}")
        return path_override == "channel"
    ba, _, bb = shape
    return _splits(A, C, B, shape, t) == 1 or _n_tiles(A, B, ba, bb) <= t.channel_tiles


def _autotune_enabled() -> bool:
    return os.environ.get("BATCHNORM_TRITON_AUTOTUNE", "0") == "1"


def _autotune_configs(A: int, C: int, B: int, interpret: bool = False) -> list:
    """Candidate tiles around the heuristic for (A, C, B): tiles of 1024, 2048, 4096 elements and, for
    B == 1, channel widths 16 to 128; 4 or 8 warps."""
    shapes = set()
    for tile in (1024, 2048, 4096):
        for mbc in (16, 32, 64, 128) if B == 1 else (1,):
            shapes.add((_tile_shape(A, C, B, tile, mbc), 8 if tile >= 4096 else 4))
    configs = []
    for (ba, bc, bb), warps in sorted(shapes):
        kw = dict(BLOCK_A=ba, BLOCK_C=bc, BLOCK_B=bb)
        configs.append(triton.Config(kw, num_warps=1 if interpret else warps))
    return configs


def _autotuned(name: str, A: int, C: int, B: int):
    """The autotuned version of a streaming kernel for (A, C, B), built once per shape."""
    tuned = _state.setdefault("autotuned", {})
    if (name, A, C, B) not in tuned:
        interpret = bool(_state.get("interpret"))

        def bench_once(fn, quantiles):  # interpreter: no timing, but the path runs
            fn()
            return [1.0, 1.0, 1.0]

        def bench(fn, quantiles):
            return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

        tuned[name, A, C, B] = triton.autotune(
            configs=_autotune_configs(A, C, B, interpret),
            key=["A", "C", "B"],  # (the autotuner adds the tensors' dtypes)
            do_bench=bench_once if interpret else bench,
        )(globals()[name])
    return tuned[name, A, C, B]


def _launch_streaming(
    name: str,
    acb: tuple[int, int, int],
    shape: tuple[int, int, int],
    grid,
    t: Tuning,
    args: tuple,
    meta: dict[str, Any],
) -> None:
    """Launch a streaming kernel on the (A, C, B) block with the heuristic tile `shape`, or autotuned.

    grid(BLOCK_A, BLOCK_C, BLOCK_B) -> the launch grid.
    """
    if _autotune_enabled():
        kernel = _autotuned(name, *acb)
        kernel[lambda META: grid(META["BLOCK_A"], META["BLOCK_C"], META["BLOCK_B"])](*args, **meta, **_OPTIONS)
        return
    ba, bc, bb = shape
    kernel = globals()[name]
    kernel[grid(ba, bc, bb)](*args, **meta, BLOCK_A=ba, BLOCK_C=bc, BLOCK_B=bb, num_warps=t.num_warps, **_OPTIONS)


# =========================================================================== API


def _running(
    x: Tensor, C: int, m: int, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor | None, Tensor | None, float, float]:
    """(running_mean, running_var, momentum, unbias) for the statistics' epilogue, after checking the
    buffers; None for the buffers where there is no update (also for m == 1: one value per channel
    has no unbiased variance)."""
    if running_mean is not None and m > 1:
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            if r.numel() != C or r.device != x.device or not r.is_contiguous() or not r.is_floating_point():
                raise ValueError(
                    f"{name} must be a contiguous floating (C,) = ({C},) tensor on {x.device} (it is "
                    f"updated in place), got {r.dtype} of shape {tuple(r.shape)} on {r.device}"
                )
        return running_mean, running_var, float(momentum), m / (m - 1)
    return None, None, float(momentum), 1.0


def _stats_outputs(x: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialized float32 (C,) mean, invstd and var on x's device: rows of one (3, C) allocation."""
    return torch.empty((3, C), dtype=torch.float32, device=x.device).unbind(0)


def _stats(
    x: Tensor,
    A: int,
    C: int,
    B: int,
    shape: tuple[int, int, int],
    t: Tuning,
    eps: float,
    running: tuple,
) -> tuple[Tensor, Tensor, Tensor]:
    """mean, invstd and the biased var (float32 (C,)) of x's channels, with the fused running-statistics
    update (`running`: `_running`'s answer); split reduction, then merge: two launches."""
    S = _splits(A, C, B, shape, t)
    int64 = x.numel() >= 2**31
    part = torch.empty((3, S, C), dtype=torch.float32, device=x.device)  # count, mean, M2
    _launch_streaming(
        "_stats_kernel",
        (A, C, B),
        shape,
        lambda ba, bc, bb: (S, _cdiv(C, bc)),
        t,
        (x, part[0], part[1], part[2], A, C, B, S),
        dict(INT64=int64),
    )
    mean, invstd, var = _stats_outputs(x, C)
    rm, rv, momentum, unbias = running
    bc = min(_np2(C), t.merge_block_c)
    _stats_merge_kernel[(_cdiv(C, bc),)](
        x, part[0], part[1], part[2], mean, invstd, var, mean if rm is None else rm, var if rv is None else rv,
        S, C, B, float(A * B), float(eps), momentum, unbias,
        HAS_RUNNING=rm is not None, BLOCK_S=min(_np2(S), t.merge_block_s), BLOCK_C=bc, INT64=int64, **_OPTIONS,
    )  # fmt: skip
    return mean, invstd, var


def _apply(
    x: Tensor,
    A: int,
    C: int,
    B: int,
    p0: Tensor,
    p1: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    coefs: int,
    residual: Tensor | None,
    relu: bool,
    eps: float = 0.0,
) -> Tensor:
    """y from `_apply_kernel`; p0, p1 and coefs as its (0: scale, shift; 1: mean, invstd; 2: mean, var)."""
    t = _tuning(x)
    y = _empty_like(x)
    _launch_streaming(
        "_apply_kernel",
        (A, C, B),
        _tile_shape(A, C, B, t.tile, t.max_block_c),
        lambda ba, bc, bb: (_n_tiles(A, B, ba, bb), _cdiv(C, bc)),
        t,
        (x, y, x if residual is None else residual, p0, p1, p0 if weight is None else weight,
         p0 if bias is None else bias, A, C, B, float(eps)),
        dict(COEFS=coefs, HAS_W=weight is not None, HAS_B=bias is not None,
             HAS_RES=residual is not None, RELU=relu, INT64=x.numel() >= 2**31),
    )  # fmt: skip
    return y


def train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    *,
    return_var: bool = False,
) -> tuple[Tensor, ...]:
    """Training-mode forward: (y, mean, invstd) from the batch's statistics.

    y = (x - mean) * invstd * weight + bias per channel on `axis`; y has x's dtype, shape and
    strides; mean and invstd = (var + eps)**-1/2 (biased var) are float32 (C,). weight, bias: None
    or (C,) of any float dtype. running_mean/running_var, if given, are updated in place in the
    statistics kernel's epilogue: running = (1 - momentum) * running + momentum * batch, with the
    unbiased variance m/(m-1) * var (skipped if m == 1, and per channel for non-finite statistics).
    return_var: (y, mean, invstd, var) with the biased var (float32 (C,)) as computed, which
    invstd**-2 - eps gives back with fewer digits where var << eps.

    Reads x twice (statistics, apply) and writes y once. Raises TypeError for an unsupported dtype,
    ValueError if x is not a dense block on the kernels' device (see `supports`) or is empty,
    RuntimeError if the kernels are not available.
    """
    return train_forward_act(
        x, weight, bias, eps, axis, None, None, running_mean, running_var, momentum, return_var=return_var
    )


def train_forward_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    residual: Tensor | None = None,
    act: str | None = "relu",
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    *,
    return_var: bool = False,
) -> tuple[Tensor, ...]:
    """Fused training forward: (y, mean, invstd) with y = act(bn(x) + residual), the ResNet block tail.

    residual: None or a tensor of x's shape (copied into x's layout and dtype first if it differs);
    act: "relu" or None. Nothing of x's size is saved for the backward: `train_backward_act`
    recomputes the ReLU mask from x, mean, invstd, weight, bias and the residual. Otherwise as
    `train_forward` (statistics, running-statistics update and return_var are the same).
    """
    _check_act(act)
    A, C, B = _prepare(x, axis)
    w, b = _vector(weight, C, "weight", x), _vector(bias, C, "bias", x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    r = None if residual is None else _in_layout(residual, x, "residual")
    running = _running(x, C, A * B, running_mean, running_var, momentum)
    t = _tuning(x)
    shape = _tile_shape(A, C, B, t.tile, t.max_block_c)
    with _on(x):
        if _whole_channels(A, C, B, shape, t):
            y, mean, invstd, var = _channel_forward(x, A, C, B, shape, t, eps, w, b, r, act == "relu", running)
        else:
            mean, invstd, var = _stats(x, A, C, B, shape, t, eps, running)
            y = _apply(x, A, C, B, mean, invstd, w, b, 1, r, act == "relu")
    return (y, mean, invstd, var) if return_var else (y, mean, invstd)


def _channel_forward(
    x: Tensor,
    A: int,
    C: int,
    B: int,
    shape: tuple[int, int, int],
    t: Tuning,
    eps: float,
    w: Tensor | None,
    b: Tensor | None,
    r: Tensor | None,
    relu: bool,
    running: tuple,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, var) from `_channel_forward_kernel`: one launch, one program per channel block."""
    y = _empty_like(x)
    mean, invstd, var = _stats_outputs(x, C)
    rm, rv, momentum, unbias = running
    ba, bc, bb = shape
    _channel_forward_kernel[(_cdiv(C, bc),)](
        x, y, x if r is None else r, mean if w is None else w, mean if b is None else b,
        mean, invstd, var, mean if rm is None else rm, var if rv is None else rv,
        A, C, B, float(A * B), float(eps), momentum, unbias,
        HAS_W=w is not None, HAS_B=b is not None, HAS_RES=r is not None, RELU=relu, HAS_RUNNING=rm is not None,
        BLOCK_A=ba, BLOCK_C=bc, BLOCK_B=bb, INT64=x.numel() >= 2**31, num_warps=t.num_warps, **_OPTIONS,
    )  # fmt: skip
    return y, mean, invstd, var


def update_running(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    m: int | None,
    momentum: float | Tensor,
    skipped: Tensor | None = None,
    *,
    eps: float | None = None,
) -> Tensor | None:
    """The layers' running-statistics rule in one kernel launch: if every channel's mean and
    unbiased variance m / (m - 1) * var are finite, running = (1 - momentum) * running +
    momentum * batch for both buffers, else neither changes. Returns the outcome as a 0-dim bool
    tensor on their device (True: updated), so that nothing is read back to the host.

    mean, var: the batch's float32 (C,) (`train_forward(..., return_var=True)`); the buffers:
    contiguous float32 (C,) on the same device; momentum: a float or a 0-dim tensor (momentum=None's
    1 / (num_batches_tracked + 1)); m > 1, or None where var is the unbiased variance already. None
    where these do not hold (the caller's torch ops then).
    skipped: a 0-dim int64 count on the same device, + 1 when the batch is kept out (same launch).
    eps: given, `var` is torch's kernel's invstd = (var + eps)**-1/2 instead (`torch.native_batch_norm`
    returns no var), and var = max(invstd**-2 - eps, 0), in float64 (where var << eps, invstd has
    kept few of its digits).
    """
    C = mean.numel()
    vectors = (mean, var, running_mean, running_var)
    if (m is None and eps is not None) or (m is not None and m < 2) or not all(
        t.dtype == torch.float32 and t.numel() == C and t.is_contiguous() and t.device == mean.device for t in vectors
    ):
        return None
    tensor_momentum = isinstance(momentum, Tensor)
    if tensor_momentum and (momentum.numel() != 1 or momentum.device != mean.device):
        return None
    if skipped is not None and (skipped.dtype != torch.int64 or skipped.numel() != 1 or skipped.device != mean.device):
        return None
    if not available() or mean.device.type != _device_type():  # (supports(), without the layout it checked above)
        return None
    flag = torch.empty((), dtype=torch.uint8, device=mean.device)  # (triton stores no torch.bool)
    with _on(mean):
        _running_kernel[(1,)](
            mean, var, running_mean, running_var, momentum if tensor_momentum else flag, flag,
            flag if skipped is None else skipped,
            C, 0.0 if tensor_momentum else float(momentum), 1.0 if m is None else m / (m - 1),
            0.0 if eps is None else float(eps),
            MOMENTUM_PTR=tensor_momentum, HAS_SKIPPED=skipped is not None, INVSTD=eps is not None,
            BLOCK_C=min(_np2(C), 1024), **_OPTIONS,
        )  # fmt: skip
    return flag.view(torch.bool)


def inference(
    x: Tensor, scale: Tensor, shift: Tensor, axis: int, residual: Tensor | None = None, act: str | None = None
) -> Tensor:
    """y = act(x * scale + shift + residual) per channel (scale, shift (C,), read as float32): one read
    of x (and of the residual), one write.

    For eval-mode BN: scale = weight * (running_var + eps)**-1/2, shift = bias - running_mean * scale;
    with residual and act="relu", the ResNet block tail in one pass. y has x's dtype, shape and
    strides; a residual of another layout or dtype is copied into x's first.
    """
    _check_act(act)
    A, C, B = _prepare(x, axis)
    sc, sh = _vector(scale, C, "scale", x), _vector(shift, C, "shift", x)
    r = None if residual is None else _in_layout(residual, x, "residual")
    with _on(x):
        return _apply(x, A, C, B, sc, sh, None, None, 0, r, act == "relu")


def eval_forward(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    residual: Tensor | None = None,
    act: str | None = None,
) -> Tensor:
    """Eval-mode BN from the running statistics in one launch: y = act(x * scale + shift + residual)
    with scale = weight * (var + eps)**-1/2 and shift = bias - mean * scale computed in the kernel
    (`inference` takes them ready-made, which costs the caller about six small torch ops, each a
    launch on a GPU). mean, var, weight, bias: (C,) of any float dtype (read as float32; weight and
    bias may be None). Otherwise as `inference`.
    """
    _check_act(act)
    A, C, B = _prepare(x, axis)
    mu, v = _vector(mean, C, "mean", x), _vector(var, C, "var", x)
    w, b = _vector(weight, C, "weight", x), _vector(bias, C, "bias", x)
    r = None if residual is None else _in_layout(residual, x, "residual")
    with _on(x):
        return _apply(x, A, C, B, mu, v, w, b, 2, r, act == "relu", eps)


def train_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    axis: int,
    need_dx: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Training-mode backward: (dx, dweight, dbias) for the forward's mean and invstd.

    dbias = s1 = sum(dy), dweight = s2 * invstd with s2 = sum(dy * (x - mean)) per channel, both
    float32 (C,) (dweight None if weight is None; cast to the parameters' dtypes);
    dx = k*dy + b*(x - mean) + c (module docstring), x's dtype and strides, None if not need_dx.
    dy is copied into x's layout first if its dtype or strides differ (an expanded dy, say).
    Reads x and dy twice and writes dx once.
    """
    dx, dw, db, _ = _backward(dy, x, weight, None, mean, invstd, axis, None, False, need_dx)
    return dx, dw, db


def train_backward_act(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    axis: int,
    residual: Tensor | None = None,
    need_dx: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor | None]:
    """Backward of `train_forward_act(..., act="relu")`: (dx, dweight, dbias, dresidual).

    The ReLU mask is recomputed, mask = (x*scale + shift [+ residual]) > 0 with scale, shift from
    weight, bias, mean, invstd exactly as the forward computed them, so the forward stores nothing
    of x's size. g = dy * mask; dresidual = g (x's dtype and layout; None without a residual); the
    rest is `train_backward` with g for dy. Passes: without residual, read x, dy twice, write dx;
    with residual, read x, dy, residual and write dresidual, then read x, dresidual and write dx.
    """
    return _backward(dy, x, weight, bias, mean, invstd, axis, residual, True, need_dx)


def _backward(*args) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor | None]:
    with _on(args[1]):
        return _backward_on_device(*args)


def _backward_on_device(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    axis: int,
    residual: Tensor | None,
    relu: bool,
    need_dx: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor | None]:
    A, C, B = _prepare(x, axis)
    dy = _in_layout(dy, x, "dy")
    w, b = _vector(weight, C, "weight", x), _vector(bias, C, "bias", x)
    mu = _vector(mean, C, "mean", x).float()
    istd = _vector(invstd, C, "invstd", x).float()
    r = None if residual is None else _in_layout(residual, x, "residual")
    dr = _empty_like(x) if (relu and r is not None) else None

    t = _tuning(x)
    shape = _tile_shape(A, C, B, t.tile, t.max_block_c)
    int64 = x.numel() >= 2**31
    flags = dict(HAS_W=w is not None, HAS_B=b is not None, INT64=int64)
    m = A * B
    dw = torch.empty(C, dtype=torch.float32, device=x.device) if w is not None else None
    db = torch.empty(C, dtype=torch.float32, device=x.device)
    if _whole_channels(A, C, B, shape, t):
        dx = _empty_like(x) if need_dx else None
        ba, bc, bb = shape
        _channel_backward_kernel[(_cdiv(C, bc),)](
            dy, x, x if r is None else r, x if dr is None else dr, x if dx is None else dx,
            mu, istd, mu if w is None else w, mu if b is None else b, db if dw is None else dw, db,
            A, C, B, float(m),
            RELU=relu, HAS_RES=r is not None, NEED_DX=need_dx, **flags,
            BLOCK_A=ba, BLOCK_C=bc, BLOCK_B=bb, num_warps=t.num_warps, **_OPTIONS,
        )  # fmt: skip
        return dx, dw, db, dr

    S = _splits(A, C, B, shape, t)
    part = torch.empty((2, S, C), dtype=torch.float32, device=x.device)
    _launch_streaming(
        "_grad_reduce_kernel",
        (A, C, B),
        shape,
        lambda ba, bc, bb: (S, _cdiv(C, bc)),
        t,
        (dy, x, x if r is None else r, x if dr is None else dr, mu, istd,
         mu if w is None else w, mu if b is None else b, part, A, C, B, S),
        dict(RELU=relu, HAS_RES=r is not None, **flags),
    )  # fmt: skip

    coef = torch.empty((3, C), dtype=torch.float32, device=x.device)  # k, b, c of dx
    bc = min(_np2(C), t.merge_block_c)
    _grad_merge_kernel[(_cdiv(C, bc),)](
        part, mu, istd, mu if w is None else w, db if dw is None else dw, db, coef, S, C, float(m),
        HAS_W=w is not None, BLOCK_S=min(_np2(S), t.merge_block_s), BLOCK_C=bc, **_OPTIONS,
    )  # fmt: skip

    dx = None
    if need_dx:
        dx = _empty_like(x)
        g = dy if dr is None else dr  # with a residual, dresidual already is dy * mask
        _launch_streaming(
            "_dx_kernel",
            (A, C, B),
            shape,
            lambda ba, bc, bb: (_n_tiles(A, B, ba, bb), _cdiv(C, bc)),
            t,
            (g, x, dx, mu, istd, mu if w is None else w, mu if b is None else b, coef, A, C, B),
            dict(RELU=relu and dr is None, **flags),
        )
    return dx, dw, db, dr
