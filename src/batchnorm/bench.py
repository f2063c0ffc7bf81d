"""`batchnorm bench`: our batch_norm against PyTorch eager, torch.compile and the memory roofline.

Batch normalization is memory-bound, so each timing is compared with the time
the data movement alone must take. The traffic model, for E elements of s
bytes (data larger than the last-level cache):

    train forward       3 passes   read x for one-pass statistics; read x, write y
    train fwd+bwd       8 passes   forward's 3, then backward's 5: read x and dy for
                                   sum(dy), sum(dy * x_hat); read both again, write dx
    eval forward        2 passes   read x, write y

    floor = passes / 2 * (time of a copy of x),    % of roofline = floor / time

where the copy of x (into a tensor made once) is timed in the same rounds as the
implementations, so it sees the same machine state and caches: this VM's memory
bandwidth moves by 1.5x over minutes, and in-cache rows copy at cache speed. The
run also measures the copy bandwidth of a 256 MiB tensor (bytes read + written
per second) at its start and end; the JSON keeps the floor at the larger of the
two as `floor_ms_run_copy` / `roofline_pct_run_copy`. Parameters and statistics are (C,)
vectors and are not counted. bfloat16 cases use float32 weight, bias and running
statistics (mixed precision), so s = 2 there.

Method: for each case and mode, every implementation is warmed up (the first
call of torch.compile compiles; its time is recorded as `compile_s`), then the
implementations are timed in turn, in a fresh random order (fixed seed) at
every repetition, and the median is reported (the minimum and every sample go to the
JSON). Each call makes fresh outputs; forward
modes run under torch.no_grad(); fwd+bwd takes the gradients of x, weight and
bias for a fixed upstream gradient with torch.autograd.grad. On CUDA the device
is synchronized before and after each timed call. No timing is asserted
anywhere: this module prints tables and writes JSON. Below the table it checks
issue 3's speed targets on the run's rows (`targets`: met or not, with the value).

    >>> report = run_suite([Case((8, 4, 16, 16), torch.float32)], repeats=3, compile=False)
    >>> sorted(report["rows"][0]["times_ms"])
    ['compile', 'eager', 'ours']
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._console import fail as _fail
from .functional import batch_norm

__all__ = [
    "MODES",
    "PASSES",
    "Case",
    "markdown",
    "measure_copy_bandwidth",
    "register",
    "render",
    "run_suite",
    "suite",
    "targets",
]

MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
MODE_LABELS = {"train_fwd": "train fwd", "train_fwd_bwd": "train fwd+bwd", "eval_fwd": "eval fwd"}
MAX_ROUNDS = 400  # timed runs per implementation at most, whatever min_time asks
PASSES = {"train_fwd": 3, "train_fwd_bwd": 8, "eval_fwd": 2}  # the traffic model, in passes of E*s bytes
# Distinct tensors of x's size a mode touches (x, y; x, y, dy, dx): its working set.
_TENSORS_TOUCHED = {"train_fwd": 2, "train_fwd_bwd": 4, "eval_fwd": 2}
IMPLS = ("ours", "eager", "compile")
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}  # copy-bandwidth tensor: far above the last-level cache
MOMENTUM, EPS = 0.1, 1e-5
_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


@dataclass(frozen=True)
class Case:
    """One input of the suite: shape (N, C, *), dtype, and for 4-D inputs the memory layout."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.channels_last and len(self.shape) != 4:
            raise ValueError(f"channels_last needs a 4-D shape (N, C, H, W), got {self.shape}")

    @property
    def layout(self) -> str:
        if len(self.shape) != 4:
            return "contiguous"
        return "channels_last" if self.channels_last else "nchw"

    @property
    def name(self) -> str:
        """E.g. '32x64x56x56 nhwc f32'; `--only` matches a substring of this."""
        dims = "x".join(map(str, self.shape))
        layout = {"nchw": " nchw", "channels_last": " nhwc", "contiguous": ""}[self.layout]
        return f"{dims}{layout} {_DTYPE_NAMES.get(self.dtype, str(self.dtype))}"

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


_RESNET50 = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]


