"""Local training data: read a file or a saved dataset into a ``datasets.Dataset``.

Everything here is offline: files are read with ``datasets``' packaged builders (json,
csv, parquet) and folders with ``load_from_disk``; nothing is fetched from the Hub.
Tokenizing and labelling the examples for the federation's task is
``fedbip_hub.training.data``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedbip_hub.errors import ConfigError

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_SPLIT = "train"


def load_examples(source: str | Path, *, split: str | None = None) -> Any:
    """Read local examples into a ``datasets.Dataset``.

    Args:
        source: a ``.json``/``.jsonl``/``.csv``/``.tsv``/``.parquet`` file, a folder written
            by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, or a folder of
            data files named after their split (``train.jsonl``, ``test.csv``...).
        split: which split of a DatasetDict (or split-named file) to use; default "train".
            Ignored for a single file or a single saved Dataset.

    Raises:
        ConfigError: the path is missing, the format unknown, the split absent, the file
            unreadable, or there are no examples.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"no data at {source}.",
                          hint="Pass --data a .jsonl/.json/.csv/.parquet file or a folder "
                          "written by Dataset.save_to_disk.")
    dataset = _load_folder(path, split) if path.is_dir() else _load_file(path)
    if len(dataset) == 0:
        raise ConfigError(f"{path} holds no examples.", hint="Check the file's contents.")
    return dataset


def _load_file(path: Path) -> Any:
    import datasets

    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"unknown data format {path.suffix or '(no suffix)'!r} for {path}.",
                          hint=f"Use one of {', '.join(sorted(FORMATS))}, or a folder "
                          "written by Dataset.save_to_disk.")
    check_text_file(path, kind)  # before the builders, whose errors name no line
    readers = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
               "parquet": datasets.Dataset.from_parquet}
    kwargs: dict[str, Any] = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return readers[kind](str(path), **kwargs)
    except Exception as exc:  # the builders raise many types (Arrow, JSON, pandas)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read {path} as {kind}: {first}",
                          hint="JSON Lines: one object per line, e.g. "
                          '{"text": "...", "label": 1}; CSV: a header row.') from exc


def check_text_file(path: Path, kind: str) -> None:
    """An empty file, or a JSON Lines file with a malformed line, refused with its line
    number (``datasets`` says neither); parquet is binary and left to its reader.

    Raises:
        ConfigError: the file is empty, or a line is not one JSON object.
    """
    if kind == "parquet":
        return
    raw = path.read_bytes()
    if not raw.strip():
        raise ConfigError(f"{path} is empty.",
                          hint="Give it one example per line, e.g. "
                          '{"text": "...", "label": 1}' if kind == "json" else
                          "Give it a header row and one example per row.")
    if kind != "json":
        return
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("[") or (
            path.suffix.lower() == ".json" and _is_one_document(text)):
        return  # one JSON document (an array, or {"data": [...]}): the builder reads it
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"cannot read {path}: line {number} is not valid JSON ({exc}).",
                              hint="JSON Lines takes one object per line, e.g. "
                              '{"text": "...", "label": 1}.') from None
        if not isinstance(value, dict):
            raise ConfigError(f"cannot read {path}: line {number} is a JSON "
                              f"{type(value).__name__}, not an object.",
                              hint='Write one object per line, e.g. '
                              '{"text": "...", "label": 1}.')


def _is_one_document(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _load_folder(path: Path, split: str | None) -> Any:
    import datasets

    wanted = split or DEFAULT_SPLIT
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if not saved:
        files = [p for p in sorted(path.iterdir())
                 if p.is_file() and p.stem == wanted and p.suffix.lower() in FORMATS]
        if files:
            return _load_file(files[0])
        raise ConfigError(f"{path} is neither a saved dataset nor holds a {wanted} file.",
                          hint="Save it with Dataset.save_to_disk, or put e.g. "
                          f"{wanted}.jsonl in it.")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise ConfigError(f"cannot load the saved dataset at {path}: {exc}".splitlines()[0],
                          hint="Save it again with Dataset.save_to_disk.") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if wanted not in loaded:
            raise ConfigError(f"{path} has no split {wanted!r} (it has "
                              f"{', '.join(loaded) or 'none'}).",
                              hint=f"Pick one with --split {next(iter(loaded), 'train')}.")
        return loaded[wanted]
    return loaded
