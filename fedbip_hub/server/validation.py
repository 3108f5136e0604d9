"""The gate every upload passes before any maths: one precise, actionable reason per refusal.

``fedbip push`` and the server run the same functions. Headers are checked first (cheap),
then every number the member controls against the federation's limits, values last
(every tensor finite), and finally the task vector's own norms, in float64, for this
client alone: an upload past the bounds is refused before its numbers meet anyone else's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fedbip_hub.adapters.config import CONFIG_NAME
from fedbip_hub.adapters.lora import LoraAdapter
from fedbip_hub.adapters.metadata import UploadMetadata
from fedbip_hub.engine.lowrank import lowrank_gram
from fedbip_hub.engine.task_vectors import TaskVector
from fedbip_hub.errors import AdapterError
from fedbip_hub.federation.config import FederationConfig, Limits

_DIVERGED = ("Check the training for divergence or a scaling bug (lora_alpha, r), then "
             "push again")


def _refuse(message: str, hint: str, label: str | None) -> AdapterError:
    return AdapterError(message, hint=hint, client=label)


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
    check_metadata(metadata, config, label=label)
    _check_modules(adapter, init, config, label)
    _check_scaling(adapter, config.limits, label)
    if check_values:
        for module in adapter.modules:
            adapter.lora_factors(module)
        for name in adapter.dense:
            adapter.dense_tensor(name)
    return adapter, metadata


def check_metadata(metadata: UploadMetadata, config: FederationConfig, *,
                   label: str | None = None) -> None:
    """The upload's metadata against the federation: its base model and n_examples.

    Raises:
        AdapterError: naming the client, the problem and the fix.
    """
    limit = config.limits.max_n_examples
    if metadata.n_examples > limit:
        raise _refuse(f"declares n_examples={metadata.n_examples}, over the federation's "
                      f"limit of {limit}.",
                      "Declare the number of examples the adapter was trained on (`fedbip "
                      "push --n-examples N`).", label)
    _check_base(metadata, config, label)


def _check_scaling(adapter: LoraAdapter, limits: Limits, label: str | None) -> None:
    config = adapter.config
    ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v
                                for k, v in config.rank_pattern.items()}}
    for where, rank in ranks.items():
        if rank > limits.max_rank:
            raise _refuse(f"{CONFIG_NAME} has {where}={rank}, over the limit "
                          f"{limits.max_rank}.", "Train with a smaller r.", label)
    for name, info in adapter.modules.items():
        if not (math.isfinite(info.scale) and 0 < info.scale <= limits.max_scaling):
            raise _refuse(
                f"module {name} has LoRA scaling {info.scale:.6g} (lora_alpha "
                f"{config.alpha_of(name):.6g}, rank {info.rank}"
                f"{', rsLoRA' if config.use_rslora else ''}), over the federation's limit "
                f"of {limits.max_scaling:g}.",
                "Train with a usual lora_alpha (such as 2·r) and push again.", label)


def check_task_vector(vector: TaskVector, limits: Limits, *, label: str | None = None
                      ) -> float:
    """Bound one client's task vector on its own, in float64, before it meets others.

    Each module's factors (s·B and A, stacked with its start's) must have a finite
    Frobenius norm within ``limits.max_factor_norm``: by Cauchy–Schwarz that bounds every
    Gram entry the round computes in float32 with this client. Each module's own Gram
    entry ‖τ_m‖² must be finite, and ‖τ‖ over the whole model within
    ``limits.max_task_vector_norm``.

    Returns:
        ‖τ‖_F.

    Raises:
        AdapterError: naming the client, the module and the bound.
    """
    exact = TaskVector(vector.upload, vector.start, name=vector.name, dtype=torch.float64)
    total = 0.0
    for module in exact.lora_modules:
        delta = exact.lowrank(module)
        for which, factor in (("s·B", delta.u), ("A", delta.v)):
            norm = float(torch.linalg.vector_norm(factor))
            if not (math.isfinite(norm) and norm <= limits.max_factor_norm):
                raise _refuse(f"module {module}: the task vector's {which} factors have norm "
                              f"{norm:.6g}, over the federation's limit of "
                              f"{limits.max_factor_norm:g} (limits.max_factor_norm).",
                              _DIVERGED + ".", label)
        total += _own_sq_norm(module, float(lowrank_gram([delta.u], [delta.v])[0, 0]), label)
    for name in exact.dense_params:
        value = exact.dense(name).value
        total += _own_sq_norm(name, float((value * value).sum()), label)
    norm = math.sqrt(total)
    if not (math.isfinite(norm) and norm <= limits.max_task_vector_norm):
        raise _refuse(f"the task vector has norm {norm:.6g}, over the federation's limit of "
                      f"{limits.max_task_vector_norm:g} (limits.max_task_vector_norm).",
                      _DIVERGED + ".", label)
    return norm


def _own_sq_norm(module: str, value: float, label: str | None) -> float:
    if not math.isfinite(value):
        raise _refuse(f"module {module}: the task vector's squared norm is {value} in "
                      "float64.", _DIVERGED + ".", label)
    return max(value, 0.0)


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
