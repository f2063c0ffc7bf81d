"""The lab end to end at the 'tiny' scale: schema, computed verdicts, report, resume, data."""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab import data as labdata
from batchnorm.lab import experiments as E
from batchnorm.lab.registry import EXPERIMENTS
from batchnorm.lab.report import SCHEMA
from batchnorm.lab.runner import LabError, run_lab

VERDICTS = {"supported", "not supported", "mixed"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lab") / "report"
    results = run_lab(out, scale="tiny", seed=0)
    return out, results


def _by_rule(flags: list[bool]) -> str:
    return "supported" if all(flags) else "not supported" if not any(flags) else "mixed"


def test_results_json_schema(tiny_report):
    out, results = tiny_report
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["schema"] == SCHEMA
    assert set(on_disk["experiments"]) == set(EXPERIMENTS)
    assert [s["name"] for s in on_disk["summary"]] == list(EXPERIMENTS)
    st = on_disk["settings"]
    assert st["scale"] == "tiny" and st["seed"] == 0 and st["data"]["name"] == "digits"
    assert st["data"]["train_size"] + st["data"]["test_size"] == 1797
    assert {"torch", "numpy", "python", "batchnorm"} <= set(st["versions"])
    for exp in on_disk["experiments"].values():
        for key in ("claim", "source", "method", "rule", "headline", "figures"):
            assert exp[key], key
        assert exp["verdict"] in VERDICTS
        assert exp["duration_s"] > 0


def test_verdicts_follow_from_numbers(tiny_report):
    _, results = tiny_report
    ex = results["experiments"]

    speed = ex["faster_training"]
    for p in speed["per_seed"]:  # the ratio is recomputed from the curves
        curve = {(s["seed"], s["bn"]): s for s in speed["series"]}
        base, bn = curve[(p["seed"], False)], curve[(p["seed"], True)]
        assert p["target_acc"] == max(base["test_acc"])
        assert p["steps_with_bn"] == E.steps_to_reach(bn["steps"], bn["test_acc"], p["target_acc"])
        expect = p["steps_without_bn"] / p["steps_with_bn"] if p["steps_with_bn"] else 0.0
        assert p["speedup"] == pytest.approx(expect)
    assert speed["verdict"] == _by_rule([p["speedup"] > 1 for p in speed["per_seed"]])

    inputs = ex["stable_inputs"]
    assert inputs["verdict"] == _by_rule([p["drift_with_bn"] < p["drift_without_bn"] for p in inputs["per_seed"]])

    lr = ex["learning_rates"]
    top = max(r["value"] for r in lr["table"])

    def tolerates(bn):
        mine = [r for r in lr["table"] if r["bn"] == bn]
        best = max(r["final_acc_mean"] for r in mine)
        at_top = next(r for r in mine if r["value"] == top)["final_acc_mean"]
        return all(r["diverged"] == 0 for r in mine) and at_top >= best - E.TOLERANCE

    assert lr["figures"]["bn_tolerates"] == tolerates(True)
    assert lr["figures"]["baseline_tolerates"] == tolerates(False)
    expect = (
        "supported"
        if tolerates(True) and not tolerates(False)
        else ("not supported" if not tolerates(True) else "mixed")
    )
    assert lr["verdict"] == expect

    init = ex["initialization"]

    def sensitivity(bn):
        accs = [r["final_acc_mean"] for r in init["table"] if r["bn"] == bn]
        return max(accs) - min(accs)

    assert init["figures"]["sensitivity_with_bn"] == pytest.approx(sensitivity(True))
    holds = max(max(r["max_abs_output_diff"], r["grad_rel_diff"]) for r in init["invariance"]) < E.INVARIANCE_TOL
    assert init["figures"]["invariance_holds"] == holds
    assert init["verdict"] == _by_rule([sensitivity(True) < sensitivity(False), holds])


def test_part2_verdicts_follow_from_numbers(tiny_report):
    _, results = tiny_report
    ex = results["experiments"]

    infer = ex["train_vs_inference"]
    rows = infer["table"]
    better = all(r["population"] >= r["batch_stats"] for r in rows)
    grows = rows[0]["population"] - rows[0]["batch_stats"] > rows[-1]["population"] - rows[-1]["batch_stats"]
    assert [r["batch"] for r in rows] == [2, 4, 8, 32]
    assert infer["verdict"] == _by_rule([better, grows])
    assert infer["diagnosis"] and all("train_eval_gap" in d for d in infer["diagnosis"])

    small = ex["small_batches"]
    err = {(r["arch"], r["method"], r["batch"]): r["error"] for r in small["table"]}
    assert {m for a, m, _ in err if a == "cnn"} == {"bn", "gn", "ln", "in", "renorm", "ghost"}
    assert {m for a, m, _ in err if a == "mlp"} == {"bn", "gn", "ln", "renorm", "ghost"}
    n = small["figures"]["n_test"]
    assert n == len(labdata.load().y_test)

    def clearly_below(a, b):  # beyond two standard errors of the difference of two error rates
        return b - a > 2 * ((a * (1 - a) + b * (1 - b)) / n) ** 0.5

    flags = []
    for arch in ("cnn", "mlp"):
        bn_rise = err[(arch, "bn", 2)] - err[(arch, "bn", 32)]
        gn_rise = err[(arch, "gn", 2)] - err[(arch, "gn", 32)]
        flags.append(clearly_below(err[(arch, "bn", 32)], err[(arch, "bn", 2)]) and bn_rise > gn_rise)
    sync = small["sync"]
    if "error" not in sync:  # the SyncBN run over 2 gloo processes took place
        assert small["figures"]["syncbn_2x2_error"] == pytest.approx(1 - sync["final_acc"])
        # against the same 2 x 2 training without synchronization: ghost BN at batch 4, virtual batches of 2
        assert small["figures"]["local_2x2_error"] == err[("mlp", "ghost", 4)]
        flags.append(clearly_below(1 - sync["final_acc"], err[("mlp", "ghost", 4)]))
    assert small["verdict"] == _by_rule(flags)

    reg = ex["regularization"]
    assert reg["verdict"] == _by_rule([p["gap_with_bn"] < p["gap_without_bn"] for p in reg["per_seed"]])
    for r in reg["table"]:
        assert r["gap"] == pytest.approx(r["train_acc"] - r["test_acc"])

    shift = ex["covariate_shift"]
    f = shift["figures"]
    tol = 0.03
    a = f["acc"]["bn_noisy"] >= f["acc"]["bn"] - tol and f["drift"]["bn_noisy"] > f["drift"]["bn"]
    b = f["acc"]["none_noisy"] < f["acc"]["bn_noisy"] - tol
    land = f["landscape_median"]
    c = (
        land["bn"]["loss_range"] < land["none"]["loss_range"]
        and land["bn"]["grad_change"] < land["none"]["grad_change"]
    )
    assert shift["verdict"] == _by_rule([a, b, c])


def test_sync_run_is_compared_at_its_global_batch():
    """SyncBN 2 x 2 trains like one process at batch 4 (steps, learning rate), and its unsynchronized
    counterpart in the grid is ghost BN at batch 4 with virtual batches of 2."""
    from batchnorm.lab.experiments import SCALES
    from batchnorm.lab.experiments2 import SyncRun, _small_runs
    from batchnorm.lab.models import ghost_size

    runs = _small_runs(SCALES["default"], 0)
    (sync,) = [r for r in runs if isinstance(r, SyncRun)]
    bn4 = next(r for r in runs if not isinstance(r, SyncRun) and r.arch == "mlp" and r.norm == "bn" and r.batch == 4)
    assert sync.setup.arch == "mlp"
    assert sync.world * sync.setup.batch == 4 and sync.setup.batch == 2
    assert (sync.setup.steps, sync.setup.lr) == (bn4.steps, bn4.lr)
    assert ghost_size(4) == 2


def test_sync_run_matches_its_single_process_twin():
    """SyncBN over 2 processes at batch 2 follows BN at batch 4 on the same global batches."""
    from batchnorm.lab.models import Setup, train_setup
    from batchnorm.lab.sync import train_sync

    data = labdata.load()
    setup = Setup("cnn", "bn", 2, steps=20, lr=0.05, momentum=0.9, seed=0, eval_every=10)
    synced = train_sync(data, setup, world=2)
    single = train_setup(data, Setup("cnn", "bn", 4, steps=20, lr=0.05, momentum=0.9, seed=0, eval_every=10))
    assert synced["steps"] == single["steps"] == [10, 20]
    assert synced["test_acc"] == pytest.approx(single["test_acc"], abs=0.02)


def test_scale_invariance_is_measured_not_assumed():
    inv = E.scale_invariance()
    assert inv["holds"]
    assert all(r["max_abs_output_diff"] < 1e-4 for r in inv["rows"])
    assert inv["worst"] > 0  # eps breaks exact invariance: a real measurement, not a constant


def test_html_has_every_section_and_valid_images(tiny_report):
    out, results = tiny_report
    page = (out / "index.html").read_text()
    for name, exp in results["experiments"].items():
        assert f"id='{name}'" in page
        assert exp["verdict"] in page
    assert "http://" not in page and "https://" not in page  # self-contained
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= len(results["experiments"])
    for img in images:
        raw = base64.b64decode(img)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 2000


def test_existing_report_needs_force(tiny_report, tmp_path):
    out, _ = tiny_report
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "index.html").read_bytes()
    with pytest.raises(LabError, match="--force"):
        run_lab(copy, only=["initialization"], scale="tiny")
    assert (copy / "index.html").read_bytes() == before


