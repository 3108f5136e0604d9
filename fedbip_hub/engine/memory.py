"""Similarity memory: task-vector evidence accumulated over rounds.

A round's task vectors are one step of each client's training. In late rounds that step
mostly fits label noise, so one round's cosines say little about who shares a task, and a
client whose step stays structured (an attacker's, say) can look like the best peer of
everyone. The memory keeps, for every ordered pair (i, j) and similarity key,

    cross[i, j] = Σ_r γ^age · ⟨τ_i^r, τ_j^r⟩        own[i, j] = Σ_r γ^age · ‖τ_i^r‖²

over the rounds r in which the pair was compared (at least one of the two had a new
upload; a client without one is compared through its last task vector, as in the round).
Its cosine cross[i, j] / √(own[i, j]·own[j, i]) is the cosine between the two clients'
concatenated histories of updates, each round weighted by γ^age: a round with large
updates (the early ones) counts for more than a round of small, noisy ones. γ = 0 keeps
only this round: the paper's FedBip.

Both sums are linear in the per-module Gram matrices, so a memory kept per layer also
gives the model level. It is stored as one safetensors file in the federation repo and
replaced in the commit that completes the round, so a resumed round reads the same one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedbip_hub.engine.layers import layer_of, layer_sort_key
from fedbip_hub.engine.similarity import MODEL_KEY, Granularity, SimilarityReport, rounded_matrix
from fedbip_hub.errors import FedbipError

MEMORY_FILE = "similarity_memory.safetensors"
FORMAT_VERSION = "1"


def storage_granularity(granularity: Granularity) -> Granularity:
    """Memories are kept per layer at least, so the heatmap's layer panels always exist."""
    return "module" if granularity == "module" else "layer"


@dataclass
class SimilarityMemory:
    """Accumulated pair evidence, keyed like ``SimilarityReport.gram(granularity)``.

    Attributes:
        clients: the clients the matrices index (the union over past rounds).
        granularity: "layer" or "module": the keys of ``cross`` and ``own``.
        cross: key → K×K Σ γ^age ⟨τ_i, τ_j⟩ over the rounds the pair was compared.
        own: key → K×K Σ γ^age ‖τ_i‖² over the same rounds (row i's own norm).
    """

    clients: list[str] = field(default_factory=list)
    granularity: Granularity = "layer"
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    own: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- update --------------------------------------------------------------------------
    def updated(self, report: SimilarityReport, fresh: Sequence[bool], *,
                decay: float, scale: torch.Tensor | None = None) -> SimilarityMemory:
        """A new memory with this round's evidence added (``self`` is left unchanged).

        Args:
            report: this round's Gram matrices (its clients, after any exclusion).
            fresh: per report client, whether it has a new upload this round.
            decay: γ, the weight kept by a pair's earlier evidence each time it is compared.
            scale: per report client, the norm guard's factor (the merge's clipped update
                is what the memory remembers).
        """
        names = list(self.clients) + [c for c in report.clients if c not in self.clients]
        index = torch.tensor([names.index(c) for c in report.clients], dtype=torch.long)
        k_new, n = len(names), len(report.clients)
        fresh_t = torch.tensor(list(fresh), dtype=torch.bool)
        compared = fresh_t[:, None] | fresh_t[None, :]
        compared.fill_diagonal_(False)
        s = (torch.ones(n, dtype=torch.float64) if scale is None
             else scale.to(torch.float64))
        rows, cols = index[:, None].expand(n, n), index[None, :].expand(n, n)
        out = SimilarityMemory(names, self.granularity)
        grams = report.gram(self.granularity)
        for key in sorted(set(self.cross) | set(grams)):
            cross, own = self._grown(key, k_new)
            gram = grams.get(key)
            if gram is not None:
                gram = gram.to(torch.float64) * s[:, None] * s[None, :]
                norms = gram.diagonal()[:, None].expand(n, n)
                sel = (rows[compared], cols[compared])
                cross[sel] = decay * cross[sel] + gram[compared]
                own[sel] = decay * own[sel] + norms[compared]
            out.cross[key], out.own[key] = cross, own
        return out

    def without(self, clients: Iterable[str]) -> SimilarityMemory:
        """The same memory with these clients' rows and columns dropped."""
        drop = set(clients)
        keep = [i for i, c in enumerate(self.clients) if c not in drop]
        if len(keep) == len(self.clients):
            return self
        index = torch.tensor(keep, dtype=torch.long)
        pick = (index[:, None], index[None, :])
        return SimilarityMemory([self.clients[i] for i in keep], self.granularity,
                                {k: v[pick] for k, v in self.cross.items()},
                                {k: v[pick] for k, v in self.own.items()})

    def nonfinite_clients(self) -> set[str]:
        """Clients with a NaN or infinite entry in their row or column of any sum."""
        bad = torch.zeros(len(self.clients), dtype=torch.bool)
        for matrix in (*self.cross.values(), *self.own.values()):
            finite = torch.isfinite(matrix)
            bad |= ~finite.all(dim=1) | ~finite.all(dim=0)
        return {c for c, b in zip(self.clients, bad.tolist(), strict=True) if b}

    def _grown(self, key: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        cross = torch.zeros(k, k, dtype=torch.float64)
        own = torch.zeros(k, k, dtype=torch.float64)
        if key in self.cross:
            old = len(self.clients)
            cross[:old, :old] = self.cross[key]
            own[:old, :old] = self.own[key]
        return cross, own

    # -- reading -------------------------------------------------------------------------
    def view(self, report: SimilarityReport) -> SimilarityView:
        """The memory's cosines for the report's clients; a pair never compared falls
        back to this round's cosine."""
        index = torch.tensor([self.clients.index(c) for c in report.clients],
                             dtype=torch.long)
        pick = (index[:, None], index[None, :])
        # Both sums are linear in the Gram matrices: coarser levels are sums of finer ones.
        levels: dict[Granularity, dict[str, list[str]]] = {
            "model": {MODEL_KEY: list(self.cross)},
            "layer": {},
        }
        for key in sorted(self.cross, key=layer_sort_key):
            levels["layer"].setdefault(layer_of(key) if self.granularity == "module"
                                       else key, []).append(key)
        if self.granularity == "module":
            levels["module"] = {key: [key] for key in self.cross}
        cosines: dict[Granularity, dict[str, torch.Tensor]] = {}
        norms: dict[Granularity, dict[str, torch.Tensor]] = {}
        for level, groups in levels.items():
            fallback = report.cosines(level)
            cosines[level], norms[level] = {}, {}
            for key, members in groups.items():
                own = sum(self.own[m][pick] for m in members)
                cosines[level][key] = _memory_cosine(
                    sum(self.cross[m][pick] for m in members), own, fallback.get(key))
                # a client's remembered norm: its own sum over the most rounds compared
                norms[level][key] = (own.max(dim=1).values if own.numel()
                                     else own.new_zeros(0)).clamp_min(0).sqrt()
        return SimilarityView(list(report.clients), cosines, norms, this_round=report)

    # -- storage -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors = {}
        for key in self.cross:
            tensors[f"cross/{key}"] = self.cross[key].contiguous()
            tensors[f"own/{key}"] = self.own[key].contiguous()
        # One metadata key: safetensors writes a map's keys in no fixed order, and the
        # same memory should always be the same bytes.
        info = {"format": FORMAT_VERSION, "granularity": self.granularity,
                "clients": self.clients}
        return save_safetensors(tensors, metadata={"fedbip": json.dumps(info)})

    @classmethod
    def from_bytes(cls, raw: bytes, *, granularity: Granularity) -> SimilarityMemory:
        """Load a stored memory; one kept at another granularity starts afresh."""
        try:
            metadata = json.loads(_metadata(raw)["fedbip"])
            tensors = load_safetensors(raw)
        except Exception as exc:  # a corrupt memory must not stop the federation
            raise FedbipError(f"{MEMORY_FILE} in the federation repo is unreadable ({exc}).",
                              hint=f"Delete {MEMORY_FILE} from the federation repo: the "
                              "memory restarts from the next round.") from exc
        if metadata.get("granularity") != storage_granularity(granularity):
            return cls(granularity=storage_granularity(granularity))
        memory = cls(list(metadata["clients"]), metadata["granularity"])
        for name, tensor in tensors.items():
            kind, key = name.split("/", 1)
            (memory.cross if kind == "cross" else memory.own)[key] = tensor.to(torch.float64)
        return memory


def _metadata(raw: bytes) -> dict[str, str]:
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + header_len]).get("__metadata__", {})


