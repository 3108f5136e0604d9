"""One input's task vector: its upload downloaded at the pinned commit, validated against
the federation's gate, and differenced against the adapter it started from; plus the
client's latest personalized adapter, fetched for the merge. Errors name the server's
cached folders publicly (``repo@commit[:12]``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.lora import WEIGHTS_NAME, LoraAdapter
from fedbip_hub.adapters.upload_files import UPLOAD_FILES
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.errors import FedbipError, StoreError
from fedbip_hub.federation.config import INIT_DIR, PERSONALIZED_DIR, FederationConfig
from fedbip_hub.federation.skip_reasons import InternalError, describe, public_paths
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import PinnedInput, RoundPlan
from fedbip_hub.server.resources import is_resource_error
from fedbip_hub.server.validation import check_task_vector, validate_upload

# What the server reads of a personalized folder (a member may commit anything beside).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# (client, commit) → the sha256 of each upload file read there, for the record
FileHashes = dict[tuple[str, str], dict[str, str]]


@dataclass(frozen=True)
class ReadInput:
    """One input's task vector, and its latest personalized adapter's folder (None: it
    has none, the merge starts from the federation's initial adapter)."""

    vector: TaskVector
    latest_folder: Path | None


def read_input(ctx: RoundContext, plan: RoundPlan, pinned: PinnedInput,
               config: FederationConfig, init: LoraAdapter, init_name: str,
               hashes: FileHashes) -> ReadInput:
    """``task_vector``, then the client's latest personalized adapter fetched into the
    cache for the merge: a store failure on either skips this client only."""
    vector = task_vector(ctx, pinned, config, init, init_name, hashes=hashes)
    revision = plan.latest.get(pinned.client)
    folder = None
    if revision is not None:
        try:
            folder = ctx.store.fetch_folder(pinned.repo_id, revision, PERSONALIZED_DIR,
                                            only=ADAPTER_FILES)
        except StoreError as exc:
            exc.message = (f"could not read its latest personalized adapter "
                           f"{pinned.repo_id}@{revision[:12]}/{PERSONALIZED_DIR} "
                           f"({exc.message})")
            exc.args = (str(exc),)
            raise
    return ReadInput(vector, folder)


def task_vector(ctx: RoundContext, pinned: PinnedInput, config: FederationConfig,
                init: LoraAdapter, init_name: str = INIT_DIR, *,
                hashes: FileHashes | None = None) -> TaskVector:
    """Download, validate and difference one input (the upload files' hashes go to
    ``hashes``). Errors name the server's cached folders as ``repo@commit[:12]`` (a
    client cannot use our local paths); anything but a FedbipError comes out as an
    ``InternalError``."""
    names = {init.folder: init_name}
    try:
        folder = ctx.store.fetch_folder(pinned.repo_id, pinned.commit, only=UPLOAD_FILES)
        names[folder] = f"{pinned.repo_id}@{pinned.commit[:12]}"
        if hashes is not None:
            hashes[(pinned.client, pinned.commit)] = {
                p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
        upload, _metadata = validate_upload(folder, config, init, label=pinned.client,
                                            check_values=pinned.fresh)
        start = init
        if pinned.start_revision is not None:
            start_dir = ctx.store.fetch_folder(pinned.repo_id, pinned.start_revision,
                                               PERSONALIZED_DIR, only=ADAPTER_FILES)
            names[start_dir] = (f"{pinned.repo_id}@{pinned.start_revision[:12]}/"
                                f"{PERSONALIZED_DIR}")
            start = LoraAdapter(start_dir, label=f"{pinned.client} start")
        vector = TaskVector(upload, start, name=pinned.client)
        check_task_vector(vector, config.limits, label=pinned.client)
        return vector
    except FedbipError as exc:
        exc.message = public_paths(exc.message, names, ctx.store.cache_dir)
        if exc.hint:
            exc.hint = public_paths(exc.hint, names, ctx.store.cache_dir)
        exc.args = (str(exc),)
        raise
    except Exception as exc:
        if is_resource_error(exc):
            raise
        raise InternalError(public_paths(describe(exc), names, ctx.store.cache_dir)) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
