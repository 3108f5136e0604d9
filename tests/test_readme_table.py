"""The README's demo table is what the demo's results render to, never typed in: it must
equal the table rendered from the committed numbers (benchmarks/results/demo.json, which
`make readme-table` rewrites with the README after a demo run)."""

from __future__ import annotations

import json

from federation_helpers import REPO_ROOT

from fedbip_hub.demo.readme_table import (
    main,
    markdown_table,
    readme_block,
    replace_block,
    summary,
)

SUMMARY = REPO_ROOT / "benchmarks" / "results" / "demo.json"
README = REPO_ROOT / "README.md"


def test_the_readme_table_is_rendered_from_the_committed_results():
    results = json.loads(SUMMARY.read_text())
    assert not results["quick"]  # the full demo, as the README says
    assert readme_block(README.read_text()) == markdown_table(results), (
        "regenerate with `make readme-table`")


def test_the_table_follows_the_numbers(tmp_path):
    """Changing a result changes the table (so the check above has teeth), and the
    script rewrites only the block between the markers."""
    results = json.loads(SUMMARY.read_text())
    results["methods"]["fedbip-l"]["accuracy"] = 0.5
    table = markdown_table(results)
    row = next(line for line in table.splitlines() if "FedBip-L**" in line)
    assert "**50.0**" in row
    local = results["methods"]["local"]["accuracy"]
    assert f"**{100 * (0.5 - local):+.1f}**".replace("-", "−") in row
    assert summary(summary(results)) == summary(results)  # a summary renders the same

    source = tmp_path / "results.json"
    source.write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    text = replace_block(README.read_text(), "old")
    readme.write_text(text)
    assert main([str(source), "--readme", str(readme), "--check"]) == 1
    assert main([str(source), "--readme", str(readme), "--summary",
                 str(tmp_path / "demo.json")]) == 0
    new = readme.read_text()
    assert readme_block(new) == table
    assert new.replace(table, "old") == text  # nothing else changed
    assert main([str(source), "--readme", str(readme), "--check"]) == 0
    assert json.loads((tmp_path / "demo.json").read_text()) == summary(results)
