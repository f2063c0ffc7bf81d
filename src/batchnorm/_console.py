"""What the commands share: the one-line error exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2, no traceback."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)
