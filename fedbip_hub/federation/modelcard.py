"""Model cards: each client's personalized card and the federation dashboard.

Both are written with huggingface_hub's ModelCard, so the Hub renders their metadata
(base_model, library_name: peft, tags). Neither ever contains a token.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from fedbip_hub.engine.merge import MergedAdapter
from fedbip_hub.engine.similarity import CosineSource
from fedbip_hub.engine.strategies import WeightTable
from fedbip_hub.federation.config import FederationConfig, FederationState, Member
from fedbip_hub.federation.skip_reasons import describe_guards

TAGS = ["fedbip", "federated-learning", "lora", "peft", "personalization"]


def heatmap_png(report: CosineSource, *, max_layers: int = 7) -> bytes:
    """The model-level cosine heatmap plus up to ``max_layers`` per-layer panels."""
    from fedbip_hub.engine.memory import SimilarityView
    from fedbip_hub.federation.plotting import MEMORY_COSINE, ROUND_COSINE, save_heatmap

    panels = {"model": report.model_cosine()}
    layers = report.cosines("layer")
    keys = list(layers)
    if len(keys) > max_layers:
        step = (len(keys) - 1) / (max_layers - 1)
        keys = [keys[round(i * step)] for i in range(max_layers)]
    panels.update({k: layers[k] for k in keys})
    with tempfile.TemporaryDirectory() as tmp:
        path = save_heatmap(panels, report.clients, Path(tmp) / "similarity.png",
                            source=MEMORY_COSINE if isinstance(report, SimilarityView)
                            else ROUND_COSINE)
        return path.read_bytes()


def hub_base_model(config: FederationConfig) -> str | None:
    """The base model as card metadata may hold it: a Hub model id, or None for a local
    path (the Hub refuses a ``base_model`` that is not a model id; the path stays in
    ``federation.json`` and in the card's text)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from fedbip_hub.stores.locations import is_local_path

    if is_local_path(config.base_model):
        return None
    try:
        validate_repo_id(config.base_model)
    except HFValidationError:
        return None
    return config.base_model


def _card(data: ModelCardData, body: str) -> str:
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"))


MAX_CARD_ROWS = 32  # above this many members, a card lists only its contributors


def personalized_card(config: FederationConfig, client: str, round_no: int,
                      names: Sequence[str], report: CosineSource, weights: WeightTable,
                      index: int, inputs: Sequence[Any], adapter: MergedAdapter) -> str:
    """The card of ``client``'s personalized adapter: who contributed, with what weight."""
    data = ModelCardData(base_model=hub_base_model(config), library_name="peft",
                         tags=[*TAGS, f"fedbip-federation-{config.name}"])
    cosine = report.model_cosine()[index]
    memory_note = ("" if config.strategy_obj().similarity_memory == 0 else
                   ", accumulated over the rounds (the similarity memory)")
    layer_keys = list(weights.matrices)
    mean_weights = [sum(float(weights.matrices[key][index, k]) for key in layer_keys)
                    / len(layer_keys) for k in range(len(names))]
    shown = list(range(len(names)))
    if len(names) > MAX_CARD_ROWS:  # a large federation: contributors only, heaviest first
        shown = sorted((k for k in shown if mean_weights[k] > 0 or k == index),
                       key=lambda k: -mean_weights[k])
    rows = []
    for k in shown:
        pinned = inputs[k]
        rows.append(f"| {names[k]}{' (you)' if k == index else ''} | {mean_weights[k]:.3f} | "
                    f"{float(cosine[k]):+.3f} | {'yes' if pinned.fresh else 'no'} | "
                    f"{pinned.staleness} |")
    if len(shown) < len(names):
        rows.append(f"| … {len(names) - len(shown)} more members with weight 0 (all "
                    "weights: `fedbip_merge.json`) | 0 | | | |")
    weight_note = ("mean over the per-layer weight matrices"
                   if len(layer_keys) > 1 else "weight")
    body = f"""
# Personalized adapter for `{client}`

Federation **{config.name}**, round {round_no}, method `{config.strategy_obj().method}`
(FedBip: bi-level personalization by task-vector aggregation, arXiv 2509.12697).
Base model: `{config.base_model}`{f" @ `{config.base_revision}`" if config.base_revision else ""}.

## Load it

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this repo>", subfolder="personalized")
```

## Who contributed

Weight is the {weight_note}; cosine is the model-level task-vector cosine{memory_note}.
A peer with no new upload this round shapes the weights but adds nothing.

| client | weight | cosine | new upload | staleness |
|---|---|---|---|---|
{chr(10).join(rows)}

Largest energy discarded by the rank-{config.strategy_obj().rank or config.lora.r}
re-factorisation: {adapter.max_discarded_energy:.2e}.

## Similarity

![Task-vector cosine similarity](similarity.png)

Produced by [fedbip-hub](https://pypi.org/project/fedbip-hub/); the merge record is in
`fedbip_merge.json`.
"""
    return _card(data, body)


def dashboard_card(config: FederationConfig, members: Mapping[str, Member],
                   state: FederationState, record: Mapping[str, Any] | None) -> str:
    """The federation repo's README: members, the last round, the similarity heatmap."""
    data = ModelCardData(base_model=hub_base_model(config), library_name="peft", tags=TAGS)
    member_rows = []
    for name, member in members.items():
        client_state = state.clients.get(name)
        versions = len(client_state.personalized_history) if client_state else 0
        last = client_state.last_round if client_state and client_state.last_round else "–"
        member_rows.append(f"| {name} | `{member.repo_id}` | {versions} | {last} |")
    last_round = "No round has run yet."
    if record is not None:
        skipped = record.get("skipped") or {}
        skipped_rows = "\n".join(f"- **{k}**: {v}" for k, v in skipped.items()) or "- none"
        guarded_rows = "\n".join(f"- **{k}**: {v}" for k, v in
                                 describe_guards(record).items()) or "- none"
        last_round = f"""Round **{record['round']}** finished {record.get('finished_at', '')}:
{len(record.get('outputs') or {})} personalized adapters published,
{sum(1 for v in (record.get('inputs') or {}).values() if v.get('fresh'))} new uploads consumed.

Skipped:
{skipped_rows}

Guarded (their updates were clipped or not shared):
{guarded_rows}

![Task-vector cosine similarity](similarity.png)"""
    body = f"""
# FedBip federation `{config.name}`

Base model `{config.base_model}`, LoRA r={config.lora.r}, alpha={config.lora.alpha:g},
targets {", ".join(f"`{t}`" for t in config.lora.target_modules)};
strategy `{config.strategy_obj().method}`. Rounds completed: {state.round}.

## Members

| member | repo | personalized versions | last round |
|---|---|---|---|
{chr(10).join(member_rows) or "| – | – | – | – |"}

## Last round

{last_round}

Round records are in `rounds/`, the configuration in `federation.json`.
"""
    return _card(data, body)
