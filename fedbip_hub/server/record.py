"""Stage 8, record: the round record, and the round's one closing commit of the record,
the new state (consumed, refused, evicted and retried uploads; each member's history and
seen head), the dashboard card, the heatmap and the similarity memory.
"""

from __future__ import annotations

from collections.abc import Callable

import fedbip_hub
from fedbip_hub.engine.compute import resolve_device
from fedbip_hub.engine.memory import MEMORY_FILE, SimilarityView
from fedbip_hub.engine.strategies import Strategy
from fedbip_hub.errors import ConfigError, ConflictError
from fedbip_hub.federation.client import commit_with_retry
from fedbip_hub.federation.config import (
    STATE_FILE,
    FederationConfig,
    dump_json,
    round_record_path,
    utc_now,
)
from fedbip_hub.federation.settings import describe_changes, fingerprint, merge_settings
from fedbip_hub.server.compute import Computed
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import check_lease
from fedbip_hub.server.publish import Published, heatmap_png
from fedbip_hub.server.scan import started_over
from fedbip_hub.server.weights import staleness_discount


def round_record(ctx: RoundContext, strategy: Strategy, computed: Computed,
                 outputs: dict[str, dict], *,
                 settings_changed: dict[str, list] | None = None) -> dict:
    """The round's record (timings and Hub calls are added as the round ends). Closes
    the staging area: everything is published by now. ``settings_changed`` (setting →
    [before, now]) says why every member was re-merged."""
    plan, inputs, report = computed.plan, computed.inputs, computed.report
    merged, weights = computed.merged.adapters, computed.weights
    similarity = report.to_json() if report is not None else None
    record = {
        "status": "dry-run" if ctx.dry_run else "completed",
        "round": plan.round, "plan_id": plan.plan_id, "job_id": plan.job_id,
        "started_at": plan.started_at, "finished_at": utc_now(),
        "federation_revision": plan.federation_revision,
        "strategy": strategy.model_dump(mode="json"),
        "clients": [p.client for p in inputs],
        "inputs": {p.client: {**p.model_dump(mode="json"),
                              "discount": staleness_discount(p.staleness,
                                                             strategy.staleness_beta)}
                   for p in inputs},
        "cosine": ({"model": similarity["model"], "layers": similarity["layers"]}
                   if similarity else None),
        "norms": similarity["norms"] if similarity else None,
        "weights": weights.to_json() if weights is not None else None,
        "truncation": {p.client: {"max_discarded_energy": m.max_discarded_energy,
                                  "per_module": m.discarded_energy}
                       for p, m in zip(inputs, merged, strict=False) if m is not None},
        "outputs": outputs,
        "skipped": dict(computed.skipped),
        "restarted": dict(plan.restarted),
        "timings": {},
    }
    # Targets no fresh update reaches keep their adapter (see weights.changed_targets).
    record["unchanged"] = {p.client: plan.latest.get(p.client)
                           for p, m in zip(inputs, merged, strict=False) if m is None}
    record["memory_cosine"] = (computed.cosines.to_json()
                               if isinstance(computed.cosines, SimilarityView) else None)
    record["norm_guard"] = computed.norm_guard
    record["sign_guard"] = computed.sign_guard
    record["dropped_from_plan"] = sorted(plan.dropped)
    record["evicted"] = dict(computed.evicted)
    record["duplicates"] = computed.duplicates
    record["compute"] = _compute_record(ctx, strategy, computed)
    # What each target was merged onto, for a later replay of this round (replay.py).
    record["latest"] = dict(plan.latest)
    record["replay"] = ({"round": plan.replay_of, "memory_revision": plan.memory_revision}
                        if plan.replay_of is not None else None)
    record["settings_changed"] = ({"reason": describe_changes(settings_changed),
                                   "changes": settings_changed}
                                  if settings_changed else None)
    return record


def _compute_record(ctx: RoundContext, strategy: Strategy, computed: Computed) -> dict:
    """Device, precision, similarity mode (sketch seed) and staging traffic; closes
    the staging area."""
    staging = computed.merged.staging
    computed.merged.close()
    return {"device": str(resolve_device(ctx.device)),
            "dtype": strategy.compute_dtype, "similarity": computed.similarity_info,
            "streaming": ctx.streaming,
            "staging": staging.stats.to_json() if staging is not None else None}


