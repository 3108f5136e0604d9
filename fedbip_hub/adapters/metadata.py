"""The metadata a client pushes beside its adapter (``fedbip_upload.json``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedbip_hub.errors import AdapterError, FedbipError
from fedbip_hub.safe_json import KIB, JsonLimitError, loads_bounded

UPLOAD_METADATA_NAME = "fedbip_upload.json"
MAX_METADATA_BYTES = 64 * KIB
# A hard ceiling whatever the federation's limit (Limits.max_n_examples, checked by
# validation.check_metadata): a count no dataset has, that every float still holds exactly.
MAX_N_EXAMPLES = 10**15


class UploadMetadata(BaseModel):
    """What the server needs to know about an upload beyond the adapter itself.

    Attributes:
        start_revision: the personalized revision (commit id) this round trained from;
            None for a first round, which starts from the federation's initial adapter.
        n_examples: training examples used (data-size weights of FedAvg/FedIT).
        base_model: the base model id or path the adapter was trained on.
        base_revision: the base model's revision.
    """

    model_config = ConfigDict(extra="allow")

    start_revision: str | None = Field(None, pattern=r"^[0-9a-f]{40}$")
    n_examples: int = Field(1, ge=0, le=MAX_N_EXAMPLES, strict=True)
    base_model: str | None = Field(None, max_length=1024)
    base_revision: str | None = Field(None, max_length=256)
    task: str | None = Field(None, max_length=256)
    fedbip_version: str | None = Field(None, max_length=64)

    @classmethod
    def parse(cls, raw: bytes, *, label: str | None = None, source: str = UPLOAD_METADATA_NAME
              ) -> UploadMetadata:
        """Parse the file's bytes within bounds (size, depth, number sizes).

        Raises:
            AdapterError: the content is not well-formed metadata.
        """
        try:
            return cls.model_validate(loads_bounded(raw, max_bytes=MAX_METADATA_BYTES))
        except (JsonLimitError, ValidationError) as exc:
            raise AdapterError(
                f"{source} is malformed ({describe_error(exc)})",
                hint="Push again with `fedbip push`, which writes this file for you.",
                client=label,
            ) from exc

    @classmethod
    def read(cls, folder: str | Path, *, label: str | None = None) -> UploadMetadata | None:
        """Read the folder's metadata, or None when there is none.

        Raises:
            AdapterError: the file exists but is not well-formed.
        """
        path = Path(folder) / UPLOAD_METADATA_NAME
        if not path.is_file():
            return None
        return cls.parse(path.read_bytes(), label=label, source=str(path))

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / UPLOAD_METADATA_NAME
        path.write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n",
                        encoding="utf-8")
        return path


def describe_error(exc: Exception) -> str:
    """One line saying what is wrong: the field and the rule for a validation error."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "the file"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{where}: {first.get('msg', 'invalid')}{more}"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def upload_staleness(name: str, metadata: UploadMetadata, history: list[str]) -> int:
    """How many personalized versions behind the upload's start is (the init: all).

    Raises:
        FedbipError: the start is no personalized adapter this federation published for it.
    """
    if metadata.start_revision is None:
        return len(history)
    if metadata.start_revision in history:
        return len(history) - 1 - history.index(metadata.start_revision)
    raise FedbipError(
        f"start revision {metadata.start_revision[:12]} is not a personalized "
        "adapter this federation published for it.",
        hint="Train from `fedbip pull`'s adapter (or from scratch) and push again.",
        client=name)
