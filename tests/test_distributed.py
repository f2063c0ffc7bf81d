"""SyncBatchNorm on gloo (CPU): several processes on 127.0.0.1 against BN on the concatenated batch.

One spawn per world size (2, 3 and 4 processes) runs every scenario of that
size in order; each scenario returns NumPy arrays (never torch tensors: shared
memory dies with the child) and the tests compare them in this process with
torch's BatchNorm on the global batch. Every collective is bounded: the
process group has a 30 s timeout and the parent kills the children and fails
after `SPAWN_TIMEOUT` seconds instead of hanging.
"""

from __future__ import annotations

import datetime
import queue
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import batchnorm as bn
from batchnorm.functional import batch_norm

f64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-5
MOMENTUM = 0.3
C, L = 3, 4
SPAWN_TIMEOUT = 120.0  # seconds for a whole spawn; a healthy one takes a few

# --------------------------------------------------------------------------- data, known to parent and children


def _global_batch(n: int, seed: int, shape_tail=(C, L)) -> tuple[np.ndarray, np.ndarray]:
    """The global batch x and upstream gradient dy, (n, *shape_tail) float64."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (n, *shape_tail))
    return x, rng.normal(size=x.shape)


def _init_layer(layer: nn.Module) -> nn.Module:
    """Fixed non-default parameters and running statistics, float64."""
    layer.double()
    n = layer.num_features
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, n, dtype=f64))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, n, dtype=f64))
        layer.running_mean.copy_(torch.linspace(-0.5, 0.5, n, dtype=f64))
        layer.running_var.copy_(torch.linspace(0.5, 2.0, n, dtype=f64))
    return layer


def _part(a: np.ndarray, sizes: list[int], rank: int) -> np.ndarray:
    start = sum(sizes[:rank])
    return a[start : start + sizes[rank]]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy().copy()


def _train_step(layer: nn.Module, x: np.ndarray, dy: np.ndarray, **kw) -> dict:
    """One training forward/backward, then one eval forward; every result as NumPy."""
    return _train_step_tensors(layer, torch.from_numpy(x.copy()), torch.from_numpy(dy.copy()), **kw)


def _train_step_tensors(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, **kw) -> dict:
    """`_train_step` on tensors (float32 or bfloat16 results come back as float64 NumPy)."""
    xt = x.clone().requires_grad_()
    layer.train()
    y = layer(xt, **kw)
    y.backward(dy)
    out = dict(
        y=_np(y),
        dx=_np(xt.grad),
        dw=_np(layer.weight.grad),
        db=_np(layer.bias.grad),
        rm=_np(layer.running_mean),
        rv=_np(layer.running_var),
        nbt=int(layer.num_batches_tracked),
    )
    layer.eval()
    with torch.no_grad():
        out["y_eval"] = _np(layer(x.clone(), **kw))
    return out


# --------------------------------------------------------------------------- scenarios (run in the children)

UNEVEN = [5, 2]
WITH_EMPTY = [4, 0, 3]
PAIRS = [3, 2, 4, 1]  # 4 ranks in two groups, {0, 1} and {2, 3}
GHOST_SIZES, GHOST_K = [5, 4], 2
MASK_SIZES, MASK_LENGTHS = [4, 2], [4, 1, 3, 4, 2, 3]
RENORM_SIZES, RENORM_LIMITS = [3, 4], (1.2, 0.1)
DDP_N, DDP_STEPS, DDP_LR = 8, 3, 0.1


def _sc_global(rank: int, world: int, sizes: list[int]) -> dict:
    x, dy = _global_batch(sum(sizes), seed=len(sizes))
    layer = _init_layer(bn.SyncBatchNorm(C, momentum=MOMENTUM))
    return _train_step(layer, _part(x, sizes, rank), _part(dy, sizes, rank))


def _sc_kernel(rank: int, world: int, sizes: list[int], shape_tail=(C, L), dtype=torch.float32) -> dict:
    """float32 or bfloat16: the CPU kernel's SyncBN path (`_kernel_variants.sync_train`) where it
    takes the local batch; a rank with an empty batch takes the general path and must still
    synchronize with the others (the collectives carry the same tensors)."""
    from batchnorm import _kernel_variants

    calls = []
    sync_train = _kernel_variants.sync_train
    _kernel_variants.sync_train = lambda *a: calls.append(1) or sync_train(*a)
    try:
        x, dy = _global_batch(sum(sizes), seed=len(sizes) + 10, shape_tail=shape_tail)
        layer = _init_layer(bn.SyncBatchNorm(C, momentum=MOMENTUM)).float()
        part = (torch.from_numpy(_part(a, sizes, rank)).to(dtype) for a in (x, dy))
        out = _train_step_tensors(layer, *part)
    finally:
        _kernel_variants.sync_train = sync_train
    return {**out, "kernel_calls": len(calls)}


def _sc_compiled(rank: int, world: int) -> dict:
    """The layer under torch.compile(fullgraph=True): the all_gather of the moments and the
    backward's all_reduce are part of the graphs."""
    x, dy = _global_batch(sum(UNEVEN), seed=len(UNEVEN))
    compiled = torch.compile(_init_layer(bn.SyncBatchNorm(C, momentum=MOMENTUM)), fullgraph=True)
    return _train_step(compiled, _part(x, UNEVEN, rank), _part(dy, UNEVEN, rank))  # (attributes: the layer's)


