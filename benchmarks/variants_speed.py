"""Training fwd+bwd of ghost batches, masks and batch renormalization on the CPU: the kernel paths.

    .venv/bin/python benchmarks/variants_speed.py [--repeats 30] [--compile] [--only ghost]

Ghost batches (`virtual_batch_size=k`) run on the CPU kernel in one call for all ghost batches
(`batchnorm._kernel_variants`); a mask alone in the kernel's masked entries, over rows where each
mask element is a row of x with the channels last (kind "mask"), over the planes of a contiguous
(N, C, L) (kind "mask-ncl"); batch renormalization as
a statistics call and one apply pass with weight w*r and bias w*d + b. For each case: our layer
on that path, the same layer on the torch-ops general path (backend "composite", what ran
before), what one would write by hand with torch's layer (a loop over the chunks with torch.cat;
gather the real rows and scatter back), and plain BN on the whole batch (ours and torch's) for
scale. --compile adds our layer and the general path under torch.compile(fullgraph=True): the
kernel's operators in the graph (ghost batches, masks, renorm), or inductor's code for the
general path's torch ops. Each repetition runs every implementation once, in a fresh random
order; medians in ms.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _interleaved import medians_ms

import batchnorm as bn
from batchnorm.functional import use_backend

CASES = [  # (kind, shape, k or fraction of real rows, dtype, channels_last)
    ("ghost", (4096, 256), 256, torch.float32, False),  # tabular (TabNet-like): ghost batches of 256
    ("ghost", (1024, 128), 128, torch.float32, False),
    ("ghost", (256, 64, 28, 28), 32, torch.float32, False),  # a CNN layer, ghost batches of 32
    ("ghost", (256, 64, 28, 28), 32, torch.float32, True),
    ("ghost", (4096, 256), 256, torch.bfloat16, False),
    ("mask", (32, 128, 512), 0.6, torch.float32, False),  # padded sequences (N, L, C), 60% real
    ("mask", (64, 64, 256), 0.6, torch.float32, False),
    ("mask", (32, 128, 512), 0.6, torch.bfloat16, False),
    ("mask-ncl", (32, 512, 128), 0.6, torch.float32, False),  # padded sequences (N, C, L), axis 1
    ("mask-ncl", (64, 256, 64), 0.6, torch.float32, False),
    ("mask-ncl", (32, 512, 128), 0.6, torch.bfloat16, False),
    ("renorm", (4096, 256), None, torch.float32, False),  # Renorm.fixed(1.5, 0.5)
    ("renorm", (256, 64, 28, 28), None, torch.float32, False),
]


def _layer(shape, **options) -> torch.nn.Module:
    if options.get("axis") == -1:
        return bn.BatchNorm(shape[-1], **options)
    return (bn.BatchNorm1d if len(shape) <= 3 else bn.BatchNorm2d)(shape[1], **options)


def _implementations(kind, shape, k, x, compile: bool) -> dict[str, Callable[[], torch.Tensor]]:
    dtype = x.dtype
    mask = None
    if kind == "renorm":  # no torch equivalent to write by hand
        renorm = bn.Renorm.fixed(1.5, 0.5)
        ours, general, plain = (_layer(shape, renorm=r).to(dtype) for r in (renorm, renorm, None))
        torch_plain = (torch.nn.BatchNorm1d if len(shape) <= 3 else torch.nn.BatchNorm2d)(shape[1]).to(dtype)
        hand = None
    elif kind == "ghost":
        ours, general, plain = (_layer(shape, virtual_batch_size=n).to(dtype) for n in (k, k, None))
        torch_cls = torch.nn.BatchNorm1d if len(shape) <= 3 else torch.nn.BatchNorm2d
        by_hand, torch_plain = torch_cls(shape[1]).to(dtype), torch_cls(shape[1]).to(dtype)

        def hand():
            return torch.cat([by_hand(c) for c in x.split(k)])
    else:  # a mask over (N, L) of (N, L, C) or (N, C, L) with random lengths, about a fraction k real
        ncl = kind == "mask-ncl"
        N, L, C = (shape[0], shape[2], shape[1]) if ncl else shape
        lengths = (torch.rand(N) * 2 * k * L).clamp(2, L).long()
        mask = torch.arange(L)[None] < lengths[:, None]
        ours, general, plain = (_layer(shape, **({} if ncl else {"axis": -1})).to(dtype) for _ in range(3))
        by_hand, torch_plain = torch.nn.BatchNorm1d(C).to(dtype), torch.nn.BatchNorm1d(C).to(dtype)

        def hand():  # the real (N, L) positions' rows of C values, gathered, and scattered back into zeros
            real, rows = mask.reshape(-1).nonzero().squeeze(1), (x.transpose(1, 2) if ncl else x).reshape(-1, C)
            y = rows.new_zeros(rows.shape).index_copy(0, real, by_hand(rows.index_select(0, real))).view(N, L, C)
            return y.transpose(1, 2).contiguous() if ncl else y

    args = (x,) if mask is None else (x, mask)

    def on_general(layer=general):
        with use_backend("composite"):  # (a compiled layer: its own graph for this backend)
            return layer(*args)

    def plain_torch():
        return torch_plain(x.transpose(1, 2)) if kind == "mask" else torch_plain(x)

    impls = {"ours": lambda: ours(*args), "general path": on_general, "by hand": hand, "plain ours": lambda: plain(x)}
    impls["plain torch"] = plain_torch
    if compile:
        ours_graph, general_graph = (torch.compile(layer, fullgraph=True) for layer in (ours, general))
        impls["ours compiled"] = lambda: ours_graph(*args)
        impls["general compiled"] = lambda: on_general(general_graph)
    return {name: fn for name, fn in impls.items() if fn is not None}


def time_case(
    kind, shape, k, dtype: torch.dtype, channels_last: bool, repeats: int, compile: bool = False
) -> dict[str, float]:
    """Median ms of each implementation's fwd+bwd on one case."""
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(shape).to(dtype)
    if compile:
        torch.compiler.reset()  # fresh graphs per case: no recompile limit, no dynamic shapes
    impls = _implementations(kind, shape, k, x, compile)

    def step(f):
        def run():
            y = f()
            (y if y.shape == g.shape else y.transpose(1, 2)).backward(g)

        return run

    return medians_ms({name: step(f) for name, f in impls.items()}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time both layers under torch.compile")
    parser.add_argument("--only", help="run only the cases of this kind (ghost, mask, mask-ncl, renorm)")
    args = parser.parse_args()
    for kind, shape, k, dtype, cl in CASES:
        if args.only is not None and kind != args.only:
            continue
        med = time_case(kind, shape, k, dtype, cl, args.repeats, args.compile)
        what = f"k={k}" if kind == "ghost" else "r_max 1.5, d_max 0.5" if kind == "renorm" else f"~{k:.0%} real"
        layout = " channels_last" if cl else ""
        label = f"{kind} {'x'.join(map(str, shape))} {what} {str(dtype).removeprefix('torch.')}{layout}"
        print(f"{label}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in med.items()))


if __name__ == "__main__":
    main()
