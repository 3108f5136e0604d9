"""Tokens never leak: every command, run as a subprocess against a Hub federation with a
known token (from HF_TOKEN or from --token), and again with a revoked and a wrong token,
prints no token and writes none: not in the repos (files, commit messages, round records,
model cards), not in the Hub or fedbip caches, not in temporary files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HF_HOME, HUB_TOKEN
from federation_helpers import CLIENTS, REPO_ROOT, write_upload
from huggingface_hub import HfApi

from fedbip_hub.federation.client import join, push
from fedbip_hub.federation.repo import Federation
from fedbip_hub.testing.hub_server import HubServer

FED = "fedorg/sec"
SECRET = "hf_SECRETtoken1234567890"
REVOKED = "hf_REVOKEDtoken0987654321"
WRONG = "hf_WRONGtoken5555566666"  # never registered
# What must never show up: each token's distinctive part (a partial leak counts too).
MARKS = ("SECRETtoken", "REVOKEDtoken", "WRONGtoken")

# Every command of both CLIs; a new command fails test_every_command_is_covered until it
# is added to the runs below.
FEDBIP_COMMANDS = {"init", "join", "push", "pull", "status", "similarity", "merge", "train",
                   "eval", "demo", "strategy"}
SERVER_COMMANDS = {"run", "schedule create", "webhook create"}


def _leaks(data: str | bytes) -> list[str]:
    data = data if isinstance(data, bytes) else data.encode()
    return [mark for mark in MARKS if mark.encode() in data]


class World:
    def __init__(self, root: Path, hub_env: dict[str, str]):
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.env = {**os.environ, **hub_env, "HF_HOME": str(root / "hf-home"),
                    "FEDBIP_CACHE": str(root / "cache"), "TMPDIR": str(self.tmp),
                    "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
        for name in ("HF_TOKEN", "FEDBIP_DEBUG", "WEBHOOK_PAYLOAD"):  # the token: per run
            self.env.pop(name, None)
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def run_all(self, runs: dict[str, tuple[list[str], str | None, bool]]) -> None:
        """Run commands concurrently. name → (argv after the module, HF_TOKEN or None,
        whether it is the server CLI)."""
        procs = {}
        for name, (args, env_token, server) in runs.items():
            env = dict(self.env)
            if env_token is not None:
                env["HF_TOKEN"] = env_token
            module = "server_job" if server else "cli.main"
            procs[name] = subprocess.Popen([sys.executable, "-m", module, *args],
                                           cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
        try:
            for name, proc in procs.items():
                out, err = proc.communicate(timeout=300)
                self.results[name] = subprocess.CompletedProcess(proc.args, proc.returncode,
                                                                 out, err)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _data(path: Path) -> Path:
    rows = [{"input_ids": [4 + (i * 7 + j) % 60 for j in range(6)], "label": i % 3}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bad_token_runs(root: Path, base: Path, token: str, tag: str, *, flag: bool,
                    only: set[str] | None = None
                    ) -> dict[str, tuple[list[str], str | None, bool]]:
    data = root / "data.jsonl"
    runs = {
        "init": (["init", f"{FED}-{tag}", "--base-model", str(base), "--num-labels", "3"],
                 False),
        "join": (["join", FED, "--client", f"mallory-{tag}"], False),
        "push": (["push", FED, "--client", "alice", "--adapter", str(root / "up-alice")],
                 False),
        "pull": (["pull", FED, "--client", "alice", "--out", str(root / f"pull-{tag}")],
                 False),
        "status": (["status", FED], False),
        "strategy": (["strategy", FED, "rank=4"], False),
        "train": (["train", FED, "--client", "alice", "--data", str(data), "--out",
                   str(root / f"train-{tag}"), "--max-steps", "1", "--device", "cpu"], False),
        "eval": (["eval", FED, "--client", "alice", "--data", str(data), "--device", "cpu"],
                 False),
        "run": (["run", FED], True),
        "schedule create": (["schedule", "create", FED, "--every", "@hourly"], True),
        "webhook create": (["webhook", "create", FED], True),
    }
    extra = ["--token", token] if flag else []
    return {f"{tag}:{name}": ([*args, *extra], None if flag else token, server)
            for name, (args, server) in runs.items() if only is None or name in only}


# A wrong token fails exactly like a revoked one (401, invalid credentials): try it, from
# --token, on each way a command reaches the Hub (HubStore, HfApi jobs, HfApi webhooks).
WRONG_TOKEN_COMMANDS = {"init", "run", "schedule create", "webhook create"}


@pytest.fixture(scope="module")
def world(hub_server: HubServer, hub_env: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> World:
    """A federation after one round (set up in-process with the token), then every command
    at once: each with the token (from HF_TOKEN, or from --token alone), each with a
    revoked token (HF_TOKEN), some with a wrong one (--token)."""
    from fedbip_hub.federation.client import init_federation
    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.server.rounds import run_round

    hub_server.reset()
    hub_server.add_token(SECRET, "sec-user", orgs=("fedorg",))
    hub_server.add_token(REVOKED, "sec-user", orgs=("fedorg",))
    hub_server.revoke_token(REVOKED)
    root = tmp_path_factory.mktemp("secrets")
    world = World(root, hub_env)
    data = _data(root / "data.jsonl")
    config = FederationConfig(name="sec", base_model=str(tiny_base), num_labels=3,
                              lora=LoraSpec(r=4, alpha=8))
    init_federation(FED, config, token=SECRET)
    fed = Federation.at(FED, token=SECRET, cache_dir=root / "cache-lib")
    for i, (client, group) in enumerate(CLIENTS.items()):
        join(fed, client)
        upload = write_upload(fed.init_folder(), root / f"up-{client}", seed=i, group=group,
                              rank=4)
        push(fed, client, upload, n_examples=10)
    run_round(fed)
    push(fed, "carol", write_upload(fed.init_folder(), root / "up2-carol", seed=7, group=1,
                                    rank=4), n_examples=10)  # news for the CLI's round
    write_upload(fed.init_folder(), root / "up2-alice", seed=8, group=0, rank=4)
    up = [str(root / f"up-{c}") for c in CLIENTS]
    good = {
        "init": (["init", f"{FED}2", "--base-model", str(tiny_base), "--num-labels", "3"],
                 SECRET, False),
        "join": (["join", FED, "--client", "dave", "--token", SECRET], None, False),
        "push": (["push", FED, "--client", "alice", "--adapter", str(root / "up2-alice"),
                  "--token", SECRET], None, False),
        "pull": (["pull", FED, "--client", "alice", "--out", str(root / "pulled")], SECRET,
                 False),
        "status": (["status", FED], SECRET, False),
        # the output rank stays the federation's r: the CLI's round is the same either way
        "strategy": (["strategy", FED, "rank=4"], SECRET, False),
        "similarity": (["similarity", *up, "--plot", str(root / "sim.png")], SECRET, False),
        "merge": (["merge", *up, "--for", "0", "--out", str(root / "merged")], SECRET, False),
        "train": (["train", FED, "--client", "bob", "--data", str(data), "--out",
                   str(root / "trained"), "--max-steps", "1", "--device", "cpu", "--push",
                   "--token", SECRET], None, False),
        "eval": (["eval", FED, "--client", "alice", "--data", str(data), "--adapter",
                  str(root / "up-alice"), "--device", "cpu"], SECRET, False),
        "demo": (["demo", "--quick", "--dir", str(root / "demo")], SECRET, False),
        "run": (["run", FED], SECRET, True),
        "schedule create": (["schedule", "create", FED, "--every", "@hourly"], SECRET, True),
        "webhook create": (["webhook", "create", FED], SECRET, True),
    }
    world.run_all({**good,
                   **_bad_token_runs(root, tiny_base, REVOKED, "revoked", flag=False),
                   **_bad_token_runs(root, tiny_base, WRONG, "wrong", flag=True,
                                     only=WRONG_TOKEN_COMMANDS)})
    return world


def _good(world: World) -> dict[str, subprocess.CompletedProcess]:
    return {n: r for n, r in world.results.items() if ":" not in n}


def test_every_command_is_covered(world: World):
    from cli_commands import command_paths

    from cli.main import app as fedbip_app
    from server_job.main import app as server_app

    # the Hub-reaching commands (a group's list/delete/print verbs reuse create's token path)
    reach = {p for p in command_paths(server_app) if " " not in p or p.endswith(" create")}
    assert set(command_paths(fedbip_app)) <= FEDBIP_COMMANDS, "cover it in test_secrets"
    assert reach <= SERVER_COMMANDS, "cover the new command in test_secrets"
    good = _good(world)
    assert set(good) == FEDBIP_COMMANDS | SERVER_COMMANDS


def test_every_command_works_with_the_token(world: World):
    for name, result in _good(world).items():
        assert result.returncode == 0, (name, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, name


def test_no_output_shows_a_token(world: World):
    leaked = {name: _leaks(r.stdout + r.stderr) for name, r in world.results.items()}
    assert not {name: marks for name, marks in leaked.items() if marks}, leaked


def test_a_revoked_or_wrong_token_gives_one_clear_error(world: World):
    bad = {n: r for n, r in world.results.items() if ":" in n}
    assert len(bad) == 11 + len(WRONG_TOKEN_COMMANDS)
    for name, result in bad.items():
        assert result.returncode != 0, (name, result.stdout)
        assert "Traceback" not in result.stderr + result.stdout, (name, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, (name, result.stderr)
        assert "token" in " ".join(result.stderr.split()).lower(), (name, result.stderr)
        assert any(line.startswith("Hint:") for line in result.stderr.splitlines()), (
            name, result.stderr)


def test_no_file_written_holds_a_token(world: World):
    leaked = []
    # The commands' HF_HOME, fedbip caches, TMPDIR and outputs; the session's HF_HOME,
    # where the in-process set-up cached what it read.
    for folder in (world.root, HF_HOME):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and _leaks(path.read_bytes()):
                leaked.append(str(path))
    assert not leaked
    assert not list(world.tmp.iterdir())  # and nothing left behind in TMPDIR


def test_no_repo_holds_a_token_in_any_commit(world: World, hub_server: HubServer):
    api = HfApi(endpoint=hub_server.endpoint, token=HUB_TOKEN)
    repos = {m.id for author in ("fedorg", "sec-user", "fed-admin")
             for m in api.list_models(author=author)}
    assert {FED, *(f"{FED}-{c}" for c in CLIENTS)} <= repos
    checked = 0
    for repo in sorted(repos):
        for commit in hub_server.commits(repo):
            assert not _leaks(f"{commit.title}\n{commit.message}\n{commit.author}"), repo
            for path, data in commit.files.items():
                assert not _leaks(data), (repo, commit.oid, path)
                checked += 1
    files = hub_server.files(FED)
    assert "rounds/000001.json" in files and "README.md" in files  # record and dashboard
    assert "personalized/README.md" in hub_server.files(f"{FED}-alice")  # a model card
    assert "rounds/000002.json" in files  # the CLI's round too
    assert checked > 50


def _token_paths(value: object, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _token_paths(v, (*path, str(k)))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _token_paths(v, (*path, i))]
    return [path] if isinstance(value, str) and _leaks(value) else []


def test_jobs_and_webhooks_carry_the_token_only_as_a_secret(world: World,
                                                            hub_server: HubServer):
    stored = {"scheduled": hub_server.scheduled_jobs, "jobs": hub_server.jobs,
              "webhooks": hub_server.webhooks}
    assert stored["scheduled"] and stored["webhooks"]
    paths = _token_paths(stored)
    assert paths, "the job's HF_TOKEN secret should be there"
    for path in paths:
        assert path[-1] == "HF_TOKEN" and any("ecret" in str(p) for p in path), path
