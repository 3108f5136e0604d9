"""A corpus of malformed and hostile uploads, all in one round beside honest clients.

Every bad upload is committed straight into its client's repo (bypassing the client-side
gate, as a hostile or buggy client would). The round must refuse each one with a reason
naming the problem and a fix, personalize the honest clients exactly as if the bad ones
were not there, never load a pickle, and not retry a refused upload in the next round.
`fedbip push` refuses the same uploads before anything is sent.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from federation_helpers import (
    CLIENTS,
    new_local_federation,
    published_outputs,
    run_cli,
    write_upload,
)
from safetensors.torch import load_file, save

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.lora import WEIGHTS_NAME
from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.errors import AdapterError
from fedbip_hub.federation.client import join, push, upload_id
from fedbip_hub.federation.config import FEDERATION_FILE, Limits, dump_json
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import run_round

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
HEAD = "score.weight"
PINNED_REVISION = "1" * 40
MAX_RANK = 8
MAX_MB = 0.05  # honest uploads are ~6 KB


class _Tripwire:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _st(tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"format": "pt", **metadata})


def _header(header: object) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 64


def _resized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same adapter for a base with hidden size 48 instead of 32."""
    grow = {32: 48, 16: 24}
    return {k: torch.randn([grow.get(d, d) for d in v.shape]) for k, v in tensors.items()}


