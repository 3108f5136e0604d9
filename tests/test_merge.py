"""Personalized merges against brute-force weighted sums of materialised ΔW."""

from __future__ import annotations

import shutil

import pytest
import torch
from factories import PREFIX, peft_reference, write_raw_adapter
from safetensors.torch import load_file

from fedbip_hub.adapters.config import LoraAdapterConfig
from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.adapters.metadata import UploadMetadata
from fedbip_hub.engine.merge import MergePlan, personalize
from fedbip_hub.engine.similarity import compute_similarity
from fedbip_hub.engine.strategies import Strategy, WeightTable, compute_weights
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.federation.offline import merge_folders

F64 = torch.float64
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
HEAD = "lm_head.weight"
LORA = [Q0, V0, Q1, V1]
# the block of each module, written out (not computed with layer_of)
LAYER = {Q0: "model.layers.0", V0: "model.layers.0", Q1: "model.layers.1",
         V1: "model.layers.1", HEAD: "lm_head"}
SPECS = [dict(r=2, lora_alpha=4),
         dict(r=3, lora_alpha=6, use_rslora=True),
         dict(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.v_proj": 1},
              alpha_pattern={"q_proj": 2.0})]
N_EXAMPLES = [10, 20, 70]
BIG = 9  # ≥ the stacked rank of every module (2 + 3 + 4)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    gen = torch.Generator().manual_seed(11)
    common = torch.randn(64, 32, generator=gen)
    folders = []
    for k, spec in enumerate(SPECS):
        head = common + torch.randn(64, 32, generator=gen)
        folder = write_raw_adapter(root / f"client{k}", seed=100 + k, dense={HEAD: head}, **spec)
        UploadMetadata(n_examples=N_EXAMPLES[k]).write(folder)
        folders.append(folder)
    latest = write_raw_adapter(root / "latest", r=2, lora_alpha=3, seed=7,
                               dense={HEAD: torch.randn(64, 32, generator=gen)})
    return {"folders": folders, "refs": [peft_reference(f) for f in folders],
            "latest": latest, "latest_ref": peft_reference(latest), "root": root}


def _vectors(folders):
    return [TaskVector(LoraAdapter(f), name=f"c{k}", dtype=F64) for k, f in enumerate(folders)]


def _value(ref, module):
    return ref.deltas[module] if module in ref.deltas else ref.dense[module]


def _weighted(refs, coeffs, module):
    return sum(float(c) * _value(r, module) for c, r in zip(coeffs, refs, strict=True))


def _plan(k, targets=None, contribution=None, latest=None):
    targets = list(range(k)) if targets is None else targets
    return MergePlan(targets=targets,
                     contribution=torch.ones(k, dtype=F64) if contribution is None
                     else contribution,
                     latest=latest or [None] * len(targets))


def _row(table, method, module, target):
    key = LAYER[module] if method == "fedbip-l" else "model"
    return table.matrices[key][target]


@pytest.mark.parametrize("method", ["fedbip", "fedbip-l", "fedavg", "uniform", "local"])
def test_personalize_is_exact_weighted_sum(fed, method):
    vectors, refs = _vectors(fed["folders"]), fed["refs"]
    strategy = Strategy.parse(method)
    report = compute_similarity(vectors)
    table = compute_weights(strategy, k=3, report=report, n_examples=N_EXAMPLES)
    merged = personalize(vectors, table, _plan(3), rank=BIG, dtype=F64)
    for target, out in enumerate(merged):
        for module in LORA:
            expected = _weighted(refs, _row(table, method, module, target), module)
            torch.testing.assert_close(out.delta_weight(module), expected, rtol=1e-10,
                                       atol=1e-10)
            assert out.modules[module][1].shape[0] == BIG
            assert out.discarded_energy[module] == pytest.approx(0.0, abs=1e-12)
        expected = _weighted(refs, _row(table, method, HEAD, target), HEAD)
        torch.testing.assert_close(out.dense[HEAD], expected, rtol=1e-12, atol=1e-12)
    if method == "fedavg":
        torch.testing.assert_close(table.matrices["model"],
                                   torch.tensor([[0.1, 0.2, 0.7]] * 3, dtype=F64))
    if method == "uniform":
        torch.testing.assert_close(table.matrices["model"], torch.full((3, 3), 1 / 3, dtype=F64))
    if method == "local":
        for target, out in enumerate(merged):
            for module in LORA:
                torch.testing.assert_close(out.delta_weight(module),
                                           refs[target].deltas[module])


