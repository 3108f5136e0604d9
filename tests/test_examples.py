"""The examples in examples/ run, in their reduced (``--quick``) mode, as a user runs
them: as scripts in a subprocess, against a local-folder federation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from federation_helpers import REPO_ROOT, run_cli

from fedbip_hub.federation.client import latest_personalized_revision
from fedbip_hub.federation.repo import Federation

EXAMPLES = REPO_ROOT / "examples"


def _script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout, result.stderr[-4000:])
    return result


def test_the_walkthrough_and_the_own_trainer_member_run(tmp_path):
    work = tmp_path / "work"
    out = _script("walkthrough.py", "--work", str(work), "--quick", cwd=tmp_path).stdout
    assert "round 1: completed, published for alice, bob" in out
    assert "alice loaded her personalized adapter: PeftModelForSequenceClassification" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (work / "tiny-base" / name).is_file(), name  # what an offline base holds
    first = json.loads((work / "alice.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "label"} and isinstance(first["label"], int)

    fed = Federation.at(str(work / "myfed"))
    pulled_from = latest_personalized_revision(fed, fed.member("alice").repo_id)
    _script("own_trainer.py", "--fed", str(work / "myfed"), "--client", "alice", "--data",
            str(work / "alice.jsonl"), "--out", str(tmp_path / "own"), "--quick",
            cwd=tmp_path)
    repo = fed.member("alice").repo_id
    metadata = json.loads(fed.store.read_bytes(repo, "fedbip_upload.json",
                                               fed.store.head(repo)))
    assert metadata["start_revision"] == pulled_from  # the start `fedbip pull` noted
    record = json.loads(run_cli(["run", str(work / "myfed"), "--json"], {},
                                server=True).stdout)
    assert record["round"] == 2 and record["inputs"]["alice"]["fresh"] is True
    assert record["inputs"]["alice"]["staleness"] == 0 and "alice" in record["outputs"]


def test_the_shipped_github_workflow_is_what_the_command_prints():
    shipped = (EXAMPLES / "github-workflow.yml").read_text()
    printed = run_cli(["schedule", "print", "github", "acme/fed"], {}, server=True).stdout
    assert shipped == printed, "regenerate: fedbip-server schedule print github acme/fed"
    steps = yaml.safe_load(shipped)["jobs"]["round"]["steps"]
    assert steps[-1]["run"].strip() == "fedbip-server run acme/fed"


def test_the_trl_member_trains_with_sft_and_its_callback_pushes(tmp_path):
    work = tmp_path / "trl"
    out = _script("trl_member.py", "--setup", str(work), "--out", str(tmp_path / "alice"),
                  "--quick", cwd=tmp_path).stdout
    assert "alice starts from the initial adapter" in out
    fed = Federation.at(str(work / "llmfed"))
    repo = fed.member("alice").repo_id
    metadata = json.loads(fed.store.read_bytes(repo, "fedbip_upload.json",
                                               fed.store.head(repo)))
    assert metadata.get("start_revision") is None and metadata["n_examples"] == 32
    record = json.loads(run_cli(["run", str(work / "llmfed"), "--json"], {},
                                server=True).stdout)
    assert record["inputs"]["alice"]["fresh"] is True and "alice" in record["outputs"]

    # the next round starts from alice's personalized adapter, and the push says so
    personalized = latest_personalized_revision(fed, repo)
    out = _script("trl_member.py", "--setup", str(work), "--out", str(tmp_path / "alice"),
                  "--quick", cwd=tmp_path).stdout
    assert f"alice starts from {personalized[:12]}" in out
    metadata = json.loads(fed.store.read_bytes(repo, "fedbip_upload.json",
                                               fed.store.head(repo)))
    assert metadata["start_revision"] == personalized
