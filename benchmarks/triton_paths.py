"""The Triton training step's two paths side by side, with torch's kernel, for a GPU session.

    python benchmarks/triton_paths.py [--repeats 30] [--json FILE]
    TRITON_INTERPRET=1 python benchmarks/triton_paths.py --smoke   # the script itself, on the CPU

For each input (the bench suite's shapes, float32, and small ones from 2-D (128, 64) up): the median
milliseconds of a training forward + backward through `batchnorm.functional.batch_norm` on the
"triton" backend, once with `triton_bn.path_override = "split"` (split reduction, merge, elementwise
pass: three launches per direction) and once with "channel" (the whole-channel kernels: one), and
of `F.batch_norm` (cuDNN / torch's CUDA kernel), and of our "torch" backend (torch's kernel with our
running-statistics rule: one more launch, `triton_bn.update_running(..., eps=)`, and our Python:
what "auto" runs up to `functional.NATIVE_MAX_ELEMS_CUDA` elements); each round runs the four in a
fresh random order, synchronized before and after each call (so small inputs measure the launches
and the host's work).
Then each runs 20 steps back to back: the time to issue them (the host's share of a step) and to
finish them (the step's cost when the host runs ahead, as in training). Where the two are equal
the step is bound by the host, and the host's Python is what to cut (benchmarks/host_overhead.py
measures it without a GPU). It prints which path the rule (`triton_bn._whole_channels`) picks and
the faster path: what to check the rule against, and to set `Tuning.channel_tiles` from
(benchmarks/triton_notes.md).
--smoke runs two tiny inputs in triton's interpreter (the timings mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

import batchnorm as bn
from batchnorm.kernels import triton_bn as tb

SUITE = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
SUITE += [(8, 3, 224, 224)]
SMALL = [(128, 64), (256, 256), (512, 256), (1024, 512), (32, 16, 8, 8), (64, 64, 16, 16), (32, 128, 512), (4096, 1024)]
SMOKE = [(6, 7), (3, 2, 4, 4)]
BACK_TO_BACK = 20  # steps issued without a synchronization, for the host's share


def inputs(smoke: bool) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, channels_last) of every input: NCHW and channels_last for the 4-D ones."""
    shapes = SMOKE if smoke else SUITE + SMALL
    return [(s, cl) for s in shapes for cl in ((False, True) if len(s) == 4 else (False,))]


def step(fn, x, w, b, rm, rv, dy):
    """One training forward + backward of fn (batch_norm's signature)."""
    y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)
    y.backward(dy)


def measure(shape, channels_last, device, repeats, back_to_back) -> dict:
    C = shape[1]
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    dy = torch.randn_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def ours(path):
        def run():
            tb.path_override = path
            try:
                with bn.functional.use_backend("triton"):
                    step(bn.functional.batch_norm, x, w, b, rm, rv, dy)
            finally:
                tb.path_override = None

        return run

    def torch_rule():
        with bn.functional.use_backend("torch"):
            step(bn.functional.batch_norm, x, w, b, rm, rv, dy)

    calls = {
        "split": ours("split"),
        "channel": ours("channel"),
        "torch": lambda: step(F.batch_norm, x, w, b, rm, rv, dy),
        "torch-rule": torch_rule,
    }
    times = {k: [] for k in calls}
    for i in range(repeats + 2):  # two untimed rounds: compiles, allocator
        names = list(calls)
        random.shuffle(names)
        for name in names:
            sync()
            t0 = time.perf_counter()
            calls[name]()
            sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
            x.grad = w.grad = b.grad = None
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    host, pipelined = {}, {}
    for name, call in calls.items():  # back to back: the host's share, and the rate when it is hidden
        issue, total = [], []
        for _ in range(3 if repeats > 1 else 1):
            sync()
            t0 = time.perf_counter()
            for _ in range(back_to_back):
                call()
                x.grad = w.grad = b.grad = None
            issue.append(time.perf_counter() - t0)
            sync()
            total.append(time.perf_counter() - t0)
        host[name] = statistics.median(issue) * 1e3 / back_to_back
        pipelined[name] = statistics.median(total) * 1e3 / back_to_back
    A, C_, B = tb._canonical(x, 1)
    t = tb._tuning(x)
    shape_t = tb._tile_shape(A, C_, B, t.tile, t.max_block_c)
    return dict(
        shape=list(shape),
        layout="channels_last" if channels_last else ("nchw" if len(shape) == 4 else "rows"),
        acb=[A, C_, B],
        tile=list(shape_t),
        splits=tb._splits(A, C_, B, shape_t, t),
        tiles_per_block=tb._n_tiles(A, B, shape_t[0], shape_t[2]),
        rule="channel" if tb._whole_channels(A, C_, B, shape_t, t) else "split",
        ms=ms,
        host_ms=host,
        pipelined_ms=pipelined,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="tiny inputs under TRITON_INTERPRET=1 (no timing)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not tb.available() or (device == "cuda") != torch.cuda.is_available() or tb._device_type() != device:
        why = tb.why_unavailable() or ("--smoke needs TRITON_INTERPRET=1" if args.smoke else "no CUDA device")
        raise SystemExit(f"the Triton kernels cannot run this here: {why}")
    rows = []
    columns = f"{'split':>8s} {'channel':>8s} {'torch':>8s} {'t-rule':>8s}"
    print(f"{'input':24s} {columns}  S  tiles rule    faster  ms per step;")
    print(f"{'':24s} then host / pipelined ms per step back to back: split, channel, torch, torch-rule")
    for shape, cl in inputs(args.smoke):
        row = measure(shape, cl, device, *((1, 1) if args.smoke else (args.repeats, BACK_TO_BACK)))
        rows.append(row)
        ms = row["ms"]
        faster = min(("split", "channel"), key=ms.get)
        name = "x".join(map(str, shape)) + (" cl" if cl else "")
        host, piped = row["host_ms"], row["pipelined_ms"]
        pairs = "  ".join(f"{host[k]:.4f}/{piped[k]:.4f}" for k in ("split", "channel", "torch", "torch-rule"))
        print(
            f"{name:24s} {ms['split']:8.4f} {ms['channel']:8.4f} {ms['torch']:8.4f} {ms['torch-rule']:8.4f} "
            f"{row['splits']:2d} {row['tiles_per_block']:6d} {row['rule']:7s} {faster:7s} {pairs}"
        )
    if args.json:
        info = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
        with open(args.json, "w") as f:
            json.dump(dict(device=info, repeats=1 if args.smoke else args.repeats, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
