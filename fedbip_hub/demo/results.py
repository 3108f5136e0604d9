"""What ``results.json`` says of a run: each method's accuracies and round summaries
(from the server's round records), and the task-vector similarity AUCs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbip_hub.demo.metrics import group_auc, group_means, separation


@dataclass
class MethodResult:
    label: str
    strategy: dict
    accuracy: dict[str, float]
    rounds: list[dict]
    seconds: float
    uploads: dict[int, dict[str, Path]] = field(default_factory=dict, repr=False)
    federation: Any = field(default=None, repr=False)

    def to_json(self, groups: Mapping[str, str], shifted: Sequence[str]) -> dict:
        values = list(self.accuracy.values())
        shift = [self.accuracy[c] for c in shifted]
        return {
            "strategy": self.strategy,
            "accuracy": sum(values) / len(values),
            "accuracy_task_shift": sum(shift) / len(shift) if shift else None,
            "accuracy_per_group": group_means(self.accuracy, groups),
            "accuracy_per_client": self.accuracy,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 2),
        }


def round_summary(record: dict, groups: Mapping[str, str]) -> dict:
    clients = record.get("clients") or []
    summary = {
        "round": record.get("round"), "status": record.get("status"),
        "fresh": [c for c in clients if record["inputs"][c]["fresh"]] if clients else [],
        "staleness": {c: record["inputs"][c]["staleness"] for c in clients
                      if record["inputs"][c]["fresh"] and record["inputs"][c]["staleness"]},
        "skipped": record.get("skipped", {}),
        "sign_guard": sorted(record.get("sign_guard") or {}),
        "duplicates": [d["members"] for d in record.get("duplicates") or []],
        "task_vector": None,
    }
    cosine = (record.get("cosine") or {}).get("model")
    labels = [groups[c] for c in clients]
    if cosine is not None and len(set(labels)) > 1:
        layers = record["cosine"].get("layers") or {}
        summary["task_vector"] = separation(cosine, labels)
        summary["clients"] = clients
        summary["cosine"] = cosine
        summary["layer_cosine"] = layers
        summary["layer_auc"] = {layer: group_auc(m, labels) for layer, m in layers.items()}
        summary["weights"] = record.get("weights")
        memory = (record.get("memory_cosine") or {}).get("model")
        if memory is not None:  # what the weights used: the cosines accumulated so far
            summary["memory_auc"] = group_auc(memory, labels)
    return summary


def similarity_summary(results: Mapping[str, dict], raw_similarity: dict | None) -> dict:
    """Task-vector AUC per round (of every similarity method) and the raw AUC."""
    out: dict[str, Any] = {"raw_parameters_round1": raw_similarity}
    per_method = {}
    for label, result in results.items():
        rounds = [r for r in result["rounds"] if r.get("task_vector") is not None]
        if not rounds:
            continue
        aucs = [r["task_vector"]["auc"] for r in rounds]
        memory = [r["memory_auc"] for r in rounds if r.get("memory_auc") is not None]
        per_method[label] = {"round1": {**rounds[0]["task_vector"],
                                        "round": rounds[0]["round"]},
                             "auc_per_round": aucs,
                             "auc_mean": sum(aucs) / len(aucs),
                             "memory_auc_per_round": memory or None,
                             "memory_auc_mean": sum(memory) / len(memory) if memory
                             else None}
    out["task_vectors"] = per_method
    return out
