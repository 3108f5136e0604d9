"""What a failed Hub request means: whether it is transient (worth retrying), how long a
429 asks us to wait, and which of our errors (NotFoundError / AuthError / ConflictError /
StoreError, each with a hint) it becomes. Pure functions of the exception.
"""

from __future__ import annotations

from collections.abc import Callable

from fedbip_hub.errors import AuthError, ConflictError, FedbipError, NotFoundError, StoreError
from fedbip_hub.stores.hub.client import TIMEOUT_ENV

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_UNAVAILABLE_HINT = ("The Hub may be unavailable or overloaded; retry later. Set "
                     f"{TIMEOUT_ENV} (seconds) if your link to it is slow.")


class _EntryMissing(NotFoundError):
    """A file the (existing) revision does not hold."""


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _root_cause(exc: BaseException) -> BaseException:
    """hf_hub_download (PEFT, snapshot_download) wraps a failed HEAD in
    LocalEntryNotFoundError; look through it to the real failure."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _is_transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    exc = _root_cause(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError
                  | httpx2.RemoteProtocolError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, OSError) and str(exc).startswith("Consistency check failed"):
        return True  # a download got fewer bytes than announced: a cut transfer
    return _status(exc) in TRANSIENT_STATUS


def _rate_limit_wait(exc: BaseException) -> float | None:
    """Seconds a 429 asks us to wait until its quota resets, when its ``RateLimit``
    header says the quota is spent (huggingface_hub waits the same, plus 1 s for
    rounding); None otherwise (another 429 is retried like any transient failure,
    honouring ``Retry-After``)."""
    from huggingface_hub.utils import parse_ratelimit_headers

    root = _root_cause(exc)
    if _status(root) != 429:
        return None
    headers = getattr(getattr(root, "response", None), "headers", None)
    info = parse_ratelimit_headers(headers) if headers is not None else None
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds) + 1.0
    return None


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(_root_cause(exc), "response", None)
    headers = getattr(response, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _describe_transient(exc: BaseException, timeout: float) -> str:
    import httpx2

    exc = _root_cause(exc)
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, httpx2.NetworkError | httpx2.RemoteProtocolError | ConnectionError):
        return f"connection failed or dropped ({type(exc).__name__})"
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    return type(exc).__name__


def _server_message(exc: BaseException) -> str:
    """The Hub's own error text, when it sent one (first line only)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    message = headers.get("X-Error-Message") if headers is not None else None
    if not message:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return message[:300]


def translate(exc: BaseException, repo_id: str, action: str, *, endpoint: str,
              timeout: float, scrub: Callable[[str], str],
              attempts: int = 1) -> StoreError | None:
    """Our error for a huggingface_hub / httpx2 failure (None: not one of those):
    ``endpoint`` and ``timeout`` go into the message, ``scrub`` cleans the Hub's text."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, FedbipError):
        return None
    root = _root_cause(exc)
    status = _status(root)
    if isinstance(root, GatedRepoError):
        return AuthError(f"{action}: {repo_id} is gated and this token has no access.",
                         hint="Accept the repo's conditions on the Hub with this account.")
    if isinstance(root, RepositoryNotFoundError):
        return NotFoundError(
            f"{action}: repo {repo_id} not found on {endpoint}, or your token cannot "
            "see it.",
            hint="Check the repo id, and that your token has read access to it "
            "(private repos answer 404 to outsiders).")
    if isinstance(root, RevisionNotFoundError):
        return NotFoundError(f"{action}: revision not found in {repo_id}.",
                             hint="Use a commit id from the repo's history.")
    if isinstance(root, EntryNotFoundError) and not isinstance(root, LocalEntryNotFoundError):
        return _EntryMissing(f"{action}: file not found in {repo_id}.",
                             hint="Check that the file was pushed.")
    if status == 401:
        return AuthError(
            f"{action}: the Hub rejected the token (401: invalid, expired or revoked).",
            hint="Create a new token at https://huggingface.co/settings/tokens and run "
            "`hf auth login` or set HF_TOKEN.")
    if status == 403:
        return AuthError(
            f"{action}: the token has no rights for this on {repo_id} (403).",
            hint="Give the token write access to this repo (a fine-grained token scoped "
            "to it, or membership of its org), or use a token that has it.")
    if status == 412:
        return ConflictError(f"{action}: {repo_id} moved while we were writing (412).",
                             hint="Another writer committed first; re-read and retry.")
    if isinstance(root, OfflineModeIsEnabled):
        return StoreError(f"{action} on {repo_id}: huggingface_hub is in offline mode.",
                          hint="Unset HF_HUB_OFFLINE to reach the Hub.")
    if isinstance(root, FileMetadataError):
        return StoreError(
            f"{action} on {repo_id}: {endpoint} answered without the Hub's file "
            "metadata (ETag / X-Repo-Commit).",
            hint="Check that HF_ENDPOINT points at a Hub-compatible server, and your "
            "proxy settings.")
    if _is_transient(exc):
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return StoreError(
            f"{action} on {repo_id} failed{tries}: "
            f"{_describe_transient(exc, timeout)} from {endpoint}.",
            hint=_UNAVAILABLE_HINT)
    if isinstance(root, HfHubHTTPError):
        return StoreError(
            f"{action} on {repo_id} failed (HTTP {status}): "
            f"{scrub(_server_message(root))}",
            hint="The Hub refused the request; check the repo id and your token, or "
            "retry later if the Hub is having problems.")
    return None  # not a Hub or network failure: the caller re-raises it as it is
