"""The bounds on what a member controls, piece by piece: JSON, pattern keys, names,
data-size weights with a cap on any one client's share."""

from __future__ import annotations

import itertools
import json
import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

from fedbip_hub.adapters.config import LoraAdapterConfig
from fedbip_hub.adapters.patterns import MAX_WILDCARD_KEYS, PatternKeyError, PatternTable, parse_key
from fedbip_hub.engine.weighting import size_weights
from fedbip_hub.errors import AdapterError
from fedbip_hub.identity import MAX_CLIENT_NAME, client_name_problem, repo_id_problem
from fedbip_hub.safe_json import JsonLimitError, loads_bounded


# -- JSON ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "phrase"), [
    (b"[" * 5000 + b"]" * 5000, "nested deeper than 32 levels"),
    (b"[" * 40 + b"]" * 40, "nested deeper than 32 levels"),
    (b'{"n": 1' + b"0" * 400 + b"}", "an integer has 401 digits"),
    (b'{"n": 1' + b"0" * 5000 + b"}", "an integer has 5001 digits"),
    (b'{"a": 1e400}', "too large for a float"),
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"a": ', "not valid JSON"),
    (b" " * 20_000, "over the limit of 10000 bytes"),
])
def test_hostile_json_is_refused_with_a_reason(raw, phrase):
    with pytest.raises(JsonLimitError, match=re.escape(phrase)):
        loads_bounded(raw, max_bytes=10_000)


def test_honest_json_reads_as_json_does():
    raw = json.dumps({"a": [1, 2.5, {"b": None, "c": "x" * 50}], "n": 2**63}).encode()
    assert loads_bounded(raw, max_bytes=len(raw)) == json.loads(raw)
    nested = b"[" * 32 + b"]" * 32
    assert loads_bounded(nested, max_bytes=100) == json.loads(nested)


# -- pattern keys -------------------------------------------------------------------------
def _peft(keys: list[str], name: str) -> str | None:
    """The key PEFT picks for ``name``, None when none matches (PEFT then returns the
    name itself, which its callers' .get() does not find)."""
    first = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)
    if first is not None:
        assert get_pattern_key(keys, name) == first
    return first


_ATOMS = ["a", "b", "q", "_", "0", ".", "\\.", "\\\n", "\n", "\\-", "-", "é"]
_KEYS = st.lists(st.sampled_from(_ATOMS), min_size=1, max_size=6).map("".join)
_NAMES = st.lists(st.sampled_from(["a", "b", "q", "_", "0", ".", "\n", "-", "é"]),
                  max_size=10).map("".join)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_KEYS, min_size=1, max_size=4, unique=True), _NAMES)
def test_pattern_lookup_is_peft_s_for_every_accepted_key(keys, name):
    assert PatternTable(dict.fromkeys(keys, 1)).key_for(name) == _peft(keys, name)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj",
                                  "model.layers.10.self_attn.v_proj", "q_proj", "xq_proj"])
def test_pattern_lookup_on_real_module_names(name):
    keys = [re.escape("model.layers.10.self_attn.v_proj"), "layers.0.self_attn.q_proj",
            "v_proj", "q_proj"]
    assert PatternTable(dict.fromkeys(keys, 1)).key_for(name) == _peft(keys, name)


@pytest.mark.parametrize("key", ["(.|.)*Z", "a*", "a+", "a?", "a|b", "[ab]", "a{2}", "^a",
                                 "a$", r"\d", r"\w+", "\\", "(a)", ""])
def test_regex_operators_are_refused(key):
    with pytest.raises(PatternKeyError):
        parse_key(key)


def test_a_backtracking_key_is_refused_in_a_config_at_once():
    started = time.perf_counter()
    with pytest.raises(AdapterError, match="malformed rank_pattern") as info:
        LoraAdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                     "rank_pattern": {"(.|.)*Z": 4}})
    assert "plain module name" in info.value.hint
    assert time.perf_counter() - started < 1


def test_many_literal_keys_are_looked_up_fast_and_wildcard_keys_are_bounded():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2000)]
    table = PatternTable({re.escape(n): i for i, n in enumerate(names)})
    started = time.perf_counter()
    assert [table.value_for(n) for n in names] == list(range(2000))
    assert time.perf_counter() - started < 1
    with pytest.raises(PatternKeyError, match="escape the dots"):
        PatternTable({f"layers.{i}.q": 1 for i in range(MAX_WILDCARD_KEYS + 1)})


