"""The norm guard: robust (median/MAD) outliers of task-vector norms, clipped or excluded."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    new_local_federation,
    published_outputs,
    push_scaled,
    set_strategy,
)

from fedbip_hub.engine.robust import norm_guard
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import run_round


def test_a_scaled_norm_is_an_outlier_with_the_cap_from_median_and_mad():
    norms = [1.0, 1.3, 0.8, 1.1, 100.0]
    logs = [math.log(n) for n in norms]
    center = statistics.median(logs)
    sigma = max(statistics.median(abs(x - center) for x in logs) * 1.4826, 0.1)
    result = norm_guard(torch.tensor(norms), threshold=3.0)
    assert result.outliers == [4]
    assert result.cap == pytest.approx(math.exp(center + 3.0 * sigma))
    assert float(result.scale[4]) * 100.0 == pytest.approx(result.cap)
    assert result.scale[:4].tolist() == [1.0] * 4
    assert "× the round's median" in result.explain(4)


def test_alike_norms_small_rounds_and_small_norms_are_left_alone():
    assert norm_guard(torch.tensor([2.0] * 6)).outliers == []
    assert norm_guard(torch.tensor([1.0, 500.0])).outliers == []  # too few to judge
    assert norm_guard(torch.tensor([1.0, 1.1, 0.9, 1e-4])).outliers == []  # only large ones


def _federation_with_attacker(root: Path, tiny_base: Path, guard: str) -> Federation:
    """CLIENTS plus mallory, whose whole update is scaled ×100."""
    fed = new_local_federation(root, tiny_base, method="fedbip-l")
    set_strategy(fed, norm_guard=guard)
    push_scaled(fed, root, "mallory", 100.0)
    return fed


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().norm() ** 2) for k in b))


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("honest"), tiny_base)
    run_round(fed)
    return published_outputs(fed)


def test_exclude_leaves_honest_clients_exactly_as_without_the_attacker(tmp_path, tiny_base,
                                                                       honest):
    fed = _federation_with_attacker(tmp_path, tiny_base, "exclude")
    record = run_round(fed)
    assert "excluded by the norm guard" in record["skipped"]["mallory"]
    assert record["norm_guard"]["mallory"]["action"] == "exclude"
    assert "mallory" not in record["outputs"]
    for client, tensors in published_outputs(fed).items():
        for key, value in honest[client].items():
            torch.testing.assert_close(tensors[key], value)
    assert run_round(fed)["status"] == "nothing-new"  # refused, not retried


def test_clip_bounds_the_damage_that_no_guard_lets_through(tmp_path, tiny_base, honest):
    off = _federation_with_attacker(tmp_path / "off", tiny_base, "off")
    clip = _federation_with_attacker(tmp_path / "clip", tiny_base, "clip")
    assert run_round(off)["norm_guard"] == {}
    record = run_round(clip)
    assert record["norm_guard"]["mallory"]["action"] == "clip"
    damage_off = _distance(published_outputs(off)["alice"], honest["alice"])
    damage_clip = _distance(published_outputs(clip)["alice"], honest["alice"])
    assert damage_clip < damage_off / 10
    assert sorted(record["outputs"]) == sorted([*CLIENTS, "mallory"])
