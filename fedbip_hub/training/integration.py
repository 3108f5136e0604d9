"""Bring your own trainer: start a ``transformers.Trainer`` (or TRL's ``SFTTrainer``, or
any loop) from the member's right start adapter, and push what it trained.

Two pieces, usable apart:

* ``prepare_start(fed, client, folder)``: what ``fedbip pull --or-init`` writes, a folder
  ``PeftModel.from_pretrained(base, folder, is_trainable=True)`` loads: the member's
  latest personalized adapter, or the federation's initial one before any round, plus
  ``fedbip_start.json`` naming the start revision (null for the initial adapter).
  ``load_trainable(fed, start)`` loads the base and that adapter, trainable.
* ``FedbipPushCallback``: a ``TrainerCallback`` that, when training ends, saves the
  adapter into that folder and uploads it with ``client.push``: the start revision the
  folder recorded, the example count and the task. Only the main process pushes.

Any other trainer does the same by hand: ``fedbip pull --or-init --out DIR``, train the
adapter loaded from DIR, ``save_pretrained(DIR)``, ``fedbip push --adapter DIR``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.client import PushResult, pull, push
from fedbip_hub.federation.repo import Federation


@dataclass
class Start:
    """The adapter training starts from: its folder and its personalized revision (None:
    the federation's initial adapter)."""

    client: str
    folder: Path
    revision: str | None


def prepare_start(fed: Federation, client: str, folder: str | Path) -> Start:
    """Write the member's start adapter into ``folder``: ``client.pull`` with
    ``or_init`` (see the module docstring)."""
    pulled = pull(fed, client, folder, or_init=True)
    return Start(client, pulled.folder, pulled.revision)


def load_trainable(fed: Federation, start: Start, *, base_model: Any = None,
                   dtype: Any = None) -> Any:
    """The base (``base_model``, or the federation's, downloaded with the federation's
    token) with the start adapter on it, trainable: LoRA factors and head."""
    from peft import PeftModel

    from fedbip_hub.training.models import load_base_model

    base = base_model if base_model is not None else load_base_model(
        fed.config(), dtype=dtype, token=fed.token)
    return PeftModel.from_pretrained(base, str(start.folder), is_trainable=True)


class FedbipPushCallback(TrainerCallback):
    """Push the trained adapter with the right metadata when ``Trainer.train`` ends.

    Args:
        fed: the federation.
        start: what ``prepare_start`` returned (the folder the adapter is saved into).
        n_examples: the training examples used (default: the train dataloader's
            dataset length).
        task: an optional task label recorded in the upload.

    After training, ``result`` holds the ``PushResult`` (None on other processes).
    """

    def __init__(self, fed: Federation, start: Start, *, n_examples: int | None = None,
                 task: str | None = None):
        self.fed, self.start, self.n_examples, self.task = fed, start, n_examples, task
        self.result: PushResult | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     train_dataloader: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if model is None or not hasattr(model, "peft_config"):
            raise ConfigError("the trainer's model is not a PEFT model, so there is no "
                              "adapter to push.", client=self.start.client,
                              hint="Train the model `load_trainable` returns.")
        from fedbip_hub.training.models import stamp_base_model

        model.save_pretrained(str(self.start.folder))  # fedbip_start.json stays beside it
        config = self.fed.config()
        stamp_base_model(self.start.folder, config)
        n_examples = self.n_examples
        if n_examples is None and train_dataloader is not None:
            n_examples = len(train_dataloader.dataset)
        self.result = push(self.fed, self.start.client, self.start.folder,
                           n_examples=n_examples, start_revision=self.start.revision,
                           task=self.task)
