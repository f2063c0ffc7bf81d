"""Training fwd+bwd of SyncBatchNorm on 2 gloo processes on the CPU: the kernel path against the general path.

    .venv/bin/python benchmarks/sync_speed.py [--repeats 20] [--world 2]

Each process holds half of the global batch and one thread (the machine's cores split between
them). For each case: our SyncBatchNorm on the CPU kernel (`_kernel_variants.sync_train`: local
statistics, one all_gather of the moments, one centred apply pass; backward: local sums, one
all_reduce, the dx pass), the same layer on the torch-ops general path (backend "composite",
what ran before), and for scale plain BN on the local half (ours, torch's; no synchronization).
torch.nn.SyncBatchNorm does not run on the CPU. Every repetition runs each implementation once
in an order both processes draw from the same seed (the collectives must pair up); medians of
rank 0 in ms.
"""

from __future__ import annotations

import argparse
import datetime
import random
import socket
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batchnorm as bn
from batchnorm.functional import use_backend

CASES = [  # (global shape, channels_last)
    ((32, 64, 56, 56), False),
    ((32, 64, 56, 56), True),
    ((32, 256, 128), False),  # (N, C, L)
    ((4096, 512), False),
]


def _implementations(local: tuple[int, ...], channels_last: bool) -> dict[str, Callable[[], None]]:
    """One fwd+bwd call per implementation on this process's half of the batch."""
    x = torch.randn(local)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(local)
    C = local[1]
    sync_kernel, sync_general = bn.SyncBatchNorm(C), bn.SyncBatchNorm(C)
    plain = (bn.BatchNorm2d if len(local) == 4 else bn.BatchNorm1d)(C)
    torch_plain = (torch.nn.BatchNorm2d if len(local) == 4 else torch.nn.BatchNorm1d)(C)

    def general():
        with use_backend("composite"):
            sync_general(x).backward(g)

    return {
        "sync kernel": lambda: sync_kernel(x).backward(g),
        "sync general path": general,
        "plain ours (local)": lambda: plain(x).backward(g),
        "plain torch (local)": lambda: torch_plain(x).backward(g),
    }


def _worker(rank: int, world: int, port: int, repeats: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    rows = []
    for shape, cl in CASES:
        impls = _implementations((shape[0] // world, *shape[1:]), cl)
        times: dict[str, list[float]] = {name: [] for name in impls}
        order = random.Random(0)  # the same order on every rank: the collectives pair up
        for i in range(repeats + 2):
            names = list(impls)
            order.shuffle(names)
            for name in names:
                dist.barrier()
                t = time.perf_counter()
                impls[name]()
                if i >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - t)
        label = f"{'x'.join(map(str, shape))}{' channels_last' if cl else ''}"
        rows.append((label, {name: statistics.median(v) * 1e3 for name, v in times.items()}))
    results.put((rank, rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args.repeats, results)) for r in range(args.world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    print(f"SyncBatchNorm fwd+bwd, {args.world} gloo processes of 1 thread, global batch split evenly; rank 0, ms")
    for label, med in got[0]:
        print(f"{label}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in med.items()))


if __name__ == "__main__":
    main()
