"""PEFT's rank_pattern / alpha_pattern lookup, for keys a member controls, in linear time.

PEFT matches each key as a regex: ``re.match(rf"(.*\\.)?({key})$", module_name)``, first
key (in insertion order) wins. A hostile key such as ``(.|.)*Z`` backtracks for
minutes, so a key is accepted only if it is a plain module name or suffix: literal
characters, ``\\``-escaped characters (what ``re.escape`` writes) and ``.`` (PEFT users
write ``layers.0.self_attn.q_proj``; there ``.`` is a regex wildcard and stays one).
No key then has a quantifier, alternation, group or class, so it matches a fixed number
of characters and the lookup is exact and linear: the key can only match the module
name's last ``len(key)`` characters, and what precedes them must be empty or end with
a dot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_KEY_LENGTH = 1024
MAX_KEYS = 4096
# Keys with a wildcard '.' are tried one by one; literal keys (what re.escape and our own
# writer produce) are looked up by hash, so only the former need a small bound.
MAX_WILDCARD_KEYS = 64
_SPECIAL = set(".^$*+?{}[]|()\\")
KEY_RULE = ("a plain module name or suffix, such as 'q_proj' or "
            "'model.layers.0.self_attn.q_proj' (letters, digits, '_', '-', '.' and "
            "characters escaped with a backslash; no *, +, ?, |, (), [] or {})")


class PatternKeyError(ValueError):
    """A pattern key outside the accepted grammar."""


@dataclass(frozen=True)
class ParsedKey:
    """A key of the accepted grammar: how many characters it matches, and the literal
    text it matches when it has no wildcard."""

    length: int
    literal: str | None


def parse_key(key: str) -> ParsedKey:
    """Parse a key of the accepted grammar.

    Raises:
        PatternKeyError: the key is not a plain module name or suffix.
    """
    if not key:
        raise PatternKeyError("an empty pattern key")
    if len(key) > MAX_KEY_LENGTH:
        raise PatternKeyError(f"a pattern key of {len(key)} characters (at most "
                              f"{MAX_KEY_LENGTH})")
    chars: list[str] = []
    wildcard, i = False, 0
    while i < len(key):
        char = key[i]
        if char == "\\":
            escaped = key[i + 1] if i + 1 < len(key) else ""
            # \d, \w, \1, \A... are classes or references, not characters
            if not escaped or (escaped.isascii() and escaped.isalnum()):
                raise PatternKeyError(f"pattern key {_shown(key)} uses the regex escape "
                                      f"\\{escaped}; only {KEY_RULE} is accepted")
            chars.append(escaped)
            i += 2
            continue
        if char == ".":
            wildcard = True
        elif char in _SPECIAL:
            raise PatternKeyError(f"pattern key {_shown(key)} uses the regex operator "
                                  f"{char!r}; only {KEY_RULE} is accepted")
        chars.append(char)
        i += 1
    return ParsedKey(len(chars), None if wildcard else "".join(chars))


def _shown(key: str) -> str:
    return repr(key if len(key) <= 60 else key[:57] + "...")


@dataclass(frozen=True)
class _Wildcard:
    index: int
    key: str
    length: int
    regex: re.Pattern[str]  # quantifier-free: fullmatch is linear in its length


class PatternTable:
    """A validated rank_pattern or alpha_pattern, looked up like PEFT's ``get_pattern_key``.

    Raises:
        PatternKeyError: a key is not a plain module name or suffix, or there are too many.
    """

    def __init__(self, patterns: Mapping[str, Any]):
        if len(patterns) > MAX_KEYS:
            raise PatternKeyError(f"{len(patterns)} pattern keys (at most {MAX_KEYS})")
        self.values = dict(patterns)
        self._keys = list(self.values)
        self._literal: dict[str, int] = {}  # matched text → index of the first such key
        self._wildcards: list[_Wildcard] = []
        for index, key in enumerate(self._keys):
            parsed = parse_key(key)
            if parsed.literal is None:
                self._wildcards.append(_Wildcard(index, key, parsed.length, re.compile(key)))
            else:
                self._literal.setdefault(parsed.literal, index)
        if len(self._wildcards) > MAX_WILDCARD_KEYS:
            raise PatternKeyError(
                f"{len(self._wildcards)} pattern keys with an unescaped '.' (at most "
                f"{MAX_WILDCARD_KEYS}); escape the dots (re.escape) or use fewer keys")

    def key_for(self, module_name: str) -> str | None:
        """The first key matching ``module_name`` as PEFT matches it, or None."""
        # ``$`` also matches before a final newline; ``.`` (and ``.*``) never match one.
        ends = [len(module_name)]
        if module_name.endswith("\n"):
            ends.append(len(module_name) - 1)
        newline = module_name.find("\n")
        head = module_name if newline < 0 else module_name[:newline]
        starts = [0, *(m.end() for m in re.finditer(r"\.", head))]
        best = len(self._keys)
        for end in ends:
            for start in starts:
                if start <= end:
                    best = min(best, self._literal.get(module_name[start:end], best))
        for entry in self._wildcards:
            if entry.index >= best:
                break
            if any(self._wildcard_matches(entry, module_name, end) for end in ends):
                best = entry.index
                break
        return self._keys[best] if best < len(self._keys) else None

    @staticmethod
    def _wildcard_matches(entry: _Wildcard, module_name: str, end: int) -> bool:
        start = end - entry.length
        if start < 0:
            return False
        prefix = module_name[:start]
        if prefix and (prefix[-1] != "." or "\n" in prefix):
            return False
        return entry.regex.fullmatch(module_name, start, end) is not None

    def value_for(self, module_name: str) -> Any | None:
        key = self.key_for(module_name)
        return None if key is None else self.values[key]
