"""The merge stage: each changed target's personalized adapter, its latest adapter plus
the weighted updates (``engine.merge.personalize``). Streaming rounds spill the merged
modules to a ``StagingArea`` as they are ready; the publish stage assembles them one
adapter at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine.compute import resolve_device, resolve_dtype
from fedbip_hub.engine.merge import MergedAdapter, MergePlan, personalize
from fedbip_hub.engine.strategies import Strategy
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.federation.config import FederationConfig
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import PinnedInput
from fedbip_hub.server.streaming import StagingArea, resident_peers
from fedbip_hub.server.weights import Weighed


@dataclass(frozen=True)
class Merged:
    """Each input's merged adapter, None for a target the merge leaves as it is (see
    ``weights.changed_targets``), which is neither merged nor published; and the staging
    area holding them on disk (streaming rounds), which ``close`` frees."""

    adapters: list[MergedAdapter | None]
    staging: StagingArea | None = None

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()


def latest_adapter(name: str, init: LoraAdapter, latest_folders: Mapping[str, Path]
                   ) -> LoraAdapter:
    """The client's latest personalized adapter (fetched by the collect stage), or the
    federation's initial adapter when it has none."""
    folder = latest_folders.get(name)
    return init if folder is None else LoraAdapter(folder, label=f"{name} personalized")


def merge(ctx: RoundContext, strategy: Strategy, config: FederationConfig,
          init: LoraAdapter, vectors: list[TaskVector], inputs: list[PinnedInput],
          weighed: Weighed, latest_folders: Mapping[str, Path]) -> Merged:
    """The changed targets' merged adapters, in input order."""
    targets = weighed.targets
    latest = [latest_adapter(inputs[t].client, init, latest_folders) for t in targets]
    merge_plan = MergePlan(targets=targets, contribution=weighed.contribution, latest=latest)
    staging = (StagingArea(len(targets), space=strategy.spec.merge_space)
               if ctx.streaming else None)

    def progress(items: Iterable[Any]) -> Iterable[Any]:
        return ctx.progress(items, "Merging")

    try:
        merged = personalize(vectors, weighed.weights, merge_plan,
                             rank=strategy.rank or config.lora.r, refactor=strategy.refactor,
                             space=strategy.spec.merge_space,
                             personal_heads=strategy.personal_heads, progress=progress,
                             dtype=resolve_dtype(strategy.compute_dtype),
                             device=resolve_device(ctx.device), sink=staging,
                             max_resident=resident_peers(strategy.top_k) if staging else None)
    except BaseException:  # a failed merge frees its disk at once
        if staging is not None:
            staging.close()
        raise
    # Streaming: adapters staged on disk, assembled one at a time when published.
    results = staging.adapters if staging is not None else merged
    by_input: list[MergedAdapter | None] = [None] * len(inputs)
    for position, target in enumerate(targets):
        by_input[target] = results[position]  # type: ignore[assignment]
    return Merged(by_input, staging)
