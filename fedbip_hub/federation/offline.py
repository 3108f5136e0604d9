"""Similarity and personalized merges over adapter folders, with no federation around them.

These back ``fedbip similarity`` and ``fedbip merge``: every input is treated as a
first-round task vector (start adapter zero, personalized adapter zero before the merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.adapters.metadata import UploadMetadata
from fedbip_hub.engine.merge import MergedAdapter, MergePlan, personalize
from fedbip_hub.engine.similarity import SimilarityReport, compute_similarity
from fedbip_hub.engine.strategies import Strategy, WeightTable, compute_weights
from fedbip_hub.engine.task_vectors import Space, TaskVector
from fedbip_hub.errors import ConfigError


def load_task_vectors(folders: Sequence[str | Path], *, dtype: torch.dtype = torch.float32
                      ) -> list[TaskVector]:
    """Open each folder as a zero-start task vector, labelled by its folder name."""
    labels = _unique_labels(folders)
    return [TaskVector(LoraAdapter(folder, label=label), None, name=label, dtype=dtype)
            for folder, label in zip(folders, labels, strict=True)]


def _unique_labels(folders: Sequence[str | Path]) -> list[str]:
    names = [Path(f).resolve().name or str(f) for f in folders]
    if len(set(names)) == len(names):
        return names
    return [str(f) for f in folders]


def folder_similarity(folders: Sequence[str | Path], *, space: Space = "delta",
                      include_dense: bool = True) -> SimilarityReport:
    """Per-module Gram matrices of the given adapters (all granularities derive from it)."""
    return compute_similarity(load_task_vectors(folders), space=space,
                              include_dense=include_dense)


@dataclass
class OfflineMerge:
    """The result of ``merge_folders``: the adapter written, its weights, and the energy."""

    output: Path
    target: str
    weights: WeightTable
    merged: MergedAdapter
    clients: list[str]


def merge_folders(folders: Sequence[str | Path], target: int, strategy: Strategy,
                  out: str | Path) -> OfflineMerge:
    """Write client ``target``'s personalized adapter, merged from all the folders.

    Raises:
        ConfigError: the target index is out of range.
    """
    if not 0 <= target < len(folders):
        raise ConfigError(f"--for {target} is out of range for {len(folders)} adapters.",
                          hint=f"Pick an index from 0 to {len(folders) - 1} (input order), "
                          "or a client's name.")
    vectors = load_task_vectors(folders)
    report = None
    if strategy.spec.weighting == "similarity":
        report = compute_similarity(vectors, space=strategy.similarity_space,
                                    include_dense=strategy.include_dense_in_similarity)
    n_examples = [_n_examples(v) for v in vectors]
    weights = compute_weights(strategy, k=len(vectors), report=report, n_examples=n_examples,
                              clients=[v.name for v in vectors])
    template = vectors[target].upload.config
    rank = strategy.rank or template.r
    plan = MergePlan(targets=[target], contribution=torch.ones(len(vectors), dtype=torch.float64),
                     latest=[None])
    (merged,) = personalize(vectors, weights, plan, rank=rank, refactor=strategy.refactor,
                            space=strategy.spec.merge_space,
                            personal_heads=strategy.personal_heads)
    output = merged.save(out, template)
    return OfflineMerge(output, vectors[target].name, weights, merged, [v.name for v in vectors])


def _n_examples(vector: TaskVector) -> float:
    meta = UploadMetadata.read(vector.upload.folder, label=vector.name)
    return float(meta.n_examples) if meta is not None else 1.0
