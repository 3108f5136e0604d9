"""A settings change with no fresh upload: the last completed round replayed under the
new settings.

The FedBip update only ever weighs fresh updates (ALGORITHM.md §5): with none, a new
weighting rule would change no adapter. So the round re-merges what the last round merged:
its inputs, pinned as its record lists them, each target onto the adapter that round
merged it onto (the replay's adapter replaces that round's), with the weights, guards,
similarity memory (as it stood before that round) and output settings of now. Nothing
is consumed twice: the replayed uploads are the ones that round consumed, and the
adapters they entered are replaced, not added to. A member that round did not include
(or whose input has changed since) is merged from its latest adapter and last consumed
upload, as any re-merge does. Members who left the federation are not replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedbip_hub.federation.config import FederationState
from fedbip_hub.server.context import RoundContext
from fedbip_hub.server.plan import PinnedInput
from fedbip_hub.server.scan import Scan


@dataclass(frozen=True)
class Replay:
    """The replay's inputs and the adapter each is merged onto (None: the initial
    adapter), the round it replays, and the federation revision whose similarity memory
    it starts from (the one that round started from)."""

    inputs: dict[str, PinnedInput]
    latest: dict[str, str | None]
    round: int
    memory_revision: str | None


def replay_last_round(ctx: RoundContext, head: str, state: FederationState, scan: Scan
                      ) -> Replay:
    """The last completed round's replay over ``scan``'s members. A round record that
    does not read stops the round before its lease, naming the file and how to restore
    it, as any broken federation file does (``Federation.round_record``)."""
    record = ctx.fed.round_record(state.round, head)
    replayed = record.get("replay") if isinstance(record.get("replay"), dict) else {}
    used = record.get("inputs") if isinstance(record.get("inputs"), dict) else {}
    outputs = record.get("outputs") if isinstance(record.get("outputs"), dict) else {}
    bases = record.get("latest") if isinstance(record.get("latest"), dict) else None
    inputs: dict[str, PinnedInput] = {}
    latest: dict[str, str | None] = {}
    for name, current in scan.inputs.items():
        history = [] if name in scan.restarted else state.client(name).personalized_history
        inputs[name] = _replayed_input(used.get(name), current) or current
        output = outputs.get(name)
        published = output.get("commit") if isinstance(output, dict) else None
        if published and history and history[-1] == published:
            # That round's adapter: merged again onto what that round merged it onto
            # (records from before "latest" was recorded: the version before).
            latest[name] = (bases.get(name) if bases is not None and name in bases
                            else (history[-2] if len(history) > 1 else None))
        else:  # that round left it as it was (or could not publish it)
            latest[name] = history[-1] if history else None
    return Replay(inputs, latest, int(replayed.get("round") or state.round),
                  replayed.get("memory_revision") or record.get("federation_revision"))


def _replayed_input(raw: Any, current: PinnedInput) -> PinnedInput | None:
    """The input the record lists, when it is still the member's last consumed one
    (``current``, from its state): anything else has moved on since."""
    if not isinstance(raw, dict) or current.fresh:
        return None
    try:
        pinned = PinnedInput.model_validate(
            {key: raw[key] for key in PinnedInput.model_fields if key in raw})
    except ValueError:
        return None
    if (pinned.client, pinned.upload_id, pinned.commit) != (
            current.client, current.upload_id, current.commit):
        return None
    return pinned