def _corpus(good: Path, rank16: Path, base_model: str, marker: Path
            ) -> dict[str, tuple[dict[str, bytes], str]]:
    """client name → (the files of its upload, a phrase its refusal must contain)."""
    config = json.loads((good / CONFIG_NAME).read_text())
    tensors = load_file(good / WEIGHTS_NAME)
    weights = (good / WEIGHTS_NAME).read_bytes()
    lora_only = {k: v for k, v in tensors.items() if ".lora_" in k}

    def upload(name: str, *, cfg: dict | bytes | None = config, st: bytes | None = weights,
               meta: dict | bytes | None = None, extra: dict[str, bytes] | None = None
               ) -> dict[str, bytes]:
        if not isinstance(meta, bytes):
            meta = json.dumps({"n_examples": 5, "base_model": base_model,
                               "upload_nonce": name} | (meta or {})).encode()
        files = {CONFIG_NAME: json.dumps(cfg).encode() if isinstance(cfg, dict) else cfg,
                 WEIGHTS_NAME: st, UPLOAD_METADATA_NAME: meta, **(extra or {})}
        return {k: v for k, v in files.items() if v is not None}

    def tensors_with(**changes: torch.Tensor | None) -> bytes:
        out = dict(tensors)
        for key, value in changes.items():
            key = P + key.replace("__", ".")
            if value is None:
                out.pop(key)
            else:
                out[key] = value
        return _st(out)

    def cast(dtype: torch.dtype) -> bytes:
        return _st({k: (v * 100).to(dtype) for k, v in tensors.items()})

    def poisoned(value: float) -> bytes:
        out = dict(tensors)
        out[P + Q0 + ".lora_B.weight"] = out[P + Q0 + ".lora_B.weight"].clone()
        out[P + Q0 + ".lora_B.weight"][0, 0] = value
        return _st(out)

    tripwire = pickle.dumps(_Tripwire(marker))
    corpus: dict[str, tuple[Callable[[str], dict[str, bytes]], str]] = {
        # -- unsafe or unsupported formats
        "pickle-only": (lambda n: upload(n, st=None, extra={"adapter_model.bin": tripwire}),
                        "pickle-format weights (adapter_model.bin)"),
        "pickle-beside": (lambda n: upload(n, extra={"optimizer.pt": tripwire,
                                                     "state.pkl": tripwire}),
                          "pickle-format weights (optimizer.pt, state.pkl)"),
        "not-lora": (lambda n: upload(n, cfg=config | {"peft_type": "IA3"}),
                     "only LoRA adapters can be federated"),
        "dora": (lambda n: upload(n, cfg=config | {"use_dora": True}), "sets use_dora=true"),
        "lora-bias": (lambda n: upload(n, cfg=config | {"lora_bias": True}),
                      "sets lora_bias=true"),
        "embedding-lora": (lambda n: upload(n, st=tensors_with(
            **{"model__embed_tokens__lora_embedding_A": torch.zeros(4, 64)})),
            "LoRA on embedding layers is not supported"),
        # -- the config
        "no-config": (lambda n: upload(n, cfg=None), f"No {CONFIG_NAME}"),
        "config-not-json": (lambda n: upload(n, cfg=b"{'r': 4,"), "is not valid JSON"),
        "config-bad-pattern": (lambda n: upload(n, cfg=config | {"rank_pattern": {"[q": 4}}),
                               "malformed rank_pattern"),
        "config-rank-not-int": (lambda n: upload(n, cfg=config | {"rank_pattern": {"q": "x"}}),
                                "malformed rank_pattern"),
        # -- the safetensors file itself
        "header-corrupt": (lambda n: upload(n, st=struct.pack("<Q", 10**12) + b"{}"),
                           "corrupt safetensors header"),
        "header-truncated": (lambda n: upload(n, st=b"\x10\x00\x00"), "is truncated"),
        "header-garbage": (lambda n: upload(n, st=struct.pack("<Q", 6) + b"\xff{nope"),
                           "unreadable safetensors header"),
        "header-not-object": (lambda n: upload(n, st=_header([1, 2, 3])),
                              "corrupt safetensors header (not a JSON object)"),
        "header-entry-malformed": (lambda n: upload(n, st=_header(
            {P + Q0 + ".lora_A.weight": {"dtype": "F32", "data_offsets": ["0", 16]}})),
            "malformed header entry"),
        "offsets-past-eof": (lambda n: upload(n, st=weights[:-100]),
                             "points past the end of the file"),
        # -- values
        "int64": (lambda n: upload(n, st=cast(torch.int64)), "has dtype I64"),
        "float64": (lambda n: upload(n, st=cast(torch.float64)), "has dtype F64"),
        "nan": (lambda n: upload(n, st=poisoned(float("nan"))), "holds NaN or Inf values"),
        "inf": (lambda n: upload(n, st=poisoned(float("inf"))), "holds NaN or Inf values"),
        # -- structure against the federation
        "other-hidden-size": (lambda n: upload(n, st=_st(_resized(tensors))),
                              "is 48×48, the base model's is 32×32"),
        "rank-mismatch": (lambda n: upload(n, st=tensors_with(
            **{f"{Q0}__lora_B__weight": torch.randn(32, 5)})), "inconsistent shapes"),
        "missing-lora-b": (lambda n: upload(n, st=tensors_with(
            **{f"{Q0}__lora_B__weight": None})), "has no lora_B tensor"),
        "stray-key": (lambda n: upload(n, st=tensors_with(
            **{"model__layers__0__mlp__gate_proj__weight": torch.zeros(64, 32)})),
            "is neither a LoRA factor nor part of modules_to_save"),
        "extra-k-proj": (lambda n: upload(
            n, cfg=config | {"target_modules": ["q_proj", "k_proj", "v_proj"]},
            st=tensors_with(**{f"{K0}__lora_A__weight": torch.randn(4, 32),
                               f"{K0}__lora_B__weight": torch.randn(16, 4)})),
            f"unexpected ['{K0}']"),
        "missing-q-proj": (lambda n: upload(n, cfg=config | {"target_modules": ["v_proj"]},
                                            st=_st({k: v for k, v in tensors.items()
                                                    if "q_proj" not in k})),
                           "target modules differ from the federation's"),
        "head-wrong-shape": (lambda n: upload(n, st=tensors_with(score__weight=torch.randn(5,
                                                                                        32))),
                             "has shape [5, 32], expected [3, 32]"),
        "no-lora-modules": (lambda n: upload(n, st=_st({P + HEAD: tensors[P + HEAD]})),
                            "holds no LoRA factors"),
        "no-head": (lambda n: upload(n, st=_st(lora_only)), "saved dense modules [] differ"),
        "rank-over-limit": (lambda n: upload(n, cfg=json.loads((rank16 / CONFIG_NAME)
                                                               .read_text()),
                                             st=(rank16 / WEIGHTS_NAME).read_bytes()),
                            f"has rank 16, over the limit {MAX_RANK}"),
        "too-big": (lambda n: upload(n, st=_st(tensors, padding="0" * 80_000)),
                    f"over the federation's limit of {MAX_MB:g} MB"),
        # -- the upload's metadata
        "wrong-base-model": (lambda n: upload(n, meta={"base_model": "someone/other-llm"}),
                             "trained on base model 'someone/other-llm'"),
        "wrong-base-revision": (lambda n: upload(n, meta={"base_revision": "2" * 40}),
                                f"the federation pins {PINNED_REVISION}"),
        "metadata-malformed": (lambda n: upload(n, meta=b'{"n_examples": 5,'),
                               "fedbip_upload.json is malformed"),
        "metadata-invalid": (lambda n: upload(n, meta={"n_examples": -3}),
                             "malformed (n_examples: Input should be greater than or equal"),
        "metadata-missing": (lambda n: {k: v for k, v in upload(n).items()
                                        if k != UPLOAD_METADATA_NAME},
                             f"upload has no {UPLOAD_METADATA_NAME}"),
        "weights-missing": (lambda n: upload(n, st=None), f"upload has no {WEIGHTS_NAME}"),
        "bogus-start": (lambda n: upload(n, meta={"start_revision": "f" * 40}),
                        "is not a personalized adapter this federation published"),
    }
    return {name: (build(name), phrase) for name, (build, phrase) in corpus.items()}


