"""The local Hub server, exercised over real HTTP by huggingface_hub and PEFT (no patching)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from fedbip_hub.testing.hub_server import HubServer, RequestRecord, git_blob_oid

REPO = "fedorg/federation"


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token)


def _add(path: str, content: bytes | str) -> CommitOperationAdd:
    data = content.encode() if isinstance(content, str) else content
    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)


def _status(err: pytest.ExceptionInfo[HfHubHTTPError]) -> int:
    assert err.value.response is not None
    return err.value.response.status_code


# --------------------------------------------------------------------------- repos & auth


def test_environment_points_at_local_hub(hub: HubServer) -> None:
    from huggingface_hub import constants

    assert hub.endpoint == constants.ENDPOINT
    assert os.environ["HF_TOKEN"] == hub.token
    assert HfApi().whoami()["name"] == "fed-admin"


def test_whoami_reports_user_and_orgs(api: HfApi) -> None:
    me = api.whoami()
    assert me["name"] == "fed-admin"
    assert [org["name"] for org in me["orgs"]] == ["fedorg"]
    assert me["auth"]["accessToken"]["role"] == "write"


def test_create_private_repo_and_exist_ok(api: HfApi, hub: HubServer) -> None:
    url = api.create_repo(REPO, private=True)
    assert url.repo_id == REPO
    assert url == f"{hub.endpoint}/{REPO}"
    assert api.create_repo(REPO, private=True, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert _status(err) == 409

    info = api.model_info(REPO)
    assert info.private is True
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]
    assert info.sha == hub.head(REPO)


def test_visibility_behaves_like_the_real_hub(api: HfApi) -> None:
    """exist_ok never changes an existing repo's visibility; repo info reports it; the
    settings route (PUT /api/models/{id}/settings) changes it."""
    api.create_repo(REPO, private=False)
    api.create_repo(REPO, private=True, exist_ok=True)
    assert api.repo_info(REPO).private is False
    api.update_repo_settings(REPO, private=True)
    assert api.repo_info(REPO, expand=["private"]).private is True
    api.update_repo_settings(REPO, visibility="public")
    assert api.model_info(REPO).private is False


def test_create_repo_outside_own_namespaces_is_forbidden(api: HfApi) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("someone-else/repo")
    assert _status(err) == 403


def test_delete_repo(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    api.delete_repo(REPO)
    assert not hub.repo_exists(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO)
    api.delete_repo(REPO, missing_ok=True)


def test_private_repo_is_invisible_to_other_users(
    api: HfApi, hub: HubServer, tmp_path: Path
) -> None:
    api.create_repo(REPO, private=True)
    api.create_commit(REPO, [_add("secret.txt", "s3cret")], commit_message="secret")
    hub.add_token("hf_bob_token", "bob", orgs=["bob-lab"])
    bob = HfApi(endpoint=hub.endpoint, token="hf_bob_token")

    with pytest.raises(RepositoryNotFoundError):
        bob.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "secret.txt", token="hf_bob_token", cache_dir=tmp_path)
    assert not bob.file_exists(REPO, "secret.txt")
    assert not bob.repo_exists(REPO)
    # Anonymous callers get 401 + RepoNotFound, which the client maps the same way.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)
    # Members of the owning org see it.
    hub.add_token("hf_carol_token", "carol", orgs=["fedorg"])
    assert HfApi(token="hf_carol_token").model_info(REPO).private is True


def test_writes_need_write_access(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)  # public: readable by all, writable by fedorg members
    hub.add_token("hf_bob_token", "bob")
    hub.add_token("hf_reader_token", "fed-admin", orgs=["fedorg"], role="read")
    for token in ("hf_bob_token", "hf_reader_token"):
        other = HfApi(endpoint=hub.endpoint, token=token)
        assert other.model_info(REPO).id == REPO
        with pytest.raises(HfHubHTTPError) as err:
            other.create_commit(REPO, [_add("x.txt", "x")], commit_message="nope")
        assert _status(err) == 403
        with pytest.raises(HfHubHTTPError) as err:
            other.create_branch(REPO, branch="b")
        assert _status(err) == 403


def test_revoked_token_gets_401_everywhere(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    api.create_repo(REPO)
    api.create_commit(REPO, [_add("a.txt", "a")], commit_message="a")
    hub.add_token("hf_leaked_token", "fed-admin", orgs=["fedorg"])
    leaked = HfApi(endpoint=hub.endpoint, token="hf_leaked_token")
    assert leaked.whoami()["name"] == "fed-admin"
    hub.revoke_token("hf_leaked_token")

    with pytest.raises(HfHubHTTPError) as err:
        leaked.whoami()
    assert _status(err) == 401
    with pytest.raises(HfHubHTTPError) as err:
        leaked.model_info(REPO)  # a 401 on a public repo: not RepositoryNotFoundError
    assert _status(err) == 401
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert "Invalid credentials in Authorization header" in str(err.value)
    with pytest.raises(HfHubHTTPError) as err:
        hf_hub_download(REPO, "a.txt", token="hf_leaked_token", cache_dir=tmp_path)
    assert _status(err) == 401
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_never_issued").model_info(REPO)
    assert _status(err) == 401


# --------------------------------------------------------------------------- commits & refs


def test_commit_add_and_delete(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    first = api.create_commit(
        REPO,
        [
            _add("round-0/adapter.bin", b"\x00\x01"),
            _add("notes/a.md", "a"),
            _add("notes/b.md", "b"),
        ],
        commit_message="round 0",
        commit_description="first aggregation",
    )
    assert first.oid == hub.head(REPO)
    assert len(first.oid) == 40
    assert first.commit_url == f"{hub.endpoint}/{REPO}/commit/{first.oid}"

    second = api.create_commit(
        REPO,
        [CommitOperationDelete("notes/", is_folder=True), _add("round-1/adapter.bin", b"\x02")],
        commit_message="round 1",
    )
    assert hub.files(REPO) == {
        ".gitattributes": hub.files(REPO)[".gitattributes"],
        "round-0/adapter.bin": b"\x00\x01",
        "round-1/adapter.bin": b"\x02",
    }
    assert set(hub.files(REPO, first.oid)) >= {"notes/a.md", "notes/b.md"}

    api.create_commit(REPO, [CommitOperationDelete("round-0/adapter.bin")], commit_message="rm")
    assert "round-0/adapter.bin" not in api.list_repo_files(REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("missing.bin")], commit_message="rm")
    assert api.list_repo_commits(REPO)[1].commit_id == second.oid


def test_unchanged_commit_sends_nothing_and_returns_head(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    first = api.create_commit(REPO, [_add("a.txt", "same")], commit_message="a")
    hub.clear_requests()
    again = api.create_commit(REPO, [_add("a.txt", "same")], commit_message="a again")
    assert again.oid == first.oid
    assert not any("/commit/" in r.path for r in hub.requests)


def test_parent_commit_makes_the_second_writer_fail_with_412(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    base = api.create_commit(REPO, [_add("global.json", "{}")], commit_message="init").oid
    winner = api.create_commit(
        REPO, [_add("clients/a.json", "1")], commit_message="a", parent_commit=base
    )
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            REPO, [_add("clients/b.json", "2")], commit_message="b", parent_commit=base
        )
    assert _status(err) == 412
    assert hub.head(REPO) == winner.oid
    # A retry on the fresh head goes through.
    retried = api.create_commit(
        REPO, [_add("clients/b.json", "2")], commit_message="b", parent_commit=winner.oid
    )
    assert api.model_info(REPO).sha == retried.oid


def test_concurrent_writers_on_one_parent_exactly_one_wins(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    base = hub.head(REPO)

    def push(client: int) -> int:
        try:
            api.create_commit(
                REPO,
                [_add(f"clients/{client}.json", str(client))],
                commit_message=f"client {client}",
                parent_commit=base,
            )
        except HfHubHTTPError as err:
            assert err.response is not None
            return err.response.status_code
        return 200

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(push, range(8)))
    assert statuses == [200] + [412] * 7
    assert len(api.list_repo_commits(REPO)) == 2


def test_pull_requests_readme_and_upload_folder(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    api.create_repo(REPO)
    hub.clear_requests()
    api.create_commit(
        REPO, [_add("README.md", "---\nlicense: mit\n---\n# card\n")], commit_message="card"
    )
    assert ("POST", "/api/validate-yaml", 200) in hub.requests

    pr = api.create_commit(REPO, [_add("proposal.txt", "p")], commit_message="pr", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert "proposal.txt" not in api.list_repo_files(REPO)
    assert "proposal.txt" in api.list_repo_files(REPO, revision="refs/pr/1")
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests or []] == [("refs/pr/1", pr.oid)]

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("x")
    (tmp_path / "y.json").write_text("{}")
    before = len(api.list_repo_commits(REPO))
    api.upload_folder(repo_id=REPO, folder_path=tmp_path, path_in_repo="round-2")
    assert len(api.list_repo_commits(REPO)) == before + 1  # one commit with Xet disabled
    assert {"round-2/sub/x.txt", "round-2/y.json"} <= set(api.list_repo_files(REPO))


def test_list_models_by_author_hides_others_private_repos(api: HfApi, hub: HubServer) -> None:
    api.create_repo("fedorg/adapter-a")
    api.create_repo("fedorg/adapter-b", private=True)
    api.create_repo("fedorg/data", repo_type="dataset")
    hub.create_repo("bob/adapter-c")
    assert [m.id for m in api.list_models(author="fedorg")] == [
        "fedorg/adapter-a",
        "fedorg/adapter-b",
    ]
    assert [m.id for m in api.list_models(search="adapter-c")] == ["bob/adapter-c"]
    assert [d.id for d in api.list_datasets(author="fedorg")] == ["fedorg/data"]
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    assert [m.id for m in anonymous.list_models(author="fedorg")] == ["fedorg/adapter-a"]


def test_refs_commits_tree_and_file_exists(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    one = api.create_commit(
        REPO,
        [_add("personalized/c1/adapter_config.json", "{}"), _add("global/weights.bin", b"w")],
        commit_message="one",
    )
    two = api.create_commit(REPO, [_add("global/weights.bin", b"w2")], commit_message="two")

    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [
        ("main", "refs/heads/main", two.oid)
    ]
    assert refs.tags == [] and refs.converts == []

    commits = api.list_repo_commits(REPO)
    assert [c.commit_id for c in commits[:2]] == [two.oid, one.oid]
    assert [c.title for c in commits] == ["two", "one", "initial commit"]
    assert commits[0].authors == ["fed-admin"]
    assert [c.title for c in api.list_repo_commits(REPO, revision=one.oid)] == [
        "one",
        "initial commit",
    ]

    tree = {entry.path: entry for entry in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == {
        ".gitattributes",
        "global",
        "global/weights.bin",
        "personalized",
        "personalized/c1",
        "personalized/c1/adapter_config.json",
    }
    weights = tree["global/weights.bin"]
    assert (weights.size, weights.blob_id) == (2, git_blob_oid(b"w2"))  # type: ignore[union-attr]
    top = {entry.path for entry in api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "global", "personalized"}
    sub = {e.path for e in api.list_repo_tree(REPO, path_in_repo="personalized", recursive=True)}
    assert sub == {"personalized/c1", "personalized/c1/adapter_config.json"}
    infos = api.get_paths_info(REPO, ["global", "global/weights.bin", "nope"], revision=one.oid)
    assert [type(i).__name__ for i in infos] == ["RepoFolder", "RepoFile"]

    assert api.file_exists(REPO, "global/weights.bin")
    assert not api.file_exists(REPO, "global/other.bin")
    assert api.file_exists(REPO, "personalized/c1/adapter_config.json", revision=one.oid)
    assert not api.file_exists(REPO, "x", revision="no-such-branch")

    assert api.model_info(REPO, revision=one.oid).sha == one.oid
    assert api.model_info(REPO, revision=one.oid[:12]).sha == one.oid
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("fedorg/does-not-exist")


def test_branches_and_tags(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    base = api.create_commit(REPO, [_add("w.bin", b"0")], commit_message="base").oid
    api.create_branch(REPO, branch="round/1", revision=base)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="round/1")
    assert _status(err) == 409
    api.create_branch(REPO, branch="round/1", exist_ok=True)

    on_branch = api.create_commit(
        REPO, [_add("w.bin", b"1")], commit_message="branch work", revision="round/1"
    )
    assert hub.head(REPO, "round/1") == on_branch.oid
    assert hub.head(REPO) == base
    assert api.revision_exists(REPO, "round/1")

    api.create_tag(REPO, tag="v1", revision="round/1")
    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "round/1"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", on_branch.oid)]

    api.delete_branch(REPO, branch="round/1")
    assert not api.revision_exists(REPO, "round/1")
    assert api.model_info(REPO, revision="v1").sha == on_branch.oid
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(REPO, [_add("x", "x")], commit_message="x", revision="round/1")


# --------------------------------------------------------------------------- downloads


def test_download_pinned_to_a_commit_keeps_old_content(
    api: HfApi, hub: HubServer, hub_cache_dir: Path
) -> None:
    api.create_repo(REPO)
    old = api.create_commit(REPO, [_add("global/w.bin", b"old")], commit_message="old").oid
    new = api.create_commit(REPO, [_add("global/w.bin", b"new!")], commit_message="new").oid

    pinned = hf_hub_download(REPO, "global/w.bin", revision=old, cache_dir=hub_cache_dir)
    assert Path(pinned).read_bytes() == b"old"
    assert f"/snapshots/{old}/" in pinned
    latest = hf_hub_download(REPO, "w.bin", subfolder="global", cache_dir=hub_cache_dir)
    assert Path(latest).read_bytes() == b"new!"
    assert f"/snapshots/{new}/" in latest
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "global/missing.bin", cache_dir=hub_cache_dir)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "global/w.bin", revision="nope", cache_dir=hub_cache_dir)


def test_resolve_headers_and_range(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    content = b'{"k": 1}'
    head = api.create_commit(REPO, [_add("dir/data.json", content)], commit_message="c").oid
    url = f"{hub.endpoint}/{REPO}/resolve/main/dir/data.json"
    auth = {"Authorization": f"Bearer {hub.token}"}
    with httpx2.Client() as client:
        meta = client.head(url, headers=auth)
        assert meta.status_code == 200
        assert meta.headers["X-Repo-Commit"] == head
        assert meta.headers["ETag"] == f'"{git_blob_oid(content)}"'
        assert meta.headers["Content-Length"] == "8"
        assert meta.headers["Content-Type"].startswith("application/json")
        part = client.get(url, headers={**auth, "Range": "bytes=2-"})
        assert (part.status_code, part.content) == (206, b'k": 1}')
        missing = client.head(url.replace("data.json", "nope.json"), headers=auth)
        assert missing.status_code == 404
        assert missing.headers["X-Error-Code"] == "EntryNotFound"
        encoded = client.get(f"{hub.endpoint}/{REPO}/resolve/refs%2Fheads%2Fmain/dir/data.json")
        assert encoded.content == content


def test_snapshot_download(api: HfApi, hub_cache_dir: Path) -> None:
    api.create_repo(REPO)
    first = api.create_commit(
        REPO, [_add("a/1.txt", "one"), _add("a/b/2.txt", "two")], commit_message="1"
    ).oid
    api.create_commit(REPO, [CommitOperationDelete("a/1.txt")], commit_message="2")

    folder = Path(snapshot_download(REPO, revision=first, cache_dir=hub_cache_dir))
    assert (folder / "a/1.txt").read_text() == "one"
    assert (folder / "a/b/2.txt").read_text() == "two"
    latest = Path(snapshot_download(REPO, cache_dir=hub_cache_dir, allow_patterns=["a/*"]))
    assert sorted(p.relative_to(latest).as_posix() for p in latest.rglob("*.txt")) == ["a/b/2.txt"]


def test_dataset_repos(api: HfApi, hub: HubServer, hub_cache_dir: Path) -> None:
    url = api.create_repo("fedorg/client-data", repo_type="dataset", private=True)
    assert url.repo_type == "dataset"
    assert url == f"{hub.endpoint}/datasets/fedorg/client-data"
    api.create_commit(
        "fedorg/client-data",
        [_add("train.jsonl", '{"x": 1}\n')],
        commit_message="data",
        repo_type="dataset",
    )
    path = hf_hub_download(
        "fedorg/client-data", "train.jsonl", repo_type="dataset", cache_dir=hub_cache_dir
    )
    assert Path(path).read_text() == '{"x": 1}\n'
    assert api.dataset_info("fedorg/client-data").private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("fedorg/client-data")  # same name, other repo type


# --------------------------------------------------------------------------- faults


def test_faults_surface_on_calls_that_do_not_retry(api: HfApi, hub: HubServer) -> None:
    """HfApi's plain calls (model_info, create_commit, refs...) never retry a 5xx/429."""
    api.create_repo(REPO)
    fault = hub.inject_fault("GET", rf"^/api/models/{REPO}$", status=503)
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(REPO)
    assert _status(err) == 503
    assert fault.hits == 1 and fault.exhausted
    assert api.model_info(REPO).id == REPO  # times=1: the next call goes through

    hub.inject_fault("POST", r"/commit/", status=429, retry_after=7)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(REPO, [_add("a.txt", "a")], commit_message="a")
    assert _status(err) == 429
    assert err.value.response.headers["Retry-After"] == "7"
    assert "a.txt" not in api.list_repo_files(REPO)

    hub.inject_fault("GET", r"/refs$", status=404, error_code="RepoNotFound")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs(REPO)


