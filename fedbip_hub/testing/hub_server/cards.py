"""The Hub's model-card metadata check (`/api/validate-yaml`), for the one rule fedbip's
cards could break: `base_model` must name models by id, never by path.
"""

from __future__ import annotations

import itertools
import re

from fedbip_hub.testing.hub_server.transport import _json_response, _Request, _Response

_MODEL_ID = re.compile(r"(?:[\w\-.]+/)?[\w\-.]{1,96}")


def _card_base_models(content: str) -> list[str]:
    """The ``base_model`` values of a card's YAML front matter (a scalar or a block list;
    the standard library has no YAML parser, and the cards' writer emits only these)."""
    lines = content.splitlines()
    if not lines or lines[0].strip() != "---":
        return []
    front = list(itertools.takewhile(lambda line: line.strip() != "---", lines[1:]))
    values: list[str] = []
    for i, line in enumerate(front):
        if not line.startswith("base_model:"):
            continue
        scalar = line.partition(":")[2].strip().strip("'\"")
        if scalar:
            return [scalar]
        for item in front[i + 1:]:
            if not item.lstrip().startswith("- "):
                break
            values.append(item.lstrip()[2:].strip().strip("'\""))
    return values


class CardChecks:
    """`HubServer`'s validate-yaml route."""

    def _validate_yaml(self, request: _Request) -> _Response:
        """The Hub's check of a model card's metadata, for the one rule fedbip's cards
        could break: ``base_model`` must name models by id, never by path."""
        body = request.json()
        errors = [{"message": f'"base_model" with value "{value}" is not valid. Use a model '
                              "id from https://hf.co/models."}
                  for value in _card_base_models(str(body.get("content") or ""))
                  if not _MODEL_ID.fullmatch(value) or ".." in value or "--" in value]
        return _json_response({"errors": errors, "warnings": []}, 400 if errors else 200)