def test_fedbip_l_uses_each_layers_own_row(fed):
    """Very different matrices per block: every module must take its own block's row."""
    vectors, refs = _vectors(fed["folders"]), fed["refs"]
    matrices = {"model.layers.0": torch.eye(3, dtype=F64),
                "model.layers.1": torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0],
                                                [0.0, 0.1, 0.9]], dtype=F64),
                "lm_head": torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5],
                                         [0.5, 0.0, 0.5]], dtype=F64)}
    table = WeightTable("layer", matrices)
    merged = personalize(vectors, table, _plan(3), rank=BIG, dtype=F64)
    for target, out in enumerate(merged):
        for module in [*LORA, HEAD]:
            expected = _weighted(refs, matrices[LAYER[module]][target], module)
            got = out.delta_weight(module) if module in LORA else out.dense[module]
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_fedbip_l_really_has_different_weights_per_layer(fed):
    vectors = _vectors(fed["folders"])
    table = compute_weights(Strategy.parse("fedbip-l", rule="normalize"), k=3,
                            report=compute_similarity(vectors))  # (random: no evidence)
    assert set(table.matrices) == {"model.layers.0", "model.layers.1", "lm_head"}
    assert not torch.allclose(table.matrices["model.layers.0"], table.matrices["model.layers.1"])


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_truncation_is_the_truncated_svd_of_the_weighted_sum(fed, rank):
    vectors, refs = _vectors(fed["folders"]), fed["refs"]
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=F64)
    table = WeightTable(None, {"model": weights})
    merged = personalize(vectors, table, _plan(3), rank=rank, dtype=F64)
    for target, out in enumerate(merged):
        for module in LORA:
            full = _weighted(refs, weights[target], module)
            x, s, yt = torch.linalg.svd(full, full_matrices=False)
            best = x[:, :rank] @ torch.diag(s[:rank]) @ yt[:rank]
            assert out.modules[module][1].shape[0] == rank
            torch.testing.assert_close(out.delta_weight(module), best, rtol=1e-9, atol=1e-9)
            energy = 1 - float((s[:rank] ** 2).sum() / (s**2).sum())
            assert out.discarded_energy[module] == pytest.approx(energy, rel=1e-8, abs=1e-12)
        assert out.max_discarded_energy == max(out.discarded_energy.values())


def test_cat_refactor_is_exact_and_its_rank_grows(fed, tmp_path):
    vectors, refs = _vectors(fed["folders"]), fed["refs"]
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.6, 0.4], [0.0, 0.0, 1.0]], dtype=F64)
    merged = personalize(vectors, WeightTable(None, {"model": weights}), _plan(3),
                         rank=None, refactor="cat", dtype=F64)
    for target, out in enumerate(merged):
        for module in LORA:
            expected = _weighted(refs, weights[target], module)
            rank = out.modules[module][1].shape[0]
            assert rank == int(torch.linalg.matrix_rank(expected))
            torch.testing.assert_close(out.delta_weight(module), expected, rtol=1e-10,
                                       atol=1e-10)
    # client 0 draws from all three: its rank is the stacked rank, beyond any input's r
    assert merged[0].modules[Q0][1].shape[0] == 2 + 3 + 4
    assert merged[0].modules[V1][1].shape[0] == 2 + 3 + 1
    template = LoraAdapterConfig.from_folder(fed["folders"][0])
    saved = peft_reference(merged[0].save(tmp_path / "cat", template))
    assert saved.ranks[Q0] == 9
    for module in LORA:
        torch.testing.assert_close(saved.deltas[module], merged[0].delta_weight(module),
                                   rtol=1e-5, atol=1e-5)


