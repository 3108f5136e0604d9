"""Read PEFT LoRA adapters lazily from safetensors, and write adapters PEFT loads."""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedbip_hub.adapters.config import LoraAdapterConfig
from fedbip_hub.adapters.upload_files import PICKLE_SUFFIXES, WEIGHTS_NAME
from fedbip_hub.errors import AdapterError
from fedbip_hub.safe_json import JsonLimitError, loads_bounded

PEFT_PREFIX = "base_model.model."
ALLOWED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
MAX_HEADER_BYTES = 64 * 1024 * 1024
# A LoRA on every linear layer of a large MoE model has tens of thousands of tensors;
# more, or longer names, is a header built to make the server spin.
MAX_TENSORS = 1 << 17
MAX_KEY_LENGTH = 1024
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_embedding_": "LoRA on embedding layers is not supported yet",
    "lora_magnitude_vector": "DoRA magnitude vectors are not supported",
    ".lora_A.bias": "lora_bias is not supported",
    ".lora_B.bias": "lora_bias is not supported",
}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear layer: where its factors live and how to scale them."""

    name: str
    rank: int
    scale: float
    out_features: int
    in_features: int


@dataclass(frozen=True)
class DenseParam:
    """A full tensor saved for ``modules_to_save`` (a classification head, say)."""

    name: str
    shape: tuple[int, ...]


def refuse_pickles(folder: Path, *, label: str | None = None) -> None:
    """Raise if the folder holds pickle-format weights (never loaded, only refused)."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"{folder} holds pickle-format weights ({', '.join(pickles)}); they can run "
            "arbitrary code when loaded, so fedbip-hub refuses them.",
            hint="Re-save with PeftModel.save_pretrained(..., safe_serialization=True) and "
            "remove the pickle files.",
            client=label,
        )


