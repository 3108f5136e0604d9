"""Score a model on local data, and compare a member's base, own and personalized models.

The primary metric is accuracy for SEQ_CLS and perplexity for CAUSAL_LM (where the gain is
a perplexity reduction, so positive is better in both).
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.errors import AdapterError, ConfigError, NotFoundError
from fedbip_hub.federation.config import FederationConfig
from fedbip_hub.federation.repo import Federation
from fedbip_hub.training.data import IGNORE_INDEX, load_tokenizer, needs_tokenizer, prepare_dataset

PRIMARY_METRIC = {"SEQ_CLS": "accuracy", "CAUSAL_LM": "perplexity"}
BASE_NOTE_SEQ_CLS = ("base = the base model with the federation's initial adapter: its LoRA "
                     "is zero, but the classification head only exists there")


# -- batching (shared with training) ---------------------------------------------------------
def pad_id_of(model: Any) -> int:
    """The id batches are padded with; set on the model config when it had none."""
    config = model.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = 0
        config.pad_token_id = 0
    return int(pad[0] if isinstance(pad, list) else pad)


def collate(columns: dict[str, list], *, pad_id: int, task_type: str
            ) -> dict[str, torch.Tensor]:
    """Right-pad a batch of prepared examples (``dataset[indices]``: one list per column)."""
    rows = columns["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    if task_type == "SEQ_CLS":
        labels = torch.tensor(columns["labels"], dtype=torch.long)
    else:
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row, dtype=torch.long)
        mask[i, :n] = 1
        if task_type != "SEQ_CLS":
            labels[i, :n] = torch.tensor(columns["labels"][i], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iter_batches(dataset: Any, batch_size: int, *, pad_id: int, task_type: str,
                 order: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    indices = order if order is not None else list(range(len(dataset)))
    for start in range(0, len(indices), batch_size):
        # one columnar read per batch (a select() per batch costs ~4x more)
        yield collate(dataset[indices[start:start + batch_size]], pad_id=pad_id,
                      task_type=task_type)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available.",
                          hint="Use --device auto or cpu.")
    return torch.device(device)


def check_vocab(model: Any, dataset: Any) -> None:
    """Refuse token ids the model has no embedding for (a clear error, not an IndexError)."""
    size = model.get_input_embeddings().num_embeddings
    rows = dataset["input_ids"]
    high = max((max(row) for row in rows), default=0)
    low = min((min(row) for row in rows), default=0)
    if high >= size or low < 0:
        raise ConfigError(f"token ids range over {low}..{high}, but the base model's vocabulary "
                          f"has {size} entries.",
                          hint="Tokenize with the base model's tokenizer.")


# -- scoring -------------------------------------------------------------------------------
def evaluate(model: Any, dataset: Any, *, task_type: str, batch_size: int = 32,
             device: str = "cpu", tokenizer: Any = None, max_length: int = 128) -> dict:
    """Score ``model`` on ``dataset`` (prepared, or preparable without a tokenizer).

    Returns:
        SEQ_CLS: ``{"accuracy", "loss", "n"}`` (loss: mean cross-entropy per example);
        CAUSAL_LM: ``{"loss", "perplexity", "n", "tokens"}`` (loss: mean cross-entropy per
        predicted token; only tokens whose label is not -100 count).
    """
    dataset = prepare_dataset(dataset, task_type=task_type, tokenizer=tokenizer,
                              max_length=max_length)
    return evaluate_prepared(model, dataset, task_type=task_type, batch_size=batch_size,
                             device=device)


@torch.no_grad()
def evaluate_prepared(model: Any, dataset: Any, *, task_type: str, batch_size: int = 32,
                      device: str = "cpu") -> dict:
    """``evaluate`` on a dataset ``prepare_dataset`` already returned (no second pass)."""
    target = resolve_device(device)
    was_training = model.training
    model.to(target)
    model.eval()
    pad_id = pad_id_of(model)
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for batch in iter_batches(dataset, batch_size, pad_id=pad_id, task_type=task_type):
            batch = {k: v.to(target) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            if task_type == "SEQ_CLS":
                loss_sum += float(torch.nn.functional.cross_entropy(
                    logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                count += labels.numel()
            else:
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = labels[:, 1:].reshape(-1)
                loss_sum += float(torch.nn.functional.cross_entropy(
                    shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if task_type == "SEQ_CLS":
        return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1),
                "n": len(dataset)}
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "n": len(dataset),
            "tokens": count}


def _primary(scores: dict | None, task_type: str) -> float | None:
    return None if scores is None else scores[PRIMARY_METRIC[task_type]]


def _gain(better: dict | None, worse: dict | None, task_type: str) -> float | None:
    """Personalization gain in the primary metric; positive means better."""
    a, b = _primary(better, task_type), _primary(worse, task_type)
    if a is None or b is None:
        return None
    return a - b if task_type == "SEQ_CLS" else b - a


def evaluate_client(fed: Federation, client: str, dataset: Any, *,
                    own_adapter: str | Path | None = None, tokenizer: Any = None,
                    base_model: Any = None, device: str = "auto", batch_size: int = 32,
                    max_length: int = 128, text_field: str = "text",
                    label_field: str = "label") -> dict:
    """Score a member's base, own and latest personalized model on ``dataset``.

    Returns:
        ``{"client", "task_type", "metric", "n", "base", "own", "personalized", "gain",
        "notes"}``: ``base``/``own``/``personalized`` are ``evaluate`` dicts (``own`` None
        without ``own_adapter``; ``personalized`` None before any round, else with its
        ``revision``); ``gain`` is ``{"vs_own", "vs_base"}``: personalized minus own and
        minus base in the primary metric (accuracy points, or perplexity reduction), None
        where a side is missing. For SEQ_CLS "base" is the base model with the federation's
        initial adapter (zero LoRA, initial head), which ``notes`` says.
    """
    config = fed.config()
    member = fed.member(client)
    task_type = config.task_type
    if tokenizer is None and needs_tokenizer(dataset, task_type, text_field=text_field):
        tokenizer = load_tokenizer(config.base_model, revision=config.base_revision,
                                   token=fed.token)
    prepared = prepare_dataset(dataset, task_type=task_type, tokenizer=tokenizer,
                               max_length=max_length, text_field=text_field,
                               label_field=label_field, num_labels=config.num_labels)
    target = str(resolve_device(device))
    model = fresh_base(config, base_model, token=fed.token)
    check_vocab(model, prepared)
    notes: list[str] = []

    def score(m: Any) -> dict:
        return evaluate_prepared(m, prepared, task_type=task_type, batch_size=batch_size,
                                 device=target)

    adapters: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="fedbip-eval-") as tmp:
        if task_type == "SEQ_CLS":
            adapters["base"] = fed.init_folder()
            notes.append(BASE_NOTE_SEQ_CLS)
        if own_adapter is not None:
            own = Path(own_adapter)
            if not (own / CONFIG_NAME).is_file():
                raise AdapterError(f"{own} is not an adapter folder (no {CONFIG_NAME}).",
                                   hint="Pass the folder `fedbip train` wrote.", client=client)
            adapters["own"] = own
        revision = None
        try:
            from fedbip_hub.federation.client import pull

            pulled = pull(fed, client, Path(tmp) / "personalized")
            adapters["personalized"], revision = pulled.folder, pulled.revision
        except NotFoundError:
            notes.append("no personalized adapter yet: push an upload and wait for a round")
        results: dict[str, dict | None] = {"base": None, "own": None, "personalized": None}
        if task_type == "CAUSAL_LM":
            results["base"] = score(model)
        peft_model = None
        for name, folder in adapters.items():
            peft_model = _with_adapter(model, peft_model, folder, name, client)
            results[name] = score(peft_model)
    if results["personalized"] is not None:
        results["personalized"]["revision"] = revision
    if own_adapter is not None:
        results["own"]["folder"] = str(own_adapter)
    return {
        "client": client, "repo_id": member.repo_id, "task_type": task_type,
        "metric": PRIMARY_METRIC[task_type], "n": len(prepared), **results,
        "gain": {"vs_own": _gain(results["personalized"], results["own"], task_type),
                 "vs_base": _gain(results["personalized"], results["base"], task_type)},
        "notes": notes,
    }


def fresh_base(config: FederationConfig, base_model: Any = None, *,
               token: str | None = None) -> Any:
    """A copy of ``base_model`` (left untouched), or the federation's base in fp32
    (downloaded with ``token``, None: the environment's)."""
    if base_model is not None:
        return copy.deepcopy(base_model)
    from fedbip_hub.training.models import load_base_model

    return load_base_model(config, dtype=torch.float32, token=token)


def _with_adapter(base: Any, peft_model: Any, folder: Path, name: str, client: str) -> Any:
    """Load one more adapter into a single PeftModel (one base copy for all of them)."""
    from peft import PeftModel

    try:
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base, str(folder), adapter_name=name)
        else:
            peft_model.load_adapter(str(folder), adapter_name=name)
        peft_model.set_adapter(name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterError(f"cannot load the {name} adapter from {folder}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                           hint="Check that it was trained for this federation's base model.",
                           client=client) from exc
    return peft_model
