"""Training fwd+bwd of one BatchNorm2d layer under torch.compile, ours against torch's, on the CPU.

    .venv/bin/python benchmarks/compile_speed.py [--shape 32 64 56 56] [--repeats 20] [--bf16]

Ours is compiled with fullgraph=True: the CPU kernel is the operators of
`batchnorm.kernels.cpu_ops` inside the graph. torch's `nn.BatchNorm2d` is compiled
by inductor. Both eager layers run too. --bf16: both layers and the input in bfloat16 (our
graph hands the operators float32 copies of the parameters and running statistics). Each
repetition times every one once, in a fresh random order; the medians are printed with the
ratios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import batchnorm as bn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="layers and input in bfloat16")
    args = parser.parse_args()
    C, dtype = args.shape[1], torch.bfloat16 if args.bf16 else torch.float32
    ours, theirs = bn.BatchNorm2d(C).to(dtype), torch.nn.BatchNorm2d(C).to(dtype)
    x = torch.randn(args.shape).to(dtype).requires_grad_()
    g = torch.randn(args.shape).to(dtype)

    def step(layer, weight):
        def run():
            return torch.autograd.grad(layer(x), (x, weight), g)

        return run

    impls = {
        "ours, compiled": step(torch.compile(ours, fullgraph=True), ours.weight),
        "torch, compiled": step(torch.compile(theirs), theirs.weight),
        "ours, eager": step(ours, ours.weight),
        "torch, eager": step(theirs, theirs.weight),
    }
    for run in impls.values():  # compile, warm up
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    threads = torch.get_num_threads()
    print(f"BatchNorm2d fwd+bwd {tuple(args.shape)} {str(dtype)[6:]}, {threads} threads, torch {torch.__version__}")
    for name, t in ms.items():
        print(f"  {name:16s} {t:8.2f} ms")
    print(f"  compiled: torch / ours = {ms['torch, compiled'] / ms['ours, compiled']:.2f}x")


if __name__ == "__main__":
    main()
