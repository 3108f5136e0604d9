"""Streaming rounds (fedbip_hub.server.streaming) and the compute device/dtype options.

Streaming and in-memory rounds must publish *bitwise identical* adapters: the staged
tensors are the merge's own results (same dtype, written and read back losslessly by
safetensors), and the downloads' concurrency never changes what is computed.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from factories import write_raw_adapter
from federation_helpers import (
    CLIENTS,
    new_local_federation,
    published_tensors,
    push_fresh,
    set_strategy,
)

from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.engine.compute import delta_to, resolve_device, resolve_dtype
from fedbip_hub.engine.merge import MergePlan, personalize
from fedbip_hub.engine.similarity import compute_similarity
from fedbip_hub.engine.strategies import Strategy, compute_weights
from fedbip_hub.engine.task_vectors import LowRankDelta, TaskVector
from fedbip_hub.errors import ConfigError, FedbipError
from fedbip_hub.federation.client import pull
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner
from fedbip_hub.server.streaming import OrderedMap, StagingArea

F64 = torch.float64
HEAD = "lm_head.weight"
HAS_CUDA = torch.cuda.is_available()


# -- engine: personalize with a staging sink -----------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    gen = torch.Generator().manual_seed(3)
    folders = [write_raw_adapter(root / f"c{k}", r=3, lora_alpha=6, seed=k,
                                 dense={HEAD: torch.randn(64, 32, generator=gen)})
               for k in range(4)]
    latest = write_raw_adapter(root / "latest", r=3, lora_alpha=5, seed=9,
                               dense={HEAD: torch.randn(64, 32, generator=gen)})
    return folders, latest


def _setup(folders, latest, method="fedbip-l"):
    vectors = [TaskVector(LoraAdapter(f), name=f"c{k}") for k, f in enumerate(folders)]
    weights = compute_weights(Strategy(method=method), k=len(vectors),
                              report=compute_similarity(vectors), n_examples=[1] * 4)
    plan = MergePlan(targets=[0, 1, 2, 3], contribution=torch.tensor([1, 0.5, 0.7, 1.0],
                                                                      dtype=F64),
                     latest=[LoraAdapter(latest), None, LoraAdapter(latest), None])
    return vectors, weights, plan


@pytest.mark.parametrize(("refactor", "method"), [("svd", "fedbip-l"), ("cat", "fedbip"),
                                                  ("svd", "fedit")])
def test_staged_merge_is_bitwise_the_in_memory_merge(adapters, tmp_path, refactor, method):
    folders, latest = adapters
    vectors, weights, plan = _setup(folders, latest, method)
    space = Strategy(method=method).spec.merge_space
    in_memory = personalize(vectors, weights, plan, rank=3, refactor=refactor, space=space)
    with StagingArea(4, space=space, root=tmp_path) as area:
        streamed = personalize(vectors, weights, plan, rank=3, refactor=refactor,
                               space=space, sink=area)
        # the merge itself held no output factors: they went to disk as they were ready
        assert all(not out.modules and not out.dense for out in streamed)
        assert area.stats.files == 4 * 5 and area.stats.bytes_written > 0
        template = LoraAdapter(folders[0]).config
        for index, (memory, staged) in enumerate(zip(in_memory, area.adapters, strict=True)):
            assert staged.discarded_energy == memory.discarded_energy
            loaded = staged.load()
            assert list(loaded.modules) == list(memory.modules)
            for name, (u, v) in memory.modules.items():
                assert torch.equal(loaded.modules[name][0], u)
                assert torch.equal(loaded.modules[name][1], v)
            assert torch.equal(loaded.dense[HEAD], memory.dense[HEAD])
            a = memory.save(tmp_path / f"mem{index}", template)
            b = staged.save(tmp_path / f"staged{index}", template)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                assert (a / name).read_bytes() == (b / name).read_bytes()
            assert staged.released and not any((area.root / f"{index:06d}").iterdir())
            with pytest.raises(RuntimeError, match="already saved"):
                staged.load()
        root = area.root
    assert not root.exists()  # closing the area removes its folder


def test_bounded_resident_peers_give_the_same_merge(adapters, monkeypatch):
    """Top-k weights + max_resident: factors read on demand through a small LRU cache,
    bitwise the same results as reading all K."""
    import fedbip_hub.engine.merge as merge_module

    folders, latest = adapters
    vectors, _, plan = _setup(folders, latest)
    weights = compute_weights(Strategy(method="fedbip-l", top_k=1), k=4,
                              report=compute_similarity(vectors))
    eager = personalize(vectors, weights, plan, rank=3)
    caches = []
    real = merge_module.LazyDeltas

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

        def __getitem__(self, k):
            value = super().__getitem__(k)
            assert len(self._cache) <= 2
            return value

    monkeypatch.setattr(merge_module, "LazyDeltas", Recording)
    lazy = personalize(vectors, weights, plan, rank=3, max_resident=2)
    assert len(caches) == 5  # every module (4 LoRA + the head) went through the cache
    assert all(c.reads >= 1 for c in caches)
    for a, b in zip(eager, lazy, strict=True):
        assert a.discarded_energy == b.discarded_energy
        for name, (u, v) in a.modules.items():
            assert torch.equal(u, b.modules[name][0]) and torch.equal(v, b.modules[name][1])
        assert torch.equal(a.dense[HEAD], b.dense[HEAD])


def test_staging_area_is_removed_when_collected(tmp_path):
    area = StagingArea(2, root=tmp_path)
    root = area.root
    assert root.is_dir()
    del area
    assert not root.exists()


# -- concurrent downloads ------------------------------------------------------------------
def test_ordered_map_is_concurrent_and_keeps_input_order():
    lock = threading.Lock()
    state = {"active": 0, "peak": 0}

    def work(x: int) -> int:
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        time.sleep(0.02 * (5 - x))  # later items finish first
        with lock:
            state["active"] -= 1
        if x == 2:
            raise FedbipError("refused")
        return x * x

    results = list(OrderedMap(work, range(5), workers=4, catch=(FedbipError,)))
    assert [item for item, _, _ in results] == [0, 1, 2, 3, 4]
    assert [value for _, value, _ in results] == [0, 1, None, 9, 16]
    assert isinstance(results[2][2], FedbipError)
    assert state["peak"] > 1
    assert len(OrderedMap(work, [1, 3], workers=2)) == 2


def test_ordered_map_raises_other_errors():
    def boom(x: int) -> int:
        if x == 1:
            raise KeyError("bug")
        return x

    with pytest.raises(KeyError):
        list(OrderedMap(boom, range(4), workers=3, catch=(FedbipError,)))


# -- rounds ------------------------------------------------------------------------------
def _second_push(fed: Federation, root: Path, client: str) -> None:
    start = pull(fed, client, root / f"pulled-{client}").folder
    push_fresh(fed, root, client, seed=77, group=CLIENTS[client], start=start)


@pytest.mark.parametrize("compute_dtype", ["fp32", "fp64"])
def test_streaming_and_in_memory_rounds_publish_identical_adapters(tmp_path, tiny_base,
                                                                    compute_dtype):
    """Bitwise: same tensors, over a first round and a round with start adapters."""
    a = new_local_federation(tmp_path / "a", tiny_base)
    set_strategy(a, compute_dtype=compute_dtype)
    shutil.copytree(tmp_path / "a" / "fed", tmp_path / "b" / "fed")
    b = Federation.at(str(tmp_path / "b" / "fed"))
    records = {}
    for round_no in (1, 2):
        if round_no == 2:
            for fed, root in ((a, tmp_path / "a"), (b, tmp_path / "b")):
                _second_push(fed, root, "alice")
        streaming = RoundRunner(a)
        in_memory = RoundRunner(b)
        in_memory.streaming = False
        records[round_no] = (streaming.run(), in_memory.run())
        streamed, held = records[round_no]
        assert streamed["compute"]["streaming"] and not held["compute"]["streaming"]
        assert streamed["compute"]["staging"]["files"] > 0
        assert held["compute"]["staging"] is None
        assert streamed["cosine"] == held["cosine"] and streamed["weights"] == held["weights"]
        assert streamed["truncation"] == held["truncation"]
        for client in CLIENTS:
            mine, theirs = published_tensors(a, client), published_tensors(b, client)
            assert mine.keys() == theirs.keys()
            for key, value in mine.items():
                assert torch.equal(value, theirs[key]), (round_no, client, key)
    assert records[2][0]["inputs"]["alice"]["fresh"]
    assert not records[2][0]["inputs"]["bob"]["fresh"]


def test_round_downloads_concurrently(tmp_path, tiny_base, monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    lock = threading.Lock()
    state = {"active": 0, "peak": 0}
    real = fed.store._download

    def slow(repo_id, path, revision, dest):
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        try:
            time.sleep(0.05)
            real(repo_id, path, revision, dest)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(fed.store, "_download", slow)
    record = RoundRunner(fed).run()
    assert record["status"] == "completed"
    assert record["clients"] == list(CLIENTS)  # input order, whatever finished first
    assert state["peak"] > 1


def test_unchanged_inputs_are_never_downloaded_twice_across_rounds(tmp_path, tiny_base,
                                                                   monkeypatch):
    fed = new_local_federation(tmp_path, tiny_base)
    first = RoundRunner(fed).run()
    push_fresh(fed, tmp_path, "alice", seed=31, group=0)
    # the next round runs as a new job: a new store object over the same cache folder
    job = Federation.at(str(tmp_path / "fed"))
    downloads: list[tuple[str, str, str]] = []
    real = job.store._download

    def spy(repo_id, path, revision, dest):
        downloads.append((repo_id, path, revision))
        real(repo_id, path, revision, dest)

    monkeypatch.setattr(job.store, "_download", spy)
    second = RoundRunner(job).run()
    assert second["inputs"]["alice"]["fresh"] and not second["inputs"]["bob"]["fresh"]
    for client in ("bob", "carol"):
        pinned = first["inputs"][client]
        assert second["inputs"][client]["commit"] == pinned["commit"]
        assert not [d for d in downloads if d[0] == pinned["repo_id"]
                    and d[2] == pinned["commit"]], f"{client}'s upload was downloaded again"
    alice = second["inputs"]["alice"]
    assert any(d[0] == alice["repo_id"] and d[2] == alice["commit"] for d in downloads)


# -- device and compute dtype -------------------------------------------------------------
def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not HAS_CUDA:
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_dtype("fp64") is F64 and resolve_dtype("fp32") is torch.float32
    with pytest.raises(ConfigError):
        resolve_dtype("fp8")
    # inputs are upcast, never narrowed
    bf16 = LowRankDelta(torch.ones(2, 1, dtype=torch.bfloat16), torch.ones(1, 2))
    assert delta_to(bf16, None, torch.float32).u.dtype == torch.float32
    wide = LowRankDelta(torch.ones(2, 1, dtype=F64), torch.ones(1, 2, dtype=F64))
    assert delta_to(wide, None, torch.float32).u.dtype == F64


def test_bf16_adapters_are_computed_in_fp32_and_fp64_on_request(tmp_path):
    low = [write_raw_adapter(tmp_path / f"bf{k}", r=3, lora_alpha=6, seed=k,
                             dtype=torch.bfloat16) for k in range(3)]
    vectors = [TaskVector(LoraAdapter(f), name=f"c{k}") for k, f in enumerate(low)]
    ref = compute_similarity([TaskVector(LoraAdapter(f), name=f"c{k}", dtype=F64)
                              for k, f in enumerate(low)])
    for device in ("cpu", "auto"):
        report = compute_similarity(vectors, device=device, dtype=F64)
        assert torch.allclose(report.model_cosine(), ref.model_cosine(), atol=1e-12)
    report32 = compute_similarity(vectors, device="cpu", dtype=torch.float32)
    assert torch.allclose(report32.model_cosine(), ref.model_cosine(), atol=1e-5)
    weights = compute_weights(Strategy(method="fedbip"), k=3, report=ref)
    plan = MergePlan([0], torch.ones(3, dtype=F64), [None])
    (merged,) = personalize(vectors, weights, plan, rank=None, refactor="cat", device="cpu")
    (exact,) = personalize(vectors, weights, plan, rank=None, refactor="cat", dtype=F64)
    for name, (u, v) in merged.modules.items():
        assert u.dtype == torch.float32 and u.device.type == "cpu"
        assert torch.allclose(u.double() @ v.double(), exact.delta_weight(name), atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu(adapters):  # pragma: no cover - run where a GPU is lent
    folders, latest = adapters
    vectors, weights, plan = _setup(folders, latest)
    cpu = compute_similarity(vectors, dtype=F64)
    gpu = compute_similarity(vectors, device="cuda", dtype=F64)
    assert torch.allclose(cpu.model_cosine(), gpu.model_cosine(), atol=1e-10)
    on_cpu = personalize(vectors, weights, plan, rank=3, dtype=F64)
    on_gpu = personalize(vectors, weights, plan, rank=3, dtype=F64, device="cuda")
    for a, b in zip(on_cpu, on_gpu, strict=True):
        for name in a.modules:
            assert b.modules[name][0].device.type == "cpu"
            assert torch.allclose(a.delta_weight(name), b.delta_weight(name), atol=1e-8)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_server_run_refuses_cuda_without_a_gpu_before_touching_anything(tmp_path):
    from typer.testing import CliRunner

    from server_job.main import app

    result = CliRunner().invoke(app, ["run", str(tmp_path / "nowhere"), "--device", "cuda",
                                      "--json"])
    assert result.exit_code != 0
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and "no CUDA GPU" in payload["message"]
    assert not (tmp_path / "nowhere").exists()
