"""Swap BN layers between torch's classes and ours, and freeze them.

Conversion changes the class of each layer and nothing else: the same
parameter and buffer tensors (so an optimizer keeps working), device, dtype,
requires_grad, hooks and training flag. Round trips are exact because both
sides share torch's buffers and numerical conventions.
"""

from __future__ import annotations

from torch import nn

from .. import modules as ours
from ..modules import _retype

__all__ = ["convert_batchnorm", "freeze_batchnorm", "unfreeze_batchnorm"]

_TO_OURS: dict[type, type] = {
    nn.BatchNorm1d: ours.BatchNorm1d,
    nn.BatchNorm2d: ours.BatchNorm2d,
    nn.BatchNorm3d: ours.BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {v: k for k, v in _TO_OURS.items()}


def _convert(module: nn.Module, table: dict[type, type], prefix: str) -> nn.Module:
    target = table.get(type(module))
    if target is not None:
        if table is _TO_TORCH:
            extras = [k for k in ("frozen", "virtual_batch_size", "renorm") if getattr(module, k, None)]
            if extras:
                raise ValueError(
                    f"{prefix or 'the model'} uses {', '.join(extras)}, which torch's BN layers do not have; "
                    "unfreeze it (batchnorm.unfreeze_batchnorm) or drop the variant first"
                )
        module = _retype(module, target)
        for key in ("frozen", "virtual_batch_size", "renorm"):
            module.__dict__.pop(key, None)
        return module
    if type(module) is ours.BatchNorm and table is _TO_TORCH:
        raise ValueError(
            f"{prefix or 'the model'} is a batchnorm.BatchNorm (axis={module.axis}), which has no torch "
            "counterpart; use BatchNorm1d/2d/3d for torch's layout, or keep it as ours"
        )
    for name, child in module.named_children():
        new = _convert(child, table, f"{prefix}{name}")
        if new is not child:
            setattr(module, name, new)
    return module


def convert_batchnorm(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace torch.nn.BatchNorm1d/2d/3d by ours (to="batchnorm") or ours by torch's (to="torch").

    Works recursively and in place on the children, like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm, and returns the model (a
    new object only when the model itself is a BN layer). Every tensor,
    device, dtype, requires_grad and training flag is kept; the numbers the
    layers produce are the same.

    Raises ValueError for an unknown `to`, and when converting to torch a
    generic `batchnorm.BatchNorm` (no torch counterpart) or a frozen layer.
    """
    tables = {"batchnorm": _TO_OURS, "torch": _TO_TORCH}
    if to not in tables:
        raise ValueError(f"convert_batchnorm: to must be 'batchnorm' or 'torch', got {to!r}")
    return _convert(model, tables[to], "")


def freeze_batchnorm(model: nn.Module, *, train_affine: bool | None = None) -> nn.Module:
    """Freeze every BN layer: normalize with the running statistics, in training too, and never update them.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, the same
    formula as torchvision's FrozenBatchNorm2d, for any rank; for fine-tuning
    with tiny batches. torch's BN layers are first converted to ours
    (`convert_batchnorm`). `train_affine=False` / `True` sets requires_grad of
    weight and bias; None (the default) leaves it as it is. Returns the model
    (converted in place, as convert_batchnorm). Raises ValueError for a layer
    without running statistics.
    """
    model = convert_batchnorm(model, to="batchnorm")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ours._Forward)]
    for name, layer in layers:
        if layer.running_mean is None:
            raise ValueError(
                f"cannot freeze {name or 'the model'}: it has no running statistics "
                "(track_running_stats=False); frozen BN normalizes with them"
            )
    for _, layer in layers:
        layer.frozen = True
        if train_affine is not None:
            for p in (layer.weight, layer.bias):
                if p is not None:
                    p.requires_grad_(train_affine)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo freeze_batchnorm: the layers use batch statistics in training again."""
    for m in model.modules():
        if isinstance(m, ours._Forward):
            m.frozen = False
            m.__dict__.pop("frozen", None)
    return model