def _read_safetensors_header(path: Path, *, label: str | None) -> dict:
    """Parse the safetensors header by hand first, so a hostile file fails cleanly."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise AdapterError(f"{path} is truncated (no safetensors header).", client=label,
                               hint="Re-upload the adapter file.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise AdapterError(
                f"{path} has a corrupt safetensors header (length {header_len}, file {size} B).",
                hint="Re-save the adapter with PeftModel.save_pretrained.",
                client=label,
            )
        try:
            header = loads_bounded(handle.read(header_len), max_bytes=MAX_HEADER_BYTES,
                                   max_depth=4)
        except JsonLimitError as exc:
            raise AdapterError(f"{path} has an unreadable safetensors header ({exc}).",
                               client=label, hint="Re-save the adapter.") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{path} has a corrupt safetensors header (not a JSON object).",
                           client=label,
                           hint="Re-save the adapter with PeftModel.save_pretrained.")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise AdapterError(f"{path} has {len(header)} tensors (at most {MAX_TENSORS}).",
                           client=label, hint="Save only the LoRA factors and "
                           "modules_to_save (PeftModel.save_pretrained does).")
    data_len = size - 8 - header_len
    for key, entry in header.items():
        if len(key) > MAX_KEY_LENGTH:
            raise AdapterError(f"{path}: a tensor name is {len(key)} characters long (at "
                               f"most {MAX_KEY_LENGTH}).", client=label,
                               hint="Re-save the adapter with PeftModel.save_pretrained.")
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (_int_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]
                and _int_list(shape)):
            raise AdapterError(
                f"{path}: tensor {key!r} has a malformed header entry (it needs a dtype, a "
                "shape and two data offsets).",
                client=label, hint="Re-save the adapter with PeftModel.save_pretrained.")
        if offsets[1] > data_len:
            raise AdapterError(f"{path}: tensor {key!r} points past the end of the file.",
                               client=label, hint="Re-upload the complete adapter file.")
    return header


def _int_list(value: object) -> bool:
    """A JSON list of non-negative integers (bool, a subclass of int, excluded)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily: headers at open, tensors on demand.

    Args:
        folder: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        label: a name for error messages (the client, usually).

    Raises:
        AdapterError: the folder is not a readable, well-formed LoRA adapter.
    """

    def __init__(self, folder: str | Path, *, label: str | None = None):
        self.folder = Path(folder)
        self.label = label
        if not self.folder.is_dir():
            raise AdapterError(f"Adapter folder {self.folder} does not exist.", client=label,
                               hint="Check the path, or train and save an adapter there first.")
        refuse_pickles(self.folder, label=label)
        try:
            self.config = LoraAdapterConfig.from_folder(self.folder)
        except AdapterError as exc:
            exc.client = exc.client or label
            raise
        self.weights_path = self.folder / WEIGHTS_NAME
        if not self.weights_path.is_file():
            raise AdapterError(
                f"No {WEIGHTS_NAME} in {self.folder}.",
                hint="Save the adapter with PeftModel.save_pretrained (safetensors is the "
                "default).",
                client=label,
            )
        header = _read_safetensors_header(self.weights_path, label=label)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for key, entry in header.items():
            dtype = entry.get("dtype")
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise AdapterError(
                    f"{self.weights_path}: tensor {key!r} has dtype {str(dtype)[:40]}; "
                    "only F32, BF16 and F16 are accepted.",
                    hint="Cast the adapter to float32, bfloat16 or float16 before saving.",
                    client=label,
                )
            self._shapes[key] = tuple(int(d) for d in entry["shape"])
        self.modules, self.dense = self._parse_keys()
        # Keys already checked finite: a round reads each factor several times
        # (validation, similarity, merge), and the check was half of the read time.
        self._finite: set[str] = set()

    # -- header parsing ------------------------------------------------------------------
    def _error(self, message: str, hint: str) -> AdapterError:
        return AdapterError(f"{self.weights_path}: {message}", hint=hint, client=self.label)

    def _parse_keys(self) -> tuple[dict[str, LoraModule], dict[str, DenseParam]]:
        halves: dict[str, dict[str, tuple[int, ...]]] = {}
        dense: dict[str, DenseParam] = {}
        for key, shape in self._shapes.items():
            for marker, why in _UNSUPPORTED_KEYS.items():
                if marker in key:
                    raise self._error(f"key {key!r}: {why}.",
                                      "Train a plain LoRA on linear layers.")
            if not key.startswith(PEFT_PREFIX):
                raise self._error(f"key {key!r} does not start with {PEFT_PREFIX!r}.",
                                  "Save the adapter with PeftModel.save_pretrained.")
            name = key[len(PEFT_PREFIX):]
            match = _LORA_KEY.match(name)
            if match:
                if len(shape) != 2:
                    raise self._error(f"{key!r} has shape {list(shape)}, expected a matrix.",
                                      "Only LoRA on linear layers is supported.")
                halves.setdefault(match["module"], {})[match["which"]] = shape
            elif self._is_saved_module(name):
                dense[name] = DenseParam(name, shape)
            else:
                raise self._error(
                    f"key {key!r} is neither a LoRA factor nor part of modules_to_save "
                    f"{list(self.config.modules_to_save)}.",
                    "Remove stray tensors, or list the module in modules_to_save.",
                )
        modules = {}
        for name in sorted(halves):
            modules[name] = self._module_from_shapes(name, halves[name])
        if not modules:
            raise self._error("holds no LoRA factors.", "Check that training targeted modules.")
        return modules, dict(sorted(dense.items()))

    def _is_saved_module(self, param_name: str) -> bool:
        module = param_name.rsplit(".", 1)[0]
        return any(module == m or module.endswith("." + m) for m in self.config.modules_to_save)

    def _module_from_shapes(self, name: str, shapes: dict[str, tuple[int, ...]]) -> LoraModule:
        if set(shapes) != {"A", "B"}:
            missing = "lora_B" if "A" in shapes else "lora_A"
            raise self._error(f"module {name!r} has no {missing} tensor.",
                              "Re-save the complete adapter.")
        (rank_a, in_features), (out_features, rank_b) = shapes["A"], shapes["B"]
        expected = self.config.rank_of(name)
        if not rank_a == rank_b == expected:
            raise self._error(
                f"module {name!r} has inconsistent shapes: lora_A {list(shapes['A'])}, "
                f"lora_B {list(shapes['B'])}, config rank {expected}.",
                "The adapter file and adapter_config.json disagree; re-save both together.",
            )
        return LoraModule(name, expected, self.config.scale_of(name), out_features, in_features)

    # -- tensor access -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.weights_path.stat().st_size

    def _load(self, keys: list[str], dtype: torch.dtype) -> list[torch.Tensor]:
        try:
            with safe_open(str(self.weights_path), framework="pt") as handle:
                tensors = [handle.get_tensor(PEFT_PREFIX + key) for key in keys]
        except Exception as exc:  # safetensors raises its own untyped errors
            raise self._error(f"could not read {keys} ({exc}).",
                              "Re-upload the adapter file.") from exc
        for key, tensor in zip(keys, tensors, strict=True):
            if key in self._finite:
                continue
            if not torch.isfinite(tensor).all():
                raise self._error(f"tensor {key!r} holds NaN or Inf values.",
                                  "Training diverged; lower the learning rate and retrain.")
            self._finite.add(key)
        return [t.to(dtype) for t in tensors]

    def lora_factors(self, module: str, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(B, A)`` exactly as stored (B is out×r, A is r×in)."""
        b, a = self._load([f"{module}.lora_B.weight", f"{module}.lora_A.weight"], dtype)
        return b, a

    def delta_factors(self, module: str, dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(U, V)`` with ΔW = U·V, the scale folded into U = s·B."""
        b, a = self.lora_factors(module, dtype)
        return b * self.modules[module].scale, a

    def dense_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._load([name], dtype)[0]

    def delta_weight(self, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Materialise ΔW (d_out×d_in). For tests and small sizes only."""
        u, v = self.delta_factors(module, dtype)
        return u @ v

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.folder)!r}, modules={len(self.modules)})"


