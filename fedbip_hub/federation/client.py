"""What one member does: create or join a federation, push an upload, pull its result."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedbip_hub import __version__
from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME, UploadMetadata
from fedbip_hub.adapters.upload_files import PICKLE_SUFFIXES, UPLOAD_FILES, WEIGHTS_NAME
from fedbip_hub.adapters.upload_files import upload_id as upload_id  # re-exported: the public name
from fedbip_hub.errors import (
    AdapterError,
    ConfigError,
    ConflictError,
    FedbipError,
    NotFoundError,
    StoreError,
)
from fedbip_hub.federation.config import (
    FEDERATION_FILE,
    INIT_DIR,
    MEMBERS_DIR,
    PERSONALIZED_DIR,
    STATE_FILE,
    FederationConfig,
    FederationState,
    Member,
    dump_json,
    utc_now,
)
from fedbip_hub.federation.repo import Federation
from fedbip_hub.identity import client_name_problem, repo_id_problem
from fedbip_hub.safe_json import KIB, JsonLimitError, loads_bounded

PUBLISH_TITLE = "fedbip: personalized adapter"
START_FILE = "fedbip_start.json"
# Root files of a member repo that an upload replaces as a whole: weights in any format
# (pickles included) and JSON configs. The server writes only under personalized/, and a
# README or .gitattributes at the root is the member's own and kept.
STALE_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".json")
MAX_START_FILE_BYTES = 64 * KIB
_COMMIT_RETRIES = 8


def commit_with_retry(fed: Federation, repo_id: str, build: callable, message: str, *,
                      deletes: Callable[[str], Sequence[str]] | None = None) -> str:
    """Commit files computed from the current head, re-reading it on a lost race.

    ``build(head)`` returns the files to write given the head it saw; ``deletes(head)``
    the paths to delete in the same commit.
    """
    for _ in range(_COMMIT_RETRIES):
        head = fed.store.head(repo_id)
        try:
            return fed.store.commit(repo_id, build(head), message=message, parent=head,
                                    deletes=deletes(head) if deletes else ())
        except ConflictError:
            continue
    raise ConflictError(f"{repo_id} kept moving; gave up after {_COMMIT_RETRIES} tries.",
                        hint="Retry in a moment.")


def init_federation(address: str, config: FederationConfig, *, token: str | None = None
                    ) -> Federation:
    """Create the federation repo with its config and initial adapter, in one commit.

    Everything that can fail (the strategy, the base model, the initial adapter, the
    card) is done before the repo is created, and a repo this call created is deleted
    again if its first commit fails: a failed init leaves no half-made repo.

    ``token`` reaches every Hub call, the base model's download included. A local base
    model is recorded (absolute) in ``federation.json`` and the card's text, never in
    card metadata, which holds Hub model ids only (see ``local_base_warning``).

    Raises:
        ConfigError: a federation already exists at this address, or its strategy is
            invalid or could not run (the oracle without groups).
    """
    from fedbip_hub.federation.modelcard import dashboard_card
    from fedbip_hub.stores.locations import resolve_base_model
    from fedbip_hub.training.models import build_initial_adapter

    config.runnable_strategy()  # refused before anything is created or loaded
    config.base_model = resolve_base_model(config.base_model)  # a local folder: absolute
    fed = Federation.at(address, token=token)
    existed = fed.store.repo_exists(fed.repo_id)
    if existed and fed.store.file_exists(fed.repo_id, FEDERATION_FILE,
                                         fed.store.head(fed.repo_id)):
        raise ConfigError(f"a federation already exists at {address}.",
                          hint="Pick another name, or inspect it with `fedbip status`.")
    config.created_by = config.created_by or fed.store.whoami()
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = build_initial_adapter(config, Path(tmp) / INIT_DIR, token=token)
        files: dict = {f"{INIT_DIR}/{p.name}": p.read_bytes() for p in init_dir.iterdir()
                       if p.is_file() and p.name != "README.md"}
    state = FederationState()
    files[FEDERATION_FILE] = dump_json(config)
    files[STATE_FILE] = dump_json(state)
    files["README.md"] = dashboard_card(config, {}, state, None).encode()
    create_private_repo(fed, fed.repo_id, "the federation repo")
    try:
        fed.store.commit(fed.repo_id, files, message=f"fedbip: create federation "
                         f"{config.name}", parent=fed.store.head(fed.repo_id))
    except BaseException:
        if not existed:
            with contextlib.suppress(FedbipError):  # the commit's error is the one to show
                fed.store.delete_repo(fed.repo_id)
        raise
    return fed


def local_base_warning(fed: Federation, config: FederationConfig) -> str | None:
    """What to tell the coordinator of a Hub federation whose base model is a local
    folder: its members train on their own machines, where only that same absolute path
    finds it (a shared file system, a mirror at a fixed path). That is accepted, not
    refused, because such set-ups are real; None when there is nothing to say."""
    from fedbip_hub.stores.locations import is_local_path

    if fed.store.kind == "local" or not is_local_path(config.base_model):
        return None
    namespace = fed.repo_id.split("/")[0]
    name = Path(config.base_model).name
    return (f"the base model is the local folder {config.base_model}: every member needs "
            f"it at that same path. To share it instead, upload it to a private Hub repo "
            f"(`hf upload {namespace}/{name} {config.base_model}`) and create the "
            f"federation with --base-model {namespace}/{name}.")


def join(fed: Federation, client: str, *, repo_id: str | None = None) -> Member:
    """Create the member's private repo and record the membership in the federation repo.

    Joining is idempotent; joining under a name already taken by another repo is refused,
    and so is a repo that another member (or the federation itself) already has: one
    member, one repo.
    """
    _check_name(client)
    head = fed.head()
    fed.config(head)
    members = fed.members(head)
    repo_id = repo_id or fed.default_client_repo(client)
    if (problem := repo_id_problem(repo_id)) is not None:
        raise ConfigError(problem, hint="Pass another --repo.", client=client)
    if repo_id == fed.repo_id:
        raise ConfigError(f"{repo_id} is the federation's own repo; a member needs a repo of "
                          "its own.", hint="Pass another --repo, or omit it.", client=client)
    holder = next((m.name for m in members.values()
                   if m.repo_id == repo_id and m.name != client), None)
    if holder is not None:
        raise ConfigError(f"repo {repo_id} is already member {holder}'s; one member, one repo.",
                          hint="Pass another --repo, or omit it for a repo of your own.",
                          client=client)
    if client in members:
        if members[client].repo_id != repo_id:
            raise ConfigError(f"{client} already joined with repo {members[client].repo_id}.",
                              hint="Pick another client name.", client=client)
        create_private_repo(fed, repo_id, f"{client}'s repo", client=client)
        return members[client]
    create_private_repo(fed, repo_id, f"{client}'s repo", client=client)
    member = Member(name=client, repo_id=repo_id, joined_by=fed.store.whoami())
    commit_with_retry(fed, fed.repo_id,
                      lambda _head: {f"{MEMBERS_DIR}/{client}.json": dump_json(member)},
                      f"fedbip: {client} joins ({repo_id})")
    return member


def create_private_repo(fed: Federation, repo_id: str, what: str, *,
                        client: str | None = None) -> None:
    """Create ``repo_id`` private, or make an existing public one private.

    ``create_repo(private=True)`` leaves an existing repo's visibility as it is, and a
    federation's repos hold peer-mixed adapters: they are private by construction.

    Raises:
        ConfigError: the repo is public and this token cannot change that.
    """
    fed.store.create_repo(repo_id, private=True)
    if fed.store.is_private(repo_id):
        return
    try:
        fed.store.make_private(repo_id)
    except StoreError as exc:
        raise ConfigError(
            f"{repo_id} ({what}) exists and is public, and it could not be made private "
            f"({exc.message}).", client=client,
            hint=f"Make {repo_id} private in its settings on the Hub (or give this token "
            "the right to), or use another repo.") from exc


def _check_name(client: str) -> None:
    if (problem := client_name_problem(client)) is not None:
        raise ConfigError(f"{problem}.", hint="Pick another client name.")


@dataclass
class PushResult:
    client: str
    repo_id: str
    commit: str
    metadata: UploadMetadata
    removed: list[str]  # stale root files the push deleted (a stray pickle, say)


def stale_upload_files(files: Sequence[str]) -> list[str]:
    """The root files an upload replaces that are not part of it (see STALE_SUFFIXES)."""
    return sorted(f for f in files if "/" not in f and f not in UPLOAD_FILES
                  and Path(f).suffix.lower() in STALE_SUFFIXES)


def push(fed: Federation, client: str, adapter_dir: str | Path, *, n_examples: int | None = None,
         start_revision: str | None = None, task: str | None = None) -> PushResult:
    """Validate an adapter against the federation, then upload it in one commit that
    replaces the repo root's upload files as a whole: stale ones (a stray
    ``adapter_model.bin`` from ``push_to_hub(safe_serialization=False)``, say) are deleted
    in the same commit, so the server never sees a mix.

    The start revision defaults to the one ``fedbip pull`` (or ``fedbip train``) recorded
    in the adapter folder, so the server can compute the task vector from it.
    """
    # The tensor code loads only here, so cheap commands (status, join, pull) stay fast.
    from fedbip_hub.adapters.lora import LoraAdapter
    from fedbip_hub.engine.task_vectors import TaskVector
    from fedbip_hub.server.validation import check_task_vector, validate_upload

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir} is {'a file' if adapter_dir.exists() else 'missing'}"
                           ", not an adapter folder.", client=client,
                           hint="Pass the folder PEFT's save_pretrained (or `fedbip train`) "
                           "wrote: adapter_config.json plus adapter_model.safetensors.")
    head = fed.head()
    config = fed.config(head)
    member = fed.member(client, head)
    init = LoraAdapter(fed.init_folder(head), label="federation init")
    previous = UploadMetadata.read(adapter_dir, label=client) if (
        adapter_dir / UPLOAD_METADATA_NAME).is_file() else None
    recorded = read_start_revision(adapter_dir)
    metadata = UploadMetadata(
        start_revision=start_revision or recorded or (previous.start_revision if previous
                                                      else None),
        n_examples=n_examples if n_examples is not None else (
            previous.n_examples if previous else 1),
        base_model=config.base_model, base_revision=config.base_revision,
        task=task or (previous.task if previous else None), fedbip_version=__version__,
        uploaded_at=utc_now(), upload_nonce=uuid.uuid4().hex,
    )
    if metadata.start_revision is not None:
        _check_start(fed, member, metadata.start_revision)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            source = adapter_dir / name
            if source.is_file():
                shutil.copyfile(source, staged / name)
        for stray in adapter_dir.iterdir():  # let the gate see (and refuse) pickles
            if stray.suffix.lower() in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
                shutil.copyfile(stray, staged / stray.name)
        metadata.write(staged)
        try:
            adapter, _ = validate_upload(staged, config, init, label=client)
        except FedbipError as exc:  # name the user's folder, not the staging copy
            raise _renamed(exc, staged, adapter_dir) from exc
        start = init
        if metadata.start_revision is not None:
            start = LoraAdapter(fed.store.fetch_folder(
                member.repo_id, metadata.start_revision, PERSONALIZED_DIR,
                only=(CONFIG_NAME, WEIGHTS_NAME)), label=f"{client} start")
        check_task_vector(TaskVector(adapter, start, name=client), config.limits, label=client)
        files = {name: (staged / name).read_bytes() for name in UPLOAD_FILES}
    removed: list[str] = []

    def stale(head: str) -> list[str]:
        removed[:] = stale_upload_files(fed.store.list_files(member.repo_id, head))
        return removed

    commit = commit_with_retry(
        fed, member.repo_id, lambda _head: files,
        f"fedbip push: {client} upload ({metadata.n_examples} examples, start "
        f"{(metadata.start_revision or 'init')[:8]})", deletes=stale)
    return PushResult(client, member.repo_id, commit, metadata, list(removed))


def _renamed(exc: FedbipError, staged: Path, given: Path) -> FedbipError:
    """The same error, with the staging folder's path replaced by the one the user gave."""
    def fix(text: str | None) -> str | None:
        return text.replace(str(staged), str(given)) if text else text

    return type(exc)(fix(exc.message) or "", hint=fix(exc.hint), client=exc.client)


