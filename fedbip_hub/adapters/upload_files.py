"""What an upload is made of, judged from a repo's file listing alone.

Torch-free on purpose: ``fedbip status``, ``join`` and ``pull`` read listings and must start
fast, without importing the tensor code that reading the weights needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.metadata import UPLOAD_METADATA_NAME
from fedbip_hub.errors import AdapterError

WEIGHTS_NAME = "adapter_model.safetensors"
# Pickle-based checkpoints execute code on load; we refuse to be near one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, UPLOAD_METADATA_NAME)


def upload_id(metadata_bytes: bytes) -> str:
    """An upload's identity: the hash of its metadata (which carries a nonce per push)."""
    return hashlib.sha256(metadata_bytes).hexdigest()


def check_upload_listing(files: Iterable[str], *, label: str | None = None) -> bool:
    """Whether a client repo's file listing holds an upload, from the listing alone.

    Returns False when nothing has been pushed yet (a new repo). Refuses a partial upload
    and any pickle-format file at the root, which the server would otherwise never see
    (it downloads only the upload files) and silently take for "no upload".

    Raises:
        AdapterError: naming the client, the problem and the fix.
    """
    root = {f for f in files if "/" not in f}
    pickles = sorted(f for f in root if Path(f).suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"the upload holds pickle-format weights ({', '.join(pickles)}); they can run "
            "arbitrary code when loaded, so fedbip-hub refuses them.",
            hint="Push your adapter folder with `fedbip push`, which replaces your repo's "
            "upload files and deletes these in the same commit (save it with "
            "PeftModel.save_pretrained(..., safe_serialization=True)).", client=label)
    if not root & set(UPLOAD_FILES):
        return False
    if UPLOAD_METADATA_NAME not in root:
        raise AdapterError(f"upload has no {UPLOAD_METADATA_NAME} (start revision, examples, "
                           "base).", hint="Push with `fedbip push`, which writes it.",
                           client=label)
    if WEIGHTS_NAME not in root:
        raise AdapterError(f"upload has no {WEIGHTS_NAME}.",
                           hint="Save the adapter with PeftModel.save_pretrained "
                           "(safetensors) and push it with `fedbip push`.", client=label)
    return True
