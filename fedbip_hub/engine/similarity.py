"""Task-vector similarity between clients at module, layer and model granularity."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from fedbip_hub.engine.compute import CPU, delta_to, resolve_device
from fedbip_hub.engine.layers import layer_of, layer_sort_key
from fedbip_hub.engine.lowrank import cosine_from_gram, dense_gram, lowrank_gram
from fedbip_hub.engine.task_vectors import (
    DenseDelta,
    LowRankDelta,
    ParamsDelta,
    Space,
    TaskVector,
    check_compatible,
    check_params_ranks,
)

Granularity = Literal["model", "layer", "module"]
GRANULARITIES: tuple[Granularity, ...] = ("model", "layer", "module")
MODEL_KEY = "model"


def module_gram(deltas: Sequence[LowRankDelta | ParamsDelta | DenseDelta]) -> torch.Tensor:
    """Gram matrix of one module's deltas across K clients."""
    if all(isinstance(d, LowRankDelta) for d in deltas):
        return lowrank_gram([d.u for d in deltas], [d.v for d in deltas])
    if all(isinstance(d, ParamsDelta) for d in deltas):
        return dense_gram([d.flat() for d in deltas])
    if all(isinstance(d, DenseDelta) for d in deltas):
        return dense_gram([d.value for d in deltas])
    raise TypeError("a module's deltas must all be of one kind")


class CosineSource(Protocol):
    """What weights, model cards and heatmaps read: one round's report, or the memory's
    view of it (fedbip_hub.engine.memory)."""

    clients: list[str]

    def cosines(self, granularity: Granularity) -> dict[str, torch.Tensor]: ...

    def model_cosine(self) -> torch.Tensor: ...


@dataclass
class SimilarityReport:
    """Per-module Gram matrices of K clients, from which every granularity is summed."""

    clients: list[str]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)

    def layers(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for module in self.grams:
            groups.setdefault(layer_of(module), []).append(module)
        return {k: groups[k] for k in sorted(groups, key=layer_sort_key)}

    def gram(self, granularity: Granularity) -> dict[str, torch.Tensor]:
        if granularity == "module":
            return dict(self.grams)
        if granularity == "layer":
            return {layer: sum(self.grams[m] for m in modules)
                    for layer, modules in self.layers().items()}
        return {MODEL_KEY: sum(self.grams.values())}

    def cosines(self, granularity: Granularity) -> dict[str, torch.Tensor]:
        return {key: cosine_from_gram(g) for key, g in self.gram(granularity).items()}

    def model_cosine(self) -> torch.Tensor:
        return self.cosines("model")[MODEL_KEY]

    def level_norms(self, granularity: Granularity) -> dict[str, torch.Tensor]:
        """‖τ_k‖_F per key of a granularity."""
        return {key: g.diagonal().clamp_min(0).sqrt() for key, g in self.gram(granularity).items()}

    def norms(self) -> torch.Tensor:
        """‖τ_k‖_F over the whole model."""
        return self.gram("model")[MODEL_KEY].diagonal().clamp_min(0).sqrt()

    def subset(self, keep: list[int]) -> SimilarityReport:
        """The same report restricted to some clients (in the given order)."""
        index = torch.tensor(keep, dtype=torch.long)
        return SimilarityReport([self.clients[k] for k in keep],
                                {m: g[index][:, index] for m, g in self.grams.items()})

    def to_json(self, *, modules: bool = False) -> dict:
        """JSON view: ``model`` is the K×K cosine, ``layers`` maps block → K×K."""
        out = {
            "clients": list(self.clients),
            "model": rounded_matrix(self.model_cosine()),
            "layers": {k: rounded_matrix(v) for k, v in self.cosines("layer").items()},
            "norms": [float(x) for x in self.norms()],
        }
        if modules:
            out["modules"] = {k: rounded_matrix(v) for k, v in self.cosines("module").items()}
        return out


def rounded_matrix(matrix: torch.Tensor, digits: int = 6) -> list[list[float]]:
    return [[round(float(x), digits) for x in row] for row in matrix]


def compute_similarity(
    vectors: Sequence[TaskVector],
    *,
    space: Space = "delta",
    include_dense: bool = True,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SimilarityReport:
    """Stream over modules: read one module's factors for all K clients, keep its Gram.

    Args:
        vectors: the clients' task vectors (same modules and shapes).
        space: "delta" (exact ΔW inner products) or "params" (paper-literal (A, B) deltas).
        include_dense: whether modules_to_save tensors (heads) count towards similarity.
        progress: wraps the module iterator (a tqdm, say).
        device: where the Gram maths runs ("cpu", "cuda", "auto"; default: where the
            factors are read, the CPU); the Gram matrices come back to the CPU.
        dtype: compute dtype; inputs are upcast to it, never narrowed (default: as read).
    """
    check_compatible(list(vectors))
    report = SimilarityReport(clients=[v.name for v in vectors])
    if not vectors:
        return report
    names = list(vectors[0].lora_modules)
    if include_dense:
        names += vectors[0].dense_params
    iterator = progress(names) if progress else names
    target = resolve_device(device) if device is not None else None
    for module in iterator:
        deltas = [delta_to(v.delta(module, space), target, dtype) for v in vectors]
        check_params_ranks(module, deltas, report.clients)
        report.grams[module] = module_gram(deltas).to(device=CPU, dtype=torch.float64)
        del deltas  # one module's K factors in memory at a time, not two
    return report
