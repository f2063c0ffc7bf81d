"""Networks and training for the lab's part 2: MLPs and a small CNN with any normalization.

`Setup` says everything that determines a run's numbers (like `experiments.Run`
for part 1, plus the architecture, the normalization, dropout, noise and the
extra measurements to take). `train_setup` trains it and returns JSON-ready
measurements.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..modules import BatchNorm1d, BatchNorm2d
from ..renorm import Renorm
from ..tools import diagnose, population_statistics
from .data import Dataset

NORMS = ("none", "bn", "gn", "ln", "in", "renorm", "ghost")
NORM_LABELS = {
    "none": "no normalization",
    "bn": "BatchNorm",
    "gn": "GroupNorm",
    "ln": "LayerNorm",
    "in": "InstanceNorm",
    "renorm": "Batch Renorm",
    "ghost": "ghost BN",
    "syncbn": "SyncBN",
}


@dataclass(frozen=True)
class Setup:
    """One training run of part 2."""

    arch: str  # "mlp" (3 x 100) or "cnn" (2 conv layers, the second with stride 2, then linear)
    norm: str  # one of NORMS
    batch: int
    steps: int
    lr: float
    seed: int
    eval_every: int
    momentum: float = 0.0  # SGD momentum
    act: str = "sigmoid"
    dropout: float = 0.0
    noise: bool = False  # time-varying noise after each normalization (or linear map without one)
    init_std: float = 0.1  # MLP weights N(0, std^2); the CNN uses PyTorch's default init
    measure: tuple[str, ...] = ()  # "eval_modes", "train_acc", "landscape", "inputs"

    @property
    def label(self) -> str:
        extra = (", dropout" if self.dropout else "") + (", noise" if self.noise else "")
        return f"{self.arch} {NORM_LABELS[self.norm]}, batch {self.batch}{extra}"


class NoisyShift(nn.Module):
    """y * s + m with s, m drawn afresh at every training step, per unit (Santurkar et al. 2018).

    s ~ U(0.5, 2) (non-unit variance) and m ~ U(-1, 1) (non-zero mean): the
    distribution of the next layer's input keeps changing during training.
    Identity in eval mode.
    """

    def __init__(self, width: int, gen: torch.Generator, dim: int = 1) -> None:
        super().__init__()
        self.width, self.gen, self.dim = width, gen, dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return y
        shape = [1] * y.dim()
        shape[self.dim] = self.width
        s = 0.5 + 1.5 * torch.rand(self.width, generator=self.gen)
        m = 2.0 * torch.rand(self.width, generator=self.gen) - 1.0
        return y * s.view(shape).to(y) + m.view(shape).to(y)


def _norm(kind: str, c: int, setup: Setup, dims: int = 2) -> nn.Module:
    """The normalization layer `kind` for c channels of an (N, C) (dims=1) or (N, C, H, W) input."""
    bn = BatchNorm1d if dims == 1 else BatchNorm2d
    if kind == "bn":
        return bn(c)
    if kind == "gn":
        return nn.GroupNorm(4, c)
    if kind == "ln":
        return nn.GroupNorm(1, c)  # LayerNorm over (C, H, W) (or the C features) of each sample
    if kind == "in":
        if dims == 1:
            raise ValueError("the MLP has no InstanceNorm: one value per sample and unit has no statistics")
        return nn.InstanceNorm2d(c, affine=True)
    if kind == "renorm":
        return bn(c, renorm=renorm_schedule(setup.steps))
    if kind == "ghost":
        return bn(c, virtual_batch_size=ghost_size(setup.batch))
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}; expected one of {', '.join(NORMS)}")


def renorm_schedule(steps: int) -> Renorm:
    """The paper's schedule (5k warm-up, r_max 3 by 40k, d_max 5 by 25k of ~130k steps) scaled to `steps`."""
    f = steps / 130_000
    return Renorm(3.0, 5.0, round(5_000 * f), round(40_000 * f), round(25_000 * f))


