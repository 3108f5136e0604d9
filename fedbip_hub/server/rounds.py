"""One asynchronous server round (ALGORITHM.md §5): plan → collect → validate → task
vectors → similarity → weights → merge → publish → record.

Crash safety: the plan (every input pinned to a commit) is committed into ``state.json``
as a lease before any output is written. Each published adapter carries the plan id in
``personalized/fedbip_merge.json``, so a re-run resumes the same plan, skips clients it
already published, and never applies an update twice. The round ends with one commit of
the record and the new state.

Exclusivity: taking the lease (a new plan, or a takeover of a dead job's plan) is a commit
with the head it read as parent, so of concurrent jobs exactly one holds it; a job checks
that it still holds it before each write, and publishes to a member repo on the head it
checked for this plan's adapter, so each member gets one publish per plan whatever runs
at the same time.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError

import fedbip_hub
from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.lora import WEIGHTS_NAME, LoraAdapter
from fedbip_hub.adapters.metadata import (
    UPLOAD_METADATA_NAME,
    UploadMetadata,
    describe_error,
    upload_staleness,
)
from fedbip_hub.adapters.upload_files import UPLOAD_FILES, check_upload_listing, upload_id
from fedbip_hub.engine.compute import resolve_device, resolve_dtype
from fedbip_hub.engine.memory import (
    MEMORY_FILE,
    SimilarityMemory,
    SimilarityView,
    storage_granularity,
)
from fedbip_hub.engine.merge import MergedAdapter, MergePlan, personalize
from fedbip_hub.engine.robust import (
    DuplicateGroups,
    bound_weights,
    describe_duplicates,
    find_duplicates,
    norm_guard,
    sign_guard,
)
from fedbip_hub.engine.similarity import CosineSource, SimilarityReport
from fedbip_hub.engine.sketch import round_similarity
from fedbip_hub.engine.strategies import Strategy, WeightTable, compute_weights, oracle_groups
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.errors import (
    ConfigError,
    ConflictError,
    FedbipError,
    NotFoundError,
    RoundInProgressError,
    StoreError,
    VisibilityError,
)
from fedbip_hub.federation.client import PUBLISH_TITLE, commit_with_retry
from fedbip_hub.federation.repo import (
    INIT_DIR,
    MERGE_RECORD,
    PERSONALIZED_DIR,
    STATE_FILE,
    Federation,
    FederationConfig,
    FederationState,
    Member,
    dump_json,
    round_record_path,
    utc_now,
)
from fedbip_hub.federation.skip_reasons import (
    InternalError,
    describe,
    exception_text,
    internal_reason,
    one_line,
    public_paths,
    publish_skip_reason,
    reason,
    refusal_reason,
)
from fedbip_hub.safe_json import KIB, JsonLimitError, loads_bounded
from fedbip_hub.secrets import redact
from fedbip_hub.server.resources import is_resource_error, resource_error
from fedbip_hub.server.streaming import (
    DEFAULT_DOWNLOAD_WORKERS,
    OrderedMap,
    StagingArea,
    resident_peers,
)
from fedbip_hub.server.validation import check_task_vector, validate_upload
from fedbip_hub.stores import RepoHead

# What the server reads of a personalized folder (a member may commit anything beside).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
MAX_MERGE_RECORD_BYTES = 16 * 1024 * KIB
ProgressFn = Callable[[Iterable[Any], str], Iterable[Any]]
LogFn = Callable[[str], None]
_PUBLISH_TRIES = 8


class PinnedInput(BaseModel):
    """One participant's task vector, pinned: upload commit and the start it came from."""

    client: str
    repo_id: str
    commit: str
    upload_id: str
    start_revision: str | None = None
    n_examples: int = 1
    staleness: int = 0
    fresh: bool = True
    files: dict[str, str] = Field(default_factory=dict)


class RoundPlan(BaseModel):
    """Everything a round reads, pinned before it writes anything."""

    plan_id: str
    round: int
    job_id: str
    started_at: str
    lease_until: str
    federation_revision: str
    inputs: dict[str, PinnedInput]
    latest: dict[str, str | None]
    skipped: dict[str, str] = Field(default_factory=dict)
    # client → why it starts over: its latest personalized revision is gone from its repo
    # (recreated, or its history squashed); its ``latest`` is None (the init) and its
    # history is reset when the round completes.
    restarted: dict[str, str] = Field(default_factory=dict)
    # client → its input, taken out of ``inputs`` because it made this round's maths fail
    # (its reason is in ``skipped``); recorded in the lease, so a resumed round never
    # replays it. A fresh one is refused when the round completes, a stale one evicted.
    dropped: dict[str, PinnedInput] = Field(default_factory=dict)
    # client → its last valid (consumed) upload, pinned beside a fresh one: if the gate
    # refuses the fresh one, this stands in for it, as for an upload refused while
    # planning (every refusal is treated alike; see skip_reasons.refusal_reason).
    fallbacks: dict[str, PinnedInput] = Field(default_factory=dict)
    # client → its repo's head as planning saw it, for each member planning looked at to
    # the end (no store error); the completed round records it as the client's
    # ``seen_head``, so the next round skips the member while its head stays there.
    heads: dict[str, str] = Field(default_factory=dict)

    def lease_expired(self) -> bool:
        return datetime.fromisoformat(self.lease_until) < datetime.now(timezone.utc)


def read_lease(raw: Any, address: str) -> RoundPlan:
    """state.json's ``in_progress`` as a RoundPlan; ConfigError (with the fix) when it is
    not one."""
    try:
        return RoundPlan.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"the round lease (in_progress in state.json) of {address} is invalid: "
            f"{describe_error(exc)}.",
            hint="Restore state.json from the federation repo's history: the version the "
            "last 'fedbip: round N started' (or 'resumed') commit wrote, whose round is "
            "then resumed; never edit the lease by hand.") from exc


def _round_deadline(config: FederationConfig, current: float | None) -> float:
    """When a round stops waiting out rate limits: before its lease runs out (a job's
    --timeout is kept under the lease), leaving a tenth of it to finish."""
    deadline = time.monotonic() + 0.9 * 60.0 * config.lease_minutes
    return deadline if current is None else min(deadline, current)


def staleness_discount(staleness: int, beta: float) -> float:
    """σ(a) = (1 + a)^(−β), FedAsync's polynomial discount."""
    return float((1.0 + staleness) ** (-beta))


