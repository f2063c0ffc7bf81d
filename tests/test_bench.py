"""`batchnorm bench` on tiny shapes: the report's structure and arithmetic, the command's errors.

No timing is asserted: only that times are positive and the derived numbers
(speedups, GB/s, % of roofline, geometric means) follow from them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

typer = pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from batchnorm import bench  # noqa: E402
from batchnorm.bench import Case  # noqa: E402

TINY = [
    Case((4, 3, 8, 8)),  # NCHW
    Case((4, 3, 8, 8), torch.bfloat16, channels_last=True),
    Case((16, 5)),  # 2-D (N, C)
    Case((4, 6, 7)),  # 3-D (N, C, L)
]


@pytest.fixture(autouse=True)
def small_copy(monkeypatch):
    """A 4 MiB copy for the bandwidth measurement instead of 256 MiB: keeps the tests fast."""
    monkeypatch.setitem(bench.COPY_BYTES, "cpu", 4 << 20)


@pytest.fixture(scope="module")
def report():
    return bench.run_suite(TINY, repeats=2, compile=False, copy_bytes=4 << 20)


def test_report_has_one_row_per_case_and_mode(report):
    assert [(r["case"], r["mode"]) for r in report["rows"]] == [
        (c.name, m) for c in TINY for m in bench.MODES
    ]
    assert report["settings"] == {"device": "cpu", "repeats": 2, "min_time_s": 0.0, "warmup": 2, "compile": False}
    assert report["traffic_model_passes"] == {"train_fwd": 3, "train_fwd_bwd": 8, "eval_fwd": 2}
    machine = report["machine"]
    for key in ("platform", "cpu_count", "torch", "device_name", "torch_threads"):
        assert machine[key], key
    assert machine["torch"] == torch.__version__
    assert machine["cpu_kernel"].startswith(("C++ entry points", "ctypes (", "unavailable: "))
    runs = report["copy_bandwidth_runs_gbps"]
    assert report["copy_bandwidth_gbps"] == max(runs["start"], runs["end"]) > 0
    json.loads(json.dumps(report))  # plain JSON all the way down


def test_numbers_are_positive_and_consistent(report):
    bw = report["copy_bandwidth_gbps"] * 1e9
    for row in report["rows"]:
        t = row["times_ms"]
        assert t["ours"] > 0 and t["eager"] > 0
        assert t["compile"] is None and row["speedup_vs_compile"] is None  # compile=False
        assert row["speedup_vs_eager"] == pytest.approx(t["eager"] / t["ours"])
        assert row["model_bytes"] == bench.PASSES[row["mode"]] * row["elements"] * row["element_size"]
        assert row["floor_ms"] == pytest.approx(row["copy_ms"] * bench.PASSES[row["mode"]] / 2)
        assert row["floor_ms_run_copy"] == pytest.approx(row["model_bytes"] / bw * 1e3)
        assert row["roofline_pct_run_copy"] == pytest.approx(100 * row["floor_ms_run_copy"] / t["ours"])
        assert row["copy_ms"] > 0 and len(row["samples_ms"]["copy"]) == 2  # timed in the same rounds
        assert row["ours_gbps"] == pytest.approx(row["model_bytes"] / (t["ours"] * 1e-3) / 1e9)
        assert row["roofline_pct"] == pytest.approx(100 * row["floor_ms"] / t["ours"])
        assert len(row["samples_ms"]["ours"]) == len(row["samples_ms"]["eager"]) == 2
        assert t["ours"] == pytest.approx(statistics.median(row["samples_ms"]["ours"]))
        assert row["min_ms"]["eager"] == pytest.approx(min(row["samples_ms"]["eager"]))
        assert row["max_rel_diff_vs_eager"] < (2e-2 if row["dtype"] == "bfloat16" else 1e-4)


def test_min_time_adds_runs_up_to_the_cap(monkeypatch):
    """Short calls are repeated until each implementation has min_time seconds, at most MAX_ROUNDS runs."""
    monkeypatch.setattr(bench, "MAX_ROUNDS", 150)
    case = bench.Case((4, 3, 5, 5), torch.float32)
    rep = bench.run_suite([case], repeats=2, compile=False, copy_bytes=4 << 20, modes=["eval_fwd"], min_time=0.002)
    (row,) = rep["rows"]
    assert 2 < row["runs"] <= 150
    # every implementation got its 2 ms of timed calls, or the cap stopped the run
    assert row["runs"] == 150 or min(row["timed_s"].values()) >= 0.002
    q = row["quartiles_ms"]["ours"]
    assert q[0] <= row["times_ms"]["ours"] <= q[2]
    huge = bench.run_suite([case], repeats=2, compile=False, copy_bytes=4 << 20, modes=["eval_fwd"], min_time=60)
    assert huge["rows"][0]["runs"] == 150  # the cap, not a minute
    assert len(huge["rows"][0]["samples_ms"]["ours"]) <= 150
    with pytest.raises(ValueError, match="min_time"):
        bench.run_suite([case], min_time=-1, compile=False)


def test_geometric_means_follow_from_rows(report):
    for mode, g in report["geomean_speedup"].items():
        speedups = [r["speedup_vs_eager"] for r in report["rows"] if r["mode"] == mode]
        assert g["vs_eager"] == pytest.approx(math.prod(speedups) ** (1 / len(speedups)))
        assert g["n_eager"] == len(TINY)
        assert g["vs_compile"] is None and g["n_compile"] == 0


def test_row_fields_name_the_case(report):
    row = next(r for r in report["rows"] if r["case"] == TINY[1].name)
    assert row["shape"] == [4, 3, 8, 8]
    assert row["layout"] == "channels_last"
    assert row["dtype"] == "bfloat16" and row["element_size"] == 2
    assert TINY[1].name == "4x3x8x8 nhwc bf16"
    assert TINY[2].name == "16x5 f32" and TINY[2].layout == "contiguous"


def test_a_failing_compile_is_recorded_as_none(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    report = bench.run_suite(TINY[:1], repeats=1, warmup=1, compile=True)
    for row in report["rows"]:
        assert row["times_ms"]["compile"] is None
        assert row["speedup_vs_compile"] is None
        assert "no compiler here" in row["compile_error"]
        assert row["times_ms"]["ours"] > 0


def test_render_prints_every_case_and_the_geometric_means(report):
    from rich.console import Console

    console = Console(width=160, record=True)
    bench.render(report, console)
    text = console.export_text()
    for case in TINY:
        assert case.name in text
    assert text.count("geometric-mean speedup") == len(bench.MODES)
    md = bench.markdown(report)
    assert md.startswith("| case | mode |") and md.count("\n| ") == len(report["rows"])


def _row(case, mode, ours, eager, *, layout="nchw", dtype="float32", cached=True, roofline=100.0, mb=10.0):
    """A result row with only the fields the targets read: times in ms, x of `mb` MB."""
    shape = [int(d) for d in case.split()[0].split("x")]
    size = 2 if dtype == "bfloat16" else 4
    return {
        "case": case,
        "mode": mode,
        "shape": shape,
        "layout": layout,
        "dtype": dtype,
        "elements": int(mb * 1e6) // size,
        "element_size": size,
        "fits_in_cache": cached,
        "times_ms": {"ours": ours, "eager": eager, "compile": None},
        "speedup_vs_eager": eager / ours,
        "copy_ms": 1.0,
        "roofline_pct": roofline,
    }


def _cpu_report(eval_eager=2.0, bf16_eager=6.0, roofline=70.0):
    """Two shapes in float32 and bfloat16 (fwd+bwd) and one eval row; ours always 1 ms (f32) / 0.5 ms (bf16)."""
    rows = [
        _row("8x4x5x5 nchw f32", "train_fwd_bwd", 1.0, 4.0, cached=False, roofline=roofline),
        _row("8x4x5x5 nchw bf16", "train_fwd_bwd", 0.5, bf16_eager / 2, dtype="bfloat16"),
        _row("16x5 f32", "train_fwd_bwd", 1.0, 2.25, layout="contiguous"),
        _row("8x4x3x3 nchw f32", "train_fwd_bwd", 1.0, 3.0, roofline=30.0),  # in cache: not a "large" one
        _row("8x4x5x5 nhwc f32", "train_fwd_bwd", 1.0, 3.0, layout="channels_last"),  # no bfloat16 pair
        _row("16x5 bf16", "train_fwd_bwd", 0.5, bf16_eager / 4, layout="contiguous", dtype="bfloat16"),
        _row("8x4x5x5 nchw f32", "eval_fwd", 1.0, eval_eager),
    ]
    return {"settings": {"device": "cpu"}, "rows": rows}


def _verdicts(report):
    return {t["target"]: (round(t["value"], 6), round(t["threshold"], 6), t["met"]) for t in bench.targets(report)}


def test_cpu_targets_are_computed_from_the_rows():
    got = _verdicts(_cpu_report())
    assert got == {
        "float32 train fwd+bwd, geometric mean vs eager": (3.0, 2.0, True),  # (4 * 2.25 * 3 * 3) ** (1 / 4)
        "float32 train fwd+bwd, slowest case vs eager": (2.25, 0.9, True),
        "bfloat16 train fwd+bwd, geometric mean vs eager": (round(math.sqrt(6 * 3), 6), 2.0, True),
        "bfloat16 train fwd+bwd, slowest case vs eager": (3.0, 0.9, True),
        "float32 NCHW train fwd+bwd larger than the cache, lowest % of the roofline": (70.0, 60.0, True),
        "bfloat16 train fwd+bwd, geometric mean vs eager, against float32's": (round(math.sqrt(18), 6), 3.0, True),
        "eval fwd, slowest case vs eager": (2.0, 1.0, True),
    }


@pytest.mark.parametrize(
    "change, target",
    [
        ({"eval_eager": 0.95}, "eval fwd, slowest case vs eager"),
        ({"roofline": 59.0}, "float32 NCHW train fwd+bwd larger than the cache, lowest % of the roofline"),
        ({"bf16_eager": 4.0}, "bfloat16 train fwd+bwd, geometric mean vs eager, against float32's"),
    ],
)
def test_a_cpu_target_missed_by_a_little_is_not_met(change, target):
    got = _verdicts(_cpu_report(**change))
    assert [name for name, (_, _, met) in got.items() if not met] == [target]


def test_the_slowest_case_and_the_bfloat16_reason_are_named():
    found = {t["target"]: t for t in bench.targets(_cpu_report(eval_eager=0.8))}
    assert found["eval fwd, slowest case vs eager"]["detail"].startswith("8x4x5x5 nchw f32, of 1 case; there ours")
    assert "ours took 1.00x and eager 0.80x the time of a copy" in found["eval fwd, slowest case vs eager"]["detail"]
    # bfloat16 takes half of float32's time in ours, (3 / 4 * 1.5 / 2.25) ** 0.5 in eager
    detail = found["bfloat16 train fwd+bwd, geometric mean vs eager, against float32's"]["detail"]
    assert detail == "2 cases; bfloat16 takes 0.50x float32's time in ours, 0.71x in eager"


def test_cuda_targets_split_rows_at_100_mb():
    rows = [
        _row("64x64x112x112 nchw f32", "train_fwd", 1.0, 1.5, roofline=85.0, mb=205.0),
        _row("64x64x112x112 nchw f32", "train_fwd_bwd", 1.0, 0.9, roofline=84.0, mb=205.0),
        _row("8x4x5x5 nchw f32", "train_fwd", 1.0, 0.95, roofline=10.0),
        _row("8x4x5x5 nchw f32", "eval_fwd", 1.0, 1.2, roofline=10.0),
    ]
    got = _verdicts({"settings": {"device": "cuda:0"}, "rows": rows})
    assert got == {
        "train fwd of tensors >= 100 MB, lowest % of the roofline": (85.0, 85.0, True),  # "at least"
        "train fwd+bwd of tensors >= 100 MB, lowest % of the roofline": (84.0, 85.0, False),
        "all modes, geometric mean vs eager": (round((1.5 * 0.9 * 0.95 * 1.2) ** 0.25, 6), 1.2, False),
        "tensors under 100 MB, slowest case vs eager": (0.95, 0.9, True),
    }


def test_targets_are_printed_and_recorded(report):
    from rich.console import Console

    assert report["targets"] == bench.targets(report)
    assert {t["target"] for t in report["targets"]} >= {"eval fwd, slowest case vs eager"}
    console = Console(width=200, record=True)
    bench.render(report, console)
    text = console.export_text()
    part = f"on this run's {len(TINY)} cases (they are set for the full suite of {len(bench.suite())}):"
    assert f"targets of issue 3 (cpu), {part}" in text
    whole = {"settings": {"device": "cpu"}, "rows": [{"case": c.name} for c in bench.suite()]}
    assert bench._targets_heading(whole) == "targets of issue 3 (cpu), on this run's 28 cases:"
    for t in report["targets"]:
        assert t["target"] in text
    md = bench.markdown({k: v for k, v in report.items() if k != "targets"})  # an older report: computed
    assert md.count("\n- met: ") + md.count("\n- **not met**: ") == len(report["targets"])


def test_suites():
    full, quick = bench.suite(), bench.suite(quick=True)
    assert len(full) == 28 and len({c.name for c in full}) == 28
    assert {c.dtype for c in full} == {torch.float32, torch.bfloat16}
    assert sum(c.channels_last for c in full) == 12
    assert 0 < len(quick) < 10 and {c.dtype for c in quick} == {torch.float32, torch.bfloat16}
    small = bench.suite(small=True)
    assert small and all(c.elements <= 1 << 17 for c in small) and len({c.name for c in small}) == len(small)
    with pytest.raises(ValueError, match="one of quick and small"):
        bench.suite(quick=True, small=True)
    with pytest.raises(ValueError, match="4-D"):
        Case((4, 3, 8), channels_last=True)


# --------------------------------------------------------------------------- the command


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr(bench, "suite", lambda quick=False, small=False: TINY[:2])
    app = typer.Typer()
    bench.register(app)

    @app.callback()
    def _root() -> None:
        """A stand-in for the `batchnorm` command."""

    return app


def test_command_writes_json(app, tmp_path):
    out = tmp_path / "res" / "bench.json"
    result = CliRunner().invoke(
        app, ["bench", "--quick", "--repeats", "1", "--no-compile", "--only", "NHWC", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {r["case"] for r in report["rows"]} == {TINY[1].name}
    assert report["settings"]["quick"] is True and report["settings"]["only"] == "NHWC"
    assert "geometric-mean speedup" in result.output


def test_the_kernels_extra_build_flags_are_recorded():
    """A kernel built with $BATCHNORM_KERNEL_CFLAGS (an A/B of a macro) says so in the report."""
    from batchnorm.kernels import cpu

    if not cpu.available():
        pytest.skip(f"no CPU kernel: {cpu.why_unavailable()}")
    code = "from batchnorm import bench; print(bench._cpu_kernel_state())"
    env = {**os.environ, "BATCHNORM_KERNEL_CFLAGS": "-DSTORE_PF=0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(", the kernel built with $BATCHNORM_KERNEL_CFLAGS '-DSTORE_PF=0'")
    assert "BATCHNORM_KERNEL_CFLAGS" not in bench._cpu_kernel_state()  # this process: no extra flags


def test_the_cuda_path_is_recorded(monkeypatch):
    """A CUDA run says which of our paths "auto" takes, by size (and why not Triton's, where not)."""
    from batchnorm.kernels import triton_bn

    monkeypatch.setattr(triton_bn, "available", lambda: True)
    assert bench._cuda_path_state() == (
        "at most 65536 elements: torch's kernel with our running-statistics rule; above: the Triton kernels"
    )
    monkeypatch.setattr(triton_bn, "available", lambda: False)
    monkeypatch.setattr(triton_bn, "why_unavailable", lambda: "no triton")
    assert bench._cuda_path_state().endswith("above: torch ops (the Triton kernels are unavailable: no triton)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--only", "no-such-case"], "matches no case"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--quick", "--small"], "give one of them"),
    ],
)
def test_command_rejects_bad_input(app, args, message):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(app):
    result = CliRunner().invoke(app, ["bench", "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDA is not available" in result.output