def _configure(fed: Federation) -> None:
    config = fed.config()
    config.limits = Limits(max_rank=MAX_RANK, max_adapter_mb=MAX_MB)
    config.base_revision = PINNED_REVISION
    fed.store.commit(fed.repo_id, {FEDERATION_FILE: dump_json(config)},
                     message="limits and a pinned base revision")


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    fed = new_local_federation(tmp_path_factory.mktemp("honest"), tiny_base)
    run_round(fed)
    return published_outputs(fed)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    """The honest federation plus one member per bad kind, after two rounds."""
    root = tmp_path_factory.mktemp("attacked")
    fed = new_local_federation(root, tiny_base)
    _configure(fed)
    init = fed.init_folder()
    marker = root / "a-pickle-was-loaded"
    corpus = _corpus(write_upload(init, root / "good", seed=99, group=0, rank=4),
                     write_upload(init, root / "rank16", seed=98, group=0, rank=16),
                     str(tiny_base), marker)
    for name, (files, _phrase) in corpus.items():
        repo = join(fed, name).repo_id
        fed.store.commit(repo, files, message="bypass the client-side gate")
    first = run_round(fed)
    second = run_round(fed)
    return fed, corpus, first, second, marker


def test_the_corpus_is_broad(attacked):
    _fed, corpus, *_ = attacked
    assert len(corpus) >= 30
    assert len({phrase for _files, phrase in corpus.values()}) >= 28


def test_every_bad_upload_is_refused_with_its_reason_and_a_fix(attacked):
    _fed, corpus, first, _second, _marker = attacked
    assert first["status"] == "completed" and first["round"] == 1
    assert sorted(first["skipped"]) == sorted(corpus)
    wrong = {name: first["skipped"][name] for name, (_f, phrase) in corpus.items()
             if phrase not in first["skipped"][name]}
    assert not wrong, wrong
    for name, reason in first["skipped"].items():
        assert "(fix: " in reason, (name, reason)
        assert "Traceback" not in reason and "\n" not in reason, (name, reason)


