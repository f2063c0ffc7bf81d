"""Shared helpers of the model tools: finding BN layers, feeding loader items."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> Iterator[tuple[str, _BatchNorm]]:
    """Every BN layer of the model, torch's and ours (SyncBN included), with its name."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            yield name, module


def channel_axis(layer: nn.Module) -> int:
    """The channel axis of a BN layer's input: `axis` for ours, 1 for torch's."""
    return getattr(layer, "axis", 1)


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _to(item: Any, device: torch.device) -> Any:
    if isinstance(item, torch.Tensor):
        return item.to(device)
    if isinstance(item, (list, tuple)):
        return type(item)(_to(v, device) for v in item)
    if isinstance(item, dict):
        return {k: _to(v, device) for k, v in item.items()}
    return item


def default_forward(model: nn.Module, item: Any) -> Any:
    """Feed one loader item: a tensor is the input, a tuple/list's first element is,
    and a dict is passed as keyword arguments."""
    if isinstance(item, torch.Tensor):
        return model(item)
    if isinstance(item, (list, tuple)) and item:
        return model(item[0])
    if isinstance(item, dict):
        return model(**item)
    raise TypeError(
        f"cannot feed a loader item of type {type(item).__name__} to the model; items may be tensors, "
        "tuples/lists (first element = input) or dicts (keyword arguments); pass forward=callable(model, "
        "item) for anything else"
    )


def feed(
    model: nn.Module,
    loader: Any,
    forward: Callable[[nn.Module, Any], Any] | None,
    max_batches: int | None,
    progress: bool,
    description: str,
) -> int:
    """Run the model over the loader without gradients; return the number of batches fed."""
    device = model_device(model)
    forward = forward or default_forward
    try:
        total = len(loader)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    items = iter(loader)
    bar = _progress(progress, total, description)
    batches = 0
    with torch.no_grad(), bar:
        for item in items:
            if max_batches is not None and batches >= max_batches:
                break
            forward(model, _to(item, device))
            batches += 1
            bar.advance()
    return batches


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self) -> None:
        pass


class _RichBar(_NoBar):
    def __init__(self, total: int | None, description: str) -> None:
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._task = self._p.add_task(description, total=total)

    def __enter__(self):
        self._p.start()
        return self

    def __exit__(self, *exc):
        self._p.stop()
        return False

    def advance(self) -> None:
        self._p.advance(self._task)


def _progress(enabled: bool, total: int | None, description: str) -> _NoBar:
    """A rich progress bar for long runs (more than a handful of batches), if rich is installed."""
    if not enabled or (total is not None and total < 5):
        return _NoBar()
    try:
        return _RichBar(total, description)
    except ImportError:
        return _NoBar()
