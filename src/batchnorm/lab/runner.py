"""`batchnorm lab`: run the experiments, show progress, write the report; lose nothing.

Layout of the output directory (default lab-report/):

    index.html           the report, one self-contained page
    results.json         every number, the verdicts and the settings (schema in report.py)
    experiments/NAME.json  each finished experiment, written as soon as it finishes

Every file is written atomically (a temporary file renamed into place), so an
interrupted run leaves whole files only. `--resume` reuses the finished
experiments of an earlier run with the same settings; an existing report is
not overwritten without `--force`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import report
from .data import load
from .experiments import SCALES, run_key, train
from .registry import EXPERIMENTS

# The settings that must match for --resume to reuse an earlier experiment.
_RESUME_KEYS = ("scale", "seed", "data_spec", "device")


class LabError(Exception):
    """A problem the user can fix; the message says how."""


def _versions() -> dict:
    import batchnorm

    return {
        "batchnorm": batchnorm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def run_lab(
    out: Path,
    only: list[str] | None = None,
    scale: str = "default",
    seed: int = 0,
    device: str = "cpu",
    data_spec: str = "digits",
    resume: bool = False,
    force: bool = False,
    progress_factory: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the lab and write the report; return the results dict (results.json's content).

    progress_factory(total_steps) returns an object with `advance(n, description)`
    and is used as a context manager; None runs silently.
    """
    names = _select(only)
    if scale not in SCALES:
        raise LabError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LabError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as exc:
        raise LabError(f"--device {device!r} is not a device torch can use: {exc}") from None

    out = Path(out)
    state_dir = out / "experiments"
    existing = [p for p in (out / "index.html", out / "results.json") if p.exists()]
    if existing and not (force or resume):
        raise LabError(
            f"{existing[0]} already exists; pass --force to overwrite the report, --resume to "
            "continue an interrupted run, or --out DIR to write elsewhere"
        )
    if force and not resume and state_dir.exists():
        shutil.rmtree(state_dir)

    dataset = load(data_spec)
    sc = SCALES[scale]
    settings = {
        "scale": scale,
        "seed": seed,
        "device": device,
        "data_spec": data_spec,
        "data": dataset.summary(),
        "only": names,
        **{k: v for k, v in asdict(sc).items() if k != "name"},
        "versions": _versions(),
        "machine": _machine(),
    }

    finished = _load_finished(state_dir, settings) if resume else {}
    todo = [n for n in names if n not in finished]
    if resume and finished:
        log(f"resuming: {', '.join(n for n in names if n in finished)} already done")

    plans = {n: EXPERIMENTS[n].runs(sc, seed) for n in todo}
    unique = {run_key(r): r for runs in plans.values() for r in runs}
    total = sum(r.steps for r in unique.values())
    cache: dict[str, dict] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)

    with progress_factory(total) if progress_factory else _Silent() as bar:
        for name in todo:
            exp = EXPERIMENTS[name]
            t0 = time.perf_counter()
            results = []
            for i, r in enumerate(plans[name]):
                key = run_key(r)
                if key not in cache:
                    desc = f"{exp.title}: run {i + 1}/{len(plans[name])} ({r.label})"
                    bar.advance(0, desc)
                    trainer = exp.trainer or train
                    cache[key] = trainer(dataset, r, device, on_steps=lambda n, d=desc: bar.advance(n, d))
                results.append(cache[key])
            analysis = exp.analyze(sc, seed, plans[name], results)
            record = {
                "name": name,
                "title": exp.title,
                "claim": exp.claim,
                "source": exp.source,
                "method": exp.method,
                **analysis,
                "duration_s": time.perf_counter() - t0,
                "settings": {k: settings[k] for k in _RESUME_KEYS},
            }
            report.write_json(state_dir / f"{name}.json", record)
            finished[name] = record

    experiments = {n: finished[n] for n in names}
    results = {
        "schema": report.SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - start + sum(finished[n]["duration_s"] for n in names if n not in todo),
        "settings": settings,
        "summary": [{k: e[k] for k in ("name", "title", "claim", "headline", "verdict")} for e in experiments.values()],
        "experiments": experiments,
    }
    page = report.render_html(results)  # render before writing anything: a failure keeps the old report
    report.write_json(out / "results.json", results)
    report.write_atomic(out / "index.html", page)
    return results


def _select(only: list[str] | None) -> list[str]:
    if not only:
        return list(EXPERIMENTS)
    unknown = [n for n in only if n not in EXPERIMENTS]
    if unknown:
        raise LabError(f"unknown experiment {unknown[0]!r}; expected one of: {', '.join(EXPERIMENTS)}")
    return [n for n in EXPERIMENTS if n in only]  # the report's order, each once


def _load_finished(state_dir: Path, settings: dict) -> dict[str, dict]:
    finished = {}
    if not state_dir.is_dir():
        return finished
    for path in sorted(state_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a damaged file is redone, not trusted
        same = record.get("settings") == {k: settings[k] for k in _RESUME_KEYS}
        if same and record.get("name") in EXPERIMENTS:
            finished[record["name"]] = record
    return finished


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int, description: str) -> None:
        pass
