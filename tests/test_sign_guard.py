"""The sign guard: an update that mirrors a group of peers is shared with no one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    new_local_federation,
    published_outputs,
    push_scaled,
    run_cli,
    set_strategy,
)

from fedbip_hub.engine.robust import sign_guard
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.skip_reasons import describe_guards
from fedbip_hub.server.rounds import run_round


def _cosines(vectors: torch.Tensor) -> torch.Tensor:
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    return unit @ unit.T


def _groups(gen: torch.Generator, sizes: list[int], dim: int = 400,
            noise: float = 0.8) -> torch.Tensor:
    """Clients of near-orthogonal tasks: a shared direction per group plus own noise."""
    rows = []
    for size in sizes:
        direction = torch.randn(dim, generator=gen, dtype=torch.float64)
        rows += [direction + noise * torch.randn(dim, generator=gen, dtype=torch.float64)
                 for _ in range(size)]
    return torch.stack(rows)


def test_a_flipped_group_member_is_flagged_and_honest_clients_are_not():
    gen = torch.Generator().manual_seed(0)
    honest = _groups(gen, [3, 2, 2, 1])  # the last client is alone on its task
    attacker = -(honest[0] + 0.8 * torch.randn(400, generator=gen, dtype=torch.float64))
    cos = _cosines(torch.cat([honest, attacker[None]]))
    result = sign_guard(cos)
    assert result.flagged == [8]
    assert result.opposed[8] == [0, 1, 2]
    assert "opposes alice, bob, carol" in result.explain(
        8, ["alice", "bob", "carol", "d", "e", "f", "g", "h", "mallory"])


def test_rules_edges_floor_min_peers_and_support():
    # Opposition weaker than the floor is near-orthogonal noise, never a flag.
    weak = torch.tensor([[1.0, -0.15, -0.15], [-0.15, 1.0, 0.5], [-0.15, 0.5, 1.0]])
    assert sign_guard(weak).flagged == []
    assert sign_guard(weak, floor=0.1).flagged == [0]
    # Opposing one client only is a conflict of two tasks, not a mirror of a group.
    pair = torch.tensor([[1.0, -0.6, 0.1], [-0.6, 1.0, 0.1], [0.1, 0.1, 1.0]])
    assert sign_guard(pair).flagged == []
    assert sign_guard(pair, min_opposed=1).flagged == [0, 1]
    # A client that agrees with someone more than it opposes anyone is not flagged.
    supported = torch.tensor([[1.0, 0.7, -0.5, -0.5], [0.7, 1.0, 0.0, 0.0],
                              [-0.5, 0.0, 1.0, 0.6], [-0.5, 0.0, 0.6, 1.0]])
    assert sign_guard(supported).flagged == []


def _with_flipped_client(root: Path, tiny_base: Path, **options: object) -> Federation:
    """CLIENTS (alice and bob share a task) plus mallory, who pushes the exact negation
    of a group-0 update: ΔW → −ΔW (B negated), head → start − (head − start)."""
    fed = new_local_federation(root, tiny_base, method="fedbip-l")
    set_strategy(fed, **options)
    push_scaled(fed, root, "mallory", -1.0)
    return fed


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("honest"), tiny_base)
    run_round(fed)
    return published_outputs(fed)


def test_the_flipped_client_reaches_no_one_and_honest_clients_are_as_without_it(
        tmp_path, tiny_base, honest):
    fed = _with_flipped_client(tmp_path, tiny_base)
    record = run_round(fed)
    assert sorted(record["sign_guard"]) == ["mallory"]
    assert record["sign_guard"]["mallory"]["opposes"] == ["alice", "bob"]
    column = record["clients"].index("mallory")
    for key, matrix in record["weights"].items():
        for row, client in enumerate(record["clients"]):
            if client != "mallory":
                assert matrix[row][column] == 0.0, (key, client)
    assert "mallory" in record["outputs"]  # it keeps its own update: nothing is refused
    assert fed.state().client("mallory").refused_upload is None
    for client, tensors in published_outputs(fed).items():
        for key, value in honest[client].items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)


def test_without_the_guard_the_flipped_client_is_weighed_in(tmp_path, tiny_base, honest):
    """The counterfactual: under a rule that ranks peers within a row (zscore), the guard,
    not the weighting, is what keeps mallory out. (The evidence rule gives a mirrored
    update nothing on its own: it stands out from no background.)"""
    fed = _with_flipped_client(tmp_path, tiny_base, sign_guard="off", rule="zscore")
    record = run_round(fed)
    assert record["sign_guard"] == {}
    column = record["clients"].index("mallory")
    received = max(matrix[row][column] for matrix in record["weights"].values()
                   for row, client in enumerate(record["clients"]) if client != "mallory")
    assert received > 0.0


def test_guards_are_shown_on_the_dashboard_and_in_the_job_summary(tmp_path, tiny_base):
    fed = _with_flipped_client(tmp_path, tiny_base)
    result = run_cli(["run", str(tmp_path / "fed")], dict(os.environ), server=True)
    assert "guarded mallory: sign guard: its task vector opposes alice, bob" in " ".join(
        result.stdout.split())
    dashboard = fed.store.read_bytes(fed.repo_id, "README.md", fed.head()).decode()
    guarded = dashboard.split("Guarded", 1)[1]
    assert "**mallory**: sign guard: its task vector opposes alice, bob" in guarded


def test_describe_guards_joins_both_guards_per_client():
    record = {"norm_guard": {"eve": {"action": "clip", "norm": 123.4, "robust_z": 9.87}},
              "sign_guard": {"eve": {"reason": "mirror", "action": "not shared"},
                             "mallory": {"reason": "mirror", "action": "not shared"}}}
    assert describe_guards(record) == {
        "eve": "norm guard (clip): task-vector norm 123, robust z 9.9; "
               "sign guard: mirror; not shared",
        "mallory": "sign guard: mirror; not shared"}
    assert describe_guards({}) == {}
