"""The `batchnorm` command: `explain` now; `lab` and `bench` join it."""

from __future__ import annotations

import math

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

from . import reference

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch Normalization (Ioffe & Szegedy 2015): explain it, test its claims, time it.",
)
console = Console()


@app.callback()
def _root() -> None:
    """Batch Normalization (Ioffe & Szegedy 2015): explain it, test its claims, time it."""


def _fail(message: str) -> None:
    """One line on stderr, exit status 2, no traceback."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


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
        table.add_row(
            str(i + 1), f"{x[i]:.6g}", f"{x[i] - mean:.6g}", _fmt(cache.x_hat[i, 0]), _fmt(y[i, 0])
        )
    console.print(table)


def main() -> None:
    """Entry point of the `batchnorm` command."""
    app()


if __name__ == "__main__":
    main()