def _check_start(fed: Federation, member: Member, revision: str) -> None:
    path = f"{PERSONALIZED_DIR}/{WEIGHTS_NAME}"
    try:
        ok = fed.store.file_exists(member.repo_id, path, revision)
    except NotFoundError:
        ok = False
    if not ok:
        raise ConfigError(
            f"start revision {revision[:12]} holds no personalized adapter in "
            f"{member.repo_id}.", client=member.name,
            hint="Pass the revision `fedbip pull` printed, or omit it for a first round.")


def read_start_revision(adapter_dir: Path) -> str | None:
    """The start revision ``fedbip pull`` (or ``fedbip train``) recorded in the folder.

    Raises:
        ConfigError: the file is not a small JSON object.
    """
    path = Path(adapter_dir) / START_FILE
    if not path.is_file():
        return None
    try:
        data = loads_bounded(path.read_bytes(), max_bytes=MAX_START_FILE_BYTES)
    except JsonLimitError as exc:
        raise ConfigError(f"{path} is refused: {exc}.",
                          hint="Delete it and pass --start-revision, or `fedbip pull` "
                          "again.") from exc
    revision = data.get("start_revision") if isinstance(data, dict) else None
    return revision if isinstance(revision, str) else None


def latest_personalized_revision(fed: Federation, repo_id: str) -> str | None:
    """The commit that published the member's newest personalized adapter, if any."""
    for commit in fed.store.history(repo_id):
        if commit.title.startswith(PUBLISH_TITLE):
            return commit.id
    return None


