"""The federation handle: a federation repo's files read, validated and explained.

What the files hold (the layout and the pydantic records) is ``fedbip_hub.federation.config``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fedbip_hub.adapters.metadata import describe_error
from fedbip_hub.errors import ConfigError, FedbipError, NotFoundError, StoreError
from fedbip_hub.federation.config import (
    FEDERATION_FILE,
    INIT_DIR,
    MEMBERS_DIR,
    ROUNDS_DIR,
    STATE_FILE,
    FederationConfig,
    FederationState,
    Member,
    RoundRecordHeader,
    round_record_path,
)
from fedbip_hub.identity import client_name_problem
from fedbip_hub.safe_json import KIB, JsonLimitError, loads_bounded
from fedbip_hub.stores import HubStore, LocalStore, Store, is_hub_address

LOCAL_FEDERATION_REPO = "federation"
MAX_MEMBER_FILE_BYTES = 64 * KIB

M = TypeVar("M", bound=BaseModel)
_ROUND_FILE = re.compile(rf"{ROUNDS_DIR}/(\d{{6,}})\.json")


@dataclass
class Membership:
    """The members read from ``members/``, and why any member file was left out."""

    members: dict[str, Member]
    problems: dict[str, str]  # member file path → why it was left out


class Federation:
    """A federation addressed by ``org/name`` (the Hub) or a folder (local).

    Args:
        store: where its repos live.
        repo_id: the federation repo.
        address: how the user named it (for messages).
    """

    def __init__(self, store: Store, repo_id: str, address: str):
        self.store = store
        self.repo_id = repo_id
        self.address = address
        self._listing: tuple[str, list[str]] | None = None

    @classmethod
    def at(cls, address: str, *, token: str | None = None, cache_dir: Path | None = None
           ) -> Federation:
        """Resolve an address to a store and a federation repo (which may not exist yet)."""
        cache = cache_dir or _env_path("FEDBIP_CACHE")
        if is_hub_address(address):
            return cls(HubStore(token=token, cache_dir=cache), address, address)
        from fedbip_hub.stores.locations import absolute

        # absolute, so messages, cards and schedules work from any directory
        return cls(LocalStore(address, cache_dir=cache), LOCAL_FEDERATION_REPO,
                   absolute(address))

    @property
    def token(self) -> str | None:
        """The token this federation was opened with (for model and tokenizer loads)."""
        return self.store.token

    # -- reads -------------------------------------------------------------------------
    def head(self) -> str:
        try:
            return self.store.head(self.repo_id)
        except StoreError as exc:
            from fedbip_hub.stores.locations import other_reading

            hub = isinstance(self.store, HubStore)
            if type(exc) is StoreError and hub:  # the Hub unreachable: was a folder meant?
                raise StoreError(exc.message, hint=f"{exc.hint or ''} "
                                 f"{other_reading(self.address, hub=True)}".strip()) from exc
            if not isinstance(exc, NotFoundError):
                raise
            raise NotFoundError(
                f"no federation at {self.address} ({exc.message})",
                hint="Check the address, or create one with `fedbip init "
                f"{self.address} --base-model ...`. "
                f"{other_reading(self.address, hub=hub)}"
            ) from exc

    def _json(self, path: str, revision: str) -> Any:
        try:
            raw = self.store.read_bytes(self.repo_id, path, revision)
        except NotFoundError as exc:
            raise NotFoundError(
                f"{self.address} is not a fedbip federation (no {path}).",
                hint=f"Create it with `fedbip init {self.address} --base-model ...`.") from exc
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8, absurd nesting
            raise ConfigError(
                f"{path} of {self.address} (at {revision[:12]}) is not valid JSON "
                f"({describe_json_error(exc)}).", hint=_restore_hint(path)) from exc

    def _record(self, model: type[M], path: str, revision: str) -> M:
        """``path`` read at ``revision`` and validated as ``model``: ConfigError, naming
        the file, the field and the fix, for anything else."""
        data = self._json(path, revision)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{path} of {self.address} (at {revision[:12]}) is invalid: "
                              f"{describe_error(exc)}.", hint=_restore_hint(path)) from exc

    def config(self, revision: str | None = None) -> FederationConfig:
        return self._record(FederationConfig, FEDERATION_FILE, revision or self.head())

    def state(self, revision: str | None = None) -> FederationState:
        revision = revision or self.head()
        if not self.store.file_exists(self.repo_id, STATE_FILE, revision):
            return FederationState()
        return self._record(FederationState, STATE_FILE, revision)

    def files(self, revision: str) -> list[str]:
        """The federation repo's files at ``revision`` (a commit id never changes, so the
        last listing is kept: planning reads it more than once)."""
        if self._listing is None or self._listing[0] != revision:
            self._listing = (revision, self.store.list_files(self.repo_id, revision))
        return list(self._listing[1])

    def round_record(self, number: int, revision: str | None = None) -> dict:
        """``rounds/NNNNNN.json``, checked to be a round record of that round."""
        revision = revision or self.head()
        path = round_record_path(number)
        if path not in self.files(revision):
            raise ConfigError(f"{path} is missing from {self.address}, although its state "
                              f"says round {number} completed.", hint=_restore_hint(path))
        record = self._record(RoundRecordHeader, path, revision)
        if record.round != number:
            raise ConfigError(f"{path} of {self.address} holds round {record.round}.",
                              hint=_restore_hint(path))
        return record.model_dump(mode="json")

    def last_recorded_round(self, revision: str) -> int:
        """The highest N of the ``rounds/NNNNNN.json`` records at ``revision`` (0: none)."""
        numbers = [int(m.group(1)) for f in self.files(revision)
                   if (m := _ROUND_FILE.fullmatch(f))]
        return max(numbers, default=0)

    def check_not_rolled_back(self, revision: str, state: FederationState) -> None:
        """Refuse a state.json older than the round records beside it (a rollback, or a
        state replaced by hand): running on it would re-run a round, overwrite its record
        and apply uploads twice."""
        last = self.last_recorded_round(revision)
        if last <= state.round:
            return
        title = f"fedbip: round {last} completed"
        commit = next((c.id for c in self.store.history(self.repo_id) if c.title == title),
                      None)
        where = (f"the version written by commit {commit} ('{title}')" if commit else
                 f"the version written with {round_record_path(last)}")
        raise ConfigError(
            f"state.json of {self.address} says the last completed round is {state.round}, "
            f"but {round_record_path(last)} exists: the state was rolled back or replaced. "
            "The server refuses to run on it (it would re-run rounds, overwrite their "
            "records and refuse honest uploads).",
            hint=f"Restore state.json from the federation repo's history: {where}.")

    def members(self, revision: str | None = None) -> dict[str, Member]:
        """The members; a member file that is invalid is left out (see ``membership``)."""
        return self.membership(revision).members

    def membership(self, revision: str | None = None) -> Membership:
        """Every valid member, and why each other member file was left out.

        One bad member file (an invalid name, a name too long for a file system, JSON
        that is not a member, a repo another member or the federation already has) never
        stops the federation: it is left out, with a reason, and the others are read.
        When two member files claim one repo, the member that joined first keeps it.
        """
        revision = revision or self.head()
        found: list[Member] = []
        problems: dict[str, str] = {}
        for path in self.files(revision):
            if not (path.startswith(f"{MEMBERS_DIR}/") and path.endswith(".json")):
                continue
            try:
                found.append(self._member_file(path, revision))
            except FedbipError as exc:
                problems[_shown_path(path)] = exc.message
        claimed: dict[str, Member] = {}
        for member in sorted(found, key=lambda m: (_joined_key(m.joined_at), m.name)):
            holder = claimed.get(member.repo_id)
            if member.repo_id == self.repo_id:
                problems[f"{MEMBERS_DIR}/{member.name}.json"] = (
                    f"member {member.name} claims the federation's own repo {self.repo_id}; "
                    "left out (fix: join with a repo of its own)")
            elif holder is not None:
                problems[f"{MEMBERS_DIR}/{member.name}.json"] = (
                    f"member {member.name} claims repo {member.repo_id}, which member "
                    f"{holder.name} joined with first; left out (fix: join with a repo of "
                    "its own)")
            else:
                claimed[member.repo_id] = member
        members = {m.name: m for m in claimed.values()}
        return Membership(dict(sorted(members.items())), dict(sorted(problems.items())))

    def _member_file(self, path: str, revision: str) -> Member:
        """Read one ``members/<name>.json``; its name must be the file's."""
        name = path[len(MEMBERS_DIR) + 1:-len(".json")]
        problem = client_name_problem(name)
        if problem is not None:  # checked before any read: the name makes cache paths
            raise ConfigError(f"{_shown_path(path)} is not a member file: {problem}; left "
                              "out (fix: delete it from the federation repo)")
        try:
            data = loads_bounded(self.store.read_bytes(self.repo_id, path, revision),
                                 max_bytes=MAX_MEMBER_FILE_BYTES)
            member = Member.model_validate(data)
        except (JsonLimitError, ValidationError) as exc:
            raise ConfigError(f"{path} is not a valid member file ({describe_error(exc)}); left "
                              f"out (fix: `fedbip join {self.address} --client {name}` "
                              "again, or delete the file)") from exc
        if member.name != name:
            raise ConfigError(f"{path} names member {member.name!r}, not {name!r}; left out "
                              "(fix: a member file must carry its own name)")
        return member

    def member(self, name: str, revision: str | None = None) -> Member:
        membership = self.membership(revision)
        members = membership.members
        problem = membership.problems.get(f"{MEMBERS_DIR}/{name}.json")
        if name not in members and problem is not None:
            raise ConfigError(f"the membership file of {name} is broken: {problem}",
                              client=name)
        if name not in members:
            raise NotFoundError(f"{name} is not a member of {self.address}.",
                                hint=f"Join first: `fedbip join {self.address} --client {name}`.",
                                client=name)
        return members[name]

    def init_folder(self, revision: str | None = None) -> Path:
        return self.store.fetch_folder(self.repo_id, revision or self.head(), INIT_DIR)

    def default_client_repo(self, client: str) -> str:
        if self.store.kind == "local":
            return f"clients/{client}"
        namespace, name = self.repo_id.split("/")
        return f"{namespace}/{name}-{client}"


def _shown_path(path: str) -> str:
    return path if len(path) <= 100 else path[:97] + "..."


def _joined_key(joined_at: str) -> datetime:
    """When a member joined, for "first joiner keeps the repo" (unreadable: last)."""
    try:
        when = datetime.fromisoformat(joined_at)
    except ValueError:
        return datetime.max.replace(tzinfo=timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)



def describe_json_error(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _restore_hint(path: str) -> str:
    if path == STATE_FILE:
        return ("Restore state.json from the federation repo's history: the version "
                "written by the last 'fedbip: round N completed' commit.")
    if path.startswith(f"{MEMBERS_DIR}/"):
        return (f"Restore {path} from the federation repo's history, or delete it and "
                "have that member run `fedbip join` again.")
    if path.startswith(f"{ROUNDS_DIR}/"):
        return f"Restore {path} from the federation repo's history (never edit it by hand)."
    return f"Fix {path} in the federation repo, or restore it from the repo's history."


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None
