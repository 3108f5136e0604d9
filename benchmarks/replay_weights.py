"""Replay weighting rules offline on what a server saw (``bench_realmodel.py --dump``).

A dump holds, per scenario-seed and method, every round's record and the similarity
memory it committed. This script rebuilds each round's memory view (cosines and norms at
the model and layer levels) from the memory's sums, runs ``compute_weights`` for each
candidate strategy on it, and compares the weights with the oracle's (uniform within the
true group): the mean mass on self, same-group and cross-group peers, the L1 distance to
the oracle's row, and the rows of clients with no true peer.

Each view also carries the round's own cosines from its record (the round gate's).
Round 1's views are the same for every rule (round 1 starts from the federation's initial
adapter); later rounds' depend on the rule that ran, so judge round 1 and confirm end to
end. Run from the repository root::

    .venv/bin/python benchmarks/replay_weights.py DUMP \\
        --candidates '{"default": {}, "centred": {"evidence_centre": "gram"}}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedbip_hub.engine.memory import SimilarityMemory, SimilarityView  # noqa: E402
from fedbip_hub.engine.similarity import MODEL_KEY, cosine_from_gram  # noqa: E402
from fedbip_hub.engine.strategies import Strategy, compute_weights  # noqa: E402


@dataclass
class ReplayRound:
    """One round as the server saw it: its clients, their true groups, the memory."""

    scenario: str
    round: int
    clients: list[str]
    groups: list[str]
    grams: dict[str, torch.Tensor]  # layer → the memory's K×K Gram (Σ γ^age ⟨τ_i, τ_j⟩)
    # this round's own cosines, from the record (the evidence rule's round gate reads them)
    current: SimilarityView | None = None

    def view(self) -> SimilarityView:
        total = sum(self.grams.values())

        def norms(gram: torch.Tensor) -> torch.Tensor:
            return gram.diagonal().clamp_min(0).sqrt()

        return SimilarityView(
            list(self.clients),
            {"model": {MODEL_KEY: cosine_from_gram(total)},
             "layer": {k: cosine_from_gram(g) for k, g in self.grams.items()}},
            {"model": {MODEL_KEY: norms(total)},
             "layer": {k: norms(g) for k, g in self.grams.items()}},
            this_round=self.current)  # type: ignore[arg-type]


def record_cosines(record: dict) -> SimilarityView:
    """This round's model and per-layer cosines as the round record stores them."""
    def matrix(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float64)

    return SimilarityView(list(record["clients"]), {
        "model": {MODEL_KEY: matrix(record["cosine"]["model"])},
        "layer": {k: matrix(v) for k, v in record["cosine"]["layers"].items()}})


def memory_grams(memory: SimilarityMemory, clients: Sequence[str]) -> dict[str, torch.Tensor]:
    """The memory's sums as Gram matrices: cross off the diagonal, a client's remembered
    own norm (over the most rounds compared) on it."""
    index = torch.tensor([memory.clients.index(c) for c in clients], dtype=torch.long)
    pick = (index[:, None], index[None, :])
    out = {}
    for key, cross in memory.cross.items():
        gram = cross[pick].clone()
        gram.fill_diagonal_(0.0)
        out[key] = gram + torch.diag(memory.own[key][pick].max(dim=1).values)
    return out


def load_dump(dump: Path, method: str = "fedbip-l") -> list[ReplayRound]:
    """Every round of ``method`` in every scenario-seed folder of a dump."""
    rounds = []
    for folder in sorted(p for p in dump.iterdir() if (p / "run.json").exists()):
        groups = json.loads((folder / "run.json").read_text())["groups"]
        for path in sorted((folder / method).glob("round-*.json")):
            number = path.stem.split("-")[1]
            record = json.loads(path.read_text())
            memory = SimilarityMemory.from_bytes(
                (folder / method / f"memory-{number}.safetensors").read_bytes(),
                granularity="layer")
            clients = record["clients"]
            rounds.append(ReplayRound(folder.name, int(number), clients,
                                      [groups[c] for c in clients],
                                      memory_grams(memory, clients), record_cosines(record)))
    return rounds


def row_stats(rnd: ReplayRound, strategy: Strategy) -> list[dict[str, float | bool | str]]:
    """Per weight matrix and row: self, same-group and cross-group mass, L1 to the oracle."""
    table = compute_weights(strategy, k=len(rnd.clients), report=rnd.view(),
                            clients=rnd.clients)
    same = torch.tensor([[a == b for b in rnd.groups] for a in rnd.groups])
    eye = torch.eye(len(rnd.clients), dtype=torch.bool)
    oracle = same.double() / same.sum(dim=1, keepdim=True)
    rows = []
    for matrix in table.matrices.values():
        for i in range(len(rnd.clients)):
            rows.append({"scenario": rnd.scenario, "round": rnd.round,
                         "singleton": bool(same[i].sum() == 1),
                         "self": float(matrix[i, i]),
                         "same": float(matrix[i][same[i] & ~eye[i]].sum()),
                         "cross": float(matrix[i][~same[i]].sum()),
                         "l1": float((matrix[i] - oracle[i]).abs().sum())})
    return rows


def summarise(rows: Sequence[dict]) -> dict[str, float]:
    if not rows:
        return {}
    out = {k: statistics.mean(float(r[k]) for r in rows)
           for k in ("self", "same", "cross", "l1")}
    out["max_cross"] = max(float(r["cross"]) for r in rows)
    return out


def replay(rounds: Sequence[ReplayRound], candidates: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for label, options in candidates.items():
        strategy = Strategy(**{"method": "fedbip-l", **options})
        rows = [r for rnd in rounds for r in row_stats(rnd, strategy)]
        out[label] = {
            "all": summarise(rows),
            "round_1": summarise([r for r in rows if r["round"] == 1]),
            "singletons": summarise([r for r in rows if r["singleton"]]),
            "per_scenario": {s: summarise([r for r in rows if r["scenario"] == s])
                             for s in dict.fromkeys(str(r["scenario"]) for r in rows)},
        }
    return out


def _line(stats: dict[str, float]) -> str:
    if not stats:
        return "–"
    return (f"self {stats['self']:.2f} same {stats['same']:.2f} cross {stats['cross']:.3f} "
            f"L1 {stats['l1']:.2f} max cross {stats['max_cross']:.2f}")


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path, nargs="+")
    parser.add_argument("--candidates", default='{"default": {}}',
                        help='JSON {"label": {strategy options}} (method fedbip-l unless set)')
    parser.add_argument("--method", default="fedbip-l", help="whose rounds to replay")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rounds = [r for d in args.dump for r in load_dump(d, args.method)]
    result = replay(rounds, json.loads(args.candidates))
    for label, entry in result.items():
        print(f"{label}: {_line(entry['all'])}")
        print(f"    round 1: {_line(entry['round_1'])}")
        print(f"    singletons: {_line(entry['singletons'])}")
        for name, stats in entry["per_scenario"].items():
            print(f"    {name}: {_line(stats)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
