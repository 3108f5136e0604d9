"""Every command of a typer app, found from the app itself (a new command is covered by
whatever test walks them, without editing a list)."""

from __future__ import annotations

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
