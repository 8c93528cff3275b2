"""The command line's stderr console and its one way of failing: a red message naming the problem, an exit code."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def fail(code: int, message: str) -> typer.Exit:
    """Print `message` as an error and return the Exit to raise (exit codes: see simulations/cli.py)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
