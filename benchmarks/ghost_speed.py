"""Training fwd+bwd of ghost batch normalization on the CPU: the kernel path against the alternatives.

    .venv/bin/python benchmarks/ghost_speed.py [--repeats 30]

For each case, ghost batches of k samples (`virtual_batch_size=k`) on the CPU kernel (one call for
all ghost batches, `batchnorm._ghost`), the same layer on the torch-ops general path (backend
"composite", what ran before), a plain loop over torch's BatchNorm per chunk with torch.cat (what
one would write by hand), and plain BN on the whole batch (ours and torch's) for scale. Each
repetition runs every implementation once, in a fresh random order; medians in milliseconds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import batchnorm as bn
from batchnorm.functional import use_backend

CASES = [  # (shape, k, dtype, channels_last)
    ((4096, 256), 256, torch.float32, False),  # tabular (TabNet-like): 2-D, ghost batches of 256
    ((1024, 128), 128, torch.float32, False),
    ((256, 64, 28, 28), 32, torch.float32, False),  # a CNN layer, ghost batches of 32
    ((256, 64, 28, 28), 32, torch.float32, True),
    ((4096, 256), 256, torch.bfloat16, False),
]


def _layer(shape, k=None):
    cls = bn.BatchNorm1d if len(shape) <= 3 else bn.BatchNorm2d
    return cls(shape[1], virtual_batch_size=k)


def time_case(shape, k: int, dtype: torch.dtype, channels_last: bool, repeats: int) -> dict[str, float]:
    """Median ms of each implementation's fwd+bwd on one case."""
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(shape).to(dtype)
    ghost, general, plain = _layer(shape, k).to(dtype), _layer(shape, k).to(dtype), _layer(shape).to(dtype)
    torch_cls = torch.nn.BatchNorm1d if len(shape) <= 3 else torch.nn.BatchNorm2d
    chunked, torch_plain = torch_cls(shape[1]).to(dtype), torch_cls(shape[1]).to(dtype)

    def on_composite():
        with use_backend("composite"):
            return general(x)

    impls = {
        "ghost kernel": lambda: ghost(x),
        "ghost general": on_composite,
        "torch per chunk": lambda: torch.cat([chunked(c) for c in x.split(k)]),
        "plain ours": lambda: plain(x),
        "plain torch": lambda: torch_plain(x),
    }
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i in range(repeats + 2):
        names = list(impls)
        random.shuffle(names)
        for name in names:
            t = time.perf_counter()
            impls[name]().backward(g)
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for shape, k, dtype, cl in CASES:
        med = time_case(shape, k, dtype, cl, args.repeats)
        label = f"{'x'.join(map(str, shape))} k={k} {str(dtype).removeprefix('torch.')}{' channels_last' if cl else ''}"
        print(f"{label}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in med.items()))


if __name__ == "__main__":
    main()
