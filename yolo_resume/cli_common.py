"""What every CLI module shares: the two consoles and the one-line handling of a UserError."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

from .errors import UserError

# Piped output (logs, CI, grep) gets a wide console instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 400)


def user_errors(fn):
    """Turn a UserError into one red line on stderr and its exit code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)