def _sc_subgroups(rank: int, world: int) -> dict:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank calls both
    x, dy = _global_batch(sum(PAIRS), seed=4)
    layer = _init_layer(bn.SyncBatchNorm(C, momentum=MOMENTUM, process_group=groups[rank // 2]))
    return _train_step(layer, _part(x, PAIRS, rank), _part(dy, PAIRS, rank))


def _sc_ghost(rank: int, world: int) -> dict:
    x, dy = _global_batch(sum(GHOST_SIZES), seed=5)
    layer = _init_layer(bn.SyncBatchNorm(C, momentum=MOMENTUM, virtual_batch_size=GHOST_K))
    return _train_step(layer, _part(x, GHOST_SIZES, rank), _part(dy, GHOST_SIZES, rank))


def _mask_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, L, C) with NaN padding, its mask (N, L) and dy."""
    x, dy = _global_batch(sum(MASK_SIZES), seed=6, shape_tail=(L, C))
    mask = np.arange(L)[None, :] < np.array(MASK_LENGTHS)[:, None]
    x[~mask] = np.nan
    return x, mask, dy


def _sc_mask(rank: int, world: int) -> dict:
    x, mask, dy = _mask_batch()
    layer = _init_layer(bn.SyncBatchNorm(C, momentum=MOMENTUM, axis=-1))
    m = torch.from_numpy(_part(mask, MASK_SIZES, rank).copy())
    return _train_step(layer, _part(x, MASK_SIZES, rank), _part(dy, MASK_SIZES, rank), mask=m)


def _renorm_state(layer: nn.Module) -> nn.Module:
    """Running statistics far from the batch's, so that r and d clip."""
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([4.0, -4.0, 0.5], dtype=f64))
        layer.running_var.copy_(torch.tensor([0.05, 40.0, 1.0], dtype=f64))
    return layer


def _sc_renorm(rank: int, world: int) -> dict:
    x, dy = _global_batch(sum(RENORM_SIZES), seed=7)
    layer = bn.SyncBatchNorm(C, momentum=MOMENTUM, renorm=bn.Renorm.fixed(*RENORM_LIMITS))
    layer = _renorm_state(_init_layer(layer))
    return _train_step(layer, _part(x, RENORM_SIZES, rank), _part(dy, RENORM_SIZES, rank))


def _cnn() -> nn.Module:
    """Conv2d -> BatchNorm2d -> ReLU -> pooling -> Linear, the same initial weights everywhere."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),  # a bias before BN gets no gradient
        bn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def _cnn_data() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(8)
    x = rng.normal(0.5, 1.5, (DDP_STEPS, DDP_N, 2, 5, 5))
    t = rng.normal(size=(DDP_STEPS, DDP_N, 3))
    return torch.from_numpy(x), torch.from_numpy(t)


def _train_cnn(model: nn.Module, xs: torch.Tensor, ts: torch.Tensor) -> None:
    """DDP_STEPS of SGD on mean squared error, the loss a mean over the (local) batch."""
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for x, t in zip(xs, ts):
        opt.zero_grad()
        F.mse_loss(model(x), t).backward()
        opt.step()


def _sc_ddp(rank: int, world: int) -> dict:
    model = bn.convert_sync_batchnorm(_cnn())
    ddp = nn.parallel.DistributedDataParallel(model)
    xs, ts = _cnn_data()
    half = DDP_N // world
    _train_cnn(ddp, xs[:, rank * half : (rank + 1) * half], ts[:, rank * half : (rank + 1) * half])
    out = {k: _np(v) for k, v in model.state_dict().items()}
    out["bn_class"] = type(model[1]).__name__
    return out


def _sc_mismatch(rank: int, world: int, compiled: bool = False) -> dict:
    channels = 4 if rank == 0 else 3
    layer = bn.SyncBatchNorm(channels).double().train()
    (torch.compile(layer, fullgraph=True) if compiled else layer)(torch.randn(2, channels, 3, dtype=f64))
    return {"raised": False}


SCENARIOS = {
    "uneven": lambda rank, world: _sc_global(rank, world, UNEVEN),
    "compiled": _sc_compiled,
    "empty": lambda rank, world: _sc_global(rank, world, WITH_EMPTY),
    "kernel_rows": lambda rank, world: _sc_kernel(rank, world, UNEVEN),
    "kernel_planes": lambda rank, world: _sc_kernel(rank, world, UNEVEN, shape_tail=(C, 9, 7)),
    "kernel_bf16": lambda rank, world: _sc_kernel(rank, world, UNEVEN, shape_tail=(C, 9, 7), dtype=torch.bfloat16),
    "kernel_empty": lambda rank, world: _sc_kernel(rank, world, WITH_EMPTY, shape_tail=(C, 40)),
    "subgroups": _sc_subgroups,
    "ghost": _sc_ghost,
    "mask": _sc_mask,
    "renorm": _sc_renorm,
    "ddp": _sc_ddp,
    "mismatch": _sc_mismatch,  # last: a rank that fails to raise would desynchronize what follows
    "compiled_mismatch": lambda rank, world: _sc_mismatch(rank, world, compiled=True),
}
BY_WORLD = {
    2: [
        "uneven",
        "compiled",
        "kernel_rows",
        "kernel_planes",
        "kernel_bf16",
        "ghost",
        "mask",
        "renorm",
        "ddp",
        "mismatch",
        "compiled_mismatch",
    ],
    3: ["empty", "kernel_empty"],
    4: ["subgroups"],
}


def _worker(rank: int, world: int, port: int, names: list[str], results) -> None:
    """Child process: join the gloo group, run the scenarios, report every outcome as plain data."""
    torch.set_num_threads(1)
    out: dict = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        for name in names:
            try:
                out[name] = SCENARIOS[name](rank, world)
            except Exception as e:
                out[name] = {"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    except Exception:
        out["__init__"] = {"error": "init", "message": traceback.format_exc(), "traceback": ""}
    finally:
        results.put((rank, out))
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- spawning (the parent)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, names: list[str], timeout: float = SPAWN_TIMEOUT) -> list[dict]:
    """Run `names` on `world` processes; per rank {scenario: result}. Fails, never hangs."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, names, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{world} processes running {names}: ranks {sorted(set(range(world)) - set(got))} "
                    f"did not report within {timeout:.0f} s (hang?)"
                )
            try:
                rank, out = results.get(timeout=1.0)
                got[rank] = out
            except queue.Empty:
                if all(r in got or p.is_alive() for r, p in enumerate(procs)):
                    continue
                # a child that exited has flushed its report into the pipe: read it, then judge
                while len(got) < world:
                    try:
                        rank, out = results.get(timeout=2.0)
                    except queue.Empty:
                        break
                    got[rank] = out
                dead = [r for r, p in enumerate(procs) if r not in got and not p.is_alive()]
                if dead:
                    pytest.fail(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) without reporting")
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            assert p.exitcode == 0, f"a child exited with code {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [got[r] for r in range(world)]


