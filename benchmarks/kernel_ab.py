"""A/B of CPU kernel builds: bn_cpu.c compiled with different macros (or two versions of the file),
each called through ctypes on the same tensors, interleaved in random order with torch and a copy.

    .venv/bin/python benchmarks/kernel_ab.py eval 32x2048x7x7 bfloat16 nhwc --build A= --build B=-DAPPLY_ROWS=8
    .venv/bin/python benchmarks/kernel_ab.py bwd 4096x1024 float32 nchw --build old=/tmp/old_bn_cpu.c --build new=

Modes: eval (bn_eval), train (bn_train_forward, no running statistics), bwd (bn_train_backward
with dx), bwd_relu (bn_train_backward_relu: the backward of relu(BN(x)), its gate recomputed; torch
times its backward of the gated dy). A build is NAME=FLAGS (compile the checkout's kernel with
these extra flags, e.g. -DBLOCK_BYTES=262144) or NAME=PATH.c [FLAGS] (compile that file). Each
build's output must equal the others' and torch's within bfloat16 rounding before anything is
timed. Prints the median microseconds of each; run it several times (separate processes): on a
shared VM the ratio between processes moves more than within one.

An AVX2 machine on this one: the flag -mno-avx512f builds the portable C variant such a machine
gets, and ATEN_CPU_CAPABILITY=avx2 runs torch's AVX2 kernels (e.g. --build a512= --build
avx2=-mno-avx512f; a file whose HAVE_AVX512 test is replaced by `#if 0` with "old=/tmp/old.c
-mno-avx512f").
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from batchnorm.kernels import cpu

SOURCE = Path(cpu.__file__).with_name("bn_cpu.c")
P, I64, I32, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


def build(name: str, spec: str, directory: Path) -> ctypes.CDLL:
    """Compile one build as cpu.py does (its CFLAGS): `spec` is extra flags, optionally after a source file."""
    words = spec.split()
    source, extra = (Path(words[0]), words[1:]) if words and words[0].endswith(".c") else (SOURCE, words)
    out = directory / f"lib{name}.so"
    subprocess.run(["gcc", *cpu.CFLAGS, *extra, "-o", str(out), str(source)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.bn_eval.argtypes = [I32, P, P, I64, I64, I64, P, P, P, P, F64, I32]
    lib.bn_train_forward.argtypes = [I32, P, P, I64, I64, I64, P, P, F64, P, P, P, P, P, F64, I32]
    lib.bn_train_backward.argtypes = [I32, P, P, P, I64, I64, I64, P, P, P, P, P, I32]
    lib.bn_train_backward_relu.argtypes = [I32, P, P, P, I64, I64, I64, P, P, P, P, P, P, P, I32]
    lib.bn_set_cache_bytes.argtypes = [I64]
    lib.bn_set_cache_bytes(cpu._last_level_cache_bytes())
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["eval", "train", "bwd", "bwd_relu"])
    ap.add_argument("shape", help="e.g. 32x2048x7x7 (channels on axis 1)")
    ap.add_argument("dtype", choices=["float32", "bfloat16"])
    ap.add_argument("layout", choices=["nchw", "nhwc"])
    ap.add_argument("--build", action="append", required=True, help="NAME=FLAGS or NAME=PATH.c [FLAGS]")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()

    shape = tuple(int(s) for s in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    x = torch.randn(shape).to(dtype)
    if args.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    A, C, B = cpu.layout(x, 1)
    dt = 0 if dtype == torch.float32 else 1
    nt = torch.get_num_threads()
    w, b = torch.randn(C), torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    dims = [d for d in range(x.dim()) if d != 1]
    mean, invstd = x.float().mean(dims), (x.float().var(dims, unbiased=False) + 1e-5).rsqrt()
    dy = torch.randn_like(x)
    scale, shift = w * invstd, b  # bwd_relu: the gate is the forward's apply, (x - mean) * scale + shift > 0

    def kernel_call(lib: ctypes.CDLL):
        out, s1, s2, s3 = torch.empty_like(x), torch.empty(C), torch.empty(C), torch.empty(C)
        ptr = torch.Tensor.data_ptr
        if args.mode == "eval":
            call = lambda: lib.bn_eval(dt, ptr(x), ptr(out), A, C, B, ptr(rm), ptr(rv), ptr(w), ptr(b), 1e-5, nt)  # noqa: E731
        elif args.mode == "train":
            call = lambda: lib.bn_train_forward(  # noqa: E731
                dt, ptr(x), ptr(out), A, C, B, ptr(w), ptr(b), 1e-5, ptr(s1), ptr(s2), ptr(s3), None, None, 0.1, nt
            )
        elif args.mode == "bwd":
            call = lambda: lib.bn_train_backward(  # noqa: E731
                dt, ptr(dy), ptr(x), ptr(out), A, C, B, ptr(w), ptr(mean), ptr(invstd), ptr(s1), ptr(s2), nt
            )
        else:
            call = lambda: lib.bn_train_backward_relu(  # noqa: E731
                dt, ptr(dy), ptr(x), ptr(out), A, C, B, ptr(w), ptr(mean), ptr(invstd), ptr(scale), ptr(shift),
                ptr(s1), ptr(s2), nt,
            )
        return call, out

    if args.mode == "eval":
        reference = lambda: F.batch_norm(x, rm, rv, w, b, training=False)  # noqa: E731
    elif args.mode == "train":
        reference = lambda: F.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    else:
        mask = [True, False, False]
        dy_in = dy
        if args.mode == "bwd_relu":  # dy where the forward's relu passed it (torch stores the mask; ours recomputes)
            at = [C if d == 1 else 1 for d in range(x.dim())]
            dy_in = torch.where((x.float() - mean.view(at)) * scale.view(at) + shift.view(at) > 0, dy, 0)
        reference = lambda: torch.ops.aten.native_batch_norm_backward(  # noqa: E731
            dy_in, x, w, None, None, mean, invstd, True, 1e-5, mask
        )[0]

    impl, outs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.build:
            name, _, flags = spec.partition("=")
            impl[name], outs[name] = kernel_call(build(name, flags, Path(tmp)))
        dst = torch.empty_like(x)
        impl["torch"], impl["copy"] = reference, lambda: dst.copy_(x)
        with torch.no_grad():
            for fn in impl.values():
                fn()
            want = reference().float()
            for name, out in outs.items():
                err = (out.float() - want).abs() - 0.02 * (1 + want.abs())
                if err.max() > 0:
                    sys.exit(f"build {name}: output differs from torch beyond bfloat16 rounding")
            times: dict[str, list[float]] = {k: [] for k in impl}
            for _ in range(args.rounds):
                names = list(impl)
                random.shuffle(names)
                for k in names:
                    t = time.perf_counter()
                    impl[k]()
                    times[k].append(time.perf_counter() - t)
    medians = " ".join(f"{k}={statistics.median(v) * 1e6:.0f}" for k, v in times.items())
    print(f"{args.mode} {args.shape} {args.dtype} {args.layout}: {medians} (us)")


if __name__ == "__main__":
    main()
