"""The `batchnorm` command: `explain` now; `lab` and `bench` join it."""

from __future__ import annotations

import math
from pathlib import Path

try:
    import typer
    from rich.console import Console
    from rich.table import Table
except ImportError as exc:  # the core installs without the command line's extras
    raise SystemExit(
        f"batchnorm: the command line needs the 'lab' extras ({exc.name} is missing); "
        "install them with: pip install 'batchnorm[lab]'"
    ) from exc

import numpy as np

from . import bench, reference
from ._console import fail as _fail

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch Normalization (Ioffe & Szegedy 2015): explain it, test its claims, time it.",
)
console = Console()


@app.callback()
def _root() -> None:
    """Batch Normalization (Ioffe & Szegedy 2015): explain it, test its claims, time it."""


def _parse_numbers(words: list[str]) -> np.ndarray:
    values = []
    for word in words:
        try:
            v = float(word)
        except ValueError:
            _fail(f"'{word}' is not a number; expected numbers such as: batchnorm explain 1 2 3 4 5")
        if not math.isfinite(v):
            _fail(f"'{word}' is not a finite number; batch statistics need finite values")
        values.append(v)
    if len(values) < 2:
        _fail(
            f"got {len(values)} number(s); batch normalization needs at least 2 values: with one "
            "the batch variance is 0 and every output would be beta"
        )
    return np.asarray(values, dtype=np.float64)


def _fmt(v: float) -> str:
    v = float(v)
    if v == 0 or abs(v) >= 0.01:
        return f"{v:.2f}".replace("-0.00", "0.00")
    return f"{v:.3g}"


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": False})
def explain(
    values: list[str] = typer.Argument(..., help="The mini-batch: one channel's values.", metavar="X..."),
    gamma: float = typer.Option(1.0, "--gamma", help="Scale gamma."),
    beta: float = typer.Option(0.0, "--beta", help="Shift beta."),
    eps: float = typer.Option(1e-5, "--eps", help="Added to the variance for stability."),
) -> None:
    """Show each step of the transform on the numbers you type (paper, Algorithm 1).

    Example: batchnorm explain 1 2 3 4 5 --gamma 2 --beta 0.5
    """
    x = _parse_numbers(values)
    if not eps > 0:
        _fail(f"--eps must be positive, got {eps}")
    m = len(x)
    y, cache = reference.forward(x[:, None], np.array([gamma]), np.array([beta]), eps=eps)
    mean, var = reference.batch_stats(x[:, None])
    mean, var = float(mean[0]), float(var[0])

    console.print(f"[bold]Batch normalization of {m} values[/] (Ioffe & Szegedy 2015, Algorithm 1)")
    rows = [
        ("mean", "mu = sum(x) / m", f"{mean:.6g}"),
        ("variance", "sigma2 = sum((x - mu)^2) / m  (biased)", f"{var:.6g}"),
        ("std", f"sqrt(sigma2 + eps), eps = {eps:g}", f"{math.sqrt(var + eps):.6g}"),
        ("running_var", "stores the unbiased m / (m - 1) * sigma2", f"{var * m / (m - 1):.6g}"),
    ]
    for name, formula, value in rows:
        console.print(f"  {name:<12} {formula:<42} = {value}", highlight=False)
    table = Table(title=f"y = gamma * x_hat + beta, gamma = {gamma:g}, beta = {beta:g}")
    for name in ("i", "x", "x - mu", "x_hat = (x - mu) / std", "y"):
        table.add_column(name, justify="right")
    for i in range(m):
        table.add_row(str(i + 1), f"{x[i]:.6g}", f"{x[i] - mean:.6g}", _fmt(cache.x_hat[i, 0]), _fmt(y[i, 0]))
    console.print(table)


@app.command()
def lab(
    only: list[str] = typer.Option(None, "--only", help="Run only this experiment (repeatable)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer steps and seeds: about a minute."),
    full: bool = typer.Option(False, "--full", help="The paper's scale (50,000 steps): long."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first run; results are deterministic on CPU."),
    out: Path = typer.Option(Path("lab-report"), "--out", help="Directory for index.html and results.json."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    data: str = typer.Option("digits", "--data", help="digits (embedded), mnist:DIR or npz:PATH."),
    resume: bool = typer.Option(
        False, "--resume", help="Reuse the finished experiments of an interrupted run."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report."),
    scale: str = typer.Option(None, "--scale", hidden=True, help="quick, default, full or tiny (tests)."),
) -> None:
    """Test the paper's claims about BN on real data; write lab-report/index.html and results.json.

    Experiments: faster_training, stable_inputs, learning_rates, initialization (part 1);
    train_vs_inference, small_batches, regularization, covariate_shift (part 2).
    """
    from .lab.data import DataError
    from .lab.registry import EXPERIMENTS
    from .lab.runner import LabError, run_lab

    if quick and full:
        _fail("--quick and --full exclude each other; pick one")
    scale = scale or ("quick" if quick else "full" if full else "default")
    console.print(f"[bold]batchnorm lab[/] ({scale}): {len(only or EXPERIMENTS)} experiment(s) on {data}")
    try:
        results = run_lab(
            out,
            only,
            scale,
            seed,
            device,
            data,
            resume,
            force,
            progress_factory=_Progress,
            log=lambda m: console.print(m, highlight=False),
        )
    except (LabError, DataError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        Console(stderr=True).print(
            f"interrupted: finished experiments are saved in {out / 'experiments'}; "
            "run again with --resume to continue"
        )
        raise typer.Exit(130) from None

    table = Table(title="The claims, measured")
    for col in ("claim", "measured", "verdict"):
        table.add_column(col, overflow="fold")
    style = {"supported": "green", "not supported": "red", "mixed": "yellow"}
    for s in results["summary"]:
        table.add_row(s["title"], s["headline"], f"[{style[s['verdict']]}]{s['verdict']}[/]")
    console.print(table)
    console.print(
        f"report: {out / 'index.html'}   numbers: {out / 'results.json'}  ({results['duration_s']:.0f} s)",
        highlight=False,
    )


class _Progress:
    """A rich progress bar over training steps, for run_lab."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task("starting", total=max(total, 1))

    def __enter__(self):
        self._bar.start()
        return self

    def __exit__(self, *exc):
        self._bar.stop()
        return False

    def advance(self, n: int, description: str) -> None:
        self._bar.update(self._task, advance=n, description=description)


bench.register(app)


def main() -> None:
    """Entry point of the `batchnorm` command."""
    app()


if __name__ == "__main__":
    main()
