"""``fedbip demo``: a whole federation, offline, on a local folder, with a tiny model.

Synthetic conflicting tasks (``tasks``), a small pre-trained base model (``base_model``),
the methods compared (``methods``), one federation per method through the real client
and server code (``scenario``), AUC (``metrics``) and the results' summaries
(``results``), and rich tables (``report``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
HEATMAP_FILE = "similarity.png"


def demo_config(*, quick: bool = False, seed: int = 0):
    """The demo's scenario: 7 clients, 3 task groups, 4 rounds; ``quick``: 6 clients, 3
    rounds, fewer examples and a shorter pre-training (for the test suite)."""
    from fedbip_hub.demo.base_model import BaseModelSpec
    from fedbip_hub.demo.scenario import ScenarioConfig

    if not quick:
        return ScenarioConfig(seed=seed)
    return ScenarioConfig(
        groups=("low", "low", "even", "even", "marked", "marked"), n_train=32, n_test=100,
        rounds=3, late={2: ("even-2",)}, seed=seed,
        base=BaseModelSpec(steps=150, seed=seed))


def run_demo(root: str | Path, *, quick: bool = False, seed: int = 0,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every method on the demo scenario; write ``results.json`` and ``similarity.png``
    into ``root`` and return the results."""
    from fedbip_hub.demo.methods import default_methods
    from fedbip_hub.demo.scenario import Scenario

    root = Path(root)
    scenario = Scenario(demo_config(quick=quick, seed=seed), root, log=log)
    results = scenario.run(default_methods(paper_variant=not quick))
    results["quick"] = quick
    heatmap = write_heatmap(results, root / HEATMAP_FILE)
    results["files"] = {"heatmap": str(heatmap), "results": str(root / RESULTS_FILE),
                        "federations": str(root / "runs")}
    (root / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def write_heatmap(results: dict[str, Any], path: Path, method: str = "fedbip-l") -> Path:
    """Round-1 task-vector cosines (model and per layer) beside the raw-parameter cosines."""
    import torch

    from fedbip_hub.federation.plotting import save_heatmap

    everyone = [c["name"] for c in results["clients"]]
    rounds = [r for r in results["methods"][method]["rounds"] if r.get("cosine") is not None]
    # the first round every client is in (a late client misses its round), else the first
    first = next((r for r in rounds if set(r["clients"]) == set(everyone)), rounds[0])
    names = [n for n in everyone if n in first["clients"]]

    def pick(matrix: list[list[float]], clients: list[str]) -> torch.Tensor:
        """The rows and columns of ``names``, in that order."""
        keep = [clients.index(n) for n in names]
        return torch.tensor(matrix, dtype=torch.float64)[keep][:, keep]

    panels = {f"task vectors, model (round {first['round']})":
              pick(first["cosine"], first["clients"])}
    raw = results["similarity"].get("raw_parameters_round1")
    if raw:
        panels["raw parameters, base + ΔW (round 1)"] = pick(raw["cosine"], raw["clients"])
    for layer, matrix in (first.get("layer_cosine") or {}).items():
        panels[f"task vectors, {layer}"] = pick(matrix, first["clients"])
    return save_heatmap(panels, names, path, keep_first=len(panels) - len(
                            first.get("layer_cosine") or {}),
                        title="Cosine similarity between clients: task vectors vs raw "
                        "parameters",
                        source=f"round {first['round']}'s cosines (not the similarity "
                        "memory)")
