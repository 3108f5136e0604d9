"""The package's layers, enforced: what each lower layer may import, and module sizes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from federation_helpers import modules_loaded_by

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedbip_hub"
SHARED = {"fedbip_hub", "fedbip_hub.errors", "fedbip_hub.secrets", "fedbip_hub.safe_json",
          "fedbip_hub.identity"}
FRAMEWORKS = {"huggingface_hub", "transformers", "peft", "datasets", "accelerate", "trl",
              "bitsandbytes", "requests", "httpx", "typer", "rich", "tqdm"}

# layer -> the fedbip_hub packages it may import (besides itself and the shared modules),
# and the frameworks it may import: the adapters write PEFT's config format; the engine
# is tensor maths only; the stores talk to the Hub.
LOWER_LAYERS = {
    "adapters": (set(), {"peft"}),
    "engine": ({"adapters"}, set()),
    "stores": (set(), {"huggingface_hub", "requests", "httpx"}),
}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "fedbip_hub":  # from fedbip_hub import x: x may be a module
                found.update(f"fedbip_hub.{alias.name}" for alias in node.names
                             if (PACKAGE / alias.name).is_dir()
                             or (PACKAGE / f"{alias.name}.py").exists())
    return found


def allowed(module: str, layer: str) -> bool:
    packages, frameworks = LOWER_LAYERS[layer]
    top = module.split(".")[0]
    if top != "fedbip_hub":
        return top not in FRAMEWORKS or top in frameworks
    if module in SHARED:
        return True
    sub = module.split(".")[1]
    return sub == layer or sub in packages


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_import_only_what_is_below_them(layer: str) -> None:
    bad = {f"{path.relative_to(ROOT)} imports {module}"
           for path in sorted((PACKAGE / layer).rglob("*.py"))
           for module in imports_of(path) if not allowed(module, layer)}
    assert not bad, sorted(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The scan must catch a late import of the Hub client or of a higher layer."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from huggingface_hub import HfApi\n"
                   "    import fedbip_hub.stores.hub\n    from fedbip_hub import server\n")
    found = imports_of(bad)
    assert {"huggingface_hub", "fedbip_hub.stores.hub", "fedbip_hub.server"} <= found
    assert not any(allowed(module, "engine") for module in found - {"fedbip_hub"})


def test_importing_the_engine_loads_no_hub_store_or_training_code() -> None:
    """What actually gets imported at run time, transitively, not just what files say."""
    loaded = modules_loaded_by("import importlib, pkgutil\n"
                               "import fedbip_hub.engine as engine\n"
                               "for m in pkgutil.iter_modules(engine.__path__):\n"
                               "    importlib.import_module('fedbip_hub.engine.' + m.name)")
    assert len([m for m in loaded if m.startswith("fedbip_hub.engine.")]) >= 10
    leaked = {m for m in loaded if m.split(".")[0] in FRAMEWORKS - {"tqdm"}  # torch's own
              or m.startswith(("fedbip_hub.stores", "fedbip_hub.training",
                               "fedbip_hub.server", "fedbip_hub.federation",
                               "fedbip_hub.scheduling"))}
    assert not leaked, sorted(leaked)


def test_no_module_over_400_lines() -> None:
    """Small modules with one responsibility (the test Hub server is exempt)."""
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "cli").rglob("*.py"),
               *(ROOT / "server_job").rglob("*.py")]
    long = {str(path.relative_to(ROOT)): n for path in sources
            if PACKAGE / "testing" not in path.parents
            and (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
