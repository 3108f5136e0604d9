"""Parse JSON that a member controls, within bounds: size, nesting depth, number sizes.

Every member-controlled JSON file (``fedbip_upload.json``, ``adapter_config.json``,
``fedbip_start.json``, ``members/<name>.json``, safetensors headers) goes through
:func:`loads_bounded`, so a hostile file fails with one clear ``JsonLimitError`` instead of
a ``RecursionError`` deep in the round, an ``OverflowError`` when an integer meets a float,
or a NaN slipping into the maths.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: every honest count, offset or rank fits
KIB = 1024


class JsonLimitError(ValueError):
    """JSON that is malformed or outside the bounds; the message says which and why."""


def _parse_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise JsonLimitError(f"an integer has {len(digits)} digits (at most "
                             f"{MAX_INT_DIGITS} are accepted)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"the number {text[:40]} is too large for a float")
    return value


def _parse_constant(text: str) -> float:
    raise JsonLimitError(f"{text} is not a JSON number")


def loads_bounded(raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for untrusted input.

    Args:
        raw: the file's content.
        max_bytes: the largest accepted size.
        max_depth: the deepest accepted nesting of arrays and objects.

    Raises:
        JsonLimitError: the text is not JSON, too large, too deep, holds an integer of
            more than 20 digits, a non-finite number or NaN/Infinity.
    """
    size = len(raw)
    if size > max_bytes:
        raise JsonLimitError(f"it is {size} bytes, over the limit of {max_bytes} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_parse_constant)
    except JsonLimitError:
        raise
    except RecursionError as exc:  # the C scanner's own guard, before ours can run
        raise JsonLimitError(f"it is nested deeper than {max_depth} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonLimitError(f"it is not valid JSON ({_first_line(exc)})") from exc
    if _depth_exceeds(value, max_depth):
        raise JsonLimitError(f"it is nested deeper than {max_depth} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
