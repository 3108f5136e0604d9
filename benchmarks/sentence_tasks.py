"""English sentences labelled by conflicting rules, for the real-model benchmark.

Every sentence describes one event and carries six independent binary attributes:
its sentiment, tense, topic, grammatical number, place and time of day. A task labels
sentences by one attribute, so two groups' labels on the same sentences agree about
half of the time: a pretrained encoder's features carry every attribute, and a client
must learn from a few examples which one its labels follow.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_VERBS = (("watch", "watches", "watched"), ("enjoy", "enjoys", "enjoyed"),
          ("discuss", "discusses", "discussed"), ("review", "reviews", "reviewed"),
          ("describe", "describes", "described"), ("remember", "remembers", "remembered"),
          ("talk about", "talks about", "talked about"), ("mention", "mentions", "mentioned"))
_SUBJECTS = (("the teacher", "the teachers"), ("my neighbour", "my neighbours"),
             ("the old man", "the old men"), ("a student", "the students"),
             ("the doctor", "the doctors"), ("her brother", "her brothers"),
             ("the chef", "the chefs"), ("our coach", "our coaches"),
             ("the girl", "the girls"), ("a tourist", "the tourists"))
_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # attribute: (words for label 0, words for label 1)
    "sentiment": (("awful", "terrible", "dreadful", "disappointing", "horrible",
                   "miserable", "boring", "unpleasant"),
                  ("wonderful", "delightful", "excellent", "fantastic", "lovely",
                   "brilliant", "superb", "pleasant")),
    "topic": (("the pasta dinner", "the chocolate cake", "the vegetable soup",
               "the sushi platter", "the pizza", "the breakfast buffet", "the curry",
               "the apple pie"),
              ("the football match", "the tennis final", "the marathon",
               "the basketball game", "the swimming race", "the cycling tour",
               "the boxing match", "the hockey game")),
    "place": (("in the kitchen", "at home", "in the office", "inside the hall",
               "in the living room", "at the library"),
              ("in the park", "on the beach", "in the garden", "by the river",
               "in the town square", "on the hill")),
    "time": (("early in the morning", "at sunrise", "at nine in the morning",
              "before noon"),
             ("late at night", "in the evening", "after sunset", "at midnight")),
}
ATTRIBUTES = ("sentiment", "tense", "topic", "number", "place", "time")
DESCRIPTIONS = {
    "sentiment": "is the experience described as good?",
    "tense": "is the sentence in the past tense?",
    "topic": "is it about sport (not food)?",
    "number": "is the subject plural?",
    "place": "does it happen outdoors?",
    "time": "does it happen in the evening or at night?",
}


def sentence(bits: dict[str, int], rng: random.Random) -> str:
    """One sentence with the given attribute values (0/1 each)."""
    subject = rng.choice(_SUBJECTS)[bits["number"]]
    base, third, past = rng.choice(_VERBS)
    if bits["tense"]:
        verb, be = past, "was"
    else:
        verb, be = (base if bits["number"] else third), "is"
    words = {a: rng.choice(_WORDS[a][bits[a]]) for a in _WORDS}
    if rng.random() < 0.5:
        text = (f"{subject} {verb} {words['topic']} {words['place']} {words['time']}, "
                f"and it {be} {words['sentiment']}.")
    else:
        text = (f"{words['time'].capitalize()}, {subject} {verb} {words['topic']} "
                f"{words['place']}. It {be} {words['sentiment']}.")
    return text[0].upper() + text[1:]


def sample(n: int, rng: random.Random) -> tuple[list[str], list[dict[str, int]]]:
    bits = [{a: rng.randrange(2) for a in ATTRIBUTES} for _ in range(n)]
    return [sentence(b, rng) for b in bits], bits


@dataclass
class SentenceClient:
    """One client: its task (the attribute its labels follow), train and test sets."""

    name: str
    task: str
    train_ids: list[list[int]]
    train_labels: list[int]
    test_ids: list[list[int]]
    test_labels: list[int]

    def train_dataset(self) -> Any:
        return _dataset(self.train_ids, self.train_labels)

    def test_dataset(self) -> Any:
        return _dataset(self.test_ids, self.test_labels)


def _dataset(ids: list[list[int]], labels: list[int]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids, "label": labels})


def make_clients(groups: Sequence[str], tokenizer: Any, *, n_train: int | Sequence[int],
                 n_test: int, label_noise: float = 0.0, seed: int = 0
                 ) -> list[SentenceClient]:
    """One client per entry of ``groups`` (an attribute), named ``<task>-<i>``; each draws
    its own sentences. Training labels are flipped with probability ``label_noise``;
    test labels are clean."""
    rng = random.Random(20_000 + seed)
    sizes = [n_train] * len(groups) if isinstance(n_train, int) else list(n_train)
    counters: dict[str, int] = {}
    clients = []
    for task, size in zip(groups, sizes, strict=True):
        if task not in ATTRIBUTES:
            raise ValueError(f"unknown task {task!r}; choose from {ATTRIBUTES}")
        counters[task] = counters.get(task, 0) + 1
        train_text, train_bits = sample(size, rng)
        test_text, test_bits = sample(n_test, rng)
        train_labels = [b[task] ^ (rng.random() < label_noise) for b in train_bits]
        clients.append(SentenceClient(
            name=f"{task}-{counters[task]}", task=task,
            train_ids=tokenizer(train_text)["input_ids"], train_labels=train_labels,
            test_ids=tokenizer(test_text)["input_ids"],
            test_labels=[b[task] for b in test_bits]))
    return clients
