"""What every command shares: error reporting, JSON output, progress, option aliases."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import track
from rich.table import Table

from fedbip_hub.errors import FedbipError
from fedbip_hub.secrets import redact

# Progress and errors go to stderr so that stdout stays clean for --json consumers.
err_console = Console(stderr=True)
out_console = Console()

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
T = TypeVar("T")


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def handle_errors(command: Callable[..., T]) -> Callable[..., T]:
    """Report FedbipError as a message plus a hint (JSON under --json), never a traceback.

    Set FEDBIP_DEBUG=1 to see the traceback instead.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        except FedbipError as exc:
            if os.environ.get("FEDBIP_DEBUG"):
                raise
            if kwargs.get("json_output"):
                print_json({"ok": False, **{k: redact(v) for k, v in exc.to_dict().items()}})
            else:
                who = escape(f"[{exc.client}] ") if exc.client else ""
                err_console.print(f"[bold red]Error:[/] {who}{escape(redact(exc.message))}",
                                  highlight=False)
                if exc.hint:
                    err_console.print(f"[yellow]Hint:[/] {escape(redact(exc.hint))}",
                                      highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def progress(description: str, *, enabled: bool = True
             ) -> Callable[[Iterable[T]], Iterable[T]] | None:
    """A rich progress wrapper on stderr, or None when disabled."""
    if not enabled:
        return None

    def wrap(items: Iterable[T]) -> Iterable[T]:
        # Iterate a sized iterable lazily (a thread pool's results arrive as they finish,
        # and the bar must move with them); only a bare generator is listed for its total.
        sized = items if isinstance(items, Sized) else list(items)
        return track(sized, total=len(sized), description=description, console=err_console,
                     transient=True)

    return wrap


def matrix_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[float]],
                 *, row_labels: Sequence[str] | None = None, digits: int = 3) -> Table:
    """A table of numbers; rows are labelled like the columns unless told otherwise."""
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("", style="bold")
    for label in columns:
        table.add_column(label, justify="right")
    for label, row in zip(row_labels or columns, rows, strict=True):
        table.add_row(label, *[_cell(value, digits) for value in row])
    return table


def _cell(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    if value >= 0.5:
        return f"[green]{text}[/]"
    if value < 0:
        return f"[red]{text}[/]"
    return text
