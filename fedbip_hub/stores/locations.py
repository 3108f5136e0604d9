"""One rule for telling a Hub id from a local path, and local paths stored absolute.

The rule, for a federation address and for ``--base-model`` alike: a value that names an
existing local directory, or that looks like a path (starts with ``.``, ``/`` or ``~``), is
a local path; anything else is a Hub id (``org/name``). Local paths are stored resolved
to absolute paths, so a federation works the same from any directory (cron's ``$HOME``
included); a Hub id is stored as typed.
"""

from __future__ import annotations

from pathlib import Path

from fedbip_hub.errors import ConfigError

_PATH_PREFIXES = (".", "/", "~")


def looks_like_path(value: str) -> bool:
    """A path by its spelling alone, whether or not it exists."""
    return value.startswith(_PATH_PREFIXES) or "\\" in value


def is_local_path(value: str) -> bool:
    """The rule above: an existing directory, or a value spelled as a path."""
    return looks_like_path(value) or Path(value).expanduser().is_dir()


def other_reading(address: str, *, hub: bool) -> str:
    """How ``address`` was read, and how to spell the other reading (for error hints)."""
    if hub:
        return (f"{address} was read as a Hub repo id (org/name); no folder {address} exists "
                f"in {Path.cwd()}; for a local folder, spell it as a path: ./{address}.")
    return (f"{address} was read as a local folder ({absolute(address)}); for a Hub repo, "
            "give org/name without a leading ./, / or ~.")


def absolute(value: str | Path) -> str:
    """A local path as an absolute, normalised string (``~`` expanded)."""
    return str(Path(value).expanduser().resolve())


def resolve_base_model(value: str) -> str:
    """``--base-model`` as the federation records it: an existing local directory becomes
    its absolute path, a Hub id stays as typed.

    Raises:
        ConfigError: the value is spelled as a path but no such directory exists.
    """
    if Path(value).expanduser().is_dir():
        return absolute(value)
    if looks_like_path(value):
        raise ConfigError(
            f"base model {value!r} looks like a local path, but no such directory exists "
            f"(from {Path.cwd()}).",
            hint="Point --base-model at a folder holding config.json, the weights and the "
            "tokenizer files, or pass a Hub model id such as org/name.")
    return value