def test_async_merge_adds_to_latest_with_contributions(fed):
    vectors, refs, lref = _vectors(fed["folders"]), fed["refs"], fed["latest_ref"]
    weights = torch.tensor([[0.4, 0.35, 0.25], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]], dtype=F64)
    contribution = torch.tensor([1.0, 0.5, 0.0], dtype=F64)  # client 2: nothing new
    plan = MergePlan(targets=[0, 2], contribution=contribution,
                     latest=[LoraAdapter(fed["latest"]), None])
    merged = personalize(vectors, WeightTable(None, {"model": weights}), plan, rank=None,
                         refactor="cat", dtype=F64)
    for out, target, base in zip(merged, [0, 2], [lref, None], strict=True):
        coeffs = weights[target] * contribution
        for module in [*LORA, HEAD]:
            expected = _weighted(refs, coeffs, module)
            if base is not None:
                expected = expected + _value(base, module)
            got = out.delta_weight(module) if module in LORA else out.dense[module]
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_async_merge_in_params_space(tmp_path):
    gen = torch.Generator().manual_seed(3)
    folders = [write_raw_adapter(tmp_path / f"p{k}", r=3, lora_alpha=2 + k, seed=k,
                                 use_rslora=k == 1) for k in range(3)]
    latest = write_raw_adapter(tmp_path / "latest", r=3, lora_alpha=5, seed=9)
    weights = torch.rand(3, 3, generator=gen, dtype=F64)
    weights /= weights.sum(dim=1, keepdim=True)
    contribution = torch.tensor([1.0, 0.0, 0.7], dtype=F64)
    plan = MergePlan(targets=[1], contribution=contribution, latest=[LoraAdapter(latest)])
    (out,) = personalize(_vectors(folders), WeightTable(None, {"model": weights}), plan,
                         rank=3, space="params", dtype=F64)
    coeffs = weights[1] * contribution
    for module in LORA:
        (u, v), raws = out.modules[module], _raw_params([*folders, latest], module)
        exp_u = raws[-1][0] + sum(c * b for c, (b, _) in zip(coeffs, raws[:-1], strict=True))
        exp_v = raws[-1][1] + sum(c * a for c, (_, a) in zip(coeffs, raws[:-1], strict=True))
        torch.testing.assert_close(u, exp_u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, exp_v, rtol=1e-12, atol=1e-12)


def _raw_params(folders, module):
    """(s·B, A) per folder, from the stored tensors and PEFT's scaling."""
    out = []
    for folder in folders:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        scale = peft_reference(folder).scalings[module]
        out.append((scale * tensors[f"{PREFIX}{module}.lora_B.weight"].double(),
                    tensors[f"{PREFIX}{module}.lora_A.weight"].double()))
    return out


