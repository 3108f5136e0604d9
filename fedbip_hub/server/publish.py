"""Stage 7, publish: each changed target's personalized adapter, with its merge record,
model card and heatmap, in one commit to its member's repo.

Exactly one publish per plan and member, whatever runs at the same time: this job checks
that it still holds the lease before each write, and commits on the head it checked for
this plan's adapter. A store error on one repo skips that member only.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbip_hub.engine.similarity import CosineSource
from fedbip_hub.engine.strategies import Strategy, WeightTable
from fedbip_hub.errors import ConflictError, StoreError, VisibilityError
from fedbip_hub.federation.client import PUBLISH_TITLE
from fedbip_hub.federation.config import MERGE_RECORD, PERSONALIZED_DIR, FederationConfig, dump_json
from fedbip_hub.federation.skip_reasons import one_line, publish_skip_reason, reason
from fedbip_hub.safe_json import KIB, JsonLimitError, loads_bounded
from fedbip_hub.secrets import redact
from fedbip_hub.server.compute import Computed
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import RoundPlan, check_lease
from fedbip_hub.stores import RepoHead

MAX_MERGE_RECORD_BYTES = 16 * 1024 * KIB
PUBLISH_TRIES = 8


@dataclass(frozen=True)
class Published:
    """client → its output (repo, commit, parent; "resumed" when an earlier job of this
    plan published it), client → (reason, skipped text) for each publish that failed, the
    heatmap PNG (rendered once, for the cards and the dashboard), and the federation head
    this job last saw holding its lease."""

    outputs: dict[str, dict]
    failed: dict[str, tuple[str, str]]
    heatmap: bytes | None
    fed_head: str | None


def heatmap_png(cosines: CosineSource) -> bytes:
    from fedbip_hub.federation import modelcard

    return modelcard.heatmap_png(cosines)


class _LeaseWatch:
    """This stage's lease checks, remembering the federation head each one read."""

    def __init__(self, ctx: RoundContext, plan: RoundPlan, head: str | None):
        self.ctx, self.plan, self.head = ctx, plan, head

    def check(self) -> None:
        self.head = check_lease(self.ctx, self.plan)


def publish_all(ctx: RoundContext, plan: RoundPlan, config: FederationConfig,
                strategy: Strategy, computed: Computed, template: Any, *, resumed: bool,
                fed_head: str | None) -> Published:
    """Publish every changed target's adapter, one commit per member repo (a target
    the merge leaves as it is, None in ``computed.merged``, is not republished). The
    targets' heads and visibility come from one listing (``Store.heads``). A store error
    on one repo (403, deleted repo, retries exhausted) skips that member only: it is
    returned in ``failed`` for the record, and is not "already published" if this round
    is resumed, so a resumed round retries it."""
    failed: dict[str, tuple[str, str]] = {}
    if computed.cosines is None or computed.weights is None:
        return Published({}, failed, None, fed_head)
    heatmap = heatmap_png(computed.cosines)
    lease = _LeaseWatch(ctx, plan, fed_head)
    outputs: dict[str, dict] = {}
    names, inputs, merged = computed.names, computed.inputs, computed.merged.adapters
    targets = [k for k, adapter in enumerate(merged) if adapter is not None]
    listed = ctx.store.heads([inputs[k].repo_id for k in targets]) if targets else {}
    for index in ctx.progress(targets, "Publishing"):
        name, pinned = names[index], inputs[index]
        try:
            output = _publish_one(ctx, plan, config, strategy, computed, index, heatmap,
                                  template, listed.get(pinned.repo_id), resumed, lease)
        except StoreError as exc:  # this member's repo only: the others still publish
            why = one_line(redact(reason(exc)))
            failed[name] = (why, publish_skip_reason(exc, pinned.repo_id, pinned.fresh))
            ctx.log(f"Could not publish {name}'s personalized adapter to "
                    f"{pinned.repo_id}: {why}; continuing with the others.")
            continue
        outputs[name] = output
        if not output.get("resumed"):
            ctx.checkpoint(f"published:{name}")
    return Published(outputs, failed, heatmap, lease.head)


