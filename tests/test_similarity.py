"""Task-vector cosines at every granularity against brute force on materialised ΔW."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from factories import PREFIX, brute_cosine, peft_reference, write_raw_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine.layers import layer_of, layer_sort_key
from fedbip_hub.engine.similarity import compute_similarity
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.errors import IncompatibleAdaptersError

F64 = torch.float64
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
HEAD = "lm_head.weight"
LAYERS = {"model.layers.0": [Q0, V0], "model.layers.1": [Q1, V1], "lm_head": [HEAD]}

# Four clients: mixed ranks, rsLoRA, rank/alpha patterns, a dense head each.
CLIENT_SPECS = [
    dict(r=4, lora_alpha=8),
    dict(r=2, lora_alpha=16, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.v_proj": 6},
         alpha_pattern={"q_proj": 3.0}),
    dict(r=3, lora_alpha=5, use_rslora=True, rank_pattern={"layers.0.self_attn.q_proj": 1}),
]


def _correlated(folder: Path, source: Path, gen: torch.Generator, noise: float) -> dict:
    """Overrides that make ``folder``'s B follow the source adapter's where ranks agree."""
    src = load_file(str(source / "adapter_model.safetensors"))
    own = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, value in own.items():
        if key in src and src[key].shape == value.shape:
            out[key] = src[key] + noise * torch.randn(value.shape, generator=gen)
    return out


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Folders, PEFT references and our adapters for the four clients."""
    root = tmp_path_factory.mktemp("sim")
    gen = torch.Generator().manual_seed(123)
    common_head = torch.randn(64, 32, generator=gen)
    folders = []
    for k, spec in enumerate(CLIENT_SPECS):
        head = common_head + 0.7 * torch.randn(64, 32, generator=gen)
        folder = write_raw_adapter(root / f"c{k}", seed=k, dense={HEAD: head}, **spec)
        if k == 2:  # client 2 resembles client 0 (where its ranks allow)
            folder = write_raw_adapter(root / f"c{k}", seed=k, dense={HEAD: head}, **spec,
                                       tensor_overrides=_correlated(folder, folders[0], gen,
                                                                    0.3))
        folders.append(folder)
    refs = [peft_reference(f) for f in folders]
    return folders, refs


def _vectors(folders, dtype=F64):
    return [TaskVector(LoraAdapter(f), name=f"c{k}", dtype=dtype) for k, f in enumerate(folders)]


def _flat(ref, modules):
    items = {**ref.deltas, **ref.dense}
    return torch.cat([items[m].reshape(-1) for m in modules])


def test_fixture_is_not_degenerate(clients):
    _, refs = clients
    ranks = {(k, m): r.ranks[m] for k, r in enumerate(refs) for m in r.ranks}
    assert len(set(ranks.values())) >= 4  # mixed ranks
    cos = brute_cosine([_flat(r, [Q0, V0, Q1, V1]) for r in refs])
    assert cos[0, 2] > 0.3  # a correlated pair, so cosines are not all ~0


