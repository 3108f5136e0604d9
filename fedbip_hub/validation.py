"""The gate every upload passes before any maths: one precise, actionable reason per refusal.

Headers are checked first (cheap), values last (every tensor must be finite).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedbip_hub.adapter_config import CONFIG_NAME
from fedbip_hub.adapter_io import PICKLE_SUFFIXES, WEIGHTS_NAME, LoraAdapter
from fedbip_hub.errors import AdapterError
from fedbip_hub.federation import FederationConfig
from fedbip_hub.upload_metadata import UPLOAD_METADATA_NAME, UploadMetadata


def _refuse(message: str, hint: str, label: str | None) -> AdapterError:
    return AdapterError(message, hint=hint, client=label)


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
        raise _refuse(f"the upload holds pickle-format weights ({', '.join(pickles)}); they "
                      "can run arbitrary code when loaded, so fedbip-hub refuses them.",
                      "Save with PeftModel.save_pretrained(..., safe_serialization=True), "
                      "delete the pickle files from your repo and push with `fedbip push`.",
                      label)
    if not root & {CONFIG_NAME, WEIGHTS_NAME, UPLOAD_METADATA_NAME}:
        return False
    if UPLOAD_METADATA_NAME not in root:
        raise _refuse(f"upload has no {UPLOAD_METADATA_NAME} (start revision, examples, "
                      "base).", "Push with `fedbip push`, which writes it.", label)
    if WEIGHTS_NAME not in root:
        raise _refuse(f"upload has no {WEIGHTS_NAME}.",
                      "Save the adapter with PeftModel.save_pretrained (safetensors) and "
                      "push it with `fedbip push`.", label)
    return True


def validate_upload(folder: str | Path, config: FederationConfig, init: LoraAdapter, *,
                    label: str | None = None, check_values: bool = True
                    ) -> tuple[LoraAdapter, UploadMetadata]:
    """Open an upload and check it against the federation.

    Args:
        folder: the downloaded upload (adapter files + fedbip_upload.json).
        config: the federation's config.
        init: the federation's initial adapter (the reference for modules and shapes).
        label: the client, for messages.
        check_values: read every tensor and refuse NaN/Inf.

    Returns:
        The opened adapter and its metadata.

    Raises:
        AdapterError: naming the client, the problem and the fix.
    """
    folder = Path(folder)
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
    if size_mb > config.limits.max_adapter_mb:
        raise _refuse(f"upload is {size_mb:.1f} MB, over the federation's limit of "
                      f"{config.limits.max_adapter_mb:g} MB.",
                      "Lower the LoRA rank or target fewer modules.", label)
    adapter = LoraAdapter(folder, label=label)
    metadata = UploadMetadata.read(folder, label=label)
    if metadata is None:
        raise _refuse("upload has no fedbip_upload.json (start revision, examples, base).",
                      "Push with `fedbip push`, which writes it.", label)
    _check_base(metadata, config, label)
    _check_modules(adapter, init, config, label)
    if check_values:
        for module in adapter.modules:
            adapter.lora_factors(module)
        for name in adapter.dense:
            adapter.dense_tensor(name)
    return adapter, metadata


def _check_base(metadata: UploadMetadata, config: FederationConfig, label: str | None) -> None:
    if metadata.base_model is not None and metadata.base_model != config.base_model:
        raise _refuse(f"trained on base model {metadata.base_model!r}, but the federation "
                      f"uses {config.base_model!r}.",
                      "Retrain from the federation's base model (`fedbip train` reads it "
                      "from the federation).", label)
    if (config.base_revision and metadata.base_revision
            and metadata.base_revision != config.base_revision):
        raise _refuse(f"trained on base revision {metadata.base_revision}, the federation "
                      f"pins {config.base_revision}.",
                      "Retrain on the pinned base revision.", label)


def _check_modules(adapter: LoraAdapter, init: LoraAdapter, config: FederationConfig,
                   label: str | None) -> None:
    extra = sorted(set(adapter.modules) - set(init.modules))
    missing = sorted(set(init.modules) - set(adapter.modules))
    if extra or missing:
        raise _refuse(
            f"target modules differ from the federation's ({config.lora.target_modules}): "
            f"unexpected {extra[:3]}, missing {missing[:3]}.",
            f"Train with target_modules={config.lora.target_modules}.", label)
    for name, info in adapter.modules.items():
        ref = init.modules[name]
        if (info.out_features, info.in_features) != (ref.out_features, ref.in_features):
            raise _refuse(
                f"module {name} is {info.out_features}×{info.in_features}, the base model's "
                f"is {ref.out_features}×{ref.in_features}.",
                "The adapter was trained on a different base model; retrain on the "
                "federation's.", label)
        if info.rank > config.limits.max_rank:
            raise _refuse(f"module {name} has rank {info.rank}, over the limit "
                          f"{config.limits.max_rank}.", "Train with a smaller r.", label)
    if set(adapter.dense) != set(init.dense):
        raise _refuse(f"saved dense modules {sorted(adapter.dense)} differ from the "
                      f"federation's {sorted(init.dense)}.",
                      "Train from the federation's initial adapter (`fedbip train`).", label)
    for name, param in adapter.dense.items():
        if param.shape != init.dense[name].shape:
            raise _refuse(f"{name} has shape {list(param.shape)}, expected "
                          f"{list(init.dense[name].shape)}.",
                          "Use the federation's num_labels and base model.", label)