def _publish_one(ctx: RoundContext, plan: RoundPlan, config: FederationConfig,
                 strategy: Strategy, computed: Computed, index: int, heatmap: bytes,
                 template: Any, listed: RepoHead | None, resumed: bool,
                 lease: _LeaseWatch) -> dict:
    """Publish target ``index``'s adapter in one commit (or find it already published
    by this plan); store failures propagate to ``publish_all``.

    ``listed`` is the repo's head and visibility from this round's listing. A plan
    this job made itself cannot have published here yet (another job that took it
    over fails the lease check first, and any publish after the listing moves the
    head, so ours gets a conflict), so it commits on that head straight away; a
    resumed plan checks the head for its own adapter first."""
    from fedbip_hub.federation.modelcard import personalized_card

    names, inputs = computed.names, computed.inputs
    weights: WeightTable = computed.weights  # type: ignore[assignment]
    name, pinned = names[index], inputs[index]
    head = listed.sha if listed is not None else ctx.store.head(pinned.repo_id)
    if resumed or listed is None:
        done = already_published(ctx, plan, pinned.repo_id, head)
        if done is not None:
            return done
    private = listed.private if listed is not None else None
    if private is None and not config.allow_public_members:
        private = ctx.store.is_private(pinned.repo_id)
    if not config.allow_public_members and not private:
        raise VisibilityError(
            f"{pinned.repo_id} is public, and its personalized adapter mixes other "
            "members' updates", hint=f"the member makes {pinned.repo_id} private again "
            "(or the federation sets allow_public_members in federation.json)")
    adapter = computed.merged.adapters[index]
    assert adapter is not None  # publish_all passes changed targets only
    merge_record = {
        "plan_id": plan.plan_id, "round": plan.round, "client": name,
        "strategy": strategy.model_dump(mode="json"),
        "weights": {key: dict(zip(names, [round(float(x), 6) for x in m[index]],
                                  strict=True))
                    for key, m in weights.matrices.items()},
        "inputs": {p.client: {"repo_id": p.repo_id, "commit": p.commit,
                              "fresh": p.fresh, "staleness": p.staleness}
                   for p in inputs},
        "previous_revision": plan.latest.get(name),
        "max_discarded_energy": adapter.max_discarded_energy,
    }
    card = personalized_card(config, name, plan.round, names, computed.cosines, weights,
                             index, inputs, adapter)
    with tempfile.TemporaryDirectory() as tmp:
        folder = adapter.save(Path(tmp) / "out", template)
        files = {f"{PERSONALIZED_DIR}/{p.name}": p.read_bytes()
                 for p in folder.iterdir() if p.is_file()}
    files[f"{PERSONALIZED_DIR}/{MERGE_RECORD}"] = dump_json(merge_record)
    files[f"{PERSONALIZED_DIR}/README.md"] = card.encode()
    files[f"{PERSONALIZED_DIR}/similarity.png"] = heatmap
    # Exactly one publish per plan and member, whatever runs concurrently: the commit
    # is made on the head that was checked, and a lost race is checked again.
    for _ in range(PUBLISH_TRIES):
        lease.check()
        try:
            commit = ctx.store.commit(pinned.repo_id, files, parent=head,
                                      message=f"{PUBLISH_TITLE} (round {plan.round})")
        except ConflictError:
            head = ctx.store.head(pinned.repo_id)
            done = already_published(ctx, plan, pinned.repo_id, head)
            if done is not None:
                return done
            continue
        return {"repo_id": pinned.repo_id, "commit": commit, "parent": head,
                "max_discarded_energy": adapter.max_discarded_energy}
    raise ConflictError(f"{pinned.repo_id} kept moving while publishing; gave up after "
                        f"{PUBLISH_TRIES} tries.", hint="A later run publishes it.")


def already_published(ctx: RoundContext, plan: RoundPlan, repo_id: str, head: str
                      ) -> dict | None:
    """The output this plan already published to ``repo_id`` at ``head`` (an earlier job
    of the same plan), else None."""
    path = f"{PERSONALIZED_DIR}/{MERGE_RECORD}"
    if not ctx.store.file_exists(repo_id, path, head):
        return None
    try:  # the member's repo: anything may have been committed there
        record = loads_bounded(ctx.store.read_bytes(repo_id, path, head),
                               max_bytes=MAX_MERGE_RECORD_BYTES)
    except JsonLimitError:
        return None
    if not isinstance(record, dict) or record.get("plan_id") != plan.plan_id:
        return None
    from fedbip_hub.federation.client import latest_personalized_revision

    energy = record.get("max_discarded_energy", 0.0)
    return {"repo_id": repo_id, "commit": latest_personalized_revision(ctx.fed, repo_id),
            "max_discarded_energy": float(energy) if isinstance(energy, int | float)
            else 0.0, "resumed": True}
