"""Inference time of a ResNet-like model before and after `batchnorm.fold_batchnorm`, on the CPU.

    .venv/bin/python benchmarks/fold_speed.py [--batch 16] [--size 64] [--repeats 15]

The model: a stem (conv 7x7/2, BN, ReLU, max-pool) and four stages of two
basic residual blocks (conv 3x3, BN, ReLU, conv 3x3, BN, + shortcut with a
1x1 conv and BN where the shape changes), widths 64-128-256-512: ResNet-18's
layout, built here so the script needs nothing but torch. Both models run in
eval mode under torch.inference_mode(); timings interleave the two, and the
median of the repeats is reported with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import batchnorm as bn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def resnet18_like(classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        bn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = resnet18_like()
    with torch.no_grad():  # non-trivial statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    folded = bn.fold_batchnorm(model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    times: dict[str, list[float]] = {"with BN": [], "folded": []}
    with torch.inference_mode():
        err = (model(x) - folded(x)).abs().max().item()
        for _ in range(3):
            model(x), folded(x)
        for _ in range(args.repeats):
            for name, m in (("with BN", model), ("folded", folded)):
                t = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["with BN"]), statistics.median(times["folded"])
    n_bn = len(folded.fold_report.folded)
    print(
        f"ResNet-18-like, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"{n_bn} BN layers folded, {len(folded.fold_report.kept)} kept; max |output difference| {err:.2e}")
    print(
        f"with BN {a * 1e3:.2f} ms, folded {b * 1e3:.2f} ms: {a / b:.2f}x faster (median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
