"""One contract for every store: LocalStore (a folder) and HubStore (the local test Hub).

The contract tests run once per backend; the Hub-only tests at the end cover what only a
remote store can do wrong: tokens, permissions, flaky or slow servers, lost replies.
"""

from __future__ import annotations

import json
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedbip_hub.errors import AuthError, ConfigError, ConflictError, NotFoundError, StoreError
from fedbip_hub.stores import HubStore, LocalStore
from fedbip_hub.stores.base import Store
from fedbip_hub.testing.hub_server import HubServer

REPO = "fedorg/contract"
OTHER = "fedorg/other"
MISSING = "fedorg/missing"
UNKNOWN_REV = "0123456789abcdef0123456789abcdef01234567"
HEX40 = re.compile(r"[0-9a-f]{40}")


@dataclass
class Backend:
    """A store under test plus the few backend-specific peeks the contract needs."""

    name: str
    store: Store
    make: Callable[..., Store]
    is_private: Callable[[str], bool]
    hub: HubServer | None = None

    def commit_posts(self) -> int:
        """Commit requests that reached the server (Hub only; local: -1)."""
        if self.hub is None:
            return -1
        return sum(1 for r in self.hub.requests if r.method == "POST" and "/commit/" in r.path)


def _hub_store(hub: HubServer, cache: Path, **kwargs: object) -> HubStore:
    options: dict = {"endpoint": hub.endpoint, "token": hub.token, "cache_dir": cache,
                     "retries": 3, "backoff": 0.01, "timeout": 5.0}
    options.update(kwargs)
    return HubStore(**options)


