"""Shared helpers for federation tests: tiny base models, client uploads, CLI runs, what
a round published, and an independent reference of ALGORITHM.md §5 computed from
PEFT-materialised ΔW."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedbip_hub.testing.uploads import write_upload

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


def modules_loaded_by(code: str) -> set[str]:
    """Every module a fresh interpreter has loaded after running ``code`` at the repo
    root (this test process's own imports do not count)."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout
    return set(json.loads(out))


def save_tiny_base(path: Path, *, num_labels: int = 3, seed: int = 0) -> Path:
    """A 2-layer Llama for sequence classification, built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    LlamaForSequenceClassification(LlamaConfig(**TINY_LLAMA, num_labels=num_labels)
                                   ).save_pretrained(path)
    return path


def run_cli(args: Sequence[str], env: Mapping[str, str], *, server: bool = False,
            check: bool = True) -> subprocess.CompletedProcess:
    module = ["-m", "server_job"] if server else ["-m", "cli.main"]
    result = subprocess.run([sys.executable, *module, *args], cwd=REPO_ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def json_output(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout)


# -- the independent reference ---------------------------------------------------------
_BLOCK = re.compile(r"^(model\.layers\.\d+)\.")


def reference_layer(name: str) -> str:
    match = _BLOCK.match(name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def peft_delta(base_dir: Path, source: str | Path, **kwargs) -> dict[str, torch.Tensor]:
    """ΔW of every adapted weight, by PEFT itself: merge_and_unload() minus the base."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(source), **kwargs).merge_and_unload()
    return {k: (v - reference[k]).double() for k, v in merged.state_dict().items()
            if re.search(r"(q_proj|v_proj)\.weight$|^score\.weight$", k)}


def expected_round(
    latest: Mapping[str, Mapping[str, torch.Tensor]],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    fresh: Mapping[str, bool],
    staleness: Mapping[str, int],
    *, beta: float = 0.5, history: dict | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """ALGORITHM.md §5 with FedBip-L's clipped row normalisation, written from scratch.

    With ``history`` (one dict kept across rounds), cosines are the similarity memory's
    (γ = 1): the cosine of each pair's concatenated per-round task vectors, over the rounds
    in which at least one of the two was fresh.
    """
    names = list(task_vectors)
    layers = sorted({reference_layer(m) for m in next(iter(task_vectors.values()))})
    cos = {}
    for layer in layers:
        flat = torch.stack([torch.cat([t.reshape(-1) for m, t in sorted(tv.items())
                                       if reference_layer(m) == layer])
                            for tv in task_vectors.values()])
        norms = flat.norm(dim=1)
        cos[layer] = (flat @ flat.T) / (norms[:, None] * norms[None, :])
        if history is not None:
            cos[layer] = _history_cosine(history, layer, names, flat, fresh, cos[layer])
    out = {}
    for i, me in enumerate(names):
        update = {m: t.clone() for m, t in latest[me].items()}
        for layer in layers:
            scores = []
            for k, peer in enumerate(names):
                allowed = k == i or fresh[peer]
                value = 1.0 if k == i else max(float(cos[layer][i, k]), 0.0)
                scores.append(value if allowed else 0.0)
            total = sum(scores)
            for k, peer in enumerate(names):
                if not fresh[peer]:
                    continue
                weight = scores[k] / total * (1 + staleness[peer]) ** (-beta)
                for module, tau in task_vectors[peer].items():
                    if reference_layer(module) == layer:
                        update[module] = update[module] + weight * tau
        out[me] = update
    return out


def _history_cosine(history: dict, layer: str, names: list[str], flat: torch.Tensor,
                    fresh: Mapping[str, bool], this_round: torch.Tensor) -> torch.Tensor:
    out = this_round.clone()
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            pairs = history.setdefault((layer, a, b), [])
            if fresh[a] or fresh[b]:
                pairs.append((flat[i], flat[j]))
            if pairs:
                x = torch.cat([p for p, _ in pairs])
                y = torch.cat([q for _, q in pairs])
                out[i, j] = x @ y / (x.norm() * y.norm())
    return out


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest


CLIENTS = {"alice": 0, "bob": 0, "carol": 1}  # name → task group


def new_local_federation(root: Path, base_dir: Path, *, push_all: bool = True,
                         method: str = "fedbip-l"):
    """A local federation of CLIENTS, each with a first-round upload pushed."""
    from fedbip_hub.federation.client import init_federation, join
    from fedbip_hub.federation.config import FederationConfig, LoraSpec

    config = FederationConfig(name="t", base_model=str(base_dir), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8), strategy={"method": method})
    fed = init_federation(str(root / "fed"), config)
    for client in CLIENTS:
        join(fed, client)
    if push_all:
        for i, (client, group) in enumerate(CLIENTS.items()):
            push_fresh(fed, root, client, seed=i, group=group)
    return fed


def new_hub_federation(repo_id: str, base_dir: Path, root: Path,
                       members: Mapping[str, int] = CLIENTS) -> None:
    """new_local_federation's federation (same config, same uploads), on the Hub."""
    from fedbip_hub.federation.client import init_federation, join, push
    from fedbip_hub.federation.config import FederationConfig, LoraSpec

    config = FederationConfig(name="t", base_model=str(base_dir), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8), strategy={"method": "fedbip-l"})
    fed = init_federation(repo_id, config)
    for i, (client, group) in enumerate(members.items()):
        join(fed, client)
        upload = write_upload(fed.init_folder(), root / f"up-{repo_id}-{client}", seed=i,
                              group=group, rank=4)
        push(fed, client, upload, n_examples=10)