def test_module_cosines(clients):
    folders, refs = clients
    report = compute_similarity(_vectors(folders))
    cos = report.cosines("module")
    assert set(cos) == {Q0, V0, Q1, V1, HEAD}
    for module, matrix in cos.items():
        expected = brute_cosine([_flat(r, [module]) for r in refs])
        torch.testing.assert_close(matrix, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("include_dense", [True, False])
def test_layer_and_model_cosines(clients, include_dense):
    folders, refs = clients
    report = compute_similarity(_vectors(folders), include_dense=include_dense)
    layers = dict(LAYERS) if include_dense else {k: v for k, v in LAYERS.items()
                                                  if k != "lm_head"}
    cos = report.cosines("layer")
    assert list(cos) == list(layers)
    for layer, modules in layers.items():
        expected = brute_cosine([_flat(r, modules) for r in refs])
        torch.testing.assert_close(cos[layer], expected, rtol=1e-9, atol=1e-9)
    every = [m for modules in layers.values() for m in modules]
    expected = brute_cosine([_flat(r, every) for r in refs])
    torch.testing.assert_close(report.model_cosine(), expected, rtol=1e-9, atol=1e-9)
    norms = torch.stack([_flat(r, every).norm() for r in refs])
    torch.testing.assert_close(report.norms(), norms, rtol=1e-9, atol=1e-9)


def test_dense_head_changes_the_model_cosine(clients):
    """Guard: including the head must matter in this fixture, or the test above is moot."""
    folders, _ = clients
    vectors = _vectors(folders)
    with_head = compute_similarity(vectors, include_dense=True).model_cosine()
    without = compute_similarity(vectors, include_dense=False).model_cosine()
    assert (with_head - without).abs().max() > 0.05


def test_float32_compute_is_close(clients):
    folders, refs = clients
    report = compute_similarity(_vectors(folders, dtype=torch.float32))
    every = [m for modules in LAYERS.values() for m in modules]
    expected = brute_cosine([_flat(r, every) for r in refs])
    torch.testing.assert_close(report.model_cosine(), expected, rtol=1e-5, atol=1e-5)


def test_to_json(clients):
    folders, refs = clients
    payload = compute_similarity(_vectors(folders)).to_json(modules=True)
    assert payload["clients"] == ["c0", "c1", "c2", "c3"]
    assert set(payload["layers"]) == set(LAYERS)
    for layer, modules in LAYERS.items():
        expected = brute_cosine([_flat(r, modules) for r in refs])
        torch.testing.assert_close(torch.tensor(payload["layers"][layer], dtype=F64), expected,
                                   rtol=0, atol=1e-6)
    assert len(payload["model"]) == 4 and all(len(row) == 4 for row in payload["model"])
    assert set(payload["modules"]) == {Q0, V0, Q1, V1, HEAD}


def test_zero_task_vector_has_zero_cosine(tmp_path):
    zero = {f"{PREFIX}{m}.lora_B.weight": torch.zeros(s, 4)
            for m, s in ((Q0, 32), (V0, 16), (Q1, 32), (V1, 16))}
    folders = [write_raw_adapter(tmp_path / "a", seed=1),
               write_raw_adapter(tmp_path / "z", seed=2, tensor_overrides=zero),
               write_raw_adapter(tmp_path / "b", seed=3)]
    cos = compute_similarity(_vectors(folders)).model_cosine()
    assert cos[1].tolist() == [0.0, 1.0, 0.0] and cos[:, 1].tolist() == [0.0, 1.0, 0.0]


# -- layer names ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "layer"), [
    ("model.layers.3.self_attn.q_proj", "model.layers.3"),
    ("model.layers.12.mlp.down_proj", "model.layers.12"),
    ("bert.encoder.layer.2.attention.self.query", "bert.encoder.layer.2"),
    ("encoder.layer.0.output.dense", "encoder.layer.0"),
    ("transformer.h.7.attn.c_attn", "transformer.h.7"),
    ("h.0.mlp.c_fc", "h.0"),
    ("encoder.block.1.layer.0.SelfAttention.q", "encoder.block.1"),
    ("decoder.block.4.layer.2.DenseReluDense.wi", "decoder.block.4"),
    ("vit.blocks.5.attn.qkv", "vit.blocks.5"),
    ("score.weight", "score"),
    ("classifier.dense.weight", "classifier.dense"),
    ("classifier.out_proj.bias", "classifier.out_proj"),
    ("lm_head.weight", "lm_head"),
    ("score", "score"),
])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def test_layer_of_does_not_match_inside_words():
    # "graph.4" and "batch.2" must not be read as GPT-2's "h.N" block
    assert layer_of("model.graph.4.proj") == "model.graph.4.proj"
    assert layer_of("model.batch.2.proj") == "model.batch.2.proj"


