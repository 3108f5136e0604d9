"""`fedbip status`'s member table: refusal and guard reasons in full, within 100 columns."""

from __future__ import annotations

from rich.console import Console

from cli.federation import status_table

REFUSAL = ("adapter_model.bin is a pickle-format file, which the server never loads (fix: "
           "run `fedbip push` again: it deletes stray weight files in the same commit)")
GUARD = "norm guard (clipped): task-vector norm 1.23e+03, robust z 9.4"


def _report() -> dict:
    upload = {"uploaded_at": "2026-12-01T11:32:02+00:00"}
    members = [
        {"name": "alice", "refused": True, "refusal": REFUSAL, "personalized_versions": 2},
        {"name": "bob-with-a-rather-long-member-name", "last_upload": upload,
         "pending": False, "personalized_versions": 3, "staleness": 0},
        {"name": "carol", "last_upload": upload, "pending": True, "personalized_versions": 0},
    ]
    return {"members": members,
            "last_round": {"guards": {"bob-with-a-rather-long-member-name": GUARD}}}


def _render(width: int) -> str:
    console = Console(width=width, record=True, force_terminal=False)
    with console.capture() as captured:
        console.print(status_table(_report()))
    return captured.get()


def _column(text: str, index: int) -> str:
    """One column's text, its wrapped lines joined, without whitespace."""
    cells = [line.split("│") for line in text.splitlines() if line.startswith("│")]
    return "".join("".join(row[index].split()) for row in cells)


def test_reasons_are_shown_whole_and_the_table_fits_100_columns():
    text = _render(100)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    why = _column(text, -2)
    assert "".join(REFUSAL.split()) in why  # the refusal, whole (wrapped, never cut)
    assert "".join(GUARD.split()) in why  # what the guard did to bob
    assert "bob-with-a-rather-long-member-name" in _column(text, 1)
    flat = "".join(text.split())
    assert "2026-12-0111:32" in flat and "…" not in text  # timestamps whole
    assert [w for w in ("refused", "consumed", "pending") if w in text] == [
        "refused", "consumed", "pending"]


def test_a_narrow_terminal_wraps_rather_than_cuts():
    text = _render(80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "".join(REFUSAL.split()) in _column(text, -2)