# Small tensors, where the cost of a call is mostly fixed overhead (Python, dispatch, autograd):
# an MLP's hidden layers, a small CNN's feature maps, a short sequence batch.
_SMALL = [
    Case((128, 64)),
    Case((512, 256)),
    Case((32, 16, 8, 8)),
    Case((32, 16, 8, 8), channels_last=True),
    Case((16, 64, 8, 8)),
    Case((32, 128, 16)),
    Case((128, 64), torch.bfloat16),
]


def suite(quick: bool = False, small: bool = False) -> list[Case]:
    """The shape suite of issue 3, or with `quick` a subset that takes about a minute on 2 cores.

    Full: ResNet-50 stage shapes at batch 32 and a 3-channel 224x224 image batch,
    each NCHW and channels_last; 2-D (4096, 1024) and 3-D (32, 128, 512);
    everything in float32 and bfloat16 (28 cases). `small`: instead, seven inputs of
    8K-131K elements (MLP and small-CNN layers), where per-call overhead decides.
    """
    if quick and small:
        raise ValueError("choose one of quick and small")
    if small:
        return list(_SMALL)
    if quick:
        return [
            Case((32, 64, 56, 56)),
            Case((32, 64, 56, 56), channels_last=True),
            Case((8, 3, 224, 224)),
            Case((4096, 1024)),
            Case((32, 128, 512)),
            Case((32, 64, 56, 56), torch.bfloat16),
        ]
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [*_RESNET50, (8, 3, 224, 224)]:
            cases += [Case(shape, dtype), Case(shape, dtype, channels_last=True)]
        cases += [Case((4096, 1024), dtype), Case((32, 128, 512), dtype)]
    return cases


