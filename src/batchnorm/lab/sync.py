"""SyncBN for the lab: one training run split over processes (gloo on 127.0.0.1).

`train_sync(data, setup, world)` trains `setup` (a CNN with BatchNorm2d) with
`world` processes, each taking `setup.batch` samples of every global batch of
world * setup.batch, its BN layers converted to `batchnorm.SyncBatchNorm`
and the model wrapped in DistributedDataParallel. The global batches are the
same as those of a single process at batch world * setup.batch, so SyncBN
over 2 x 2 should reproduce BN at 4 (up to rounding), which is the claim.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..distributed import convert_sync_batchnorm
from .data import Dataset
from .models import Setup, accuracy, build

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: Dataset, setup: Setup, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = convert_sync_batchnorm(build(setup, data.num_features, data.num_classes))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=setup.lr, momentum=setup.momentum)
        gen = torch.Generator().manual_seed(10_000 + setup.seed)
        n, global_batch = len(data.y_train), setup.batch * world
        order, pos = torch.randperm(n, generator=gen), 0
        steps, accs = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for step in range(1, setup.steps + 1):
                if pos + global_batch > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos : pos + global_batch][rank * setup.batch : (rank + 1) * setup.batch]
                pos += global_batch
                loss = nn.functional.cross_entropy(ddp(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if rank == 0 and (step % setup.eval_every == 0 or step == setup.steps):
                    steps.append(step)
                    accs.append(accuracy(model, data.x_test, data.y_test))
        if rank == 0:
            torch.save({"steps": steps, "test_acc": accs}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads can abort the
    # process there ("terminate called without an active exception").
    os._exit(0)


def train_sync(data: Dataset, setup: Setup, world: int = 2) -> dict:
    """Train with SyncBN over `world` processes; return steps, test_acc and final_acc (rank 0's model)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        ctx, port = mp.get_context("spawn"), _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world, port, data, setup, out), daemon=True) for r in range(world)
        ]
        raise_on = None
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT_S)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise_on = "a process did not finish within the time limit"
            elif p.exitcode != 0 and raise_on is None:
                raise_on = f"a process exited with code {p.exitcode}"
        if raise_on is not None or not os.path.exists(out):
            raise RuntimeError(f"SyncBN run over {world} processes failed: {raise_on or 'no result'}")
        res = torch.load(out)
    return {
        "steps": res["steps"],
        "test_acc": res["test_acc"],
        "final_acc": float(sum(res["test_acc"][-3:]) / len(res["test_acc"][-3:])),
        "diverged": not all(math.isfinite(a) for a in res["test_acc"]),
        "n_test": len(data.y_test),
        "world": world,
    }
