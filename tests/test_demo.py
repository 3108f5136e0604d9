"""`fedbip demo`: its metrics, its synthetic tasks, its base-model cache, and a reduced run
end to end through the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedbip_hub.demo.metrics import auc, cosine_matrix, group_auc, mean_std, pair_scores
from fedbip_hub.demo.tasks import (
    ATTRIBUTES,
    FIRST_CONTENT,
    SEQ_LEN,
    START_ID,
    TASK_NAMES,
    TASKS,
    VOCAB_SIZE,
    make_clients,
    pretraining_batch,
    sample_tokens,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- metrics -------------------------------------------------------------------------------
def brute_force_auc(positives: list[float], negatives: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0
               for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(8))
def test_auc_matches_a_brute_force_pairwise_count(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_pos, n_neg = (int(x) for x in torch.randint(1, 30, (2,), generator=g))
    # rounded to one decimal, so that ties (within and across the two sides) are common
    positives = (torch.randn(n_pos, generator=g) + 0.5).round(decimals=1).tolist()
    negatives = torch.randn(n_neg, generator=g).round(decimals=1).tolist()
    assert auc(positives, negatives) == pytest.approx(brute_force_auc(positives, negatives))


def test_auc_extremes_and_empty_sides() -> None:
    assert auc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0
    assert auc([0.1], [0.5, 0.6]) == 0.0
    assert auc([0.5, 0.5], [0.5]) == 0.5
    assert math.isnan(auc([], [0.1]))
    assert math.isnan(auc([0.1], []))


def test_group_auc_reads_the_upper_triangle_by_group() -> None:
    groups = ["a", "a", "b", "b"]
    cos = torch.tensor([[1.0, 0.6, 0.1, 0.0],
                        [0.6, 1.0, 0.2, -0.1],
                        [0.1, 0.2, 1.0, 0.4],
                        [0.0, -0.1, 0.4, 1.0]])
    same, different = pair_scores(cos, groups)
    assert sorted(same) == pytest.approx([0.4, 0.6])
    assert sorted(different) == pytest.approx([-0.1, 0.0, 0.1, 0.2])
    assert group_auc(cos, groups) == 1.0
    cos[0, 1] = cos[1, 0] = 0.15  # now below one different-group pair (0.2)
    assert group_auc(cos, groups) == pytest.approx(brute_force_auc(
        [0.15, 0.4], [-0.1, 0.0, 0.1, 0.2]))


def test_cosine_matrix_and_mean_std() -> None:
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    cos = cosine_matrix(vectors)
    assert cos.dtype == torch.float64
    assert cos.diagonal().tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert float(cos[0, 1]) == pytest.approx(0.0)
    assert float(cos[0, 2]) == pytest.approx(2 ** -0.5)
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([4.0]) == (4.0, 0.0)


# -- tasks -----------------------------------------------------------------------------------
def test_task_groups_conflict_same_inputs_different_labels() -> None:
    tokens = sample_tokens(4000, torch.Generator().manual_seed(0))
    labels = {name: TASKS[name].labels(tokens) for name in TASK_NAMES}
    for name, y in labels.items():
        assert 0.4 < float(y.float().mean()) < 0.6, f"{name} is unbalanced"
    for a, b in itertools.combinations(TASK_NAMES, 2):
        disagree = float((labels[a] != labels[b]).float().mean())
        # independent rules: about half of the same inputs get the other label
        assert 0.4 < disagree < 0.6, (a, b, disagree)


def test_rules_are_the_majority_of_a_token_attribute() -> None:
    low = torch.full((1, SEQ_LEN), FIRST_CONTENT)  # all from the lower half, all even
    high = torch.full((1, SEQ_LEN), VOCAB_SIZE - 1)  # upper half, odd value
    assert TASKS["low"].labels(low).item() == 1 and TASKS["low"].labels(high).item() == 0
    assert TASKS["even"].labels(low).item() == 1 and TASKS["even"].labels(high).item() == 0
    # every rule, on random inputs, against a count token by token
    tokens = sample_tokens(200, torch.Generator().manual_seed(5))
    for name in TASK_NAMES:
        marked = ATTRIBUTES[name]
        assert int(marked.sum()) == len(marked) // 2, name
        expected = [int(2 * sum(bool(marked[t - FIRST_CONTENT]) for t in row) > SEQ_LEN)
                    for row in tokens.tolist()]
        assert TASKS[name].labels(tokens).tolist() == expected, name


def test_clients_get_their_own_inputs_noisy_train_labels_and_clean_test_labels() -> None:
    groups = ("low", "low", "even", "marked")
    clients = make_clients(groups, n_train=400, n_test=300, label_noise=0.1, seed=3)
    assert [c.name for c in clients] == ["low-1", "low-2", "even-1", "marked-1"]
    for client in clients:
        assert client.train_ids.shape == (400, SEQ_LEN + 1)
        assert bool((client.train_ids[:, 0] == START_ID).all())
        assert torch.equal(client.test_labels, TASKS[client.task].labels(client.test_ids[:, 1:]))
        flipped = float((client.train_labels != TASKS[client.task].labels(
            client.train_ids[:, 1:])).float().mean())
        assert 0.05 < flipped < 0.15
    assert not torch.equal(clients[0].train_ids, clients[1].train_ids)
    again = make_clients(groups, n_train=400, n_test=300, label_noise=0.1, seed=3)
    assert torch.equal(again[2].train_labels, clients[2].train_labels)
    dataset = clients[0].train_dataset()
    assert set(dataset.column_names) == {"input_ids", "label"} and len(dataset) == 400


def test_pretraining_mixture_labels_every_task() -> None:
    ids, targets = pretraining_batch(64, torch.Generator().manual_seed(1))
    assert ids.shape == (64, SEQ_LEN + 1) and targets.shape == (64, len(TASK_NAMES))
    for i, name in enumerate(TASK_NAMES):
        assert torch.equal(targets[:, i].long(), TASKS[name].labels(ids[:, 1:]))


# -- base model --------------------------------------------------------------------------------
def test_base_model_is_cached_and_loads_as_a_two_label_classifier(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from fedbip_hub.demo.base_model import BaseModelSpec, ensure_base_model

    spec = BaseModelSpec(hidden_size=32, intermediate_size=64, steps=3, batch_size=8)
    first = ensure_base_model(tmp_path / "base", spec)
    assert not first.reused and set(first.pretrain_accuracy) == set(TASK_NAMES)
    second = ensure_base_model(tmp_path / "base", spec)
    assert second.reused and second.pretrain_accuracy == first.pretrain_accuracy
    third = ensure_base_model(tmp_path / "base", BaseModelSpec(
        hidden_size=32, intermediate_size=64, steps=4, batch_size=8))
    assert not third.reused  # another spec: rebuilt
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    assert model.score.weight.shape == (2, 32)


def test_demo_refuses_to_clear_a_runs_folder_it_did_not_write(tmp_path: Path) -> None:
    from fedbip_hub.demo.scenario import prepare_dir
    from fedbip_hub.errors import ConfigError

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError):
        prepare_dir(tmp_path)
    assert (tmp_path / "runs" / "precious.txt").is_file()


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--quick", "--dir", str(demo_dir),
         "--json"],
        cwd=REPO_ROOT, env={**os.environ, "FEDBIP_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = json.loads(result.stdout)

    assert (demo_dir / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((demo_dir / "results.json").read_text())
    assert saved["methods"].keys() == printed["methods"].keys()
    methods = saved["methods"]
    assert set(methods) >= {"local", "fedit", "fedavg", "uniform", "fedbip", "fedbip-l",
                            "oracle"}
    n_clients = len(saved["clients"])
    assert n_clients >= 6 and len({c["task"] for c in saved["clients"]}) >= 3
    for label, method in methods.items():
        assert 0.0 <= method["accuracy"] <= 1.0, label
        assert len(method["accuracy_per_client"]) == n_clients
    # conflicting tasks: averaging everyone is clearly worse than personalizing
    assert methods["fedbip-l"]["accuracy"] > methods["fedit"]["accuracy"] + 0.05

    similarity = saved["similarity"]
    task_vectors = similarity["task_vectors"]["fedbip-l"]
    assert 0.0 <= task_vectors["auc_mean"] <= 1.0
    assert len(task_vectors["auc_per_round"]) == saved["config"]["rounds"]
    raw = similarity["raw_parameters_round1"]
    assert 0.0 <= raw["auc"] <= 1.0 and raw["min"] > 0.99  # raw parameters: all near 1

    # asynchrony: the late client is missing from one round, then lands one version stale
    rounds = methods["fedbip-l"]["rounds"]
    assert any(len(r["fresh"]) < n_clients for r in rounds)
    assert any(1 in r["staleness"].values() for r in rounds)
    # the base model is cached in the demo folder
    assert (demo_dir / "base-model" / "model.safetensors").is_file()
