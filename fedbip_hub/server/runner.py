"""The round runner: chains the stages, each taking the previous stage's result and
returning its own (see ``fedbip_hub.server.rounds`` for the list), with the checkpoints
between them and the phase timings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedbip_hub.engine.strategies import Strategy
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.settings import describe_changes
from fedbip_hub.server.collect import collect
from fedbip_hub.server.compute import Computed, compute
from fedbip_hub.server.context import LogFn, ProgressFn, RoundContext, quiet_progress
from fedbip_hub.server.lease import NothingNew, Planned, take_lease
from fedbip_hub.server.publish import Published, publish_all
from fedbip_hub.server.record import complete, round_record
from fedbip_hub.server.resources import is_resource_error, resource_error
from fedbip_hub.server.streaming import DEFAULT_DOWNLOAD_WORKERS


class RoundRunner:
    """Runs one round of a federation.

    Args:
        fed: the federation.
        dry_run: compute everything, write nothing.
        takeover: resume a round whose lease has not expired (its job is known dead).
        progress: wraps iterables with a progress bar.
        log: receives one line per step.
        device: where the maths runs ("cpu", "cuda", or "auto": cuda when available).
        checkpoint: called with each step's name as the round passes it ("planned",
            "downloaded", "computed", "published:<client>", "before-record"); fault-
            injection tests raise from it to simulate a crash there.
        groups: client → true task group, for the "oracle" method (benchmarks only);
            wins over the strategy's own ``groups``.

    Class attributes (set on an instance to change them): ``streaming`` spills merged
    modules to disk and publishes one adapter at a time (False: the in-memory path,
    same results); ``download_workers`` is the download/validate thread pool's size.
    """

    streaming: bool = True
    download_workers: int = DEFAULT_DOWNLOAD_WORKERS

    def __init__(self, fed: Federation, *, dry_run: bool = False, takeover: bool = False,
                 progress: ProgressFn | None = None, log: LogFn | None = None,
                 device: str = "cpu", checkpoint: Callable[[str], None] | None = None,
                 groups: Mapping[str, str] | None = None):
        self.fed = fed
        self.dry_run = dry_run
        self.takeover = takeover
        self.progress = progress or quiet_progress
        self.log = log or (lambda _msg: None)
        self.device = device
        self.checkpoint = checkpoint or (lambda _step: None)
        self.groups = dict(groups) if groups is not None else None

    def context(self) -> RoundContext:
        """A fresh context for one run: the options, the callbacks, the store's traffic
        as it is now, and a new phase clock."""
        return RoundContext(
            fed=self.fed, dry_run=self.dry_run, takeover=self.takeover, device=self.device,
            groups=self.groups, streaming=self.streaming,
            download_workers=self.download_workers, progress=self.progress, log=self.log,
            checkpoint=self.checkpoint, traffic_start=self.fed.store.traffic.snapshot())

    def run(self) -> dict:
        """Run (or resume) a round. Returns its record; status "nothing-new" writes nothing.

        Raises:
            ResourceError: the machine ran out of disk space, a quota or memory; the
                lease (if taken) stays, so ``--takeover`` resumes the round.
        """
        store = self.fed.store
        deadline = store.deadline
        ctx = self.context()
        try:
            return run_stages(ctx)
        except (OSError, MemoryError) as exc:
            if not is_resource_error(exc):
                raise
            raise resource_error(exc, "running a round of "
                                 f"{self.fed.address}") from exc
        finally:
            store.deadline = deadline


def run_stages(ctx: RoundContext) -> dict:
    """plan → collect → compute (similarity, guards, weights, merge) → publish → record."""
    planned = take_lease(ctx)
    if isinstance(planned, NothingNew):
        return {"status": "nothing-new", "round": planned.round,
                "skipped": planned.skipped, "hub": ctx.hub_calls()}
    ctx.clock.lap("plan")
    ctx.checkpoint("planned")
    config = planned.config
    strategy = config.strategy_obj()
    collected = collect(ctx, planned.plan, config)
    ctx.clock.lap("download_validate")
    ctx.checkpoint("downloaded")
    # Changed merge settings re-merge every input (a replay's too, even if they were
    # changed back meanwhile: its plan replaces the round it replays for everyone).
    remerge = bool(planned.settings_changed) or planned.plan.replay_of is not None
    if planned.settings_changed:
        replay = planned.plan.replay_of
        ctx.log(f"Re-merging every member ({describe_changes(planned.settings_changed)})"
                + (f", replaying round {replay}'s updates." if replay else "."))
    computed = compute(ctx, strategy, config, collected, planned.memory, remerge=remerge)
    try:  # a round stopped by an error frees its staging disk
        ctx.clock.lap("compute")
        ctx.checkpoint("computed")
        published = _publish(ctx, planned, strategy, computed, collected.init.config)
        ctx.clock.lap("publish")
        record = round_record(ctx, strategy, computed, published.outputs,
                              settings_changed=planned.settings_changed)
        if not ctx.dry_run:
            ctx.checkpoint("before-record")
            record["timings"] = ctx.clock.timings()  # the committed record keeps them
            # The committed record counts the Hub calls up to its own commit (2-4 more).
            record["hub"] = ctx.hub_calls()
            complete(ctx, config, record, computed, published, collected.internal_errors)
    finally:
        computed.merged.close()
    ctx.clock.lap("record")
    record["timings"] = ctx.clock.timings()
    record["hub"] = ctx.hub_calls()
    record["bytes"] = {"downloaded": ctx.store.traffic.downloaded,
                       "uploaded": ctx.store.traffic.uploaded}
    return record


def _publish(ctx: RoundContext, planned: Planned, strategy: Strategy, computed: Computed,
             template: Any) -> Published:
    """The publish stage; a dry run publishes nothing."""
    if ctx.dry_run:
        return Published({}, {}, None, planned.fed_head)
    return publish_all(ctx, computed.plan, planned.config, strategy, computed, template,
                       resumed=planned.resumed, fed_head=planned.fed_head)


def run_round(fed: Federation, **options: Any) -> dict:
    """Run one round; see RoundRunner for the options."""
    return RoundRunner(fed, **options).run()