def test_hf_hub_download_retries_a_failed_head(
    api: HfApi, hub: HubServer, hub_cache_dir: Path
) -> None:
    """hf_hub_download retries HEAD on 5xx/429/timeouts when nothing is cached (no sleep first)."""
    api.create_repo(REPO)
    api.create_commit(REPO, [_add("w.bin", b"data")], commit_message="w")
    hub.clear_requests()
    hub.inject_fault("HEAD", r"/resolve/", status=503)
    path = hf_hub_download(REPO, "w.bin", cache_dir=hub_cache_dir)
    assert Path(path).read_bytes() == b"data"
    heads = [r for r in hub.requests if r.method == "HEAD"]
    assert [r.status for r in heads] == [503, 200]
    assert heads[0] == RequestRecord("HEAD", f"/{REPO}/resolve/main/w.bin", 503)


def test_hf_hub_download_does_not_retry_a_5xx_on_the_content_get(
    api: HfApi, hub: HubServer, hub_cache_dir: Path
) -> None:
    """The GET after a good HEAD retries only 408/429 and dropped connections, not 5xx."""
    api.create_repo(REPO)
    api.create_commit(REPO, [_add("w.bin", b"data")], commit_message="w")
    hub.inject_fault("GET", r"/resolve/", status=503)
    with pytest.raises(HfHubHTTPError) as err:
        hf_hub_download(REPO, "w.bin", cache_dir=hub_cache_dir)
    assert _status(err) == 503
    path = hf_hub_download(REPO, "w.bin", cache_dir=hub_cache_dir)
    assert Path(path).read_bytes() == b"data"


