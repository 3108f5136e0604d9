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
from typer.core import TyperGroup

from fedbip_hub.errors import FedbipError
from fedbip_hub.secrets import redact

# Progress and errors go to stderr so that stdout stays clean for --json consumers.
err_console = Console(stderr=True)
out_console = Console()

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
T = TypeVar("T")


# -h as well as --help, on every command (click passes it down to sub-contexts).
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
UNEXPECTED_HINT = ("This is a bug in fedbip-hub: rerun with FEDBIP_DEBUG=1 to see the "
                   "traceback, and report it.")


class FedbipGroup(TyperGroup):
    """A typer group whose usage errors read like every other error: one ``Error:`` line
    with a ``Hint:``, or a JSON object under --json, exit code 2 (no rich box)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's errors (typer vendors click)
            if not standalone_mode:
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help is the answer
                if exc.format_message().strip():
                    sys.stderr.write(exc.format_message() + "\n")
                sys.exit(exc.exit_code)
            report_error(type(exc).__name__, _usage_message(exc), usage_hint(exc),
                         json_output="--json" in argv)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            err_console.print("Aborted.", highlight=False)
            sys.exit(1)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def new_app(name: str, help_text: str, **kwargs: Any) -> typer.Typer:
    """A typer app (or sub-app) with the shared conventions: -h, no tracebacks, errors on
    one line, no completion install commands."""
    return typer.Typer(name=name, help=help_text, cls=FedbipGroup, no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=False,
                       context_settings=CONTEXT_SETTINGS, **kwargs)


def _usage_message(exc: typer.TyperException) -> str:
    close = getattr(exc, "possibilities", None)  # an option typo: click's near matches
    if close:
        return f"{exc.message.rstrip('.')}. Did you mean {' or '.join(close)}?"
    return exc.format_message()


def usage_hint(exc: typer.TyperException) -> str:
    """The fix for a usage error: what the parameter takes, and where the help is."""
    ctx = getattr(exc, "ctx", None)
    where = f"`{ctx.command_path} -h`" if ctx is not None else "-h"
    param = getattr(exc, "param", None)
    if param is not None:
        what = getattr(param, "help", None) or ""
        label = param.opts[0] if param.opts else (param.human_readable_name or "")
        if what:
            return f"{label}: {what.rstrip('.')}. See {where}."
    return f"See {where} for the arguments and examples."


def report_error(kind: str, message: str, hint: str | None, *, json_output: bool,
                 client: str | None = None) -> None:
    """One error: ``Error:`` and ``Hint:`` lines on stderr, or a JSON object on stdout."""
    message, hint = redact(message), redact(hint) if hint else hint
    if json_output:
        print_json({"ok": False, "error": kind, "message": message, "hint": hint,
                    "client": client})
        return
    who = escape(f"[{client}] ") if client else ""
    message = " ".join(line.strip() for line in message.splitlines())
    # soft_wrap: one line however narrow the terminal (a log grep finds it whole)
    err_console.print(f"[bold red]Error:[/] {who}{escape(message)}", highlight=False,
                      soft_wrap=True)
    if hint:
        err_console.print(f"[yellow]Hint:[/] {escape(hint)}", highlight=False,
                          soft_wrap=True)


VerboseOption = Annotated[bool, typer.Option(
    "--verbose", "-v", envvar="FEDBIP_VERBOSE",
    help="Let the dependencies talk: transformers' load reports, datasets' and the Hub's "
    "progress bars, FutureWarnings (env FEDBIP_VERBOSE).")]
# Set before the libraries are imported (they read them once); for libraries already
# imported (in-process callers), the matching calls below.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
              "DATASETS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def quiet_dependencies(verbose: bool) -> None:
    """Silence dependency chatter (load reports, progress bars, FutureWarnings) unless
    ``verbose``; fedbip's own progress and messages are unaffected."""
    import logging
    import warnings

    if verbose:
        return
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    chatty = ("transformers", "datasets", "peft", "accelerate", "huggingface_hub",
              "bitsandbytes")
    # Their UserWarnings too (PEFT's "base_model_name_or_path was renamed", say): advice
    # to library authors, not to someone running a command.
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=rf"({'|'.join(chatty)})(\.|$)")
    for name in chatty:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def handle_errors(command: Callable[..., T]) -> Callable[..., T]:
    """Report FedbipError as a message plus a hint (JSON under --json), never a traceback;
    an OSError names its file, anything else says it is a bug.

    Set FEDBIP_DEBUG=1 to see the traceback instead.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        json_output = bool(kwargs.get("json_output"))
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except FedbipError as exc:
            if os.environ.get("FEDBIP_DEBUG"):
                raise
            report_error(type(exc).__name__, exc.message, exc.hint, json_output=json_output,
                         client=exc.client)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if os.environ.get("FEDBIP_DEBUG"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            report_error(type(exc).__name__, f"{where}{exc.strerror or exc}",
                         "Check the path and its permissions (and free disk space).",
                         json_output=json_output)
            raise typer.Exit(1) from None
        except Exception as exc:
            if os.environ.get("FEDBIP_DEBUG"):
                raise
            report_error("UnexpectedError", f"unexpected {type(exc).__name__}: {exc}",
                         UNEXPECTED_HINT, json_output=json_output)
            raise typer.Exit(1) from None

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