def _quiet_progress(items: Iterable[Any], _description: str) -> Iterable[Any]:
    return items


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
    _similarity_info: dict | None = None
    _staging: StagingArea | None = None
    # client → (reason, skipped text): this round's publish failures, for _complete.
    _publish_failed: dict[str, tuple[str, str]] | None = None
    _memory_read: tuple[tuple[str, str], SimilarityMemory] | None = None
    # client → why its consumed update left the pool this round, for _complete.
    _evicted: dict[str, str] | None = None
    # client → upload id: fresh uploads this round skipped for an internal error.
    _internal_errors: dict[str, str] | None = None
    _resumed: bool = False  # this job resumes a plan another job made (it may have published)
    _fed_head: str | None = None  # the federation head this job last saw holding its lease

    def __init__(self, fed: Federation, *, dry_run: bool = False, takeover: bool = False,
                 progress: ProgressFn | None = None, log: LogFn | None = None,
                 device: str = "cpu", checkpoint: Callable[[str], None] | None = None,
                 groups: Mapping[str, str] | None = None):
        self.fed = fed
        self.store = fed.store
        self.dry_run = dry_run
        self.takeover = takeover
        self.progress = progress or _quiet_progress
        self.log = log or (lambda _msg: None)
        self.device = device
        self.checkpoint = checkpoint or (lambda _step: None)
        self.groups = dict(groups) if groups is not None else None
        self.timings: dict[str, float] = {}
        self._traffic_start = self.store.traffic.snapshot()
        self._clock = self._started = time.perf_counter()
        self._last_skips: dict[str, str] = {}
        self._latest_folders: dict[str, Path] = {}  # client → latest adapter, this round
        self._heatmap_for: CosineSource | None = None
        self._heatmap_png = b""

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = round(self.timings.get(phase, 0.0) + now - self._clock, 4)
        self._clock = now

    def _timings(self) -> dict[str, float]:
        """The phases measured so far, and the total since ``run`` began."""
        return {**self.timings, "total": round(time.perf_counter() - self._started, 4)}

    # -- planning ------------------------------------------------------------------------
    def run(self) -> dict:
        """Run (or resume) a round. Returns its record; status "nothing-new" writes nothing.

        Raises:
            ResourceError: the machine ran out of disk space, a quota or memory; the
                lease (if taken) stays, so ``--takeover`` resumes the round.
        """
        deadline = self.store.deadline
        self._traffic_start = self.store.traffic.snapshot()
        try:
            return self._run()
        except (OSError, MemoryError) as exc:
            if not is_resource_error(exc):
                raise
            raise resource_error(exc, "running a round of "
                                 f"{self.fed.address}") from exc
        finally:
            self.store.deadline = deadline
            if self._staging is not None:  # a round stopped by an error: free its disk
                self._staging.close()
                self._staging = None

    def hub_calls(self) -> dict[str, int]:
        """The API calls and file downloads this round has made so far (the Hub's rate
        limits count these; a local store makes none)."""
        now, start = self.store.traffic.snapshot(), self._traffic_start
        return {key: now[key] - start.get(key, 0) for key in ("api_calls", "downloads")}

    def _run(self) -> dict:
        self._started = time.perf_counter()
        resolve_device(self.device)  # a bad --device fails before any lease is taken
        first_holder: str | None = None  # the lease holder this job first found
        for attempt in range(5):
            head = self.fed.head()
            config = self.fed.config(head)
            state = self.fed.state(head)
            if attempt == 0:  # 429s are waited out only while the lease would still hold
                self.store.deadline = _round_deadline(config, self.store.deadline)
            if attempt == 0 and state.in_progress is not None:
                first_holder = str(state.in_progress.get("job_id"))
            plan = self._plan_or_resume(head, config, state, first_holder=first_holder)
            if plan is None:
                self.log("Nothing new since the last round: no commit.")
                return {"status": "nothing-new", "round": state.round,
                        "skipped": self._last_skips, "hub": self.hub_calls()}
            self._preflight(config, plan)
            if self.dry_run:
                break
            # Planning a round and resuming one both commit the lease with the head as
            # parent: of concurrent jobs (takeovers included) exactly one wins it.
            verb = "started" if state.in_progress is None else "resumed"
            state.in_progress = plan.model_dump(mode="json")
            try:
                self._fed_head = self.store.commit(
                    self.fed.repo_id, {STATE_FILE: dump_json(state)},
                    message=f"fedbip: round {plan.round} {verb}", parent=head)
                break
            except ConflictError:
                self.log("The federation repo moved while planning; planning again.")
        else:
            raise StoreError("the federation repo kept moving while planning the round.",
                             hint="Retry in a moment.")
        self._lap("plan")
        self.checkpoint("planned")
        return self._execute(plan, config)

    def _preflight(self, config: FederationConfig, plan: RoundPlan) -> None:
        """Every check that can fail on the federation's own configuration or files (the
        strategy, the oracle's groups, the initial adapter, the similarity memory), run
        before the lease is taken: a round never takes a lease it is bound to abandon."""
        strategy = config.strategy_obj()
        if strategy.spec.weighting == "oracle":
            oracle_groups(strategy, list(plan.inputs), self.groups)
        LoraAdapter(self.store.fetch_folder(self.fed.repo_id, plan.federation_revision,
                                            INIT_DIR), label="federation init")
        if strategy.similarity_memory != 0:
            self._stored_memory(plan, strategy)

    def _plan_or_resume(self, head: str, config: FederationConfig, state: FederationState,
                        *, first_holder: str | None = None) -> RoundPlan | None:
        self.fed.check_not_rolled_back(head, state)
        if state.in_progress is not None:
            plan = read_lease(state.in_progress, self.fed.address)
            # --takeover vouches only for the job it found: a lease that another job has
            # claimed since (a concurrent takeover, or a new round) is that job's.
            takeover = self.takeover and plan.job_id == first_holder
            if not (plan.lease_expired() or takeover):
                raise RoundInProgressError(
                    f"round {plan.round} is in progress (job {plan.job_id}, started "
                    f"{plan.started_at}, lease until {plan.lease_until}).",
                    hint="Wait for it to finish. If that job died, rerun with --takeover "
                    "(or wait for the lease to expire) to resume the same round.")
            self.log(f"Resuming round {plan.round} (plan {plan.plan_id[:8]}, taking the "
                     f"lease over from job {plan.job_id}).")
            self._resumed = True
            now = datetime.now(timezone.utc)
            return plan.model_copy(update={
                "job_id": uuid.uuid4().hex[:12],
                "lease_until": (now + timedelta(minutes=config.lease_minutes)).isoformat(
                    timespec="seconds")})
        membership = self.fed.membership(head)
        inputs, skipped, restarted, fallbacks, heads = self._collect(membership.members,
                                                                     state)
        skipped.update(membership.problems)  # broken members/*.json: file → why
        self._last_skips = skipped
        waiting = {name for name, pinned in inputs.items()
                   if pinned.fresh and _waits(state.client(name), pinned)}
        if not any(p.fresh for name, p in inputs.items() if name not in waiting):
            for name in waiting:
                skipped[name] = waiting_reason(state.client(name).internal_error_round)
            return None
        now = datetime.now(timezone.utc)
        latest = {name: None if name in restarted else
                  (state.client(name).personalized_history or [None])[-1]
                  for name in inputs}
        return RoundPlan(
            plan_id=uuid.uuid4().hex, round=state.round + 1, job_id=uuid.uuid4().hex[:12],
            started_at=now.isoformat(timespec="seconds"),
            lease_until=(now + timedelta(minutes=config.lease_minutes)).isoformat(
                timespec="seconds"),
            federation_revision=head, inputs=inputs, latest=latest, skipped=skipped,
            restarted=restarted, fallbacks=fallbacks, heads=heads)

    def _collect(self, members: dict[str, Member], state: FederationState
                 ) -> tuple[dict[str, PinnedInput], dict[str, str], dict[str, str],
                            dict[str, PinnedInput], dict[str, str]]:
        """Each member's input. Its head comes from one listing of many repos (see
        ``Store.heads``); a member whose head is still the one the last round left
        (``seen_head``) has nothing new and costs no call, the others are looked at."""
        inputs: dict[str, PinnedInput] = {}
        skipped: dict[str, str] = {}
        restarted: dict[str, str] = {}
        fallbacks: dict[str, PinnedInput] = {}
        heads: dict[str, str] = {}
        listed = self.store.heads([m.repo_id for m in members.values()])
        for name, member in self.progress(list(members.items()), "Checking members"):
            client_state = state.client(name)
            seen = listed.get(member.repo_id)
            unchanged = (seen is not None and client_state.seen_head is not None
                         and seen.sha == client_state.seen_head)
            if not unchanged:
                try:
                    gone = self._history_gone(member, client_state)
                except StoreError as exc:  # not a definite "gone": keep everything, retry later
                    skipped[name] = one_line(redact(
                        f"could not check that its latest personalized adapter still exists "
                        f"in {member.repo_id} ({reason(exc)}); skipped this round, its "
                        "history is kept and it is retried next round"))
                    continue
                if gone is not None:
                    restarted[name] = gone
                    self.log(f"{name}: {gone}.")
                    client_state = _started_over(client_state)
            previous = _previous_input(name, member, client_state)
            fresh = None
            if unchanged:
                heads[name] = seen.sha  # type: ignore[union-attr]
            else:
                head = seen.sha if seen is not None else None
                try:
                    head = head or self.store.head(member.repo_id)
                    fresh = self._fresh_upload(name, member, client_state, head)
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
        return inputs, skipped, restarted, fallbacks, heads

    def _history_gone(self, member: Member, client_state: Any) -> str | None:
        """Why the client starts over, when its latest personalized revision no longer
        exists in its repo (deleted and recreated, or its history squashed); None when it
        exists or there is none. Only a definite not-found of that revision while the repo
        itself answers counts: any other failure (transient, 403, the repo itself missing)
        raises StoreError and the history is kept."""
        history = client_state.personalized_history
        if not history:
            return None
        try:
            self.store.check_revision(member.repo_id, history[-1],  # never from a cache
                                      f"{PERSONALIZED_DIR}/{MERGE_RECORD}")
            return None
        except NotFoundError:
            self.store.head(member.repo_id)  # the repo answers: that revision is gone
        return (f"personalized history of {member.repo_id} is gone (repo recreated?): its "
                f"latest personalized revision {history[-1][:12]} no longer exists; "
                "starting again from the federation's initial adapter")

    def _fresh_upload(self, name: str, member: Member, client_state: Any, head: str
                      ) -> PinnedInput | None:
        """The upload at ``head`` when it is one this federation has not seen yet."""
        files = self.store.list_files(member.repo_id, head)
        if not check_upload_listing(files, label=name):
            return None
        raw = self.store.read_bytes(member.repo_id, UPLOAD_METADATA_NAME, head)
        uid = upload_id(raw)
        if uid in (client_state.consumed_upload, client_state.refused_upload):
            return None
        metadata = UploadMetadata.parse(raw, label=name)
        staleness = upload_staleness(name, metadata, client_state.personalized_history)
        return PinnedInput(client=name, repo_id=member.repo_id, commit=head, upload_id=uid,
                           start_revision=metadata.start_revision,
                           n_examples=metadata.n_examples, staleness=staleness)

    # -- execution -----------------------------------------------------------------------
    def _execute(self, plan: RoundPlan, config: FederationConfig) -> dict:
        strategy = config.strategy_obj()
        skipped = dict(plan.skipped)
        init_dir = self.store.fetch_folder(self.fed.repo_id, plan.federation_revision,
                                           INIT_DIR)
        init = LoraAdapter(init_dir, label="federation init")
        vectors: list[TaskVector] = []
        inputs: list[PinnedInput] = []
        refused = {n: p.upload_id for n, p in plan.dropped.items() if p.fresh}
        # client → why its consumed (stale) update leaves the pool; see _complete
        evicted = self._evicted = {n: skipped[n] for n, p in plan.dropped.items()
                                   if not p.fresh}
        init_name = f"{self.fed.repo_id}@{plan.federation_revision[:12]}/{INIT_DIR}"
        self._latest_folders = {}
        fetched = OrderedMap(lambda p: self._read_input(plan, p, config, init, init_name),
                             list(plan.inputs.values()), catch=(Exception,),
                             workers=self.download_workers if self.streaming else 1)
        self._internal_errors = {}
        gate_refused: dict[str, FedbipError] = {}
        for pinned, vector, exc in self.progress(fetched, "Downloading and validating"):
            if exc is None:
                vectors.append(vector)
                inputs.append(pinned)
            elif is_resource_error(exc):  # the server's disk, not the upload: stop
                raise resource_error(exc, f"reading {pinned.client}'s upload") from exc
            elif isinstance(exc, StoreError):  # the Hub, not the upload: retry next round
                skipped[pinned.client] = (f"{reason(exc)}; the upload was NOT refused and "
                                          "will be retried next round")
            elif isinstance(exc, FedbipError):
                skipped[pinned.client] = reason(exc)
                if pinned.fresh:
                    skipped[pinned.client] = refusal_reason(exc, reused=False)
                    refused[pinned.client] = pinned.upload_id
                    gate_refused[pinned.client] = exc
                else:  # consumed earlier, refused now (its numbers, or a tighter gate)
                    skipped[pinned.client] = evicted[pinned.client] = _evicted_reason(exc)
            else:  # a bug or an unexpected failure on our side: skip, neither refuse nor consume
                skipped[pinned.client] = internal_reason(exc)
                if pinned.fresh:
                    self._internal_errors[pinned.client] = pinned.upload_id
                self.log(f"Internal error reading {pinned.client}'s upload "
                         f"({exception_text(exc)}); skipped, retried with the next round "
                         "that has other news.")
                if os.environ.get("FEDBIP_DEBUG"):  # the CLI's convention for tracebacks
                    self.log(redact("".join(traceback.format_exception(exc))))
        self._stand_in(plan, config, init, init_name, gate_refused, vectors, inputs, skipped)
        self._lap("download_validate")
        self.checkpoint("downloaded")
        while True:  # until the maths passes; each pass drops at least one client
            attempt_skipped, attempt_refused = dict(skipped), dict(refused)
            try:
                (report, weights, similarity, memory, merged, guard, signs, duplicates,
                 vectors_used, inputs_used) = self._compute(
                    plan, strategy, config, init, vectors, inputs, attempt_skipped,
                    attempt_refused)
                break
            except Exception as exc:
                self._close_staging()
                drops = self._culprits(exc, plan, strategy, config, init, vectors, inputs)
                if not drops:
                    raise
                self._drop_from_plan(plan, drops)
                for name, why in drops.items():
                    skipped[name] = why
                    if plan.dropped[name].fresh:
                        refused[name] = plan.dropped[name].upload_id
                    else:
                        evicted[name] = why
                keep = [k for k, p in enumerate(inputs) if p.client not in drops]
                vectors, inputs = [vectors[k] for k in keep], [inputs[k] for k in keep]
        skipped, refused = attempt_skipped, attempt_refused
        vectors, inputs = vectors_used, inputs_used
        names = [p.client for p in inputs]
        self._lap("compute")
        self.checkpoint("computed")
        outputs = {} if self.dry_run else self._publish_all(plan, config, strategy, names,
                                                            inputs, similarity, weights,
                                                            merged, init.config)
        self._lap("publish")
        record = self._record(plan, strategy, inputs, report, weights, merged, outputs,
                              skipped)
        # Targets no fresh update reaches keep their adapter (see changed_targets).
        record["unchanged"] = {p.client: plan.latest.get(p.client)
                               for p, m in zip(inputs, merged, strict=False) if m is None}
        record["memory_cosine"] = (similarity.to_json()
                                   if isinstance(similarity, SimilarityView) else None)
        record["norm_guard"] = guard
        record["sign_guard"] = signs
        record["dropped_from_plan"] = sorted(plan.dropped)
        record["evicted"] = dict(evicted)
        record["duplicates"] = duplicates
        record["compute"] = self._compute_record(strategy)
        if not self.dry_run:
            self.checkpoint("before-record")
            record["timings"] = self._timings()  # the committed record keeps them
            # The committed record counts the Hub calls up to its own commit (2-4 more).
            record["hub"] = self.hub_calls()
            self._complete(plan, config, record, outputs, inputs, refused, similarity,
                           memory)
        self._lap("record")
        record["timings"] = self._timings()
        record["hub"] = self.hub_calls()
        record["bytes"] = {"downloaded": self.store.traffic.downloaded,
                           "uploaded": self.store.traffic.uploaded}
        return record

    def _compute(self, plan: RoundPlan, strategy: Strategy, config: FederationConfig,
                 init: LoraAdapter, vectors: list[TaskVector], inputs: list[PinnedInput],
                 skipped: dict[str, str], refused: dict[str, str]) -> tuple:
        """Similarity, copies, guards, memory and merge over the clients that passed the
        gate."""
        report = weights = similarity = memory = None
        merged: list[MergedAdapter] = []
        guard: dict[str, dict] = {}
        signs: dict[str, dict] = {}
        duplicates: list[dict] = []
        if any(p.fresh for p in inputs):
            report = self._similarity(strategy, vectors, inputs)
            _require_finite(report)
            # Copies first: the guards' statistics and the weights then count each set once.
            copies, before = self._duplicates(strategy, report, inputs), list(inputs)
            report, vectors, inputs, scale, guard = self._norm_guard(
                strategy, report, vectors, inputs, skipped, refused, copies)
            if copies is not None:
                copies = copies.remap([p.client for p in before], [p.client for p in inputs])
            if any(p.fresh for p in inputs):
                memory, similarity = self._remember(plan, strategy, report, inputs, scale)
                blocked, signs = self._sign_guard(strategy, similarity, inputs, copies)
                weights, merged = self._merge(plan, strategy, config, init, vectors, inputs,
                                              similarity, scale, blocked, copies)
            if copies is not None:
                duplicates = describe_duplicates(copies, [p.client for p in inputs])
        return (report, weights, similarity, memory, merged, guard, signs, duplicates, vectors,
                inputs)

    def _culprits(self, exc: Exception, plan: RoundPlan, strategy: Strategy,
                  config: FederationConfig, init: LoraAdapter, vectors: list[TaskVector],
                  inputs: list[PinnedInput]) -> dict[str, str]:
        """The clients that made the round's maths fail, each with its reason; empty when
        it cannot be pinned on some clients and not others (a server-side failure)."""
        names = [p.client for p in inputs]
        if isinstance(exc, FedbipError) and not isinstance(exc, StoreError) and (
                exc.client in names and len(names) > 1):
            return {exc.client: _dropped_reason(reason(exc))}
        self.log(f"The round's computation failed ({exception_text(exc)}); trying each "
                 "client alone to find the input that causes it.")
        failures: dict[str, str] = {}
        streaming, self.streaming = self.streaming, False  # probes stay in memory
        try:
            for k, pinned in enumerate(inputs):
                try:
                    self._probe(plan, strategy, config, init, vectors[k], pinned)
                except Exception as probe_exc:
                    failures[pinned.client] = _dropped_reason(exception_text(probe_exc))
        finally:
            self.streaming = streaming
        return failures if len(failures) < len(inputs) else {}

    def _probe(self, plan: RoundPlan, strategy: Strategy, config: FederationConfig,
               init: LoraAdapter, vector: TaskVector, pinned: PinnedInput) -> None:
        """The round's maths for one client alone, as if it were fresh."""
        alone = pinned.model_copy(update={"fresh": True, "staleness": 0})
        report = self._similarity(strategy, [vector], [alone])
        _require_finite(report)
        self._merge(plan, strategy, config, init, [vector], [alone], report,
                    torch.ones(1, dtype=torch.float64), [])

    def _drop_from_plan(self, plan: RoundPlan, drops: dict[str, str]) -> None:
        """Move clients from the plan's inputs to its drops, and commit the lease with
        them, so a resumed round never reads them again."""
        for name, why in drops.items():
            plan.dropped[name] = plan.inputs.pop(name)
            plan.skipped[name] = why
            self.log(f"{name}: {why}")
        if self.dry_run:
            return

        def build(head: str) -> dict:
            state = self.fed.state(head)
            lease = state.in_progress or {}
            if (lease.get("plan_id"), lease.get("job_id")) != (plan.plan_id, plan.job_id):
                raise RoundInProgressError(
                    f"round {plan.round} was completed or taken over by another job.",
                    hint="Nothing to do; check `fedbip status`.")
            state.in_progress = plan.model_dump(mode="json")
            return {STATE_FILE: dump_json(state)}

        commit_with_retry(self.fed, self.fed.repo_id, build,
                          f"fedbip: round {plan.round}: dropped {', '.join(sorted(drops))}")

    def _close_staging(self) -> None:
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.close()

    def _stand_in(self, plan: RoundPlan, config: FederationConfig, init: LoraAdapter,
                  init_name: str, refused: dict[str, FedbipError],
                  vectors: list[TaskVector],
                  inputs: list[PinnedInput], skipped: dict[str, str]) -> None:
        """Each refused fresh upload's last valid upload takes its place, as when the
        refusal came while planning; ``vectors``/``inputs`` stay in the plan's order."""
        for name, exc in refused.items():
            fallback = plan.fallbacks.get(name)
            if fallback is not None:
                try:
                    vectors.append(self._read_input(plan, fallback, config, init, init_name))
                    inputs.append(fallback)
                except Exception as failure:  # it no longer reads: the member sits out
                    self.log(f"{name}: its last valid upload could not stand in "
                             f"({exception_text(failure)}).")
                    fallback = None
            skipped[name] = refusal_reason(exc, reused=fallback is not None)
        order = {name: k for k, name in enumerate(plan.inputs)}
        ranked = sorted(range(len(inputs)), key=lambda k: order.get(inputs[k].client, k))
        vectors[:], inputs[:] = [vectors[k] for k in ranked], [inputs[k] for k in ranked]

    def _read_input(self, plan: RoundPlan, pinned: PinnedInput, config: FederationConfig,
                    init: LoraAdapter, init_name: str) -> TaskVector:
        """``_task_vector``, then the client's latest personalized adapter fetched into the
        cache for the merge: a store failure on either skips this client only."""
        vector = self._task_vector(pinned, config, init, init_name)
        revision = plan.latest.get(pinned.client)
        if revision is not None:
            try:
                folder = self.store.fetch_folder(pinned.repo_id, revision, PERSONALIZED_DIR,
                                                 only=ADAPTER_FILES)
            except StoreError as exc:
                exc.message = (f"could not read its latest personalized adapter "
                               f"{pinned.repo_id}@{revision[:12]}/{PERSONALIZED_DIR} "
                               f"({exc.message})")
                exc.args = (str(exc),)
                raise
            self._latest_folders[pinned.client] = folder
        return vector

    def _task_vector(self, pinned: PinnedInput, config: FederationConfig,
                     init: LoraAdapter, init_name: str = INIT_DIR) -> TaskVector:
        """Download, validate and difference one input. Errors name the server's cached
        folders as ``repo@commit[:12]`` (a client cannot use our local paths); anything
        but a FedbipError comes out as an ``InternalError``."""
        names = {init.folder: init_name}
        try:
            folder = self.store.fetch_folder(pinned.repo_id, pinned.commit, only=UPLOAD_FILES)
            names[folder] = f"{pinned.repo_id}@{pinned.commit[:12]}"
            pinned.files = {p.name: _sha256(p) for p in sorted(folder.iterdir())
                            if p.is_file()}
            upload, _metadata = validate_upload(folder, config, init, label=pinned.client,
                                                check_values=pinned.fresh)
            start = init
            if pinned.start_revision is not None:
                start_dir = self.store.fetch_folder(pinned.repo_id, pinned.start_revision,
                                                    PERSONALIZED_DIR, only=ADAPTER_FILES)
                names[start_dir] = (f"{pinned.repo_id}@{pinned.start_revision[:12]}/"
                                    f"{PERSONALIZED_DIR}")
                start = LoraAdapter(start_dir, label=f"{pinned.client} start")
            vector = TaskVector(upload, start, name=pinned.client)
            check_task_vector(vector, config.limits, label=pinned.client)
            return vector
        except FedbipError as exc:
            exc.message = public_paths(exc.message, names, self.store.cache_dir)
            if exc.hint:
                exc.hint = public_paths(exc.hint, names, self.store.cache_dir)
            exc.args = (str(exc),)
            raise
        except Exception as exc:
            if is_resource_error(exc):
                raise
            raise InternalError(public_paths(describe(exc), names, self.store.cache_dir)) from exc

    def _latest_adapter(self, name: str, init: LoraAdapter) -> LoraAdapter:
        """The client's latest personalized adapter (fetched by ``_read_input``), or the
        federation's initial adapter when it has none."""
        folder = self._latest_folders.get(name)
        return init if folder is None else LoraAdapter(folder, label=f"{name} personalized")

    def _similarity(self, strategy: Strategy, vectors: list[TaskVector],
                    inputs: list[PinnedInput]) -> SimilarityReport:
        fresh = sum(p.fresh for p in inputs)
        self.log(f"Similarity between {len(vectors)} clients ({fresh} with new uploads).")
        report, self._similarity_info = round_similarity(
            vectors, strategy, seed_material=[f"{p.client}@{p.commit}" for p in inputs],
            device=resolve_device(self.device), dtype=resolve_dtype(strategy.compute_dtype),
            progress=lambda items: self.progress(items, "Similarity"))
        return report

    def _compute_record(self, strategy: Strategy) -> dict:
        """Device, precision, similarity mode (sketch seed) and staging traffic; closes
        the staging area (everything is published by now)."""
        staging, similarity = self._staging, self._similarity_info
        self._staging = self._similarity_info = None  # a reused runner starts afresh
        if staging is not None:
            staging.close()
        return {"device": str(resolve_device(self.device)),
                "dtype": strategy.compute_dtype, "similarity": similarity,
                "streaming": self.streaming,
                "staging": staging.stats.to_json() if staging is not None else None}

    def _norm_guard(self, strategy: Strategy, report: SimilarityReport,
                    vectors: list[TaskVector], inputs: list[PinnedInput],
                    skipped: dict[str, str], refused: dict[str, str],
                    copies: DuplicateGroups | None = None
                    ) -> tuple[SimilarityReport, list[TaskVector], list[PinnedInput],
                               torch.Tensor, dict[str, dict]]:
        """Clip (scale down) or exclude fresh updates whose norm is a robust outlier. A
        set of copies counts once in the statistics, and its copies share its kept
        member's verdict."""
        scale = torch.ones(len(inputs), dtype=torch.float64)
        if strategy.norm_guard == "off":
            return report, vectors, inputs, scale, {}
        norms = report.norms()
        result = norm_guard(copies.without_copies(norms) if copies is not None else norms,
                            threshold=strategy.norm_guard_threshold)

        def judged(k: int) -> int:  # whose verdict applies to input k
            kept = copies.kept_for(k) if copies is not None else None
            return k if kept is None else kept

        flagged = [k for k in range(len(inputs))
                   if judged(k) in result.outliers and inputs[k].fresh]
        details = {inputs[k].client: {"norm": float(norms[k]),
                                      "robust_z": float(result.robust_z[judged(k)]),
                                      "cap": result.cap, "action": strategy.norm_guard}
                   for k in flagged}
        for k in flagged:
            self.log(f"Norm guard ({strategy.norm_guard}): {inputs[k].client}: "
                     f"{result.explain(judged(k))}.")
        if strategy.norm_guard == "clip":
            for k in flagged:
                scale[k] = result.scale[judged(k)]
            return report, vectors, inputs, scale, details
        for k in flagged:
            skipped[inputs[k].client] = (
                f"{result.explain(judged(k))}; excluded by the norm guard (fix: check the training "
                "for divergence or a scaling bug, then push again)")
            refused[inputs[k].client] = inputs[k].upload_id
        keep = [k for k in range(len(inputs)) if k not in flagged]
        return (report.subset(keep), [vectors[k] for k in keep], [inputs[k] for k in keep],
                scale[keep], details)

    def _remember(self, plan: RoundPlan, strategy: Strategy, report: SimilarityReport,
                  inputs: list[PinnedInput], scale: torch.Tensor
                  ) -> tuple[SimilarityMemory | None, CosineSource]:
        """This round's evidence added to the federation's similarity memory (read at the
        plan's pinned revision, so a resumed round computes the same); returns the new
        memory (written when the round completes) and the cosines the weights use."""
        if strategy.similarity_memory == 0:
            return None, report
        previous = self._stored_memory(plan, strategy)
        # A client that starts over (its repo was recreated) starts with no evidence too.
        # So does a client whose consumed update left the pool, and any client whose
        # stored evidence is not finite (remembered before the per-client bounds).
        leaving = {*plan.restarted, *(self._evicted or {}), *previous.nonfinite_clients()}
        memory = previous.without(leaving).updated(report, [p.fresh for p in inputs],
                                                   decay=strategy.similarity_memory,
                                                   scale=scale)
        return memory, memory.view(report)

    def _stored_memory(self, plan: RoundPlan, strategy: Strategy) -> SimilarityMemory:
        """The memory at the plan's pinned revision (empty when there is none), decoded
        once: the preflight's read serves the merge (memories are never mutated)."""
        keyed = storage_granularity(strategy.effective_granularity or "layer")
        key = (plan.federation_revision, keyed)
        if self._memory_read is not None and self._memory_read[0] == key:
            return self._memory_read[1]
        memory = SimilarityMemory(granularity=keyed)
        if self.store.file_exists(self.fed.repo_id, MEMORY_FILE, plan.federation_revision):
            memory = SimilarityMemory.from_bytes(
                self.store.read_bytes(self.fed.repo_id, MEMORY_FILE, plan.federation_revision),
                granularity=keyed)
        self._memory_read = (key, memory)
        return memory

    def _sign_guard(self, strategy: Strategy, similarity: CosineSource,
                    inputs: list[PinnedInput], copies: DuplicateGroups | None = None
                    ) -> tuple[list[int], dict[str, dict]]:
        """Fresh updates that mirror a group of peers: shared with no one this round.
        Dropped copies (shared with no one anyway) neither oppose nor support anyone, so
        copies cannot outvote an honest update."""
        if strategy.sign_guard == "off":
            return [], {}
        names = [p.client for p in inputs]
        cosine = similarity.model_cosine()
        result = sign_guard(copies.without_copies(cosine) if copies is not None else cosine,
                            floor=strategy.sign_guard_floor,
                            min_opposed=strategy.sign_guard_min_peers)
        flagged = [k for k in result.flagged if inputs[k].fresh]
        details = {}
        for k in flagged:
            why = result.explain(k, names)
            self.log(f"Sign guard: {names[k]}: {why}; not shared with other clients.")
            details[names[k]] = {"reason": why, "opposes": [names[j] for j in
                                                               result.opposed[k]],
                                 "action": "not shared with other clients this round"}
        return flagged, details

    def _duplicates(self, strategy: Strategy, report: SimilarityReport,
                    inputs: list[PinnedInput]) -> DuplicateGroups | None:
        """Near-identical task vectors of different members (this round's cosines)."""
        if strategy.duplicate_cosine is None:
            return None
        copies = find_duplicates(report.model_cosine(), report.norms(),
                                 fresh=[p.fresh for p in inputs],
                                 min_cosine=strategy.duplicate_cosine,
                                 norm_tolerance=strategy.duplicate_norm_tolerance)
        for group, kept in zip(copies.groups, copies.kept, strict=True):
            self.log(f"Duplicates: {', '.join(inputs[i].client for i in group)} uploaded "
                     f"near-identical updates; only {inputs[kept].client}'s is weighted.")
        return copies

    def _merge(self, plan: RoundPlan, strategy: Strategy, config: FederationConfig,
               init: LoraAdapter, vectors: list[TaskVector], inputs: list[PinnedInput],
               similarity: CosineSource, scale: torch.Tensor, blocked: list[int],
               copies: DuplicateGroups | None = None
               ) -> tuple[WeightTable, list[MergedAdapter | None]]:
        """The weights, and each input's merged adapter: None for a target the merge
        leaves as it is (see ``changed_targets``), which is neither merged nor published."""
        k = len(vectors)
        fresh = torch.tensor([p.fresh for p in inputs], dtype=torch.bool)
        fresh[blocked] = False  # the weighting forces the diagonal back on: self is kept
        allowed = fresh[None, :].expand(k, k).clone()
        if copies is not None:  # copies weigh as one upload (robust.DuplicateGroups.mask)
            allowed &= copies.mask(k)
        groups = (oracle_groups(strategy, [p.client for p in inputs], self.groups)
                  if strategy.spec.weighting == "oracle" else None)
        population = torch.ones(k, dtype=torch.bool)
        population[blocked] = False
        if copies is not None:
            population[copies.dropped] = False
        weights = compute_weights(strategy, k=k, report=similarity,
                                  n_examples=[p.n_examples for p in inputs], allowed=allowed,
                                  groups=groups, population=population)
        contribution = torch.tensor(
            [staleness_discount(p.staleness, strategy.staleness_beta) if p.fresh else 0.0
             for p in inputs], dtype=torch.float64) * scale
        weights = _bounded(weights, strategy, fresh & (contribution > 0))
        targets = changed_targets(weights, contribution,
                                  [plan.latest.get(p.client) is not None for p in inputs])
        latest = [self._latest_adapter(inputs[t].client, init) for t in targets]
        merge_plan = MergePlan(targets=targets, contribution=contribution, latest=latest)
        staging = self._staging = (StagingArea(len(targets), space=strategy.spec.merge_space)
                                   if self.streaming else None)
        merged = personalize(vectors, weights, merge_plan,
                             rank=strategy.rank or config.lora.r, refactor=strategy.refactor,
                             space=strategy.spec.merge_space,
                             personal_heads=strategy.personal_heads,
                             progress=lambda items: self.progress(items, "Merging"),
                             dtype=resolve_dtype(strategy.compute_dtype),
                             device=resolve_device(self.device), sink=staging,
                             max_resident=resident_peers(strategy.top_k) if staging else None)
        # Streaming: adapters staged on disk, assembled one at a time when published.
        results = staging.adapters if staging is not None else merged
        by_input: list[MergedAdapter | None] = [None] * k
        for position, target in enumerate(targets):
            by_input[target] = results[position]  # type: ignore[assignment]
        return weights, by_input

    def _heatmap(self, report: CosineSource) -> bytes:
        """The round's heatmap PNG, rendered once for the model cards and the dashboard."""
        from fedbip_hub.federation import modelcard

        if self._heatmap_for is not report:
            self._heatmap_for, self._heatmap_png = report, modelcard.heatmap_png(report)
        return self._heatmap_png

    def _publish_all(self, plan: RoundPlan, config: FederationConfig, strategy: Strategy,
                     names: list[str], inputs: list[PinnedInput],
                     report: CosineSource | None, weights: WeightTable | None,
                     merged: list[MergedAdapter | None], template: Any) -> dict[str, dict]:
        """Publish every changed target's adapter, one commit per member repo (a target
        the merge leaves as it is, None in ``merged``, is not republished). The targets'
        heads and visibility come from one listing (``Store.heads``). A store error on
        one repo (403, deleted repo, retries exhausted) skips that member only: it is
        kept in ``self._publish_failed`` for ``_complete`` to record, and is not
        "already published" if this round is resumed, so a resumed round retries it."""
        self._publish_failed = {}
        if report is None or weights is None:
            return {}
        heatmap = self._heatmap(report)
        outputs: dict[str, dict] = {}
        targets = [k for k, adapter in enumerate(merged) if adapter is not None]
        listed = self.store.heads([inputs[k].repo_id for k in targets]) if targets else {}
        for index in self.progress(targets, "Publishing"):
            name, pinned = names[index], inputs[index]
            try:
                output = self._publish_one(plan, config, strategy, names, inputs, report,
                                           weights, merged, index, heatmap, template,
                                           listed.get(pinned.repo_id))
            except StoreError as exc:  # this member's repo only: the others still publish
                why = one_line(redact(reason(exc)))
                self._publish_failed[name] = (why, publish_skip_reason(
                    exc, pinned.repo_id, pinned.fresh))
                self.log(f"Could not publish {name}'s personalized adapter to "
                         f"{pinned.repo_id}: {why}; continuing with the others.")
                continue
            outputs[name] = output
            if not output.get("resumed"):
                self.checkpoint(f"published:{name}")
        return outputs

    def _publish_one(self, plan: RoundPlan, config: FederationConfig, strategy: Strategy,
                     names: list[str], inputs: list[PinnedInput], report: CosineSource,
                     weights: WeightTable, merged: list[MergedAdapter | None], index: int,
                     heatmap: bytes, template: Any, listed: RepoHead | None = None) -> dict:
        """Publish target ``index``'s adapter in one commit (or find it already published
        by this plan); store failures propagate to ``_publish_all``.

        ``listed`` is the repo's head and visibility from this round's listing. A plan
        this job made itself cannot have published here yet (another job that took it
        over fails the lease check first, and any publish after the listing moves the
        head, so ours gets a conflict), so it commits on that head straight away; a
        resumed plan checks the head for its own adapter first."""
        from fedbip_hub.federation.modelcard import personalized_card

        name, pinned = names[index], inputs[index]
        head = listed.sha if listed is not None else self.store.head(pinned.repo_id)
        if self._resumed or listed is None:
            done = self._already_published(plan, pinned.repo_id, head)
            if done is not None:
                return done
        private = listed.private if listed is not None else None
        if private is None and not config.allow_public_members:
            private = self.store.is_private(pinned.repo_id)
        if not config.allow_public_members and not private:
            raise VisibilityError(
                f"{pinned.repo_id} is public, and its personalized adapter mixes other "
                "members' updates", hint=f"the member makes {pinned.repo_id} private again "
                "(or the federation sets allow_public_members in federation.json)")
        adapter = merged[index]
        assert adapter is not None  # _publish_all passes changed targets only
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
        card = personalized_card(config, name, plan.round, names, report, weights,
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
        for _ in range(_PUBLISH_TRIES):
            self._check_lease(plan)
            try:
                commit = self.store.commit(pinned.repo_id, files, parent=head,
                                           message=f"{PUBLISH_TITLE} (round {plan.round})")
            except ConflictError:
                head = self.store.head(pinned.repo_id)
                done = self._already_published(plan, pinned.repo_id, head)
                if done is not None:
                    return done
                continue
            return {"repo_id": pinned.repo_id, "commit": commit, "parent": head,
                    "max_discarded_energy": adapter.max_discarded_energy}
        raise ConflictError(f"{pinned.repo_id} kept moving while publishing; gave up after "
                            f"{_PUBLISH_TRIES} tries.", hint="A later run publishes it.")

    def _check_lease(self, plan: RoundPlan, state: FederationState | None = None) -> None:
        """Stop (RoundInProgressError) unless this job still holds the plan's lease (in
        ``state``, default: the federation's state at its head)."""
        if state is None:
            self._fed_head = self.fed.head()
            state = self.fed.state(self._fed_head)
        current = state.in_progress or {}
        if current.get("plan_id") != plan.plan_id:
            raise RoundInProgressError(
                f"round {plan.round} was completed or replaced by another job.",
                hint="Nothing to do; check `fedbip status`.")
        if current.get("job_id") != plan.job_id:
            raise RoundInProgressError(
                f"job {current.get('job_id')} took over round {plan.round} from this job "
                f"({plan.job_id}); stopping here, it finishes the round.",
                hint="Nothing to do; check `fedbip status`.")

    def _already_published(self, plan: RoundPlan, repo_id: str, head: str) -> dict | None:
        path = f"{PERSONALIZED_DIR}/{MERGE_RECORD}"
        if not self.store.file_exists(repo_id, path, head):
            return None
        try:  # the member's repo: anything may have been committed there
            record = loads_bounded(self.store.read_bytes(repo_id, path, head),
                                   max_bytes=MAX_MERGE_RECORD_BYTES)
        except JsonLimitError:
            return None
        if not isinstance(record, dict) or record.get("plan_id") != plan.plan_id:
            return None
        from fedbip_hub.federation.client import latest_personalized_revision

        energy = record.get("max_discarded_energy", 0.0)
        return {"repo_id": repo_id, "commit": latest_personalized_revision(self.fed, repo_id),
                "max_discarded_energy": float(energy) if isinstance(energy, int | float)
                else 0.0, "resumed": True}

    def _record(self, plan: RoundPlan, strategy: Strategy, inputs: list[PinnedInput],
                report: SimilarityReport | None, weights: WeightTable | None,
                merged: list[MergedAdapter], outputs: dict[str, dict],
                skipped: dict[str, str]) -> dict:
        similarity = report.to_json() if report is not None else None
        return {
            "status": "dry-run" if self.dry_run else "completed",
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
            "skipped": skipped,
            "restarted": dict(plan.restarted),
            "timings": {},
        }

    def _complete(self, plan: RoundPlan, config: FederationConfig, record: dict,
                  outputs: dict[str, dict], inputs: list[PinnedInput],
                  refused: dict[str, str], report: CosineSource | None,
                  memory: SimilarityMemory | None) -> None:
        from fedbip_hub.federation.modelcard import dashboard_card

        failed, self._publish_failed = self._publish_failed or {}, None
        evicted, self._evicted = self._evicted or {}, None
        internal, self._internal_errors = self._internal_errors or {}, None
        record["publish_failed"] = {name: why for name, (why, _) in failed.items()}
        record["skipped"].update({name: text for name, (_, text) in failed.items()})

        def build(head: str) -> dict:
            state = self.fed.state(head)
            self._check_lease(plan, state)
            self.fed.check_not_rolled_back(head, state)  # never overwrite a round record
            if round_record_path(plan.round) in self.fed.files(head):
                raise ConfigError(
                    f"{round_record_path(plan.round)} already exists in {self.fed.address}: "
                    f"state.json was rolled back while round {plan.round} ran; its record "
                    "is not overwritten.", hint="Restore state.json from the federation "
                    "repo's history (the version of the last 'round N completed' commit).")
            # A client whose publish failed (not in ``outputs``) is still consumed: its
            # update reached the other clients, and consuming it again would apply it
            # twice. Its history does not advance (nothing was published), so its
            # `latest` stays the previous adapter and the next round merges onto that:
            # this round's merge for it is not retried, only later rounds' updates reach it.
            for name in plan.restarted:  # its published history is gone (see _collect)
                state.clients[name] = _started_over(state.client(name))
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
            for name, uid in internal.items():  # see _waits
                client_state = state.client(name)
                client_state.internal_error_upload = uid
                client_state.internal_error_version = fedbip_hub.__version__
                client_state.internal_error_round = plan.round
                client_state.seen_head = None  # looked at again each round, see _waits
            state.round = plan.round
            state.in_progress = None
            files = {STATE_FILE: dump_json(state),
                     round_record_path(plan.round): dump_json(record),
                     "README.md": dashboard_card(config, self.fed.members(head), state,
                                                 record).encode()}
            if report is not None:
                files["similarity.png"] = self._heatmap(report)
            if memory is not None:
                files[MEMORY_FILE] = memory.to_bytes()
            return files

        self._commit_federation(build, f"fedbip: round {plan.round} completed")

    def _commit_federation(self, build: Callable[[str], dict], message: str) -> str:
        """``commit_with_retry`` on the federation repo, first tried on the head this job
        last saw holding its lease, without reading the head again."""
        known = self._fed_head
        if known is not None:
            try:
                return self.store.commit(self.fed.repo_id, build(known), message=message,
                                         parent=known)
            except ConflictError:
                pass  # the repo moved (a member joined, say): read its head and rebuild
        return commit_with_retry(self.fed, self.fed.repo_id, build, message)


def changed_targets(weights: WeightTable, contribution: torch.Tensor,
                    has_adapter: list[bool]) -> list[int]:
    """The inputs whose personalized adapter this round's merge changes: some fresh
    update enters it (a nonzero weight on a nonzero contribution, in any weight matrix,
    its own update included, which personal heads always take), or it has no
    personalized adapter yet. Any other's merge is its latest adapter plus nothing: it is
    left as it is, byte for byte, and not republished."""
    live = contribution != 0
    matrices = [*weights.matrices.values(),
                *([weights.fallback] if weights.fallback is not None else [])]
    return [i for i in range(len(has_adapter))
            if not has_adapter[i] or bool(live[i])
            or any(bool((m[i][live] != 0).any()) for m in matrices)]


def _require_finite(report: SimilarityReport) -> None:
    """Refuse to weigh anyone with a non-finite Gram matrix or norm: a NaN cosine is read
    as "no similarity", and every update would silently be lost."""
    bad = sorted(m for m, g in report.grams.items() if not bool(torch.isfinite(g).all()))
    if not bool(torch.isfinite(report.norms()).all()):
        bad.append("the norms")
    if bad:
        raise ArithmeticError(f"non-finite task-vector inner products in {bad[:3]}")


def _dropped_reason(why: str) -> str:
    return one_line(redact(
        f"its input made the round's computation fail ({why}); dropped from this round's "
        "plan, and its upload is not used (fix: check the adapter's values and scaling, "
        "then push a new upload)"))


def _evicted_reason(exc: FedbipError) -> str:
    return one_line(f"its consumed update no longer passes the gate and left the pool: "
                    f"{reason(exc)}")


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


def _bounded(weights: WeightTable, strategy: Strategy, contributes: torch.Tensor
             ) -> WeightTable:
    """``weights`` under the strategy's max_peer_weight and min_contributors (unchanged,
    the same tensors, when neither is set)."""
    if strategy.max_peer_weight is None and strategy.min_contributors is None:
        return weights

    def bound(matrix: torch.Tensor) -> torch.Tensor:
        return bound_weights(matrix, contributes, max_peer_weight=strategy.max_peer_weight,
                             min_contributors=strategy.min_contributors)

    return WeightTable(weights.granularity, {key: bound(m) for key, m in
                                             weights.matrices.items()},
                       bound(weights.fallback) if weights.fallback is not None else None)


def _waits(client_state: Any, pinned: PinnedInput) -> bool:
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


def _started_over(client_state: Any) -> Any:
    """A client whose published history is gone, as this round sees it: no personalized
    adapter and no previous upload (it lived in the old repo). The consumed and refused
    upload ids are kept, so neither is ever applied again."""
    return client_state.model_copy(update={"personalized_history": [],
                                           "consumed_commit": None, "consumed_start": None})


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_round(fed: Federation, **options: Any) -> dict:
    """Run one round; see RoundRunner for the options."""
    return RoundRunner(fed, **options).run()