def test_paginated_listings_retry_5xx_and_429(api: HfApi, hub: HubServer) -> None:
    """list_repo_tree / list_repo_commits use http_backoff: 5xx and 429 are retried (sleeping)."""
    api.create_repo(REPO)
    hub.inject_fault("GET", r"/tree/", status=503)
    hub.inject_fault("GET", r"/commits/", status=429, retry_after=0)
    started = time.monotonic()
    assert [e.path for e in api.list_repo_tree(REPO)] == [".gitattributes"]
    assert [c.title for c in api.list_repo_commits(REPO)] == ["initial commit"]
    assert time.monotonic() - started >= 2.0  # 1 s backoff, then Retry-After (0) + 1 s
    assert [r.status for r in hub.requests if "/tree/" in r.path] == [503, 200]
    assert [r.status for r in hub.requests if "/commits/" in r.path] == [429, 200]


def test_delay_beyond_timeout_raises_timeout(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    hub.inject_fault("GET", rf"^/api/models/{REPO}$", status=None, delay=2.0)
    started = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        api.model_info(REPO, timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert api.model_info(REPO, timeout=2).id == REPO


def test_dropped_connection_raises_a_network_error(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    hub.inject_fault("GET", r"/refs$", status=None, disconnect=True)
    with pytest.raises(httpx2.TransportError):
        api.list_repo_refs(REPO)
    assert api.list_repo_refs(REPO).branches[0].name == "main"


def test_persistent_fault_and_clear_faults(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    fault = hub.inject_fault(None, r"^/api/models/", status=500, times=None)
    for _ in range(3):
        with pytest.raises(HfHubHTTPError):
            api.model_info(REPO)
    assert fault.hits == 3 and not fault.exhausted
    hub.clear_faults()
    assert api.model_info(REPO).id == REPO
    assert hub.errors == []


def test_reset_drops_repos_tokens_and_log(hub: HubServer) -> None:
    hub.create_repo("fedorg/tmp", files={"a.txt": "a"})
    hub.add_token("hf_temp_token", "temp")
    hub.reset()
    assert not hub.repo_exists("fedorg/tmp")
    assert hub.requests == []
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_temp_token").whoami()
    assert _status(err) == 401
    assert HfApi().whoami()["name"] == "fed-admin"


def test_never_logs_tokens(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    api.model_info(REPO)
    assert all(hub.token not in repr(record) for record in hub.requests)


# --------------------------------------------------------------------------- processes


def test_subprocess_reaches_hub_through_hub_env(hub: HubServer, hub_env: dict[str, str]) -> None:
    hub.create_repo(REPO, files={"hello.txt": "hi"})
    code = (
        "from huggingface_hub import HfApi, hf_hub_download\n"
        "print(HfApi().whoami()['name'])\n"
        f"print(open(hf_hub_download('{REPO}', 'hello.txt')).read())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **hub_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["fed-admin", "hi"]


def test_standalone_server_prints_its_endpoint() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "fedbip_hub.testing.hub_server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        endpoint = line.strip().rsplit(" ", 1)[-1]
        assert endpoint.startswith("http://127.0.0.1:")
        from fedbip_hub.testing.hub_server import DEFAULT_TOKEN

        request = urllib.request.Request(
            f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["name"] == "fed-admin"
    finally:
        process.terminate()
        process.wait(timeout=10)


# --------------------------------------------------------------------------- PEFT


def test_peft_adapter_round_trip_from_subfolder(api: HfApi, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    trained = get_peft_model(LlamaForCausalLM(config), lora)
    trained.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".lora_A." in key for key in saved) and any(".lora_B." in key for key in saved)

    repo_id = "fedorg/personalized-adapters"
    api.create_repo(repo_id, private=True)
    operations = [
        CommitOperationAdd(path_in_repo=f"personalized/{file.name}", path_or_fileobj=str(file))
        for file in sorted((tmp_path / "adapter").iterdir())
    ]
    commit = api.create_commit(repo_id, operations, commit_message="client-1 adapter")
    api.create_commit(repo_id, [_add("personalized/adapter_config.json", "{}")], commit_message="x")

    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(
        LlamaForCausalLM(config), repo_id, subfolder="personalized", revision=commit.oid
    )
    state = get_peft_model_state_dict(loaded)
    assert set(state) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key


def test_missing_adapter_raises_clean_hub_errors(api: HfApi, hub_cache_dir: Path) -> None:
    api.create_repo(REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(
            REPO, "adapter_config.json", subfolder="personalized", cache_dir=hub_cache_dir
        )
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("fedorg/absent", "adapter_config.json", cache_dir=hub_cache_dir)
