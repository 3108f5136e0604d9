"""The metadata a client pushes beside its adapter (``fedbip_upload.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedbip_hub.errors import AdapterError

UPLOAD_METADATA_NAME = "fedbip_upload.json"


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

    start_revision: str | None = None
    n_examples: int = Field(1, ge=0)
    base_model: str | None = None
    base_revision: str | None = None
    task: str | None = None
    fedbip_version: str | None = None

    @classmethod
    def read(cls, folder: str | Path, *, label: str | None = None) -> UploadMetadata | None:
        """Read the folder's metadata, or None when there is none.

        Raises:
            AdapterError: the file exists but is not well-formed.
        """
        path = Path(folder) / UPLOAD_METADATA_NAME
        if not path.is_file():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
            raise AdapterError(
                f"{path} is malformed: {describe_error(exc)}",
                hint="Push again with `fedbip push`, which writes this file for you.",
                client=label,
            ) from exc

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
