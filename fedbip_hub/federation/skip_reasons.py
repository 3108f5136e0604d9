"""Why a round skipped a client, in words the client can act on.

Reasons name the client's repo as ``repo@commit`` (never the server's cache paths), carry
the fix, fit on one line, and never hold a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedbip_hub.errors import (
    AuthError,
    FedbipError,
    NotFoundError,
    StoreError,
    VisibilityError,
)
from fedbip_hub.secrets import redact


def reason(exc: FedbipError) -> str:
    text = exc.message
    return f"{text} (fix: {exc.hint})" if exc.hint else text


def meanwhile(reused: bool) -> str:
    """What a refused upload leaves the round with: every refusal is treated alike (its
    listing, metadata, files or numbers), the member's last valid upload, if any, standing
    in for it until a corrected one arrives."""
    return ("meanwhile its last valid upload is used, as in every round until a corrected "
            "one is pushed" if reused else
            "it has no earlier valid upload to use meanwhile, so it sits out until a "
            "corrected one is pushed")


def refusal_reason(exc: FedbipError, *, reused: bool) -> str:
    """A refused upload's ``skipped`` entry: why, the fix (which always ends in the command
    that unsticks the member), and ``meanwhile``."""
    fix = (exc.hint or "Correct the upload").strip().rstrip(".")
    if "fedbip push" not in fix:
        fix += ", then push it with `fedbip push`"
    return one_line(f"{exc.message} (fix: {fix}); {meanwhile(reused)}")


def one_line(text: str) -> str:
    return " ".join(text.split())


def publish_skip_reason(exc: StoreError, repo_id: str, fresh: bool) -> str:
    """The round record's ``skipped`` entry for a client whose adapter was not published."""
    if isinstance(exc, AuthError):
        failure, fix = exc.message, f"grant the server's token write access to {repo_id}"
    elif isinstance(exc, VisibilityError):
        failure, fix = exc.message, exc.hint or f"make {repo_id} private"
    elif isinstance(exc, NotFoundError):
        failure, fix = exc.message, (
            f"if the member deleted {repo_id}, recreate it (`fedbip join`) and push again; "
            "otherwise give the server's token read and write access to it")
    else:
        failure, fix = reason(exc), "retry later if the Hub is having problems"
    used = ("its new upload WAS used for the other clients and is consumed" if fresh else
            "it had no new upload this round")
    return one_line(redact(
        f"its personalized adapter could not be published to {repo_id} ({failure}); "
        f"{used}; its personalized adapter stays the previous one (fix: {fix}; a later "
        "round publishes to it again)"))


class InternalError(Exception):
    """An unexpected (non-FedbipError) failure reading one input; the message is the
    original's type and text with local paths replaced (the original is its cause)."""


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line (an ``InternalError`` already holds that)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, InternalError):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def exception_text(exc: BaseException, limit: int = 500) -> str:
    """``describe(exc)`` with tokens redacted, at most ``limit`` characters."""
    text = redact(describe(exc))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def internal_reason(exc: BaseException) -> str:
    return (f"internal error on the server while reading this upload "
            f"({exception_text(exc)}); the upload was NOT refused and is retried with the "
            "next round that has other news, or after the server is upgraded (fix: nothing "
            "to change on the client's side; please report this "
            "error to the federation's operator, who gets the traceback by running the server "
            "job with FEDBIP_DEBUG=1)")


def public_paths(text: str, names: Mapping[Path, str], cache_dir: str | Path) -> str:
    """``text`` with the server's local folders replaced by their public names (and any
    other path into the store's cache by a placeholder)."""
    cache = Path(cache_dir)
    pairs = {**{str(p): n for p, n in names.items()},
             **{str(p.resolve()): n for p, n in names.items()},
             str(cache): "<server cache>", str(cache.resolve()): "<server cache>"}
    for local in sorted(pairs, key=len, reverse=True):
        text = text.replace(local, pairs[local])
    return text


def describe_guards(record: Mapping[str, Any]) -> dict[str, str]:
    """Client → what the round's guards did to its update, one line each (a round
    record's ``norm_guard`` and ``sign_guard`` entries, for dashboards and job logs)."""
    out: dict[str, str] = {}
    for client, entry in (record.get("norm_guard") or {}).items():
        out[client] = (f"norm guard ({entry['action']}): task-vector norm "
                       f"{entry['norm']:.3g}, robust z {entry['robust_z']:.1f}")
    for client, entry in (record.get("sign_guard") or {}).items():
        line = f"sign guard: {entry['reason']}; {entry['action']}"
        out[client] = f"{out[client]}; {line}" if client in out else line
    for entry in record.get("duplicates") or []:
        for client in entry["members"]:
            if client == entry["kept"]:
                continue
            line = (f"duplicate of {entry['kept']} (cosine {entry['cosine']:.4f}): counted "
                    "once, shared with no one this round")
            out[client] = f"{out[client]}; {line}" if client in out else line
    return out