@pytest.fixture(scope="module")
def two():
    return _spawn(2, BY_WORLD[2])


@pytest.fixture(scope="module")
def three():
    return _spawn(3, BY_WORLD[3])


@pytest.fixture(scope="module")
def four():
    return _spawn(4, BY_WORLD[4])


def _ok(ranks: list[dict], name: str) -> list[dict]:
    """The scenario's result on every rank, failing with the child's traceback if it raised."""
    assert all("__init__" not in r for r in ranks), ranks[0].get("__init__")
    for rank, r in enumerate(ranks):
        res = r[name]
        if "error" in res:
            pytest.fail(f"rank {rank}, scenario {name}: {res['error']}: {res['message']}\n{res['traceback']}")
    return [r[name] for r in ranks]


def _close(actual, expected, **tol) -> None:
    a = torch.as_tensor(np.asarray(actual))
    e = torch.as_tensor(np.asarray(expected.detach() if isinstance(expected, torch.Tensor) else expected))
    assert_close(a, e.to(a.dtype), **(tol or TOL))


# --------------------------------------------------------------------------- oracles (the parent)


def _oracle(x: np.ndarray, dy: np.ndarray, layer: nn.Module | None = None, **kw) -> dict:
    """torch's BatchNorm on the global batch: what every rank must see."""
    layer = layer if layer is not None else _init_layer(torch.nn.BatchNorm1d(C, momentum=MOMENTUM))
    return _train_step(layer, x, dy, **kw)