class _Counter:
    """A progress object that counts steps and can interrupt the run."""

    def __init__(self, total, stop_after=None):
        self.total, self.done, self.stop_after = total, 0, stop_after

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n, description):
        self.done += n
        if self.stop_after is not None and self.done >= self.stop_after:
            raise KeyboardInterrupt


def test_interrupt_then_resume_redoes_nothing_finished(tmp_path):
    out = tmp_path / "r"
    made = []

    def interrupting(total):
        made.append(_Counter(total, stop_after=10**9))
        return made[-1]

    # First run: only 'initialization', completes.
    run_lab(out, only=["initialization"], scale="tiny", progress_factory=interrupting)
    first = json.loads((out / "experiments" / "initialization.json").read_text())

    # Second run: all experiments, interrupted during the first new one.
    def stop_early(total):
        made.append(_Counter(total, stop_after=5))
        return made[-1]

    with pytest.raises(KeyboardInterrupt):
        run_lab(out, scale="tiny", resume=True, progress_factory=stop_early)
    assert json.loads((out / "experiments" / "initialization.json").read_text()) == first
    assert json.loads((out / "results.json").read_text())["settings"]["only"] == ["initialization"]

    # Resume: the finished experiment is not trained again.
    run_lab(out, scale="tiny", resume=True, progress_factory=interrupting)
    tiny = E.SCALES["tiny"]
    others = {E.run_key(r): r for n in EXPERIMENTS if n != "initialization" for r in EXPERIMENTS[n].runs(tiny, 0)}
    assert made[-1].total == sum(r.steps for r in others.values())
    results = json.loads((out / "results.json").read_text())
    assert results["experiments"]["initialization"] == first
    assert set(results["experiments"]) == set(EXPERIMENTS)


