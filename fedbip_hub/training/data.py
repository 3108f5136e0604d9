"""Local training data, tokenized and labelled for the federation's task (reading the
files is ``fedbip_hub.training.data_files``).

A prepared dataset has exactly two columns:

* ``input_ids``: a list of token ids, at most ``max_length`` long;
* ``labels``: the class id (SEQ_CLS), or one id per token with ``-100`` where no loss is
  taken (CAUSAL_LM: prompt tokens of a prompt/completion pair, everything but the
  assistant turns of a ``messages`` conversation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedbip_hub.errors import ConfigError

IGNORE_INDEX = -100
PROMPT_FIELD = "prompt"
COMPLETION_FIELD = "completion"
MESSAGES_FIELD = "messages"


def check_examples(ds: Any, *, task_type: str, num_labels: int | None = None,
                   text_field: str = "text", label_field: str = "label") -> None:
    """What ``prepare_dataset`` would refuse, found without a tokenizer or a model: the
    input column, and for SEQ_CLS every label (so a bad label costs no model load).

    Raises:
        ConfigError: a column is missing or a label is not a class id in range.
    """
    columns = list(ds.column_names)
    has_input = "input_ids" in columns or text_field in columns or (
        task_type == "CAUSAL_LM" and ({PROMPT_FIELD, COMPLETION_FIELD} <= set(columns)
                                      or MESSAGES_FIELD in columns))
    if not has_input:
        raise _no_input(columns, text_field, task_type)
    if task_type == "SEQ_CLS":
        _class_labels(ds, columns, label_field, num_labels)


def load_tokenizer(name_or_path: str, *, revision: str | None = None,
                   token: str | None = None) -> Any:
    """The base model's tokenizer (a Hub id or a local folder); ``token`` reaches the Hub
    download (None: HF_TOKEN or the stored login).

    Raises:
        ConfigError: there is none, with a hint to pre-tokenize.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, token=token)
    except Exception as exc:  # OSError, ValueError, and tokenizer-specific errors
        raise ConfigError(
            f"the base model {name_or_path!r} has no loadable tokenizer "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}).",
            hint="Give the data a pre-tokenized input_ids column, or add the tokenizer's "
            "files to the base model (tokenizer.save_pretrained).") from exc
    if getattr(tokenizer, "pad_token_id", None) is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- preparing ---------------------------------------------------------------------------
def needs_tokenizer(ds: Any, task_type: str, *, text_field: str = "text") -> bool:
    """Whether preparing ``ds`` for ``task_type`` would tokenize text."""
    columns = set(ds.column_names)
    if "input_ids" in columns:
        return False
    if task_type == "CAUSAL_LM" and {PROMPT_FIELD, COMPLETION_FIELD} <= columns:
        sample = ds[0][PROMPT_FIELD]
        return isinstance(sample, str)
    if task_type == "CAUSAL_LM" and MESSAGES_FIELD in columns:
        return True
    return text_field in columns