def test_params_space_refuses_mixed_ranks(fed, tmp_path):
    from fedbip_hub.errors import IncompatibleAdaptersError

    with pytest.raises(IncompatibleAdaptersError, match="equal ranks"):
        merge_folders(fed["folders"], 0, Strategy.parse("fedit"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a latest adapter whose rank differs from the uploads' is refused too
    equal = [write_raw_adapter(tmp_path / f"e{k}", r=2, seed=k) for k in range(2)]
    plan = MergePlan(targets=[0], contribution=torch.ones(2, dtype=F64),
                     latest=[LoraAdapter(fed["folders"][1])])  # rank 3
    with pytest.raises(IncompatibleAdaptersError, match="latest"):
        personalize(_vectors(equal), WeightTable(None, {"model": torch.eye(2, dtype=F64)}),
                    plan, rank=2, space="params", dtype=F64)


def test_fedit_sums_a_and_scaled_b_separately(tmp_path):
    # the target's scale (5/3) is not 1, so how the scale is folded back out matters
    folders = [write_raw_adapter(tmp_path / f"p{k}", r=3, lora_alpha=[5, 6, 4][k], seed=20 + k,
                                 use_rslora=k == 2,
                                 alpha_pattern={"v_proj": 1.5} if k == 1 else None)
               for k in range(3)]
    n = [1, 2, 5]
    for folder, count in zip(folders, n, strict=True):
        UploadMetadata(n_examples=count).write(folder)
    p = [count / sum(n) for count in n]
    result = merge_folders(folders, 0, Strategy.parse("fedit"), tmp_path / "out")
    torch.testing.assert_close(result.weights.matrices["model"],
                               torch.tensor([p] * 3, dtype=F64))
    assert result.merged.space == "params"
    saved = load_file(str(result.output / "adapter_model.safetensors"))
    ref = peft_reference(result.output)
    for module in LORA:
        raws = _raw_params(folders, module)
        sum_b = sum(w * b for w, (b, _) in zip(p, raws, strict=True))
        sum_a = sum(w * a for w, (_, a) in zip(p, raws, strict=True))
        u, v = result.merged.modules[module]
        torch.testing.assert_close(u.double(), sum_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), sum_a, rtol=1e-5, atol=1e-6)
        # the saved adapter keeps A as merged, and PEFT's ΔW is (Σ p s·B)(Σ p A)
        torch.testing.assert_close(saved[f"{PREFIX}{module}.lora_A.weight"].double(), sum_a,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref.deltas[module], sum_b @ sum_a, rtol=1e-4, atol=1e-5)
        # which is not the average of the ΔW (FedIT's inexactness)
        avg = sum(w * (b @ a) for w, (b, a) in zip(p, raws, strict=True))
        assert (ref.deltas[module] - avg).abs().max() > 1e-3


def test_merge_folders_fedavg_reads_upload_metadata(fed, tmp_path):
    refs = fed["refs"]
    result = merge_folders(fed["folders"], 1, Strategy.parse("fedavg", rank=BIG),
                           tmp_path / "out")
    p = [x / sum(N_EXAMPLES) for x in N_EXAMPLES]
    torch.testing.assert_close(result.weights.matrices["model"][1],
                               torch.tensor(p, dtype=F64))
    assert result.target == "client1"
    assert result.clients == ["client0", "client1", "client2"]
    saved = peft_reference(result.output)
    for module in LORA:
        torch.testing.assert_close(saved.deltas[module], _weighted(refs, p, module),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(saved.dense[HEAD], _weighted(refs, p, HEAD), rtol=1e-5,
                               atol=1e-5)
    config = LoraAdapterConfig.from_folder(result.output)
    # the target's spec is kept (rsLoRA, alpha); PEFT's ranks are the merged ones
    assert config.use_rslora and config.lora_alpha == 6
    assert saved.ranks == dict.fromkeys(LORA, BIG)


def test_merge_folders_without_metadata_weighs_equally(fed, tmp_path):
    folders = []
    for k, folder in enumerate(fed["folders"]):
        copy = shutil.copytree(folder, tmp_path / f"copy{k}")
        (copy / "fedbip_upload.json").unlink()
        folders.append(copy)
    result = merge_folders(folders, 0, Strategy.parse("fedavg"), tmp_path / "out")
    torch.testing.assert_close(result.weights.matrices["model"],
                               torch.full((3, 3), 1 / 3, dtype=F64))


def test_personal_heads_keep_only_own_update(fed):
    vectors, refs = _vectors(fed["folders"]), fed["refs"]
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=F64)
    contribution = torch.tensor([1.0, 0.5, 1.0], dtype=F64)
    plan = MergePlan(targets=[0, 1], contribution=contribution,
                     latest=[LoraAdapter(fed["latest"]), None])
    merged = personalize(vectors, WeightTable(None, {"model": weights}), plan, rank=None,
                         refactor="cat", personal_heads=True, dtype=F64)
    torch.testing.assert_close(merged[0].dense[HEAD],
                               fed["latest_ref"].dense[HEAD] + refs[0].dense[HEAD])
    torch.testing.assert_close(merged[1].dense[HEAD], 0.5 * refs[1].dense[HEAD])
    # the LoRA modules are still merged across clients
    expected = _weighted(refs, weights[1] * contribution, Q0)
    torch.testing.assert_close(merged[1].delta_weight(Q0), expected, rtol=1e-10, atol=1e-10)


def test_nothing_to_add_gives_a_zero_adapter_of_the_requested_rank(fed):
    vectors = _vectors(fed["folders"])
    plan = _plan(3, targets=[0], contribution=torch.zeros(3, dtype=F64))
    (out,) = personalize(vectors, WeightTable(None, {"model": torch.eye(3, dtype=F64)}), plan,
                         rank=5, dtype=F64)
    for module in LORA:
        assert out.modules[module][1].shape[0] == 5
        assert torch.count_nonzero(out.delta_weight(module)) == 0
    assert torch.count_nonzero(out.dense[HEAD]) == 0


def test_merge_folders_rejects_bad_target(fed, tmp_path):
    from fedbip_hub.errors import ConfigError

    with pytest.raises(ConfigError, match="out of range"):
        merge_folders(fed["folders"], 3, Strategy.parse("fedbip"), tmp_path / "out")


def test_a_head_left_out_of_the_similarity_merges_with_model_level_weights(fed):
    from fedbip_hub.engine.lowrank import cosine_from_gram
    from fedbip_hub.engine.weighting import similarity_weights

    strategy = Strategy(method="fedbip-l", include_dense_in_similarity=False, rank=BIG)
    vectors = _vectors(fed["folders"])
    report = compute_similarity(vectors, include_dense=False)
    table = compute_weights(strategy, k=3, report=report)
    assert HEAD not in report.grams and "lm_head" not in table.matrices
    (merged,) = personalize(vectors, table, _plan(3, targets=[0]), rank=BIG)
    flat = torch.stack([torch.cat([_value(r, m).reshape(-1) for m in LORA])
                        for r in fed["refs"]])
    brute = cosine_from_gram(flat @ flat.T)
    model_row = similarity_weights(brute, strategy.weight_options)[0]
    torch.testing.assert_close(merged.dense[HEAD].double(),
                               _weighted(fed["refs"], model_row, HEAD), rtol=1e-5, atol=1e-6)
