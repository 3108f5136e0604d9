"""Every command of a typer app, found from the app itself (a new command is covered by
whatever test walks them, without editing a list)."""

from __future__ import annotations

import types
import typing
from typing import Any

import typer


def command_paths(app: typer.Typer) -> dict[str, Any]:
    """``{"push": <click command>, "schedule create": ..., ...}``: leaf commands by path."""
    found: dict[str, Any] = {}

    def walk(group: Any, prefix: str) -> None:
        for name, command in group.commands.items():
            path = f"{prefix} {name}".strip()
            if hasattr(command, "commands"):
                walk(command, path)
            else:
                found[path] = command

    walk(typer.main.get_command(app), "")
    return found


def options_of(command: Any) -> set[str]:
    """The long option names a command takes (``--json``, ``--out``, ...)."""
    return {opt for param in command.params for opt in getattr(param, "opts", ())
            if opt.startswith("--")}


def is_number(param: Any) -> bool:
    """Whether a parameter takes an int or a float (``int | None`` included)."""
    runtime = param.get_runtime_param() if hasattr(param, "get_runtime_param") else None
    annotation = getattr(runtime, "annotation", None)
    if annotation is None:  # older typer: click types
        return getattr(getattr(param, "type", None), "name", "") in ("integer", "float")
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(a in (int, float) for a in typing.get_args(annotation))
    return annotation in (int, float)
