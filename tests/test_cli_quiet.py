"""A model-loading command says only what fedbip has to say: no load reports, progress
bars, FutureWarnings or ANSI codes in a file, unless --verbose (which lets them through:
the check below has something to catch)."""

from __future__ import annotations

import pytest
from federation_helpers import new_local_federation, run_cli

CHATTER = ("LOAD REPORT", "Loading weights", "FutureWarning", "Generating train split",
           "it/s]")


@pytest.mark.slow
def test_eval_is_quiet_unless_verbose(tmp_path, tiny_base):
    fed = new_local_federation(tmp_path, tiny_base, push_all=False)
    data = tmp_path / "data.jsonl"
    data.write_text('{"input_ids": [1, 2], "label": 0}\n{"input_ids": [3], "label": 1}\n')
    args = ["eval", str(fed.address), "--client", "alice", "--data", str(data),
            "--device", "cpu"]
    quiet = run_cli(args, {"FEDBIP_VERBOSE": ""})
    loud = run_cli(["--verbose", *args], {})
    said = quiet.stdout + quiet.stderr
    assert not [c for c in CHATTER if c in said], quiet.stderr
    assert "\x1b[" not in said  # no ANSI codes into a file or pipe
    assert "personalized" in quiet.stdout  # the command's own output is all there
    assert [c for c in CHATTER if c in loud.stderr], loud.stderr