def prepare_dataset(ds: Any, *, task_type: str, tokenizer: Any = None, max_length: int = 128,
                    text_field: str = "text", label_field: str = "label",
                    num_labels: int | None = None) -> Any:
    """Tokenize and label ``ds`` for training or evaluation (see the module docstring).

    SEQ_CLS needs a label column (``label_field``, or ``labels``) holding class ids, and
    either ``input_ids`` or ``text_field`` plus a tokenizer. CAUSAL_LM takes ``input_ids``
    (with ``labels`` used as given when present), a ``prompt``/``completion`` pair (loss on
    the completion only: supervised fine-tuning; strings with a tokenizer, or lists of ids),
    ``messages`` (chat turns ``{"role", "content"}`` through the tokenizer's chat template,
    loss on the assistant turns only), or ``text_field``. ``input_ids`` may be lists of
    ints, or strings of them (CSV).

    Raises:
        ConfigError: a needed column is missing, a label is invalid, or text needs a
            tokenizer that was not given.
    """
    import datasets

    if task_type not in ("SEQ_CLS", "CAUSAL_LM"):
        raise ConfigError(f"unknown task type {task_type!r}.", hint="Use SEQ_CLS or CAUSAL_LM.")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, not {max_length}.",
                          hint="Pass e.g. --max-length 128.")
    columns = list(ds.column_names)
    if task_type == "SEQ_CLS":
        ids = _input_ids(ds, columns, tokenizer, max_length, text_field, task_type)
        labels = _class_labels(ds, columns, label_field, num_labels)
    elif "input_ids" in columns:
        ids = _input_ids(ds, columns, tokenizer, max_length, text_field, task_type)
        if "labels" in columns:
            labels = [list(map(int, row))[:max_length] for row in ds["labels"]]
            for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
                if len(a) != len(b):
                    raise ConfigError(f"example {i}: labels and input_ids differ in length.",
                                      hint="Give one label per token (-100 to skip it).")
        else:
            labels = [list(row) for row in ids]
    elif PROMPT_FIELD in columns and COMPLETION_FIELD in columns:
        ids, labels = _prompt_completion(ds, tokenizer, max_length)
    elif MESSAGES_FIELD in columns:
        ids, labels = _messages(ds[MESSAGES_FIELD], tokenizer, max_length)
    else:
        ids = _input_ids(ds, columns, tokenizer, max_length, text_field, task_type)
        labels = [list(row) for row in ids]
    if task_type == "CAUSAL_LM":
        keep = [i for i, row in enumerate(labels) if sum(t != IGNORE_INDEX for t in row[1:])]
        if not keep:
            raise ConfigError("no example has a token to predict (after truncation).",
                              hint="Raise --max-length, or check the prompt/completion data.")
        ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "labels": (datasets.Value("int64") if task_type == "SEQ_CLS"
                   else datasets.Sequence(datasets.Value("int64"))),
    })
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}, features=features)


def _no_input(columns: Sequence[str], text_field: str, task_type: str) -> ConfigError:
    sources = "input_ids or " + repr(text_field)
    if task_type == "CAUSAL_LM":
        sources += " or prompt/completion or messages"
    return _missing(sources, columns, f"Name the text column with --text-field (now "
                    f"{text_field!r}), or give pre-tokenized input_ids.")


def _missing(what: str, columns: Sequence[str], hint: str) -> ConfigError:
    return ConfigError(f"the data has no {what} column (it has {', '.join(columns) or 'none'}).",
                       hint=hint)


def _input_ids(ds: Any, columns: list[str], tokenizer: Any, max_length: int, text_field: str,
               task_type: str) -> list[list[int]]:
    if "input_ids" in columns:
        rows = [_parse_ids(row, i) for i, row in enumerate(ds["input_ids"])]
    elif text_field in columns:
        if tokenizer is None:
            raise ConfigError(f"the {text_field!r} column needs a tokenizer.",
                              hint="Give the base model a tokenizer, or pre-tokenize the data "
                              "into an input_ids column.")
        texts = ds[text_field]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"example {bad}: {text_field!r} is not a string.",
                              hint="Fill or drop the empty rows.")
        rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    else:
        raise _no_input(columns, text_field, task_type)
    rows = [list(row)[:max_length] for row in rows]
    empty = next((i for i, row in enumerate(rows) if not row), None)
    if empty is not None:
        raise ConfigError(f"example {empty} has no tokens.", hint="Drop empty examples.")
    return rows


def _parse_ids(value: Any, index: int) -> list[int]:
    if isinstance(value, str):  # CSV cells: "[1, 2, 3]", "[1 2 3]" (numpy) or "1 2 3"
        value = value.strip().strip("[]").replace(",", " ").split()
    try:
        return [int(t) for t in value]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"example {index}: input_ids must be token ids, got {value!r}."[:200],
                          hint='Give a list of integers per example (CSV: "[1, 2, 3]").'
                          ) from exc


def _class_labels(ds: Any, columns: list[str], label_field: str, num_labels: int | None
                  ) -> list[int]:
    field = label_field if label_field in columns else (
        "labels" if "labels" in columns else None)
    if field is None:
        raise _missing(repr(label_field), columns,
                       "Name the label column with --label-field, or add one holding class "
                       "ids 0..num_labels-1.")
    labels = []
    for i, value in enumerate(ds[field]):
        try:
            label = int(value)
            if label != value and not (isinstance(value, str) and value.strip().isdigit()):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"example {i}: label {value!r} is not a class id.",
                              hint="Labels must be integers 0..num_labels-1; map names to "
                              "ids first.") from None
        if label < 0 or (num_labels is not None and label >= num_labels):
            raise ConfigError(f"example {i}: label {label} is outside 0..{(num_labels or 1) - 1}.",
                              hint="The federation's num_labels fixes the classes.")
        labels.append(label)
    return labels


