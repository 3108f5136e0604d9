"""Errors that tell the user what went wrong, for whom, and what to do next."""

from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches
from typing import Any


class FedbipError(Exception):
    """Base class of every error fedbip-hub raises on purpose.

    Args:
        message: what went wrong.
        hint: what the user should do next.
        client: the federation member concerned, when there is one.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, client: str | None = None):
        self.message = message
        self.hint = hint
        self.client = client
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"[{self.client}] " if self.client else ""
        text = f"{prefix}{self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text

    def to_dict(self) -> dict[str, str | None]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "client": self.client,
        }


class AdapterError(FedbipError):
    """An adapter folder or file is missing, malformed, unsupported or unsafe."""


class IncompatibleAdaptersError(FedbipError):
    """Adapters that cannot be combined: different modules, shapes or ranks."""


class ConfigError(FedbipError):
    """A federation, strategy or command option is invalid."""

    exit_code = 2


class StoreError(FedbipError):
    """A storage backend (Hub or local folder) failed."""


class NotFoundError(StoreError):
    """A repo, revision or file does not exist."""


class AuthError(StoreError):
    """The token is missing, revoked or lacks the rights for this repo."""


class ConflictError(StoreError):
    """A write lost an optimistic-concurrency race (the branch moved)."""


class VisibilityError(StoreError):
    """A repo that must be private (it would receive peer-mixed adapters) is public."""


class RoundInProgressError(FedbipError):
    """Another server job holds the round lease."""


class ResourceError(FedbipError):
    """The machine running fedbip ran out of something: disk space, quota, memory."""


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the nearest choices, or nothing."""
    close = get_close_matches(str(value), [str(c) for c in choices], n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def describe_validation_error(exc: Any, fields: Iterable[str] = ()) -> str:
    """A pydantic ValidationError as one readable sentence per problem, with near matches
    for an unknown option name (among ``fields``) or a value outside a fixed set."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "value"
        kind, given = error.get("type"), error.get("input")
        if kind == "extra_forbidden":
            problems.append(f"unknown option {where!r}.{did_you_mean(where, fields)}")
        elif kind in ("literal_error", "enum"):
            expected = str((error.get("ctx") or {}).get("expected", ""))
            choices = [c.strip(" '\"") for c in expected.replace(" or ", ",").split(",")]
            problems.append(f"{where}: {given!r} is not one of {expected}."
                            f"{did_you_mean(given, [c for c in choices if c])}")
        elif kind == "value_error":  # a validator's own sentence
            problems.append(f"{where}: {str(error.get('msg', '')).removeprefix('Value error, ')}")
        else:
            problems.append(f"{where}: {error.get('msg', 'invalid')} (got {given!r}).")
    return " ".join(problems)
