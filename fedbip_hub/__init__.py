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
# a DeprecationWarning, so existing scripts do not break. An old module that was split
# lists every module its names went to.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "adapter_config": ("adapters.config",), "adapter_io": ("adapters.lora",),
    "patterns": ("adapters.patterns",), "upload_files": ("adapters.upload_files",),
    "upload_metadata": ("adapters.metadata",),
    "layers": ("engine.layers",), "compute": ("engine.compute",),
    "lowrank": ("engine.lowrank",), "stacked_merge": ("engine.stacked_merge",),
    "task_vectors": ("engine.task_vectors",), "similarity": ("engine.similarity",),
    "sketch": ("engine.sketch",), "weighting": ("engine.weighting", "engine.evidence"),
    "strategies": ("engine.strategies",), "merge": ("engine.merge",),
    "memory": ("engine.memory",), "robust": ("engine.robust",),
    "locations": ("stores.locations",),
    "federation": ("federation.repo", "federation.config"),
    "client": ("federation.client",), "status": ("federation.status",),
    "modelcard": ("federation.modelcard",), "skip_reasons": ("federation.skip_reasons",),
    "plotting": ("federation.plotting",), "offline": ("federation.offline",),
    "rounds": ("server.rounds",), "streaming": ("server.streaming",),
    "validation": ("server.validation",), "resources": ("server.resources",),
    "data": ("training.data", "training.data_files"),
    "training": ("training.trainer", "training.numerics", "training.start",
                 "training.memory_check"),
    "hf_trainer": ("training.hf_trainer",), "training_args": ("training.args",),
    "evaluation": ("training.evaluation",), "models": ("training.models",),
    "meta_init": ("training.meta_init",), "quantization": ("training.quantization",),
    "memory_estimate": ("training.memory_estimate",),
    "trainer_integration": ("training.integration",),
    "scheduling": ("scheduling.jobs",),
    "webhooks": ("scheduling.webhooks", "scheduling.followups", "scheduling.webhook_setup"),
}
# Old modules whose name is now a subpackage: the package answers for their names.
_PACKAGES = {"federation", "training", "scheduling"}


def _deprecated(old: str, stacklevel: int) -> None:
    """Warn at the caller's line (the import system's own frames are skipped)."""
    new = " / ".join(f"{__name__}.{m}" for m in MOVED_MODULES[old])
    warnings.warn(f"{__name__}.{old} moved to {new}; import from there, or from fedbip_hub "
                  "for the public API", DeprecationWarning, stacklevel=stacklevel)


def moved_attribute(old: str, name: str) -> Any:
    """``name`` of the 0.1 module ``fedbip_hub.<old>``, from the module it moved to."""
    if old in _PACKAGES and importlib.util.find_spec(f"{__name__}.{old}.{name}"):
        # a submodule of the package that replaced the module (``from fedbip_hub.training
        # import data``): the import system loads it next, and nothing else gets imported
        raise AttributeError(f"module '{__name__}.{old}' has no attribute {name!r}")
    if not name.startswith("__"):
        for new in MOVED_MODULES[old]:
            module = importlib.import_module(f"{__name__}.{new}")
            if hasattr(module, name):
                _deprecated(old, stacklevel=4)
                return getattr(module, name)
    raise AttributeError(f"module '{__name__}.{old}' has no attribute {name!r}")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``fedbip_hub.<old>`` to the module at its new path: the same object
    where the module moved whole, else a module that finds each name where it went."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        old = fullname.removeprefix(__name__ + ".")
        if old == fullname or old not in MOVED_MODULES or old in _PACKAGES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        old = spec.name.removeprefix(__name__ + ".")
        _deprecated(old, stacklevel=3)
        targets = MOVED_MODULES[old]
        if len(targets) > 1:
            return None  # a fresh module; exec_module makes it forward
        module = importlib.import_module(f"{__name__}.{targets[0]}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        old = module.__spec__.name.removeprefix(__name__ + ".")
        if len(MOVED_MODULES[old]) > 1:
            module.__getattr__ = lambda name: moved_attribute(old, name)
            return
        # The module already ran at its new path; the import system has just set its
        # __spec__ to the alias's, so give it back its own.
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