def ghost_size(batch: int) -> int:
    """Ghost batches of a quarter of the batch, at least 2 samples."""
    return max(2, batch // 4)


def build(setup: Setup, num_features: int, num_classes: int) -> nn.Module:
    gen = torch.Generator().manual_seed(setup.seed)
    torch.manual_seed(setup.seed)  # PyTorch's default init of the CNN
    noise_gen = torch.Generator().manual_seed(50_000 + setup.seed)
    if setup.arch == "cnn":
        side = math.isqrt(num_features)
        if side * side != num_features:
            raise ValueError(f"the CNN needs square images; the data has {num_features} features per sample")
        layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
        cin = 1
        for cout, stride in ((16, 1), (32, 2)):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=setup.norm == "none"),
                _norm(setup.norm, cout, setup),
            ]
            if setup.noise:
                layers.append(NoisyShift(cout, noise_gen))
            layers.append(nn.ReLU())
            cin = cout
        half = (side + 1) // 2  # the second convolution's stride 2
        layers += [nn.Flatten(), nn.Linear(cin * half * half, num_classes)]
        return nn.Sequential(*layers)

    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[setup.act]
    layers = []
    width = num_features
    for hidden in (100, 100, 100):
        linear = nn.Linear(width, hidden, bias=setup.norm == "none")
        layers.append(linear)
        if setup.norm != "none":
            layers.append(_norm(setup.norm, hidden, setup, dims=1))
        if setup.noise:
            layers.append(NoisyShift(hidden, noise_gen))
        layers.append(act())
        if setup.dropout:
            layers.append(nn.Dropout(setup.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    with torch.no_grad():
        for m in layers:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, setup.init_std, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def batches_of(n: int, size: int) -> list[slice]:
    """Consecutive slices of `size`; a ragged end joins the last slice (BN needs > 1 sample)."""
    cuts = list(range(0, n, size))
    if len(cuts) > 1 and n - cuts[-1] < size:
        cuts.pop()
    return [slice(a, b) for a, b in zip(cuts, [*cuts[1:], n])]


def batch_stat_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Test accuracy with each test batch normalized by its own statistics (train-mode BN, no updates)."""
    m = copy.deepcopy(model)
    m.eval()
    for layer in m.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.train()
            layer.momentum = 0.0
    correct = 0
    with torch.no_grad():
        for sl in batches_of(len(y), batch):
            correct += int((m(x[sl]).argmax(1) == y[sl]).sum())
    return correct / len(y)


def landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: tuple[float, ...]) -> dict[str, float]:
    """The loss and gradient along the gradient direction (Santurkar et al. 2018, section 3.2).

    At the current weights w with gradient g of the loss on (x, y), for each
    step size eta: L(w - eta g) and the gradient there. Returns the range of
    the loss (max - min over eta, eta = 0 included), the largest change of the
    gradient max ||grad L(w - eta g) - grad L(w)|| ("gradient predictiveness":
    smaller is more predictive) and the largest ratio of that change to the
    distance moved, ||delta grad|| / ||eta g|| ("effective beta-smoothness").
    """
    probe = copy.deepcopy(model)
    params = [p for p in probe.parameters() if p.requires_grad]
    base = [p.detach().clone() for p in params]

    def loss_and_grad() -> tuple[float, list[torch.Tensor]]:
        loss = nn.functional.cross_entropy(probe(x), y)
        grads = torch.autograd.grad(loss, params)
        return loss.item(), [g.detach() for g in grads]

    l0, g0 = loss_and_grad()
    gnorm = math.sqrt(sum(float((g * g).sum()) for g in g0))
    losses, changes, betas = [l0], [], []
    for eta in steps:
        with torch.no_grad():
            for p, b, g in zip(params, base, g0):
                p.copy_(b - eta * g)
        l1, g1 = loss_and_grad()
        change = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g1, g0)))
        losses.append(l1)
        changes.append(change)
        betas.append(change / max(eta * gnorm, 1e-12))
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "loss_range": (max(finite) - min(finite)) if finite else math.nan,
        "grad_change": max(changes),
        "beta": max(betas),
        "grad_norm": gnorm,
    }


LANDSCAPE_STEPS = (0.05, 0.1, 0.2, 0.4, 0.8)  # multiples of... absolute step sizes along -g


def train_setup(
    data: Dataset, setup: Setup, device: str = "cpu", on_steps: Callable[[int], None] | None = None
) -> dict:
    """Train one Setup; return test accuracy along training and the requested measurements."""
    model = build(setup, data.num_features, data.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    gen = torch.Generator().manual_seed(10_000 + setup.seed)
    n = len(y_train)
    probe_idx = torch.randperm(n, generator=torch.Generator().manual_seed(7))[:256].to(device)

    captured: list[torch.Tensor] = []
    if "inputs" in setup.measure:
        acts = [m for m in model if isinstance(m, (nn.Sigmoid, nn.ReLU))]
        acts[-1].register_forward_hook(lambda _m, args, _o: captured.append(args[0].detach()))

    steps, accs, land, pct = [], [], [], []
    diverged, order, pos, window, done = False, torch.randperm(n, generator=gen), 0, 0.0, 0
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(1, setup.steps + 1):
            if pos + setup.batch > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + setup.batch].to(device)
            captured.clear()
            pos += setup.batch
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            if not torch.isfinite(loss):
                diverged = True
            else:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            window += loss.item()
            if step % setup.eval_every == 0 or step == setup.steps or diverged:
                count = step - done
                done = step
                steps.append(step)
                captured.clear()  # keep only the evaluation's forward pass
                accs.append(accuracy(model, x_test, y_test))
                losses.append(window / count)
                window = 0.0
                if "landscape" in setup.measure and not diverged:
                    land.append(landscape(model, x_train[probe_idx], y_train[probe_idx], LANDSCAPE_STEPS))
                if "inputs" in setup.measure:
                    q = torch.tensor([0.15, 0.5, 0.85], device=captured[0].device)
                    pct.append(torch.quantile(captured[0].float(), q, dim=0).cpu().numpy())
                if on_steps is not None:
                    on_steps(count)
            if diverged:
                if on_steps is not None:
                    on_steps(setup.steps - step)
                break

    final_loss = losses[-1]
    diverged = diverged or not math.isfinite(final_loss) or final_loss > math.log(data.num_classes)
    out: dict = {
        "steps": steps,
        "test_acc": accs,
        "train_loss": [v if math.isfinite(v) else None for v in losses],
        "diverged": diverged,
        "final_acc": float(np.mean(accs[-3:])),
        "n_test": len(y_test),
    }
    if "train_acc" in setup.measure:
        out["train_acc"] = accuracy(model, x_train, y_train)
    if "landscape" in setup.measure:
        out["landscape"] = {k: [d[k] for d in land] for k in ("loss_range", "grad_change", "beta", "grad_norm")}
    if "inputs" in setup.measure:
        out["inputs"] = input_summary(np.stack(pct))
    if "eval_modes" in setup.measure:
        out["eval_modes"] = _eval_modes(model, data, setup.batch, device)
    return out


def input_summary(p: np.ndarray) -> dict:
    """Percentile paths of unit 0 (the plotted sigmoid) and the drift of every unit.

    drift of a unit = mean over the three percentiles of |p(end) - p(first
    evaluation)|, divided by the unit's mean spread p85 - p15 over training:
    how far its input distribution moved, in units of its own width.
    """
    spread = (p[:, 2, :] - p[:, 0, :]).mean(0)  # (units,)
    moved = np.abs(p[-1] - p[0]).mean(0)  # (units,)
    drift = moved / np.maximum(spread, 1e-12)
    return {
        "unit": 0,
        "p15": p[:, 0, 0].tolist(),
        "p50": p[:, 1, 0].tolist(),
        "p85": p[:, 2, 0].tolist(),
        "drift_median": float(np.median(drift)),
        "drift_unit0": float(drift[0]),
    }


# --------------------------------------------------------------------------- experiments


def _eval_modes(model: nn.Module, data: Dataset, batch: int, device: str) -> dict:
    """Test accuracy with batch statistics, running averages and exact population statistics."""
    x_train, x_test, y_test = data.x_train.to(device), data.x_test.to(device), data.y_test.to(device)
    exact = copy.deepcopy(model)
    population_statistics(exact, [x_train[s] for s in batches_of(len(x_train), 256)], progress=False)
    report = diagnose(model, [x_test[s] for s in batches_of(len(x_test), 120)], progress=False)
    return {
        "batch_stats": batch_stat_accuracy(model, x_test, y_test, batch),
        "running": accuracy(model, x_test, y_test),
        "population": accuracy(exact, x_test, y_test),
        "diagnosis": [
            {
                "layer": d.name,
                "train_eval_gap": d.train_eval_gap,
                "mean_error": d.mean_error,
                "var_error": d.var_error,
                "issues": d.issues,
            }
            for d in report.layers
        ],
    }
