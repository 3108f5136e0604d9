"""What a federation's repo holds: its layout, and the config, member and state records.

Federation repo layout: ``federation.json`` (config), ``members/<name>.json`` (one file
per member, so joins never collide and the history audits them), ``init/`` (the initial
adapter every first round starts from), ``state.json``, ``rounds/NNNNNN.json``, and a
``README.md`` dashboard. Client repos hold uploads at the root; the server writes only
under ``personalized/``.

The records are pydantic models; reading and writing them is ``fedbip_hub.federation.repo``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedbip_hub import __version__
from fedbip_hub.errors import ConfigError
from fedbip_hub.identity import client_name_problem, repo_id_problem

if TYPE_CHECKING:
    from fedbip_hub.engine.strategies import Strategy

FEDERATION_FILE = "federation.json"
STATE_FILE = "state.json"
INIT_DIR = "init"
MEMBERS_DIR = "members"
ROUNDS_DIR = "rounds"
PERSONALIZED_DIR = "personalized"
MERGE_RECORD = "fedbip_merge.json"

TaskType = Literal["SEQ_CLS", "CAUSAL_LM"]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LoraSpec(BaseModel):
    """The LoRA every member trains with (clients may differ in rank, never in modules)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    dropout: float = Field(0.05, ge=0, lt=1)


class Limits(BaseModel):
    """What the server (and ``fedbip push``) accepts from a client upload.

    The numeric bounds are checked for each client alone, in float64, before its numbers
    meet any other client's (fedbip_hub.server.validation): past them a single upload could
    overflow the round's float32 maths for everyone.
    """

    model_config = ConfigDict(extra="forbid")

    max_rank: int = Field(256, gt=0)
    max_adapter_mb: float = Field(4096, gt=0)
    max_scaling: float = Field(
        1e4, gt=0, description="Largest LoRA scaling s (alpha/r, or alpha/sqrt(r) with "
        "rsLoRA) of any module.")
    max_task_vector_norm: float = Field(
        1e6, gt=0, description="Largest Frobenius norm of a client's whole task vector.")
    max_factor_norm: float = Field(
        1e8, gt=0, description="Largest Frobenius norm of one module's task-vector factors "
        "(s·B and A, stacked with its start's), which bounds every Gram entry.")
    max_n_examples: int = Field(10**9, gt=0, le=10**15,
                                description="Largest n_examples an upload may declare.")


class FederationConfig(BaseModel):
    """``federation.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base_model: str
    base_revision: str | None = None
    task_type: TaskType = "SEQ_CLS"
    num_labels: int | None = None
    lora: LoraSpec = Field(default_factory=LoraSpec)
    strategy: dict = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    lease_minutes: float = Field(120, gt=0)
    # Publish personalized adapters (which mix peers' updates) into public member repos
    # too; by default a public member repo gets nothing until it is private again.
    allow_public_members: bool = False
    seed: int = 0
    created_at: str = Field(default_factory=utc_now)
    created_by: str | None = None
    fedbip_version: str = __version__

    def strategy_obj(self) -> Strategy:
        """The strategy; ConfigError when the stored one does not validate. Reading a
        config never validates it, so members can still train under a broken strategy."""
        from fedbip_hub.adapters.metadata import describe_error
        from fedbip_hub.engine.strategies import Strategy

        try:
            return Strategy.model_validate(self.strategy)
        except ValueError as exc:
            raise ConfigError(f"the strategy in {FEDERATION_FILE} is invalid "
                              f"({describe_error(exc)}).",
                              hint=f"Fix \"strategy\" in {FEDERATION_FILE} of the federation "
                              "repo.") from exc

    def runnable_strategy(self) -> Strategy:
        """The strategy, refused when a round could not run it from this config alone
        (the oracle without its groups): what ``fedbip init`` accepts."""
        from fedbip_hub.engine.strategies import oracle_groups

        strategy = self.strategy_obj()
        if strategy.spec.weighting == "oracle":
            oracle_groups(strategy, ())
        return strategy


class Member(BaseModel):
    """``members/<name>.json``: one member and the repo it pushes to."""

    name: str
    repo_id: str
    joined_at: str = Field(default_factory=utc_now, max_length=64)
    joined_by: str | None = Field(None, max_length=256)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if (problem := client_name_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str) -> str:
        if (problem := repo_id_problem(value)) is not None:
            raise ValueError(problem)
        return value


class ClientState(BaseModel):
    """What the server remembers about one member between rounds."""

    consumed_upload: str | None = None
    consumed_commit: str | None = None
    consumed_start: str | None = None
    consumed_n_examples: int = 1
    refused_upload: str | None = None
    refused_reason: str | None = None  # the round record's words, for `fedbip status`
    personalized_history: list[str] = Field(default_factory=list)
    last_round: int | None = None
    # An upload skipped for an internal error (a bug on the server's side): the version
    # and round that hit it. It is retried with other news or by another version only.
    internal_error_upload: str | None = None
    internal_error_version: str | None = None
    internal_error_round: int | None = None
    # The member repo's head as the last round left it (its publish, or the head it
    # looked at): while a listing shows it there, the member has nothing new.
    seen_head: str | None = None


class RoundRecordHeader(BaseModel):
    """What is checked of a ``rounds/NNNNNN.json`` record when it is read back."""

    model_config = ConfigDict(extra="allow")

    round: int = Field(ge=1)
    plan_id: str


class FederationState(BaseModel):
    """``state.json``: the last completed round, the round in progress, per-client state."""

    round: int = Field(0, ge=0)
    in_progress: dict | None = None
    clients: dict[str, ClientState] = Field(default_factory=dict)
    # The merge settings the last completed round ran under (fedbip_hub.federation.
    # settings) and their SHA-256: a round that finds them changed re-merges everyone.
    # None: no round recorded them yet (a federation from before fedbip recorded them).
    merge_settings: dict | None = None
    merge_fingerprint: str | None = None

    def client(self, name: str) -> ClientState:
        return self.clients.setdefault(name, ClientState())


def dump_json(model: BaseModel | dict) -> bytes:
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def round_record_path(number: int) -> str:
    return f"{ROUNDS_DIR}/{number:06d}.json"
