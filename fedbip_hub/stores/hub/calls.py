"""How a HubStore call is made: one attempt bounded by the store's timeout and counted in
its traffic, retries with exponential backoff (honouring ``Retry-After``) on transient
failures, and 429s whose quota is spent waited out within the job's deadline; plain GETs
of (paged) JSON lists on huggingface_hub's shared client, without its own retries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fedbip_hub.errors import StoreError
from fedbip_hub.secrets import REDACTED, redact
from fedbip_hub.stores.base import Store
from fedbip_hub.stores.hub.client import (
    _REQUEST_TIMEOUT,
    _REQUEST_TRAFFIC,
    _install_timeout_hook,
)
from fedbip_hub.stores.hub.failures import (
    _is_transient,
    _rate_limit_wait,
    _retry_after,
    translate,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

T = TypeVar("T")
DEFAULT_MAX_RATE_WAIT = 600.0  # the longest a call waits out rate limits without a deadline


class HubCalls(Store):
    """The call machinery `HubStore` is built on (its constructor sets these settings)."""

    api: HfApi
    timeout: float
    retries: int
    backoff: float
    max_backoff: float
    max_rate_wait: float
    endpoint: str
    _token: str | None
    _secrets: list[str]
    _api_prefix: str

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return str(redact(text))

    def _once(self, fn: Callable[[], T]) -> T:
        """One attempt of ``fn`` with every HTTP request bounded by ``self.timeout``."""
        _install_timeout_hook()
        token = _REQUEST_TIMEOUT.set(self.timeout)
        counting = _REQUEST_TRAFFIC.set((self.traffic, self._api_prefix))
        try:
            return fn()
        finally:
            _REQUEST_TRAFFIC.reset(counting)
            _REQUEST_TIMEOUT.reset(token)

    def _sleep(self, attempt: int, exc: BaseException | None = None) -> None:
        delay = _retry_after(exc) if exc is not None else None
        if delay is None:
            delay = self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
        time.sleep(min(delay, self.max_backoff))

    def _wait_out_rate_limit(self, exc: BaseException, waited: float, repo_id: str,
                             action: str) -> float | None:
        """Sleep out a 429's rate limit when the deadline allows and return the seconds
        waited; None when ``exc`` is no 429 that says how long. Raises StoreError when
        the quota resets too late for this job."""
        wait = _rate_limit_wait(exc)
        if wait is None:
            return None
        left = (self.deadline - time.monotonic()) if self.deadline is not None else None
        if waited + wait > self.max_rate_wait or (left is not None and wait > left):
            budget = f"{left:.0f} s left before this job's deadline" if left is not None \
                else f"waits are capped at {self.max_rate_wait:g} s"
            raise StoreError(
                f"{action} on {repo_id}: the Hub's rate limit is spent and resets in "
                f"{wait:.0f} s ({budget}).",
                hint="Run rounds less often (a webhook instead of a tight schedule), give "
                "the job a longer --timeout, or use an account with a higher quota (PRO, "
                "Team).") from None
        time.sleep(wait)
        return wait

    def _call(self, repo_id: str, action: str, fn: Callable[[], T]) -> T:
        """``fn`` with retries on transient failures and rate limits waited out (see the
        module docstring); any failure becomes a StoreError."""
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                return self._once(fn)
            except Exception as exc:
                slept = self._wait_out_rate_limit(exc, waited, repo_id, action)
                if slept is not None:  # a rate limit waited out is no failed attempt
                    waited += slept
                    attempt -= 1
                    continue
                if _is_transient(exc) and attempt < self.retries:
                    self._sleep(attempt, exc)
                    continue
                error = self._translate(exc, repo_id, action, attempts=attempt)
                if error is None:
                    raise
                raise error from None

    def _translate(self, exc: BaseException, repo_id: str, action: str, *,
                   attempts: int = 1) -> StoreError | None:
        """Our error for a huggingface_hub / httpx2 failure (None: not one of those)."""
        return translate(exc, repo_id, action, endpoint=self.endpoint, timeout=self.timeout,
                         scrub=self._scrub, attempts=attempts)

    def _api_url(self, repo_id: str, *parts: str) -> str:
        return "/".join([f"{self.endpoint}/api/models/{repo_id}", *parts])

    def _get_pages(self, url: str, params: Any = None, *,
                   max_pages: int | None = None) -> list[Any]:
        """GET a (possibly paginated) JSON list, one attempt per page, no library retries."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(token=self._token)
        items: list[Any] = []
        next_url: str | None = url
        pages = 0
        while next_url is not None and (max_pages is None or pages < max_pages):
            response = get_session().get(next_url, headers=headers,
                                         params=params if next_url == url else None)
            hf_raise_for_status(response)
            items.extend(response.json())
            pages += 1
            next_url = response.links.get("next", {}).get("url")
        return items
