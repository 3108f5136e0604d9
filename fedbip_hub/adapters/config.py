"""Parse a PEFT LoRA ``adapter_config.json``: ranks, alphas and the per-module scale."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fedbip_hub.adapters.patterns import PatternKeyError, PatternTable
from fedbip_hub.errors import AdapterError
from fedbip_hub.safe_json import KIB, JsonLimitError, loads_bounded

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1024 * KIB
# Hard ceilings, whatever the federation's limits: past them a rank or an alpha is not a
# number the maths can hold (the federation's own limits are checked in validation.py).
MAX_RANK_VALUE = 1 << 20
MAX_ALPHA_VALUE = 1e30

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
    boundary, and takes the first key (in insertion order) that matches; only plain
    module names or suffixes are accepted (``fedbip_hub.adapters.patterns``), matched in
    linear time.

    Raises:
        PatternKeyError: a key is not a plain module name or suffix.
    """
    return PatternTable(patterns).value_for(module_name)


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

    @cached_property
    def _rank_table(self) -> PatternTable:
        return PatternTable(self.rank_pattern)

    @cached_property
    def _alpha_table(self) -> PatternTable:
        return PatternTable(self.alpha_pattern)

    def rank_of(self, module_name: str) -> int:
        value = self._rank_table.value_for(module_name)
        return int(value) if value is not None else self.r

    def alpha_of(self, module_name: str) -> float:
        value = self._alpha_table.value_for(module_name)
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
        if "r" not in data or "lora_alpha" not in data:
            raise AdapterError(
                f"{source} lacks 'r' or 'lora_alpha'.",
                hint="Save the adapter with PeftModel.save_pretrained so the config is complete.",
            )
        field = "r"
        try:  # hostile or hand-edited configs must fail as AdapterError, never crash
            r = _rank(data["r"], "r")
            field = "lora_alpha"
            alpha = _alpha(data["lora_alpha"], "lora_alpha")
            field = "rank_pattern"
            rank_pattern = {k: _rank(v, f"rank_pattern[{_short(k)}]")
                            for k, v in _mapping(data.get("rank_pattern"), field)}
            PatternTable(rank_pattern)
            field = "alpha_pattern"
            alpha_pattern = {k: _alpha(v, f"alpha_pattern[{_short(k)}]")
                             for k, v in _mapping(data.get("alpha_pattern"), field)}
            PatternTable(alpha_pattern)
            field = "modules_to_save"
            modules_to_save = _strings(data.get("modules_to_save"), field)
        except (TypeError, ValueError) as exc:
            raise AdapterError(
                f"{source} has a malformed {field} ({exc}).",
                hint=_HINTS.get(type(exc), "Re-save the adapter with PeftModel.save_pretrained."),
            ) from exc
        targets = data.get("target_modules")
        if isinstance(targets, list):
            targets = tuple(sorted(map(str, targets)))
        elif targets is not None and not isinstance(targets, str):
            raise AdapterError(f"{source} has a malformed target_modules (a "
                               f"{type(targets).__name__}).",
                               hint="Re-save the adapter with PeftModel.save_pretrained.")
        return cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            target_modules=targets,
            modules_to_save=modules_to_save,
            base_model_name_or_path=_optional_string(data.get("base_model_name_or_path")),
            base_model_revision=_optional_string(data.get("revision")),
            task_type=_optional_string(data.get("task_type")),
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
            data = loads_bounded(path.read_bytes(), max_bytes=MAX_CONFIG_BYTES)
        except JsonLimitError as exc:
            raise AdapterError(
                f"{path} is refused: {exc}.",
                hint="Re-save the adapter with PeftModel.save_pretrained.",
            ) from exc
        if not isinstance(data, dict):
            raise AdapterError(f"{path} must hold a JSON object.", hint="Re-save the adapter.")
        return cls.from_dict(data, source=str(path))


_HINTS = {PatternKeyError: "Write rank_pattern/alpha_pattern keys as plain module names or "
          "suffixes (PEFT matches them the same way), then re-save the adapter."}


def _number(value: object, what: str) -> float | int:
    # bool is an int subclass; "8" or None is not a number a PEFT config writes
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is {type(value).__name__} {_short(value)}, not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} is {value}, not a finite number")
    return value


def _rank(value: object, what: str) -> int:
    number = _number(value, what)
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(f"{what} is {number}, not an integer")
    if number <= 0:
        raise ValueError(f"{what} must be positive (it is {_short(number)}): a non-positive "
                         "rank")
    if number > MAX_RANK_VALUE:
        raise ValueError(f"{what} is {_short(number)}; a rank is at most {MAX_RANK_VALUE}")
    return int(number)


def _alpha(value: object, what: str) -> float:
    number = _number(value, what)
    if not 0 < number <= MAX_ALPHA_VALUE:
        raise ValueError(f"{what} is {_short(number)}; an alpha must be positive and at "
                         f"most {MAX_ALPHA_VALUE:g}")
    return float(number)


def _mapping(value: object, what: str) -> list[tuple[str, object]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise TypeError(f"{what} is a {type(value).__name__}, not an object")
    return list(value.items())


def _strings(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a list of module names")
    return tuple(value)


def _optional_string(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
