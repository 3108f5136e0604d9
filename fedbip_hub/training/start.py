"""Where a member's training starts: the start adapter (its latest personalized one, the
federation's initial one, or a folder), loaded trainable, and the checkpoints it may resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.errors import AdapterError, ConfigError, NotFoundError
from fedbip_hub.federation.client import START_FILE, pull, read_start_revision
from fedbip_hub.federation.repo import Federation
from fedbip_hub.training.args import TrainingArgs


def start_folder(fed: Federation, client: str, start: str | Path, tmp: Path
                  ) -> tuple[Path, str | None, str]:
    """(folder, start revision, description) of the adapter training starts from."""
    if str(start) == "init":
        return fed.init_folder(), None, "init"
    if str(start) == "auto":
        try:
            pulled = pull(fed, client, tmp / "start")
        except NotFoundError:
            return fed.init_folder(), None, "init"
        return pulled.folder, pulled.revision, "personalized"
    folder = Path(start)
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(f"{folder} is not an adapter folder (no {CONFIG_NAME}).",
                           hint="Pass --start auto, init, or a folder `fedbip pull` wrote.",
                           client=client)
    return folder, read_start_revision(folder), str(folder)


def load_start(base: Any, folder: Path, client: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterError(f"cannot load the start adapter {folder}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                           hint="Check that it belongs to this federation's base model.",
                           client=client) from exc


def resume_target(args: TrainingArgs, checkpoints: Path, start_revision: str | None,
                  client: str) -> str | bool | None:
    """What to pass the Trainer's ``resume_from_checkpoint``, after checking that the
    checkpoints continue a run from the same start adapter."""
    if not args.resume_from_checkpoint:
        return None
    target = args.resume_from_checkpoint
    folder = checkpoints if target == "latest" else Path(target)
    if target != "latest" and not folder.is_dir():
        raise ConfigError(f"no checkpoint at {folder}.",
                          hint="Pass --resume-from-checkpoint latest, or a checkpoint-N "
                          "folder a run with --save-steps wrote.", client=client)
    if target == "latest" and not any(checkpoints.glob("checkpoint-*")):
        raise ConfigError(f"no checkpoint in {checkpoints} to resume from.",
                          hint="Train with --save-steps N first (and the same --out or "
                          "--checkpoint-dir).", client=client)
    noted = (folder if target == "latest" else folder.parent) / START_FILE
    if noted.is_file():
        recorded = json.loads(noted.read_text()).get("start_revision")
        if recorded != start_revision:
            raise ConfigError(
                f"the checkpoints continue a run that started from "
                f"{recorded or 'the initial adapter'}, but this run starts from "
                f"{start_revision or 'the initial adapter'}.",
                hint="Pass --start with the run's original start, or train afresh without "
                "--resume-from-checkpoint.", client=client)
    return True if target == "latest" else str(folder)
