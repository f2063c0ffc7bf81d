"""Fold eval-mode BN into the neighbouring convolution or linear layer: BN becomes free.

In eval mode BN is a per-channel affine map, y = x * s + t with

    s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s,

so it merges into an adjacent linear map:

- after a conv / linear layer z = W x + b (BN on its output channels):
      W' = s * W (per output channel),   b' = s * b + t;
- before a linear layer or an unpadded 1x1 convolution z = W y + b (BN on its
  input channels; "forward folding"):
      W' = W * s (per input channel),    b' = b + W t.
  (Padding would put zeros where BN would have put t, hence unpadded only.)

Transposed convolutions store W as (in, out/groups, k...): output channel
j of group g is column j of that group's block, which `fold_weights` indexes
explicitly. (PyTorch's fuse_conv_bn_weights scales dimension 1 as if groups
were 1: for a grouped transposed convolution, torch 2.13's fuse_conv_bn_eval
raises a shape error.)

`fold_batchnorm(model)` works on arbitrary forward code through torch.fx and
falls back to walking nn.Sequential containers where fx cannot trace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import batchnorm_layers, channel_axis

__all__ = ["FoldReport", "bn_affine", "fold_batchnorm", "fold_weights", "fold_weights_forward"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def bn_affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """(s, t) of eval-mode BN as y = x * s + t, in float64."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def fold_weights(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, *, transposed: bool = False, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """W' = s * W per output channel, b' = s * b + t (BN after the layer).

    weight: (out, in/groups, k...) for conv and linear; (in, out/groups, k...)
    for transposed conv. Returns float64 tensors; the caller casts them.
    """
    w = weight.detach().double()
    b = torch.zeros_like(s) if bias is None else bias.detach().double()
    if transposed:
        in_ch, out_per_group = w.shape[0], w.shape[1]
        blocks = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
        scale = s.reshape(groups, 1, out_per_group, *([1] * (w.dim() - 2)))
        w = (blocks * scale).reshape(w.shape)
    else:
        w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    return w, s * b + t


def fold_weights_forward(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """W' = W * s per input channel, b' = b + W t (BN before a linear or 1x1, groups=1, layer)."""
    w = weight.detach().double()
    b = (
        torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if bias is None
        else bias.detach().double()
    )
    shape = [1, -1] + [1] * (w.dim() - 2)
    folded = w * s.reshape(shape)
    shift = (w * t.reshape(shape)).sum(dim=tuple(range(1, w.dim())))
    return folded, b + shift


@dataclass
class FoldReport:
    """What fold_batchnorm did: folded pairs, and BN layers kept with the reason."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (bn, into layer)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)
    method: str = ""

    def __str__(self) -> str:
        lines = [f"fold_batchnorm ({self.method}): {len(self.folded)} folded, {len(self.kept)} kept"]
        lines += [f"  folded {b} into {into}" for b, into in self.folded]
        lines += [f"  kept {b}: {why}" for b, why in self.kept]
        return "\n".join(lines)


def _fused(layer: nn.Module, w: Tensor, b: Tensor) -> nn.Module:
    """A copy of layer with weight w and a bias b, in the layer's dtype and device."""
    new = copy.deepcopy(layer)
    ref = layer.weight
    new.weight = nn.Parameter(w.to(ref.dtype), requires_grad=ref.requires_grad)
    new.bias = nn.Parameter(b.to(ref.dtype), requires_grad=ref.requires_grad)
    return new


def _why_not_backward(layer: nn.Module, bn: _BatchNorm) -> str | None:
    """Why BN cannot fold into the layer before it (None if it can)."""
    if not isinstance(layer, (*_CONVS, *_TCONVS, nn.Linear)):
        return f"follows a {type(layer).__name__}, not a convolution or linear layer"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"has {bn.num_features} channels but the layer before it has {out} outputs"
    if isinstance(layer, nn.Linear) and channel_axis(bn) % 2 != 1:
        return "normalizes an axis other than the linear layer's output features"
    if not isinstance(layer, nn.Linear) and channel_axis(bn) != 1:
        return "normalizes an axis other than the convolution's channel axis"
    return None


def _why_not_forward(bn: _BatchNorm, layer: nn.Module) -> str | None:
    """Why BN cannot fold into the layer after it (None if it can)."""
    if isinstance(layer, nn.Linear):
        if layer.in_features != bn.num_features or channel_axis(bn) not in (1, -1):
            return "the linear layer after it does not take its channels as input features"
        return None
    if isinstance(layer, _CONVS):
        if any(k != 1 for k in layer.kernel_size):
            return "the convolution after it is not 1x1"
        if layer.padding == "same" or any(p != 0 for p in layer.padding) or layer.padding_mode != "zeros":
            return "the 1x1 convolution after it pads (padding would see zeros where BN would put its shift)"
        if layer.groups != 1 or layer.in_channels != bn.num_features or channel_axis(bn) != 1:
            return "the 1x1 convolution after it is grouped or has other input channels"
        return None
    return f"the layer after it ({type(layer).__name__}) is not a linear layer or an unpadded 1x1 conv"


