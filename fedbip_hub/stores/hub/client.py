"""Per-request timeout and request counting on huggingface_hub's shared HTTP client.

huggingface_hub shares one httpx2.Client, built by a process-wide factory, and most HfApi
calls pass no timeout. A request hook on that client reads the timeout of the HubStore
call in progress (a context variable, so threads and stores do not interfere) and sets
it on the request; requests made outside a HubStore call keep the library's behaviour.
The same way, the HubStore call in progress counts its requests in its store's Traffic.
"""

from __future__ import annotations

import contextvars
import os
import threading
from typing import Any

from fedbip_hub.errors import ConfigError
from fedbip_hub.stores.base import _TRAFFIC_LOCK, Traffic

DEFAULT_TIMEOUT = 30.0
TIMEOUT_ENV = "FEDBIP_HUB_TIMEOUT"

_REQUEST_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "fedbip_hub_request_timeout", default=None)
_REQUEST_TRAFFIC: contextvars.ContextVar[tuple[Traffic, str] | None] = contextvars.ContextVar(
    "fedbip_hub_request_traffic", default=None)
_HOOK_LOCK = threading.Lock()


def _timeout_hook(request: Any) -> None:
    timeout = _REQUEST_TIMEOUT.get()
    if timeout is not None:
        import httpx2

        request.extensions = {**request.extensions,
                              "timeout": httpx2.Timeout(timeout).as_dict()}
    counted = _REQUEST_TRAFFIC.get()
    if counted is not None:
        traffic, api_prefix = counted
        path = request.url.path
        with _TRAFFIC_LOCK:  # as the Hub's limits count: API calls and file downloads
            if path.startswith(api_prefix):
                traffic.api_calls += 1
            elif "/resolve/" in path:
                traffic.downloads += 1


def _add_hook(client: Any) -> None:
    hooks = client.event_hooks
    if _timeout_hook not in hooks.get("request", []):
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _timeout_hook]}


def _install_timeout_hook() -> None:
    """Wrap huggingface_hub's client factory (keeping its hooks) and hook the live client."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http, get_session

    with _HOOK_LOCK:
        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        if not getattr(current, "_fedbip_timeout", False):
            def factory() -> Any:
                client = current()
                _add_hook(client)
                return client

            factory._fedbip_timeout = True  # type: ignore[attr-defined]
            set_client_factory(factory)
        # Someone may have replaced the factory after us, or built the client before.
        _add_hook(get_session())


def _env_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds.",
                          hint=f"Unset it, or set e.g. {TIMEOUT_ENV}=60.")
    return value
