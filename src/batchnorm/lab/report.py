"""The lab's outputs: plots (matplotlib), one self-contained HTML page, results.json.

The report is a pure function of results.json: `render_html(results)` draws
every plot from the numbers stored there and embeds them as PNG data URIs, so
the page needs no network and no other file.

results.json (schema "batchnorm-lab/1"):

    {
      "schema": "batchnorm-lab/1",
      "created": ISO-8601 time, "duration_s": seconds for the whole run,
      "settings": {"scale", "seed", "device", "data": {name, description, train_size,
                   test_size, features, classes}, "only", "versions": {...}, "machine"},
      "summary": [{"name", "title", "claim", "headline", "verdict"}],   # one per experiment
      "experiments": {
        NAME: {"name", "title", "claim", "source", "method",
               "verdict": "supported" | "not supported" | "mixed",
               "rule": the rule the verdict was computed by, in words,
               "headline": the measured figure in one sentence,
               "figures": {metric: number or bool},      # the numbers the verdict uses
               "per_seed" | "table" | "invariance": detail rows,
               "series": curves for the plots,
               "duration_s": seconds}
      }
    }
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

SCHEMA = "batchnorm-lab/1"
COLORS = {False: "#d1495b", True: "#00798c"}  # without BN, with BN
LABELS = {False: "without BN", True: "with BN"}


def write_atomic(path: Path, text: str) -> None:
    """Write text to path so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, allow_nan=False))


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _band(ax, series: list[dict], key: str, bn: bool, label: str) -> None:
    """Mean over seeds as a line, min-max over seeds as a band."""
    runs = [s for s in series if s["bn"] == bn]
    n = min(len(s[key]) for s in runs)
    steps = runs[0]["steps"][:n]
    values = np.array([[np.nan if v is None else v for v in s[key][:n]] for s in runs])
    ax.plot(steps, np.nanmean(values, 0), color=COLORS[bn], label=label, lw=1.6)
    if len(runs) > 1:
        ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=COLORS[bn], alpha=0.2)


def plot_faster_training(exp: dict) -> list[str]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    n_seeds = len({s["seed"] for s in exp["series"]})
    for bn in (False, True):
        seeds = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
        _band(ax, exp["series"], "test_acc", bn, f"{LABELS[bn]} (mean of {seeds})")
    target = float(np.mean([p["target_acc"] for p in exp["per_seed"]]))
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target: best without BN ({target:.1%})")
    for p in exp["per_seed"][:1]:
        for bn, key in ((False, "steps_without_bn"), (True, "steps_with_bn")):
            if p[key]:
                ax.axvline(p[key], color=COLORS[bn], ls=":", lw=1)
    ax.set(
        xlabel="training step (mini-batches of 60)",
        ylabel="test accuracy",
        title="Test accuracy during training (paper Fig. 1a)",
        ylim=(0, 1.0),
    )
    ax.legend(loc="lower right")
    return [_png(fig)]