def _check_global(ranks: list[dict], sizes: list[int], ref: dict, **tol) -> None:
    for rank, res in enumerate(ranks):
        for key in ("y", "dx", "y_eval"):
            assert res[key].shape == _part(ref[key], sizes, rank).shape
            _close(res[key], _part(ref[key], sizes, rank), **tol)
        _close(res["rm"], ref["rm"], **tol)
        _close(res["rv"], ref["rv"], **tol)
        assert res["nbt"] == ref["nbt"] == 1
    # parameter gradients stay local (as PyTorch's); their sum over ranks is the full batch's
    _close(sum(r["dw"] for r in ranks), ref["dw"], **tol)
    _close(sum(r["db"] for r in ranks), ref["db"], **tol)
    assert not np.allclose(ranks[0]["dw"], ref["dw"])  # local, not already reduced


# --------------------------------------------------------------------------- tests


def test_uneven_batches_equal_bn_on_the_concatenated_batch(two):
    x, dy = _global_batch(sum(UNEVEN), seed=len(UNEVEN))
    _check_global(_ok(two, "uneven"), UNEVEN, _oracle(x, dy))


def test_compiled_layer_equals_bn_on_the_concatenated_batch(two):
    x, dy = _global_batch(sum(UNEVEN), seed=len(UNEVEN))
    _check_global(_ok(two, "compiled"), UNEVEN, _oracle(x, dy))


@pytest.mark.parametrize("case", ["kernel_rows", "kernel_planes", "kernel_bf16"])
def test_kernel_path_equals_bn_on_the_concatenated_batch(two, case):
    """float32 / bfloat16: SyncBN on the CPU kernel (rows (N, C, L) and planes (N, C, H, W)) against
    float64 BN on the global batch."""
    ranks = _ok(two, case)
    assert all(r["kernel_calls"] == 1 for r in ranks), "the kernel path did not run"
    tail = (C, L) if case == "kernel_rows" else (C, 9, 7)
    x, dy = _global_batch(sum(UNEVEN), seed=len(UNEVEN) + 10, shape_tail=tail)
    if case == "kernel_bf16":  # the oracle sees the same rounded inputs
        x, dy = (torch.from_numpy(a).bfloat16().double().numpy() for a in (x, dy))
    layer = (torch.nn.BatchNorm1d if len(tail) == 2 else torch.nn.BatchNorm2d)(C, momentum=MOMENTUM)
    tol = dict(rtol=1e-4, atol=1e-4) if case != "kernel_bf16" else dict(rtol=1e-2, atol=1e-2)
    _check_global(ranks, UNEVEN, _oracle(x, dy, _init_layer(layer)), **tol)


def test_kernel_path_with_an_empty_batch_on_one_rank(three):
    """The empty rank takes the general path, the others the kernel: the same collectives."""
    ranks = _ok(three, "kernel_empty")
    assert [r["kernel_calls"] for r in ranks] == [1, 0, 1]
    x, dy = _global_batch(sum(WITH_EMPTY), seed=len(WITH_EMPTY) + 10, shape_tail=(C, 40))
    _check_global(ranks, WITH_EMPTY, _oracle(x, dy), rtol=1e-4, atol=1e-4)


def test_a_rank_with_an_empty_batch(three):
    ranks = _ok(three, "empty")
    assert ranks[1]["y"].shape == (0, C, L) and ranks[1]["dx"].shape == (0, C, L)
    np.testing.assert_array_equal(ranks[1]["dw"], np.zeros(C))
    x, dy = _global_batch(sum(WITH_EMPTY), seed=len(WITH_EMPTY))
    _check_global(ranks, WITH_EMPTY, _oracle(x, dy))


