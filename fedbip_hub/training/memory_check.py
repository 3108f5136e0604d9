"""Before any weight loads: the run's memory estimate from the base's config, and the
refusal of a run that cannot fit the GPU's free memory (the model of memory is
``fedbip_hub.training.memory_estimate``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from fedbip_hub.errors import ConfigError
from fedbip_hub.training.args import TrainingArgs
from fedbip_hub.training.memory_estimate import MemoryEstimate, ModelShape, estimate, fix_for, gib
from fedbip_hub.training.numerics import Numerics


def estimate_run(config: Any, base_model: Any, start_dir: Path, args: TrainingArgs,
                 numerics: Numerics, seq_len: int, *, token: str | None = None
                 ) -> MemoryEstimate | None:
    """The run's memory estimate from the base's config (no weights); None where the
    architecture cannot be built on the meta device."""
    from peft import LoraConfig
    from transformers import AutoConfig

    try:
        hf_config = (copy.deepcopy(base_model.config) if base_model is not None else
                     AutoConfig.from_pretrained(config.base_model,
                                                revision=config.base_revision,
                                                token=token))
        lora_config = LoraConfig.from_pretrained(str(start_dir))
        # A saved adapter's config says inference_mode=True (PEFT sets it on save): it
        # would freeze the LoRA factors and count no trainable bytes. This run trains them.
        lora_config.inference_mode = False
        shape = ModelShape.from_config(hf_config, task_type=config.task_type,
                                       num_labels=config.num_labels, lora_config=lora_config)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError):
        return None
    activation = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(numerics.autocast,
                                                                      numerics.dtype)
    return estimate(shape, dtype=numerics.dtype, quantize=args.quantize,
                    batch_size=args.batch_size, seq_len=seq_len,
                    gradient_checkpointing=args.gradient_checkpointing,
                    activation_dtype=activation)


def check_fits(est: MemoryEstimate | None, device: torch.device, client: str) -> None:
    """Stop before loading when the estimate exceeds the GPU's free memory."""
    if est is None or device.type != "cuda":
        return
    free, _total = torch.cuda.mem_get_info(device)
    if est.total > free:
        raise ConfigError(f"training needs about {gib(est.total)} but {device} has "
                          f"{gib(free)} free ({'; '.join(est.lines()[:-1])}).",
                          hint=fix_for(est) + " (--skip-memory-check runs anyway.)",
                          client=client)
