"""Merge methods (FedBip, FedBip-L, FedAvg, FedIT, …) and the strategy config.

A method declares how it weighs peers, at which granularity, and in which space it
merges; the engine does the rest, so every baseline runs through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedbip_hub.errors import ConfigError
from fedbip_hub.layers import layer_of
from fedbip_hub.similarity import MODEL_KEY, CosineSource, Granularity
from fedbip_hub.task_vectors import Space
from fedbip_hub.weighting import (
    RuleName,
    WeightOptions,
    group_weights,
    local_weights,
    similarity_weights,
    size_weights,
    uniform_weights,
)

Weighting = Literal["similarity", "size", "uniform", "local", "oracle"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    description: str
    weighting: Weighting
    granularity: Granularity | None = None
    merge_space: Space = "delta"


METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("fedbip", "FedBip: one weight matrix from model-level task-vector cosines",
                "similarity", "model"),
    MergeMethod("fedbip-l", "FedBip-L: a weight matrix per transformer block",
                "similarity", "layer"),
    MergeMethod("fedbip-m", "FedBip per module (each LoRA-adapted linear layer)",
                "similarity", "module"),
    MergeMethod("fedavg", "FedAvg in ΔW space: data-size weights, exact", "size"),
    MergeMethod("fedit", "FedIT: data-size weights, A and B averaged separately", "size",
                merge_space="params"),
    MergeMethod("uniform", "uniform weights 1/K over all clients", "uniform"),
    MergeMethod("local", "local only: each client keeps its own update", "local"),
    MergeMethod("oracle", "uniform within the true task group (benchmarks only)", "oracle"),
)}


class Strategy(BaseModel):
    """Everything that decides how a round personalizes. Round-trips through JSON."""

    model_config = ConfigDict(extra="forbid")

    method: str = "fedbip-l"
    # Chosen by benchmarks/bench_quality.py (3 seeds): with few examples per client the
    # cosines are small and the paper's normalisation leaves most weight on self; a fixed
    # self share with z-scored peers came 1.1 points closer to the oracle.
    rule: RuleName = "zscore"
    clip_negative: bool = True
    temperature: float = Field(0.1, gt=0)
    top_k: int | None = Field(None, ge=0)
    self_floor: float | None = Field(None, ge=0, le=1)
    self_share: float = Field(0.3, ge=0, le=1)
    granularity: Granularity | None = Field(
        None, description="Override the method's similarity granularity.")
    similarity_space: Space = "delta"
    include_dense_in_similarity: bool = True
    rank: int | None = Field(None, gt=0, description="Output rank; default: the federation's r.")
    refactor: Literal["svd", "cat"] = "svd"
    staleness_beta: float = Field(0.5, ge=0)
    personal_heads: bool = False
    norm_guard: Literal["clip", "exclude", "off"] = "clip"
    norm_guard_threshold: float = Field(3.0, gt=0)
    sign_guard: Literal["exclude", "off"] = Field(
        "exclude", description="exclude: a fresh update that opposes ≥ sign_guard_min_peers "
        "peers more than it agrees with anyone contributes to no one else this round.")
    sign_guard_floor: float = Field(0.2, ge=0, le=1)
    sign_guard_min_peers: int = Field(2, ge=1)
    # Chosen by benchmarks/bench_quality.py and bench_adversarial.py: late rounds' task
    # vectors mostly fit label noise, and their cosines alone let a structured (hostile)
    # update become everyone's best peer. 0: this round only (the paper).
    similarity_memory: float = Field(
        1.0, ge=0, le=1, description="Decay γ of the similarity accumulated over rounds "
        "(fedbip_hub.memory); 0 uses this round's task vectors only, as the paper does.")
    # Scale (fedbip_hub.sketch): sketched similarity for large K, compute precision.
    similarity_mode: Literal["exact", "sketch", "auto"] = Field(
        "auto", description="auto: exact below sketch_threshold clients, sketched from it.")
    sketch_size: int = Field(256, gt=0, description="s of the s×d projections.")
    sketch_threshold: int = Field(256, ge=2, description="K from which auto sketches.")
    sketch_seed: int | None = Field(
        None, ge=0, description="Default: derived from the round's pinned inputs.")
    sketch_kind: Literal["gaussian", "rademacher"] = "gaussian"
    compute_dtype: Literal["fp32", "fp64"] = Field(
        "fp32", description="Merge and similarity precision (bf16 inputs are upcast).")
    # Collusion and copying (fedbip_hub.robust): near-identical uploads from different
    # members count once; optional bounds on what one peer weighs in anyone's adapter.
    duplicate_cosine: float | None = Field(
        0.99, gt=0, le=1, description="Task vectors with at least this cosine and norms "
        "within duplicate_norm_tolerance are copies: counted once. None: off.")
    duplicate_norm_tolerance: float = Field(0.05, ge=0, lt=1)
    min_contributors: int | None = Field(
        None, ge=1, description="A personalized adapter mixing fewer contributors (self "
        "included) keeps only self, so no single peer's update can be solved for from "
        "it. 3 or more hides each peer behind another.")
    max_peer_weight: float | None = Field(
        None, gt=0, le=1, description="Cap on any one peer's weight; the excess stays "
        "with self.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {sorted(METHODS)}")
        return value

    @model_validator(mode="after")
    def _sketch_needs_delta_space(self) -> Strategy:
        if self.similarity_mode == "sketch" and self.similarity_space != "delta":
            raise ValueError('similarity_mode "sketch" needs similarity_space "delta"')
        return self

    @property
    def spec(self) -> MergeMethod:
        return METHODS[self.method]

    @property
    def effective_granularity(self) -> Granularity | None:
        if self.spec.weighting != "similarity":
            return None
        return self.granularity or self.spec.granularity

    @property
    def weight_options(self) -> WeightOptions:
        return WeightOptions(rule=self.rule, clip_negative=self.clip_negative,
                             temperature=self.temperature, top_k=self.top_k,
                             self_floor=self.self_floor, self_share=self.self_share)

    @classmethod
    def parse(cls, method: str, **options: object) -> Strategy:
        """Build from CLI-style input, turning validation failures into ConfigError."""
        try:
            return cls(method=method, **options)
        except ValueError as exc:
            raise ConfigError(f"invalid strategy: {exc}",
                              hint=f"Methods: {', '.join(sorted(METHODS))}.") from exc


@dataclass
class WeightTable:
    """Personalized weights: one K×K matrix per similarity key (model, layer or module)."""

    granularity: Granularity | None
    matrices: dict[str, torch.Tensor]
    # Model-level weights for modules left out of the similarity (heads, when
    # include_dense_in_similarity is off), which have no matrix of their own.
    fallback: torch.Tensor | None = None

    def for_module(self, module: str) -> torch.Tensor:
        if self.granularity in (None, "model"):
            return self.matrices[MODEL_KEY]
        key = layer_of(module) if self.granularity == "layer" else module
        if key not in self.matrices and self.fallback is not None:
            return self.fallback
        return self.matrices[key]

    def to_json(self) -> dict[str, list[list[float]]]:
        return {k: [[round(float(x), 6) for x in row] for row in v]
                for k, v in self.matrices.items()}


def compute_weights(
    strategy: Strategy,
    *,
    k: int,
    report: CosineSource | None = None,
    n_examples: Sequence[float] | None = None,
    allowed: torch.Tensor | None = None,
    groups: Sequence[str] | None = None,
) -> WeightTable:
    """Weights for every client under a strategy.

    Args:
        k: the number of clients.
        report: similarity (needed by similarity-weighted methods).
        n_examples: per-client data sizes (FedAvg, FedIT); missing means equal.
        allowed: K×K bool, which peers each row may draw from.
        groups: true task groups (the oracle only).
    """
    weighting = strategy.spec.weighting
    if weighting == "similarity":
        if report is None:
            raise ConfigError(f"{strategy.method} needs task-vector similarities.")
        granularity = strategy.effective_granularity or "model"
        options = strategy.weight_options
        matrices = {key: similarity_weights(cos, options, allowed)
                    for key, cos in report.cosines(granularity).items()}
        fallback = (similarity_weights(report.model_cosine(), options, allowed)
                    if granularity != "model" else None)
        return WeightTable(granularity, matrices, fallback)
    if weighting == "size":
        matrix = size_weights(n_examples if n_examples is not None else [1.0] * k, allowed)
    elif weighting == "uniform":
        matrix = uniform_weights(k, allowed)
    elif weighting == "local":
        matrix = local_weights(k)
    else:
        if groups is None:
            raise ConfigError("the oracle method needs the true task groups.",
                              hint="The oracle exists for benchmarks, where groups are known.")
        matrix = group_weights(groups, allowed)
    return WeightTable(None, {MODEL_KEY: matrix})
