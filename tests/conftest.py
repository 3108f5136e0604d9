"""Hub set-up shared by the whole suite: a local Hub-compatible server on 127.0.0.1.

huggingface_hub freezes HF_ENDPOINT (and the resolve-URL template, HF_HOME...) when it is
first imported, and PEFT calls `hf_hub_download` without an endpoint, so the environment
is set here, at import time, before any test module imports huggingface_hub.

Keep this file to the Hub set-up; other fixtures live in their own modules.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HUB_PORT = _free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
HUB_TOKEN = "hf_fedbip_test_admin_token"
HUB_USER = "fed-admin"
HUB_ORGS = ("fedorg",)
HF_HOME = Path(tempfile.mkdtemp(prefix="fedbip-hf-home-"))
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)

_HUB_ENV = {
    "HF_ENDPOINT": HUB_ENDPOINT,
    "HF_TOKEN": HUB_TOKEN,
    "HF_HOME": str(HF_HOME),
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
os.environ.update(_HUB_ENV)
# Tiny models on a shared 2-core machine: one thread is ~30× faster than contended
# threads, here and in every CLI subprocess (they inherit the environment).
os.environ["OMP_NUM_THREADS"] = "1"
for _name in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HUGGING_FACE_HUB_TOKEN",
):
    os.environ.pop(_name, None)

_early_constants = sys.modules.get("huggingface_hub.constants")
if _early_constants is not None and _early_constants.ENDPOINT != HUB_ENDPOINT:
    raise RuntimeError(  # a plugin imported huggingface_hub before this file ran
        "huggingface_hub was imported before tests/conftest.py could point HF_ENDPOINT at "
        "the local hub; run pytest without plugins that import it early."
    )

from fedbip_hub.testing.hub_server import HubServer  # noqa: E402


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """The session's local Hub, on HF_ENDPOINT's port, knowing HF_TOKEN (fed-admin, fedorg)."""
    server = HubServer(HUB_PORT, token=HUB_TOKEN, user=HUB_USER, orgs=HUB_ORGS).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: HubServer) -> Iterator[HubServer]:
    """The local Hub, emptied (repos, faults, extra tokens, request log) before each test."""
    hub_server.reset()
    yield hub_server
    hub_server.clear_faults()


@pytest.fixture
def hub_cache_dir(tmp_path: Path) -> Path:
    """A fresh Hub download cache for one test (pass it as `cache_dir=`)."""
    path = tmp_path / "hf-cache"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def hub_env() -> dict[str, str]:
    """Environment variables a subprocess needs to talk to the local Hub (merge into os.environ)."""
    return dict(_HUB_ENV)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama for 3-way sequence classification, saved once per session."""
    from federation_helpers import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base")
