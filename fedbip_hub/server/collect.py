"""Stage 2, collect: every pinned input downloaded and validated concurrently
(``streaming.OrderedMap``), one client's failure skipping that client only, with its
reason: the store's (retried next round), the gate's (refused; its last valid upload
stands in), or ours (an internal error, retried with the next round that has news).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.errors import FedbipError, StoreError
from fedbip_hub.federation.config import INIT_DIR, FederationConfig
from fedbip_hub.federation.skip_reasons import (
    exception_text,
    internal_reason,
    one_line,
    reason,
    refusal_reason,
)
from fedbip_hub.secrets import redact
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import PinnedInput, RoundPlan
from fedbip_hub.server.resources import is_resource_error, resource_error
from fedbip_hub.server.streaming import OrderedMap
from fedbip_hub.server.vectors import FileHashes, ReadInput, read_input


@dataclass(frozen=True)
class Collected:
    """The inputs that passed the gate (with their task vectors, in the plan's order),
    the plan with the hashes of the files read, and what became of the others."""

    plan: RoundPlan
    init: LoraAdapter
    vectors: list[TaskVector]
    inputs: list[PinnedInput]
    skipped: dict[str, str]  # client → why it sits out (or what stood in)
    refused: dict[str, str]  # client → its fresh upload id the gate refused
    evicted: dict[str, str]  # client → why its consumed update left the pool
    internal_errors: dict[str, str]  # client → fresh upload id skipped for our error
    latest_folders: dict[str, Path]  # client → its latest personalized adapter


def load_init(ctx: RoundContext, plan: RoundPlan) -> LoraAdapter:
    """The federation's initial adapter at the plan's pinned revision."""
    return LoraAdapter(ctx.store.fetch_folder(ctx.fed.repo_id, plan.federation_revision,
                                              INIT_DIR), label="federation init")


def collect(ctx: RoundContext, plan: RoundPlan, config: FederationConfig) -> Collected:
    """Download, validate and difference every input of ``plan``."""
    skipped = dict(plan.skipped)
    init = load_init(ctx, plan)
    vectors: list[TaskVector] = []
    inputs: list[PinnedInput] = []
    latest_folders: dict[str, Path] = {}
    hashes: FileHashes = {}
    refused = {n: p.upload_id for n, p in plan.dropped.items() if p.fresh}
    evicted = {n: skipped[n] for n, p in plan.dropped.items() if not p.fresh}
    init_name = f"{ctx.fed.repo_id}@{plan.federation_revision[:12]}/{INIT_DIR}"

    def read(pinned: PinnedInput) -> ReadInput:
        return read_input(ctx, plan, pinned, config, init, init_name, hashes)

    def accept(pinned: PinnedInput, result: ReadInput) -> None:
        vectors.append(result.vector)
        inputs.append(pinned)
        if result.latest_folder is not None:
            latest_folders[pinned.client] = result.latest_folder

    fetched = OrderedMap(read, list(plan.inputs.values()), catch=(Exception,),
                         workers=ctx.download_workers if ctx.streaming else 1)
    internal: dict[str, str] = {}
    gate_refused: dict[str, FedbipError] = {}
    for pinned, result, exc in ctx.progress(fetched, "Downloading and validating"):
        if exc is None:
            accept(pinned, result)
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
                internal[pinned.client] = pinned.upload_id
            ctx.log(f"Internal error reading {pinned.client}'s upload "
                    f"({exception_text(exc)}); skipped, retried with the next round "
                    "that has other news.")
            if os.environ.get("FEDBIP_DEBUG"):  # the CLI's convention for tracebacks
                ctx.log(redact("".join(traceback.format_exception(exc))))
    # Each refused fresh upload's last valid upload takes its place, as when the
    # refusal came while planning.
    for name, refusal in gate_refused.items():
        fallback = plan.fallbacks.get(name)
        if fallback is not None:
            try:
                accept(fallback, read(fallback))
            except Exception as failure:  # it no longer reads: the member sits out
                ctx.log(f"{name}: its last valid upload could not stand in "
                        f"({exception_text(failure)}).")
                fallback = None
        skipped[name] = refusal_reason(refusal, reused=fallback is not None)
    # In the plan's order, each input as read (with its files' hashes).
    order = {name: k for k, name in enumerate(plan.inputs)}
    ranked = sorted(range(len(inputs)), key=lambda k: order.get(inputs[k].client, k))
    plan = plan.with_files(hashes)
    return Collected(plan, init, [vectors[k] for k in ranked],
                     [inputs[k].with_files(hashes) for k in ranked], skipped, refused,
                     evicted, internal, latest_folders)


def _evicted_reason(exc: FedbipError) -> str:
    return one_line(f"its consumed update no longer passes the gate and left the pool: "
                    f"{reason(exc)}")