def plot_stable_inputs(exp: dict) -> list[str]:
    plt = _plt()
    s = exp["series"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    for ax, bn in zip(axes, (False, True)):
        inp = s["with_bn" if bn else "without_bn"]
        ax.fill_between(s["steps"], inp["p15"], inp["p85"], color=COLORS[bn], alpha=0.2, label="15th-85th percentile")
        ax.plot(s["steps"], inp["p50"], color=COLORS[bn], lw=1.6, label="median")
        ax.plot(s["steps"], inp["p15"], color=COLORS[bn], lw=0.8)
        ax.plot(s["steps"], inp["p85"], color=COLORS[bn], lw=0.8)
        ax.set(
            xlabel="training step",
            ylabel="input to the sigmoid",
            title=f"{LABELS[bn]} (drift {inp['drift_unit0']:.2f} spreads)",
        )
        ax.legend(loc="best")
    fig.suptitle(f"Input to one sigmoid of the last hidden layer over training (paper Fig. 1b,c; seed {s['seed']})")
    return [_png(fig)]


def _sweep_bars(exp: dict, xlabel: str, title: str, fmt) -> str:
    plt = _plt()
    rows = exp["table"]
    values = sorted({r["value"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.38
    for j, bn in enumerate((False, True)):
        mine = [next(r for r in rows if r["value"] == v and r["bn"] == bn) for v in values]
        xs = np.arange(len(values)) + (j - 0.5) * width
        means = [r["final_acc_mean"] for r in mine]
        err = [
            [m - r["final_acc_min"] for m, r in zip(means, mine)],
            [r["final_acc_max"] - m for m, r in zip(means, mine)],
        ]
        ax.bar(xs, means, width, yerr=err, color=COLORS[bn], label=LABELS[bn], capsize=3)
        for x, r in zip(xs, mine):
            note = f"{r['final_acc_mean']:.0%}" + (f"\n{r['diverged']}/{r['runs']} diverged" if r["diverged"] else "")
            ax.text(x, r["final_acc_mean"] + 0.02, note, ha="center", va="bottom", fontsize=7.5)
    ax.set_xticks(np.arange(len(values)), [fmt(r) for r in values])
    ax.set(xlabel=xlabel, ylabel="final test accuracy", ylim=(0, 1.18), title=title)
    ax.axhline(0.1, color="grey", lw=0.8, ls=":")
    ax.legend(loc="upper left", ncols=2)
    return _png(fig)


def plot_learning_rates(exp: dict) -> list[str]:
    base = exp["figures"]["base_lr"]
    fmt = lambda v: f"x{v / base:g} (lr {v:g})"  # noqa: E731
    return [_sweep_bars(exp, "learning rate", "Final test accuracy by learning rate (paper BN-x5, BN-x30)", fmt)]


def plot_initialization(exp: dict) -> list[str]:
    fmt = lambda v: f"N(0, {v:g}^2)"  # noqa: E731
    return [_sweep_bars(exp, "initial weights", "Final test accuracy by initial weight scale", fmt)]


def plot_train_vs_inference(exp: dict) -> list[str]:
    plt = _plt()
    rows = exp["table"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = np.arange(len(rows))
    styles = (("batch_stats", "batch statistics", "#d1495b"), ("running", "running averages", "#edae49"),
              ("population", "exact population statistics", "#00798c"))  # fmt: skip
    for j, (key, label, color) in enumerate(styles):
        ax.bar(xs + (j - 1) * 0.27, [r[key] for r in rows], 0.27, color=color, label=label)
    ax.set_xticks(xs, [f"batch {r['batch']}" for r in rows])
    ax.set(xlabel="training batch size", ylabel="test accuracy", ylim=(0, 1.12),
           title="The same trained BN network, normalized three ways at test time")  # fmt: skip
    ax.legend(loc="upper left", ncols=3, fontsize=8)
    return [_png(fig)]


NORM_COLORS = {"bn": "#00798c", "gn": "#d1495b", "ln": "#edae49", "in": "#66a182", "renorm": "#2e4057",
               "ghost": "#8d96a3"}  # fmt: skip


def plot_small_batches(exp: dict) -> list[str]:
    plt = _plt()
    archs = list(dict.fromkeys(r.get("arch", "cnn") for r in exp["table"]))
    fig, axes = plt.subplots(1, len(archs), figsize=(6.2 * len(archs), 4.2), sharey=True, squeeze=False)
    f = exp["figures"]
    for ax, arch in zip(axes[0], archs):
        table = [r for r in exp["table"] if r.get("arch", "cnn") == arch]
        for m in dict.fromkeys(r["method"] for r in table):
            rows = [r for r in table if r["method"] == m]
            ax.plot([r["batch"] for r in rows], [r["error"] for r in rows], "o-", color=NORM_COLORS.get(m),
                    label=rows[0]["label"].removesuffix(", MLP"), lw=2.2 if m in ("bn", "gn") else 1.2)  # fmt: skip
        if arch == "mlp" and f["syncbn_2x2_error"] is not None:
            ax.plot([2], [f["syncbn_2x2_error"]], "*", ms=14, color="black", label="SyncBN, 2 processes x batch 2")
        ax.set_xscale("log", base=2)
        ax.set_xticks([32, 16, 8, 4, 2], ["32", "16", "8", "4", "2"])
        ax.invert_xaxis()
        ax.set(xlabel="per-step (per-process) batch size", title={"cnn": "CNN", "mlp": "MLP"}.get(arch, arch))
        ax.legend(fontsize=8, ncols=2)
    axes[0][0].set_ylabel("final test error")
    fig.suptitle("Test error against batch size (Group Normalization paper, in miniature)")
    return [_png(fig)]


def plot_regularization(exp: dict) -> list[str]:
    plt = _plt()
    rows = exp["table"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{'BN' if r['bn'] else 'no BN'}{', dropout' if r['dropout'] else ''}" for r in rows]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["train_acc"] for r in rows], 0.4, color="#8d96a3", label="training accuracy")
    ax.bar(xs + 0.2, [r["test_acc"] for r in rows], 0.4, color=[COLORS[r["bn"]] for r in rows],
           label="test accuracy (red: no BN, teal: BN)")  # fmt: skip
    for x, r in zip(xs, rows):
        ax.text(x, 1.01, f"gap {r['gap'] * 100:.1f}", ha="center", fontsize=8)
    ax.set_xticks(xs, labels)
    low = min(min(r["train_acc"], r["test_acc"]) for r in rows)
    ax.set(ylabel="accuracy", ylim=(max(0.0, low - 0.05), 1.05), title="Training vs test accuracy at the end")
    ax.legend(loc="lower right", fontsize=8)
    return [_png(fig)]


def plot_covariate_shift(exp: dict) -> list[str]:
    plt = _plt()
    s = exp["series"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = {"none": "no BN", "bn": "BN", "bn_noisy": "BN + noise", "none_noisy": "no BN + noise"}
    colors = {"none": COLORS[False], "bn": COLORS[True], "bn_noisy": "#66a182", "none_noisy": "#edae49"}
    for key, acc in s["curves"].items():
        ax.plot(s["curve_steps"][key], acc, color=colors[key], label=names[key], ls="--" if "noisy" in key else "-")
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1))
    ax.set_title("(a) Noisy BN: training with shifting inputs")
    ax.legend(loc="lower right", fontsize=8)
    out = [_png(fig)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "loss_range", "loss range along the gradient"),
                           (axes[1], "grad_change", "largest gradient change ('predictiveness')")):  # fmt: skip
        for norm, bn in (("none", False), ("bn", True)):
            vals = s["landscape"][norm][key]
            ax.plot(s["steps"][: len(vals)], vals, color=COLORS[bn], label=LABELS[bn])
        ax.set(xlabel="training step", title=title, yscale="log")
        ax.legend(fontsize=8)
    fig.suptitle("(b) The loss landscape along the gradient during training (Santurkar et al. Fig. 4)")
    out.append(_png(fig))
    return out


PLOTS = {
    "faster_training": plot_faster_training,
    "stable_inputs": plot_stable_inputs,
    "learning_rates": plot_learning_rates,
    "initialization": plot_initialization,
    "train_vs_inference": plot_train_vs_inference,
    "small_batches": plot_small_batches,
    "regularization": plot_regularization,
    "covariate_shift": plot_covariate_shift,
}


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em} td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left} th{background:#f4f4f4}
.verdict{display:inline-block;padding:.1em .6em;border-radius:1em;font-weight:600;font-size:.9em}
.supported{background:#d8f3dc;color:#1b4332}.not-supported{background:#ffd6d6;color:#7f1d1d}
.mixed{background:#fff1c2;color:#6b4f00}
.claim{font-size:1.05em;font-style:italic} .rule{color:#555;font-size:.9em}
.meta td:first-child{color:#555} img{max-width:100%;display:block;margin:.6em 0}
.headline{font-size:1.1em;font-weight:600} code{background:#f4f4f4;padding:0 .2em}
"""


def _verdict_badge(verdict: str) -> str:
    return f'<span class="verdict {verdict.replace(" ", "-")}">{html.escape(verdict)}</span>'


def _table(rows: list[dict], columns: list[tuple[str, str]], fmt=None) -> str:
    fmt = fmt or {}
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            text = fmt[key](v) if key in fmt and v is not None else ("n/a" if v is None else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


_pct = lambda v: f"{v:.1%}"  # noqa: E731
_g = lambda v: f"{v:.3g}"  # noqa: E731


def _details(exp: dict) -> str:
    name = exp["name"]
    if name == "faster_training":
        return _table(
            exp["per_seed"],
            [
                ("seed", "seed"),
                ("target_acc", "target (best without BN)"),
                ("steps_without_bn", "steps without BN"),
                ("steps_with_bn", "steps with BN"),
                ("speedup", "ratio"),
                ("best_acc_with_bn", "best with BN"),
            ],
            {"target_acc": _pct, "best_acc_with_bn": _pct, "speedup": lambda v: f"{v:.1f}x"},
        )
    if name == "stable_inputs":
        return _table(
            exp["per_seed"],
            [("seed", "seed"), ("drift_without_bn", "drift without BN"), ("drift_with_bn", "drift with BN")],
            {"drift_without_bn": lambda v: f"{v:.3f}", "drift_with_bn": lambda v: f"{v:.3f}"},
        )
    if name in ("learning_rates", "initialization"):
        rows = [dict(r, model=LABELS[r["bn"]]) for r in exp["table"]]
        head = "learning rate" if name == "learning_rates" else "initial weight std"
        out = _table(
            rows,
            [
                ("value", head),
                ("model", "model"),
                ("final_acc_mean", "final accuracy (mean)"),
                ("final_acc_min", "min"),
                ("final_acc_max", "max"),
                ("diverged", "diverged runs"),
                ("runs", "runs"),
            ],
            {
                "final_acc_mean": _pct,
                "final_acc_min": _pct,
                "final_acc_max": _pct,
                "value": lambda v: f"{v:g}",
            },
        )
        if "invariance" in exp:
            out += "<p>Scale invariance, float64: BN(aWu) against BN(Wu), and a * dL/d(aW) against dL/dW:</p>"
            out += _table(
                exp["invariance"],
                [
                    ("a", "a"),
                    ("max_abs_output_diff", "max |output difference|"),
                    ("grad_rel_diff", "relative gradient difference"),
                ],
                {"max_abs_output_diff": lambda v: f"{v:.2e}", "grad_rel_diff": lambda v: f"{v:.2e}"},
            )
        return out
    if name == "train_vs_inference":
        out = _table(exp["table"], [("batch", "training batch"), ("batch_stats", "batch statistics"),
                                    ("running", "running averages"), ("population", "population statistics")],
                     {"batch_stats": _pct, "running": _pct, "population": _pct})  # fmt: skip
        rows = [dict(d, issues="; ".join(d["issues"]) or "ok") for d in exp["diagnosis"]]
        out += "<p>batchnorm.diagnose on the batch-2 model (test data):</p>"
        return out + _table(rows, [("layer", "layer"), ("train_eval_gap", "train/eval gap"),
                                   ("mean_error", "mean error (stds)"), ("var_error", "variance error"),
                                   ("issues", "issues")],
                            {"train_eval_gap": _g, "mean_error": _g, "var_error": _g})  # fmt: skip
    if name == "small_batches":
        batches = sorted({r["batch"] for r in exp["table"]}, reverse=True)
        rows = []
        for label in dict.fromkeys(r["label"] for r in exp["table"]):
            row = {"method": label}
            row.update({f"b{b}": r["error"] for r in exp["table"] if r["label"] == label for b in [r["batch"]]})
            rows.append(row)
        out = _table(rows, [("method", "method")] + [(f"b{b}", f"batch {b}") for b in batches],
                     {f"b{b}": _pct for b in batches})  # fmt: skip
        sync = exp["sync"]
        if "error" in sync:
            return out + f"<p>SyncBN run: not run ({html.escape(sync['error'])}).</p>"
        return out + (f"<p>SyncBN, 2 processes x batch 2: test error {1 - sync['final_acc']:.1%}.</p>")
    if name == "regularization":
        rows = [dict(r, model=("BN" if r["bn"] else "no BN")) for r in exp["table"]]
        return _table(rows, [("model", "model"), ("dropout", "dropout"), ("train_acc", "training accuracy"),
                             ("test_acc", "test accuracy"), ("gap", "gap")],
                      {"train_acc": _pct, "test_acc": _pct, "gap": _pct})  # fmt: skip
    if name == "covariate_shift":
        f = exp["figures"]
        rows = [{"model": k, "acc": f["acc"][k], "drift": f["drift"][k]} for k in f["acc"]]
        out = _table(rows, [("model", "model"), ("acc", "final test accuracy"), ("drift", "input drift")],
                     {"acc": _pct, "drift": lambda v: f"{v:.3f}"})  # fmt: skip
        land = [{"model": k, **v} for k, v in f["landscape_median"].items()]
        return out + _table(land, [("model", "model"), ("loss_range", "loss range (median)"),
                                   ("grad_change", "gradient change (median)"), ("beta", "effective beta")],
                            {"loss_range": _g, "grad_change": _g, "beta": _g})  # fmt: skip
    return ""


def render_html(results: dict) -> str:
    """The whole report as one HTML string, plots embedded."""
    st = results["settings"]
    data = st["data"]
    versions = ", ".join(f"{k} {v}" for k, v in st["versions"].items())
    meta_rows = [
        ("data", f"{data['description']} ({data['train_size']} train / {data['test_size']} test)"),
        ("model", "MLP, 3 hidden layers of 100 sigmoids, softmax output; plain SGD, batch 60"),
        (
            "scale",
            f"{st['scale']} (steps {st['steps']}, sweeps {st['sweep_steps']} steps, "
            f"{st['seeds']} seed(s) for curves, {st['sweep_seeds']} for sweeps)",
        ),
        ("seed", str(st["seed"])),
        ("device", st["device"]),
        ("versions", versions),
        ("machine", st.get("machine", "")),
        ("time taken", f"{results['duration_s']:.0f} s, finished {results['created']}"),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>batchnorm lab: the claims of Batch Normalization, measured</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Batch Normalization, put to the test</h1>",
        "<p>Ioffe &amp; Szegedy (2015) claim that Batch Normalization trains faster, tolerates higher "
        "learning rates, makes initialization matter less and keeps layer inputs stable; later work "
        "adds that it needs whole-data statistics at inference, fails with small batches, regularizes, "
        "and disputes why it works. Each claim below is measured on real data; each verdict is computed "
        "from the numbers by the rule printed under it.</p>",
        "<table class='meta'>"
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in meta_rows)
        + "</table>",
        "<h2 id='summary'>Summary</h2><table><tr><th>claim</th><th>measured</th><th>verdict</th></tr>",
    ]
    for s in results["summary"]:
        parts.append(
            f"<tr><td><a href='#{s['name']}'>{html.escape(s['title'])}</a></td>"
            f"<td>{html.escape(s['headline'])}</td><td>{_verdict_badge(s['verdict'])}</td></tr>"
        )
    parts.append("</table>")
    for name, exp in results["experiments"].items():
        parts.append(
            f"<section id='{html.escape(name)}'><h2>{html.escape(exp['title'])} {_verdict_badge(exp['verdict'])}</h2>"
        )
        parts.append(f"<p class='claim'>Claim: {html.escape(exp['claim'])}</p>")
        parts.append(f"<p>Source: {html.escape(exp['source'])}.</p>")
        parts.append(f"<p>Method: {html.escape(exp['method'])}</p>")
        for img in PLOTS[name](exp):
            parts.append(f"<img alt='{html.escape(exp['title'])}' src='data:image/png;base64,{img}'>")
        parts.append(f"<p class='headline'>{html.escape(exp['headline'])}</p>")
        parts.append(_details(exp))
        parts.append(
            f"<p class='rule'>Verdict: <b>{html.escape(exp['verdict'])}</b>. "
            f"Rule: {html.escape(exp['rule'])}.</p></section>"
        )
    parts.append(
        "<p class='rule'>Written by <code>batchnorm lab</code>; the numbers are in "
        "results.json beside this page.</p></body></html>"
    )
    return "\n".join(parts)
