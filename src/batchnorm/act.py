"""BN + ReLU and BN + residual add + ReLU in one layer: the tail of a ResNet block.

    y = relu(BN(x) + residual)        (residual optional)

On CUDA with Triton the training forward is one fused pass after the
statistics and the backward recomputes the ReLU mask from x and the saved
statistics instead of storing it (`kernels.triton_bn.train_forward_act`);
inference is one pass and one launch (`kernels.triton_bn.eval_forward` with the
residual and the ReLU: scale and shift from the running statistics in the kernel).
On the CPU kernel the add and the ReLU ride in BN's apply pass, in training
and in inference, and without a residual the ReLU's backward rides in BN's
backward passes: one C++ call each (the entry points `act_train_step`, with
its autograd node, and `act_eval` of `kernels/bn_cpu_ext.cpp`), or `_CpuAct`
and `kernels.cpu.eval_forward(relu=True)` where those cannot be built; in
graphs that torch.compile or torch.export record, the kernel's operators
(`kernels.cpu_ops.cpu_relu_train` and its kin).
Everywhere else, and with masks, ghost batches, renorm or SyncBN, it is the
composite relu(BN(x) + residual) with the same numbers. PyTorch eager has no
such fused layer (it never calls cuDNN's fused BN-add-activation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import (
    _backward_differentiable,
    _check_training,
    _coefficients,
    _compiling_kernel,
    _count_batch,
    _cumulative_factor,
    _native_is_cheaper,
    _pick_path,
    _triton_update,
    _update_running_stats,
    _view,
    _wants_grad,
    _warn_not_finite,
    get_backend,
)
from .kernels import cpu
from .kernels import cpu_ops as _cpu_ops
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _check_num_features, _Forward

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormActNd"]

# Under the "auto" backend, eager CPU calls below this many elements take the composite: there a
# call costs mostly fixed overhead. With the C++ entry points (`_bn_cpu_ext.act_train_step`,
# `act_eval`) the fused training step is never slower (2 cores, fused / composite, NCHW: 8192
# elements 41 / 41 us, 65536 58 / 66 us, 262144 129 / 360 us), but eval below 2**16 elements
# loses 2-4 us to the layer's Python checks (8192: 11 / 7 us). Without them (ctypes, an autograd
# Function in Python) the fused step costs 20-25 us more than the composite below 2**18
# elements (65536: 90 / 68 us, 131072: 111 / 94 us, 262144: 162 / 330 us).
FUSED_MIN_ELEMS = 1 << 16
FUSED_MIN_ELEMS_CTYPES = 1 << 18


class _FusedAct(torch.autograd.Function):
    """Training relu(BN(x) + residual) on the Triton kernels (`triton_bn.train_forward_act`), the
    ReLU's mask recomputed in the backward from x rather than stored. Returns y; the batch's (mean,
    biased var) are appended to `stats` (the caller updates the running statistics, as functional's
    Triton path does: all channels or none, with a warning). With create_graph=True the backward is
    built from differentiable ops instead, as `_CpuAct`'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, axis, stats: list):
        from .kernels import triton_bn

        y, mean, invstd, var = triton_bn.train_forward_act(
            x, weight, bias, eps, axis, residual, "relu", return_var=True
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd, residual)
        ctx.axis, ctx.eps, ctx.bias_dtype = axis, eps, None if bias is None else bias.dtype
        stats += (mean, var)
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import triton_bn

        x, weight, bias, mean, invstd, residual = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # gradients of gradients wanted: g = dy * mask, then BN's backward
            ndim = x.dim()
            scale, shift = _coefficients(mean, invstd, weight, bias, torch.float32)
            pre = torch.addcmul(_view(shift, ndim, ctx.axis), x.float(), _view(scale, ndim, ctx.axis))
            passed = (pre if residual is None else pre + residual.float()) > 0  # (may differ where y ~ 0)
            g = dy * passed
            dx, dw, db = _backward_differentiable(ctx, x, weight, g)
            return dx, dw, db, g if need_r else None, None, None, None
        dx, dw, db, dres = triton_bn.train_backward_act(dy, x, weight, bias, mean, invstd, ctx.axis, residual, need_x)
        dw = dw.to(weight.dtype) if weight is not None and need_w else None
        db = db.to(bias.dtype) if bias is not None and need_b else None
        return dx, dw, db, dres if need_r else None, None, None, None


