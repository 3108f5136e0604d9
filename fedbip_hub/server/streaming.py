"""Streaming rounds: concurrent downloads, merged modules spilled to disk as they are
ready, adapters assembled and published one client at a time.

A round's peak memory is then at most one module's factors for all K inputs (the
merge's working set; with top-k weights only a bounded cache of them, see
``resident_peers``) plus one client's output adapter, instead of all K output adapters:

* ``OrderedMap`` runs the download/validate phase on a thread pool and hands results
  back in input order (downloads overlap; the outcome does not depend on timing);
* ``StagingArea`` is a ``personalize(..., sink=...)`` sink: each target's merged module
  goes to its own safetensors file under a per-target folder as the module loop goes;
* ``StagedAdapter`` stands in for a ``MergedAdapter`` (discarded energies, ``save``):
  ``save`` reads back one target's modules, writes the PEFT adapter, and frees that
  target's staging files.

The staged tensors are the merge's results byte for byte (same dtype, no recomputation),
so a streaming round publishes exactly the adapters an in-memory round does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file

from fedbip_hub.adapters.config import LoraAdapterConfig
from fedbip_hub.engine.merge import MergedAdapter, MergedModule
from fedbip_hub.engine.task_vectors import Space

STAGING_ENV = "FEDBIP_STAGING_DIR"
DEFAULT_DOWNLOAD_WORKERS = 8
RESIDENT_PEERS_MIN = 64


def resident_peers(top_k: int | None) -> int | None:
    """How many task vectors of a module a streaming merge keeps in memory.

    With top-k weights a target reads only its k+1 peers, so a bounded LRU cache of a
    few targets' worth suffices and memory no longer grows with K (``personalize``'s
    ``max_resident``); with dense weights every target reads all K, so all K stay
    (None).
    """
    return None if top_k is None else max(RESIDENT_PEERS_MIN, 4 * (top_k + 1))

T = TypeVar("T")
R = TypeVar("R")


# -- concurrent downloads, ordered results -------------------------------------------------
class OrderedMap(Generic[T, R]):
    """``fn`` over ``items`` on a thread pool; iterating yields ``(item, result, error)``
    in input order.

    Exceptions of the ``catch`` types are handed back as ``error`` (the item is then
    refused, the others proceed); any other exception is raised when its item is
    reached, after cancelling the items not started yet. ``len()`` is the item count,
    so a progress bar knows its total.
    """

    def __init__(self, fn: Callable[[T], R], items: Sequence[T], *, workers: int = 1,
                 catch: tuple[type[BaseException], ...] = (Exception,)):
        self.fn = fn
        self.items = list(items)
        self.workers = max(1, int(workers))
        self.catch = catch

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[tuple[T, R | None, BaseException | None]]:
        if self.workers == 1 or len(self.items) <= 1:
            for item in self.items:
                try:
                    yield item, self.fn(item), None
                except self.catch as exc:
                    yield item, None, exc
            return
        pool = ThreadPoolExecutor(max_workers=min(self.workers, len(self.items)),
                                  thread_name_prefix="fedbip-download")
        try:
            futures: list[Future] = [pool.submit(self.fn, item) for item in self.items]
            for item, future in zip(self.items, futures, strict=True):
                try:
                    yield item, future.result(), None
                except self.catch as exc:
                    yield item, None, exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# -- the staging area ----------------------------------------------------------------------
@dataclass
class _StagedEntry:
    module: str
    path: Path
    dense: bool


@dataclass
class StagingStats:
    """What the staging moved: bytes and seconds, written and read back."""

    bytes_written: int = 0
    write_seconds: float = 0.0
    bytes_read: int = 0
    read_seconds: float = 0.0
    files: int = 0

    def to_json(self) -> dict:
        return {"bytes_written": self.bytes_written, "bytes_read": self.bytes_read,
                "write_seconds": round(self.write_seconds, 4),
                "read_seconds": round(self.read_seconds, 4), "files": self.files}


def write_staged(path: Path, tensors: dict[str, torch.Tensor], module: str) -> int:
    """Write one staged module (safetensors); returns the bytes written."""
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path),
              metadata={"module": module})
    return path.stat().st_size


class _SpillFolder:
    """The staging folder and its counters, shared by the area and its adapters (no
    reference cycle: the folder goes as soon as the last of them is dropped)."""

    def __init__(self, parent: str | Path | None):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="fedbip-staging-", dir=parent))
        self.stats = StagingStats()
        self.lock = threading.Lock()
        self.finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)

    def write(self, path: Path, tensors: dict[str, torch.Tensor], module: str) -> None:
        start = time.perf_counter()
        size = write_staged(path, tensors, module)
        with self.lock:
            self.stats.write_seconds += time.perf_counter() - start
            self.stats.bytes_written += size
            self.stats.files += 1

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        tensors = load_file(str(path))
        with self.lock:
            self.stats.read_seconds += time.perf_counter() - start
            self.stats.bytes_read += path.stat().st_size
        return tensors


class StagingArea:
    """Per-target on-disk staging of merged modules; a ``personalize`` sink.

    Args:
        n_targets: how many targets the merge produces.
        space: the merge space of the adapters (how ``save`` folds the scale).
        root: the parent folder (default: $FEDBIP_STAGING_DIR, else the temp dir).

    The folder holds at most the K outputs' bytes; each target's files go as soon as
    its adapter is saved, and the whole folder when the area is closed, or when the
    area and its adapters are all dropped.
    """

    def __init__(self, n_targets: int, *, space: Space = "delta",
                 root: str | Path | None = None):
        self._folder = _SpillFolder(root or os.environ.get(STAGING_ENV) or None)
        self.adapters = [StagedAdapter(self._folder, index, space)
                         for index in range(n_targets)]

    @property
    def root(self) -> Path:
        return self._folder.root

    @property
    def stats(self) -> StagingStats:
        return self._folder.stats

    def __call__(self, index: int, result: MergedModule) -> None:
        """The sink: spill one target's merged module to disk."""
        adapter = self.adapters[index]
        folder = self.root / f"{index:06d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{len(adapter.entries):06d}.safetensors"
        if result.factors is not None:
            tensors = {"u": result.factors[0], "v": result.factors[1]}
            adapter.discarded_energy[result.module] = result.discarded_energy
        else:
            assert result.dense is not None
            tensors = {"dense": result.dense}
        self._folder.write(path, tensors, result.module)
        adapter.entries.append(_StagedEntry(result.module, path, result.factors is None))

    def close(self) -> None:
        """Remove the staging folder (idempotent)."""
        self._folder.finalizer()

    def __enter__(self) -> StagingArea:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class StagedAdapter:
    """One target's merged adapter on disk, with ``MergedAdapter``'s round-facing API."""

    folder: _SpillFolder = field(repr=False)
    index: int = 0
    space: Space = "delta"
    entries: list[_StagedEntry] = field(default_factory=list)
    discarded_energy: dict[str, float] = field(default_factory=dict)
    released: bool = False

    @property
    def max_discarded_energy(self) -> float:
        return max(self.discarded_energy.values(), default=0.0)

    def load(self) -> MergedAdapter:
        """The adapter in memory (this target only), modules in merge order."""
        if self.released:
            raise RuntimeError(f"staged adapter {self.index} was already saved and freed")
        merged = MergedAdapter(space=self.space, discarded_energy=dict(self.discarded_energy))
        for entry in self.entries:
            tensors = self.folder.read(entry.path)
            if entry.dense:
                merged.dense[entry.module] = tensors["dense"]
            else:
                merged.modules[entry.module] = (tensors["u"], tensors["v"])
        return merged

    def save(self, folder: str | Path, template: LoraAdapterConfig) -> Path:
        """Write the PEFT adapter, then free this target's staging files."""
        out = self.load().save(folder, template)
        self.release()
        return out

    def release(self) -> None:
        for entry in self.entries:
            entry.path.unlink(missing_ok=True)
        self.released = True
