"""Private by construction.

* `fedbip init` and `fedbip join` on a repo that already exists and is public make it
  private (``create_repo(private=True, exist_ok=True)`` alone leaves it public, on the
  real Hub as on the local one), or refuse with the fix when the token cannot.
* The server publishes a personalized adapter, which mixes other members' updates, only
  into a private member repo (unless the federation sets ``allow_public_members``): a
  member whose repo turned public is skipped with its reason, the others are published
  exactly as in an undisturbed round.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    new_hub_federation,
    new_local_federation,
    published_outputs,
    pull_and_push,
    reached,
)
from huggingface_hub import HfApi

from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.client import init_federation, join
from fedbip_hub.federation.config import FEDERATION_FILE, FederationConfig, dump_json
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import run_round
from fedbip_hub.stores import HubStore, LocalStore
from fedbip_hub.testing.hub_server import HubServer


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("clean"), tiny_base)
    run_round(fed)
    return published_outputs(fed)


def _config(tiny_base: Path) -> FederationConfig:
    return FederationConfig(name="p", base_model=str(tiny_base), num_labels=3)


def test_init_and_join_make_an_existing_public_hub_repo_private(hub: HubServer, tiny_base):
    api = HfApi()
    hub.create_repo("fedorg/pub", private=False)
    hub.create_repo("fedorg/pub-alice", private=False)
    fed = init_federation("fedorg/pub", _config(tiny_base))
    assert api.repo_info("fedorg/pub").private is True
    join(fed, "alice")
    assert api.repo_info("fedorg/pub-alice").private is True
    api.update_repo_settings("fedorg/pub-alice", private=False)  # re-joining fixes it too
    join(fed, "alice")
    assert api.repo_info("fedorg/pub-alice").private is True


def test_join_refuses_a_public_repo_it_cannot_make_private(hub: HubServer, tiny_base):
    hub.create_repo("fedorg/stuck-bob", private=False)
    fed = init_federation("fedorg/stuck", _config(tiny_base))
    hub.inject_fault("PUT", r"/api/models/fedorg/stuck-bob/settings", status=403, times=None)
    with pytest.raises(ConfigError, match="exists and is public") as err:
        join(fed, "bob")
    assert "private in its settings" in (err.value.hint or "")
    assert "bob" not in fed.members()  # no membership for a repo that stays public
    assert HfApi().repo_info("fedorg/stuck-bob").private is False


def test_join_makes_an_existing_public_local_repo_private(tmp_path, tiny_base):
    fed = init_federation(str(tmp_path / "fed"), _config(tiny_base))
    store: LocalStore = fed.store  # type: ignore[assignment]
    store.create_repo("clients/alice", private=False)
    assert not store.is_private("clients/alice")
    join(fed, "alice")
    assert store.is_private("clients/alice")


def test_the_server_publishes_nothing_into_a_public_member_repo(hub: HubServer, tmp_path,
                                                                tiny_base, clean):
    new_hub_federation("fedorg/vis", tiny_base, tmp_path)
    fed = Federation(HubStore(cache_dir=tmp_path / "server"), "fedorg/vis", "fedorg/vis")
    bob = fed.member("bob").repo_id
    HfApi().update_repo_settings(bob, private=False)  # bob's own choice, after joining

    record = run_round(fed)
    assert record["status"] == "completed" and sorted(record["outputs"]) == ["alice", "carol"]
    reason = record["skipped"]["bob"]
    assert f"{bob} is public" in reason and "make" in reason and "private" in reason, reason
    assert "allow_public_members" in reason and "\n" not in reason
    assert "WAS used for the other clients" in reason
    assert "personalized" not in " ".join(fed.store.list_files(bob, fed.store.head(bob)))
    outputs = published_outputs(fed, ["alice", "carol"])
    for client, tensors in outputs.items():  # bob's update still reached them
        for key, value in clean[client].items():
            assert torch.equal(tensors[key], value), (client, key)

    config = fed.config()  # the federation opts in: bob's repo gets its adapter again
    config.allow_public_members = True
    fed.store.commit(fed.repo_id, {FEDERATION_FILE: dump_json(config)}, message="opt in")
    pull_and_push(fed, tmp_path, "alice", seed=9, group=0)
    second = run_round(fed)
    assert "bob" in second["outputs"] and "bob" not in second["skipped"], second["skipped"]
    assert reached(second) == sorted(CLIENTS)