def push_fresh(fed, root: Path, client: str, *, seed: int, group: int,
               start: Path | None = None) -> str:
    """Push an upload trained (synthetically) from ``start``, or from the init."""
    from fedbip_hub.federation.client import push

    source = start or fed.init_folder()
    upload = write_upload(source, root / f"up-{client}-{seed}", seed=seed, group=group,
                          rank=None if start else 4)
    if start is not None and (start / "fedbip_start.json").exists():
        shutil.copy(start / "fedbip_start.json", upload)
    return push(fed, client, upload, n_examples=10).commit


def pull_and_push(fed, root: Path, client: str, *, seed: int, group: int) -> str:
    """Pull ``client``'s personalized adapter and push an upload trained from it."""
    from fedbip_hub.federation.client import pull

    pulled = pull(fed, client, root / f"pulled-{client}-{seed}").folder
    return push_fresh(fed, root, client, seed=seed, group=group, start=pulled)


def set_strategy(fed, **options: object) -> None:
    """Commit the federation's strategy with ``options`` set (the others kept)."""
    from fedbip_hub.federation.config import FEDERATION_FILE, dump_json

    config = fed.config()
    config.strategy = {**config.strategy, **options}
    fed.store.commit(fed.repo_id, {FEDERATION_FILE: dump_json(config)},
                     message="test: set the strategy")


def push_scaled(fed, root: Path, client: str, factor: float) -> str:
    """``client`` joins and pushes a first-round update (group 0) scaled by ``factor``:
    ΔW → factor·ΔW (B scaled; B starts at 0), head → start + factor·(head − start)."""
    from fedbip_hub.federation.client import join, push

    join(fed, client)
    init = fed.init_folder()
    upload = write_upload(init, root / f"up-{client}", seed=7, group=0, rank=4)
    start = load_file(init / "adapter_model.safetensors")
    tensors = load_file(upload / "adapter_model.safetensors")
    for key in tensors:
        if ".lora_B." in key:
            tensors[key] = factor * tensors[key]
        elif "score" in key:
            tensors[key] = start[key] + factor * (tensors[key] - start[key])
    save_file(tensors, upload / "adapter_model.safetensors", metadata={"format": "pt"})
    return push(fed, client, upload, n_examples=10).commit