def _pattern_key(module: str) -> str:
    return re.escape(module)


def save_lora_adapter(
    folder: str | Path,
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    template: LoraAdapterConfig,
    *,
    dense: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    fold_scale: Literal["balanced", "b"] = "balanced",
) -> Path:
    """Write an adapter whose module m has ΔW = U·V, for ``modules[m] = (U, V)``.

    The template's lora_alpha (and alpha_pattern) and use_rslora are kept, so a client
    trains its next round from the result with the federation's scaling rule; ``r`` is the
    most common output rank. Each module's scale is folded back
    out of U evenly (B = U/√s, A = V/√s), or out of U alone (``fold_scale="b"``, which keeps
    A as given: the params-space merge needs that), and a module whose rank differs from
    ``r`` gets an explicit rank_pattern entry.

    Returns:
        The folder written.
    """
    from peft import LoraConfig  # imported here: peft is slow to import

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    tensors: dict[str, torch.Tensor] = {}
    # The most common output rank becomes r, so a uniform merge needs no rank_pattern.
    ranks = [v.shape[0] for _u, v in modules.values()]
    config_r = max(set(ranks), key=ranks.count) if ranks else template.r
    for name, (u, v) in modules.items():
        rank = v.shape[0]
        alpha = template.alpha_of(name)
        if rank != config_r:
            rank_pattern[_pattern_key(name)] = rank
        if alpha != template.lora_alpha:
            alpha_pattern[_pattern_key(name)] = alpha
        scale = LoraAdapterConfig(r=rank, lora_alpha=alpha,
                                  use_rslora=template.use_rslora).scale_of(name)
        b_div, a_div = (scale**0.5, scale**0.5) if fold_scale == "balanced" else (scale, 1.0)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (u / b_div).to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (v / a_div).to(dtype).contiguous()
    for name, value in (dense or {}).items():
        tensors[PEFT_PREFIX + name] = value.to(dtype).contiguous()
    config = LoraConfig(
        r=config_r,
        lora_alpha=template.lora_alpha,
        use_rslora=template.use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=_target_modules(template, modules),
        modules_to_save=list(template.modules_to_save) or None,
        task_type=template.task_type,
        base_model_name_or_path=template.base_model_name_or_path,
        revision=template.base_model_revision,
        lora_dropout=float(template.raw.get("lora_dropout", 0.0) or 0.0),
    )
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def _target_modules(template: LoraAdapterConfig, modules: Mapping[str, object]) -> list[str] | str:
    if isinstance(template.target_modules, str):
        return template.target_modules
    if template.target_modules:
        return list(template.target_modules)
    return sorted({name.rsplit(".", 1)[-1] for name in modules})
