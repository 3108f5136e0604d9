"""Keep tokens out of everything we print or write."""

from __future__ import annotations

import os
import re
from typing import Any

# Hub tokens start with hf_; also catch bearer headers and the token in the environment.
_TOKEN_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{8,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]+"),
)
REDACTED = "***"


def _known_tokens() -> list[str]:
    tokens = [os.environ.get(name, "") for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    return [t for t in tokens if len(t) >= 6]


def redact(value: Any) -> Any:
    """Replace anything token-like in a string (other values pass through)."""
    if not isinstance(value, str):
        return value
    for token in _known_tokens():
        value = value.replace(token, REDACTED)
    for pattern in _TOKEN_PATTERNS:
        value = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, value)
    return value
