"""What every stage of a round legitimately needs, passed to each explicitly: the
federation and its store, the round's options, the log/progress/checkpoint callbacks, the
Hub call counter and the phase clock. Nothing a stage computes for a later one lives here:
that travels in the stages' results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedbip_hub.federation.repo import Federation
from fedbip_hub.server.streaming import DEFAULT_DOWNLOAD_WORKERS
from fedbip_hub.stores import Store

ProgressFn = Callable[[Iterable[Any], str], Iterable[Any]]
LogFn = Callable[[str], None]


def quiet_progress(items: Iterable[Any], _description: str) -> Iterable[Any]:
    return items


class PhaseClock:
    """The round's phase timings: ``lap`` charges the time since the previous lap to a
    phase; ``timings`` adds the total since the round began."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._started = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self._last, 4)
        self._last = now

    def timings(self) -> dict[str, float]:
        """The phases measured so far, and the total since the round began."""
        return {**self.phases, "total": round(time.perf_counter() - self._started, 4)}


@dataclass(frozen=True)
class RoundContext:
    """One run of a round: the federation, the options (see ``RoundRunner``) and the
    callbacks, the store's traffic when the run began, and the phase clock."""

    fed: Federation
    dry_run: bool = False
    takeover: bool = False
    device: str = "cpu"
    groups: Mapping[str, str] | None = None
    streaming: bool = True
    download_workers: int = DEFAULT_DOWNLOAD_WORKERS
    progress: ProgressFn = quiet_progress
    log: LogFn = lambda _msg: None
    checkpoint: Callable[[str], None] = lambda _step: None
    clock: PhaseClock = field(default_factory=PhaseClock)
    traffic_start: dict[str, int] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return self.fed.store

    def hub_calls(self) -> dict[str, int]:
        """The API calls and file downloads this round has made so far (the Hub's rate
        limits count these; a local store makes none)."""
        now, start = self.store.traffic.snapshot(), self.traffic_start
        return {key: now[key] - start.get(key, 0) for key in ("api_calls", "downloads")}