def _memory_cosine(cross: torch.Tensor, own: torch.Tensor, fallback: torch.Tensor | None
                   ) -> torch.Tensor:
    denom = (own * own.T).clamp_min(0).sqrt()
    known = denom > 0
    if fallback is None:  # a key this round lacks: pairs never compared have no cosine
        fallback = torch.zeros_like(cross)
    cos = torch.where(known, cross / denom.clamp_min(1e-300), fallback.to(torch.float64))
    cos = cos.clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


@dataclass
class SimilarityView:
    """The memory's cosines for one round's clients, read like a ``SimilarityReport`` by
    the weights, the model cards and the heatmap."""

    clients: list[str]
    by_level: dict[Granularity, dict[str, torch.Tensor]]
    # level → key → K remembered norms √Σγ^age‖τ_i‖² (the evidence rule's centring)
    norms_by_level: dict[Granularity, dict[str, torch.Tensor]] = field(default_factory=dict)
    # this round's own cosines, for the evidence rule's round gate (fedbip_hub.engine.evidence)
    this_round: SimilarityReport | None = None

    def cosines(self, granularity: Granularity) -> dict[str, torch.Tensor]:
        if granularity not in self.by_level:
            raise ValueError(f"this memory is kept per layer; it has no {granularity} "
                             "cosines (set the strategy's granularity to module)")
        return dict(self.by_level[granularity])

    def level_norms(self, granularity: Granularity) -> dict[str, torch.Tensor]:
        return dict(self.norms_by_level.get(granularity, {}))

    def model_cosine(self) -> torch.Tensor:
        return self.by_level["model"][MODEL_KEY]

    def to_json(self) -> dict[str, object]:
        return {"model": rounded_matrix(self.model_cosine()),
                "layers": {k: rounded_matrix(v) for k, v in self.cosines("layer").items()}}


