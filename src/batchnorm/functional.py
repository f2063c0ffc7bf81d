"""`batch_norm`: torch.nn.functional.batch_norm's contract on a hand-derived autograd core.

Training (Algorithm 1 of Ioffe & Szegedy 2015), per channel c over the m values
of every other axis:

    mean_c = 1/m sum x,   var_c = 1/m sum (x - mean_c)**2,   invstd_c = (var_c + eps)**-1/2
    y      = x * scale_c + shift_c,   scale_c = gamma_c * invstd_c,
                                      shift_c = beta_c - mean_c * scale_c

Backward (see `batchnorm.reference.backward` for the derivation), with the two
reductions s1 = sum(dy) and s2 = sum(dy * (x - mean)):

    dbeta  = s1,   dgamma = s2 * invstd
    dx     = k * dy + b * x + c   where k = gamma * invstd,
                                        b = -k * invstd**2 * s2 / m,
                                        c = -k * s1 / m - b * mean

so the backward is one reduction pass and one elementwise pass. Running
statistics follow PyTorch: momentum weights the new batch, the unbiased
variance is stored. A batch whose statistics are not finite never reaches the
running statistics: the update is skipped with a warning.

Numerical choices: half inputs (float16, bfloat16) are computed in float32 and
the result cast back; statistics come from `torch.var_mean` (a two-pass /
Welford reduction, never E[x^2] - E[x]^2); float32 statistics and parameters
may go with half inputs (mixed precision).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _kernel_variants
from ._general import general_train
from .kernels import cpu as _cpu
from .kernels import cpu_ops as _cpu_ops

__all__ = ["BACKENDS", "batch_norm", "get_backend", "set_backend", "use_backend"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    renorm: tuple[float, float] | None = None,
    process_group: Any = None,
) -> Tensor:
    """Batch normalization with torch.nn.functional.batch_norm's signature and semantics.

    y = (x - mean) / sqrt(var + eps) * weight + bias, per channel along `axis`
    (default 1, as torch; -1 for (N, L, C) sequences or channels-last data
    stored that way). In training the batch's own mean and biased variance are
    used and, when given, `running_mean` / `running_var` are updated in place:
    running = (1 - momentum) * running + momentum * batch (unbiased variance).
    Otherwise the running statistics normalize.

    Shapes: input (N, C, *) with C on `axis`; running_mean, running_var,
    weight, bias (C,) or None.

    Variants (training only, any combination; see `batchnorm._general`):

    - mask: bool, shaped like input without the channel axis, True = real
      element. Statistics and gradients use real elements only; padded
      positions output 0 (in eval mode too) and get no gradient. Alone, the
      CPU kernel's masked passes (`batchnorm._kernel_variants`): over rows
      where each mask element is a row with the channels last ((N, L, C)
      with axis=-1, channels_last, 2-D), over planes where a contiguous
      input has the channels elsewhere ((N, C, L), (N, C, H, W)); in eval,
      its one masked pass where no gradient is wanted.
    - virtual_batch_size=k: ghost batches, statistics per chunk of k samples
      along axis 0; the last chunk may be smaller (not a single value per
      channel). One running-statistics update per step, from all chunks'
      moments merged (the statistics of the whole batch). Alone (no other
      variant), on the CPU kernel where it takes the input and axis 0 is
      outermost in memory: one call for all chunks (`batchnorm._kernel_variants`).
    - renorm=(r_max, d_max): batch renormalization (Ioffe 2017) against the
      running statistics (sigma = sqrt(running_var + eps)); needs them. Alone,
      on the CPU kernel where it takes the input (`batchnorm._kernel_variants`).
    - process_group: a torch.distributed group (or dist.group.WORLD): SyncBN,
      statistics of the batch concatenated over its processes.

    In eval mode the variants change nothing but the mask's zeros.

    Raises ValueError for a wrong rank or channel count, eps <= 0 or a
    momentum outside [0, 1] in training, and one value per channel in
    training; TypeError for a non-floating input.

    >>> x = torch.randn(8, 3, 4, 4)
    >>> y = batch_norm(x, None, None, training=True)
    >>> bool(y.mean((0, 2, 3)).abs().max() < 1e-5)
    True
    """
    y, _ = batch_norm_with_status(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        axis=axis,
        mask=mask,
        virtual_batch_size=virtual_batch_size,
        renorm=renorm,
        process_group=process_group,
    )
    return y


def batch_norm_with_status(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    renorm: tuple[float, float] | tuple[Tensor, Tensor] | None = None,
    process_group: Any = None,
) -> tuple[Tensor, bool | Tensor]:
    """`batch_norm`, also saying whether the running statistics may count this batch.

    The second value is False only when a training batch had non-finite
    statistics and the running statistics were left as they were; the layers
    then do not count the batch in `num_batches_tracked` either. While
    torch.compile or torch.export record the call, it may be a 0-dim bool
    tensor instead.

    The layers pass `momentum` (momentum=None: 1 / (num_batches_tracked + 1))
    and `renorm` (`Renorm.limits`) as 0-dim tensors while a graph is recorded,
    computed from num_batches_tracked inside the graph; those are not checked.
    """
    # The whole call in C++ when it takes it (it checks as below, else declines). Not while a
    # graph is recorded: torch.compile and torch.export take the kernel's operators below
    # (`_compiling_kernel`), torch.jit.trace torch's own operators (see _pick_path).
    # (A 0-dim tensor momentum, as on CUDA for momentum=None, is no argument of the C++ side.) CPU
    # tensors only: the C++ side declines others, and a CUDA user's first call would otherwise
    # build it (about 15 s) and every call ask it (a microsecond or two).
    fast = (
        _backend in _KERNEL_BACKENDS
        and isinstance(input, Tensor)
        and input.is_cpu
        and mask is None
        and not isinstance(momentum, Tensor)
        and not _recording()
    )
    ext = _cpu.extension() if fast else None
    if ext is not None:
        try:
            if not training:
                y = ext.eval(input, running_mean, running_var, weight, bias, eps, axis)
                if y is not None:
                    return y, True
            elif renorm is None and process_group is None:  # plain BN, or ghost batches alone
                if virtual_batch_size is None:
                    r = ext.train_step(input, weight, bias, running_mean, running_var, eps, momentum, axis)
                else:
                    k = virtual_batch_size
                    r = ext.ghost_train_step(input, weight, bias, running_mean, running_var, eps, momentum, axis, k)
                if r is not None:
                    if r[1] == 0:
                        _warn_not_finite(stacklevel=3)
                    return r[0], r[1] != 0
        except TypeError:  # an argument of another type (pybind11's message): the checks below say what
            pass
    axis = _check_input(input, axis)
    C = input.shape[axis]
    want = (C,)
    if not (
        (running_mean is None or running_mean.shape == want)
        and (running_var is None or running_var.shape == want)
        and (weight is None or weight.shape == want)
        and (bias is None or bias.shape == want)
    ):  # (one test per call when all is well; the loop says which one is wrong)
        named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
        for name, t in named:
            _check_channels(name, t, C, input, axis)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together or both be None, "
            f"got running_mean={_describe(running_mean)} and running_var={_describe(running_var)}"
        )

    if mask is not None:
        _check_mask(mask, input, axis)

    if not training:
        if running_mean is None:
            raise ValueError(
                "batch_norm with training=False normalizes with running_mean and running_var, "
                "but both are None; pass them, or training=True to use the batch's statistics"
            )
        if mask is not None and not _wants_grad(input, running_mean, running_var, weight, bias):
            # the masked kernel: one pass, 0 at the padding (its operator while a graph is recorded)
            acb = _kernel_layout(input, axis)
            if acb is not None and _cpu.masked_layout(input, axis, acb):
                return _cpu.masked_eval(input, mask, running_mean, running_var, weight, bias, eps, axis), True
            vectors = (running_mean, running_var, weight, bias)
            vectors = _cpu_ops.operands(input, axis, *vectors, masked=True) if _compiling_kernel(input) else None
            if vectors is not None:
                return torch.ops.batchnorm.cpu_masked_eval(input, mask, *vectors, eps, axis), True
        if mask is not None:  # padding may hold NaN: keep it out of every gradient
            input = input.masked_fill(~mask.unsqueeze(axis), 0)
        y = _inference(input, running_mean, running_var, weight, bias, eps, axis, fast=True)
        if mask is not None:
            y = y.masked_fill(~mask.unsqueeze(axis), 0)
        return y, True

    if mask is not None or virtual_batch_size is not None or renorm is not None or process_group is not None:
        _check_variants(input, axis, momentum, eps, virtual_batch_size, renorm, running_mean, process_group)
        variants = (mask, virtual_batch_size, renorm, process_group)
        # One variant alone, on an input the CPU kernel takes: the kernel paths
        alone = sum(v is not None for v in variants) == 1
        layout = _kernel_layout(input, axis) if alone else None
        # the same as the kernel's operators, in a graph torch.compile or torch.export records
        parameters = _cpu_ops.operands(input, axis, weight, bias) if alone and _compiling_kernel(input) else None
        traced = parameters is not None
        if traced:
            (weight, bias), layout = parameters, _cpu._layout(input, axis)
        if virtual_batch_size is not None and _kernel_variants.ghost_applies(input, layout):
            # ghost batches: all of them in one CPU kernel call
            y, total = _kernel_variants.ghost_train(input, weight, bias, eps, axis, virtual_batch_size, traced)
        elif renorm is not None and layout is not None:  # batch renormalization: two kernel calls
            y, total = _kernel_variants.renorm_train(
                input, weight, bias, eps, axis, running_mean, running_var, renorm, traced
            )
        elif process_group is not None and layout is not None and not traced:  # SyncBN: local passes, global stats
            y, total = _kernel_variants.sync_train(input, weight, bias, eps, axis, process_group)
        elif mask is not None and layout is not None and _cpu.masked_layout(input, axis, layout):  # planes or rows
            y, total = _kernel_variants.masked_train(input, mask, weight, bias, eps, axis, traced)
        else:
            y, total = general_train(
                input,
                weight,
                bias,
                eps,
                axis,
                mask,
                virtual_batch_size,
                renorm,
                running_mean,
                running_var,
                process_group,
            )
        if running_mean is None:
            return y, True
        if _recording():  # the count is a value of the graph: its test goes into the update's select
            few = total.count[0] < 2
            return y, _update_running_stats(running_mean, running_var, total.mean, total.unbiased_var, momentum) | few
        # Without a mask every group has this process's m values or more: at least 2 needs no
        # read of the count (on CUDA a read waits for the GPU).
        if (mask is not None or input.numel() // C < 2) and float(total.count[0]) < 2:
            return y, True
        return y, _update_running_stats(running_mean, running_var, total.mean, total.unbiased_var, momentum)

    _check_training(input, axis, momentum, eps)
    if input.numel() == 0:
        # As torch: an empty batch gives an empty output (zero parameter
        # gradients) and leaves the running statistics alone.
        stats = input.new_zeros(C, dtype=_acc_dtype(input.dtype))
        return _inference(input, stats, stats + 1, weight, bias, eps, axis), True

    # torch.compile / torch.export: the kernel as an operator (kernels/cpu_ops.py). `counted` is then
    # a 0-dim bool tensor: a graph has no Python bool of a value it computes. (momentum: a layer's
    # cumulative average is a 0-dim tensor in graphs, which the operator does not take.)
    if _compiling_kernel(input) and not isinstance(momentum, Tensor):
        ops = _cpu_ops.operands(input, axis, weight, bias, running=(running_mean, running_var))
        if ops is not None:
            y, _, _, new_mean, new_var, counted = torch.ops.batchnorm.cpu_train(input, *ops, eps, momentum, axis)
            if running_mean is not None:
                with torch.no_grad():  # buffers, not part of the graph autograd differentiates
                    running_mean.copy_(new_mean)
                    running_var.copy_(new_var)
            return y, counted

    mode = "train_grad" if _wants_grad(input, weight, bias) else "train"
    path = "torch" if _native_is_cheaper(mode, input, axis, weight, bias) else _pick_path(input, axis)
    if path == "torch":
        y, mean, invstd = _torch_train(input, weight, bias, eps, axis)
        if running_mean is None:
            return y, True
        return y, _update_from_invstd(running_mean, running_var, mean, invstd, input.numel() // C, eps, momentum)
    # The CPU kernel updates float32 running statistics itself, in the same call.
    fused = _FusedUpdate.make(path, running_mean, running_var, momentum)
    if path == "cpu" and mode == "train":  # nothing for autograd to record: the kernel alone
        y, mean, var, _ = _cpu_forward(input, weight, bias, eps, axis, fused)
    else:
        stats: list[Tensor] = []  # (mean, var): outputs autograd need not see
        y = _BatchNormTrain.apply(input, weight, bias, eps, axis, path, fused, stats)
        mean, var = stats
    if fused is not None and fused.updated is not None:
        if not fused.updated:
            _warn_not_finite(stacklevel=3)
        return y, fused.updated
    if running_mean is None:
        return y, True
    m = input.numel() // C
    if path == "triton":
        return y, _triton_update(running_mean, running_var, mean, var, m, momentum)
    return y, _update_running_stats(running_mean, running_var, mean, var * (m / (m - 1)), momentum)


# --------------------------------------------------------------------------- backends

BACKENDS = ("auto", "cpu", "triton", "composite", "torch")
_backend = os.environ.get("BATCHNORM_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Force the path plain batch normalization takes (the variants take the general path, except
    ghost batches, masks and batch renormalization each alone, which "auto" and "cpu" run on the
    CPU kernel where it takes the input; see `batch_norm`).

    - "auto" (default): the C/OpenMP kernel for CPU float32/bfloat16 tensors it
      supports (through its C++ entry points; where those cannot be built, small
      calls (NATIVE_MAX_ELEMS) take torch's kernel, which then has less per-call
      overhead); the Triton kernels for CUDA tensors when Triton is installed;
      else "composite". Inside graphs recorded by torch.compile, torch.export or
      torch.jit.trace: the CPU kernel's operators where they apply, else torch ops;
    - "cpu" / "triton": that kernel, or a clear error where it cannot run ("triton" also runs
      CPU tensors when TRITON_INTERPRET=1 is set, in triton's interpreter: for tests);
    - "composite": our autograd core built from torch tensor operations;
    - "torch": PyTorch's own kernel (torch.native_batch_norm) under our checks and
      running-statistics rule, for comparison or as a fallback.

    Also settable with the environment variable BATCHNORM_BACKEND; `use_backend`
    sets it for a `with` block.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with use_backend("torch"): ...` runs the block on that backend, then restores the previous one."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


_triton_module: Any = None


def _triton_bn():
    """batchnorm.kernels.triton_bn, imported on first use (an import statement costs ~1 us a call;
    importing the module does not import triton)."""
    global _triton_module
    if _triton_module is None:
        from .kernels import triton_bn

        _triton_module = triton_bn
    return _triton_module


def _triton_ok(input: Tensor, axis: int) -> bool:
    """Whether the Triton kernels take this input: a CUDA tensor, or, where they were compiled for
    triton's interpreter (TRITON_INTERPRET=1), a CPU tensor ("auto" never sends one there: the
    interpreter is for tests of the Triton path on machines without a GPU)."""
    return _triton_bn().supports(input, axis)


def _pick_path(input: Tensor, axis: int) -> str:
    """Which implementation runs this call: "cpu", "triton", "composite" or "torch".

    While a graph is recorded (`_recording`) the kernels ("auto", "cpu", "triton") give way to
    "composite": a graph holds torch operators only, so a kernel's work would be missing from a
    traced graph (its output an uninitialized tensor), and torch.compile or torch.export would
    reach it with fake tensors. Where the CPU kernel's operators take a call (kernels/cpu_ops.py),
    the callers use them before asking here. torch's kernel is an operator and stays.
    """
    name = _backend
    if name != "torch" and _recording():
        return "composite"
    if name == "auto":
        if input.device.type == "cpu" and _cpu.supports(input, axis):
            return "cpu"
        if input.is_cuda and _triton_ok(input, axis):
            return "triton"
        return "composite"
    if name == "cpu" and not _cpu.supports(input, axis):
        why = _cpu.why_unavailable() or "it takes dense CPU float32/bfloat16 tensors"
        raise RuntimeError(
            f"backend 'cpu' was forced but cannot run on a {input.dtype} tensor of shape {tuple(input.shape)} "
            f"on {input.device} ({why}); use set_backend('auto')"
        )
    if name == "triton" and not _triton_ok(input, axis):
        from .kernels import triton_bn

        why = triton_bn.why_unavailable() or (
            "it takes dense float32/float16/bfloat16 CUDA tensors, "
            "or CPU ones with TRITON_INTERPRET=1 set before its first use"
        )
        raise RuntimeError(
            f"backend 'triton' was forced but cannot run on a {input.dtype} tensor of shape {tuple(input.shape)} "
            f"on {input.device} ({why}); use set_backend('auto')"
        )
    return name


_KERNEL_BACKENDS = ("auto", "cpu")  # the backends that run the CPU kernel where it takes the input


def _recording() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace is recording this call into a graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _compiling_kernel(input: Tensor) -> bool:
    """Whether torch.compile or torch.export traces a call the CPU kernel's operators may take
    (kernels/cpu_ops.py): a CPU tensor under the "auto" or "cpu" backend (not torch.jit.trace,
    which records torch's own operators only)."""
    return (
        _backend in _KERNEL_BACKENDS
        and input.is_cpu
        and torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _kernel_layout(input: Tensor, axis: int) -> tuple[int, int, int] | None:
    """(A, C, B) if the backend ("auto" or "cpu") runs this input on the CPU kernel, else None.

    `_pick_path` in one lookup, handed on to the kernel call: in a busy process every Python
    layer of a call costs microseconds (benchmarks/kernel_notes.md).
    """
    if _backend not in _KERNEL_BACKENDS or not input.is_cpu or _recording():
        return None
    return _cpu.layout(input, axis)


def _to_axis1(t: Tensor, axis: int) -> Tensor:
    return t if axis == 1 else t.movedim(axis, 1)


def _torch_train(input: Tensor, weight, bias, eps: float, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch's kernel: y and the batch's (mean, invstd); autograd through torch's backward."""
    y, mean, invstd = torch.native_batch_norm(_to_axis1(input, axis), weight, bias, None, None, True, 0.0, eps)
    if axis != 1:
        y = y.movedim(1, axis)
        if input.is_contiguous() and not y.is_contiguous():  # torch lays y out for the moved view
            y = y.contiguous()
    return y, mean.detach(), invstd.detach()


def _update_from_invstd(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor, m: int, eps: float, momentum: float
) -> bool | Tensor:
    """`_update_running_stats` from torch's kernel's (mean, invstd): var = invstd**-2 - eps, unbiased.
    On a CUDA device in one Triton launch where it takes the buffers (`_triton_update`), not about
    25 small torch ops."""
    # (not the C helper while a graph is recorded: the graph must update the buffers itself; nor
    # where the update stays on the device)
    updated = None
    if not _recording():
        if _reads_back_later(mean):
            return _triton_update(running_mean, running_var, mean, invstd, m, momentum, eps=eps)
        updated = _cpu.update_running(mean, invstd, m, eps, running_mean, running_var, momentum)
    if updated is None:  # buffers the C helper does not take (another dtype, a graph): torch ops
        var = _var_from_invstd(invstd, eps, mean.dtype)
        return _update_running_stats(running_mean, running_var, mean, var * (m / (m - 1)), momentum)
    if not updated:
        _warn_not_finite(stacklevel=4)
    return updated


def _var_from_invstd(invstd: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """The biased var of torch's kernel's invstd = (var + eps)**-1/2: max(invstd**-2 - eps, 0), in float64."""
    return (invstd.double().reciprocal().square() - eps).clamp_min(0.0).to(dtype)


# Where the C++ entry points (cpu.extension) are not there or decline a call (the path below
# the fast path at the top of batch_norm_with_status), small CPU calls (float32, bfloat16) of up
# to this many elements run on torch's kernel in "auto": there a call costs mostly fixed
# overhead. With autograd our Python autograd.Function alone costs ~20 us a step more than
# torch's C++ node; in eval torch's call has less fixed cost than our ctypes call (`bench
# --small` without the C++ entry points: 0.71x -> 0.79x with eval routed up to 65536 elements
# rather than 16384). Training without autograd stays on our kernel at every size: it updates
# the running statistics in the same call, where torch's kernel needs a second one (our rule),
# 2 us slower at 8K elements. Measured on 2 cores (benchmarks/README.md, "Small tensors").
NATIVE_MAX_ELEMS = {"train_grad": 1 << 16, "train": 0, "eval": 1 << 16}

# The same on a CUDA device, in every mode. There the GPU's part of a call on this many elements
# takes a microsecond or two, so the host's decides the step, and torch's kernel with our
# running-statistics rule (`_update_from_invstd`: one Triton launch) issues it with about a third
# less host time than the Triton path (our autograd.Function and three kernel wrappers). Measured
# with the kernels stubbed and CUDA's rule simulated on the CPU (benchmarks/host_overhead.py, the
# "CUDA's rule" rows; 2-core EPYC, four runs): a training step 90-95 against 137-141 us, a forward
# without autograd 36 against 53-54, eval 13-14 against 22. Not while a graph is recorded. Where
# larger inputs stop being the host's depends on the GPU: `benchmarks/triton_paths.py` ("torch-rule").
NATIVE_MAX_ELEMS_CUDA = {"train_grad": 1 << 16, "train": 1 << 16, "eval": 1 << 16}


def _native_is_cheaper(mode: str, input: Tensor, axis: int, *params: Tensor | None) -> bool:
    """Whether "auto" gives this call to torch's kernel: a small float32 or bfloat16 CPU tensor, or
    float32, bfloat16 or float16 CUDA tensor (NATIVE_MAX_ELEMS, NATIVE_MAX_ELEMS_CUDA), channels
    on axis 1.

    params (weight and bias; in eval also the running statistics) must be float32 or None.
    Training on half inputs needs a weight or a bias: without either, torch's CPU kernel returns
    the batch's invstd in bfloat16, too coarse for the running variance (the same rule on CUDA).
    Axis 1 only: torch's kernel would lay out the output of a moved view differently from the input.
    """
    if _backend != "auto" or axis != 1:
        return False
    if input.is_cpu:
        limit, dtypes = NATIVE_MAX_ELEMS[mode], (torch.float32, torch.bfloat16)
    elif input.is_cuda and not _recording():
        limit, dtypes = NATIVE_MAX_ELEMS_CUDA[mode], (torch.float32, torch.bfloat16, torch.float16)
    else:
        return False
    if input.numel() > limit or input.dtype not in dtypes:
        return False
    if input.dtype is not torch.float32 and mode != "eval" and params[0] is None and params[1] is None:
        return False
    return all(p is None or p.dtype is torch.float32 for p in params)


def _torch_eval(input: Tensor, mean, var, weight, bias, eps: float, axis: int) -> Tensor:
    y = torch.batch_norm(_to_axis1(input, axis), weight, bias, mean, var, False, 0.0, eps, False)
    return y if axis == 1 else y.movedim(1, axis)


# --------------------------------------------------------------------------- checks


def _describe(t: Tensor | None) -> str:
    return "None" if t is None else f"tensor of shape {tuple(t.shape)}"


def _check_input(input: Tensor, axis: int) -> int:
    """Validate dtype and rank; return the channel axis as a non-negative index."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm expected a torch.Tensor input, got {type(input).__name__}")
    if input.dtype not in _FLOATS:
        raise TypeError(
            f"batch_norm expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}; convert it first, e.g. x.float()"
        )
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expected an input of at least 2 dimensions (N, C, ...), "
            f"got {input.dim()}D input of shape {tuple(input.shape)}"
        )
    if not -input.dim() <= axis < input.dim():
        raise ValueError(
            f"channel axis {axis} is out of range for {input.dim()}D input of shape "
            f"{tuple(input.shape)}; expected an axis in [{-input.dim()}, {input.dim() - 1}]"
        )
    return axis % input.dim()


def _check_channels(name: str, t: Tensor | None, C: int, input: Tensor, axis: int) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != C:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the input of shape {tuple(input.shape)} "
            f"has {C} channels on axis {axis}; expected {name} of shape ({C},). "
            "Check num_features, or the channel axis (axis=-1 for (N, L, C) data)"
        )


def _check_mask(mask: Tensor, input: Tensor, axis: int) -> None:
    want = tuple(s for d, s in enumerate(input.shape) if d != axis)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = real element), got "
            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}; e.g. lengths_to_mask > 0"
        )
    if tuple(mask.shape) != want:
        raise ValueError(
            f"mask must have the input's shape without the channel axis {axis}: expected {want} for input "
            f"of shape {tuple(input.shape)}, got mask of shape {tuple(mask.shape)}"
        )
    if axis == 0:
        raise ValueError("mask needs the batch on axis 0 and the channels elsewhere; got channel axis 0")


def _check_variants(input, axis, momentum, eps, k, renorm, running_mean, process_group) -> None:
    """Checks of the general path (its own single-value check runs per group)."""
    _check_training(input, axis, momentum, eps, single_value_check=False)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"virtual_batch_size must be a positive int (samples per ghost batch), got {k!r}")
        if axis == 0:
            raise ValueError("virtual_batch_size splits axis 0 (the batch), but the channel axis is 0")
    if renorm is not None:
        r_max, d_max = renorm
        if not isinstance(r_max, Tensor) and not (r_max >= 1 and d_max >= 0):  # (tensors: Renorm.limits)
            raise ValueError(f"renorm needs r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if running_mean is None:
            raise ValueError(
                "batch renormalization corrects the batch statistics towards the running statistics, "
                "but running_mean/running_var are None (track_running_stats=False)"
            )
    if process_group is not None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group given (SyncBN) but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first, or pass process_group=None"
        )


def _check_training(input: Tensor, axis: int, momentum: float, eps: float, single_value_check: bool = True) -> None:
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not isinstance(momentum, Tensor) and not 0.0 <= momentum <= 1.0:  # (tensors: batch_norm_with_status)
        raise ValueError(
            f"momentum must be in [0, 1] (PyTorch convention: the weight of the new batch, "
            f"default 0.1), got {momentum}. A Keras/Flax momentum of 0.99 is momentum=0.01 here"
        )
    C = input.shape[axis]
    m = input.numel() // C if C else 0
    if m == 1 and single_value_check:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(input.shape)}: each of the {C} channels has a single value, so its batch "
            "variance is 0 and the output would be beta whatever the input. Use eval mode "
            "(running statistics), a larger batch, virtual batches, or GroupNorm/LayerNorm, "
            "which do not depend on the batch"
        )


# --------------------------------------------------------------------------- helpers


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(ndim: int, axis: int) -> list[int]:
    return [d for d in range(ndim) if d != axis]


def _view(v: Tensor, ndim: int, axis: int) -> Tensor:
    """(C,) -> shape broadcasting along `axis` of an ndim tensor, e.g. (1, C, 1, 1)."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


def _inference(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
    fast: bool = False,
) -> Tensor:
    """y = x * scale + shift with fixed statistics: one fused multiply-add pass.

    Composed of differentiable torch ops, so gradients (of any order) flow to
    input, weight and bias as in torch.
    """
    path = None
    if fast and input.numel() and not _wants_grad(input, mean, var, weight, bias):
        vectors = _cpu_ops.operands(input, axis, mean, var, weight, bias) if _compiling_kernel(input) else None
        if vectors is not None:
            return torch.ops.batchnorm.cpu_eval(input, *vectors, eps, axis)
        if _native_is_cheaper("eval", input, axis, mean, var, weight, bias):
            return _torch_eval(input, mean, var, weight, bias, eps, axis)
        acb = _kernel_layout(input, axis)
        if acb is not None:  # scale and shift are computed inside the kernel
            return _cpu.eval_forward(input, mean, var, weight, bias, eps, axis, acb)
        path = _pick_path(input, axis)
        if path == "torch":
            return _torch_eval(input, mean, var, weight, bias, eps, axis)
        if path == "triton":  # scale and shift are computed inside the kernel: one launch
            return _triton_bn().eval_forward(input, mean, var, weight, bias, eps, axis)
    acc = _acc_dtype(input.dtype)
    scale, shift = _eval_coefficients(mean, var, weight, bias, eps, acc)
    x = input if input.dtype == acc else input.to(acc)
    y = torch.addcmul(_view(shift, input.dim(), axis), x, _view(scale, input.dim(), axis))
    return y.to(input.dtype)


def _eval_coefficients(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(scale, shift) in `acc`: scale = weight * (var + eps)^-1/2, shift = bias - mean * scale."""
    return _coefficients(mean.to(acc), torch.rsqrt(var.to(acc) + eps), weight, bias, acc)


def _coefficients(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(scale, shift) in `acc` from mean and invstd: scale = weight * invstd, shift = bias - mean * scale."""
    scale = invstd if weight is None else invstd * weight.to(acc)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return scale, shift


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch.no_grad()
def _update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, unbiased: Tensor, momentum: float | Tensor
) -> bool | Tensor:
    """running = (1 - momentum) * running + momentum * batch, skipped if the batch is not finite.

    `unbiased` is the batch's unbiased variance m / (m - 1) * sigma2_B, what running_var stores.
    While a graph is recorded (torch.compile, torch.export, torch.jit.trace) the test is part of
    the graph: the update is a select, and the result a 0-dim bool tensor (no warning). On a CUDA
    device the same, so that the step does not wait for the GPU, in one Triton launch where it
    takes the buffers (`triton_bn.update_running`; torch ops, about 15 small launches, on the
    "composite" backend); a kept-out batch is counted on the device and the warning comes when
    the count reaches the host (`_report_skips`).
    """
    recording = _recording()
    if _backend in _KERNEL_BACKENDS and not recording:  # the CPU kernel's one call, where it takes them
        updated = _cpu.update_running_unbiased(mean, unbiased, running_mean, running_var, momentum)
        if updated is not None:
            if not updated:
                _warn_not_finite(stacklevel=4)
            return updated
    on_device = not recording and _reads_back_later(mean)
    skipped = _skip_count(mean.device) if on_device else None
    if on_device and _backend != "composite":  # one Triton launch where it takes the buffers (float32)
        flag = _triton_bn().update_running(mean, unbiased, running_mean, running_var, None, momentum, skipped)
        if flag is not None:
            _report_skips(mean.device)
            return flag
    finite = torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
    if recording or on_device:
        for running, batch in ((running_mean, mean), (running_var, unbiased)):
            moved = running * (1 - momentum) + batch.to(running.dtype) * momentum
            running.copy_(torch.where(finite, moved, running))
        if skipped is not None:
            skipped.add_(~finite)
            _report_skips(mean.device)
        return finite
    if not bool(finite):
        _warn_not_finite(stacklevel=4)
        return False
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return True


def _triton_update(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    m: int,
    momentum: float | Tensor,
    eps: float | None = None,
) -> bool | Tensor:
    """`_update_running_stats` from the batch's biased var (or, eps given, from torch's invstd in
    its place), in one Triton launch where it takes the buffers (`triton_bn.update_running`:
    float32) instead of about 15 small torch ops. On a CUDA device the same launch counts a
    kept-out batch (`_report_skips` warns later); under the interpreter its 0-dim result is read
    at once."""
    later = _reads_back_later(mean)
    skipped = _skip_count(mean.device) if later else None
    flag = _triton_bn().update_running(mean, var, running_mean, running_var, m, momentum, skipped, eps=eps)
    if flag is None:
        if eps is not None:
            var = _var_from_invstd(var, eps, mean.dtype)
        return _update_running_stats(running_mean, running_var, mean, var * (m / (m - 1)), momentum)
    if later:
        _report_skips(mean.device)
        return flag
    if not bool(flag):
        _warn_not_finite(stacklevel=4)
        return False
    return True


def _warn_not_finite(stacklevel: int) -> None:
    warnings.warn(_cpu.NOT_FINITE_MESSAGE, RuntimeWarning, stacklevel=stacklevel)


def _reads_back_later(t: Tensor) -> bool:
    """Whether a training step on `t`'s device reads its finiteness test back later instead of at
    once: on a CUDA device, reading a value back makes the host wait for the GPU to finish all the
    work queued so far, once per layer and step. There the running statistics take the select that
    graphs use, and the warning comes from `_report_skips`."""
    return t.is_cuda


def _count_batch(tracked: Tensor, counted: bool | Tensor) -> None:
    """num_batches_tracked += 1 where the batch counted: a bool, or a 0-dim bool tensor (on CUDA,
    or traced by torch.compile / torch.export) added on its device, never read back (int64 += bool:
    one op, one launch on a GPU)."""
    if isinstance(counted, Tensor):
        tracked.add_(counted)
    elif counted:
        tracked.add_(1)


def _cumulative_factor(tracked: Tensor) -> float | Tensor:
    """momentum=None's factor 1 / (num_batches_tracked + 1): a Python float, or a 0-dim float64
    tensor where reading the count back is not wanted (a graph being recorded, a CUDA buffer)."""
    if _recording() or _reads_back_later(tracked):
        return 1.0 / (tracked.to(torch.float64) + 1.0)
    return 1.0 / (float(tracked) + 1.0)


# How often (seconds) a device's count of kept-out batches is copied to the host, at most.
SKIP_REPORT_S = 0.25


class _Skips:
    """One device's count of training batches kept out of the running statistics (their mean or
    variance not finite), added on the device by the step that kept each out, and what the host
    has seen of it. Reading a per-step flag would cost each layer and step a copy to the host and
    an event; the count costs nothing more than the update's launch (`triton_bn.update_running`
    adds to it), and one copy every SKIP_REPORT_S."""

    __slots__ = ("copy", "count", "due", "host", "seen")

    def __init__(self, device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=device.type == "cuda")
        self.copy: Any = None  # the event after a copy of `count` into `host`, until it completes
        self.due = 0.0  # time.monotonic() of the next copy
        self.seen = 0  # the count the last warning reported


_skips: dict[torch.device, _Skips] = {}


def _skip_count(device: torch.device) -> Tensor | None:
    """The device's count of kept-out batches, made on first use; None while a CUDA graph is being
    captured before it exists (made then, it would belong to the graph's memory pool)."""
    skips = _skips.get(device)
    if skips is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        skips = _skips.setdefault(device, _Skips(device))  # (one count per device, if threads race here)
    return skips.count


def _report_skips(device: torch.device) -> None:
    """Warn about the batches the device has kept out since the last warning, once their count has
    reached the host, without waiting for it.

    On a CUDA device the count is copied into pinned host memory behind the queued work
    (non_blocking), with an event after it, at most every SKIP_REPORT_S seconds; a later call
    reads the copy once its event has completed, so the warning may come some steps after the
    batch (and comes for batches kept out in CUDA graph replays too). Not while a graph is
    captured. On another device (the Triton interpreter's CPU tensors) the count is read at once.
    """
    skips = _skips.get(device)
    if skips is None:
        return
    if device.type != "cuda":
        seen = int(skips.count)
    else:
        if torch.cuda.is_current_stream_capturing():
            return
        seen = None
        if skips.copy is not None and skips.copy.query():
            seen, skips.copy = int(skips.host), None
        now = time.monotonic()
        if skips.copy is None and now >= skips.due:
            skips.host.copy_(skips.count, non_blocking=True)  # (on the count's device's current stream,
            skips.copy = torch.cuda.Event()  # which need not be the current device's)
            skips.copy.record(torch.cuda.current_stream(device))
            skips.due = now + SKIP_REPORT_S
    if seen is not None and seen > skips.seen:
        kept_out, skips.seen = seen - skips.seen, seen
        warnings.warn(
            f"{_cpu.NOT_FINITE_MESSAGE} ({kept_out} batch{'es' if kept_out > 1 else ''} on {device}: "
            "counted there and reported once the count reached the host, maybe some steps late)",
            RuntimeWarning,
            stacklevel=4,
        )


class _FusedUpdate:
    """Running statistics for the CPU kernel to update in the forward call itself (same rule as
    `_update_running_stats`). `updated` afterwards: True, False (the batch was not finite, nothing
    written) or None (buffers of another dtype or layout: the caller updates them)."""

    __slots__ = ("mean", "momentum", "updated", "var")

    def __init__(self, mean: Tensor | None, var: Tensor | None, momentum: float) -> None:
        self.mean, self.var, self.momentum = mean, var, momentum
        self.updated: bool | None = None

    @staticmethod
    def make(path: str, running_mean, running_var, momentum: float) -> _FusedUpdate | None:
        return _FusedUpdate(running_mean, running_var, momentum) if path == "cpu" and running_mean is not None else None


def _cpu_forward(input, weight, bias, eps, axis, fused: _FusedUpdate | None):
    """The CPU kernel's training forward: (y, mean, var, invstd), updating `fused`'s buffers."""
    rm, rv, momentum = (None, None, 0.0) if fused is None else (fused.mean, fused.var, fused.momentum)
    y, mean, var, invstd, updated = _cpu.train_forward_update(input, weight, bias, eps, axis, rm, rv, momentum)
    if fused is not None:
        fused.updated = updated
    return y, mean, var, invstd


# --------------------------------------------------------------------------- autograd


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode BN with the closed-form backward of the module docstring.

    Returns y only; the batch's mean and biased var are appended to `stats`. They need no
    gradient, and each output of a Function costs autograd bookkeeping: ~2.5 us a step
    (fwd+bwd) less than returning them marked non-differentiable.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        axis: int,
        path: str,
        fused: _FusedUpdate | None,
        stats: list[Tensor],
    ):
        ctx.eps, ctx.axis, ctx.path = eps, axis, path
        ctx.bias_dtype = None if bias is None else bias.dtype
        if path == "cpu":
            y, mean, var, invstd = _cpu_forward(input, weight, bias, eps, axis, fused)
            ctx.save_for_backward(input, weight, mean, invstd)
            stats += (mean, var)
            return y
        if path == "triton":
            y, mean, invstd, var = _triton_bn().train_forward(input, weight, bias, eps, axis, return_var=True)
            ctx.save_for_backward(input, weight, mean, invstd)
            stats += (mean, var)
            return y
        ndim = input.dim()
        dims = _reduce_dims(ndim, axis)
        acc = _acc_dtype(input.dtype)
        m = input.numel() // input.shape[axis]
        # Two-pass statistics: the mean, then the sum of squared deviations from
        # it (no E[x^2] - E[x]^2 cancellation). The output buffer holds x - mean
        # in between, so the whole forward allocates one tensor of x's size.
        mean = input.sum(dims, dtype=acc) / m  # (C,)
        y = torch.empty_like(input, dtype=acc)
        torch.sub(input, _view(mean, ndim, axis), out=y)
        var = y.square_().sum(dims) / m  # (C,) biased
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(acc)
        torch.addcmul(_view(shift, ndim, axis), input, _view(scale, ndim, axis), out=y)
        y = y.to(input.dtype)

        ctx.save_for_backward(input, weight, mean, invstd)
        stats += (mean, var)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: gradients of gradients are wanted, so build the
            # backward from differentiable ops that see x again.
            return (*_backward_differentiable(ctx, input, weight, dy), None, None, None, None, None)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.path == "triton":
            dx, dw, db = _triton_bn().train_backward(dy, input, weight, mean, invstd, ctx.axis, need_x)
            dw = dw.to(weight.dtype) if need_w and weight is not None else None
            db = db.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
            return dx if need_x else None, dw, db, None, None, None, None, None
        if ctx.path == "cpu":
            dx, s1, s2 = _cpu.train_backward(dy, input, weight, mean, invstd, ctx.axis, need_x)
            dw = (s2 * invstd).to(weight.dtype) if need_w and weight is not None else None
            db = s1.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
            return dx, dw, db, None, None, None, None, None

        axis, ndim = ctx.axis, input.dim()
        dims = _reduce_dims(ndim, axis)
        acc = mean.dtype
        m = input.numel() // input.shape[axis]

        # One reduction pass (s1, s2), one elementwise pass (dx); the dx buffer
        # holds (x - mean) * dy in between, so nothing else of x's size is made.
        s1 = dy.sum(dims, dtype=acc)  # (C,) sum(dy)
        dx = torch.empty_like(input, dtype=acc)
        torch.sub(input, _view(mean, ndim, axis), out=dx)
        s2 = dx.mul_(dy).sum(dims)  # (C,) sum(dy * (x - mean))
        dw = db = None
        if need_x:
            k = invstd if weight is None else invstd * weight.to(acc)
            b = -k * invstd * invstd * s2 / m
            c = -k * s1 / m - b * mean
            torch.addcmul(_view(c, ndim, axis), input, _view(b, ndim, axis), out=dx)
            dx.addcmul_(dy, _view(k, ndim, axis))
            dx = dx.to(input.dtype)
        else:
            dx = None
        if need_w and weight is not None:
            dw = (s2 * invstd).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = s1.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None


def _backward_differentiable(ctx, input: Tensor, weight: Tensor | None, dy: Tensor):
    """The backward recomputed from x with differentiable ops (for double backward).

    dx = gamma * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))
    """
    axis, ndim = ctx.axis, input.dim()
    dims = _reduce_dims(ndim, axis)
    acc = _acc_dtype(input.dtype)
    x, g = input.to(acc), dy.to(acc)
    m = input.numel() // input.shape[axis]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    invstd = torch.rsqrt(var + ctx.eps)
    x_hat = (x - _view(mean, ndim, axis)) * _view(invstd, ndim, axis)
    s1 = g.sum(dims)
    s2 = (g * x_hat).sum(dims)
    k = invstd if weight is None else invstd * weight.to(acc)
    dx = _view(k / m, ndim, axis) * (m * g - _view(s1, ndim, axis) - x_hat * _view(s2, ndim, axis))
    dw = s2.to(weight.dtype) if weight is not None else None
    db = s1.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx.to(input.dtype), dw, db
