"""Eval forward of one cache-resident `batchnorm bench` case, and what ran before it in the process.

    .venv/bin/python benchmarks/eval_in_cache.py ["32x128x512 f32"] [--before train_fwd,train_fwd_bwd]
        [--no-compile] [--runs 2]

The bench times each case's modes in one process, train fwd and fwd+bwd (ours, eager and
torch.compile's) before eval. For float32 inputs that fit in the last-level cache, eval is a
tie with torch at the speed of a copy, and which side wins moved with that history: this runs
the bench's own `run_suite` on one case with eval alone, or after the modes in --before, and
prints eval's medians (ours, eager, compile, and the copy of x timed in the same rounds, in us)
with the speedup vs eager. Each run is a fresh `run_suite` in this process (fresh graphs).
"""

from __future__ import annotations

import argparse

from batchnorm import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", default="32x128x512 f32", help="a suite case's name, or its start")
    parser.add_argument("--before", default="", help="modes timed before eval, e.g. train_fwd,train_fwd_bwd")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    cases = [c for c in bench.suite() if c.name.startswith(args.case)][:1]
    if not cases:
        raise SystemExit(f"no suite case starts with {args.case!r}; names look like '32x128x512 f32'")
    modes = [m for m in args.before.split(",") if m] + ["eval_fwd"]
    print(f"{cases[0].name}: eval after {modes[:-1] or 'nothing'}, compile {'on' if args.compile else 'off'}")
    for _ in range(args.runs):
        report = bench.run_suite(cases, modes=modes, compile=args.compile, min_time=1.0)
        row = next(r for r in report["rows"] if r["mode"] == "eval_fwd")
        us = {name: f"{ms * 1e3:.0f}" for name, ms in row["times_ms"].items() if ms is not None}
        print(f"  {us}, copy {row['copy_ms'] * 1e3:.0f} us: {row['speedup_vs_eager']:.2f}x vs eager")


if __name__ == "__main__":
    main()
