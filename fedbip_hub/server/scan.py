"""Planning's look at the members: which bring a fresh upload, which stand on their last
consumed one, which start over (their published history is gone), and why the others sit
the round out. Reads only listings and metadata; nothing is downloaded in bulk here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fedbip_hub
from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME, UploadMetadata, upload_staleness
from fedbip_hub.adapters.upload_files import check_upload_listing, upload_id
from fedbip_hub.errors import FedbipError, NotFoundError, StoreError
from fedbip_hub.federation.config import MERGE_RECORD, PERSONALIZED_DIR, FederationState, Member
from fedbip_hub.federation.skip_reasons import one_line, reason, refusal_reason
from fedbip_hub.secrets import redact
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import PinnedInput


@dataclass(frozen=True)
class Scan:
    """Each member's input for the plan, and why the others sit out (see RoundPlan)."""

    inputs: dict[str, PinnedInput]
    skipped: dict[str, str]
    restarted: dict[str, str]
    fallbacks: dict[str, PinnedInput]
    heads: dict[str, str]


def scan_members(ctx: RoundContext, members: dict[str, Member], state: FederationState
                 ) -> Scan:
    """Each member's input. Its head comes from one listing of many repos (see
    ``Store.heads``); a member whose head is still the one the last round left
    (``seen_head``) has nothing new and costs no call, the others are looked at."""
    inputs: dict[str, PinnedInput] = {}
    skipped: dict[str, str] = {}
    restarted: dict[str, str] = {}
    fallbacks: dict[str, PinnedInput] = {}
    heads: dict[str, str] = {}
    listed = ctx.store.heads([m.repo_id for m in members.values()])
    for name, member in ctx.progress(list(members.items()), "Checking members"):
        client_state = state.client(name)
        seen = listed.get(member.repo_id)
        unchanged = (seen is not None and client_state.seen_head is not None
                     and seen.sha == client_state.seen_head)
        if not unchanged:
            try:
                gone = _history_gone(ctx, member, client_state)
            except StoreError as exc:  # not a definite "gone": keep everything, retry later
                skipped[name] = one_line(redact(
                    f"could not check that its latest personalized adapter still exists "
                    f"in {member.repo_id} ({reason(exc)}); skipped this round, its "
                    "history is kept and it is retried next round"))
                continue
            if gone is not None:
                restarted[name] = gone
                ctx.log(f"{name}: {gone}.")
                client_state = started_over(client_state)
        previous = _previous_input(name, member, client_state)
        fresh = None
        if unchanged:
            heads[name] = seen.sha  # type: ignore[union-attr]
        else:
            head = seen.sha if seen is not None else None
            try:
                head = head or ctx.store.head(member.repo_id)
                fresh = _fresh_upload(ctx, name, member, client_state, head)
                heads[name] = head
            except StoreError as exc:  # the store, not the upload: nothing is refused
                skipped[name] = (f"{reason(exc)}; the upload was NOT refused and will be "
                                 "retried next round")
            except FedbipError as exc:  # refused from its listing or metadata
                skipped[name] = refusal_reason(exc, reused=previous is not None)
                if head is not None:
                    heads[name] = head
        if fresh is not None:
            inputs[name] = fresh
            if previous is not None:
                fallbacks[name] = previous
        elif previous is not None:
            inputs[name] = previous
        elif name in restarted and name not in skipped:
            skipped[name] = (f"{restarted[name]}; it has no new upload yet (fix: push one "
                             "trained from the federation's initial adapter)")
        elif name not in skipped:
            skipped[name] = ("its last upload was refused (the round that refused it "
                             "says why); push a corrected one"
                             if client_state.refused_upload else
                             "has not pushed an adapter yet")
    return Scan(inputs, skipped, restarted, fallbacks, heads)


def _history_gone(ctx: RoundContext, member: Member, client_state: Any) -> str | None:
    """Why the client starts over, when its latest personalized revision no longer
    exists in its repo (deleted and recreated, or its history squashed); None when it
    exists or there is none. Only a definite not-found of that revision while the repo
    itself answers counts: any other failure (transient, 403, the repo itself missing)
    raises StoreError and the history is kept."""
    history = client_state.personalized_history
    if not history:
        return None
    try:
        ctx.store.check_revision(member.repo_id, history[-1],  # never from a cache
                                 f"{PERSONALIZED_DIR}/{MERGE_RECORD}")
        return None
    except NotFoundError:
        ctx.store.head(member.repo_id)  # the repo answers: that revision is gone
    return (f"personalized history of {member.repo_id} is gone (repo recreated?): its "
            f"latest personalized revision {history[-1][:12]} no longer exists; "
            "starting again from the federation's initial adapter")


def _fresh_upload(ctx: RoundContext, name: str, member: Member, client_state: Any,
                  head: str) -> PinnedInput | None:
    """The upload at ``head`` when it is one this federation has not seen yet."""
    files = ctx.store.list_files(member.repo_id, head)
    if not check_upload_listing(files, label=name):
        return None
    raw = ctx.store.read_bytes(member.repo_id, UPLOAD_METADATA_NAME, head)
    uid = upload_id(raw)
    if uid in (client_state.consumed_upload, client_state.refused_upload):
        return None
    metadata = UploadMetadata.parse(raw, label=name)
    staleness = upload_staleness(name, metadata, client_state.personalized_history)
    return PinnedInput(client=name, repo_id=member.repo_id, commit=head, upload_id=uid,
                       start_revision=metadata.start_revision,
                       n_examples=metadata.n_examples, staleness=staleness)


def _previous_input(name: str, member: Member, client_state: Any) -> PinnedInput | None:
    if client_state.consumed_commit is None or client_state.consumed_upload is None:
        return None
    history = client_state.personalized_history
    start = client_state.consumed_start
    staleness = len(history) - 1 - history.index(start) if start in history else len(history)
    return PinnedInput(client=name, repo_id=member.repo_id, commit=client_state.consumed_commit,
                       upload_id=client_state.consumed_upload, start_revision=start,
                       n_examples=client_state.consumed_n_examples, staleness=staleness,
                       fresh=False)


def started_over(client_state: Any) -> Any:
    """A client whose published history is gone, as this round sees it: no personalized
    adapter and no previous upload (it lived in the old repo). The consumed and refused
    upload ids are kept, so neither is ever applied again."""
    return client_state.model_copy(update={"personalized_history": [],
                                           "consumed_commit": None, "consumed_start": None})


def waits(client_state: Any, pinned: PinnedInput) -> bool:
    """Whether a fresh upload is one this server version already failed on with an
    internal error. It is then no news by itself: it joins the next round that has other
    news (or runs on another fedbip version), so a bug that hits one upload records one
    round, not an empty round every run."""
    return (client_state.internal_error_upload == pinned.upload_id
            and client_state.internal_error_version == fedbip_hub.__version__)


def waiting_reason(round_number: int | None) -> str:
    where = f"round {round_number}" if round_number else "an earlier round"
    return (f"its upload hit an internal error on the server in {where} (that round's "
            "record says which); it was NOT refused and is retried with the next round "
            "that has other news, or after the server is upgraded (fix: nothing to change "
            "on the client's side)")