@pytest.fixture(params=["local", "hub"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        root = tmp_path / "store"

        def make_local(**kwargs: object) -> Store:
            cache = tmp_path / f"cache-{time.monotonic_ns()}"
            return LocalStore(root, cache_dir=cache, user="fed-admin")

        def local_private(repo_id: str) -> bool:
            return bool(json.loads((root / "repos" / repo_id / "meta.json").read_text())
                        ["private"])

        yield Backend("local", make_local(), make_local, local_private)
        return

    hub: HubServer = request.getfixturevalue("hub")

    def make_hub(**kwargs: object) -> Store:
        return _hub_store(hub, tmp_path / f"cache-{time.monotonic_ns()}", **kwargs)

    def hub_private(repo_id: str) -> bool:
        hub.add_token("hf_outsiderToken0000", "outsider", orgs=())
        outsider = _hub_store(hub, tmp_path / "outsider", token="hf_outsiderToken0000")
        return not outsider.repo_exists(repo_id)

    yield Backend("hub", make_hub(), make_hub, hub_private, hub)


@pytest.fixture
def repo(backend: Backend) -> str:
    backend.store.create_repo(REPO)
    return REPO


def _files(store: Store, repo_id: str, revision: str | None = None) -> set[str]:
    """Files at ``revision`` (default: head); a new Hub repo starts with .gitattributes."""
    return set(store.list_files(repo_id, revision or store.head(repo_id)))


# --------------------------------------------------------------------------- contract


def test_create_repo_is_private_and_idempotent(backend: Backend) -> None:
    store = backend.store
    assert not store.repo_exists(REPO)
    store.create_repo(REPO)
    head = store.head(REPO)
    store.create_repo(REPO)  # again: left as it is
    assert store.repo_exists(REPO)
    assert store.head(REPO) == head
    assert len(store.history(REPO)) == 1
    assert backend.is_private(REPO)
    assert not store.repo_exists(OTHER)


def test_delete_repo_removes_it_and_is_idempotent(backend: Backend) -> None:
    store = backend.store
    store.create_repo(REPO)
    store.create_repo(OTHER)
    store.commit(REPO, {"a.txt": b"one"}, message="add a")
    store.delete_repo(REPO)
    assert not store.repo_exists(REPO) and store.repo_exists(OTHER)
    store.delete_repo(REPO)  # again: nothing to do
    store.create_repo(REPO)  # and the name is free again, with a fresh history
    assert len(store.history(REPO)) == 1


def test_an_existing_public_repo_stays_public_until_made_private(backend: Backend) -> None:
    store = backend.store
    store.create_repo(REPO, private=False)
    store.create_repo(REPO, private=True)  # exist_ok: visibility left as it is
    assert not store.is_private(REPO) and not backend.is_private(REPO)
    store.make_private(REPO)
    assert store.is_private(REPO) and backend.is_private(REPO)
    store.make_private(REPO)  # idempotent
    assert store.is_private(REPO)


def test_commit_returns_new_head(backend: Backend, repo: str) -> None:
    store = backend.store
    first = store.head(repo)
    assert HEX40.fullmatch(first)
    new = store.commit(repo, {"a.txt": b"one", "dir/b.bin": b"\x00\x01"}, message="add a\nbody")
    assert HEX40.fullmatch(new) and new != first
    assert store.head(repo) == new
    assert _files(store, repo, new) - _files(store, repo, first) == {"a.txt", "dir/b.bin"}
    assert store.read_bytes(repo, "dir/b.bin", new) == b"\x00\x01"


def test_pinned_reads_keep_old_content(backend: Backend, repo: str) -> None:
    store = backend.store
    old = store.commit(repo, {"a.txt": b"v1", "sub/b.txt": b"b"}, message="v1")
    new = store.commit(repo, {"a.txt": b"v2"}, message="v2", deletes=["sub/b.txt"])
    fresh = backend.make()  # empty cache: the old revision really comes from the store
    assert fresh.read_bytes(repo, "a.txt", old) == b"v1"
    assert fresh.read_bytes(repo, "a.txt", new) == b"v2"
    assert "sub/b.txt" in fresh.list_files(repo, old)
    assert "sub/b.txt" not in fresh.list_files(repo, new)
    assert fresh.read_bytes(repo, "sub/b.txt", old) == b"b"


def test_deletes_files_and_folder_prefixes(backend: Backend, repo: str) -> None:
    store = backend.store
    base = _files(store, repo)
    store.commit(repo, {"a.txt": b"a", "dir/x": b"x", "dir/deep/y": b"y", "dir2/z": b"z",
                        "keep.txt": b"k"}, message="fill")
    head = store.commit(repo, {"new.txt": b"n"}, message="prune",
                        deletes=["a.txt", "dir", "not-there", "dir2/absent"])
    assert set(store.list_files(repo, head)) - base == {"dir2/z", "keep.txt", "new.txt"}
    head = store.commit(repo, {}, message="prune folder with slash", deletes=["dir2/"])
    assert set(store.list_files(repo, head)) - base == {"keep.txt", "new.txt"}


def test_commit_that_changes_nothing_makes_no_commit(backend: Backend, repo: str) -> None:
    store = backend.store
    head = store.commit(repo, {"a.txt": b"a", "b.txt": b"b"}, message="fill")
    history = store.history(repo)
    posts = backend.commit_posts()
    uploaded = store.traffic.uploaded
    assert store.commit(repo, {"a.txt": b"a"}, message="same again", parent=head) == head
    assert store.commit(repo, {}, message="nothing", deletes=["absent.txt"]) == head
    assert store.commit(repo, {}, message="empty") == head
    assert store.head(repo) == head
    assert store.history(repo) == history
    assert backend.commit_posts() == posts  # nothing was even sent
    assert store.traffic.uploaded == uploaded


def test_stale_parent_is_a_conflict_and_changes_nothing(backend: Backend, repo: str) -> None:
    store = backend.store
    old = store.head(repo)
    head = store.commit(repo, {"a.txt": b"a"}, message="first", parent=old)
    with pytest.raises(ConflictError):
        store.commit(repo, {"a.txt": b"b", "c.txt": b"c"}, message="stale", parent=old)
    with pytest.raises(ConflictError):  # even when it would change nothing
        store.commit(repo, {"a.txt": b"a"}, message="stale no-op", parent=old)
    assert store.head(repo) == head
    assert "c.txt" not in store.list_files(repo, head)
    assert store.read_bytes(repo, "a.txt", store.head(repo)) == b"a"


def test_history_is_newest_first_with_titles(backend: Backend, repo: str) -> None:
    store = backend.store
    ids = [store.commit(repo, {"n.txt": str(i).encode()}, message=f"round {i}\ndetails {i}")
           for i in range(3)]
    history = store.history(repo)
    assert [c.id for c in history[:3]] == ids[::-1]
    assert [c.title for c in history[:3]] == ["round 2", "round 1", "round 0"]
    assert len(history) == 4  # plus the repo's initial commit
    dates = [c.date for c in history]
    assert dates == sorted(dates, reverse=True)


def test_fetch_folder_materialises_once(backend: Backend, repo: str) -> None:
    store = backend.store
    files = {"sub/a.json": b'{"a": 1}', "sub/b.bin": b"\x00" * 100, "sub/c.txt": b"c",
             "sub/deep/d.txt": b"d", "top.txt": b"t"}
    rev = store.commit(repo, files, message="fill")
    store.commit(repo, {"sub/a.json": b"{}"}, message="newer")  # pinned reads ignore it

    folder = store.fetch_folder(repo, rev, "sub", only=["a.json", "b.bin"])
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["a.json", "b.bin"]
    assert (folder / "a.json").read_bytes() == b'{"a": 1}'
    assert (folder / "b.bin").read_bytes() == files["sub/b.bin"]
    downloaded = store.traffic.downloaded
    assert downloaded == len(files["sub/a.json"]) + len(files["sub/b.bin"])

    requests = len(backend.hub.requests) if backend.hub else 0
    assert store.fetch_folder(repo, rev, "sub", only=["a.json", "b.bin"]) == folder
    assert store.traffic.downloaded == downloaded  # nothing downloaded twice
    if backend.hub is not None:
        assert not [r for r in backend.hub.requests[requests:] if "/resolve/" in r.path]

    whole = store.fetch_folder(repo, rev, "sub")
    assert sorted(p.name for p in whole.iterdir() if p.is_file()) == [
        "a.json", "b.bin", "c.txt"]
    assert store.traffic.downloaded == downloaded + 1  # only c.txt was new


def test_missing_things_are_not_found(backend: Backend, repo: str) -> None:
    store = backend.store
    head = store.commit(repo, {"a.txt": b"a"}, message="fill")
    for call in (lambda: store.head(MISSING), lambda: store.history(MISSING),
                 lambda: store.list_files(MISSING, head),
                 lambda: store.read_bytes(MISSING, "a.txt", head),
                 lambda: store.commit(MISSING, {"a.txt": b"a"}, message="x")):
        with pytest.raises(NotFoundError):
            call()
    with pytest.raises(NotFoundError):
        store.read_bytes(repo, "absent.txt", head)
    with pytest.raises(NotFoundError):
        store.list_files(repo, UNKNOWN_REV)
    with pytest.raises(NotFoundError):
        store.read_bytes(repo, "a.txt", UNKNOWN_REV)
    with pytest.raises(NotFoundError):
        store.fetch_folder(repo, UNKNOWN_REV)


def test_concurrent_writers_on_one_parent_exactly_one_wins(backend: Backend,
                                                           repo: str) -> None:
    store = backend.store
    parent = store.head(repo)
    writers = 5
    barrier = threading.Barrier(writers)
    results: dict[int, str | BaseException] = {}

    def write(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.commit(repo, {f"w{i}.txt": str(i).encode(), "shared": b"%d" % i},
                                      message=f"writer {i}", parent=parent)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    wins = {i: r for i, r in results.items() if isinstance(r, str)}
    losses = [r for r in results.values() if not isinstance(r, str)]
    assert len(wins) == 1, results
    assert all(isinstance(r, ConflictError) for r in losses), losses
    (winner, commit_id), = wins.items()
    assert store.head(repo) == commit_id
    assert [c.id for c in store.history(repo)[:2]] == [commit_id, parent]
    assert store.read_bytes(repo, "shared", commit_id) == b"%d" % winner
    assert [f for f in store.list_files(repo, commit_id) if f.startswith("w")] == [
        f"w{winner}.txt"]


# --------------------------------------------------------------------------- Hub only


@pytest.fixture
def hub_repo(hub: HubServer) -> str:
    hub.create_repo(REPO, private=True, files={"a.txt": "a", "sub/b.txt": "b"})
    return REPO


def _no_secret(exc: BaseException, secret: str) -> None:
    text = "".join(traceback.format_exception(exc))
    assert secret not in text
    assert secret not in str(exc) and secret not in repr(exc)
    assert secret not in json.dumps(getattr(exc, "to_dict", dict)())


def test_revoked_token_is_an_auth_error_without_the_token(hub: HubServer, hub_repo: str,
                                                          tmp_path: Path) -> None:
    secret = "hf_revokedSecretToken123"
    hub.add_token(secret, "fed-admin", orgs=("fedorg",))
    store = _hub_store(hub, tmp_path, token=secret)
    head = store.head(hub_repo)
    hub.revoke_token(secret)
    for call in (store.whoami, lambda: store.head(hub_repo),
                 lambda: store.list_files(hub_repo, head),
                 lambda: store.read_bytes(hub_repo, "a.txt", head),
                 lambda: store.history(hub_repo),
                 lambda: store.commit(hub_repo, {"x": b"x"}, message="x")):
        with pytest.raises(AuthError) as err:
            call()
        assert "401" in str(err.value)
        _no_secret(err.value, secret)


def test_server_message_echoing_the_token_is_scrubbed(hub: HubServer, hub_repo: str,
                                                       tmp_path: Path) -> None:
    secret = "plain-secret-token-without-prefix"
    hub.add_token(secret, "fed-admin", orgs=("fedorg",))
    store = _hub_store(hub, tmp_path, token=secret)
    hub.inject_fault("GET", r"/refs$", status=400, message=f"bad header Bearer {secret}")
    with pytest.raises(StoreError) as err:
        store.head(hub_repo)
    assert "HTTP 400" in str(err.value)
    _no_secret(err.value, secret)


def test_read_only_token_cannot_write(hub: HubServer, hub_repo: str, tmp_path: Path) -> None:
    hub.add_token("hf_readOnlyToken0000", "fed-admin", orgs=("fedorg",), role="read")
    store = _hub_store(hub, tmp_path, token="hf_readOnlyToken0000")
    head = store.head(hub_repo)
    assert store.read_bytes(hub_repo, "a.txt", head) == b"a"
    with pytest.raises(AuthError, match="403"):
        store.commit(hub_repo, {"a.txt": b"changed"}, message="nope")
    with pytest.raises(AuthError, match="403"):
        store.create_repo("fedorg/brand-new")
    assert hub.head(hub_repo) == head
    assert not hub.repo_exists("fedorg/brand-new")


def test_private_repo_of_another_user_is_not_found(hub: HubServer, tmp_path: Path) -> None:
    head = hub.create_repo("alice/secret", private=True, files={"a.txt": "a"})
    store = _hub_store(hub, tmp_path)
    assert not store.repo_exists("alice/secret")
    for call in (lambda: store.head("alice/secret"),
                 lambda: store.list_files("alice/secret", head),
                 lambda: store.read_bytes("alice/secret", "a.txt", head)):
        with pytest.raises(NotFoundError):
            call()


_READS: dict[str, tuple[str, str, Callable[[Store, str], object]]] = {
    "head": ("GET", r"/refs$", lambda s, h: s.head(REPO)),
    "list_files": ("GET", r"/tree/", lambda s, h: s.list_files(REPO, h)),
    "history": ("GET", r"/commits/", lambda s, h: s.history(REPO)),
    "download": ("GET", r"/resolve/", lambda s, h: s.read_bytes(REPO, "a.txt", h)),
    "create_repo": ("POST", r"/repos/create$", lambda s, h: s.create_repo(REPO)),
}


@pytest.mark.parametrize("fault", ["503x2", "disconnect", "timeout"])
@pytest.mark.parametrize("call", sorted(_READS))
def test_transient_failures_are_retried(hub: HubServer, hub_repo: str, tmp_path: Path,
                                        call: str, fault: str) -> None:
    method, pattern, action = _READS[call]
    store = _hub_store(hub, tmp_path, timeout=0.3)
    head = hub.head(hub_repo)
    if fault == "503x2":
        injected = hub.inject_fault(method, pattern, status=503, times=2)
    elif fault == "disconnect":
        injected = hub.inject_fault(method, pattern, disconnect=True, times=1)
    else:
        injected = hub.inject_fault(method, pattern, status=None, delay=1.5, times=1)
    start = time.monotonic()
    action(store, head)
    assert injected.exhausted
    assert time.monotonic() - start < 1.4
    if call == "download":
        assert store.read_bytes(REPO, "a.txt", head) == b"a"


def test_rate_limit_honours_retry_after(hub: HubServer, hub_repo: str,
                                        tmp_path: Path) -> None:
    store = _hub_store(hub, tmp_path)
    hub.inject_fault("GET", r"/refs$", status=429, retry_after=1, times=1)
    start = time.monotonic()
    assert store.head(hub_repo) == hub.head(hub_repo)
    assert 0.95 <= time.monotonic() - start < 3


def test_persistent_timeout_gives_up_in_bounded_time(hub: HubServer, hub_repo: str,
                                                     tmp_path: Path) -> None:
    store = _hub_store(hub, tmp_path, timeout=0.25, retries=3)
    hub.inject_fault("GET", r"/refs$", status=None, delay=5, times=None)
    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.head(hub_repo)
    assert time.monotonic() - start < 2.5
    assert type(err.value) is StoreError
    assert "after 3 attempts" in str(err.value) and "0.25 s" in str(err.value)
    assert err.value.hint


def test_persistent_server_error_is_a_store_error_with_hint(hub: HubServer, hub_repo: str,
                                                            tmp_path: Path) -> None:
    store = _hub_store(hub, tmp_path, retries=3)
    head = hub.head(hub_repo)
    hub.inject_fault(None, r"/refs$|/resolve/", status=500, times=None)
    for call in (lambda: store.head(hub_repo), lambda: store.read_bytes(hub_repo, "a.txt", head)):
        with pytest.raises(StoreError) as err:
            call()
        assert type(err.value) is StoreError
        assert "HTTP 500" in str(err.value) and err.value.hint
    assert sum(1 for r in hub.requests if r.path.endswith("/refs") and r.status == 500) == 3


def test_commit_retried_after_503_lands_once(hub: HubServer, hub_repo: str,
                                             tmp_path: Path) -> None:
    store = _hub_store(hub, tmp_path)
    parent = hub.head(hub_repo)
    hub.inject_fault("POST", r"/commit/", status=503, times=1)
    new = store.commit(hub_repo, {"c.txt": b"c"}, message="after 503", parent=parent)
    assert hub.head(hub_repo) == new
    assert [c.title for c in hub.commits(hub_repo)[:2]] == ["after 503", "Add files"]


def test_commit_whose_reply_is_lost_is_not_applied_twice(hub: HubServer, hub_repo: str,
                                                         tmp_path: Path) -> None:
    # The server applies the commit 0.6 s after receiving it, long after the client's
    # 0.3 s timeout; the client looks again after its 1 s backoff and finds it there.
    store = _hub_store(hub, tmp_path, timeout=0.3, backoff=1.0)
    parent = hub.head(hub_repo)
    hub.inject_fault("POST", r"/commit/", status=None, delay=0.6, times=1)
    new = store.commit(hub_repo, {"c.txt": b"c"}, message="slow commit", parent=parent)
    commits = hub.commits(hub_repo)
    assert commits[0].oid == new and commits[1].oid == parent
    assert hub.files(hub_repo)["c.txt"] == b"c"
    assert sum(1 for r in hub.requests if "/commit/" in r.path) == 1


def test_commit_retried_while_lost_request_still_in_flight(hub: HubServer, hub_repo: str,
                                                           tmp_path: Path) -> None:
    # Here the retry goes first; the late original then fails its parent check (412).
    store = _hub_store(hub, tmp_path, timeout=0.3, backoff=0.01)
    parent = hub.head(hub_repo)
    hub.inject_fault("POST", r"/commit/", status=None, delay=1.0, times=1)
    new = store.commit(hub_repo, {"c.txt": b"c"}, message="raced", parent=parent)
    time.sleep(1.0)  # let the late original arrive
    commits = hub.commits(hub_repo)
    assert commits[0].oid == new and commits[1].oid == parent
    assert hub.head(hub_repo) == new


def test_timeout_from_environment(monkeypatch: pytest.MonkeyPatch, hub: HubServer,
                                  tmp_path: Path) -> None:
    monkeypatch.setenv("FEDBIP_HUB_TIMEOUT", "0.75")
    assert HubStore(endpoint=hub.endpoint, cache_dir=tmp_path).timeout == 0.75
    assert HubStore(endpoint=hub.endpoint, cache_dir=tmp_path, timeout=2).timeout == 2
    monkeypatch.setenv("FEDBIP_HUB_TIMEOUT", "soon")
    with pytest.raises(ConfigError):
        HubStore(endpoint=hub.endpoint, cache_dir=tmp_path)
