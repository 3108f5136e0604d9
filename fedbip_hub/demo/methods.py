"""The rows of the demo's comparison: each method's label and the strategy its federation
runs (the baselines, FedBip and FedBip-L, the paper's variant, the oracle)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedbip_hub.engine.strategies import Strategy


@dataclass(frozen=True)
class Method:
    """A row of the comparison: a label and the strategy its federation runs."""

    label: str
    strategy: Strategy
    description: str = ""


# The FedBip weighting the demo and the benchmark use: the project's default (the evidence
# rule, see fedbip_hub/engine/weighting.py). The paper's row normalisation is run beside it.
FEDBIP_OPTIONS: dict[str, Any] = {"rule": "evidence"}


def default_methods(fedbip_options: Mapping[str, Any] | None = None, *,
                    paper_variant: bool = True) -> list[Method]:
    """Local, FedIT, FedAvg, uniform, FedBip, FedBip-L (and the paper's normalisation),
    and the oracle."""
    options = dict(FEDBIP_OPTIONS if fedbip_options is None else fedbip_options)
    methods = [
        Method("local", Strategy(method="local"), "each client keeps its own update"),
        Method("fedit", Strategy(method="fedit"), "FedAvg of A and B (data-size weights)"),
        Method("fedavg", Strategy(method="fedavg"), "FedAvg in ΔW space, exact"),
        Method("uniform", Strategy(method="uniform"), "1/K over all clients"),
        Method("fedbip", Strategy(method="fedbip", **options), "model-level task vectors"),
        Method("fedbip-l", Strategy(method="fedbip-l", **options), "per-layer task vectors"),
    ]
    if paper_variant and options.get("rule", "normalize") != "normalize":
        methods.append(Method("fedbip-l-paper",
                              Strategy(method="fedbip-l", rule="normalize",
                                       similarity_memory=0),
                              "per-layer, the paper's row normalisation of this round's "
                              "cosines"))
    methods.append(Method("oracle", Strategy(method="oracle"),
                          "uniform within the true task group"))
    return methods
