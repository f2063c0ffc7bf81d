"""`batchnorm bench` on tiny shapes: the report's structure and arithmetic, the command's errors.

No timing is asserted: only that times are positive and the derived numbers
(speedups, GB/s, % of roofline, geometric means) follow from them.
"""

from __future__ import annotations

import json
import math
import statistics

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
