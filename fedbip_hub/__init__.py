"""fedbip-hub: personalized federated LoRA fine-tuning through the Hugging Face Hub.

The stable Python API is what this module exports; scripts should import from here
(``from fedbip_hub import init_federation, join, train_adapter, push, run_round``), not
from the subpackages, whose layout may change. The exports are loaded on first use, so
``import fedbip_hub`` stays fast and imports no torch.

The subpackages follow the data flow (see ARCHITECTURE.md): ``adapters`` (the uploaded
LoRA files), ``engine`` (the pure maths), ``stores`` (Hub or folder), ``federation``
(config, members, client commands), ``training``, ``server`` (the round) and
``scheduling`` (jobs and webhooks).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API: dict[str, str] = {
    # A federation and its members.
    "Federation": "fedbip_hub.federation.repo",
    "FederationConfig": "fedbip_hub.federation.config",
    "LoraSpec": "fedbip_hub.federation.config",
    "Limits": "fedbip_hub.federation.config",
    "init_federation": "fedbip_hub.federation.client",
    "join": "fedbip_hub.federation.client",
    "push": "fedbip_hub.federation.client",
    "pull": "fedbip_hub.federation.client",
    "personalized_folder": "fedbip_hub.federation.client",
    "federation_status": "fedbip_hub.federation.status",
    # Training and evaluation on a member's machine.
    "TrainingArgs": "fedbip_hub.training.args",
    "train_adapter": "fedbip_hub.training.trainer",
    "load_examples": "fedbip_hub.training.data_files",
    "evaluate": "fedbip_hub.training.evaluation",
    "evaluate_client": "fedbip_hub.training.evaluation",
    "FedbipPushCallback": "fedbip_hub.training.integration",
    "prepare_start": "fedbip_hub.training.integration",
    "load_trainable": "fedbip_hub.training.integration",
    # The server's round.
    "run_round": "fedbip_hub.server.runner",
    "RoundRunner": "fedbip_hub.server.runner",
    # The method on local adapter folders, and its building blocks.
    "folder_similarity": "fedbip_hub.federation.offline",
    "merge_folders": "fedbip_hub.federation.offline",
    "Strategy": "fedbip_hub.engine.strategies",
    "compute_similarity": "fedbip_hub.engine.similarity",
    "compute_weights": "fedbip_hub.engine.strategies",
    "personalize": "fedbip_hub.engine.merge",
    # Errors: every failure the library raises on purpose is a FedbipError with a hint.
    "FedbipError": "fedbip_hub.errors",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'fedbip_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


# Modules moved into subpackages (0.1 layout -> 0.2): old import paths keep working, with
# a DeprecationWarning, so existing scripts do not break.
MOVED_MODULES: dict[str, str] = {
    "adapter_config": "adapters.config", "adapter_io": "adapters.lora",
    "patterns": "adapters.patterns", "upload_files": "adapters.upload_files",
    "upload_metadata": "adapters.metadata",
    "layers": "engine.layers", "compute": "engine.compute", "lowrank": "engine.lowrank",
    "stacked_merge": "engine.stacked_merge", "task_vectors": "engine.task_vectors",
    "similarity": "engine.similarity", "sketch": "engine.sketch",
    "weighting": "engine.weighting", "strategies": "engine.strategies",
    "merge": "engine.merge", "memory": "engine.memory", "robust": "engine.robust",
    "locations": "stores.locations",
    "federation": "federation.repo", "client": "federation.client",
    "status": "federation.status", "modelcard": "federation.modelcard",
    "skip_reasons": "federation.skip_reasons", "plotting": "federation.plotting",
    "offline": "federation.offline",
    "rounds": "server.rounds", "streaming": "server.streaming",
    "validation": "server.validation", "resources": "server.resources",
    "data": "training.data", "training": "training.trainer",
    "hf_trainer": "training.hf_trainer", "training_args": "training.args",
    "evaluation": "training.evaluation", "models": "training.models",
    "meta_init": "training.meta_init", "quantization": "training.quantization",
    "memory_estimate": "training.memory_estimate",
    "trainer_integration": "training.integration",
    "scheduling": "scheduling.jobs", "webhooks": "scheduling.webhooks",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``fedbip_hub.<old>`` to the module at its new path (the same object).

    Only old names that are no longer packages themselves are aliased: ``federation``,
    ``training`` and ``scheduling`` are now subpackages, so ``import fedbip_hub.training``
    gets the package, and its old contents live at the new paths in MOVED_MODULES.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        old = fullname.removeprefix(__name__ + ".")
        if old == fullname or old not in MOVED_MODULES or old in _PACKAGES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = f"{__name__}.{MOVED_MODULES[spec.name.removeprefix(__name__ + '.')]}"
        warnings.warn(f"{spec.name} moved to {new}; import from there, or from fedbip_hub "
                      "for the public API", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        # The module already ran at its new path; the import system has just set its
        # __spec__ to the alias's, so give it back its own.
        module.__spec__ = module.__spec__.loader_state


_PACKAGES = {"federation", "training", "scheduling"}

if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
