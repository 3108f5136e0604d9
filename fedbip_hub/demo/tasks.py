"""Synthetic conflicting tasks: the same token sequences, labelled by different rules.

Every task reads a start token and ``SEQ_LEN`` content tokens and answers a yes/no
question about them: "do most tokens have attribute X?", each task with its own hidden
attribute of tokens. The attributes are independent, so on the same inputs two groups'
labels disagree about half of the time: averaging across groups hurts, averaging within a
group helps. That is the situation FedBip is built for.

The base model is pre-trained on the mixture (all attributes at once, multi-label), so its
features carry every task, as a foundation model's do; a client still has to learn, from
a few noisy examples, which one its labels follow.

Token ids: 0 is padding, 1 the start token, ``FIRST_CONTENT``.. the content tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PAD_ID = 0
START_ID = 1
FIRST_CONTENT = 16
VOCAB_SIZE = 256
N_CONTENT = VOCAB_SIZE - FIRST_CONTENT
SEQ_LEN = 15  # odd, so "majority" never ties

Rule = Callable[[torch.Tensor], torch.Tensor]


def _values(tokens: torch.Tensor) -> torch.Tensor:
    """Content tokens as values 0..N_CONTENT-1."""
    return tokens - FIRST_CONTENT


def _marks(seed: int) -> torch.Tensor:
    """A fixed, seeded half of the content vocabulary (a hidden attribute of tokens)."""
    order = torch.randperm(N_CONTENT, generator=torch.Generator().manual_seed(seed))
    marked = torch.zeros(N_CONTENT, dtype=torch.bool)
    marked[order[: N_CONTENT // 2]] = True
    return marked


# Each task asks "do most tokens have attribute X?" for its own attribute of tokens. The
# attributes are independent of each other, so the labels of two tasks on the same inputs
# are independent: groups conflict on about half of the examples.
ATTRIBUTES: dict[str, torch.Tensor] = {
    "low": torch.arange(N_CONTENT) < N_CONTENT // 2,
    "even": torch.arange(N_CONTENT) % 2 == 0,
    "marked": _marks(1),
    "tagged": _marks(2),
}


def majority_of(attribute: torch.Tensor) -> Rule:
    def rule(tokens: torch.Tensor) -> torch.Tensor:
        hits = attribute[_values(tokens)].sum(dim=1)
        return (hits * 2 > tokens.shape[1]).long()
    return rule


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    rule: Rule

    def labels(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rule(tokens)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("low", "most tokens come from the lower half of the vocabulary",
         majority_of(ATTRIBUTES["low"])),
    Task("even", "most tokens are even", majority_of(ATTRIBUTES["even"])),
    Task("marked", "most tokens carry a hidden mark", majority_of(ATTRIBUTES["marked"])),
    Task("tagged", "most tokens carry a second hidden mark",
         majority_of(ATTRIBUTES["tagged"])),
)}
TASK_NAMES = tuple(TASKS)


def sample_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` sequences of uniformly random content tokens (n × SEQ_LEN)."""
    return torch.randint(FIRST_CONTENT, VOCAB_SIZE, (n, SEQ_LEN), generator=generator)


def with_prefix(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Prepend the token ``prefix`` to every row."""
    return torch.cat([torch.full((tokens.shape[0], 1), prefix, dtype=tokens.dtype), tokens],
                     dim=1)


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
    """The mixture of all tasks: inputs and an n × len(tasks) matrix of 0/1 targets."""
    tokens = sample_tokens(n, generator)
    targets = torch.stack([TASKS[t].labels(tokens) for t in tasks], dim=1)
    return with_prefix(tokens, START_ID), targets.float()
