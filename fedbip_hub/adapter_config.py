"""Parse a PEFT LoRA ``adapter_config.json``: ranks, alphas and the per-module scale."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbip_hub.errors import AdapterError

CONFIG_NAME = "adapter_config.json"

# Options that change what a LoRA module computes beyond ΔW = s·B·A; we refuse them
# rather than silently federating something else.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters add a magnitude vector, so their update is not s·B·A",
    "lora_bias": "lora_bias adds a trainable bias to lora_B",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D) stores ΔW transposed",
    "use_qalora": "QA-LoRA pools inputs before lora_A",
}


def pattern_value(patterns: dict[str, Any], module_name: str) -> Any | None:
    """Look a module up in a rank_pattern/alpha_pattern the way PEFT does.

    PEFT treats each key as a regex that must match the end of the module name at a dot
    boundary, and takes the first key (in insertion order) that matches.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The parts of a PEFT LoRA config that define each module's ΔW, plus provenance."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    task_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def rank_of(self, module_name: str) -> int:
        value = pattern_value(self.rank_pattern, module_name)
        return int(value) if value is not None else self.r

    def alpha_of(self, module_name: str) -> float:
        value = pattern_value(self.alpha_pattern, module_name)
        return float(value) if value is not None else float(self.lora_alpha)

    def scale_of(self, module_name: str) -> float:
        """The factor s in ΔW = s·B·A for this module (alpha/r, or alpha/√r with rsLoRA)."""
        rank = self.rank_of(module_name)
        alpha = self.alpha_of(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = CONFIG_NAME) -> LoraAdapterConfig:
        """Validate and parse a config dict.

        Raises:
            AdapterError: the config is not a plain LoRA config this project can federate.
        """
        peft_type = str(data.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise AdapterError(
                f"{source} has peft_type={data.get('peft_type')!r}; only LoRA adapters can be "
                "federated.",
                hint="Train the adapter with peft.LoraConfig (peft_type 'LORA').",
            )
        for flag, why in _UNSUPPORTED_FLAGS.items():
            if data.get(flag):
                raise AdapterError(
                    f"{source} sets {flag}=true: {why}.",
                    hint=f"Train with {flag}=false to federate this adapter.",
                )
        try:
            r = int(data["r"])
            alpha = float(data["lora_alpha"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(
                f"{source} lacks a valid 'r' or 'lora_alpha' ({exc}).",
                hint="Save the adapter with PeftModel.save_pretrained so the config is complete.",
            ) from exc
        if r <= 0 or not math.isfinite(alpha):
            raise AdapterError(
                f"{source} has r={r}, lora_alpha={alpha}; r must be positive, alpha finite.",
                hint="Re-save the adapter with a valid LoraConfig.",
            )
        try:  # hostile or hand-edited configs must fail as AdapterError, never crash
            rank_pattern = {str(k): int(v) for k, v in dict(data.get("rank_pattern") or {}
                                                             ).items()}
            alpha_pattern = {str(k): float(v) for k, v in dict(data.get("alpha_pattern") or {}
                                                                ).items()}
            for key in (*rank_pattern, *alpha_pattern):
                re.compile(key)
            modules_to_save = tuple(str(m) for m in data.get("modules_to_save") or ())
        except (TypeError, ValueError, re.error) as exc:
            raise AdapterError(
                f"{source} has a malformed rank_pattern, alpha_pattern or modules_to_save "
                f"({exc}).",
                hint="Re-save the adapter with PeftModel.save_pretrained.",
            ) from exc
        if any(v <= 0 for v in rank_pattern.values()):
            raise AdapterError(
                f"{source} has a non-positive rank in rank_pattern.",
                hint="Every rank_pattern entry must be a positive integer.",
            )
        targets = data.get("target_modules")
        if isinstance(targets, list):
            targets = tuple(sorted(map(str, targets)))
        return cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            target_modules=targets,
            modules_to_save=modules_to_save,
            base_model_name_or_path=data.get("base_model_name_or_path"),
            base_model_revision=data.get("revision"),
            task_type=data.get("task_type"),
            raw=dict(data),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> LoraAdapterConfig:
        """Read ``adapter_config.json`` from an adapter folder.

        Raises:
            AdapterError: the file is missing or is not valid JSON.
        """
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise AdapterError(
                f"No {CONFIG_NAME} in {folder}.",
                hint="Point at a folder written by PeftModel.save_pretrained "
                "(it holds adapter_config.json and adapter_model.safetensors).",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterError(
                f"{path} is not valid JSON ({exc}).",
                hint="Re-save the adapter with PeftModel.save_pretrained.",
            ) from exc
        if not isinstance(data, dict):
            raise AdapterError(f"{path} must hold a JSON object.", hint="Re-save the adapter.")
        return cls.from_dict(data, source=str(path))
