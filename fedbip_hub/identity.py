"""The names a member controls: its client name and its repo id.

One grammar, checked when a member joins (``fedbip join``) and again whenever the server
reads a member file, so a name that would break file names (a cache path over 255 bytes,
``..``) or the Hub's rules never reaches a store.
"""

from __future__ import annotations

import re

MAX_CLIENT_NAME = 64
MAX_REPO_PART = 96  # the Hub's limit on a namespace or a repo name
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CLIENT_NAME_RULE = (f"1 to {MAX_CLIENT_NAME} ASCII letters, digits, '-', '_' or '.', "
                    "starting with a letter or digit")
REPO_ID_RULE = (f"name or namespace/name, each 1 to {MAX_REPO_PART} ASCII letters, digits, "
                "'-', '_' or '.', starting with a letter or digit, without '..' or '--'")


def client_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid client name, or None when it is."""
    if not isinstance(name, str):
        return f"a client name must be a string, not {type(name).__name__}"
    shown = name if len(name) <= 80 else name[:77] + "..."
    if len(name) > MAX_CLIENT_NAME:
        return f"client name {shown!r} is {len(name)} characters long; use {CLIENT_NAME_RULE}"
    if not _CLIENT_NAME.fullmatch(name) or ".." in name or name.endswith("."):
        return f"invalid client name {shown!r}; use {CLIENT_NAME_RULE}"
    return None


def repo_id_problem(repo_id: object) -> str | None:
    """Why ``repo_id`` is not a valid repo id, or None when it is."""
    if not isinstance(repo_id, str):
        return f"a repo id must be a string, not {type(repo_id).__name__}"
    shown = repo_id if len(repo_id) <= 80 else repo_id[:77] + "..."
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(
            len(p) <= MAX_REPO_PART and _REPO_PART.fullmatch(p) and ".." not in p
            and "--" not in p and not p.endswith(".") for p in parts):
        return f"invalid repo id {shown!r}; use {REPO_ID_RULE}"
    return None