def _prompt_completion(ds: Any, tokenizer: Any, max_length: int
                       ) -> tuple[list[list[int]], list[list[int]]]:
    prompts, completions = ds[PROMPT_FIELD], ds[COMPLETION_FIELD]
    textual = isinstance(prompts[0], str)
    if textual:
        if tokenizer is None:
            raise ConfigError("prompt/completion text needs a tokenizer.",
                              hint="Give the base model a tokenizer, or give the prompt and "
                              "completion as lists of token ids.")
        prompt_ids = tokenizer(list(prompts), truncation=False)["input_ids"]
        completion_ids = tokenizer(list(completions), add_special_tokens=False,
                                   truncation=False)["input_ids"]
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            completion_ids = [[*c, eos] for c in completion_ids]
    else:
        prompt_ids = [_parse_ids(p, i) for i, p in enumerate(prompts)]
        completion_ids = [_parse_ids(c, i) for i, c in enumerate(completions)]
    ids, labels = [], []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        prompt, completion = list(prompt), list(completion)
        # Keep the prompt's end (nearest the completion), and room for the completion.
        room = max(max_length - len(completion), max_length // 2)
        prompt = prompt[-room:] if len(prompt) > room else prompt
        completion = completion[:max_length - len(prompt)]
        ids.append(prompt + completion)
        labels.append([IGNORE_INDEX] * len(prompt) + completion)
    return ids, labels


def _messages(conversations: list, tokenizer: Any, max_length: int
              ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each conversation through the chat template, labelled on the assistant
    turns only (truncated to ``max_length`` from the end)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("messages data needs a tokenizer with a chat template.",
                          hint="Use a base model whose tokenizer has one (set "
                          "tokenizer.chat_template and save it), or give prompt/completion "
                          "pairs.")
    ids, labels = [], []
    for index, conversation in enumerate(conversations):
        row_ids, row_labels = _conversation(conversation, tokenizer, index)
        ids.append(row_ids[:max_length])
        labels.append(row_labels[:max_length])
    return ids, labels


def _conversation(messages: Any, tokenizer: Any, index: int) -> tuple[list[int], list[int]]:
    """An assistant turn's tokens are what its message adds to the template's rendering of
    the conversation before it (with the generation prompt): the template's own markup
    around the turn (its end-of-turn token included) is learned, the prompt is not."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                       for m in messages)):
        raise ConfigError(f"example {index}: messages must be a list of "
                          '{"role": ..., "content": ...} turns.',
                          hint='E.g. [{"role": "user", "content": "Hi"}, '
                          '{"role": "assistant", "content": "Hello"}].')
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"example {index}: the conversation has no assistant turn to learn.",
                          hint="Each conversation needs at least one assistant message.")

    def render(turns: list, prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(turns, tokenize=True,
                                            add_generation_prompt=prompt, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    full = render(messages, False)
    labels = [IGNORE_INDEX] * len(full)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:turn], True) if turn else []
        through = render(messages[:turn + 1], False)
        if full[:len(through)] != through or through[:len(before)] != before:
            raise ConfigError(f"example {index}: the chat template does not render a "
                              "conversation as the sum of its turns, so the assistant's "
                              "tokens cannot be told apart.",
                              hint="Give prompt/completion pairs, or pre-tokenized "
                              "input_ids with labels (-100 where no loss is taken).")
        labels[len(before):len(through)] = full[len(before):len(through)]
    return full, labels


def split_holdout(ds: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """A seeded random split into (train, holdout), holdout ≈ ``fraction`` of ``ds``.

    Both parts keep at least one example when ``0 < fraction < 1``.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"holdout fraction must be in [0, 1), not {fraction}.",
                          hint="Use e.g. 0.2.")
    n = len(ds)
    n_holdout = 0 if fraction == 0 else min(max(1, round(n * fraction)), n - 1)
    if fraction > 0 and n < 2:
        raise ConfigError(f"cannot hold out from {n} example(s).", hint="Use more data.")
    order = np.random.default_rng(seed).permutation(n)
    holdout = sorted(int(i) for i in order[:n_holdout])
    train = sorted(int(i) for i in order[n_holdout:])
    return ds.select(train), ds.select(holdout)