# --------------------------------------------------------------------------- device and machine


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; ValueError with a remedy otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device '{name}'; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{name}'; expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA: {torch.version.cuda or 'no'}); run on a machine with an NVIDIA GPU "
                "and a CUDA build of torch, or use --device cpu"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: no such GPU; {torch.cuda.device_count()} visible (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
        device = torch.device("cuda", index)
    return device


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _last_level_cache_bytes(device: torch.device) -> int | None:
    """L2 of a GPU; the highest-level CPU cache from Linux sysfs (None where unknown)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()  # e.g. '32768K'
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        if best is None or level > best[0]:
            best = (level, nbytes)
    return None if best is None else best[1]


def _git_state() -> dict[str, Any] | None:
    """The commit the package was run from and the files modified since (None outside a checkout)."""
    root = Path(__file__).resolve().parents[2]  # src/batchnorm/bench.py -> the checkout
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": [line[3:] for line in status.splitlines()]}


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from: platform, cores, threads, torch, device name, cache, commit."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "last_level_cache_bytes": _last_level_cache_bytes(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git": _git_state(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cuda_path"] = _cuda_path_state()
    else:
        info["cpu_kernel"] = _cpu_kernel_state()
    return info


def _cuda_path_state() -> str:
    """Which of our paths "auto" takes on CUDA tensors: by size, the Triton kernels or torch's kernel."""
    from . import functional
    from .kernels import triton_bn

    small = (
        f"at most {functional.NATIVE_MAX_ELEMS_CUDA['train_grad']} elements: torch's kernel with our "
        "running-statistics rule"
    )
    if not triton_bn.available():
        return f"{small}; above: torch ops (the Triton kernels are unavailable: {triton_bn.why_unavailable()})"
    return f"{small}; above: the Triton kernels"


def _cpu_kernel_state() -> str:
    """How our CPU calls reach the C kernel: through the C++ entry points, ctypes, or not at all."""
    from .kernels import cpu

    if not cpu.available():
        return f"unavailable: {cpu.why_unavailable()}"
    flags = " ".join(cpu._extra_flags)
    built = f", the kernel built with $BATCHNORM_KERNEL_CFLAGS {flags!r}" if flags else ""
    ext = cpu.extension()
    if ext is None:
        return f"ctypes (C++ entry points unavailable: {cpu.extension_why_unavailable()}){built}"
    pool = ext.output_pool()[2] >> 20
    pooled = f", outputs from a pool of up to {pool} MiB of freed ones" if pool else ""
    return f"C++ entry points{pooled}{built}"


# --------------------------------------------------------------------------- timing


def _time_call(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds for one call; its outputs are dropped after the clock stops."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def measure_copy_bandwidth(
    device: torch.device | str = "cpu", nbytes: int | None = None, repeats: int = 10
) -> float:
    """Bytes read + bytes written per second of `dst.copy_(src)` on a large tensor (median).

    Default size: 256 MiB on the CPU, 1 GiB on a GPU, far above the last-level cache.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = COPY_BYTES[device.type]
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = _synchronizer(device)
    for _ in range(2):
        dst.copy_(src)

    def copy() -> None:
        dst.copy_(src)

    times = [_time_call(copy, sync) for _ in range(repeats)]
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def _one_thread(fn: Callable[[], float]) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _make_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """x (requires grad) in the case's layout, fixed upstream gradient dy, float32 (C,) parameters."""
    g = torch.Generator().manual_seed(0)
    C = case.shape[1]
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    if case.channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    params = dict(
        weight=(1 + 0.1 * torch.randn(C, generator=g)).to(device),
        bias=(0.1 * torch.randn(C, generator=g)).to(device),
        running_mean=(0.1 * torch.randn(C, generator=g)).to(device),
        running_var=(1 + 0.1 * torch.rand(C, generator=g)).to(device),
    )
    return {"x": x.requires_grad_(), "dy": dy, **params}


def _calls(impl: Callable[..., torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per mode for one implementation, with its own running statistics."""
    x, dy, w, b = t["x"], t["dy"], t["weight"].requires_grad_(), t["bias"].requires_grad_()
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()

    def train_fwd():
        with torch.no_grad():
            return impl(x, rm, rv, w, b, True, MOMENTUM, EPS)

    def train_fwd_bwd():
        y = impl(x, rm, rv, w, b, True, MOMENTUM, EPS)
        return torch.autograd.grad(y, (x, w, b), dy)

    def eval_fwd():
        with torch.no_grad():
            return impl(x, rm, rv, w, b, False, MOMENTUM, EPS)

    return {"train_fwd": train_fwd, "train_fwd_bwd": train_fwd_bwd, "eval_fwd": eval_fwd}


def _max_rel_diff(ours: Any, ref: Any) -> float:
    """max over output tensors of max|ours - ref| / max|ref|: a sanity check, not a parity test."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for a, r in zip(ours, ref, strict=True):
        r = r.float()
        worst = max(worst, float((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)))
    return worst


def _describe_error(exc: BaseException) -> str:
    """'RuntimeError: first line of the message'."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def _geomean(values: Sequence[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


# --------------------------------------------------------------------------- targets

LARGE_BYTES = 100e6  # issue 3's "tensors of 100 MB and more" (CUDA)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 3's speed targets, each checked against this run's rows.

    CPU: train fwd+bwd float32 at a geometric mean >= 2x vs eager with no case below 0.9x, the
    NCHW float32 cases larger than the cache at >= 60% of the roofline, bfloat16 at least as far
    ahead (read two ways: the same thresholds, and a geometric mean >= float32's), eval never
    slower than eager. CUDA: train fwd and fwd+bwd of tensors of 100 MB and more at >= 85% of
    the roofline, a geometric mean >= 1.2x vs eager over all rows, no smaller case below 0.9x.

    One dict per target whose rows the run has: `target` (words), `value` and `threshold` in
    `unit` ("x": speedup, "%": of the roofline; `met` is value >= threshold), and `detail` (the
    cases it was measured on, the slowest one).
    A run of part of the suite (`--only`, `--quick`) checks the targets on its part only.
    """
    rows = report["rows"]
    found: list[dict[str, Any]] = []

    def check(target: str, value: float | None, threshold: float, detail: str, unit: str = "x") -> None:
        if value is not None:
            met = value >= threshold
            found.append(
                {"target": target, "value": value, "threshold": threshold, "unit": unit, "met": met, "detail": detail}
            )

    def select(mode: str, dtype: str | None = None, **where: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in rows
            if r["mode"] == mode and dtype in (None, r["dtype"]) and all(r[k] == v for k, v in where.items())
        ]

    def geomean(name: str, selected: list[dict[str, Any]], threshold: float) -> None:
        check(
            f"{name}, geometric mean vs eager",
            _geomean([r["speedup_vs_eager"] for r in selected]),
            threshold,
            _cases(len(selected)),
        )

    def slowest(
        name: str,
        selected: list[dict[str, Any]],
        threshold: float,
        key: str = "speedup_vs_eager",
        explain: Callable[[dict[str, Any]], str] = lambda row: "",
    ) -> None:
        if selected:
            worst = min(selected, key=lambda r: r[key])
            unit = "%" if key == "roofline_pct" else "x"
            check(name, worst[key], threshold, f"{worst['case']}, of {_cases(len(selected))}{explain(worst)}", unit)

    if report["settings"]["device"].startswith("cuda"):
        big = [r for r in rows if r["elements"] * r["element_size"] >= LARGE_BYTES]
        for mode in ("train_fwd", "train_fwd_bwd"):
            chosen = [r for r in big if r["mode"] == mode]
            slowest(f"{MODE_LABELS[mode]} of tensors >= 100 MB, lowest % of the roofline", chosen, 85, "roofline_pct")
        geomean("all modes", rows, 1.2)
        small = [r for r in rows if r["elements"] * r["element_size"] < LARGE_BYTES]
        slowest("tensors under 100 MB, slowest case vs eager", small, 0.9)
        return found

    f32, bf16 = select("train_fwd_bwd", "float32"), select("train_fwd_bwd", "bfloat16")
    for name, chosen in (("float32", f32), ("bfloat16", bf16)):
        geomean(f"{name} train fwd+bwd", chosen, 2.0)
        slowest(f"{name} train fwd+bwd, slowest case vs eager", chosen, 0.9)
    large = select("train_fwd_bwd", "float32", layout="nchw", fits_in_cache=False)
    slowest("float32 NCHW train fwd+bwd larger than the cache, lowest % of the roofline", large, 60, "roofline_pct")
    pairs = [(b, f) for b in bf16 for f in f32 if b["shape"] == f["shape"] and b["layout"] == f["layout"]]
    if pairs:
        # How much faster each side's bfloat16 is than its float32: the reason the two differ.
        ours = _geomean([b["times_ms"]["ours"] / f["times_ms"]["ours"] for b, f in pairs])
        eager = _geomean([b["times_ms"]["eager"] / f["times_ms"]["eager"] for b, f in pairs])
        check(
            "bfloat16 train fwd+bwd, geometric mean vs eager, against float32's",
            _geomean([b["speedup_vs_eager"] for b, _ in pairs]),
            _geomean([f["speedup_vs_eager"] for _, f in pairs]),
            f"{_cases(len(pairs))}; bfloat16 takes {ours:.2f}x float32's time in ours, {eager:.2f}x in eager",
        )

    def against_copy(row: dict[str, Any]) -> str:
        t, copy = row["times_ms"], row["copy_ms"]
        return f"; there ours took {t['ours'] / copy:.2f}x and eager {t['eager'] / copy:.2f}x the time of a copy of x"

    slowest("eval fwd, slowest case vs eager", select("eval_fwd"), 1.0, explain=against_copy)
    return found


def run_suite(
    cases: Sequence[Case] | None = None,
    *,
    device: torch.device | str = "cpu",
    repeats: int = 20,
    warmup: int = 2,
    compile: bool = True,
    modes: Sequence[str] = MODES,
    min_time: float = 0.0,
    copy_bytes: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Time ours, torch eager and torch.compile of F.batch_norm on each case and mode.

    Returns the report that `render` prints and `--json` writes: machine info,
    settings, the copy bandwidth, one row per (case, mode) with median times in
    ms (None for compile when it is off or failed), speedups (> 1: ours is
    faster), ours' GB/s and % of the roofline, and per-mode geometric means.
    Each implementation runs `repeats` times, and more (up to MAX_ROUNDS) until its
    calls add up to `min_time` seconds: short cases then get enough samples for a
    steady median. `console` shows a progress bar there; None runs silently.
    """
    device = resolve_device(str(device))
    cases = suite() if cases is None else list(cases)
    if not cases:
        raise ValueError("no cases to run")
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be at least 1, got repeats={repeats}, warmup={warmup}")
    if not min_time >= 0:
        raise ValueError(f"min_time must be at least 0 seconds, got {min_time}")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; expected some of {list(MODES)}")
    machine = machine_info(device)  # before the run, so the load average is other programs'
    sync = _synchronizer(device)
    llc = machine["last_level_cache_bytes"]
    started = time.perf_counter()

    progress = (
        Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        if console is not None
        else None
    )
    rows: list[dict[str, Any]] = []
    with progress or contextlib.nullcontext():
        task = progress.add_task("copy bandwidth", total=2 + len(cases) * len(modes)) if progress else None
        copy = {"start": measure_copy_bandwidth(device, copy_bytes)}
        if device.type == "cpu" and torch.get_num_threads() > 1:
            copy["start_1_thread"] = _one_thread(lambda: measure_copy_bandwidth(device, copy_bytes))
        if progress:
            progress.advance(task)
        for case in cases:
            tensors = _make_inputs(case, device)
            impls: dict[str, Callable[..., torch.Tensor]] = {"ours": batch_norm, "eager": F.batch_norm}
            compile_error: str | None = None
            if compile:
                try:
                    torch.compiler.reset()  # a fresh cache per case: no recompile limit, no dynamic shapes
                    impls["compile"] = torch.compile(F.batch_norm, dynamic=False)
                except Exception as exc:  # torch.compile unsupported on this platform / Python
                    compile_error = _describe_error(exc)
            calls = {name: _calls(impl, tensors) for name, impl in impls.items()}
            # The roofline's copy: into a tensor made once (x's layout), so it costs data movement
            # only; a fresh 100 MB output would first page-fault (our kernel advises huge pages).
            x = tensors["x"].detach()
            copy_x = functools.partial(torch.empty_like(x).copy_, x)
            for mode in modes:
                if progress:
                    progress.update(task, description=f"{case.name} · {MODE_LABELS[mode]}")
                rows.append(
                    _run_mode(case, mode, calls, repeats, warmup, sync, llc, compile_error, min_time, copy_x)
                )
                if progress:
                    progress.advance(task)
            del tensors, calls, impls, x, copy_x
        if progress:
            progress.update(task, description="copy bandwidth")
        copy["end"] = measure_copy_bandwidth(device, copy_bytes)
        if progress:
            progress.advance(task)
    if compile:
        torch.compiler.reset()

    # The run's copy bandwidth: the better of the two full-thread copies (the stricter floor).
    copy_bw = max(copy["start"], copy["end"])
    for row in rows:
        ms = row["times_ms"]["ours"]
        # The roofline: a copy of x timed in the same rounds as the implementations (same machine
        # state, same caches), `passes` / 2 copies' worth of traffic. The run's copy bandwidth
        # gives the second floor, which in-cache rows exceed and a busy spell moves.
        row["floor_ms"] = row["copy_ms"] * PASSES[row["mode"]] / 2
        row["roofline_pct"] = 100 * row["floor_ms"] / ms
        row["floor_ms_run_copy"] = row["model_bytes"] / copy_bw * 1e3
        row["roofline_pct_run_copy"] = 100 * row["floor_ms_run_copy"] / ms
        row["ours_gbps"] = row["model_bytes"] / ms / 1e6
    geomean = {}
    for mode in modes:
        mode_rows = [r for r in rows if r["mode"] == mode]
        vs_compile = [r["speedup_vs_compile"] for r in mode_rows if r["speedup_vs_compile"] is not None]
        geomean[mode] = {
            "vs_eager": _geomean([r["speedup_vs_eager"] for r in mode_rows]),
            "vs_compile": _geomean(vs_compile),
            "n_eager": len(mode_rows),
            "n_compile": len(vs_compile),
        }
    report = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "device": str(device),
            "repeats": repeats,
            "min_time_s": min_time,
            "warmup": warmup,
            "compile": compile,
        },
        "copy_bandwidth_gbps": copy_bw / 1e9,
        "copy_bandwidth_runs_gbps": {k: v / 1e9 for k, v in copy.items()},
        "traffic_model_passes": dict(PASSES),
        "rows": rows,
        "geomean_speedup": geomean,
        "elapsed_s": time.perf_counter() - started,
    }
    report["targets"] = targets(report)
    return report


def _run_mode(
    case: Case,
    mode: str,
    calls: dict[str, dict[str, Callable[[], Any]]],
    repeats: int,
    warmup: int,
    sync: Callable[[], None],
    llc: int | None,
    compile_error: str | None,
    min_time: float,
    copy_x: Callable[[], Any],
) -> dict[str, Any]:
    """Warm up every implementation, then time them in turn (random order per repetition); one result row.

    `copy_x` (a copy of the input) is timed in the same rounds, for the roofline.
    """
    active = dict(calls)
    outputs: dict[str, Any] = {}
    compile_s = None
    for name, per_mode in calls.items():
        try:
            t0 = time.perf_counter()
            outputs[name] = per_mode[mode]()
            sync()
            if name == "compile":
                compile_s = time.perf_counter() - t0
            for _ in range(warmup - 1):
                per_mode[mode]()
        except Exception as exc:
            if name != "compile":
                raise
            compile_error = _describe_error(exc)
            del active[name]
    max_rel_diff = _max_rel_diff(outputs["ours"], outputs["eager"])
    del outputs

    copy_x()  # warm-up
    timed = {name: per_mode[mode] for name, per_mode in active.items()}
    timed["copy"] = copy_x
    samples: dict[str, list[float]] = {name: [] for name in timed}
    # A fresh random order every repetition: with a fixed or rotating order each implementation
    # always follows the same one and inherits its cache and thread-pool state (measured: up to
    # 10-15% on in-cache shapes).
    rng = random.Random(0)
    order = list(timed)
    rounds = 0
    while rounds < repeats or (rounds < MAX_ROUNDS and min(sum(samples[n]) for n in active) < min_time):
        rng.shuffle(order)
        for name in order:
            samples[name].append(_time_call(timed[name], sync))
        rounds += 1

    ms = {name: statistics.median(samples[name]) * 1e3 if name in samples else None for name in IMPLS}
    element_size = torch.empty((), dtype=case.dtype).element_size()
    model_bytes = PASSES[mode] * case.elements * element_size
    working_set = _TENSORS_TOUCHED[mode] * case.elements * element_size
    return {
        "case": case.name,
        "shape": list(case.shape),
        "layout": case.layout,
        "dtype": str(case.dtype).removeprefix("torch."),
        "mode": mode,
        "elements": case.elements,
        "element_size": element_size,
        "model_bytes": model_bytes,
        "fits_in_cache": llc is not None and working_set <= llc,
        "times_ms": ms,
        "copy_ms": statistics.median(samples["copy"]) * 1e3,
        "min_ms": {name: min(samples[name]) * 1e3 if name in samples else None for name in IMPLS},
        "speedup_vs_eager": _ratio(ms["eager"], ms["ours"]),
        "speedup_vs_compile": _ratio(ms["compile"], ms["ours"]),
        "compile_s": compile_s,
        "compile_error": compile_error if "compile" not in active else None,
        "max_rel_diff_vs_eager": max_rel_diff,
        "runs": rounds,
        "timed_s": {name: sum(ts) for name, ts in samples.items()},
        "quartiles_ms": {name: [q * 1e3 for q in statistics.quantiles(ts, n=4)] for name, ts in samples.items()}
        if rounds > 1
        else None,
        # every sample up to 100, then every k-th (the JSON stays small)
        "samples_ms": {name: [t * 1e3 for t in ts[:: max(1, len(ts) // 100)]] for name, ts in samples.items()},
    }


# --------------------------------------------------------------------------- output


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _fmt_x(v: float | None) -> str:
    if v is None:
        return "—"
    colour = "green" if v >= 1 else "red" if v < 0.9 else "yellow"
    return f"[{colour}]{v:.2f}x[/]"


_COLUMNS = (
    "case",
    "mode",
    "ours ms",
    "eager ms",
    "compile ms",
    "vs eager",
    "vs compile",
    "GB/s",
    "% roofline",
)
_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}  # half types: 2e-2


def render(report: dict[str, Any], console: Console) -> None:
    """The table (one row per case and mode), the geometric means, and any warnings."""
    m = report["machine"]
    min_time = report["settings"].get("min_time_s")
    console.print(
        f"[bold]batchnorm bench[/] on {m['device_name']} ({m['device']}, {m['cpu_count']} CPUs, "
        f"{m['torch_threads']} torch threads), torch {m['torch']}; copy bandwidth "
        f"{report['copy_bandwidth_gbps']:.1f} GB/s (read + write); median of "
        f"{report['settings']['repeats']}+ runs in random order"
        + (f" (at least {min_time:g} s of each)" if min_time else ""),
        highlight=False,
    )
    if "cpu_kernel" in m or "cuda_path" in m:
        console.print(f"ours: {m.get('cpu_kernel') or m['cuda_path']}", highlight=False)
    load = m.get("load_average")
    if load and load[0] > 0.5:
        console.print(
            f"[yellow]note:[/] the 1-minute load average was {load[0]:.2f} when the run started: "
            "other programs may have competed for the cores, and the timings are then noisy",
            highlight=False,
        )
    runs = report.get("copy_bandwidth_runs_gbps", {})
    if "start_1_thread" in runs and runs["start_1_thread"] > 1.1 * runs["start"]:
        console.print(
            f"[yellow]note:[/] a copy on 1 thread ({runs['start_1_thread']:.1f} GB/s) beat one on "
            f"{m['torch_threads']} ({runs['start']:.1f} GB/s): the other cores were busy or slow to "
            "wake (another program, or a contended virtual machine); multi-threaded timings are suspect",
            highlight=False,
        )
    if runs.get("end") and not 0.8 < runs["end"] / runs["start"] < 1.25:
        console.print(
            f"[yellow]note:[/] the copy bandwidth changed during the run ({runs['start']:.1f} GB/s at "
            f"the start, {runs['end']:.1f} at the end): the machine's state changed; timings are noisy",
            highlight=False,
        )
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("case", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    for col in _COLUMNS[2:]:
        table.add_column(col, justify="right", no_wrap=True)
    previous = None
    cached = False
    for row in report["rows"]:
        if previous is not None and row["case"] != previous:
            table.add_section()
        label = row["case"] if row["case"] != previous else ""
        previous = row["case"]
        mark = "*" if row["fits_in_cache"] else ""
        cached |= row["fits_in_cache"]
        t = row["times_ms"]
        table.add_row(
            label,
            MODE_LABELS[row["mode"]] + mark,
            _fmt_ms(t["ours"]),
            _fmt_ms(t["eager"]),
            _fmt_ms(t["compile"]),
            _fmt_x(row["speedup_vs_eager"]),
            _fmt_x(row["speedup_vs_compile"]),
            f"{row['ours_gbps']:.1f}",
            f"{row['roofline_pct']:.0f}%",
        )
    console.print(table)
    if cached:
        llc = m["last_level_cache_bytes"]
        console.print(
            f"* the mode's working set fits in the {llc / 2**20:.0f} MiB last-level cache: "
            "GB/s may exceed the streaming limit (% roofline compares with a copy of x in the same state)",
            highlight=False,
        )
    for mode, g in report["geomean_speedup"].items():
        vs_compile = f"{g['vs_compile']:.2f}x" if g["vs_compile"] is not None else "—"
        console.print(
            f"geometric-mean speedup, {MODE_LABELS[mode]:<13}: {g['vs_eager']:.2f}x vs eager "
            f"({g['n_eager']} cases), {vs_compile} vs compile ({g['n_compile']} cases)",
            highlight=False,
        )
    found = _targets_of(report)
    if found:
        console.print(_targets_heading(report), highlight=False)
        for t in found:
            verdict = "[green]met    [/]" if t["met"] else "[red]not met[/]"
            console.print(f"  {verdict} {t['target']}: {_fmt_target(t)} ({t['detail']})", highlight=False)
    for row in report["rows"]:
        tol = _TOLERANCE.get(row["dtype"], 2e-2)
        if row["max_rel_diff_vs_eager"] > tol:
            console.print(
                f"[yellow]warning:[/] {row['case']} {MODE_LABELS[row['mode']]}: ours differs from torch "
                f"eager by {row['max_rel_diff_vs_eager']:.2g} (relative to max |torch|), above {tol:g}",
                highlight=False,
            )
    errors = {row["compile_error"] for row in report["rows"] if row["compile_error"]}
    for error in sorted(errors):
        console.print(f"torch.compile: {error}", highlight=False, style="dim")
    console.print(f"took {report['elapsed_s']:.0f} s", highlight=False, style="dim")


def markdown(report: dict[str, Any]) -> str:
    """The table as GitHub markdown (for benchmarks/README.md), geometric means below it."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * (len(_COLUMNS) - 2)]
    for row in report["rows"]:
        t = row["times_ms"]
        cells = [
            row["case"],
            MODE_LABELS[row["mode"]] + ("*" if row["fits_in_cache"] else ""),
            _fmt_ms(t["ours"]),
            _fmt_ms(t["eager"]),
            _fmt_ms(t["compile"]),
            _plain_x(row["speedup_vs_eager"]),
            _plain_x(row["speedup_vs_compile"]),
            f"{row['ours_gbps']:.1f}",
            f"{row['roofline_pct']:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for mode, g in report["geomean_speedup"].items():
        lines.append(
            f"- geometric-mean speedup, {MODE_LABELS[mode]}: {_plain_x(g['vs_eager'])} vs eager, "
            f"{_plain_x(g['vs_compile'])} vs torch.compile"
        )
    found = _targets_of(report)
    if found:
        heading = _targets_heading(report)
        lines += ["", heading[0].upper() + heading[1:], ""]
        for t in found:
            verdict = "met" if t["met"] else "**not met**"
            lines.append(f"- {verdict}: {t['target']}: {_fmt_target(t)} ({t['detail']})")
    return "\n".join(lines) + "\n"


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _targets_heading(report: dict[str, Any]) -> str:
    ran = {r["case"] for r in report["rows"]}
    full = {c.name for c in suite()}
    part = "" if ran == full else f" (they are set for the full suite of {len(full)})"
    return f"targets of issue 3 ({report['settings']['device']}), on this run's {_cases(len(ran))}{part}:"


def _targets_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's targets; computed for reports written before they were recorded."""
    return report["targets"] if "targets" in report else targets(report)


def _fmt_target(t: dict[str, Any]) -> str:
    if t["unit"] == "%":
        return f"{t['value']:.0f}% (needs {t['threshold']:.0f}%)"
    return f"{t['value']:.2f}x (needs {t['threshold']:.2f}x)"


def _plain_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


# --------------------------------------------------------------------------- command


def bench(
    quick: bool = typer.Option(False, "--quick", help="A representative subset (about a minute on 2 cores)."),
    small: bool = typer.Option(
        False, "--small", help="Small tensors instead (MLP and small-CNN layers): per-call overhead."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    repeats: int = typer.Option(20, "--repeats", help="Timed runs per implementation and mode (at least)."),
    min_time: float = typer.Option(
        0.25, "--min-time", help="Seconds of timed calls per implementation and mode, at least (more runs)."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the full results as JSON to this path."
    ),
    compile: bool = typer.Option(
        True, "--compile/--no-compile", help="Also time torch.compile(F.batch_norm)."
    ),
    only: str | None = typer.Option(
        None, "--only", help="Run only cases whose name contains this, e.g. nhwc, bf16."
    ),
) -> None:
    """Time our batch_norm against torch eager, torch.compile and the memory roofline.

    Training forward, training forward+backward and eval forward over a suite of
    ResNet-50, image, 2-D and 3-D shapes; NCHW and channels_last; float32 and bfloat16.
    """
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        _fail(str(exc))
    if repeats < 1:
        _fail(f"--repeats must be at least 1, got {repeats}")
    if not min_time >= 0:
        _fail(f"--min-time must be at least 0 seconds, got {min_time}")
    if quick and small:
        _fail("--quick and --small choose different suites; give one of them")
    cases = suite(quick, small)
    if only is not None:
        cases = [c for c in cases if only.lower() in c.name.lower()]
        if not cases:
            names = ", ".join(c.name for c in suite(quick, small))
            _fail(f"--only '{only}' matches no case; the cases are: {names}")
    # Piped or captured output gets rich's 80 columns unless COLUMNS says otherwise: too narrow.
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=140)
    report = run_suite(
        cases, device=dev, repeats=repeats, compile=compile, min_time=min_time, console=Console(stderr=True)
    )
    report["settings"].update(quick=quick, small=small, only=only)
    render(report, console)
    if json_path is not None:
        write_json(report, json_path)
        console.print(f"wrote {json_path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `bench` command to a typer app (the `batchnorm` command calls this)."""
    app.command("bench")(bench)


def main() -> None:
    """`python -m batchnorm.bench [OPTIONS]`: the same command without the `batchnorm` entry point."""
    app = typer.Typer(add_completion=False)
    app.command()(bench)
    app()


if __name__ == "__main__":
    main()
