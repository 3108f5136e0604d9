"""Reading and writing LoRA adapters, checked against PEFT's own ΔW (get_delta_weight)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from factories import (
    PREFIX,
    llama_shapes,
    load_peft,
    make_peft_adapter,
    peft_reference,
    write_raw_adapter,
)
from safetensors.torch import load_file

from fedbip_hub.adapters import lora as adapter_io
from fedbip_hub.adapters.config import LoraAdapterConfig
from fedbip_hub.adapters.lora import LoraAdapter, save_lora_adapter
from fedbip_hub.engine.similarity import compute_similarity
from fedbip_hub.engine.task_vectors import TaskVector, check_compatible
from fedbip_hub.errors import AdapterError, IncompatibleAdaptersError

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"

PEFT_VARIANTS = {
    "plain": dict(r=4, lora_alpha=8),
    "odd_alpha": dict(r=3, lora_alpha=5),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "rank_pattern": dict(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2,
                                                          "v_proj": 6}),
    "alpha_pattern": dict(r=4, lora_alpha=8, alpha_pattern={"v_proj": 3.0,
                                                            "layers.1.self_attn.q_proj": 20}),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True,
                            rank_pattern={"layers.0.self_attn.v_proj": 7},
                            alpha_pattern={"q_proj": 2.5}),
}


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {name: make_peft_adapter(root / name, seed=i, **kwargs)
            for i, (name, kwargs) in enumerate(PEFT_VARIANTS.items())}


def _assert_matches_peft(adapter: LoraAdapter, ref):
    assert set(adapter.modules) == set(ref.deltas)
    for module, expected in ref.deltas.items():
        info = adapter.modules[module]
        assert info.rank == ref.ranks[module]
        assert info.scale == pytest.approx(ref.scalings[module], rel=1e-12)
        assert (info.out_features, info.in_features) == tuple(expected.shape)
        torch.testing.assert_close(adapter.delta_weight(module), expected, rtol=1e-12,
                                   atol=1e-12)
        u, v = adapter.delta_factors(module, torch.float64)
        assert u.shape[1] == v.shape[0] == ref.ranks[module]
        torch.testing.assert_close(u @ v, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_delta_weight_equals_peft_get_delta_weight(peft_folders, variant):
    folder = peft_folders[variant]
    _assert_matches_peft(LoraAdapter(folder), peft_reference(folder))


def test_scaling_variants_really_differ(peft_folders):
    """Guard against a vacuous reference: the variants give PEFT different scalings."""
    scalings = {name: peft_reference(f).scalings for name, f in peft_folders.items()}
    assert scalings["plain"][Q0] == 2.0
    assert scalings["rslora"][Q0] == pytest.approx(4.0)
    assert scalings["rank_pattern"][Q1] == 4.0 and scalings["rank_pattern"][V0] == 8 / 6
    assert scalings["alpha_pattern"][V1] == 0.75 and scalings["alpha_pattern"][Q1] == 5.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_raw_adapter_matches_peft(tmp_path, dtype):
    folder = write_raw_adapter(
        tmp_path / "raw", r=4, lora_alpha=6, use_rslora=True,
        rank_pattern={"layers.1.self_attn.v_proj": 3}, alpha_pattern={"q_proj": 2.0},
        dense={"lm_head.weight": torch.randn(64, 32)}, seed=5, dtype=dtype)
    adapter = LoraAdapter(folder)
    ref = peft_reference(folder)
    _assert_matches_peft(adapter, ref)
    assert set(adapter.dense) == {"lm_head.weight"}
    torch.testing.assert_close(adapter.dense_tensor("lm_head.weight", torch.float64),
                               ref.dense["lm_head.weight"])


def test_first_matching_pattern_key_wins_like_peft(tmp_path):
    """PEFT takes the first key (in file order) that matches; so must we. (PEFT's own
    save_pretrained sorts the keys, so this is only testable on a hand-written config.)"""
    patterns = {"q_proj": 2, "layers.1.self_attn.q_proj": 5}
    folder = write_raw_adapter(tmp_path / "raw", r=4, rank_pattern=patterns,
                               alpha_pattern={"q_proj": 3.0, "layers.1.self_attn.q_proj": 9.0})
    adapter = LoraAdapter(folder)
    ref = peft_reference(folder)
    assert ref.ranks[Q1] == 2 and ref.scalings[Q1] == 1.5
    _assert_matches_peft(adapter, ref)


def test_lora_factors_are_the_stored_tensors(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw", seed=1)
    stored = load_file(str(folder / "adapter_model.safetensors"))
    b, a = LoraAdapter(folder).lora_factors(V1)
    assert torch.equal(b, stored[f"{PREFIX}{V1}.lora_B.weight"])
    assert torch.equal(a, stored[f"{PREFIX}{V1}.lora_A.weight"])


def test_delta_factors_fold_the_scale_into_u(peft_folders):
    folder = peft_folders["rslora_patterns"]
    stored = load_file(str(folder / "adapter_model.safetensors"))
    scalings = peft_reference(folder).scalings
    adapter = LoraAdapter(folder)
    for module in (Q0, V0):
        u, v = adapter.delta_factors(module, torch.float64)
        torch.testing.assert_close(
            u, scalings[module] * stored[f"{PREFIX}{module}.lora_B.weight"].double())
        assert torch.equal(v, stored[f"{PREFIX}{module}.lora_A.weight"].double())


def test_header_is_read_without_loading_tensors(tmp_path, monkeypatch):
    folder = write_raw_adapter(tmp_path / "raw", r=4, rank_pattern={"v_proj": 2},
                               dense={"lm_head.weight": torch.randn(64, 32)})

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("tensors were read while opening the adapter")

    monkeypatch.setattr(adapter_io, "safe_open", no_tensor_reads)
    adapter = LoraAdapter(folder)
    assert {m: (i.rank, i.out_features, i.in_features) for m, i in adapter.modules.items()} \
        == {Q0: (4, 32, 32), V0: (2, 16, 32), Q1: (4, 32, 32), V1: (2, 16, 32)}
    assert adapter.dense["lm_head.weight"].shape == (64, 32)
    with pytest.raises(AdapterError):  # the first tensor access goes through safe_open
        adapter.delta_weight(Q0)


def test_nan_only_errors_when_its_module_is_read(tmp_path):
    bad = torch.randn(4, 32)
    bad[1, 3] = float("nan")
    folder = write_raw_adapter(tmp_path / "raw",
                               tensor_overrides={f"{PREFIX}{V1}.lora_A.weight": bad})
    adapter = LoraAdapter(folder)  # opening is lazy: no error yet
    for module in (Q0, V0, Q1):
        assert torch.isfinite(adapter.delta_weight(module)).all()
    with pytest.raises(AdapterError) as info:
        adapter.delta_weight(V1)
    assert "NaN" in info.value.message
    assert str(folder) in info.value.message
    assert info.value.hint


def test_inf_is_refused_too(tmp_path):
    bad = torch.randn(32, 4)
    bad[0, 0] = float("inf")
    folder = write_raw_adapter(tmp_path / "raw",
                               tensor_overrides={f"{PREFIX}{Q0}.lora_B.weight": bad})
    with pytest.raises(AdapterError, match="NaN or Inf"):
        LoraAdapter(folder).delta_factors(Q0)


# -- malformed adapters: clear AdapterError naming the file or folder, with a hint ----------

def _expect_adapter_error(folder: Path, match: str, *, names: Path | None = None):
    with pytest.raises(AdapterError) as info:
        LoraAdapter(folder, label="client-x")
    exc = info.value
    assert match in exc.message, exc.message
    assert str(names or folder) in exc.message
    assert exc.hint
    assert exc.client == "client-x"
    return exc


def test_missing_folder(tmp_path):
    _expect_adapter_error(tmp_path / "nope", "does not exist")


def test_missing_config(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw")
    (folder / "adapter_config.json").unlink()
    _expect_adapter_error(folder, "adapter_config.json")


def test_unknown_peft_type(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw", config_overrides={"peft_type": "IA3"})
    _expect_adapter_error(folder, "IA3")


def test_config_not_json(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw")
    (folder / "adapter_config.json").write_text("{not json", encoding="utf-8")
    _expect_adapter_error(folder, "not valid JSON")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"r": 0}, "r must be positive"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"rank_pattern": {"v_proj": 0}}, "non-positive rank"),
    ({"lora_bias": True}, "lora_bias"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
])
def test_invalid_or_unsupported_config(tmp_path, overrides, match):
    folder = write_raw_adapter(tmp_path / "raw", config_overrides=overrides)
    _expect_adapter_error(folder, match)


def test_use_dora_is_refused(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw", config_overrides={"use_dora": True})
    _expect_adapter_error(folder, "use_dora")


class _Tripwire:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_only_pickle_weights_are_refused_never_loaded(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pickle-was-loaded"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    exc = _expect_adapter_error(folder, "pickle")
    assert "adapter_model.bin" in exc.message
    assert not marker.exists()


def test_pt_file_beside_safetensors_is_refused(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw")
    marker = tmp_path / "pickle-was-loaded"
    (folder / "optimizer.pt").write_bytes(pickle.dumps(_Tripwire(marker)))
    exc = _expect_adapter_error(folder, "pickle")
    assert "optimizer.pt" in exc.message
    assert not marker.exists()


def test_missing_safetensors(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw")
    (folder / "adapter_model.safetensors").unlink()
    _expect_adapter_error(folder, "adapter_model.safetensors")


def test_rank_differs_from_config(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw", r=3, config_overrides={"r": 4})
    _expect_adapter_error(folder, "inconsistent shapes",
                          names=folder / "adapter_model.safetensors")


def test_rank_pattern_differs_from_tensors(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw", r=4,
                               config_overrides={"rank_pattern": {"v_proj": 2}})
    _expect_adapter_error(folder, "inconsistent shapes")


def test_b_and_a_ranks_disagree(tmp_path):
    folder = write_raw_adapter(
        tmp_path / "raw", tensor_overrides={f"{PREFIX}{Q1}.lora_B.weight": torch.randn(32, 3)})
    exc = _expect_adapter_error(folder, "inconsistent shapes")
    assert Q1 in exc.message


def test_missing_lora_b(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw",
                               tensor_overrides={f"{PREFIX}{Q1}.lora_B.weight": None})
    _expect_adapter_error(folder, "no lora_B")


@pytest.mark.parametrize("keep", [5, 200])
def test_truncated_safetensors(tmp_path, keep):
    folder = write_raw_adapter(tmp_path / "raw")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    _expect_adapter_error(folder, "truncated" if keep < 8 else "corrupt",
                          names=path)


def test_truncated_tensor_data(tmp_path):
    folder = write_raw_adapter(tmp_path / "raw")
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # header intact, the last tensor cut short
    _expect_adapter_error(folder, "past the end", names=path)


def test_int64_tensor_is_refused(tmp_path):
    folder = write_raw_adapter(
        tmp_path / "raw",
        tensor_overrides={f"{PREFIX}{Q0}.lora_A.weight": torch.ones(4, 32, dtype=torch.int64)})
    _expect_adapter_error(folder, "dtype I64")


def test_stray_key_is_refused(tmp_path):
    folder = write_raw_adapter(
        tmp_path / "raw", tensor_overrides={f"{PREFIX}model.norm.weight": torch.ones(32)})
    _expect_adapter_error(folder, "model.norm.weight")


def test_dora_magnitude_key_is_refused(tmp_path):
    folder = write_raw_adapter(
        tmp_path / "raw",
        tensor_overrides={f"{PREFIX}{Q0}.lora_magnitude_vector": torch.ones(32)})
    _expect_adapter_error(folder, "DoRA")


def test_key_without_peft_prefix_is_refused(tmp_path):
    folder = write_raw_adapter(
        tmp_path / "raw", tensor_overrides={f"{Q0}.lora_A.weight": torch.ones(4, 32)})
    _expect_adapter_error(folder, "does not start with")


# -- incompatible adapters -------------------------------------------------------------------

def test_mismatched_target_modules(tmp_path):
    a = LoraAdapter(write_raw_adapter(tmp_path / "a"), label="a")
    b = LoraAdapter(write_raw_adapter(tmp_path / "b", llama_shapes(("q_proj",))), label="b")
    vectors = [TaskVector(a), TaskVector(b)]
    with pytest.raises(IncompatibleAdaptersError) as info:
        check_compatible(vectors)
    assert info.value.client == "b" and "v_proj" in info.value.message and info.value.hint
    with pytest.raises(IncompatibleAdaptersError):
        compute_similarity(vectors)
    with pytest.raises(IncompatibleAdaptersError):
        compute_similarity(vectors[::-1])


def test_mismatched_shapes(tmp_path):
    shapes = {Q0: (32, 32)}
    a = LoraAdapter(write_raw_adapter(tmp_path / "a", shapes))
    b = LoraAdapter(write_raw_adapter(tmp_path / "b", {Q0: (32, 48)}))
    with pytest.raises(IncompatibleAdaptersError, match="32×48"):
        compute_similarity([TaskVector(a, name="a"), TaskVector(b, name="b")])


def test_mismatched_dense_modules(tmp_path):
    a = LoraAdapter(write_raw_adapter(tmp_path / "a", dense={"lm_head.weight":
                                                             torch.randn(64, 32)}))
    b = LoraAdapter(write_raw_adapter(tmp_path / "b"))
    with pytest.raises(IncompatibleAdaptersError, match="dense"):
        check_compatible([TaskVector(a, name="a"), TaskVector(b, name="b")])


def test_start_adapter_with_other_modules(tmp_path):
    a = LoraAdapter(write_raw_adapter(tmp_path / "a"))
    b = LoraAdapter(write_raw_adapter(tmp_path / "b", llama_shapes(("q_proj", "k_proj"))))
    with pytest.raises(IncompatibleAdaptersError):
        TaskVector(a, b, name="a")


# -- writing adapters PEFT loads --------------------------------------------------------------

def _random_modules(ranks: dict[str, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes()
    return {m: (torch.randn(shapes[m][0], r, generator=gen, dtype=torch.float64),
                torch.randn(r, shapes[m][1], generator=gen, dtype=torch.float64))
            for m, r in ranks.items()}


@pytest.mark.parametrize("fold_scale", ["balanced", "b"])
@pytest.mark.parametrize("variant", ["plain", "rslora", "alpha_pattern", "rslora_patterns"])
def test_save_lora_adapter_loads_in_peft(tmp_path, peft_folders, variant, fold_scale):
    template = LoraAdapterConfig.from_folder(peft_folders[variant])
    ranks = {Q0: template.r, V0: 2, Q1: 7, V1: template.r}
    modules = _random_modules(ranks, seed=len(variant))
    out = save_lora_adapter(tmp_path / "out", modules, template, fold_scale=fold_scale)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] == template.use_rslora
    assert config["lora_alpha"] == template.lora_alpha
    # only modules whose rank differs from the config's r need a rank_pattern entry
    patterned = {m for m in ranks if any(re.fullmatch(k, m)
                                         for k in config["rank_pattern"])}
    assert patterned == {m for m, r in ranks.items() if r != config["r"]}
    assert config["r"] in ranks.values()
    ref = peft_reference(out)
    assert ref.ranks == ranks
    for module, (u, v) in modules.items():
        torch.testing.assert_close(ref.deltas[module], u @ v, rtol=1e-5, atol=1e-5)
    reread = LoraAdapter(out)
    for module, (u, v) in modules.items():
        torch.testing.assert_close(reread.delta_weight(module), u @ v, rtol=1e-5, atol=1e-5)
    if fold_scale == "b":  # A is stored exactly as given
        for module, (_, v) in modules.items():
            assert torch.equal(reread.lora_factors(module)[1], v.float())


def test_save_lora_adapter_keeps_dense_heads(tmp_path):
    template_dir = make_peft_adapter(tmp_path / "template", kind="seqcls", r=2)
    template = LoraAdapterConfig.from_folder(template_dir)
    head = torch.randn(3, 32, dtype=torch.float64)
    modules = _random_modules({Q0: 2, V0: 2, Q1: 3, V1: 2})
    out = save_lora_adapter(tmp_path / "out", modules, template, dense={"score.weight": head})
    ref = peft_reference(out, kind="seqcls")
    torch.testing.assert_close(ref.dense["score.weight"], head, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref.deltas[Q1], modules[Q1][0] @ modules[Q1][1],
                               rtol=1e-5, atol=1e-5)
    model = load_peft(out, kind="seqcls")
    assert type(model).__name__ == "PeftModelForSequenceClassification"


def test_pickle_free_output(tmp_path, peft_folders):
    template = LoraAdapterConfig.from_folder(peft_folders["plain"])
    out = save_lora_adapter(tmp_path / "out", _random_modules({Q0: 4, V0: 4, Q1: 4, V1: 4}),
                            template)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]


def test_save_file_roundtrip_sanity(tmp_path):
    """The factory's raw writer is independent of ours: same key layout as PEFT's."""
    peft_dir = make_peft_adapter(tmp_path / "p", r=2)
    raw_dir = write_raw_adapter(tmp_path / "r", r=2)
    assert set(load_file(str(peft_dir / "adapter_model.safetensors"))) == \
        set(load_file(str(raw_dir / "adapter_model.safetensors")))