def test_resume_ignores_other_settings(tmp_path):
    out = tmp_path / "r"
    run_lab(out, only=["initialization"], scale="tiny", seed=0)
    counters = []

    def factory(total):
        counters.append(_Counter(total))
        return counters[-1]

    run_lab(out, only=["initialization"], scale="tiny", seed=1, resume=True, progress_factory=factory)
    assert counters[-1].total > 0  # seed 1 is a different experiment: it ran again


def test_deterministic_for_a_seed(tmp_path):
    a = run_lab(tmp_path / "a", only=["learning_rates"], scale="tiny", seed=3)
    b = run_lab(tmp_path / "b", only=["learning_rates"], scale="tiny", seed=3)
    assert a["experiments"]["learning_rates"]["table"] == b["experiments"]["learning_rates"]["table"]
    assert a["experiments"]["learning_rates"]["series"] == b["experiments"]["learning_rates"]["series"]


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(LabError, match="unknown experiment 'nope'; expected one of"):
        run_lab(tmp_path / "x", only=["nope"], scale="tiny")
    with pytest.raises(labdata.DataError, match="unknown data set"):
        run_lab(tmp_path / "x", data_spec="cifar", scale="tiny")
    assert not (tmp_path / "x" / "index.html").exists()


# --------------------------------------------------------------------------- data


