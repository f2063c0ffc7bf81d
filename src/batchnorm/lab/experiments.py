"""The lab's experiments: each claim about BN, measured, with a verdict computed by a stated rule.

Every experiment is a set of training runs (`Run`) followed by an analysis
that turns the runs' measurements into figures and a verdict. Runs are plain
data, so the runner can share identical runs between experiments and count
their steps for the progress display.

The network is the paper's MNIST network (Fig. 1) sized for the data: an MLP
with three hidden layers of 100 sigmoid units and a softmax output, trained by
plain SGD on the cross-entropy with mini-batches of 60. "With BN" inserts
`batchnorm.BatchNorm1d` between each hidden linear map and its sigmoid and
drops that layer's bias (beta replaces it), as in the paper's section 3.2.
Test accuracy is measured in eval mode (running statistics, Algorithm 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..modules import BatchNorm1d
from .data import Dataset

__all__ = ["EXPERIMENTS", "SCALES", "Experiment", "Run", "Scale", "train"]

SUPPORTED, NOT_SUPPORTED, MIXED = "supported", "not supported", "mixed"


@dataclass(frozen=True)
class Scale:
    """How much work each experiment does: --quick, the default, --full."""

    name: str
    seeds: int  # seeds for the curves of experiments 1-2
    steps: int  # training steps of experiments 1-2
    eval_every: int
    sweep_seeds: int  # seeds for the learning-rate and initialization sweeps
    sweep_steps: int
    # part 2
    part2_seeds: int = 1
    small_batch_epochs: int = 2  # experiment 5: epochs at each batch size
    cnn_samples: int = 3000  # experiment 6: training examples seen by every run (steps = samples / batch)
    cnn_seeds: int = 1  # experiment 6: 6 methods x 5 batch sizes per seed
    reg_steps: int = 3000  # experiment 7
    smooth_steps: int = 1500  # experiment 8


SCALES = {
    "quick": Scale(
        "quick",
        seeds=1,
        steps=800,
        eval_every=20,
        sweep_seeds=1,
        sweep_steps=600,
        small_batch_epochs=1,
        cnn_samples=1200,
        reg_steps=1000,
        smooth_steps=600,
    ),
    "default": Scale(
        "default",
        seeds=3,
        steps=3000,
        eval_every=25,
        sweep_seeds=2,
        sweep_steps=1500,
        part2_seeds=2,
    ),
    # The paper's Fig. 1 runs 50,000 steps of 60 examples.
    "full": Scale(
        "full",
        seeds=3,
        steps=50_000,
        eval_every=250,
        sweep_seeds=3,
        sweep_steps=10_000,
        part2_seeds=3,
        small_batch_epochs=10,
        cnn_samples=40_000,
        cnn_seeds=3,
        reg_steps=20_000,
        smooth_steps=10_000,
    ),
    # For the test suite: seconds, not minutes.
    "tiny": Scale(
        "tiny",
        seeds=2,
        steps=60,
        eval_every=10,
        sweep_seeds=1,
        sweep_steps=40,
        small_batch_epochs=1,
        cnn_samples=64,
        reg_steps=60,
        smooth_steps=40,
    ),
}

BASE_LR = 0.5  # public reproductions of Fig. 1 use plain SGD at about 0.5
BASE_INIT_STD = 0.1  # "small random Gaussian": N(0, 0.1) in those reproductions
BATCH = 60  # the paper's mini-batch for MNIST
HIDDEN = (100, 100, 100)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Run:
    """One training run: everything that determines its numbers."""

    bn: bool
    lr: float
    init_std: float
    steps: int
    eval_every: int
    seed: int
    record_inputs: bool = False  # percentiles of the last hidden layer's sigmoid inputs

    @property
    def label(self) -> str:
        return f"{'with' if self.bn else 'without'} BN, lr {self.lr:g}, init {self.init_std:g}"


def train(data: Dataset, run: Run, device: str = "cpu", on_steps: Callable[[int], None] | None = None) -> dict:
    """Train one network of part 1 and return its measurements (JSON-ready).

    The Fig. 1 network (see the module docstring) trained by `models.train_setup`;
    returns steps (evaluation points), test_acc at each, the mean training loss
    of each evaluation window, diverged (a non-finite loss, or a final loss
    above that of uniform guessing, ln K), final_acc (the mean test accuracy of
    the last three evaluations), best_acc and, with `record_inputs`, the
    15th/50th/85th percentiles over the test set of the input to each sigmoid
    of the last hidden layer (`models.input_summary`).
    """
    from .models import Setup, train_setup

    setup = Setup(
        "mlp", "bn" if run.bn else "none", BATCH, run.steps, run.lr, run.seed, run.eval_every,
        init_std=run.init_std, measure=("inputs",) if run.record_inputs else (),
    )  # fmt: skip
    result = train_setup(data, setup, device, on_steps)
    result["best_acc"] = float(max(result["test_acc"]))
    return result


# --------------------------------------------------------------------------- experiments


@dataclass
class Experiment:
    name: str
    title: str
    claim: str
    source: str
    method: str
    runs: Callable[[Scale, int], list[Run]]
    analyze: Callable[[Scale, int, list[Run], list[dict]], dict]
    trainer: Callable | None = field(default=None)  # train(data, run, device, on_steps); None: train


def _seeds(n: int, seed: int) -> list[int]:
    return [seed + i for i in range(n)]


def steps_to_reach(steps: list[int], accs: list[float], target: float) -> int | None:
    """The first evaluation step at which accuracy reached `target`, or None."""
    for s, a in zip(steps, accs):
        if a >= target - 1e-12:
            return s
    return None


def _verdict_all(flags: list[bool]) -> str:
    """supported if the condition held in every seed, not supported if in none, else mixed."""
    if all(flags):
        return SUPPORTED
    if not any(flags):
        return NOT_SUPPORTED
    return MIXED


def _curve_runs(scale: Scale, seed: int) -> list[Run]:
    return [
        Run(bn, BASE_LR, BASE_INIT_STD, scale.steps, scale.eval_every, s, record_inputs=True)
        for s in _seeds(scale.seeds, seed)
        for bn in (False, True)
    ]


def _pairs(runs: list[Run], results: list[dict]) -> list[tuple[int, dict, dict]]:
    """(seed, without-BN result, with-BN result) per seed."""
    by = {(r.seed, r.bn): res for r, res in zip(runs, results)}
    return [(s, by[(s, False)], by[(s, True)]) for s in sorted({r.seed for r in runs})]


def _analyze_speed(scale: Scale, seed: int, runs: list[Run], results: list[dict]) -> dict:
    per_seed = []
    for s, base, bnr in _pairs(runs, results):
        target = base["best_acc"]
        s_base = steps_to_reach(base["steps"], base["test_acc"], target)
        s_bn = steps_to_reach(bnr["steps"], bnr["test_acc"], target)
        ratio = (s_base / s_bn) if s_bn else 0.0
        per_seed.append(
            {
                "seed": s,
                "target_acc": target,
                "steps_without_bn": s_base,
                "steps_with_bn": s_bn,
                "speedup": ratio,
                "best_acc_without_bn": base["best_acc"],
                "best_acc_with_bn": bnr["best_acc"],
            }
        )
    ratios = [p["speedup"] for p in per_seed]
    verdict = _verdict_all([r > 1.0 for r in ratios])
    med = float(np.median(ratios))
    spread = f" (seeds: {', '.join(f'{r:.1f}x' for r in ratios)})" if len(ratios) > 1 else ""
    headline = (
        f"BN reached the baseline's best test accuracy {med:.1f}x sooner{spread}"
        if med > 0
        else "BN never reached the baseline's best test accuracy"
    )
    return {
        "verdict": verdict,
        "rule": "supported if, in every seed, the network with BN reaches the best test accuracy "
        "of the network without BN in fewer steps (ratio > 1); not supported if in no seed; "
        "mixed otherwise",
        "headline": headline,
        "figures": {
            "speedup_median": med,
            "speedup_min": float(min(ratios)),
            "speedup_max": float(max(ratios)),
            "best_acc_without_bn_mean": float(np.mean([p["best_acc_without_bn"] for p in per_seed])),
            "best_acc_with_bn_mean": float(np.mean([p["best_acc_with_bn"] for p in per_seed])),
            "paper_speedup": 14.0,
        },
        "per_seed": per_seed,
        "series": _curves(runs, results),
    }


def _curves(runs: list[Run], results: list[dict]) -> list[dict]:
    return [
        {
            "seed": r.seed,
            "bn": r.bn,
            "steps": res["steps"],
            "test_acc": res["test_acc"],
            "train_loss": res["train_loss"],
        }
        for r, res in zip(runs, results)
    ]


def _analyze_inputs(scale: Scale, seed: int, runs: list[Run], results: list[dict]) -> dict:
    per_seed = []
    for s, base, bnr in _pairs(runs, results):
        per_seed.append(
            {
                "seed": s,
                "drift_without_bn": base["inputs"]["drift_median"],
                "drift_with_bn": bnr["inputs"]["drift_median"],
            }
        )
    verdict = _verdict_all([p["drift_with_bn"] < p["drift_without_bn"] for p in per_seed])
    d0 = float(np.median([p["drift_without_bn"] for p in per_seed]))
    d1 = float(np.median([p["drift_with_bn"] for p in per_seed]))
    first = _pairs(runs, results)[0]
    return {
        "verdict": verdict,
        "rule": "drift of a unit = mean over the 15th/50th/85th percentiles of |p(end) - p(first "
        "evaluation)| / its mean spread (p85 - p15); median over the 100 units of the last hidden "
        "layer. Supported if the drift with BN is smaller than without in every seed; not "
        "supported if in no seed; mixed otherwise",
        "headline": f"sigmoid inputs moved {d1:.2f} spreads with BN vs {d0:.2f} without "
        f"({d0 / max(d1, 1e-12):.1f}x less with BN)",
        "figures": {"drift_without_bn": d0, "drift_with_bn": d1},
        "per_seed": per_seed,
        "series": {
            "seed": first[0],
            "steps": first[1]["steps"],
            "without_bn": first[1]["inputs"],
            "with_bn": first[2]["inputs"],
        },
    }


LR_MULTIPLIERS = (1, 5, 30)


def _lr_runs(scale: Scale, seed: int) -> list[Run]:
    return [
        Run(bn, BASE_LR * k, BASE_INIT_STD, scale.sweep_steps, scale.eval_every, s)
        for k in LR_MULTIPLIERS
        for s in _seeds(scale.sweep_seeds, seed)
        for bn in (False, True)
    ]


def _sweep_table(runs: list[Run], results: list[dict], key: Callable[[Run], float]) -> list[dict]:
    rows = []
    for value in sorted({key(r) for r in runs}):
        for bn in (False, True):
            group = [res for r, res in zip(runs, results) if key(r) == value and r.bn == bn]
            accs = [g["final_acc"] for g in group]
            rows.append(
                {
                    "value": value,
                    "bn": bn,
                    "final_acc_mean": float(np.mean(accs)),
                    "final_acc_min": float(min(accs)),
                    "final_acc_max": float(max(accs)),
                    "diverged": sum(g["diverged"] for g in group),
                    "runs": len(group),
                }
            )
    return rows


def _row(rows: list[dict], value: float, bn: bool) -> dict:
    return next(r for r in rows if r["value"] == value and r["bn"] == bn)


TOLERANCE = 0.02  # two points of accuracy


def _analyze_lr(scale: Scale, seed: int, runs: list[Run], results: list[dict]) -> dict:
    rows = _sweep_table(runs, results, key=lambda r: r.lr)
    for r in rows:
        r["multiplier"] = round(r["value"] / BASE_LR, 6)
    top = BASE_LR * LR_MULTIPLIERS[-1]

    def tolerates(bn: bool) -> bool:
        """Trained at every rate without diverging, and at the top rate within 2 points of its best."""
        mine = [r for r in rows if r["bn"] == bn]
        best = max(r["final_acc_mean"] for r in mine)
        at_top = _row(rows, top, bn)["final_acc_mean"]
        return all(r["diverged"] == 0 for r in mine) and at_top >= best - TOLERANCE

    bn_ok, base_ok = tolerates(True), tolerates(False)
    verdict = SUPPORTED if bn_ok and not base_ok else NOT_SUPPORTED if not bn_ok else MIXED
    a_bn, a_base = _row(rows, top, True), _row(rows, top, False)
    return {
        "verdict": verdict,
        "rule": "a network tolerates the rates if it diverged in no run and its final accuracy at "
        f"x{LR_MULTIPLIERS[-1]} is within {TOLERANCE * 100:.0f} points of its best rate's. Supported "
        "if BN tolerates them and the network without BN does not; not supported if BN does not; "
        "mixed if both do (the claim is then not tested by this range)",
        "headline": f"at x{LR_MULTIPLIERS[-1]} the learning rate: {a_bn['final_acc_mean']:.1%} with BN, "
        f"{a_base['final_acc_mean']:.1%} without"
        + (f" ({a_base['diverged']}/{a_base['runs']} diverged)" if a_base["diverged"] else ""),
        "figures": {
            "base_lr": BASE_LR,
            "multipliers": list(LR_MULTIPLIERS),
            "bn_tolerates": bn_ok,
            "baseline_tolerates": base_ok,
            f"acc_with_bn_x{LR_MULTIPLIERS[-1]}": a_bn["final_acc_mean"],
            f"acc_without_bn_x{LR_MULTIPLIERS[-1]}": a_base["final_acc_mean"],
        },
        "table": rows,
        "series": _curves(runs, results),
    }


INIT_STDS = (0.01, 0.1, 1.0)
INVARIANCE_SCALES = (0.5, 2.0, 10.0)
INVARIANCE_TOL = 1e-3


def scale_invariance(seed: int = 0) -> dict:
    """BN(a W u) = BN(W u), and d/d(aW) = (1/a) d/dW, checked in float64 (paper section 3.3).

    eps breaks the invariance by O(eps / (a^2 Var(Wu))), hence a tolerance
    rather than zero; the largest deviations are reported.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(BATCH, 64, generator=gen, dtype=torch.float64)
    W = torch.randn(100, 64, generator=gen, dtype=torch.float64)
    target = torch.randn(BATCH, 100, generator=gen, dtype=torch.float64)

    def out_and_grad(Wa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Wa = Wa.clone().requires_grad_(True)
        layer = BatchNorm1d(100, dtype=torch.float64)
        y = layer(u @ Wa.T)
        (g,) = torch.autograd.grad((y * target).sum(), Wa)
        return y.detach(), g

    y1, g1 = out_and_grad(W)
    rows = []
    for a in INVARIANCE_SCALES:
        ya, ga = out_and_grad(a * W)
        rows.append(
            {
                "a": a,
                "max_abs_output_diff": float((ya - y1).abs().max()),
                "grad_rel_diff": float((a * ga - g1).norm() / g1.norm()),
            }
        )
    worst = max(max(r["max_abs_output_diff"], r["grad_rel_diff"]) for r in rows)
    return {"rows": rows, "worst": worst, "holds": worst < INVARIANCE_TOL}


def _init_runs(scale: Scale, seed: int) -> list[Run]:
    return [
        Run(bn, BASE_LR, std, scale.sweep_steps, scale.eval_every, s)
        for std in INIT_STDS
        for s in _seeds(scale.sweep_seeds, seed)
        for bn in (False, True)
    ]


def _analyze_init(scale: Scale, seed: int, runs: list[Run], results: list[dict]) -> dict:
    rows = _sweep_table(runs, results, key=lambda r: r.init_std)

    def sensitivity(bn: bool) -> float:
        accs = [r["final_acc_mean"] for r in rows if r["bn"] == bn]
        return max(accs) - min(accs)

    s_bn, s_base = sensitivity(True), sensitivity(False)
    inv = scale_invariance(seed)
    less = s_bn < s_base
    verdict = _verdict_all([less, inv["holds"]])
    return {
        "verdict": verdict,
        "rule": "sensitivity = max - min over initial weight scales of the mean final accuracy. "
        "Supported if the sensitivity with BN is smaller than without AND BN(aWu) = BN(Wu) holds "
        f"numerically (largest deviation of outputs and of a * dL/d(aW) vs dL/dW below "
        f"{INVARIANCE_TOL:g}); not supported if neither; mixed if one",
        "headline": f"final accuracy varied by {s_bn * 100:.1f} points over init scales with BN, "
        f"{s_base * 100:.1f} without; BN(aWu) = BN(Wu) to {inv['worst']:.1e}",
        "figures": {
            "init_stds": list(INIT_STDS),
            "sensitivity_with_bn": s_bn,
            "sensitivity_without_bn": s_base,
            "invariance_worst_deviation": inv["worst"],
            "invariance_holds": inv["holds"],
        },
        "table": rows,
        "invariance": inv["rows"],
        "series": _curves(runs, results),
    }


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "faster_training",
            "1. BN trains faster",
            "Batch Normalization reaches the same accuracy in far fewer training steps "
            "(the paper reports 14 times fewer on ImageNet).",
            "Ioffe & Szegedy 2015, Fig. 1(a) and section 4.2",
            "An MLP with 3 hidden layers of 100 sigmoids, with and without BN after each hidden "
            "layer, plain SGD (lr 0.5), batch 60, weights N(0, 0.1^2). Test accuracy along "
            "training; the steps each network needs to reach the best accuracy of the network "
            "without BN, and their ratio.",
            _curve_runs,
            _analyze_speed,
        ),
        Experiment(
            "stable_inputs",
            "2. BN keeps layer inputs stable",
            "Without BN the distribution of a layer's inputs keeps changing during training "
            "(internal covariate shift); with BN it stays stable.",
            "Ioffe & Szegedy 2015, Fig. 1(b, c)",
            "The same runs as experiment 1. At each evaluation, the 15th, 50th and 85th "
            "percentiles over the test set of the input to the sigmoids of the last hidden layer "
            "(the linear output without BN, the BN output with it).",
            _curve_runs,
            _analyze_inputs,
        ),
        Experiment(
            "learning_rates",
            "3. BN tolerates higher learning rates",
            "With BN the learning rate can be raised (BN-x5, BN-x30) without divergence, "
            "where the network without BN fails.",
            "Ioffe & Szegedy 2015, sections 3.3 and 4.2",
            f"The same MLP at learning rates x{', x'.join(map(str, LR_MULTIPLIERS))} of {BASE_LR}: "
            "final test accuracy (mean of the last three evaluations) and whether training "
            "diverged (a non-finite loss, or a final training loss above ln 10, that of guessing).",
            _lr_runs,
            _analyze_lr,
        ),
        Experiment(
            "initialization",
            "4. BN makes initialization matter less",
            "With BN the scale of the initial weights hardly matters: BN(aWu) = BN(Wu), "
            "and larger weights get proportionally smaller gradients.",
            "Ioffe & Szegedy 2015, section 3.3",
            f"The same MLP with initial weights N(0, s^2) for s in {', '.join(map(str, INIT_STDS))}: "
            "final test accuracy with and without BN. Plus the scale invariance checked "
            f"numerically in float64 for a in {', '.join(map(str, INVARIANCE_SCALES))}.",
            _init_runs,
            _analyze_init,
        ),
    ]
}


def run_key(run) -> str:
    return type(run).__name__ + ":" + ",".join(f"{k}={v}" for k, v in asdict(run).items())
