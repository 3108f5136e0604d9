"""End to end on real PEFT adapters: merge, load with PeftModel, compare forward logits
with a base model patched by hand."""

from __future__ import annotations

import pytest
import torch
from factories import load_peft, make_peft_adapter, peft_reference, tiny_base

from fedbip_hub.engine.strategies import Strategy
from fedbip_hub.federation.offline import merge_folders

SPECS = [dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=8, use_rslora=True),
         dict(r=6, lora_alpha=3)]
BLOCKS = {"model.layers.0": ["model.layers.0.self_attn.q_proj",
                             "model.layers.0.self_attn.v_proj"],
          "model.layers.1": ["model.layers.1.self_attn.q_proj",
                             "model.layers.1.self_attn.v_proj"]}


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    folders = [make_peft_adapter(root / f"client{k}", kind="seqcls", seed=k, **spec)
               for k, spec in enumerate(SPECS)]
    refs = [peft_reference(f, kind="seqcls") for f in folders]
    return folders, refs


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, 64, (3, 7), generator=gen)  # no pad token (id 0)


@pytest.mark.parametrize(("method", "target"), [("fedbip-l", 1), ("fedbip", 0)])
def test_merged_adapter_forward_matches_hand_patched_base(clients, tmp_path, method, target):
    folders, refs = clients
    assert set(refs[0].dense) == {"score.weight"}  # PEFT saved the classifier head
    assert [r.ranks["model.layers.0.self_attn.q_proj"] for r in refs] == [2, 4, 6]
    # the paper's rule: random adapters share no task, so the evidence rule would keep
    # every client to itself and the merge would be trivial
    result = merge_folders(folders, target, Strategy(method=method, rank=12, rule="normalize"),
                           tmp_path / "out")

    def row(key):
        return result.weights.matrices[key if method == "fedbip-l" else "model"][target]

    if method == "fedbip-l":
        assert set(result.weights.matrices) == {*BLOCKS, "score"}

    base = tiny_base("seqcls", seed=0)
    with torch.no_grad():
        modules = dict(base.named_modules())
        for block, names in BLOCKS.items():
            for name in names:
                delta = sum(float(p) * r.deltas[name] for p, r in zip(row(block), refs,
                                                                     strict=True))
                modules[name].weight += delta.to(torch.float32)
        head = sum(float(p) * r.dense["score.weight"] for p, r in zip(row("score"), refs,
                                                                    strict=True))
        base.score.weight.copy_(head.to(torch.float32))
        expected = base(input_ids=_inputs()).logits

    merged = load_peft(result.output, kind="seqcls", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=_inputs()).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # and the merge is not trivial: it differs from the target's own adapter
    own = load_peft(folders[target], kind="seqcls", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (own(input_ids=_inputs()).logits - got).abs().max() > 1e-3
