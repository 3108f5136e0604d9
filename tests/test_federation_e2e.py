"""End to end: a federation of 4 clients over 3 asynchronous rounds, through the CLI as
subprocesses, on the local-folder backend and over HTTP against the local Hub.

After every round each client's personalized adapter is loaded with PEFT (from the Hub:
``PeftModel.from_pretrained(base, repo, subfolder="personalized")``) and its ΔW is compared
with ALGORITHM.md §5 computed independently from PEFT-materialised weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    expected_round,
    json_output,
    peft_delta,
    run_cli,
    save_tiny_base,
    write_upload,
)

pytestmark = pytest.mark.slow
CLIENTS = {"alice": (0, 4), "bob": (0, 8), "carol": (1, 6), "dave": (2, 2)}  # group, rank


@dataclass
class Backend:
    kind: str
    address: str
    env: dict[str, str]


@pytest.fixture(params=["local", "hub"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    env = {"FEDBIP_CACHE": str(tmp_path / "cache")}
    if request.param == "hub":
        request.getfixturevalue("hub")
        env.update(request.getfixturevalue("hub_env"))
        return Backend("hub", "fedorg/e2e", env)
    return Backend("local", str(tmp_path / "federation"), env)


def _federation(backend: Backend, tmp_path: Path):
    from fedbip_hub.federation.repo import Federation

    return Federation.at(backend.address, cache_dir=tmp_path / "test-cache")


def _personalized_delta(backend: Backend, fed, base: Path, client: str, tmp_path: Path,
                        tag: str) -> tuple[dict[str, torch.Tensor], Path, str]:
    """Pull (with the CLI for alice, the library for the others, to save subprocesses),
    and load with PEFT (straight from the Hub for the Hub backend)."""
    from fedbip_hub.federation.client import pull

    folder = tmp_path / f"pulled-{client}-{tag}"
    if client == "alice":
        revision = json_output(run_cli(["pull", backend.address, "--client", client, "--out",
                                        str(folder), "--json"], backend.env))["revision"]
    else:
        revision = pull(fed, client, folder).revision
    if backend.kind == "hub":
        repo = fed.member(client).repo_id
        delta = peft_delta(base, repo, subfolder="personalized")
    else:
        delta = peft_delta(base, folder)
    return delta, folder, revision


def _minus(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: a[m] - b[m] for m in b}


def _heads(fed) -> dict[str, str]:
    repos = [fed.repo_id] + [m.repo_id for m in fed.members().values()]
    return {repo: fed.store.head(repo) for repo in repos}


def _assert_close(actual: dict, expected: dict, client: str, round_no: int) -> None:
    assert actual.keys() == expected.keys()
    for module in expected:
        torch.testing.assert_close(actual[module], expected[module], rtol=1e-3, atol=2e-5,
                                   msg=lambda m, mod=module: f"{client} round {round_no} "
                                                             f"{mod}: {m}")


def test_three_async_rounds_match_the_reference(backend: Backend, tmp_path: Path) -> None:
    env = backend.env
    base = save_tiny_base(tmp_path / "base")
    run_cli(["init", backend.address, "--base-model", str(base), "--num-labels", "3",
             "--r", "4", "--alpha", "8", "--strategy", "fedbip-l",
             "--strategy-options", '{"rank": 64, "rule": "normalize"}'], env)
    for client in CLIENTS:
        run_cli(["join", backend.address, "--client", client], env)
    fed = _federation(backend, tmp_path)
    init = fed.init_folder()
    init_delta = peft_delta(base, init)

    # Round 1: every client trains from the federation's initial adapter, each its own rank.
    uploads, starts = {}, {}
    for i, (client, (group, rank)) in enumerate(CLIENTS.items()):
        uploads[client] = write_upload(init, tmp_path / f"up1-{client}", seed=i, group=group,
                                       rank=rank)
        run_cli(["push", backend.address, "--client", client, "--adapter",
                 str(uploads[client]), "--n-examples", str(10 + i)], env)
        starts[client] = init_delta
    record = json_output(run_cli(["run", backend.address, "--json"], env, server=True))
    assert record["status"] == "completed" and record["round"] == 1
    assert sorted(record["outputs"]) == sorted(CLIENTS)
    assert set(record["cosine"]["layers"]) == {"model.layers.0", "model.layers.1", "score"}
    tau = {c: _minus(peft_delta(base, uploads[c]), starts[c]) for c in CLIENTS}
    history: dict = {}  # the similarity memory, re-derived from every round's vectors
    expected = expected_round({c: init_delta for c in CLIENTS}, tau,
                              dict.fromkeys(CLIENTS, True), dict.fromkeys(CLIENTS, 0),
                              history=history)
    latest, pulled, revisions = {}, {}, {}
    for client in CLIENTS:
        latest[client], pulled[client], revisions[client] = _personalized_delta(
            backend, fed, base, client, tmp_path, "r1")
        _assert_close(latest[client], expected[client], client, 1)
    dave_round1 = shutil.copytree(pulled["dave"], tmp_path / "dave-round1")

    # Round 2: alice, bob and carol train from their personalized adapters; dave is stale.
    fresh = {c: c != "dave" for c in CLIENTS}
    for i, client in enumerate(c for c in CLIENTS if fresh[c]):
        upload = write_upload(pulled[client], tmp_path / f"up2-{client}", seed=10 + i,
                              group=CLIENTS[client][0])
        shutil.copy(pulled[client] / "fedbip_start.json", upload)
        run_cli(["push", backend.address, "--client", client, "--adapter", str(upload)], env)
        tau[client] = _minus(peft_delta(base, upload), latest[client])
    record = json_output(run_cli(["run", backend.address, "--json"], env, server=True))
    assert record["round"] == 2
    assert {c: v["fresh"] for c, v in record["inputs"].items()} == fresh
    expected = expected_round(latest, tau, fresh, dict.fromkeys(CLIENTS, 0), history=history)
    for client in CLIENTS:
        latest[client], pulled[client], revisions[client] = _personalized_delta(
            backend, fed, base, client, tmp_path, "r2")
        _assert_close(latest[client], expected[client], client, 2)

    # Round 3: dave returns, trained from his round-1 adapter: one version stale.
    upload = write_upload(dave_round1, tmp_path / "up3-dave", seed=99, group=2)
    shutil.copy(dave_round1 / "fedbip_start.json", upload)
    run_cli(["push", backend.address, "--client", "dave", "--adapter", str(upload)], env)
    round1_dave = peft_delta(base, dave_round1)
    tau["dave"] = _minus(peft_delta(base, upload), round1_dave)
    record = json_output(run_cli(["run", backend.address, "--json"], env, server=True))
    assert record["inputs"]["dave"]["staleness"] == 1
    assert record["inputs"]["dave"]["discount"] == pytest.approx(2 ** -0.5)
    fresh = {c: c == "dave" for c in CLIENTS}
    expected = expected_round(latest, tau, fresh, {c: int(c == "dave") for c in CLIENTS},
                              history=history)
    for client in CLIENTS:
        actual, _folder, _rev = _personalized_delta(backend, fed, base, client, tmp_path, "r3")
        _assert_close(actual, expected[client], client, 3)

    # Idempotence: nothing new, so no commit anywhere.
    before = _heads(fed)
    record = json_output(run_cli(["run", backend.address, "--json"], env, server=True))
    assert record["status"] == "nothing-new"
    assert _heads(fed) == before

    status = json_output(run_cli(["status", backend.address, "--json"], env))
    assert status["round"] == 3
    assert {m["name"]: m["personalized_versions"] for m in status["members"]} == {
        c: 3 for c in CLIENTS}
