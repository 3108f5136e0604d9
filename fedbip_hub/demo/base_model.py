"""The demo's foundation model: a small Llama built from a config, pre-trained briefly on
the mixture of all tasks, saved as a sequence classifier with a fresh 2-way head.

Nothing is downloaded. The model is cached in the demo folder next to a ``spec.json``
(config, pre-training settings and the tasks); a later run with the same spec reuses it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedbip_hub.demo.tasks import (
    PAD_ID,
    SEQ_LEN,
    START_ID,
    TASK_NAMES,
    TASKS,
    VOCAB_SIZE,
    pretraining_batch,
    sample_tokens,
    with_prefix,
)

SPEC_FILE = "fedbip_demo_base.json"
SPEC_VERSION = 1


@dataclass(frozen=True)
class BaseModelSpec:
    """The architecture and its pre-training; two equal specs give the same weights."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-2
    seed: int = 0
    tasks: tuple[str, ...] = TASK_NAMES
    version: int = SPEC_VERSION

    def llama_config(self, num_labels: int, **extra: object):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=2 * (SEQ_LEN + 1), pad_token_id=PAD_ID,
            bos_token_id=None, eos_token_id=None, num_labels=num_labels, **extra)

    def to_json(self) -> dict:
        data = asdict(self)
        data["tasks"] = list(self.tasks)
        return data


@dataclass
class BaseModelInfo:
    """Where the base model is and how good its pre-trained features are."""

    path: Path
    reused: bool
    seconds: float
    pretrain_accuracy: dict[str, float]


def _read_spec(folder: Path) -> dict | None:
    path = folder / SPEC_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def ensure_base_model(folder: str | Path, spec: BaseModelSpec | None = None, *,
                      log: Callable[[str], None] | None = None) -> BaseModelInfo:
    """The pre-trained base model in ``folder``: reused when its spec matches, else built.

    Args:
        folder: where the model (``config.json``, ``model.safetensors``) is kept.
        spec: architecture and pre-training; default ``BaseModelSpec()``.
        log: receives a line when the model is built.
    """
    spec = spec or BaseModelSpec()
    folder = Path(folder)
    cached = _read_spec(folder)
    if (cached is not None and cached.get("spec") == spec.to_json()
            and (folder / "model.safetensors").is_file()):
        return BaseModelInfo(folder, True, 0.0, cached.get("pretrain_accuracy", {}))
    if log:
        log(f"Pre-training the base model ({spec.num_hidden_layers} layers, hidden "
            f"{spec.hidden_size}, {spec.steps} steps on the mixture of "
            f"{len(spec.tasks)} tasks)...")
    began = time.perf_counter()
    model, accuracy = pretrain(spec)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    seconds = time.perf_counter() - began
    (folder / SPEC_FILE).write_text(json.dumps(
        {"spec": spec.to_json(), "pretrain_accuracy": accuracy,
         "pretrain_seconds": round(seconds, 2)}, indent=2) + "\n")
    return BaseModelInfo(folder, False, seconds, accuracy)


def pretrain(spec: BaseModelSpec):
    """Pre-train on the multi-label mixture; return a 2-label classifier sharing its body.

    The pre-training head (one logit per task) is dropped: the saved model has a fresh,
    seeded 2-way head, as when a foundation model is loaded for a new classification task.
    """
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(spec.seed)
    model = LlamaForSequenceClassification(spec.llama_config(
        len(spec.tasks), problem_type="multi_label_classification"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate,
                                  weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=spec.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    for _ in range(spec.steps):
        ids, targets = pretraining_batch(spec.batch_size, generator, spec.tasks)
        loss = model(input_ids=ids, labels=targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    accuracy = _multi_label_accuracy(model, spec)

    torch.manual_seed(spec.seed + 1)
    classifier = LlamaForSequenceClassification(spec.llama_config(2))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    missing, unexpected = classifier.load_state_dict(body, strict=False)
    assert not unexpected and set(missing) == {"score.weight"}, (missing, unexpected)
    return classifier, accuracy


@torch.no_grad()
def _multi_label_accuracy(model, spec: BaseModelSpec, n: int = 2000) -> dict[str, float]:
    tokens = sample_tokens(n, torch.Generator().manual_seed(spec.seed + 7))
    logits = model(input_ids=with_prefix(tokens, START_ID)).logits
    return {task: round(float(((logits[:, i] > 0).long() == TASKS[task].labels(tokens))
                              .float().mean()), 4)
            for i, task in enumerate(spec.tasks)}