# -- what a round published -------------------------------------------------------------
def published_tensors(fed, client: str) -> dict[str, torch.Tensor]:
    """The tensors of ``client``'s latest personalized adapter, checked to be a loadable
    adapter whose merge record names that client."""
    from fedbip_hub.adapters.lora import LoraAdapter
    from fedbip_hub.federation.client import latest_personalized_revision
    from fedbip_hub.federation.config import MERGE_RECORD, PERSONALIZED_DIR

    repo = fed.member(client).repo_id
    revision = latest_personalized_revision(fed, repo)
    assert revision is not None, f"{client} has no personalized adapter"
    folder = fed.store.fetch_folder(repo, revision, PERSONALIZED_DIR)
    adapter = LoraAdapter(folder, label=client)
    assert adapter.config.r > 0
    assert json.loads((folder / MERGE_RECORD).read_text())["client"] == client
    return load_file(adapter.weights_path)


def published_outputs(fed, clients: Sequence[str] = tuple(CLIENTS)
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`published_tensors` of each of ``clients``."""
    return {client: published_tensors(fed, client) for client in clients}


def publish_commits(fed, client: str) -> int:
    """How many personalized adapters were committed to ``client``'s repo."""
    from fedbip_hub.federation.client import PUBLISH_TITLE

    return sum(c.title.startswith(PUBLISH_TITLE)
               for c in fed.store.history(fed.member(client).repo_id))


class Crash(Exception):
    """Stands for the job being killed at a step."""


def crash_at(step: str):
    """A RoundRunner checkpoint that raises :class:`Crash` when the round reaches ``step``."""
    def checkpoint(reached: str) -> None:
        if reached == step:
            raise Crash(step)

    return checkpoint


def assert_same_adapters(actual: Mapping[str, Mapping[str, torch.Tensor]],
                         expected: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Published adapters that are the same models: each LoRA module's ΔW = B·A (the
    factors themselves are free up to a rotation, which ties in the weights can flip),
    and every other tensor, to float32 precision."""
    for client, tensors in expected.items():
        got = actual[client]
        assert got.keys() == tensors.keys(), client
        for key, value in tensors.items():
            if ".lora_B." in key:
                a_key = key.replace(".lora_B.", ".lora_A.")
                torch.testing.assert_close(got[key].double() @ got[a_key].double(),
                                           value.double() @ tensors[a_key].double(),
                                           rtol=1e-5, atol=1e-6, msg=f"{client} {key}")
            elif ".lora_A." not in key:
                torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7,
                                           msg=f"{client} {key}")


def start_server_job(env: Mapping[str, str], *args: str) -> subprocess.Popen:
    """``fedbip-server run ARGS`` as a background subprocess (wide columns for the logs)."""
    return subprocess.Popen([sys.executable, "-m", "server_job", "run", *args],
                            cwd=REPO_ROOT, env={**os.environ, **env, "COLUMNS": "300"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_all(procs: Sequence[subprocess.Popen], timeout: float = 300
               ) -> list[tuple[str, str]]:
    """(stdout, stderr) of every job; any still running at the end is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def reached(record: dict) -> list[str]:
    """The members a round personalized: those it published, and those it left as they
    were because no fresh update has weight for them (checked here: their weights on
    every fresh upload are zero)."""
    clients = list(record["clients"])
    fresh = [j for j, c in enumerate(clients) if record["inputs"][c]["fresh"]]
    unchanged = record.get("unchanged") or {}
    for name in unchanged:
        row = clients.index(name)
        for matrix in (record["weights"] or {}).values():
            assert all(matrix[row][j] == 0 for j in fresh), (name, matrix[row])
    assert not set(unchanged) & set(record["outputs"])
    return sorted({*record["outputs"], *unchanged})
