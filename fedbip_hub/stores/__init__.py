"""Storage backends: the Hugging Face Hub, or a local folder with the same semantics."""

from __future__ import annotations

from pathlib import Path

from fedbip_hub.stores.base import CommitInfo, RepoHead, Store, Traffic
from fedbip_hub.stores.hub import HubStore
from fedbip_hub.stores.local import LocalStore

__all__ = ["CommitInfo", "HubStore", "LocalStore", "RepoHead", "Store", "Traffic",
           "is_hub_address"]


def is_hub_address(address: str) -> bool:
    """``org/name`` (and not an existing path, nor one that looks like a path) is the Hub
    (the rule of ``fedbip_hub.stores.locations``)."""
    from fedbip_hub.stores.locations import looks_like_path

    if looks_like_path(address) or Path(address).expanduser().exists():
        return False
    parts = address.split("/")
    return len(parts) == 2 and all(parts) and "\\" not in address
