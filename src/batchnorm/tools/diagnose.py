"""`diagnose(model, loader)`: why is my model good in train mode and bad in eval mode?

For every BN layer, over the same data:

- train/eval gap: ||y_train - y_eval|| / ||y_eval|| of the layer's output with
  batch statistics (train mode) and with running statistics (eval mode);
- running statistics against the exact population statistics of the data
  (`population_statistics`): mean error in units of the population std,
  max over channels |running_mean - E[x]| / sqrt(Var[x] + eps), and relative
  variance error, max over channels |running_var - Var[x]| / (Var[x] + eps);
- channels whose population variance is below 1e-6 (the layer divides by
  sqrt(eps) there) and channels whose |gamma| is below 1e-3 (switched off);
- a momentum between 0.5 and 1 (exclusive): PyTorch's momentum weights the new batch
  (0.1), Keras and Flax call the complement momentum (0.99), and a ported value
  makes the running statistics follow each batch almost entirely;
- running statistics that never moved (num_batches_tracked 0, or still the
  initial mean 0 and variance 1).

The model is not modified: the measurements run on a copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ._common import batchnorm_layers, feed
from .population import population_statistics

__all__ = ["DiagnosisReport", "LayerDiagnosis", "diagnose"]

LOW_VAR = 1e-6
LOW_GAMMA = 1e-3
GAP_WARN = 0.1
STATS_WARN = 0.1


@dataclass
class LayerDiagnosis:
    name: str
    kind: str
    channels: int
    train_eval_gap: float | None  # relative L2 difference of outputs
    mean_error: float | None  # max over channels, in population stds
    var_error: float | None  # max over channels, relative
    low_variance_channels: int
    low_gamma_channels: int
    momentum: float | None
    num_batches_tracked: int | None
    issues: list[str] = field(default_factory=list)


@dataclass
class DiagnosisReport:
    layers: list[LayerDiagnosis]
    batches: int

    def to_dict(self) -> dict:
        return {"batches": self.batches, "layers": [asdict(layer) for layer in self.layers]}

    @property
    def issues(self) -> list[tuple[str, str]]:
        return [(layer.name, issue) for layer in self.layers for issue in layer.issues]

    def table(self):
        """A rich Table of the report."""
        from rich.table import Table

        t = Table(title=f"BatchNorm diagnosis over {self.batches} batches")
        for col in ("layer", "type", "C", "train/eval gap", "mean err", "var err"):
            t.add_column(col, no_wrap=True)
        t.add_column("issues", ratio=1, overflow="fold")
        for d in self.layers:
            t.add_row(
                d.name,
                d.kind,
                str(d.channels),
                _fmt(d.train_eval_gap),
                _fmt(d.mean_error),
                _fmt(d.var_error),
                "; ".join(d.issues) or "[green]ok[/]",
            )
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console()).print(self.table())

    def __str__(self) -> str:
        lines = [f"BatchNorm diagnosis over {self.batches} batches"]
        for d in self.layers:
            lines.append(
                f"  {d.name} ({d.kind}, C={d.channels}): gap {_fmt(d.train_eval_gap)}, mean err "
                f"{_fmt(d.mean_error)}, var err {_fmt(d.var_error)}; " + ("; ".join(d.issues) or "ok")
            )
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _output_gaps(model: nn.Module, loader: Any, forward, max_batches) -> tuple[dict[str, float], int]:
    """Relative L2 gap between each BN layer's train-mode and eval-mode outputs on the same batches."""
    layers = dict(batchnorm_layers(model))
    num = dict.fromkeys(layers, 0.0)
    den = dict.fromkeys(layers, 0.0)
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_m, _args, out):
            outputs[name] = out.detach().double()

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    batches = 0

    def both_modes(m: nn.Module, item: Any) -> None:
        nonlocal batches
        for layer in layers.values():
            layer.eval()
        forward(m, item)
        eval_out = dict(outputs)
        for layer in layers.values():
            layer.train()
            layer.momentum = 0.0  # batch statistics, running statistics untouched
        forward(m, item)
        for name, y_eval in eval_out.items():
            if name in outputs:
                num[name] += float(((outputs[name] - y_eval) ** 2).sum())
                den[name] += float((y_eval**2).sum())
        batches += 1

    try:
        feed(model, loader, both_modes, max_batches, progress=False, description="train/eval gap")
    finally:
        for h in handles:
            h.remove()
    return {n: math.sqrt(num[n] / den[n]) if den[n] > 0 else math.nan for n in layers}, batches