def test_layer_sort_key_is_numeric_with_heads_last():
    layers = ["score", "model.layers.10", "model.layers.2", "classifier", "model.layers.0"]
    assert sorted(layers, key=layer_sort_key) == [
        "model.layers.0", "model.layers.2", "model.layers.10", "classifier", "score"]


def test_report_layers_sorted_numerically(tmp_path):
    shapes = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in (10, 2, 1)}
    folders = [write_raw_adapter(tmp_path / f"a{k}", shapes, seed=k) for k in range(2)]
    report = compute_similarity(_vectors(folders))
    assert list(report.cosines("layer")) == ["model.layers.1", "model.layers.2",
                                             "model.layers.10"]


# -- params space and start adapters ----------------------------------------------------------

@pytest.fixture(scope="module")
def equal_rank_clients(tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    gen = torch.Generator().manual_seed(5)
    specs = [dict(r=3, lora_alpha=6), dict(r=3, lora_alpha=2, use_rslora=True),
             dict(r=3, lora_alpha=9, alpha_pattern={"v_proj": 1.0})]
    return [write_raw_adapter(root / f"p{k}", seed=40 + k, **spec,
                              dense={HEAD: torch.randn(64, 32, generator=gen)})
            for k, spec in enumerate(specs)]


@pytest.mark.parametrize("include_dense", [True, False])
def test_params_space_is_cosine_of_flattened_a_and_scaled_b(equal_rank_clients,
                                                            include_dense):
    folders = equal_rank_clients
    flats = []
    for folder in folders:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        scalings = peft_reference(folder).scalings
        parts = []
        for m in (Q0, V0, Q1, V1):
            parts += [tensors[f"{PREFIX}{m}.lora_A.weight"].double().reshape(-1),
                      scalings[m] * tensors[f"{PREFIX}{m}.lora_B.weight"].double().reshape(-1)]
        if include_dense:
            parts.append(tensors[PREFIX + HEAD].double().reshape(-1))
        flats.append(torch.cat(parts))
    report = compute_similarity(_vectors(folders), space="params", include_dense=include_dense)
    torch.testing.assert_close(report.model_cosine(), brute_cosine(flats), rtol=1e-9, atol=1e-9)
    delta = compute_similarity(_vectors(folders), include_dense=include_dense).model_cosine()
    assert (delta - report.model_cosine()).abs().max() > 1e-3  # a different quantity


def test_task_vector_relative_to_start(clients):
    folders, refs = clients
    up, start = LoraAdapter(folders[3]), LoraAdapter(folders[1])
    vector = TaskVector(up, start, dtype=F64)
    for m in (Q0, V0, Q1, V1):
        delta = vector.lowrank(m)
        assert delta.u.shape[1] == refs[3].ranks[m] + refs[1].ranks[m]
        torch.testing.assert_close(delta.materialize(), refs[3].deltas[m] - refs[1].deltas[m],
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vector.dense(HEAD).value, refs[3].dense[HEAD] - refs[1].dense[HEAD])


def test_task_vector_from_lora_init_start(tmp_path, clients):
    """A start with B = 0 (the LoRA init) subtracts nothing."""
    folders, refs = clients
    zero_b = {f"{PREFIX}{m}.lora_B.weight": torch.zeros(s, 4)
              for m, s in ((Q0, 32), (V0, 16), (Q1, 32), (V1, 16))}
    init = write_raw_adapter(tmp_path / "init", seed=9, tensor_overrides=zero_b,
                             dense={HEAD: torch.zeros(64, 32)}, r=4)
    vector = TaskVector(LoraAdapter(folders[0]), LoraAdapter(init), dtype=F64)
    for m in (Q0, V0, Q1, V1):
        torch.testing.assert_close(vector.lowrank(m).materialize(), refs[0].deltas[m])


def test_similarity_of_task_vectors_with_starts(clients):
    folders, refs = clients
    pairs = [(0, 1), (2, 3), (3, 0)]
    vectors = [TaskVector(LoraAdapter(folders[u]), LoraAdapter(folders[s]), name=f"t{n}",
                          dtype=F64) for n, (u, s) in enumerate(pairs)]
    report = compute_similarity(vectors)
    every = [m for modules in LAYERS.values() for m in modules]
    diffs = [_flat(refs[u], every) - _flat(refs[s], every) for u, s in pairs]
    torch.testing.assert_close(report.model_cosine(), brute_cosine(diffs), rtol=1e-9, atol=1e-9)


def test_params_space_needs_equal_ranks(clients):
    folders, _ = clients
    vector = TaskVector(LoraAdapter(folders[0]), LoraAdapter(folders[1]), name="x")
    with pytest.raises(IncompatibleAdaptersError, match="params space"):
        vector.params(Q0)


def test_params_space_similarity_refuses_mixed_ranks(clients):
    folders, _ = clients
    with pytest.raises(IncompatibleAdaptersError, match="equal ranks") as info:
        compute_similarity(_vectors(folders), space="params")
    assert info.value.hint and info.value.client == "c1"


def test_params_space_with_start_is_difference_of_params(equal_rank_clients):
    up, start = (LoraAdapter(f) for f in equal_rank_clients[:2])
    vector = TaskVector(up, start, dtype=F64)
    b_u, a_u = up.lora_factors(V1, F64)
    b_s, a_s = start.lora_factors(V1, F64)
    got = vector.params(V1)
    torch.testing.assert_close(got.a, a_u - a_s)
    torch.testing.assert_close(got.b, up.modules[V1].scale * b_u - start.modules[V1].scale * b_s)


# -- invariances (hypothesis) ----------------------------------------------------------------

def _gauge_overrides(folder: Path, gen: torch.Generator, spread: float) -> dict:
    """B·R and R⁻¹·A for a random well-conditioned R per module."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, b in tensors.items():
        if not key.endswith(".lora_B.weight"):
            continue
        a_key = key.replace("lora_B", "lora_A")
        r = b.shape[1]
        q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
        scales = torch.exp(spread * (2 * torch.rand(r, generator=gen, dtype=F64) - 1))
        rot = q @ torch.diag(scales)
        out[key] = (b.double() @ rot).float()
        out[a_key] = (torch.linalg.inv(rot) @ tensors[a_key].double()).float()
    return out


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), spread=st.floats(0.0, 1.0))
def test_cosines_are_gauge_invariant(seed, spread):
    gen = torch.Generator().manual_seed(seed)
    specs = [dict(r=2), dict(r=3, use_rslora=True), dict(r=4, rank_pattern={"v_proj": 1})]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain, gauged = [], []
        for k, spec in enumerate(specs):
            folder = write_raw_adapter(root / f"a{k}", seed=seed * 7 + k, **spec)
            plain.append(folder)
            gauged.append(write_raw_adapter(root / f"g{k}", seed=seed * 7 + k, **spec,
                                            tensor_overrides=_gauge_overrides(folder, gen,
                                                                              spread)))
        before = compute_similarity(_vectors(plain))
        after = compute_similarity(_vectors(gauged))
        for granularity in ("module", "layer", "model"):
            for key, matrix in before.cosines(granularity).items():
                torch.testing.assert_close(after.cosines(granularity)[key], matrix,
                                           rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(perm=st.permutations(range(4)))
def test_cosines_follow_input_order(clients, perm):
    folders, _ = clients
    base = compute_similarity(_vectors(folders))
    permuted = compute_similarity([_vectors(folders)[p] for p in perm])
    assert permuted.clients == [f"c{p}" for p in perm]
    idx = torch.tensor(perm)
    for granularity in ("module", "layer", "model"):
        for key, matrix in base.cosines(granularity).items():
            torch.testing.assert_close(permuted.cosines(granularity)[key],
                                       matrix[idx][:, idx], rtol=1e-12, atol=1e-12)
