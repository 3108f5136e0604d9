"""Changing a federation's strategy after ``fedbip init``: one commit of
``federation.json`` (``fedbip strategy``). The next round sees the merge settings changed
and re-merges every member (``fedbip_hub.federation.settings``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.client import commit_with_retry
from fedbip_hub.federation.config import FEDERATION_FILE, FederationConfig, dump_json
from fedbip_hub.federation.repo import Federation
from fedbip_hub.federation.settings import changed_settings, merge_settings


@dataclass(frozen=True)
class StrategyUpdate:
    """The strategy as stored now, the merge settings it changes (setting → [before,
    now]) and the commit (None: the options changed nothing, nothing was committed)."""

    strategy: dict[str, Any]
    changes: dict[str, list[Any]]
    commit: str | None


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs: each value read as JSON when it is JSON (numbers, true, null,
    lists, objects), else as a string (``rule=zscore``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{pair!r} is not key=value.",
                              hint="Pass options as e.g. rank=16 self_share=0.5 "
                              "rule=zscore (null sets an option back to its default).")
        try:
            options[key.strip()] = json.loads(text)
        except ValueError:
            options[key.strip()] = text
    return options


def updated_strategy(config: FederationConfig, options: Mapping[str, Any]) -> dict[str, Any]:
    """``config``'s stored strategy with ``options`` set (None: back to the default),
    refused (ConfigError naming the option) unless the Strategy validates it and a round
    could run it (the oracle needs its groups)."""
    from fedbip_hub.engine.strategies import Strategy

    merged = {**config.strategy, **options}
    stored = {key: value for key, value in merged.items() if value is not None}
    method = stored.pop("method", "fedbip-l")
    Strategy.parse(method, **stored)  # readable errors, with near matches
    candidate = config.model_copy(update={"strategy": {"method": method, **stored}})
    candidate.runnable_strategy()
    return candidate.strategy


def set_strategy_options(fed: Federation, options: Mapping[str, Any]) -> StrategyUpdate:
    """Commit ``federation.json`` with the strategy ``options`` set, on the head it read
    (re-read on a lost race); nothing is committed when they change nothing.

    Raises:
        ConfigError: an unknown option, or a value the Strategy refuses.
    """
    if not options:
        raise ConfigError("no strategy option given.",
                          hint="Pass options as e.g. rank=16 self_share=0.5 rule=zscore.")
    result: dict[str, Any] = {}

    def build(head: str) -> dict[str, bytes]:
        config = fed.config(head)
        strategy = updated_strategy(config, options)
        new = config.model_copy(update={"strategy": strategy})
        result.update(strategy=strategy, before=config)
        if strategy == config.strategy:
            raise _Unchanged
        return {FEDERATION_FILE: dump_json(new)}

    try:
        commit = commit_with_retry(fed, fed.repo_id, build, "fedbip: set strategy options "
                                   f"{', '.join(sorted(options))}")
    except _Unchanged:
        commit = None
    before: FederationConfig = result["before"]
    after = before.model_copy(update={"strategy": result["strategy"]})
    return StrategyUpdate(result["strategy"],
                          changed_settings(_settings(before), merge_settings(after)), commit)


def _settings(config: FederationConfig) -> dict[str, Any] | None:
    try:
        return merge_settings(config)
    except ConfigError:  # the stored strategy was broken: everything is a change
        return None


class _Unchanged(Exception):
    """The options leave the strategy as it is: nothing to commit."""