class _CpuAct(torch.autograd.Function):
    """Training relu(BN(x) + residual) on the CPU kernel (`cpu.train_forward_relu`).

    Forward: the statistics pass, then one pass that writes relu((x - mean) * scale + shift +
    residual): x read twice and the residual once, y written once; the composite makes two
    more passes over tensors of x's size for the ReLU, three more for the add.
    Backward without a residual: BN's backward with dy gated by the forward's ReLU test,
    recomputed from x and the saved (scale, shift) in both of its passes (no mask or output
    stored; BN's passes alone, where the composite adds three for the ReLU's backward). With
    a residual: g = dy where y > 0 (torch's ReLU backward, from the saved output), the
    residual's gradient, then BN's backward with g. With create_graph=True the backward is
    built from differentiable ops instead (as `_BatchNormTrain`'s), so that it can be
    differentiated again.
    Returns y; the batch's (mean, var, updated) are appended to `status`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, axis, running_mean, running_var, momentum, status: list):
        y, mean, var, invstd, updated, gate = cpu.train_forward_relu(
            x, residual, weight, bias, eps, axis, running_mean, running_var, momentum
        )
        ctx.save_for_backward(x, weight, mean, invstd, gate if residual is None else y)
        ctx.axis, ctx.eps, ctx.bias_dtype = axis, eps, None if bias is None else bias.dtype
        ctx.has_residual = residual is not None
        status += (mean, var, updated)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, gate_or_y = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # gradients of gradients wanted: g = dy * mask, then BN's backward
            if ctx.has_residual:
                passed = gate_or_y > 0
            else:  # the forward's ReLU test from torch ops (two roundings: it may differ where y ~ 0)
                scale, shift = (_view(v, x.dim(), ctx.axis) for v in gate_or_y)
                passed = torch.addcmul(shift, x.float() - _view(mean, x.dim(), ctx.axis), scale) > 0
            g = dy * passed
            dx, dw, db = _backward_differentiable(ctx, x, weight, g)
            return dx, dw, db, g if need_r else None, None, None, None, None, None, None
        g = None  # the residual's gradient (of x's dtype, as the residual is: `_fused_path`)
        if ctx.has_residual:
            g = torch.ops.aten.threshold_backward(dy, gate_or_y, 0)
            dx, s1, s2 = cpu.train_backward(g, x, weight, mean, invstd, ctx.axis, need_x)
        else:
            dx, s1, s2 = cpu.train_backward(dy, x, weight, mean, invstd, ctx.axis, need_x, relu_gate=gate_or_y)
        dw = (s2 * invstd).to(weight.dtype) if need_w and weight is not None else None
        db = s1.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return dx, dw, db, g if need_r else None, None, None, None, None, None, None


def _ext_call(ext, name: str, *args):
    """ext.name(*args), or None where the C++ entry points are not there or decline the call."""
    if ext is None:
        return None
    try:
        return getattr(ext, name)(*args)
    except TypeError:  # an argument of another type (pybind11's message): the Python path takes it
        return None


class _ActMixin:
    """forward(x, residual=None, mask=None) = relu(BN(x) + residual)."""

    def forward(self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if residual is not None and residual.shape != input.shape:
            raise ValueError(f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        path = self._fused_path(input, residual, mask)
        if path is not None:
            self._check_input_dim(input)
            _check_num_features(self, input)
            y = self._fused(path, input, residual)
            if y is not None:
                return y
        y = _Forward.forward(self, input, mask)
        if residual is not None:
            y = y + residual
        return torch.relu(y)

    def _fused(self, path: str, input: Tensor, residual: Tensor | None) -> Tensor | None:
        """The layer on a fused path, or None where the kernel's operators decline it in a graph."""
        axis = self.axis % input.dim()
        rm, rv, w, b = self.running_mean, self.running_var, self.weight, self.bias
        ext = cpu.extension() if path.startswith("cpu") else None  # the C++ entry points, where they take the call
        if path == "cpu-eval":
            y = _ext_call(ext, "act_eval", input, residual, rm, rv, w, b, self.eps, axis)
            if y is None:
                y = cpu.eval_forward(input, rm, rv, w, b, self.eps, axis, relu=True, residual=residual)
            return y
        if path == "triton-eval":  # one pass, one launch: relu(x * scale + shift + residual)
            from .kernels import triton_bn

            return triton_bn.eval_forward(input, rm, rv, w, b, self.eps, axis, residual, "relu")
        if path == "graph-eval":
            ops = _cpu_ops.operands(input, axis, rm, rv, w, b)
            return None if ops is None else torch.ops.batchnorm.cpu_relu_eval(input, residual, *ops, self.eps, axis)
        factor = self.momentum
        if self.momentum is None:  # (the operators of "graph-train" take a float)
            tracked = self.num_batches_tracked
            factor = _cumulative_factor(tracked) if path == "triton" else 1.0 / (float(tracked) + 1.0)
        if path == "graph-train":  # the operators; the buffers take the new statistics (as functional does)
            ops = _cpu_ops.operands(input, axis, w, b, running=(rm, rv))
            if ops is None:
                return None
            _check_training(input, axis, factor, self.eps)
            y, *_, new_mean, new_var, counted = torch.ops.batchnorm.cpu_relu_train(
                input, residual, *ops, self.eps, factor, axis
            )
            with torch.no_grad():
                rm.copy_(new_mean)
                rv.copy_(new_var)
            _count_batch(self.num_batches_tracked, counted)
            return y
        _check_training(input, axis, factor, self.eps)
        m = input.numel() // input.shape[axis]
        if path == "triton":  # the running statistics by the plain layer's rule, in one more launch
            stats: list = []
            y = _FusedAct.apply(input, w, b, residual, self.eps, axis, stats)
            updated = _triton_update(rm, rv, *stats, m, factor)
        else:
            step = _ext_call(ext, "act_train_step", input, residual, w, b, rm, rv, self.eps, factor, axis)
            if step is not None:  # (y, 1: updated, 0: a non-finite batch, nothing written)
                y, updated = step[0], step[1] == 1
            else:
                status: list = []
                y = _CpuAct.apply(input, w, b, residual, self.eps, axis, rm, rv, factor, status)
                mean, var, updated = status
            if updated is None:  # buffers the kernel does not update itself (another dtype)
                updated = _update_running_stats(rm, rv, mean, var * (m / (m - 1)), factor)
            elif not updated:
                _warn_not_finite(stacklevel=6)  # the caller of the layer
        _count_batch(self.num_batches_tracked, updated)
        return y

    def _fusable(self, input: Tensor, mask: Tensor | None) -> bool:
        """Whether the training forward takes a fused path (Triton, or the CPU kernel)."""
        return self._fused_path(input, None, mask) in ("triton", "cpu-train")

    def _fused_path(self, input: Tensor, residual: Tensor | None, mask: Tensor | None) -> str | None:
        """Which fused path runs: "triton" or "cpu-train" (training, plain BN), "triton-eval" or
        "cpu-eval" (the running statistics, no gradient wanted), "graph-train" or "graph-eval"
        (the same as the kernel's operators, in a graph that torch.compile or torch.export
        records), or None (the composite)."""
        if mask is not None or not isinstance(input, Tensor) or input.dim() < 2:
            return None
        if residual is not None and not (
            isinstance(residual, Tensor) and residual.device == input.device and residual.dtype == input.dtype
        ):  # (y + residual would promote, or fail)
            return None
        axis = self.axis % input.dim()
        graph = _compiling_kernel(input)
        if not self.training or self.frozen:
            stats = self.running_mean is not None and self.running_var is not None
            if not stats or _wants_grad(input, residual, self.weight, self.bias):
                return None
            if graph:
                return "graph-eval"
            path = _pick_path(input, axis)
            if path == "triton":  # (a small CUDA input: the plain layer's torch kernel, add and ReLU)
                vectors = (self.running_mean, self.running_var, self.weight, self.bias)
                return None if _native_is_cheaper("eval", input, axis, *vectors) else "triton-eval"
            return "cpu-eval" if input.is_cpu and path == "cpu" and self._big_enough(input) else None
        plain = (
            self.training
            and self.track_running_stats
            and not self.frozen
            and mask is None
            and self.virtual_batch_size is None
            and self.renorm is None
            and self._sync_group(input) is None
        )
        if not plain or input.numel() == 0:
            return None
        if graph:  # (momentum=None would read num_batches_tracked as a Python number)
            return "graph-train" if self.momentum is not None else None
        path = _pick_path(input, axis)
        if path == "triton":  # CUDA tensors (or CPU ones in triton's interpreter, forced: for tests)
            # A small CUDA input is the host's: the composite, with the plain layer on torch's kernel
            # (NATIVE_MAX_ELEMS_CUDA; host_overhead.py's "act" rows)
            mode = "train_grad" if _wants_grad(input, residual, self.weight, self.bias) else "train"
            return None if _native_is_cheaper(mode, input, axis, self.weight, self.bias) else "triton"
        return "cpu-train" if input.is_cpu and path == "cpu" and self._big_enough(input) else None

    @staticmethod
    def _big_enough(input: Tensor) -> bool:
        least = FUSED_MIN_ELEMS if cpu.extension() is not None else FUSED_MIN_ELEMS_CTYPES
        return get_backend() != "auto" or input.numel() >= least


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