# -- names --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alice", "a", "client-7", "lab_2.gpu", "A" * MAX_CLIENT_NAME])
def test_valid_client_names(name):
    assert client_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "m" * 240, "../x", ".hidden", "-x", "a/b", "a b", "é",
                                  "a..b", "x.", "a\n", 7, None])
def test_invalid_client_names(name):
    assert client_name_problem(name)


@pytest.mark.parametrize(("repo_id", "ok"), [
    ("org/fed-alice", True), ("clients/alice", True), ("federation", True),
    ("a/b/c", False), ("org/" + "x" * 97, False), ("org/a--b", False), ("org/..", False),
    ("/x", False), ("org/", False), ("org/a b", False), ("org/é", False)])
def test_repo_ids(repo_id, ok):
    assert (repo_id_problem(repo_id) is None) == ok


# -- data-size weights --------------------------------------------------------------------
def _brute_capped(n: list[float], cap: float) -> list[float]:
    """min(c', λ·n_k) summing to 1, λ found by bisection (c' = max(c, 1/#positive))."""
    positive = [x for x in n if x > 0]
    cap = max(cap, 1 / len(positive))
    lo, hi = 0.0, 1.0
    while sum(min(cap, hi * x) for x in n) < 1 - 1e-12:  # (1/7)·7 < 1 in floats
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(min(cap, mid * x) for x in n) < 1 else (lo, mid)
    return [min(cap, hi * x) for x in n]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=7).filter(any),
       st.floats(0.05, 1.0))
def test_max_size_share_is_the_water_filling_solution(n, cap):
    weights = size_weights(n, max_share=cap)
    expected = torch.tensor(_brute_capped([float(x) for x in n], cap), dtype=torch.float64)
    for row in weights:
        torch.testing.assert_close(row, expected, rtol=0, atol=1e-9)
        assert float(row.max()) <= max(cap, 1 / sum(x > 0 for x in n)) + 1e-12


def test_max_size_share_per_row_over_the_allowed_peers():
    n = [10**9, 10, 10, 0]
    allowed = torch.tensor([[True, True, True, True], [False, True, False, False],
                            [True, True, True, False], [True, False, False, True]])
    weights = size_weights(n, allowed, max_share=0.5)
    for i, row in enumerate(weights):
        mask = allowed[i].clone()
        mask[i] = True
        peers = [x if m else 0 for x, m in zip(n, mask.tolist(), strict=True)]
        expected = (_brute_capped(peers, 0.5) if any(peers) else
                    [float(m) / int(mask.sum()) for m in mask.tolist()])
        torch.testing.assert_close(row, torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=1e-9)


def test_size_weights_without_a_cap_are_unchanged_and_huge_counts_are_safe():
    for n in ([5, 10, 0], [1, 1], [3]):
        ratios = torch.tensor(n, dtype=torch.float64) / sum(n)
        assert torch.equal(size_weights(n)[0], ratios)
    weights = size_weights([10**400, 10**400, 0])  # Python ints: divided exactly, no overflow
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        size_weights([float("inf"), 1.0])


def test_brute_force_reference_is_itself_right():
    assert _brute_capped([8, 1, 1], 0.5) == pytest.approx([0.5, 0.25, 0.25])
    assert _brute_capped([1, 0], 0.3) == pytest.approx([1.0, 0.0])
    for n, cap in itertools.product(([3, 1], [1, 2, 3]), (0.4, 0.9)):
        assert sum(_brute_capped(n, cap)) == pytest.approx(1)


def test_a_hostile_start_file_is_refused_with_a_reason(tmp_path):
    from fedbip_hub.errors import ConfigError
    from fedbip_hub.federation.client import START_FILE, read_start_revision

    (tmp_path / START_FILE).write_bytes(b'{"start_revision": ' + b"[" * 5000 + b"]" * 5000
                                        + b"}")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        read_start_revision(tmp_path)
    (tmp_path / START_FILE).write_text('["not", "an", "object"]')
    assert read_start_revision(tmp_path) is None
    (tmp_path / START_FILE).write_text(json.dumps({"start_revision": "a" * 40}))
    assert read_start_revision(tmp_path) == "a" * 40
