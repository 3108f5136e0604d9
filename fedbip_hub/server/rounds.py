"""One asynchronous server round (ALGORITHM.md §5), as a pipeline of stages. Each stage
is a function of the previous stage's immutable result (frozen dataclasses / pydantic
models) and a ``RoundContext`` (the federation, the options, the log/progress/checkpoint
callbacks, the Hub call counter and the phase clock); ``runner.run_stages`` chains them:

1. plan (``lease.take_lease``; members scanned by ``scan.scan_members``) → ``Planned``:
   the ``RoundPlan`` (every input pinned to a commit) committed as the lease, or
   ``NothingNew``. Changed merge settings (``federation.settings``) re-merge every
   input; with nothing fresh, the last round is replayed (``replay``). Checkpoint
   "planned".
2. collect (``collect.collect``; one input by ``vectors.read_input``) → ``Collected``:
   each input's task vector, what the gate refused, and why the others sit out.
   Checkpoint "downloaded".
3. similarity (``similarity_stage.similarity``) → ``Similarity``: the cosines.
4. guards (``guards.duplicates``, ``guards.screen_norms``; then the similarity memory,
   ``similarity_stage.remember`` → ``Remembered``, and ``guards.screen_signs``) →
   ``Screened``: the inputs kept, their scales, the guards' verdicts.
5. weights (``weights.weigh``) → ``Weighed``: the weight matrices, contributions and
   the targets the merge changes.
6. merge (``merge_stage.merge``) → ``Merged``: each target's adapter (staged on disk
   when streaming). Stages 3-6 run in ``compute.compute`` → ``Computed``, which drops
   the clients that make the maths fail and runs it again. Checkpoint "computed".
7. publish (``publish.publish_all``) → ``Published``: each member's output, the failed
   publishes. Checkpoint "published:<client>" after each.
8. record (``record.round_record``, then ``record.complete``) → the round record,
   committed with the new state in one commit. Checkpoint "before-record".

Crash safety: the plan is committed into ``state.json`` as a lease before any output is
written. Each published adapter carries the plan id in ``personalized/fedbip_merge.json``,
so a re-run resumes the same plan, skips clients it already published, and never applies
an update twice. The round ends with one commit of the record and the new state.

Exclusivity: taking the lease (a new plan, or a takeover of a dead job's plan) is a commit
with the head it read as parent, so of concurrent jobs exactly one holds it; a job checks
that it still holds it before each write, and publishes to a member repo on the head it
checked for this plan's adapter, so each member gets one publish per plan whatever runs
at the same time.

This module keeps the round's public names where callers import them.
"""

from __future__ import annotations

from fedbip_hub.server.context import LogFn, ProgressFn, RoundContext
from fedbip_hub.server.plan import PinnedInput, RoundPlan, read_lease
from fedbip_hub.server.publish import MAX_MERGE_RECORD_BYTES
from fedbip_hub.server.runner import RoundRunner, run_round
from fedbip_hub.server.scan import waiting_reason
from fedbip_hub.server.vectors import ADAPTER_FILES
from fedbip_hub.server.weights import changed_targets, staleness_discount

__all__ = ["ADAPTER_FILES", "MAX_MERGE_RECORD_BYTES", "LogFn", "PinnedInput", "ProgressFn",
           "RoundContext", "RoundPlan", "RoundRunner", "changed_targets", "read_lease",
           "run_round", "staleness_discount", "waiting_reason"]
