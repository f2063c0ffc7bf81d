"""The lab, part 2: inference statistics, small batches and the alternatives, regularization,
and whether "internal covariate shift" is why BN works.

5. train_vs_inference: the same BN network evaluated with batch statistics,
   running averages and exact population statistics, trained at batch 2, 4, 8, 32.
6. small_batches: a small CNN with BN, GroupNorm, LayerNorm, InstanceNorm,
   Batch Renorm and ghost BN at per-step batch 32 ... 2; SyncBN over 2
   processes at 2 each against the same 2 x 2 training without synchronization.
7. regularization: the train/test gap with and without BN and dropout.
8. covariate_shift: (a) BN with injected time-varying noise ("noisy BN") and
   (b) the loss landscape along the gradient, with and without BN
   (Santurkar et al. 2018).

Verdicts are computed from the measured numbers by the rule stored with each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .data import Dataset
from .experiments import MIXED, NOT_SUPPORTED, SUPPORTED, Experiment, Scale, _verdict_all
from .models import NORM_LABELS, Setup, train_setup

__all__ = ["EXPERIMENTS", "SyncRun", "train_any"]


@dataclass(frozen=True)
class SyncRun:
    """A Setup trained by `world` processes with SyncBN, each at setup.batch."""

    setup: Setup
    world: int = 2

    @property
    def steps(self) -> int:
        return self.setup.steps

    @property
    def label(self) -> str:
        return f"SyncBN, {self.world} processes x batch {self.setup.batch}"


def train_any(data: Dataset, run, device: str = "cpu", on_steps=None) -> dict:
    """Train a Setup here, or a SyncRun over processes (a failure is recorded, not raised)."""
    if isinstance(run, SyncRun):
        from .sync import train_sync

        try:
            result = train_sync(data, run.setup, run.world)
        except Exception as exc:  # spawn or gloo unavailable: say so in the report
            result = {"error": f"{type(exc).__name__}: {exc}"}
        if on_steps is not None:
            on_steps(run.steps)
        return result
    return train_setup(data, run, device, on_steps)


def _seeds(n: int, seed: int) -> list[int]:
    return [seed + i for i in range(n)]


def _mean(values) -> float:
    return float(np.mean(values))


# --------------------------------------------------------------------------- 5. train vs inference

INFER_BATCHES = (2, 4, 8, 32)


def _infer_runs(scale: Scale, seed: int) -> list[Setup]:
    n_train = 1438
    return [
        Setup("mlp", "bn", b, steps=max(4, scale.small_batch_epochs * n_train // b), lr=0.5 * (b / 32) ** 0.5,
              seed=s, eval_every=10**9, measure=("eval_modes",))
        for b in INFER_BATCHES
        for s in _seeds(scale.part2_seeds, seed)
    ]  # fmt: skip


def _analyze_infer(scale: Scale, seed: int, runs: list[Setup], results: list[dict]) -> dict:
    rows = []
    for b in INFER_BATCHES:
        group = [res["eval_modes"] for r, res in zip(runs, results) if r.batch == b]
        rows.append({
            "batch": b,
            "batch_stats": _mean([g["batch_stats"] for g in group]),
            "running": _mean([g["running"] for g in group]),
            "population": _mean([g["population"] for g in group]),
        })  # fmt: skip
    for r in rows:
        r["gap"] = r["population"] - r["batch_stats"]
    better = all(r["population"] >= r["batch_stats"] for r in rows)
    grows = rows[0]["gap"] > rows[-1]["gap"]
    verdict = _verdict_all([better, grows])
    small = next(res for r, res in zip(runs, results) if r.batch == INFER_BATCHES[0])
    return {
        "verdict": verdict,
        "rule": "supported if, at every batch size, exact population statistics give at least the test "
        "accuracy of batch statistics, AND that advantage is larger at batch "
        f"{INFER_BATCHES[0]} than at {INFER_BATCHES[-1]}; not supported if neither; mixed if one",
        "headline": f"at batch {rows[0]['batch']}: {rows[0]['batch_stats']:.1%} with batch statistics, "
        f"{rows[0]['running']:.1%} running averages, {rows[0]['population']:.1%} population statistics "
        f"(at {rows[-1]['batch']}: {rows[-1]['batch_stats']:.1%} / {rows[-1]['running']:.1%} / "
        f"{rows[-1]['population']:.1%})",
        "figures": {
            "population_beats_batch_stats_everywhere": better,
            "gap_grows_as_batch_shrinks": grows,
            "gap_at_smallest": rows[0]["gap"],
            "gap_at_largest": rows[-1]["gap"],
        },
        "table": rows,
        "diagnosis": small["eval_modes"]["diagnosis"],
        "series": [],
    }


# --------------------------------------------------------------------------- 6. small batches

SMALL_BATCHES = (32, 16, 8, 4, 2)
METHODS = ("bn", "gn", "ln", "in", "renorm", "ghost")  # the CNN
MLP_METHODS = ("bn", "gn", "ln", "renorm", "ghost")  # no InstanceNorm: one value per sample and unit


def _small(arch: str, norm: str, batch: int, scale: Scale, seed: int) -> Setup:
    # Every run sees the same number of examples (as the Group Normalization paper keeps the epochs);
    # the learning rate scales linearly with the batch (the paper's rule: 0.1 * batch / 32).
    steps = max(8, scale.cnn_samples // batch)
    act = {"act": "relu"} if arch == "mlp" else {}
    return Setup(arch, norm, batch, steps=steps, lr=0.1 * batch / 32, momentum=0.9,
                 seed=seed, eval_every=max(4, steps // 10), **act)  # fmt: skip


def _small_runs(scale: Scale, seed: int) -> list:
    seeds = _seeds(scale.part2_seeds, seed)
    runs: list = [_small("cnn", m, b, scale, s) for m in METHODS for b in SMALL_BATCHES for s in seeds]
    runs += [_small("mlp", m, b, scale, s) for m in MLP_METHODS for b in SMALL_BATCHES for s in seeds]
    # SyncBN over 2 processes at batch 2 each is one run at global batch 4: batch 4's steps and learning
    # rate. Its unsynchronized counterpart (each process normalizing its own 2 samples, gradients
    # averaged over 4) is ghost BN at batch 4 with virtual batches of 2, already in the grid.
    # On the MLP, where a BN statistic of 2 samples is all there is.
    runs.append(SyncRun(replace(_small("mlp", "bn", 4, scale, seed), batch=2), world=2))
    return runs


def _clearly_below(a: float, b: float, n: int) -> bool:
    """Error rate a is below b by more than two standard errors of the difference (binomial, n test images)."""
    se = math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))
    return b - a > 2 * se


def _analyze_small(scale: Scale, seed: int, runs: list, results: list[dict]) -> dict:
    rows = []
    for arch, methods in (("cnn", METHODS), ("mlp", MLP_METHODS)):
        for m in methods:
            for b in SMALL_BATCHES:
                accs = [
                    res["final_acc"]
                    for r, res in zip(runs, results)
                    if isinstance(r, Setup) and r.arch == arch and r.norm == m and r.batch == b
                ]
                label = NORM_LABELS[m] + (", MLP" if arch == "mlp" else "")
                rows.append({"arch": arch, "method": m, "label": label, "batch": b, "error": 1 - _mean(accs)})
    err = {(r["arch"], r["method"], r["batch"]): r["error"] for r in rows}
    big, small = SMALL_BATCHES[0], SMALL_BATCHES[-1]
    n_test = min(res["n_test"] for res in results if "n_test" in res)
    rise, rises = {}, {}
    for arch in ("cnn", "mlp"):
        for m in ("bn", "gn"):
            rise[arch, m] = err[(arch, m, small)] - err[(arch, m, big)]
        rises[arch] = (
            _clearly_below(err[(arch, "bn", big)], err[(arch, "bn", small)], n_test)
            and rise[arch, "bn"] > rise[arch, "gn"]
        )
    sync_res = next(res for r, res in zip(runs, results) if isinstance(r, SyncRun))
    sync_err = None if "error" in sync_res else 1 - sync_res["final_acc"]
    local_err = err[("mlp", "ghost", 4)]  # 2 processes x batch 2 without synchronization (see _small_runs)
    sync_beats_local = sync_err is not None and _clearly_below(sync_err, local_err, n_test)
    flags = [rises["cnn"], rises["mlp"]]
    if sync_err is not None:
        flags.append(sync_beats_local)
    verdict = _verdict_all(flags)

    def said(arch: str) -> str:
        bn, gn = (round(rise[arch, m] * 100, 1) + 0.0 for m in ("bn", "gn"))  # + 0.0: no "-0.0"
        return f"BN {bn:+.1f} points, GroupNorm {gn:+.1f}"

    return {
        "verdict": verdict,
        "rule": f"supported if, in the CNN and in the MLP, BN's test error rises from batch {big} to {small}, "
        "and more than GroupNorm's (the Group Normalization paper's finding), AND SyncBN over 2 processes "
        "at batch 2 each has a lower error than the same 2 x 2 training without synchronization "
        "(per-process statistics of 2 samples: ghost BN at batch 4); not supported if none of the three "
        "holds; mixed otherwise. A rise or a lower error counts only if larger than two standard errors of "
        f"the difference of two error rates on the {n_test} test images (binomial). SyncBN is left out of "
        "the rule, and said so, if its processes could not run",
        "headline": f"from batch {big} to {small} the error changed: CNN {said('cnn')}; MLP {said('mlp')}; "
        "test error of SyncBN 2x2 (MLP) "
        + (f"{sync_err:.1%}, unsynchronized 2x2 {local_err:.1%}, one process at batch 4 "
           f"{err[('mlp', 'bn', 4)]:.1%}" if sync_err is not None else f"not run ({sync_res['error']})"),
        "figures": {
            "bn_error_rise": rise["cnn", "bn"],
            "gn_error_rise": rise["cnn", "gn"],
            "bn_error_rises": rises["cnn"],
            "mlp_bn_error_rise": rise["mlp", "bn"],
            "mlp_gn_error_rise": rise["mlp", "gn"],
            "mlp_bn_error_rises": rises["mlp"],
            "syncbn_2x2_error": sync_err,
            "local_2x2_error": local_err,
            "mlp_bn_2_error": err[("mlp", "bn", 2)],
            "mlp_bn_4_error": err[("mlp", "bn", 4)],
            "syncbn_beats_local_2x2": sync_beats_local,
            "n_test": n_test,
        },
        "table": rows,
        "sync": sync_res,
        "series": [],
    }  # fmt: skip


# --------------------------------------------------------------------------- 7. regularization


def _reg_runs(scale: Scale, seed: int) -> list[Setup]:
    return [
        Setup("mlp", norm, 60, steps=scale.reg_steps, lr=0.1, seed=s, eval_every=max(10, scale.reg_steps // 20),
              act="relu", dropout=dp, measure=("train_acc",))
        for norm in ("none", "bn")
        for dp in (0.0, 0.5)
        for s in _seeds(scale.part2_seeds, seed)
    ]  # fmt: skip


def _analyze_reg(scale: Scale, seed: int, runs: list[Setup], results: list[dict]) -> dict:
    rows = []
    for norm in ("none", "bn"):
        for dp in (0.0, 0.5):
            group = [res for r, res in zip(runs, results) if r.norm == norm and r.dropout == dp]
            train = _mean([g["train_acc"] for g in group])
            test = _mean([g["final_acc"] for g in group])
            rows.append({"bn": norm == "bn", "dropout": dp, "train_acc": train, "test_acc": test, "gap": train - test})
    by = {(r["bn"], r["dropout"]): r for r in rows}
    per_seed = []
    for s in sorted({r.seed for r in runs}):
        res = {(r.norm, r.dropout): x for r, x in zip(runs, results) if r.seed == s}
        gap = {k: v["train_acc"] - v["final_acc"] for k, v in res.items()}
        per_seed.append({"seed": s, "gap_without_bn": gap[("none", 0.0)], "gap_with_bn": gap[("bn", 0.0)]})
    smaller = [p["gap_with_bn"] < p["gap_without_bn"] for p in per_seed]
    verdict = _verdict_all(smaller)
    return {
        "verdict": verdict,
        "rule": "gap = training accuracy - test accuracy at the end (eval mode). Supported if, without dropout, "
        "the gap with BN is smaller than without BN in every seed; not supported if in no seed; mixed otherwise",
        "headline": f"train/test gap {by[(True, 0.0)]['gap'] * 100:.1f} points with BN, "
        f"{by[(False, 0.0)]['gap'] * 100:.1f} without; with dropout {by[(True, 0.5)]['gap'] * 100:.1f} and "
        f"{by[(False, 0.5)]['gap'] * 100:.1f}",
        "figures": {"gap_with_bn": by[(True, 0.0)]["gap"], "gap_without_bn": by[(False, 0.0)]["gap"]},
        "table": rows,
        "per_seed": per_seed,
        "series": [],
    }  # fmt: skip


# --------------------------------------------------------------------------- 8. covariate shift


def _shift_runs(scale: Scale, seed: int) -> list[Setup]:
    every = max(10, scale.smooth_steps // 15)
    runs = []
    for s in _seeds(scale.part2_seeds, seed):
        for norm, noise in (("none", False), ("bn", False), ("bn", True), ("none", True)):
            measure = ("inputs", "landscape") if not noise else ("inputs",)
            runs.append(Setup("mlp", norm, 60, steps=scale.smooth_steps, lr=0.5, seed=s, eval_every=every,
                              noise=noise, measure=measure))  # fmt: skip
    return runs


NOISE_TOLERANCE = 0.03


def _analyze_shift(scale: Scale, seed: int, runs: list[Setup], results: list[dict]) -> dict:
    def pick(norm, noise):
        return [res for r, res in zip(runs, results) if r.norm == norm and r.noise == noise]

    acc = {
        k: _mean([g["final_acc"] for g in pick(*k)])
        for k in (("none", False), ("bn", False), ("bn", True), ("none", True))
    }
    drift = {k: _mean([g["inputs"]["drift_median"] for g in pick(*k)]) for k in acc}
    noisy_ok = acc[("bn", True)] >= acc[("bn", False)] - NOISE_TOLERANCE
    noisy_shifts = drift[("bn", True)] > drift[("bn", False)]
    noise_hurts_plain = acc[("none", True)] < acc[("bn", True)] - NOISE_TOLERANCE

    land = {}
    for norm in ("none", "bn"):
        group = pick(norm, False)
        land[norm] = {
            k: float(np.median(np.concatenate([g["landscape"][k] for g in group])))
            for k in ("loss_range", "grad_change", "beta")
        }
    smoother = (
        land["bn"]["loss_range"] < land["none"]["loss_range"]
        and land["bn"]["grad_change"] < land["none"]["grad_change"]
    )
    flags = [noisy_ok and noisy_shifts, noise_hurts_plain, smoother]
    tol = f"{NOISE_TOLERANCE * 100:.0f}"
    verdict = _verdict_all(flags)
    first = {(r.norm, r.noise): res for r, res in zip(runs, results) if r.seed == seed}
    return {
        "verdict": verdict,
        "rule": "the claim tested is Santurkar et al.'s: BN helps by smoothing the loss landscape, not by "
        f"reducing internal covariate shift. Supported if (a) BN with injected noise ends within {tol} "
        "points of BN's accuracy although its layer inputs drift more than BN's, (b) the same noise without BN "
        f"ends more than {tol} points below noisy BN, and (c) along the gradient the loss range and "
        "the gradient change (medians over training) are smaller with BN; not supported if none; mixed otherwise",
        "headline": f"noisy BN {acc[('bn', True)]:.1%} vs BN {acc[('bn', False)]:.1%} (inputs drift "
        f"{drift[('bn', True)]:.2f} vs {drift[('bn', False)]:.2f}), noise without BN {acc[('none', True)]:.1%}; "
        f"loss range along the gradient {land['bn']['loss_range']:.3g} with BN vs {land['none']['loss_range']:.3g}",
        "figures": {
            "acc": {f"{n}{'_noisy' if z else ''}": v for (n, z), v in acc.items()},
            "drift": {f"{n}{'_noisy' if z else ''}": v for (n, z), v in drift.items()},
            "landscape_median": land,
            "noisy_bn_trains": noisy_ok,
            "noisy_bn_shifts_more": noisy_shifts,
            "noise_hurts_without_bn": noise_hurts_plain,
            "bn_smoother": smoother,
        },
        "series": {
            "steps": first[("bn", False)]["steps"],
            "landscape": {"bn": first[("bn", False)]["landscape"], "none": first[("none", False)]["landscape"]},
            "curves": {f"{n}{'_noisy' if z else ''}": res["test_acc"] for (n, z), res in first.items()},
            "curve_steps": {f"{n}{'_noisy' if z else ''}": res["steps"] for (n, z), res in first.items()},
        },
    }  # fmt: skip


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "train_vs_inference",
            "5. Inference needs whole-data statistics",
            "At inference BN must normalize with statistics of the whole training data (Algorithm 2), not "
            "of a batch; the smaller the training batch, the more this matters.",
            "Ioffe & Szegedy 2015, section 3.1 and Algorithm 2",
            "The BN MLP of part 1 trained at batch 2, 4, 8 and 32 (the same number of epochs; learning rate "
            "0.5 * sqrt(batch / 32)), then evaluated three ways: each test batch (of the training batch size) "
            "normalized by its own statistics; the running averages (eval mode); and exact population "
            "statistics over the training set (batchnorm.population_statistics). batchnorm.diagnose on the "
            "batch-2 model summarises what goes wrong.",
            _infer_runs,
            _analyze_infer,
            trainer=train_any,
        ),
        Experiment(
            "small_batches",
            "6. BN fails with small batches; the alternatives do not",
            "BN's error grows as the per-device batch shrinks, while GroupNorm (and LayerNorm, InstanceNorm) "
            "do not depend on the batch; Batch Renorm and synchronizing statistics across devices help BN.",
            "Wu & He 2018 (Group Normalization), Table/Fig. of error vs batch; Ioffe 2017 (Batch Renorm)",
            "A small CNN (3x3 conv layers of 16 and 32 channels, the second with stride 2, each followed by "
            "the normalization and ReLU, then linear) on the 8x8 digits, SGD with momentum 0.9, learning rate "
            "0.1 * batch / 32 (the Group Normalization paper's linear rule), the same number of training "
            "examples (so more steps at smaller batches) at per-step batch 32, 16, 8, 4, 2; BatchNorm, "
            "GroupNorm (4 groups), LayerNorm, InstanceNorm (PyTorch's layers), Batch Renorm (the paper's "
            "schedule scaled to the run) and ghost BN (virtual batch of a quarter, at least 2) from "
            "batchnorm. The same protocol with the MLP (3 x 100 ReLU; BN, GroupNorm, LayerNorm, Batch "
            "Renorm, ghost BN), where a BN statistic comes from the batch alone (at batch 2 every normalized value is "
            "+-1) while the CNN's also average over the image positions (8x8 and 4x4 on the digits). And "
            "batchnorm.SyncBatchNorm on the MLP over 2 processes (gloo, DistributedDataParallel) at batch 2 "
            "each, i.e. global batch 4 with batch 4's steps and learning rate, against the same training "
            "without synchronization (statistics of each process's 2 samples: ghost BN at batch 4 with "
            "virtual batches of 2).",
            _small_runs,
            _analyze_small,
            trainer=train_any,
        ),
        Experiment(
            "regularization",
            "7. BN regularizes",
            "BN's batch noise regularizes, reducing the need for dropout (the paper removes dropout from "
            "BN-Inception).",
            "Ioffe & Szegedy 2015, sections 3.4 and 4.2.1",
            "An MLP (3 x 100 ReLU, SGD lr 0.1, batch 60) with and without BN, with and without dropout 0.5, "
            "trained until the training set is fitted; the gap between training and test accuracy.",
            _reg_runs,
            _analyze_reg,
            trainer=train_any,
        ),
        Experiment(
            "covariate_shift",
            "8. Is internal covariate shift the reason?",
            "Santurkar et al. dispute the paper's explanation: BN does not work by reducing internal "
            "covariate shift, but by making the loss landscape smoother.",
            "Santurkar, Tsipras, Ilyas & Madry 2018, sections 2 and 3",
            "The sigmoid MLP of part 1 (lr 0.5). (a) Noisy BN: after each BN (or linear map, without BN), "
            "y * s + m with s ~ U(0.5, 2) and m ~ U(-1, 1) drawn afresh per unit at every step; final "
            "accuracy and the drift of the last layer's inputs (experiment 2's measure). (b) At evaluation "
            "points during training, on a fixed batch of 256 training examples: the loss at w - eta * g for "
            "eta in 0.05 ... 0.8 along the gradient g: the range of the loss and the largest change of the "
            "gradient ||grad L(w - eta g) - grad L(w)||.",
            _shift_runs,
            _analyze_shift,
            trainer=train_any,
        ),
    ]
}

assert {SUPPORTED, NOT_SUPPORTED, MIXED}  # the verdict words are experiments.py's
