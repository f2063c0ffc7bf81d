"""The host's share of a training step on the Triton path, measured without a GPU.

    python benchmarks/host_overhead.py [--repeats 3000]

On a GPU a small layer's step costs what the host spends issuing it when that exceeds the
kernels' time: our Python (the layer, the dispatch, the autograd Function, the checks and the
allocations) plus one Triton launch per kernel. This script times the Python part on the CPU:
the Triton kernels are compiled for the interpreter (TRITON_INTERPRET=1) and then replaced by
stubs that launch nothing, so what is left is everything but the launches (on a GPU each adds
Triton's launcher, some microseconds). For scale, torch's own layer on the same tiny CPU input
(its whole step, arithmetic included). Prints the median microseconds of each:

    forward (no grad)   layer(x) under torch.no_grad(): statistics, running update, count
    eval (no grad)      the layer in eval mode under torch.no_grad(): the running statistics
    step                layer(x).backward(g): forward, autograd, backward
    functional forward  functional.batch_norm(x, ...) with autograd recording: no layer
    Function step       the autograd Function alone (no running update), forward + backward
    autograd's share    a Function of the same signature returning ready-made gradients, step:
                        what autograd's engine and the three gradients' accumulation cost
    train_forward       triton_bn.train_forward alone (return_var=True)
    train_backward      triton_bn.train_backward alone
    update_running      triton_bn.update_running alone
    CUDA's rule, ...    step, forward (no grad) and eval as above with CUDA's running-statistics
                        rule simulated (nothing read back, kept-out batches counted on the
                        device), on the Triton path and on torch's kernel with our rule (what
                        "auto" gives small CUDA inputs: functional.NATIVE_MAX_ELEMS_CUDA; torch's
                        kernel computes here, so its CPU arithmetic is in those rows); "act":
                        BatchNormAct2d with a residual, on its fused kernels, or on torch's
                        kernel followed by the add and the ReLU

The stubs leave the outputs uninitialized, so the finiteness test of the running update sees
garbage; its warning is silenced. Nothing here is a GPU timing: it is the part of one that does
not depend on the GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first compiled

import torch

import batchnorm as bn
from batchnorm import functional, modules
from batchnorm.kernels import triton_bn as tb


class _Stub:
    """A kernel that launches nothing: kernel[grid](*args, **meta) returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


def median_us(fn, repeats: int) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3000)
    args = ap.parse_args()
    if not tb.available():
        raise SystemExit(f"the Triton kernels cannot load here: {tb.why_unavailable()}")
    for name in tb._JIT:
        if name.endswith("_kernel"):
            setattr(tb, name, _Stub())
    warnings.simplefilter("ignore", RuntimeWarning)

    x = torch.randn(8, 16, 4, 4, requires_grad=True)
    g = torch.ones_like(x)
    ours, theirs = bn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    xd = x.detach()
    mean, invstd = xd.mean((0, 2, 3)), torch.ones(16)
    rm, rv = torch.zeros(16), torch.ones(16)

    def forward(layer):
        def run():
            with torch.no_grad():
                layer(x)

        return run

    def step(layer):
        return lambda: layer(x).backward(g)

    ours_eval, theirs_eval = bn.BatchNorm2d(16).eval(), torch.nn.BatchNorm2d(16).eval()
    w, b = ours.weight, ours.bias
    train = bn.functional._BatchNormTrain
    ready = (torch.zeros_like(xd), torch.zeros(16), torch.zeros(16))

    class Ready(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, eps, axis, path, fused, stats):
            ctx.save_for_backward(x, weight, mean, invstd)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, dy):
            return (*ready, None, None, None, None, None)

    rows = []
    with bn.functional.use_backend("triton"):
        rows += [
            ("forward (no grad), ours", forward(ours)),
            ("forward (no grad), torch", forward(theirs)),
            ("eval (no grad), ours", forward(ours_eval)),
            ("eval (no grad), torch", forward(theirs_eval)),
            ("step, ours", step(ours)),
            ("step, torch", step(theirs)),
            ("functional forward, ours", lambda: bn.functional.batch_norm(x, rm, rv, w, b, True)),
            ("functional forward, torch", lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True)),
            ("Function step", lambda: train.apply(x, w, b, 1e-5, 1, "triton", None, []).backward(g)),
            ("autograd's share, step", lambda: Ready.apply(x, w, b, 1e-5, 1, "triton", None, []).backward(g)),
            ("train_forward", lambda: tb.train_forward(xd, ours.weight, ours.bias, 1e-5, 1, return_var=True)),
            ("train_backward", lambda: tb.train_backward(g, xd, ours.weight, mean, invstd, 1)),
            ("update_running", lambda: tb.update_running(mean, invstd, rm, rv, 128, 0.1)),
        ]
        for name, fn in rows:
            print(f"{name:28s} {median_us(fn, args.repeats):7.1f} us")

    for module in (functional, modules):  # CUDA's rule from here on
        module._reads_back_later = lambda t: True
    act, act_eval, r = bn.BatchNormAct2d(16), bn.BatchNormAct2d(16).eval(), torch.randn_like(x)

    def act_step():
        act(x, residual=r).backward(g)

    def act_forward():
        with torch.no_grad():
            act_eval(x, residual=r)

    for backend, path in (("triton", "Triton path"), ("torch", "torch's kernel")):
        with bn.functional.use_backend(backend):  # (the act layers: fused kernels, or BN, add and ReLU)
            for name, fn in (
                ("step", step(ours)),
                ("forward", forward(ours)),
                ("eval", forward(ours_eval)),
                ("act step", act_step),
                ("act eval", act_forward),
            ):
                label = f"CUDA's rule, {name}, {path}"
                print(f"{label:44s} {median_us(fn, args.repeats):7.1f} us")


if __name__ == "__main__":
    main()
