"""``fedbip status``: members, uploads, staleness, the last round and who resembles whom."""

from __future__ import annotations

from typing import Any

from fedbip_hub.client import upload_id
from fedbip_hub.errors import FedbipError
from fedbip_hub.federation import Federation
from fedbip_hub.upload_metadata import UPLOAD_METADATA_NAME, UploadMetadata


def federation_status(fed: Federation) -> dict[str, Any]:
    """A JSON-ready summary of the federation at its current head."""
    head = fed.head()
    config = fed.config(head)
    state = fed.state(head)
    last_record = None
    if state.round:
        last_record = fed.round_record(state.round, head)
    members = []
    membership = fed.membership(head)
    for name, member in membership.members.items():
        client_state = state.clients.get(name)
        entry: dict[str, Any] = {"name": name, "repo_id": member.repo_id,
                                 "joined_at": member.joined_at}
        try:
            repo_head = fed.store.head(member.repo_id)
            raw = (fed.store.read_bytes(member.repo_id, UPLOAD_METADATA_NAME, repo_head)
                   if fed.store.file_exists(member.repo_id, UPLOAD_METADATA_NAME, repo_head)
                   else None)
        except FedbipError as exc:
            entry["error"] = exc.message
            raw = None
        meta: dict = {}
        if raw is not None:
            try:  # the member's repo: anything may have been committed there
                meta = UploadMetadata.parse(raw, label=name).model_dump()
            except FedbipError as exc:
                entry["error"] = exc.message
        if raw is not None:
            uid = upload_id(raw)
            entry["last_upload"] = {"uploaded_at": meta.get("uploaded_at"),
                                    "n_examples": meta.get("n_examples"),
                                    "start_revision": meta.get("start_revision")}
            entry["pending"] = bool(client_state is None or (
                uid not in (client_state.consumed_upload, client_state.refused_upload)))
            entry["refused"] = bool(client_state and uid == client_state.refused_upload)
        history = client_state.personalized_history if client_state else []
        entry["personalized_versions"] = len(history)
        entry["last_round"] = client_state.last_round if client_state else None
        if last_record and name in (last_record.get("inputs") or {}):
            entry["staleness"] = last_record["inputs"][name]["staleness"]
        members.append(entry)
    return {
        "federation": fed.address, "store": fed.store.describe(), "revision": head,
        "config": config.model_dump(mode="json"), "round": state.round,
        "round_in_progress": state.in_progress is not None,
        "members": members, "member_problems": membership.problems,
        "last_round": _round_summary(last_record),
    }


def _round_summary(record: dict | None) -> dict | None:
    if record is None:
        return None
    clients = record.get("clients") or []
    cosine = (record.get("cosine") or {}).get("model")
    nearest = {}
    if cosine:
        for i, name in enumerate(clients):
            peers = sorted(((cosine[i][j], other) for j, other in enumerate(clients) if j != i),
                           reverse=True)
            nearest[name] = [{"peer": p, "cosine": round(c, 4)} for c, p in peers[:2]]
    return {"round": record["round"], "finished_at": record.get("finished_at"),
            "clients": clients, "skipped": record.get("skipped"),
            "outputs": {k: v.get("commit") for k, v in (record.get("outputs") or {}).items()},
            "most_similar_peers": nearest, "model_cosine": cosine}