def test_refusal_reasons_name_no_server_path(attacked):
    fed, _corpus, first, _second, _marker = attacked
    cache, base = str(fed.store.cache_dir), fed.config().base_model  # base: the config's
    for name, reason in first["skipped"].items():
        assert cache not in reason and "/tmp" not in reason.replace(base, "<base>"), (
            name, reason)
    for name in ("nan", "header-corrupt"):
        repo = fed.member(name).repo_id
        assert f"{repo}@{fed.store.head(repo)[:12]}/{WEIGHTS_NAME}" in first["skipped"][name]


def test_honest_clients_are_personalized_exactly_as_without_the_bad_ones(attacked, honest):
    fed, _corpus, first, _second, _marker = attacked
    assert sorted(first["outputs"]) == sorted(CLIENTS)
    assert sorted(first["clients"]) == sorted(CLIENTS)
    for client, tensors in published_outputs(fed).items():
        assert tensors.keys() == honest[client].keys()
        for key, value in honest[client].items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)


def test_no_pickle_is_ever_loaded(attacked):
    *_, marker = attacked
    assert not marker.exists()


# Refused from the repo's listing or the metadata alone, before any download: the same
# reason every round. The others are refused after download and remembered by upload id.
REFUSED_BEFORE_DOWNLOAD = {"pickle-only", "pickle-beside", "metadata-malformed",
                           "metadata-invalid", "metadata-missing", "weights-missing",
                           "bogus-start"}


def test_refused_uploads_are_not_retried(attacked):
    fed, corpus, first, second, _marker = attacked
    assert second["status"] == "nothing-new" and second["round"] == 1
    state = fed.state()
    assert state.round == 1
    for name in corpus:
        reason = second["skipped"][name]
        client = state.clients.get(name)
        assert not (client and client.personalized_history), name
        if name in REFUSED_BEFORE_DOWNLOAD:
            assert reason == first["skipped"][name], name
            assert not (client and client.refused_upload), name
            continue
        repo = fed.member(name).repo_id
        metadata = fed.store.read_bytes(repo, UPLOAD_METADATA_NAME, fed.store.head(repo))
        assert client.refused_upload == upload_id(metadata), name
        assert client.consumed_upload is None, name
        assert "last upload was refused" in reason and "push a corrected one" in reason


PUSH_KINDS = ["pickle-beside", "dora", "int64", "nan", "other-hidden-size", "extra-k-proj",
              "rank-over-limit", "too-big", "header-corrupt", "no-lora-modules"]


def _adapter_folder(files: dict[str, bytes], dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name, data in files.items():
        if name != UPLOAD_METADATA_NAME:
            (dest / name).write_bytes(data)
    return dest


def test_push_refuses_bad_adapters_naming_the_client(attacked, tmp_path):
    fed, corpus, _first, _second, marker = attacked
    heads = {name: fed.store.head(fed.member(name).repo_id) for name in PUSH_KINDS}
    for name in PUSH_KINDS:
        files, phrase = corpus[name]
        with pytest.raises(AdapterError) as info:
            push(fed, name, _adapter_folder(files, tmp_path / name))
        assert info.value.client == name
        assert phrase in info.value.message, (name, info.value.message)
        assert info.value.hint
        assert fed.store.head(fed.member(name).repo_id) == heads[name]  # nothing sent
    assert not marker.exists()


def test_fedbip_push_cli_reports_one_clear_error(attacked, tmp_path):
    fed, corpus, *_ = attacked
    folder = _adapter_folder(corpus["nan"][0], tmp_path / "nan")
    head = fed.store.head(fed.member("nan").repo_id)
    result = run_cli(["push", fed.address, "--client", "nan", "--adapter", str(folder)],
                     {"COLUMNS": "400"}, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: [nan] ")
    assert "holds NaN or Inf values" in " ".join(result.stderr.split())
    assert any(line.startswith("Hint:") for line in result.stderr.splitlines())
    assert fed.store.head(fed.member("nan").repo_id) == head