def diagnose(
    model: nn.Module,
    loader: Any,
    *,
    max_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> DiagnosisReport:
    """Per-BN-layer diagnosis of a model on data (see the module docstring); the model is not modified.

    Returns a DiagnosisReport: `.layers` (one LayerDiagnosis each), `.issues`,
    `.to_dict()`, `.print()` (a rich table). Raises ValueError for a model
    without BN layers or an empty loader.
    """
    from ._common import default_forward

    forward = forward or default_forward
    if not any(True for _ in batchnorm_layers(model)):
        raise ValueError("diagnose found no BN layer in the model")
    work = copy.deepcopy(model)
    gaps, batches = _output_gaps(work, loader, forward, max_batches)
    if batches == 0:
        raise ValueError("diagnose got an empty loader: it yielded no batches")
    work = copy.deepcopy(model)
    tracked = [n for n, m in batchnorm_layers(work) if m.running_mean is not None]
    population = (
        population_statistics(
            work, loader, max_batches=max_batches, progress=progress, forward=forward, update=False
        )
        if tracked
        else {}
    )

    report = []
    for name, layer in batchnorm_layers(model):
        pop = population.get(name)
        mean_err = var_err = None
        low_var = 0
        issues: list[str] = []
        if pop is not None:
            pv = pop.unbiased_var.to(layer.running_var)
            pm = pop.mean.to(layer.running_mean)
            mean_err = float(((layer.running_mean - pm).abs() / torch.sqrt(pv + layer.eps)).max())
            var_err = float(((layer.running_var - pv).abs() / (pv + layer.eps)).max())
            low_var = int((pv < LOW_VAR).sum())
        low_gamma = int((layer.weight.detach().abs() < LOW_GAMMA).sum()) if layer.weight is not None else 0
        nbt = None if layer.num_batches_tracked is None else int(layer.num_batches_tracked)
        gap = gaps.get(name)
        if gap is not None and gap > GAP_WARN:
            issues.append(f"train/eval outputs differ by {gap:.0%}")
        if mean_err is not None and (mean_err > STATS_WARN or var_err > STATS_WARN):
            issues.append(
                "running statistics are off from the data's "
                f"(mean {mean_err:.2g} std, var {var_err:.0%}): run batchnorm.population_statistics"
            )
        if low_var:
            issues.append(f"{low_var} channel(s) with variance below {LOW_VAR:g}")
        if low_gamma:
            issues.append(f"{low_gamma} channel(s) with |gamma| below {LOW_GAMMA:g}")
        if layer.momentum is not None and 0.5 < layer.momentum < 1.0:
            issues.append(
                f"momentum {layer.momentum:g} looks like the Keras/Flax convention; in PyTorch's it weights "
                f"the new batch: use {1 - layer.momentum:.3g}"
            )
        if layer.running_mean is not None and (
            nbt == 0 or (bool((layer.running_mean == 0).all()) and bool((layer.running_var == 1).all()))
        ):
            issues.append("running statistics never moved from their initial values")
        report.append(
            LayerDiagnosis(
                name or "(model)",
                type(layer).__name__,
                layer.num_features,
                gap,
                mean_err,
                var_err,
                low_var,
                low_gamma,
                layer.momentum,
                nbt,
                issues,
            )
        )
    return DiagnosisReport(report, batches)
