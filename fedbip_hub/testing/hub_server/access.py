"""Tokens and access control: the token table, `Authorization` checks, who may read or
write a repo (the real Hub's 401/403/404 answers), and `whoami`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable

from fedbip_hub.testing.hub_server.state import _URL_PREFIX, _Repo, _TokenInfo
from fedbip_hub.testing.hub_server.transport import (
    _HubError,
    _json_response,
    _Request,
    _Response,
)

DEFAULT_TOKEN = "hf_fedbip_local_admin_token"
DEFAULT_USER = "fed-admin"
DEFAULT_ORGS: tuple[str, ...] = ("fedorg",)
#: The exact message the real Hub sends for a bad token; huggingface_hub keys on it.
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class AccessControl:
    """`HubServer`'s tokens, and the read/write checks every repo route starts with."""

    _lock: threading.RLock
    _repos: dict[tuple[str, str], _Repo]
    _tokens: dict[str, _TokenInfo]
    token: str
    user: str
    orgs: tuple[str, ...]

    def add_token(
        self, token: str, user: str, orgs: Iterable[str] = (), *, role: str = "write"
    ) -> None:
        """Register `token` for `user` (member of `orgs`); `role` is "write" or "read"."""
        if role not in ("write", "read"):
            raise ValueError(f"role must be 'write' or 'read', not {role!r}")
        with self._lock:
            self._tokens[token] = _TokenInfo(user=user, orgs=tuple(orgs), role=role)

    def revoke_token(self, token: str) -> None:
        """Make `token` answer 401 "Invalid credentials in Authorization header" everywhere."""
        with self._lock:
            if token not in self._tokens:
                raise KeyError("unknown token")
            self._tokens[token].revoked = True

    def _reset_tokens(self) -> None:
        self._tokens = {self.token: _TokenInfo(user=self.user, orgs=self.orgs, role="write")}

    def _authenticate(self, request: _Request) -> _TokenInfo | None:
        header = request.headers.get("Authorization") or ""
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        with self._lock:
            info = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None or info.revoked:
            raise _HubError(401, INVALID_CREDENTIALS)
        return info

    def _readable(self, request: _Request, repo_type: str, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        caller = request.caller
        if repo is not None and (not repo.private or (caller and caller.owns(repo.namespace))):
            return repo
        message = f"Repository not found: {_URL_PREFIX[repo_type]}{repo_id}"
        # Like the real Hub: anonymous callers get 401, authenticated ones 404.
        raise _HubError(401 if caller is None else 404, message, code="RepoNotFound")

    def _writable(self, request: _Request, repo_type: str, repo_id: str) -> _Repo:
        repo = self._readable(request, repo_type, repo_id)
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to write to this repository")
        if caller.role != "write" or not caller.owns(repo.namespace):
            raise _HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _whoami(self, request: _Request) -> _Response:
        caller = request.caller
        if caller is None:
            raise _HubError(401, "You must be authenticated to access this endpoint")
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(caller.user.encode()).hexdigest()[:24],
                "name": caller.user,
                "fullname": caller.user,
                "email": None,
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [
                    {"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"}
                    for org in caller.orgs
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": caller.role},
                },
            }
        )