def complete(ctx: RoundContext, config: FederationConfig, record: dict,
             computed: Computed, published: Published, internal: dict[str, str]) -> None:
    """Commit the record and the new state, and release the lease. ``record`` gains
    the publish failures (``publish_failed``, and their ``skipped`` texts)."""
    from fedbip_hub.federation.modelcard import dashboard_card

    plan, inputs, outputs = computed.plan, computed.inputs, published.outputs
    refused, evicted, failed = computed.refused, computed.evicted, published.failed
    record["publish_failed"] = {name: why for name, (why, _) in failed.items()}
    record["skipped"].update({name: text for name, (_, text) in failed.items()})
    cosines = computed.cosines
    settings = merge_settings(config)
    heatmap = None
    if cosines is not None:
        heatmap = published.heatmap if published.heatmap is not None else heatmap_png(cosines)

    def build(head: str) -> dict:
        state = ctx.fed.state(head)
        check_lease(ctx, plan, state)
        ctx.fed.check_not_rolled_back(head, state)  # never overwrite a round record
        if round_record_path(plan.round) in ctx.fed.files(head):
            raise ConfigError(
                f"{round_record_path(plan.round)} already exists in {ctx.fed.address}: "
                f"state.json was rolled back while round {plan.round} ran; its record "
                "is not overwritten.", hint="Restore state.json from the federation "
                "repo's history (the version of the last 'round N completed' commit).")
        # A client whose publish failed (not in ``outputs``) is still consumed: its
        # update reached the other clients, and consuming it again would apply it
        # twice. Its history does not advance (nothing was published), so its
        # `latest` stays the previous adapter and the next round merges onto that:
        # this round's merge for it is not retried, only later rounds' updates reach it.
        for name in plan.restarted:  # its published history is gone (see scan)
            state.clients[name] = started_over(state.client(name))
        for pinned in inputs:
            client_state = state.client(pinned.client)
            if pinned.fresh:
                client_state.consumed_upload = pinned.upload_id
                client_state.consumed_commit = pinned.commit
                client_state.consumed_start = pinned.start_revision
                client_state.consumed_n_examples = pinned.n_examples
                client_state.internal_error_upload = None
                client_state.internal_error_version = None
                client_state.internal_error_round = None
            output = outputs.get(pinned.client)
            if output and output.get("commit") and (
                    output["commit"] not in client_state.personalized_history):
                client_state.personalized_history.append(output["commit"])
                client_state.last_round = plan.round
        for name, uid in refused.items():
            state.client(name).refused_upload = uid
            state.client(name).refused_reason = record["skipped"].get(name)
        for name in evicted:  # its consumed update leaves the pool; it stays consumed
            state.clients[name] = state.client(name).model_copy(
                update={"consumed_commit": None, "consumed_start": None})
        # Fresh uploads this round consumed or refused; any other (skipped for the
        # store, or an internal error) is looked at again next round.
        concluded = {p.client for p in inputs if p.fresh} | set(refused)
        for name, seen in plan.heads.items():  # where the next round's listing starts
            pinned = plan.inputs.get(name) or plan.dropped.get(name)
            if pinned is not None and pinned.fresh and name not in concluded:
                state.client(name).seen_head = None
                continue
            # Our publish, when made on the head planning saw; else the repo moved
            # in between (a push during the round), and the next round looks again.
            output = outputs.get(name) or {}
            state.client(name).seen_head = (output["commit"] if output.get("commit")
                                            and output.get("parent") == seen else seen)
        for name, uid in internal.items():  # see scan.waits
            client_state = state.client(name)
            client_state.internal_error_upload = uid
            client_state.internal_error_version = fedbip_hub.__version__
            client_state.internal_error_round = plan.round
            client_state.seen_head = None  # looked at again each round, see scan.waits
        state.round = plan.round
        state.in_progress = None
        # Committed with the completed round only: a round stopped before this commit
        # finds the settings still changed when it resumes, and re-merges.
        state.merge_settings = settings
        state.merge_fingerprint = fingerprint(settings)
        files = {STATE_FILE: dump_json(state),
                 round_record_path(plan.round): dump_json(record),
                 "README.md": dashboard_card(config, ctx.fed.members(head), state,
                                             record).encode()}
        if heatmap is not None:
            files["similarity.png"] = heatmap
        if computed.memory is not None:
            files[MEMORY_FILE] = computed.memory.to_bytes()
        return files

    _commit_federation(ctx, build, f"fedbip: round {plan.round} completed",
                       known=published.fed_head)


def _commit_federation(ctx: RoundContext, build: Callable[[str], dict], message: str, *,
                       known: str | None) -> str:
    """``commit_with_retry`` on the federation repo, first tried on the head this job
    last saw holding its lease (``known``), without reading the head again."""
    if known is not None:
        try:
            return ctx.store.commit(ctx.fed.repo_id, build(known), message=message,
                                    parent=known)
        except ConflictError:
            pass  # the repo moved (a member joined, say): read its head and rebuild
    return commit_with_retry(ctx.fed, ctx.fed.repo_id, build, message)