def test_subgroups_sync_within_their_group(four):
    ranks = _ok(four, "subgroups")
    x, dy = _global_batch(sum(PAIRS), seed=4)
    for pair in ([0, 1], [2, 3]):
        start = sum(PAIRS[: pair[0]])
        sizes = [PAIRS[r] for r in pair]
        sl = slice(start, start + sum(sizes))
        _check_global([ranks[r] for r in pair], sizes, _oracle(x[sl], dy[sl]))
    assert not np.allclose(ranks[0]["rm"], ranks[2]["rm"])  # the two groups did not mix


def test_ghost_batches_stay_local_running_stats_are_global(two):
    """Defined rule: each chunk of k local samples is its own mini-batch; running stats see the global batch."""
    ranks = _ok(two, "ghost")
    x, dy = _global_batch(sum(GHOST_SIZES), seed=5)
    full = _oracle(x, dy)
    for rank, res in enumerate(ranks):
        local = _oracle(
            _part(x, GHOST_SIZES, rank),
            _part(dy, GHOST_SIZES, rank),
            _init_layer(bn.BatchNorm1d(C, momentum=MOMENTUM, virtual_batch_size=GHOST_K)),
        )
        _close(res["y"], local["y"])
        _close(res["dx"], local["dx"])
        _close(res["dw"], local["dw"])
        _close(res["rm"], full["rm"])
        _close(res["rv"], full["rv"])
        _close(res["y_eval"], _part(full["y_eval"], GHOST_SIZES, rank))


def test_mask_with_sync_equals_bn_over_the_global_real_elements(two):
    ranks = _ok(two, "mask")
    x, mask, dy = _mask_batch()
    # oracle: BN over the real elements of the global batch, gathered as (M, C)
    ref = _oracle(x[mask], dy[mask])
    for rank, res in enumerate(ranks):
        m = _part(mask, MASK_SIZES, rank)
        assert np.isfinite(res["y"]).all() and np.isfinite(res["dx"]).all()
        np.testing.assert_array_equal(res["y"][~m], 0.0)
        np.testing.assert_array_equal(res["dx"][~m], 0.0)
        start = int(mask[: sum(MASK_SIZES[:rank])].sum())
        real = slice(start, start + int(m.sum()))
        _close(res["y"][m], ref["y"][real])
        _close(res["dx"][m], ref["dx"][real])
        _close(res["rm"], ref["rm"])
        _close(res["rv"], ref["rv"])
    _close(sum(r["dw"] for r in ranks), ref["dw"])


def test_renorm_with_sync_uses_the_global_statistics(two):
    ranks = _ok(two, "renorm")
    x, dy = _global_batch(sum(RENORM_SIZES), seed=7)
    layer = bn.BatchNorm1d(C, momentum=MOMENTUM, renorm=bn.Renorm.fixed(*RENORM_LIMITS))
    ref = _oracle(x, dy, _renorm_state(_init_layer(layer)))
    # r and d clip: plain BN on the global batch differs
    plain = batch_norm(torch.from_numpy(x), None, None, training=True)
    assert (plain - torch.from_numpy(ref["y"])).abs().max() > 0.1
    _check_global(ranks, RENORM_SIZES, ref)


def test_ddp_cnn_training_equals_one_process_on_the_full_batch(two):
    ranks = _ok(two, "ddp")
    assert ranks[0]["bn_class"] == "SyncBatchNorm"
    model = _cnn()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ts = _cnn_data()
    _train_cnn(model, xs, ts)
    for key, value in model.state_dict().items():
        for res in ranks:
            _close(res[key], value, rtol=1e-6, atol=1e-6)
        if value.is_floating_point():
            assert not torch.equal(value, initial[key]), f"{key} did not change in training"
    assert int(model[1].num_batches_tracked) == DDP_STEPS


def test_mismatched_channel_counts_raise_on_every_rank(two):
    for rank, r in enumerate(two):
        res = r["mismatch"]
        assert res.get("error") == "ValueError", f"rank {rank}: {res}"
        assert "num_features 4" in res["message"] and "num_features 3" in res["message"], res["message"]


def test_compiled_mismatched_channel_counts_raise_on_every_rank(two):
    """Inside a compiled graph the check is a runtime assert: RuntimeError on every rank, no hang."""
    for rank, r in enumerate(two):
        res = r["compiled_mismatch"]
        assert res.get("error") == "RuntimeError", f"rank {rank}: {res}"
        assert "disagree on the channel count" in res["message"], res["message"]
