"""relu(BN(x) + residual) on the CPU: the fused layer against the same three steps written out.

    .venv/bin/python benchmarks/act_speed.py [--repeats 20] [--compile]

The ResNet block tail. For each case, training fwd+bwd (x and the residual require grad, as the
block's input does) and eval under no_grad:
- "fused": `BatchNormAct2d` (or 1d), the add and the ReLU in the kernel's apply pass (and,
  without a residual, the ReLU's backward inside BN's backward passes);
- "ours + add + relu": our `BatchNorm2d`, then `y + residual`, then `torch.relu`;
- "torch + add + relu": the same with `torch.nn.BatchNorm2d`, what a ResNet runs today;
- with --compile, "torch compiled": torch.compile of torch's three steps (inductor fuses the
  add and the ReLU into its BN kernels), and "fused compiled": our fused layer compiled
  (fullgraph=True; the operators batchnorm::cpu_relu_* in the graph).
Each repetition runs every implementation once, in a fresh random order; medians in ms.
"""

from __future__ import annotations

import argparse

import torch
from _interleaved import medians_ms

import batchnorm as bn

CASES = [  # (shape, dtype, channels_last, residual)
    ((32, 64, 56, 56), torch.float32, False, True),
    ((32, 64, 56, 56), torch.float32, True, True),
    ((32, 64, 56, 56), torch.float32, False, False),
    ((32, 64, 56, 56), torch.float32, True, False),
    ((32, 512, 28, 28), torch.float32, True, True),
    ((32, 1024, 14, 14), torch.float32, False, True),
    ((32, 2048, 7, 7), torch.float32, False, True),
    ((32, 64, 56, 56), torch.bfloat16, True, True),
    ((4096, 1024), torch.float32, False, True),
]


def _block_tails(shape, dtype, compile: bool) -> dict[str, torch.nn.Module]:
    C, two_d = shape[1], len(shape) == 2
    fused = (bn.BatchNormAct1d if two_d else bn.BatchNormAct2d)(C).to(dtype)
    ours = (bn.BatchNorm1d if two_d else bn.BatchNorm2d)(C).to(dtype)
    theirs = (torch.nn.BatchNorm1d if two_d else torch.nn.BatchNorm2d)(C).to(dtype)

    def written_out(layer):
        return lambda x, r: torch.relu(layer(x) if r is None else layer(x) + r)

    impls = {"fused": lambda x, r: fused(x, residual=r), "ours + add + relu": written_out(ours)}
    impls["torch + add + relu"] = written_out(theirs)
    if compile:
        torch.compiler.reset()
        impls["torch compiled"] = torch.compile(written_out(theirs))
        fused_graph = torch.compile(fused, fullgraph=True)
        impls["fused compiled"] = lambda x, r: fused_graph(x, residual=r)
    impls["layers"] = (fused, ours, theirs)
    return impls


def time_case(shape, dtype, channels_last: bool, residual: bool, repeats: int, compile: bool) -> dict[str, float]:
    """Median ms of each implementation: training fwd+bwd, then eval without autograd."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_() if residual else None
    g = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    impls = _block_tails(shape, dtype, compile)
    layers = impls.pop("layers")

    def train(f):
        return lambda: f(x, r).backward(g)

    def infer(f):
        def run():
            with torch.no_grad():
                f(x, r)

        return run

    out: dict[str, float] = {}
    for mode, step in (("train", train), ("eval", infer)):
        for layer in layers:
            layer.train(mode == "train")
        medians = medians_ms({name: step(f) for name, f in impls.items()}, repeats)
        out.update({f"{mode} {name}": ms for name, ms in medians.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of torch's three steps")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians in ms")
    for shape, dtype, cl, residual in CASES:
        med = time_case(shape, dtype, cl, residual, args.repeats, args.compile)
        what = "add+relu" if residual else "relu"
        layout = " channels_last" if cl else ""
        label = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}{layout} {what}"
        for mode in ("train", "eval"):
            row = {name.removeprefix(mode + " "): ms for name, ms in med.items() if name.startswith(mode)}
            cells = ", ".join(
                f"{name} {ms:.2f}" + ("" if name == "fused" else f" ({ms / row['fused']:.2f}x)")
                for name, ms in row.items()
            )
            print(f"{label} {mode}: {cells}", flush=True)


if __name__ == "__main__":
    main()
