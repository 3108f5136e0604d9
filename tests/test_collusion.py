"""Collusion and copying: copies count once, and weight bounds keep peers hidden.

*Neutralised* means here: a set of near-identical uploads from different members (a
Sybil's copies, a free-rider's copy of someone's adapter) is weighted exactly as its one
kept member would be if it had uploaded alone. So every other member's personalized
adapter is bitwise the one of the federation where only that member uploaded (the
copies' columns are 0, and no weight is renormalised over them), and the round record
lists the set under ``duplicates``.

``max_peer_weight`` caps any one peer's weight (the excess stays with self), and
``min_contributors`` turns a row that mixes too few contributors into self only: with a
single peer, that peer's update is solvable from one's own adapter and the published
weights, which the last test shows, and shows no longer possible with the bound.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    assert_same_adapters,
    new_local_federation,
    published_outputs,
    set_strategy,
    write_upload,
)

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine.robust import bound_weights, find_duplicates
from fedbip_hub.engine.weighting import WeightOptions, similarity_weights
from fedbip_hub.federation.client import init_federation, join, latest_personalized_revision, push
from fedbip_hub.federation.config import FederationConfig, LoraSpec
from fedbip_hub.federation.skip_reasons import describe_guards
from fedbip_hub.server.rounds import run_round

SYBILS = ["sybil-1", "sybil-2", "sybil-3"]


# -- the functions, against hand computation -------------------------------------------------
def _cos(k: int, pairs: dict[tuple[int, int], float]) -> torch.Tensor:
    cos = torch.eye(k, dtype=torch.float64)
    for (i, j), value in pairs.items():
        cos[i, j] = cos[j, i] = value
    return cos


def test_find_duplicates_groups_copies_by_cosine_and_norm():
    cos = _cos(6, {(0, 1): 0.6, (2, 3): 1.0, (2, 4): 0.995, (3, 4): 0.995, (0, 5): 0.999,
                   (1, 5): 0.5})
    norms = torch.tensor([1.0, 1.1, 2.0, 2.0, 2.06, 3.0], dtype=torch.float64)
    found = find_duplicates(cos, norms, fresh=[True] * 6)
    assert found.groups == [[2, 3, 4]] and found.kept == [2] and found.dropped == [3, 4]
    assert found.cosine == [0.995] and found.norm_ratio == pytest.approx([1.03])
    # (0, 5): cosine 0.999 but norms 1 and 3 (a scaled copy): the norm guard's business
    assert find_duplicates(cos, norms, fresh=[True] * 6, norm_tolerance=0.02).groups == [
        [2, 3]]
    assert find_duplicates(cos, norms, fresh=[True] * 6, min_cosine=0.999).groups == [[2, 3]]
    # a copy of an update applied in an earlier round (no new upload): that one is kept,
    # and since it is not shared this round, the fresh copies count for nothing
    stale = find_duplicates(cos, norms, fresh=[True, True, True, False, True, True])
    assert stale.kept == [3] and stale.dropped == [2, 4]
    # two inputs with no new upload: left alone (neither is shared this round)
    assert find_duplicates(cos, norms, fresh=[True, True, False, False, True, True]).groups \
        == [[2, 3, 4]]
    assert find_duplicates(cos, norms, fresh=[True, True, False, False, False, True]).groups \
        == []
    zero = find_duplicates(_cos(2, {(0, 1): 1.0}), torch.zeros(2), fresh=[True, True])
    assert zero.groups == []  # zero updates (no training) are no one's copies


def _zscore_by_hand(row: list[float], i: int, peers: list[int], self_share: float
                    ) -> list[float]:
    """The zscore rule written out: clip, standardise over the peers, clip, share."""
    values = [max(row[j], 0.0) for j in peers]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    z = [max((v - mean) / std if std > 1e-12 else v, 0.0) if v > 0 else 0.0 for v in values]
    out = [0.0] * len(row)
    out[i] = self_share
    for j, zj in zip(peers, z, strict=True):
        out[j] = (1 - self_share) * zj / sum(z)
    return out


def test_copies_weigh_exactly_as_one_upload_in_every_row():
    # 0, 1, 2 honest; 3 kept; 4, 5 its copies
    pairs = {(0, 1): 0.5, (0, 2): 0.1, (1, 2): 0.2, (0, 3): 0.3, (1, 3): 0.4, (2, 3): 0.05}
    pairs.update({(i, c): pairs[(i, 3)] for i in range(3) for c in (4, 5)})
    pairs.update({(3, 4): 1.0, (3, 5): 1.0, (4, 5): 1.0})
    cos = _cos(6, pairs)
    norms = torch.tensor([1.0, 1.2, 0.9, 1.5, 1.5, 1.5], dtype=torch.float64)
    found = find_duplicates(cos, norms, fresh=[True] * 6)
    assert found.groups == [[3, 4, 5]] and found.kept == [3]
    options = WeightOptions(rule="zscore", self_share=0.3)
    weights = similarity_weights(cos, options, found.mask(6))
    alone = similarity_weights(cos[:4, :4], options)  # the federation where 3 is alone
    assert torch.equal(weights[:4, :4], alone)
    # the copies weigh 0 in every row but their own (self)
    assert torch.equal(weights[:4, 4:], torch.zeros(4, 2))
    assert weights[4, 5] == weights[5, 4] == 0.0
    for i in range(3):
        peers = [j for j in range(4) if j != i]
        assert weights[i].tolist() == pytest.approx(
            [*_zscore_by_hand(cos[i, :4].tolist(), i, peers, 0.3), 0.0, 0.0], abs=1e-12)
    for copy in (4, 5):  # a copy's own row: as if it were the kept one, alone
        assert torch.equal(weights[copy, :3], alone[3, :3]) and weights[copy, copy] == 0.3
        assert weights[copy, 3] == 0.0  # never the kept one: it is itself


def _rows(matrix: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(matrix, torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_bound_weights_by_hand():
    w = torch.tensor([[0.3, 0.5, 0.2, 0.0], [0.2, 0.6, 0.2, 0.0],
                      [0.1, 0.1, 0.8, 0.0], [0.0, 0.9, 0.0, 0.1]], dtype=torch.float64)
    every = torch.ones(4, dtype=torch.bool)
    _rows(bound_weights(w, every, max_peer_weight=0.4),
          [[0.4, 0.4, 0.2, 0.0], [0.2, 0.6, 0.2, 0.0], [0.1, 0.1, 0.8, 0.0],
           [0.0, 0.4, 0.0, 0.6]])
    _rows(bound_weights(w, every, min_contributors=3),
          [[0.3, 0.5, 0.2, 0.0], [0.2, 0.6, 0.2, 0.0], [0.1, 0.1, 0.8, 0.0],
           [0.0, 0.0, 0.0, 1.0]])
    # a peer with weight but no update this round is not a contributor
    no_update = torch.tensor([True, True, False, True])
    _rows(bound_weights(w, no_update, min_contributors=3)[:1], [[1.0, 0.0, 0.0, 0.0]])
    _rows(bound_weights(w, every, max_peer_weight=0.4, min_contributors=3),
          [[0.4, 0.4, 0.2, 0.0], [0.2, 0.6, 0.2, 0.0], [0.1, 0.1, 0.8, 0.0],
           [0.0, 0.0, 0.0, 1.0]])


# -- in a round --------------------------------------------------------------------------------
def _push_copies(fed, root: Path, names: list[str], source: Path) -> None:
    """Each of ``names`` joins and pushes the same adapter (its own metadata and nonce)."""
    for name in names:
        join(fed, name)
        folder = root / f"copy-{name}"
        shutil.copytree(source, folder)
        push(fed, name, folder, n_examples=10)


def _sybil_federation(root: Path, tiny_base: Path, sybils: list[str], **strategy):
    fed = new_local_federation(root, tiny_base)
    if strategy:
        set_strategy(fed, **strategy)
    crafted = write_upload(fed.init_folder(), root / "crafted", seed=99, group=0, rank=4,
                           step=0.3)  # an update aimed at alice's and bob's task
    _push_copies(fed, root, sybils, crafted)
    return fed


def test_three_sybils_count_as_one(tmp_path, tiny_base):
    one = _sybil_federation(tmp_path / "one", tiny_base, SYBILS[:1])
    three = _sybil_federation(tmp_path / "three", tiny_base, SYBILS)
    reference, record = run_round(one), run_round(three)
    honest = list(CLIENTS)
    assert_same_adapters(published_outputs(three, honest), published_outputs(one, honest))
    [entry] = record["duplicates"]
    assert entry["members"] == SYBILS and entry["kept"] == "sybil-1"
    assert entry["cosine"] == pytest.approx(1.0) and entry["norm_ratio"] == pytest.approx(1.0)
    for key, rows in record["weights"].items():
        names = record["clients"]
        for i, client in enumerate(names):
            row = dict(zip(names, rows[i], strict=True))
            assert row["sybil-2"] == row["sybil-3"] == 0.0 or client in ("sybil-2",
                                                                          "sybil-3")
            if client in honest:
                assert row == pytest.approx({**dict(zip(reference["clients"],
                                                        reference["weights"][key][i],
                                                        strict=True)),
                                             "sybil-2": 0.0, "sybil-3": 0.0})
    guards = describe_guards(record)
    assert "duplicate of sybil-1" in guards["sybil-2"] and "duplicate" not in guards.get(
        "sybil-1", "")
    # the copies did not move the norm guard either: sybil-1 is judged as when alone (to
    # rounding: the norms come from Grams of different sizes, which BLAS blocks differently)
    judged, alone = record["norm_guard"]["sybil-1"], reference["norm_guard"]["sybil-1"]
    assert judged.keys() == alone.keys()
    for key, value in alone.items():
        assert judged[key] == (pytest.approx(value, rel=1e-7)
                               if isinstance(value, float) else value), key

    # Without the guard, under a rule that ranks peers within a row (zscore), the copies
    # take far more of an honest row than one copy does. (The evidence rule resists them on
    # its own: three copies lift the background they would have to stand out from.)
    off = _sybil_federation(tmp_path / "off", tiny_base, SYBILS, duplicate_cosine=None,
                            rule="zscore")
    attacked = run_round(off)
    assert attacked["duplicates"] == []
    reference = run_round(_sybil_federation(tmp_path / "one-z", tiny_base, SYBILS[:1],
                                            rule="zscore"))

    def share(rec: dict, client: str) -> float:
        names, rows = rec["clients"], rec["weights"]
        return max(sum(rows[key][names.index(client)][names.index(s)]
                       for s in SYBILS if s in names) for key in rows)

    assert share(attacked, "alice") > share(reference, "alice") + 0.1


def test_a_copy_of_another_members_adapter_is_noticed_and_counts_once(tmp_path, tiny_base):
    without = new_local_federation(tmp_path / "without", tiny_base)
    fed = new_local_federation(tmp_path / "with", tiny_base)
    repo = fed.member("bob").repo_id
    bob_upload = fed.store.fetch_folder(repo, fed.store.head(repo))
    source = tmp_path / "bob-copy"
    source.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(bob_upload / name, source / name)
    _push_copies(fed, tmp_path, ["mallory"], source)
    run_round(without)
    record = run_round(fed)
    assert record["duplicates"][0]["members"] == ["bob", "mallory"]
    assert record["duplicates"][0]["kept"] == "bob"
    assert_same_adapters(published_outputs(fed), published_outputs(without))  # bob included
    names = record["clients"]
    mallory = names.index("mallory")
    for rows in record["weights"].values():  # mallory's copy reaches no one, and
        assert all(rows[i][mallory] == 0.0 for i in range(len(names)) if i != mallory)
        assert rows[mallory][names.index("bob")] == 0.0  # bob's own update is not a peer's


def _delta(folder: Path) -> dict[str, torch.Tensor]:
    adapter = LoraAdapter(folder)
    return {m: adapter.delta_weight(m).double() for m in adapter.modules}


@pytest.mark.parametrize("bounded", [False, True])
def test_min_contributors_keeps_a_lone_peers_update_from_being_solved_for(
        bounded, tmp_path, tiny_base):
    """Two members: alice's adapter and her row of weights give bob's update exactly,
    unless min_contributors keeps her row to herself."""
    config = FederationConfig(name="k2", base_model=str(tiny_base), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8),
                              strategy={"method": "fedbip", "refactor": "cat",
                                        "rule": "normalize", "sign_guard": "off",
                                        **({"min_contributors": 3} if bounded else {})})
    fed = init_federation(str(tmp_path / "fed"), config)
    uploads = {}
    for seed, client in enumerate(("alice", "bob")):
        join(fed, client)
        uploads[client] = write_upload(fed.init_folder(), tmp_path / client, seed=seed,
                                       group=0, rank=4)
        push(fed, client, uploads[client], n_examples=10)
    record = run_round(fed)
    [row] = [record["weights"]["model"][0]]
    repo = fed.member("alice").repo_id
    merged = _delta(fed.store.fetch_folder(repo, latest_personalized_revision(fed, repo),
                                           "personalized"))
    tau = {c: _delta(uploads[c]) for c in uploads}  # the init's ΔW is 0 (B = 0)
    module = next(iter(merged))
    if not bounded:
        p_self, p_peer = row
        assert 0 < p_peer < 1
        solved = (merged[module] - p_self * tau["alice"][module]) / p_peer
        error = (solved - tau["bob"][module]).norm() / tau["bob"][module].norm()
        assert error < 1e-4  # bob's update, recovered from alice's own adapter
    else:
        assert row == [1.0, 0.0]  # self only: the adapter is alice's update alone
        error = (merged[module] - tau["alice"][module]).norm() / tau["alice"][module].norm()
        assert error < 1e-5
        merge_record = json.loads(fed.store.read_bytes(
            repo, "personalized/fedbip_merge.json", fed.store.head(repo)))
        assert merge_record["weights"]["model"] == {"alice": 1.0, "bob": 0.0}


def test_max_peer_weight_caps_every_row_in_a_round(tmp_path, tiny_base):
    fed = _sybil_federation(tmp_path, tiny_base, [], max_peer_weight=0.2,
                            rule="normalize")
    record = run_round(fed)
    names = record["clients"]
    for rows in record["weights"].values():
        for i, row in enumerate(rows):
            assert sum(row) == pytest.approx(1.0, abs=1e-5)
            assert all(w <= 0.2 + 1e-6 for j, w in enumerate(row) if j != i), (names[i], row)
    assert any(row[i] > 0.6 for rows in record["weights"].values()
               for i, row in enumerate(rows))  # the excess went to self