def _fold_backward(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    s, t = bn_affine(bn)
    transposed = isinstance(layer, _TCONVS)
    groups = getattr(layer, "groups", 1)
    w, b = fold_weights(layer.weight, layer.bias, s, t, transposed=transposed, groups=groups)
    return _fused(layer, w, b)


def _fold_forward(bn: _BatchNorm, layer: nn.Module) -> nn.Module:
    s, t = bn_affine(bn)
    w, b = fold_weights_forward(layer.weight, layer.bias, s, t)
    return _fused(layer, w, b)


def _check_eval(model: nn.Module) -> None:
    training = [n or "(model)" for n, m in batchnorm_layers(model) if m.training]
    if training:
        raise ValueError(
            f"fold_batchnorm needs BN layers in eval mode, but {len(training)} are training "
            f"(e.g. {training[0]}): in training BN normalizes with each batch's statistics, which "
            "cannot be folded into weights. Call model.eval() first"
        )


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A new model with every foldable eval-mode BN folded into its neighbour; the input is untouched.

    BN after Conv1d/2d/3d, ConvTranspose1d/2d/3d (grouped too) or Linear folds
    into that layer; BN directly before a Linear or an unpadded 1x1 convolution
    folds forward into it; any other BN is kept. The returned module carries a
    `fold_report` (FoldReport) listing what was folded and why the rest was kept.

    torch.fx traces arbitrary forward code (residual blocks, functional ReLUs);
    where tracing fails, nn.Sequential containers are walked instead.

    Raises ValueError if a BN layer is in training mode.
    """
    _check_eval(model)
    try:
        traced = _trace(copy.deepcopy(model))
    except Exception as exc:  # fx cannot trace data-dependent control flow and more
        folded = copy.deepcopy(model)
        report = FoldReport(method=f"module walk (fx could not trace: {type(exc).__name__})")
        _fold_sequentials(folded, report, prefix="")
    else:
        report = FoldReport(method="torch.fx")
        folded = _fold_graph(traced, report)
    names = {n for n, _ in report.folded}
    seen = {n for n, _ in report.kept}
    for name, _ in batchnorm_layers(folded):
        if name not in names and name not in seen:
            report.kept.append((name, "not found next to a foldable layer"))
    folded.fold_report = report
    return folded


class _LeafBatchNorm(fx.Tracer):
    """Traces into user code but keeps every BN layer (ours too) as one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    graph = _LeafBatchNorm().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _called_once(graph: fx.Graph, target: str) -> bool:
    """A module called at several places cannot take one BN's statistics."""
    return sum(n.op == "call_module" and n.target == target for n in graph.nodes) == 1


def _fold_graph(gm: fx.GraphModule, report: FoldReport) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        # Look modules up afresh: an earlier fold may have replaced one.
        modules = dict(gm.named_modules())
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            report.kept.append((node.target, "has no running statistics (track_running_stats=False)"))
            continue
        prev = node.args[0] if node.args else None
        # 1. into the layer before: conv/linear -> BN, the layer's output used only by BN.
        why = "its input is not a module's output"
        if (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and _single_user(prev)
            and _called_once(graph, prev.target)
        ):
            layer = modules[prev.target]
            why = _why_not_backward(layer, bn)
            if why is None:
                _set_module(gm, prev.target, _fold_backward(layer, bn))
                node.replace_all_uses_with(prev)
                graph.erase_node(node)
                _set_module(gm, node.target, nn.Identity())
                report.folded.append((node.target, prev.target))
                continue
        elif isinstance(prev, fx.Node) and prev.op == "call_module":
            why = "the layer before it feeds other nodes too"
        # 2. forward into the layer after: BN -> linear / 1x1 conv, BN's output used only there.
        users = list(node.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and users[0].args[0] is node
            and _called_once(graph, users[0].target)
        ):
            nxt = modules[users[0].target]
            why_fwd = _why_not_forward(bn, nxt)
            if why_fwd is None:
                _set_module(gm, users[0].target, _fold_forward(bn, nxt))
                node.replace_all_uses_with(prev)
                graph.erase_node(node)
                _set_module(gm, node.target, nn.Identity())
                report.folded.append((node.target, users[0].target))
                continue
            why = f"{why}; {why_fwd}"
        report.kept.append((node.target, why))
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


def _fold_sequentials(module: nn.Module, report: FoldReport, prefix: str) -> None:
    """Fallback: fold adjacent (layer, BN) and (BN, layer) pairs inside nn.Sequential containers."""
    for name, child in module.named_children():
        _fold_sequentials(child, report, f"{prefix}{name}.")
    if not isinstance(module, nn.Sequential):
        return
    keys = list(module._modules)
    for i, key in enumerate(keys):
        bn = module._modules[key]
        if not isinstance(bn, _BatchNorm) or not bn.track_running_stats:
            continue
        if i > 0 and _why_not_backward(module._modules[keys[i - 1]], bn) is None:
            module._modules[keys[i - 1]] = _fold_backward(module._modules[keys[i - 1]], bn)
            module._modules[key] = nn.Identity()
            report.folded.append((prefix + key, prefix + keys[i - 1]))
        elif i + 1 < len(keys) and _why_not_forward(bn, module._modules[keys[i + 1]]) is None:
            module._modules[keys[i + 1]] = _fold_forward(bn, module._modules[keys[i + 1]])
            module._modules[key] = nn.Identity()
            report.folded.append((prefix + key, prefix + keys[i + 1]))
