"""A round's Hub call budget, counted as real HTTP requests at the local Hub server.

What the Hub's rate limits count (API calls, commits included; file downloads apart) is
what ``HubServer.request_counts`` counts. The budget (README, "The Hub"):

- a round with nothing new costs O(1) API calls whatever K (≤ 5);
- a round with F fresh uploads that changes A members' adapters costs ≤ 6 + 4·F + 3·A;
- a member no fresh update reaches is not republished;
- a 429 whose RateLimit headers say the quota is spent is waited out, not skipped.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from federation_helpers import (
    new_hub_federation,
    publish_commits,
    published_tensors,
    pull_and_push,
    push_fresh,
    set_strategy,
)

from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.federation.client import latest_personalized_revision, upload_id
from fedbip_hub.federation.config import PERSONALIZED_DIR
from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.rounds import RoundRunner, run_round
from fedbip_hub.stores import HubStore


def _members(k: int) -> dict[str, int]:
    return {f"m{i:02d}": i % 3 for i in range(k)}


def _federation(repo_id: str, tiny_base: Path, root: Path, k: int, *,
                method: str | None = None) -> Federation:
    """K members on the Hub, each with a first upload, after the first round."""
    new_hub_federation(repo_id, tiny_base, root, _members(k))
    fed = Federation.at(repo_id, cache_dir=root / "server-cache")
    if method is not None:
        set_strategy(fed, method=method)
    record = run_round(fed)
    assert record["status"] == "completed" and len(record["outputs"]) == k
    return fed


def _counted(hub, fed: Federation, **options) -> tuple[dict, dict[str, int]]:
    since = len(hub.requests)
    record = RoundRunner(fed, **options).run()
    return record, hub.request_counts(since)


def _adapter_digest(fed: Federation, client: str) -> tuple[str, str]:
    """The revision of ``client``'s personalized adapter and its weights' SHA-256."""
    repo = fed.member(client).repo_id
    revision = latest_personalized_revision(fed, repo)
    folder = fed.store.fetch_folder(repo, revision, PERSONALIZED_DIR)
    return revision, hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()
                                    ).hexdigest()


@pytest.mark.parametrize("k", [5, 50])
def test_an_idle_round_costs_a_few_api_calls_whatever_k(hub, tmp_path, tiny_base, k):
    fed = _federation(f"fedorg/idle{k}", tiny_base, tmp_path, k, method="local")
    record, counts = _counted(hub, fed)
    assert record["status"] == "nothing-new"
    assert counts["api"] <= 5, counts
    assert counts["commits"] == 0
    assert record["hub"]["api_calls"] == counts["api"]  # the runner counts what the Hub does
    # A job on a fresh machine (empty cache) stays within it too.
    new_job = Federation.at(fed.address, cache_dir=tmp_path / "new-job-cache")
    record, counts = _counted(hub, new_job)
    assert record["status"] == "nothing-new"
    assert counts["api"] <= 5, counts


@pytest.mark.parametrize(("method", "fresh"), [("local", 1), ("local", 3), ("fedbip-l", 2)])
def test_a_round_with_news_stays_in_budget(hub, tmp_path, tiny_base, method, fresh):
    k = 8
    fed = _federation(f"fedorg/news-{method}-{fresh}", tiny_base, tmp_path, k, method=method)
    members = list(_members(k))
    for i, name in enumerate(members[:fresh]):
        pull_and_push(fed, tmp_path, name, seed=50 + i, group=i % 3)
    record, counts = _counted(hub, fed)
    assert record["status"] == "completed"
    assert sum(p["fresh"] for p in record["inputs"].values()) == fresh
    changed = len(record["outputs"])
    assert changed >= fresh  # a fresh upload always changes its own adapter
    assert counts["api"] <= 6 + 4 * fresh + 3 * changed, (counts, changed)
    assert counts["commits"] == 2 + changed  # the lease, each publish, the record
    if method == "local":  # no one shares: exactly the fresh members change
        assert sorted(record["outputs"]) == members[:fresh]
        assert sorted(record["unchanged"]) == members[fresh:]


def test_a_round_on_a_new_machine_stays_in_budget(hub, tmp_path, tiny_base):
    """A scheduled job starts with an empty cache: the budget holds without one."""
    fed = _federation("fedorg/news-new-job", tiny_base, tmp_path, 6, method="local")
    pull_and_push(fed, tmp_path, "m01", seed=77, group=1)
    new_job = Federation.at(fed.address, cache_dir=tmp_path / "new-job-cache")
    record, counts = _counted(hub, new_job)
    assert sorted(record["outputs"]) == ["m01"]
    assert counts["api"] <= 6 + 4 * 1 + 3 * 1, counts


def test_a_member_no_fresh_update_reaches_is_not_republished(hub, tmp_path, tiny_base):
    fed = _federation("fedorg/unreached", tiny_base, tmp_path, 4, method="local")
    before = {name: _adapter_digest(fed, name) for name in ("m00", "m02", "m03")}
    commits = {name: publish_commits(fed, name) for name in before}
    pull_and_push(fed, tmp_path, "m01", seed=60, group=1)
    record = run_round(fed)
    assert sorted(record["outputs"]) == ["m01"]
    assert record["weights"] is not None
    for name in before:
        # Its weights on the only fresh upload (m01) are zero everywhere...
        for matrix in record["weights"].values():
            row = list(record["clients"]).index(name)
            assert matrix[row][list(record["clients"]).index("m01")] == 0.0
        # ...so it keeps its adapter: no publish, the same revision, the same bytes,
        # and it still loads as the member's personalized adapter.
        assert record["unchanged"][name] == before[name][0]
        assert publish_commits(fed, name) == commits[name]
        assert _adapter_digest(fed, name) == before[name]
        assert published_tensors(fed, name)
    # The next round with nothing new still sees no news (their heads did not move).
    assert run_round(fed)["status"] == "nothing-new"


def test_a_rate_limited_member_is_waited_out_not_skipped(hub, tmp_path, tiny_base):
    fed = _federation("fedorg/ratelimit", tiny_base, tmp_path, 3, method="local")
    pull_and_push(fed, tmp_path, "m02", seed=70, group=2)
    # More 429s in a row than the store's retries allow, each saying the quota is spent
    # and resets in 0 s (so it waits 1 s each, as huggingface_hub would): on the fresh
    # upload's download (the file quota) and on the listing of heads (the API quota).
    faults = [hub.inject_fault("GET", r"^/fedorg/ratelimit-m02/resolve/.*adapter_model",
                               status=429, times=fed.store.retries + 1, ratelimit=(0, 0)),
              hub.inject_fault("GET", r"^/api/models$", status=429, times=2,
                               ratelimit=(0, 0))]
    started = time.monotonic()
    record = run_round(fed)
    assert [f.hits for f in faults] == [f.times for f in faults]
    assert time.monotonic() - started >= sum(f.hits for f in faults)  # each waited out
    assert "m02" not in record["skipped"]
    assert record["inputs"]["m02"]["fresh"] and sorted(record["outputs"]) == ["m02"]


def test_a_rate_limit_past_the_deadline_skips_the_member_with_the_reason(hub, tmp_path,
                                                                         tiny_base):
    fed = _federation("fedorg/ratelimit-late", tiny_base, tmp_path, 3, method="local")
    pull_and_push(fed, tmp_path, "m01", seed=71, group=1)
    hub.inject_fault(path_pattern=r"^/fedorg/ratelimit-late-m01/resolve/", status=429,
                     times=None, ratelimit=(0, 3600))
    fed.store.deadline = time.monotonic() + 60  # the job has a minute left
    started = time.monotonic()
    record = run_round(fed)
    hub.clear_faults()
    assert time.monotonic() - started < 60  # not waited for an hour
    assert "rate limit" in record.get("skipped", {}).get("m01", ""), record.get("skipped")
    assert "retried next round" in record["skipped"]["m01"]  # kept, not refused
    assert fed.store.deadline is not None  # the round restores the caller's deadline


def test_heads_come_from_one_listing_per_owner(hub, tmp_path):
    hub.add_token("hf_bob_token_for_heads", "bob")
    repos = [f"fedorg/fed-x-{i}" for i in range(7)] + ["fedorg/other"]
    for repo in repos:
        hub.create_repo(repo, private=True, files={"a.txt": repo})
    hub.create_repo("fedorg/public-one", files={"b.txt": "b"})
    hub.list_page_size = 3  # several pages: the Link header is followed
    try:
        store = HubStore(cache_dir=tmp_path / "cache")
        asked = [*repos, "fedorg/public-one", "someone/missing"]
        before = store.traffic.api_calls
        heads = store.heads(asked)
        calls = store.traffic.api_calls - before
    finally:
        hub.list_page_size = 1000
    assert {r: h.sha for r, h in heads.items()} == {r: hub.head(r) for r in asked[:-1]}
    assert all(heads[r].private for r in repos) and heads["fedorg/public-one"].private is False
    assert "someone/missing" not in heads  # not listed: the caller asks it alone
    # fedorg's 9 repos (search "": the names share no prefix) in pages of 3, then one
    # listing of "someone" (empty).
    assert calls == 3 + 1


def test_pinned_reads_are_never_repeated_across_jobs_sharing_a_cache(hub, tmp_path):
    repo = "fedorg/pinned"
    hub.create_repo(repo, private=True)
    first = HubStore(cache_dir=tmp_path / "shared")
    rev = first.commit(repo, {"adapter/x.json": b"{}", "adapter/y.bin": b"\0" * 10},
                       message="fill")
    assert first.list_files(repo, rev) == [".gitattributes", "adapter/x.json",
                                           "adapter/y.bin"]
    second = HubStore(cache_dir=tmp_path / "shared")  # another job, the same cache
    since = len(hub.requests)
    assert second.list_files(repo, rev) == first.list_files(repo, rev)
    folder = second.fetch_folder(repo, rev, "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["x.json", "y.bin"]
    second.fetch_folder(repo, rev, "adapter")  # again: nothing more
    assert hub.request_counts(since) == {"api": 0, "downloads": 2, "commits": 0}
    # A commit on a known parent costs its preupload and the commit, nothing else.
    since = len(hub.requests)
    second.commit(repo, {"adapter/x.json": b"{\"a\": 1}"}, message="more", parent=rev)
    assert hub.request_counts(since) == {"api": 2, "downloads": 0, "commits": 1}


def test_a_push_during_the_round_is_seen_by_the_next_round(hub, tmp_path, tiny_base):
    """A member that pushes while the round runs gets its publish on top of the new
    upload; the next round must still look at that upload, not take the publish for the
    head it left."""
    fed = _federation("fedorg/push-during", tiny_base, tmp_path, 3, method="local")
    pull_and_push(fed, tmp_path, "m00", seed=80, group=0)
    pushed: list[str] = []

    def push_meanwhile(step: str) -> None:
        if step == "computed":
            pushed.append(push_fresh(fed, tmp_path, "m00", seed=81, group=0))

    record = RoundRunner(fed, checkpoint=push_meanwhile).run()
    assert pushed and sorted(record["outputs"]) == ["m00"]
    assert record["outputs"]["m00"]["parent"] == pushed[0]  # published on top of it
    following = run_round(fed)
    assert following["status"] == "completed"
    assert following["inputs"]["m00"]["fresh"]
    repo = fed.member("m00").repo_id
    expected = upload_id(fed.store.read_bytes(repo, UPLOAD_METADATA_NAME, pushed[0]))
    assert following["inputs"]["m00"]["upload_id"] == expected


def test_the_servers_listing_answers_hfapi_as_the_hub_does(hub):
    """list_models with expand= returns only the fields asked for, paged by Link."""
    from huggingface_hub import HfApi

    for i in range(5):
        hub.create_repo(f"fedorg/listed-{i}", private=True, files={"f.txt": str(i)})
    hub.list_page_size = 2
    try:
        since = len(hub.requests)
        models = list(HfApi().list_models(author="fedorg", search="listed-",
                                          expand=["sha", "private"]))
        pages = hub.request_counts(since)["api"]
    finally:
        hub.list_page_size = 1000
    assert [m.id for m in models] == [f"fedorg/listed-{i}" for i in range(5)]
    assert [m.sha for m in models] == [hub.head(f"fedorg/listed-{i}") for i in range(5)]
    assert all(m.private for m in models)
    assert all(m.downloads is None and m.last_modified is None for m in models)  # not asked
    assert pages == 3
