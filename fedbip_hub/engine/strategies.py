"""Merge methods (FedBip, FedBip-L, FedAvg, FedIT, …) and the strategy config.

A method declares how it weighs peers, at which granularity, and in which space it
merges; the engine does the rest, so every baseline runs through the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedbip_hub.engine.evidence import evidence_caps, evidence_inputs, round_source
from fedbip_hub.engine.layers import layer_of
from fedbip_hub.engine.similarity import MODEL_KEY, CosineSource, Granularity
from fedbip_hub.engine.task_vectors import Space
from fedbip_hub.engine.weighting import (
    RuleName,
    WeightOptions,
    group_weights,
    local_weights,
    similarity_weights,
    size_weights,
    uniform_weights,
)
from fedbip_hub.errors import ConfigError, did_you_mean

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
    # Chosen on benchmarks/bench_realmodel.py (MiniLM-L6) and bench_quality.py together:
    # on a real encoder every update shares a component, so cross-task cosines are
    # positive; rules that rank peers within a row (zscore, the paper's) hand them weight,
    # while the evidence rule weighs a peer only as far as it stands out from that
    # background (weighting.evidence_weights).
    rule: RuleName = "evidence"
    clip_negative: bool = True
    temperature: float = Field(0.1, gt=0)
    top_k: int | None = Field(None, ge=0)
    self_floor: float | None = Field(None, ge=0, le=1)
    self_share: float = Field(0.3, ge=0, le=1)
    # The evidence rule (weighting.evidence_weights): thresholds in robust standard
    # deviations of the background of unrelated pairs.
    evidence_low: float = Field(1.0, ge=0, le=20)
    evidence_high: float = Field(3.0, gt=0, le=50)
    evidence_min_pairs: int = Field(3, ge=1, le=10_000)
    evidence_prior_background: float = Field(0.0, ge=-1, le=1)
    evidence_prior_spread: float = Field(0.1, gt=0, le=2)
    evidence_spread_floor: float = Field(0.05, gt=0, le=2)
    # Chosen on bench_realmodel.py and bench_quality.py together: federations of up to
    # 10 clients keep the ramp; at K = 24 the worst group against local training went
    # from −13.1 to −2.9 points (k12: −0.5 on the mean; bench_quality: −0.1).
    evidence_ramp_peers: int | None = Field(
        9, ge=1, le=1_000_000, description="The number of peers the evidence ramp is "
        "meant for: a client with more shifts the ramp up so that unrelated peers lend "
        "its row no more credibility by chance than this many would "
        "(engine.evidence.ramp_shift). None: the ramp is the same at any K.")
    evidence_model_gate: bool = Field(
        True, description="Per-layer (module) credibility is capped by the model-level "
        "credibility: a peer needs evidence in the layer and overall.")
    # Per-layer cosines of a few examples are noisy; halfway to the model level won on
    # both benchmarks (benchmarks/README.md, "Real-model benchmark").
    evidence_layer_shrinkage: float = Field(
        0.5, ge=0, le=1, description="The evidence rule's per-layer (or per-module) cosines "
        "are shrunk toward the model level by this fraction: λ·c_model + (1−λ)·c_layer.")
    # Chosen on bench_realmodel.py (the failing k10/k12 seeds), bench_quality.py and the
    # demo together (benchmarks/README.md, "Real-model benchmark").
    evidence_centre: Literal["off", "gram", "unit"] = Field(
        "unit", description="The evidence rule's cosines are taken between centred task "
        "vectors τ_i − mean(τ) (weighting.centred_cosine): gram weighs each client by "
        "its norm in the mean, unit by its direction alone; off: raw cosines.")
    evidence_centre_raw_gate: bool = Field(
        False, description="With centring, a pair also needs evidence in the raw "
        "(uncentred) model-level cosines: subtracting the mean makes small groups that "
        "both differ from a large one look alike.")
    evidence_round_gate: bool = Field(
        False, description="Reading the similarity memory, a pair's credibility is also "
        "capped by its credibility in this round's own cosines (fedbip_hub.engine.evidence): "
        "clients whose updates have stopped agreeing stop sharing weight.")
    evidence_centre_min_clients: int = Field(
        4, ge=3, description="Centre only from this many clients on; below, the raw "
        "cosines are used (two centred vectors are always opposite).")
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
        "(fedbip_hub.engine.memory); 0 uses this round's task vectors only, as the paper does.")
    # Scale (fedbip_hub.engine.sketch): sketched similarity for large K, compute precision.
    similarity_mode: Literal["exact", "sketch", "auto"] = Field(
        "auto", description="auto: exact below sketch_threshold clients, sketched from it.")
    sketch_size: int = Field(256, gt=0, description="s of the s×d projections.")
    sketch_threshold: int = Field(256, ge=2, description="K from which auto sketches.")
    sketch_seed: int | None = Field(
        None, ge=0, description="Default: derived from the round's pinned inputs.")
    sketch_kind: Literal["gaussian", "rademacher"] = "gaussian"
    compute_dtype: Literal["fp32", "fp64"] = Field(
        "fp32", description="Merge and similarity precision (bf16 inputs are upcast).")
    groups: dict[str, str] | None = Field(
        None, description="The oracle's true task groups, client → group (benchmarks, "
        "where they are known); run_round(groups=...) overrides them.")
    max_size_share: float | None = Field(
        None, gt=0, le=1, description="Cap on any one client's share of data-size weights "
        "(fedavg, fedit), by water-filling; None: no cap.")
    # Collusion and copying (fedbip_hub.engine.robust): near-identical uploads from different
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

    @field_validator("groups")
    @classmethod
    def _group_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        from fedbip_hub.identity import client_name_problem

        for client, group in (value or {}).items():
            if (problem := client_name_problem(client)) is not None:
                raise ValueError(f"groups: {problem}")
            if not group:
                raise ValueError(f"groups: {client} has an empty group")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}.{did_you_mean(value, METHODS)}")
        return value

    @model_validator(mode="after")
    def _evidence_ramp_rises(self) -> Strategy:
        if self.evidence_high <= self.evidence_low:
            raise ValueError("evidence_high must be above evidence_low")
        return self

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
                             self_floor=self.self_floor, self_share=self.self_share,
                             evidence_low=self.evidence_low, evidence_high=self.evidence_high,
                             evidence_min_pairs=self.evidence_min_pairs,
                             evidence_prior_background=self.evidence_prior_background,
                             evidence_prior_spread=self.evidence_prior_spread,
                             evidence_spread_floor=self.evidence_spread_floor,
                             evidence_ramp_peers=self.evidence_ramp_peers)

    @classmethod
    def parse(cls, method: str, **options: object) -> Strategy:
        """Build from CLI-style input, turning validation failures into ConfigError."""
        from pydantic import ValidationError

        from fedbip_hub.errors import describe_validation_error

        try:
            return cls(method=method, **options)
        except ValidationError as exc:  # readable, with near matches, not pydantic's dump
            raise ConfigError(
                f"invalid strategy: {describe_validation_error(exc, cls.model_fields)}",
                hint=f"Methods: {', '.join(sorted(METHODS))}; the options are the fields of "
                "fedbip_hub.engine.strategies.Strategy (README: Strategy options).") from exc
        except ValueError as exc:
            raise ConfigError(f"invalid strategy: {exc}",
                              hint=f"Methods: {', '.join(sorted(METHODS))}.") from exc


ORACLE_GROUPS_HINT = (
    "Give every client's true task group in the strategy options, e.g. --strategy-options "
    '\'{"groups": {"alice": "sentiment", "bob": "topic"}}\' (the oracle exists for '
    "benchmarks, where the groups are known).")


def oracle_groups(strategy: Strategy, clients: Sequence[str],
                  groups: Mapping[str, str] | None = None) -> list[str]:
    """The oracle's true group of each client: from ``groups`` when given (a benchmark's,
    which wins), else from ``strategy.groups``.

    Raises:
        ConfigError: no groups at all, or a client without one (named).
    """
    mapping = groups if groups is not None else strategy.groups
    if mapping is None:
        raise ConfigError("the oracle method needs the true task groups (strategy option "
                          "\"groups\").", hint=ORACLE_GROUPS_HINT)
    for client in clients:
        if client not in mapping:
            raise ConfigError(f"{client} has no group in the oracle's groups.",
                              hint=f"Add {client} to the strategy's \"groups\" "
                              "(federation.json), or drop the oracle.", client=client)
    return [mapping[c] for c in clients]


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
    clients: Sequence[str] | None = None,
    population: torch.Tensor | None = None,
) -> WeightTable:
    """Weights for every client under a strategy.

    Args:
        k: the number of clients.
        report: similarity (needed by similarity-weighted methods).
        n_examples: per-client data sizes (FedAvg, FedIT); missing means equal.
        allowed: K×K bool, which peers each row may draw from.
        groups: true task groups (the oracle only); default: ``strategy.groups`` looked
            up by ``clients``' names.
        population: K bools, the clients whose pairs make up the evidence rule's
            background (default: all; the round leaves out copies and held-back updates).
    """
    weighting = strategy.spec.weighting
    if weighting == "similarity":
        if report is None:
            raise ConfigError(f"{strategy.method} needs task-vector similarities.")
        granularity = strategy.effective_granularity or "model"
        options = strategy.weight_options
        if options.rule != "evidence":
            matrices = {key: similarity_weights(cos, options, allowed)
                        for key, cos in report.cosines(granularity).items()}
            fallback = (similarity_weights(report.model_cosine(), options, allowed)
                        if granularity != "model" else None)
            return WeightTable(granularity, matrices, fallback)
        inputs = evidence_inputs(strategy, report, granularity, k, population)
        caps = {key: inputs.cap for key in inputs.cosines}
        fallback_cap = inputs.fallback_cap
        current = round_source(report) if strategy.evidence_round_gate else None
        if current is not None:
            caps, fallback_cap = evidence_caps(strategy, inputs, current, granularity, k,
                                               population)
        matrices = {key: similarity_weights(cos, options, allowed, cap=caps[key],
                                            population=population)
                    for key, cos in inputs.cosines.items()}
        fallback = (similarity_weights(inputs.model_cos, options, allowed, cap=fallback_cap,
                                       population=population)
                    if granularity != "model" else None)
        return WeightTable(granularity, matrices, fallback)
    if weighting == "size":
        matrix = size_weights(n_examples if n_examples is not None else [1.0] * k, allowed,
                              max_share=strategy.max_size_share)
    elif weighting == "uniform":
        matrix = uniform_weights(k, allowed)
    elif weighting == "local":
        matrix = local_weights(k)
    else:
        if groups is None:
            if clients is None and strategy.groups is not None:
                raise ConfigError("the oracle reads strategy.groups by client name; "
                                  "pass the clients' names.")
            groups = oracle_groups(strategy, clients or ())
        matrix = group_weights(groups, allowed)
    return WeightTable(None, {MODEL_KEY: matrix})
