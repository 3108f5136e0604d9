"""The stable Python API: what ``fedbip_hub`` exports, and the old module paths."""

from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path

import pytest
from federation_helpers import modules_loaded_by

import fedbip_hub

ROOT = Path(__file__).resolve().parents[1]

# The user-facing calls and their parameters. A change here breaks users' scripts: make
# it on purpose, with a deprecation, never as a side effect of moving code.
SIGNATURES = {  # as they were before the move into subpackages (0.1's flat modules)
    "init_federation": ["address", "config", "token"],
    "join": ["fed", "client", "repo_id"],
    "push": ["fed", "client", "adapter_dir", "n_examples", "start_revision", "task"],
    "pull": ["fed", "client", "dest", "or_init"],
    "personalized_folder": ["fed", "client", "revision", "token"],
    "train_adapter": ["fed", "client", "dataset", "output_dir", "args", "start", "tokenizer",
                      "base_model", "progress", "text_field", "label_field"],
    "run_round": ["fed", "options"],
    "evaluate_client": ["fed", "client", "dataset", "own_adapter", "tokenizer", "base_model",
                        "device", "batch_size", "max_length", "text_field", "label_field"],
    "evaluate": ["model", "dataset", "task_type", "batch_size", "device", "tokenizer",
                 "max_length"],
    "folder_similarity": ["folders", "space", "include_dense"],
    "merge_folders": ["folders", "target", "strategy", "out"],
    "compute_similarity": ["vectors", "space", "include_dense", "progress", "device", "dtype"],
    "compute_weights": ["strategy", "k", "report", "n_examples", "allowed", "groups",
                        "clients", "population"],
    "personalize": ["vectors", "weights", "plan", "rank", "refactor", "space",
                    "personal_heads", "dtype", "progress", "device", "sink", "max_resident",
                    "batched"],
    "federation_status": ["fed"],
    "load_examples": ["source", "split"],
    "prepare_start": ["fed", "client", "folder"],
    "load_trainable": ["fed", "start", "base_model", "dtype"],
}


def test_every_export_resolves_to_its_defining_module() -> None:
    for name in fedbip_hub.__all__:
        value = getattr(fedbip_hub, name)
        if name == "__version__":
            continue
        module = fedbip_hub._API[name]
        assert getattr(sys.modules[module], name) is value
        assert getattr(value, "__module__", module) == module, name
    assert set(SIGNATURES) <= set(fedbip_hub.__all__)
    assert set(fedbip_hub.__all__) <= set(dir(fedbip_hub))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedbip_hub.nope  # noqa: B018


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_user_facing_signatures_are_stable(name: str) -> None:
    params = list(inspect.signature(getattr(fedbip_hub, name)).parameters)
    assert params == SIGNATURES[name], f"{name}{params}"


def test_import_is_light() -> None:
    """``import fedbip_hub`` (and reading its API list) loads no torch or Hub client."""
    loaded = modules_loaded_by("import fedbip_hub\nnames = fedbip_hub.__all__")
    heavy = {"torch", "transformers", "peft", "huggingface_hub", "datasets"}
    assert not {m for m in loaded if m.split(".")[0] in heavy}


@pytest.mark.parametrize("old", ["client", "adapter_io", "rounds", "merge", "offline"])
def test_old_module_paths_still_import_with_a_warning(old: str) -> None:
    """A module that moved whole: the old path gives the same module object."""
    import importlib

    (target,) = fedbip_hub.MOVED_MODULES[old]
    new = importlib.import_module(f"fedbip_hub.{target}")
    sys.modules.pop(f"fedbip_hub.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aliased = importlib.import_module(f"fedbip_hub.{old}")
    assert aliased is new
    assert new.__spec__.name == new.__name__  # the alias does not take over its spec
    assert any(issubclass(w.category, DeprecationWarning) and target in str(w.message)
               for w in caught)


# 0.1 modules that were split (or became packages), and names that went to each part.
SPLIT_NAMES = {
    "federation": {"Federation": "federation.repo", "FederationConfig": "federation.config",
                   "dump_json": "federation.config"},
    "data": {"load_examples": "training.data_files", "prepare_dataset": "training.data"},
    "training": {"train_adapter": "training.trainer",
                 "resolve_precision": "training.numerics"},
    "webhooks": {"run_job": "scheduling.webhooks",
                 "run_with_followups": "scheduling.followups"},
    "scheduling": {"DEFAULT_SCHEDULE": "scheduling.jobs"},
}


@pytest.mark.parametrize("old", sorted(SPLIT_NAMES))
def test_names_of_split_modules_resolve_from_their_old_path(old: str) -> None:
    import importlib

    module = importlib.import_module(f"fedbip_hub.{old}")
    for name, home in SPLIT_NAMES[old].items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = getattr(module, name)
        assert value is getattr(importlib.import_module(f"fedbip_hub.{home}"), name)
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018


def test_every_old_path_maps_to_modules_that_exist() -> None:
    for old, targets in fedbip_hub.MOVED_MODULES.items():
        for new in targets:
            assert (ROOT / "fedbip_hub" / (new.replace(".", "/") + ".py")).exists(), new
        assert not (ROOT / "fedbip_hub" / f"{old}.py").exists(), old


def test_a_subpackage_import_imports_only_that_submodule() -> None:
    """``from fedbip_hub.training import data_files`` is the submodule, and the package's
    compatibility lookup imports nothing else (no trainer, no torch)."""
    loaded = modules_loaded_by(
        "from fedbip_hub.training import data_files\n"
        "from fedbip_hub.federation import status\n"
        "assert data_files.__name__ == 'fedbip_hub.training.data_files'\n"
        "assert status.__name__ == 'fedbip_hub.federation.status'")
    assert "torch" not in loaded
    assert "fedbip_hub.training.trainer" not in loaded