@dataclass
class PullResult:
    client: str
    revision: str | None  # None: the federation's initial adapter (``or_init``)
    folder: Path


def pull(fed: Federation, client: str, dest: str | Path, *, or_init: bool = False
         ) -> PullResult:
    """Copy the member's latest personalized adapter into ``dest``, noting its revision
    in ``fedbip_start.json``; the folder is what ``PeftModel.from_pretrained(base, dest,
    is_trainable=True)`` loads, and what ``push`` reads the start revision from.

    With ``or_init``, a member no round has personalized yet gets the federation's
    initial adapter (start revision null): the start of every first round.

    Raises:
        NotFoundError: no round has personalized this member yet (without ``or_init``).
    """
    member = fed.member(client)
    revision = latest_personalized_revision(fed, member.repo_id)
    if revision is None and not or_init:
        raise NotFoundError(f"no personalized adapter for {client} yet.", client=client,
                            hint="Push an upload, then wait for (or run) `fedbip-server run`; "
                            "to train from the initial adapter, pull with --or-init.")
    source = (fed.init_folder() if revision is None
              else fed.store.fetch_folder(member.repo_id, revision, PERSONALIZED_DIR))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, dest / path.name)
    (dest / START_FILE).write_text(json.dumps(
        {"start_revision": revision, "repo_id": member.repo_id}) + "\n")
    return PullResult(client, revision, dest)


def personalized_folder(fed: Federation | str, client: str, *, revision: str | None = None,
                        token: str | None = None) -> Path:
    """A PEFT-loadable folder holding the member's personalized adapter, for
    ``PeftModel.from_pretrained(base, folder)``.

    A local federation is a content-addressed store, so its repos are no folders PEFT can
    read; this materialises the adapter (the latest one, or the one published at
    ``revision``) in the store's cache, pinned by commit. Treat the folder as read-only:
    to train from it, ``pull`` into a folder of your own (which also records the start
    revision ``push`` needs).

    Raises:
        NotFoundError: the member has no personalized adapter yet (or none at revision).
    """
    if isinstance(fed, str):
        fed = Federation.at(fed, token=token)
    member = fed.member(client)
    revision = revision or latest_personalized_revision(fed, member.repo_id)
    if revision is None:
        raise NotFoundError(f"no personalized adapter for {client} yet.", client=client,
                            hint="Push an upload, then wait for (or run) `fedbip-server run`.")
    _check_start(fed, member, revision)
    return fed.store.fetch_folder(member.repo_id, revision, PERSONALIZED_DIR)
