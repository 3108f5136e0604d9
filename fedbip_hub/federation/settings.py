"""The federation's merge settings: what in ``federation.json`` decides what a round's
merge produces, its fingerprint, and how two of them differ.

A round skips members with nothing new (their head is where the last round left it, or
no fresh update reaches them): right only while these settings stay the same. The round
that completes commits them into ``state.json``; a later round that finds them changed
re-merges and republishes every member (``fedbip_hub.server.lease``).

What counts, and why:

- the whole validated strategy (the method, the weighting rule and its options, top_k,
  self_share, the evidence, similarity, memory, guard, staleness, personal-head,
  refactor and precision options): each changes the weights or the merge. The
  strategy is validated first, so a default spelled out and one left out are the same;
- the output rank, ``strategy.rank`` or else the federation's ``lora.r``: the merged
  adapters' rank. It stands for both (``lora.r`` is otherwise only what members train
  with, and the upload gate checks ranks against ``limits.max_rank``, not against it).

What does not: the name, the base model and its revision, the task type and labels
(facts of the federation, never changed under the same adapters), the LoRA alpha,
modules and dropout (members' training; the merge reads each upload's own config, and the
outputs take the initial adapter's), the upload limits (the gate: a tighter one refuses
or evicts the uploads past it, it does not change a merge), the lease length
(scheduling), allow_public_members (where adapters go, not what they are), the seed (the
initial adapter only, fixed at init) and the provenance fields. Options of one run (the
device, streaming) give the same results and are not in the config at all.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedbip_hub.federation.config import FederationConfig

OUTPUT_RANK = "output_rank"


def merge_settings(config: FederationConfig) -> dict[str, Any]:
    """The settings of ``config`` that decide what a merge produces (see the module's
    docstring), as JSON; ConfigError when its strategy does not validate."""
    strategy = config.strategy_obj().model_dump(mode="json")
    rank = strategy.pop("rank")
    return {**strategy, OUTPUT_RANK: rank if rank is not None else config.lora.r}


def stated_changes(config: FederationConfig, before: dict[str, Any] | None
                   ) -> dict[str, list[Any]]:
    """``changed_settings`` from ``before`` for what ``config`` states itself (its
    strategy's own options and the output rank), without validating the strategy, which
    would load torch (``fedbip status`` starts without it). An option taken out of the
    config (back to its default) is left out here; the round sees it."""
    stated = {key: value for key, value in config.strategy.items() if key != "rank"}
    rank = config.strategy.get("rank")
    stated[OUTPUT_RANK] = rank if rank is not None else config.lora.r
    return changed_settings(before, stated)


def fingerprint(settings: dict[str, Any]) -> str:
    """The SHA-256 of the settings' canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def changed_settings(before: dict[str, Any] | None, now: dict[str, Any]
                     ) -> dict[str, list[Any]]:
    """Each setting whose value differs, as ``[before, now]``; empty when ``before`` is
    None (no round recorded any yet: nothing to re-merge). A key only one side has is a
    field a fedbip version added or removed, whose default keeps the old behaviour, so it
    is not a change."""
    if before is None:
        return {}
    return {key: [before[key], now[key]] for key in sorted(before.keys() & now.keys())
            if before[key] != now[key]}


def describe_changes(changes: dict[str, list[Any]], *, limit: int = 6) -> str:
    """``"settings changed: output_rank 8 → 16, self_share 0.3 → 0.5"``."""
    parts = [f"{key} {_shown(old)} → {_shown(new)}" for key, (old, new) in changes.items()]
    more = len(parts) - limit
    text = ", ".join(parts[:limit]) + (f" and {more} more" if more > 0 else "")
    return f"settings changed: {text}"


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
