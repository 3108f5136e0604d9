"""Synthetic conflicting tasks: the same token sequences, labelled by different rules.

Every task reads a sequence of ``SEQ_LEN`` content tokens and answers a yes/no question
about it. The rules are independent of one another, so on the same inputs two groups'
labels disagree about half of the time: averaging across groups hurts, averaging within a
group helps. That is the situation FedBip is built for.

Token ids: 0 is padding, 1 the start token clients put first, 2.. the task tokens the base
model sees during pre-training (one per rule), and ``FIRST_CONTENT``.. the content tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PAD_ID = 0
START_ID = 1
FIRST_TASK_ID = 2
FIRST_CONTENT = 16
VOCAB_SIZE = 256
N_CONTENT = VOCAB_SIZE - FIRST_CONTENT
SEQ_LEN = 15  # odd, so "majority" never ties

Rule = Callable[[torch.Tensor], torch.Tensor]


def _values(tokens: torch.Tensor) -> torch.Tensor:
    """Content tokens as values 0..N_CONTENT-1."""
    return tokens - FIRST_CONTENT


def _majority(tokens: torch.Tensor) -> torch.Tensor:
    """More than half of the tokens come from the lower half of the content vocabulary."""
    low = (_values(tokens) < N_CONTENT // 2).sum(dim=1)
    return (low * 2 > tokens.shape[1]).long()


def _order(tokens: torch.Tensor) -> torch.Tensor:
    """The first token is larger than the last one."""
    values = _values(tokens)
    return (values[:, 0] > values[:, -1]).long()


# 11 keywords out of 240: P(a 15-token sequence holds none) = (229/240)^15 ≈ 0.50.
KEYWORDS = torch.arange(7, N_CONTENT, 22)[:11]


def _keyword(tokens: torch.Tensor) -> torch.Tensor:
    """The sequence contains one of the keywords."""
    return torch.isin(_values(tokens), KEYWORDS).any(dim=1).long()


def _middle_even(tokens: torch.Tensor) -> torch.Tensor:
    """The middle token's value is even."""
    return (_values(tokens)[:, tokens.shape[1] // 2] % 2 == 0).long()


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    rule: Rule

    def labels(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rule(tokens)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("majority", "most tokens come from the lower half of the vocabulary", _majority),
    Task("order", "the first token is larger than the last", _order),
    Task("keyword", "the sequence contains a keyword", _keyword),
    Task("middle", "the middle token is even", _middle_even),
)}
TASK_NAMES = tuple(TASKS)


def task_token(task: str) -> int:
    """The token that names a task to the base model during pre-training."""
    return FIRST_TASK_ID + TASK_NAMES.index(task)


def sample_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` sequences of uniformly random content tokens (n × SEQ_LEN)."""
    return torch.randint(FIRST_CONTENT, VOCAB_SIZE, (n, SEQ_LEN), generator=generator)


def with_prefix(tokens: torch.Tensor, prefix: int | Sequence[int]) -> torch.Tensor:
    """Prepend one token per row (an int for all rows, or one per row)."""
    column = torch.as_tensor(prefix, dtype=tokens.dtype).reshape(-1, 1)
    return torch.cat([column.expand(tokens.shape[0], 1), tokens], dim=1)


def flip_labels(labels: torch.Tensor, noise: float, generator: torch.Generator
                ) -> torch.Tensor:
    """Flip each label with probability ``noise`` (annotation noise of a real client)."""
    if noise <= 0:
        return labels
    flips = torch.rand(labels.shape, generator=generator) < noise
    return torch.where(flips, 1 - labels, labels)


@dataclass
class ClientData:
    """One client's data: its task (the true group), a small train set, a test set."""

    name: str
    task: str
    train_ids: torch.Tensor
    train_labels: torch.Tensor
    test_ids: torch.Tensor
    test_labels: torch.Tensor

    def train_dataset(self):
        return to_dataset(self.train_ids, self.train_labels)

    def test_dataset(self):
        return to_dataset(self.test_ids, self.test_labels)


def to_dataset(ids: torch.Tensor, labels: torch.Tensor):
    """A ``datasets.Dataset`` with pre-tokenized ``input_ids`` and ``label`` columns."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})


def make_clients(groups: Sequence[str], *, n_train: int | Sequence[int], n_test: int,
                 label_noise: float = 0.0, seed: int = 0) -> list[ClientData]:
    """One client per entry of ``groups`` (its task), named ``<task>-<i>``.

    Clients draw their own inputs from the same distribution and see them with the start
    token only: nothing but the labels tells a client which rule it is learning. Test
    labels are clean.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    sizes = [n_train] * len(groups) if isinstance(n_train, int) else list(n_train)
    counters: dict[str, int] = {}
    clients = []
    for task, size in zip(groups, sizes, strict=True):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {TASK_NAMES}")
        counters[task] = counters.get(task, 0) + 1
        train = sample_tokens(size, generator)
        test = sample_tokens(n_test, generator)
        labels = flip_labels(TASKS[task].labels(train), label_noise, generator)
        clients.append(ClientData(
            name=f"{task}-{counters[task]}", task=task,
            train_ids=with_prefix(train, START_ID), train_labels=labels,
            test_ids=with_prefix(test, START_ID), test_labels=TASKS[task].labels(test)))
    return clients


def pretraining_batch(n: int, generator: torch.Generator, tasks: Sequence[str] = TASK_NAMES
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture of all tasks, each example prefixed by its task token."""
    tokens = sample_tokens(n, generator)
    which = torch.randint(0, len(tasks), (n,), generator=generator)
    labels = torch.empty(n, dtype=torch.long)
    for index, task in enumerate(tasks):
        rows = which == index
        labels[rows] = TASKS[task].labels(tokens[rows])
    prefixes = torch.tensor([task_token(tasks[int(i)]) for i in which])
    return with_prefix(tokens, prefixes), labels
