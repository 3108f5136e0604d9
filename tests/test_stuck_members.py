"""No stuck members: a stray pickle in a member repo is refused with a fix that works
(`fedbip push` deletes it in the same commit as the clean upload), and every refusal is
treated alike: a pickle refused from the repo's listing and a truncated file refused
after download both leave the member's last valid upload in the round, and `fedbip
status` shows both as refused with their reasons."""

from __future__ import annotations

import re
from pathlib import Path

from federation_helpers import (
    CLIENTS,
    new_local_federation,
    push_fresh,
    reached,
    write_upload,
)
from typer.testing import CliRunner

from cli.main import app
from fedbip_hub.adapters.lora import WEIGHTS_NAME
from fedbip_hub.federation.client import (
    latest_personalized_revision,
    pull,
    push,
    stale_upload_files,
)
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.status import federation_status
from fedbip_hub.server.rounds import run_round

STRAY = "adapter_model.bin"  # what push_to_hub(safe_serialization=False) leaves behind
REUSED = "meanwhile its last valid upload is used"


def _stray_pickle(fed: Federation, client: str) -> None:
    fed.store.commit(fed.member(client).repo_id, {STRAY: b"\x80\x04K\x01."},
                     message="push_to_hub(safe_serialization=False)")


def _truncate_weights(fed: Federation, root: Path, client: str, seed: int) -> None:
    """A fresh upload whose safetensors file was cut short (a client-side bypass)."""
    push_fresh(fed, root, client, seed=seed, group=CLIENTS[client])
    repo = fed.member(client).repo_id
    data = fed.store.read_bytes(repo, WEIGHTS_NAME, fed.store.head(repo))
    fed.store.commit(repo, {WEIGHTS_NAME: data[: len(data) // 2]}, message="cut short")


def _clean_push(fed: Federation, root: Path, client: str, seed: int) -> str:
    """The member trains from its personalized adapter and pushes with `fedbip push`."""
    start = pull(fed, client, root / f"pulled-{client}-{seed}").folder
    adapter = write_upload(start, root / f"clean-{client}-{seed}", seed=seed,
                           group=CLIENTS[client])
    (adapter / "fedbip_start.json").write_bytes((start / "fedbip_start.json").read_bytes())
    result = push(fed, client, adapter, n_examples=10)
    assert result.removed == [STRAY]
    repo = fed.member(client).repo_id
    assert STRAY not in fed.store.list_files(repo, result.commit)
    # one commit: the stray went with the upload, so the server never sees a mix
    assert fed.store.history(repo)[0].id == result.commit
    return result.commit


def _unstuck(server: Federation, clients: Federation, root: Path) -> None:
    """The stray-pickle scenario, after a first round."""
    consumed = server.state().client("alice").consumed_commit
    _stray_pickle(clients, "alice")
    push_fresh(clients, root, "bob", seed=20, group=CLIENTS["bob"])  # something new
    refused = run_round(server)
    assert refused["status"] == "completed"
    why = refused["skipped"]["alice"]
    assert "pickle-format weights (adapter_model.bin)" in why
    assert "`fedbip push`" in why and "deletes these in the same commit" in why
    assert REUSED in why
    assert refused["inputs"]["alice"]["commit"] == consumed  # its last valid upload
    status = {m["name"]: m for m in federation_status(server)["members"]}
    assert status["alice"]["refused"] and not status["alice"].get("pending")
    assert "pickle-format" in status["alice"]["refusal"]

    head = _clean_push(clients, root, "alice", seed=21)
    used = run_round(server)
    assert used["status"] == "completed" and "alice" not in used["skipped"]
    assert used["inputs"]["alice"]["commit"] == head
    assert server.state().client("alice").consumed_commit == head
    assert "alice" in used["outputs"]
    status = {m["name"]: m for m in federation_status(server)["members"]}
    assert not status["alice"]["refused"] and status["alice"]["refusal"] is None


def test_fedbip_push_unsticks_a_member_with_a_stray_pickle(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    assert run_round(fed)["status"] == "completed"
    _unstuck(fed, fed, tmp_path)


def test_fedbip_push_unsticks_a_member_over_http(hub, tmp_path, tiny_base):
    from test_recreated_member import _hub_federation

    server, clients = _hub_federation("fedorg/unstuck", tiny_base, tmp_path)
    _unstuck(server, clients, tmp_path)


def test_stale_upload_files_are_weights_and_configs_at_the_root_only():
    files = ["README.md", ".gitattributes", "adapter_config.json", WEIGHTS_NAME,
             "fedbip_upload.json", STRAY, "optimizer.pt", "training_args.bin",
             "model.safetensors", "config.json", "personalized/adapter_model.safetensors",
             "personalized/adapter_config.json", "notes.txt"]
    assert stale_upload_files(files) == sorted(
        [STRAY, "config.json", "model.safetensors", "optimizer.pt", "training_args.bin"])


def status_rows(text: str) -> dict[str, list[str]]:
    """The member table of `fedbip status`: member → its cells, wrapped lines joined."""
    rows: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 6 or cells[0] == "member":
            current = None if not cells else current
            continue
        if cells[0] and cells[0] in CLIENTS:
            current = cells[0]
            rows[current] = cells
        elif current is not None:
            rows[current] = [f"{a} {b}".strip() for a, b in zip(rows[current], cells,
                                                                   strict=True)]
    return rows


def test_a_pickle_and_a_truncated_file_are_refused_alike(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base)
    assert run_round(fed)["status"] == "completed"
    consumed = {n: fed.state().client(n).consumed_commit for n in ("alice", "bob")}
    _stray_pickle(fed, "alice")  # refused from the listing, while planning
    _truncate_weights(fed, tmp_path, "bob", seed=30)  # refused after download
    push_fresh(fed, tmp_path, "carol", seed=31, group=CLIENTS["carol"])

    record = run_round(fed)
    assert record["status"] == "completed"
    assert "pickle-format" in record["skipped"]["alice"]
    assert "points past the end of the file" in record["skipped"]["bob"]
    for name in ("alice", "bob"):  # the same treatment: the last valid upload stands in
        why = record["skipped"][name]
        assert "(fix: " in why and why.endswith("until a corrected one is pushed"), why
        assert REUSED in why
        assert record["inputs"][name]["commit"] == consumed[name]
        assert record["inputs"][name]["fresh"] is False
        assert name in reached(record)  # published, or kept where no fresh update reaches
    assert list(record["inputs"]) == sorted(record["inputs"])  # the plan's order

    report = federation_status(fed)
    shown = {m["name"]: m for m in report["members"]}
    for name in ("alice", "bob"):  # the same display
        assert shown[name]["refused"] is True and shown[name].get("pending") is not True
        assert shown[name]["refusal"] == record["skipped"][name]
    assert not shown["carol"]["refused"]

    table = CliRunner().invoke(app, ["status", str(tmp_path / "fed")],
                               env={"COLUMNS": "100"})
    assert table.exit_code == 0, table.output
    assert max(len(line) for line in table.stdout.splitlines()) <= 100
    rows = status_rows(table.stdout)
    for name in ("alice", "bob"):  # the state, and the whole reason in the table
        assert rows[name][2] == "refused"
        assert "".join(rows[name][5].split()) == "".join(shown[name]["refusal"].split())
    assert rows["carol"][2] == "consumed" and rows["carol"][5] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", rows["carol"][1])  # not cut

    # the fix works for both: a clean `fedbip push` each, and the next round uses them
    _clean_push(fed, tmp_path, "alice", seed=32)
    start = pull(fed, "bob", tmp_path / "pulled-bob").folder
    adapter = write_upload(start, tmp_path / "clean-bob", seed=33, group=CLIENTS["bob"])
    (adapter / "fedbip_start.json").write_bytes((start / "fedbip_start.json").read_bytes())
    assert push(fed, "bob", adapter, n_examples=10).removed == []
    after = run_round(fed)
    for name in ("alice", "bob"):
        assert name not in after["skipped"] and after["inputs"][name]["fresh"] is True
        assert latest_personalized_revision(fed, fed.member(name).repo_id) == \
            after["outputs"][name]["commit"]
