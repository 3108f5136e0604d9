"""``fedbip status``: members, uploads, staleness, the last round and who resembles whom."""

from __future__ import annotations

from typing import Any

from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME, UploadMetadata, upload_staleness
from fedbip_hub.adapters.upload_files import check_upload_listing, upload_id
from fedbip_hub.errors import FedbipError, StoreError
from fedbip_hub.federation.config import ClientState
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.settings import describe_changes, stated_changes
from fedbip_hub.federation.skip_reasons import describe_guards, refusal_reason


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
        raw, meta, refusal = _upload(fed, name, member.repo_id, client_state, entry)
        if raw is not None:
            uid = upload_id(raw)
            entry["last_upload"] = {"uploaded_at": meta.get("uploaded_at"),
                                    "n_examples": meta.get("n_examples"),
                                    "start_revision": meta.get("start_revision")}
            if refusal is None and client_state and uid == client_state.refused_upload:
                refusal = client_state.refused_reason or (
                    "its last upload was refused (the round that refused it says why); "
                    "push a corrected one")
            entry["pending"] = bool(refusal is None and (client_state is None or (
                uid not in (client_state.consumed_upload, client_state.refused_upload))))
        entry["refused"] = refusal is not None
        entry["refusal"] = refusal
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
        "settings_pending": _settings_pending(config, state),
    }


def _settings_pending(config: Any, state: Any) -> str | None:
    """The merge settings the config changes since the last completed round (the next
    round re-merges every member), from the config and state already read; None:
    unchanged, or none recorded yet (see ``settings.stated_changes``)."""
    changes = stated_changes(config, state.merge_settings)
    return describe_changes(changes) if changes else None


def _upload(fed: Federation, name: str, repo_id: str, client_state: ClientState | None,
            entry: dict[str, Any]) -> tuple[bytes | None, dict, str | None]:
    """The member's upload metadata at its head, and why the round refuses the upload
    there, by the same checks the round plans with (its listing, metadata and start);
    a refusal after download is the state's (``refused_upload``), read by the caller."""

    try:
        head = fed.store.head(repo_id)
        files = fed.store.list_files(repo_id, head)
        raw = (fed.store.read_bytes(repo_id, UPLOAD_METADATA_NAME, head)
               if UPLOAD_METADATA_NAME in files else None)
    except StoreError as exc:
        entry["error"] = exc.message
        return None, {}, None
    meta: dict = {}
    try:  # the member's repo: anything may have been committed there
        check_upload_listing(files, label=name)
        if raw is not None:
            metadata = UploadMetadata.parse(raw, label=name)
            meta = metadata.model_dump()
            upload_staleness(name, metadata,
                             client_state.personalized_history if client_state else [])
    except FedbipError as exc:
        return raw, meta, refusal_reason(exc, reused=bool(client_state and
                                                          client_state.consumed_commit))
    return raw, meta, None


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
            "unchanged": record.get("unchanged") or {},
            "hub_calls": record.get("hub"),  # API calls and downloads, up to its record
            # why it re-merged every member, and the round it replayed (None: neither)
            "settings_changed": (record.get("settings_changed") or {}).get("reason"),
            "replay_of": (record.get("replay") or {}).get("round"),
            "most_similar_peers": nearest, "model_cosine": cosine,
            "guards": describe_guards(record)}