def _idx(magic: int, arr: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(d: Path, n_train=30, n_test=10, gz=False, corrupt=None):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": _idx(2051, rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": _idx(2049, rng.integers(0, 10, n_train)),
        "t10k-images-idx3-ubyte": _idx(2051, rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": _idx(2049, rng.integers(0, 10, n_test)),
    }
    if corrupt:
        name, raw = corrupt
        files[name] = raw(files[name])
    d.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (d / name).write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_reader(tmp_path, gz):
    _write_mnist(tmp_path, gz=gz)
    ds = labdata.load(f"mnist:{tmp_path}")
    assert ds.x_train.shape == (30, 784) and ds.x_test.shape == (10, 784)
    assert float(ds.x_train.max()) <= 1.0 and ds.y_train.dtype.is_floating_point is False


def test_mnist_errors_name_the_file(tmp_path):
    _write_mnist(tmp_path / "magic", corrupt=("train-labels-idx1-ubyte", lambda r: (2051).to_bytes(4, "big") + r[4:]))
    with pytest.raises(labdata.DataError, match=r"train-labels-idx1-ubyte: magic number 2051.*expected 2049"):
        labdata.load(f"mnist:{tmp_path / 'magic'}")
    _write_mnist(tmp_path / "short", corrupt=("t10k-images-idx3-ubyte", lambda r: r[:-100]))
    with pytest.raises(labdata.DataError, match=r"t10k-images-idx3-ubyte.*truncated"):
        labdata.load(f"mnist:{tmp_path / 'short'}")
    (tmp_path / "missing").mkdir()
    with pytest.raises(labdata.DataError, match=r"train-images-idx3-ubyte.*not found"):
        labdata.load(f"mnist:{tmp_path / 'missing'}")
    with pytest.raises(labdata.DataError, match="does not exist"):
        labdata.load(f"mnist:{tmp_path / 'nowhere'}")


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(100, 4, 4)), y=rng.integers(0, 3, 100))
    ds = labdata.load(f"npz:{tmp_path / 'd.npz'}")
    assert ds.num_features == 16 and ds.num_classes == 3
    assert len(ds.y_train) + len(ds.y_test) == 100
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(labdata.DataError, match="expected x and y"):
        labdata.load(f"npz:{tmp_path / 'bad.npz'}")


def test_digits_split_is_fixed():
    a, b = labdata.load(), labdata.load()
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert bool((a.x_test == b.x_test).all()) and bool((a.y_train == b.y_train).all())


# --------------------------------------------------------------------------- command line


def test_cli_lab_tiny(tmp_path):
    from typer.testing import CliRunner

    from batchnorm.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["lab", "--scale", "tiny", "--out", str(out), "--only", "initialization"])
    assert res.exit_code == 0, res.output
    assert "The claims, measured" in res.output and "initialization" in res.output.lower()
    assert (out / "index.html").exists()
    again = CliRunner().invoke(app, ["lab", "--scale", "tiny", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output
    both = CliRunner().invoke(app, ["lab", "--quick", "--full"])
    assert both.exit_code == 2


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_browser(tiny_report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium found; scripts/setup.sh --dev installs Debian's chromium where apt-get works")
    out, _ = tiny_report
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1100,3000",
        f"--screenshot={shot}",
        (out / "index.html").as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = shot.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 20_000
