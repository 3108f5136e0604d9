"""A bitsandbytes-quantized frozen base for QLoRA training (the ``quantize`` extra).

Only the base's linear layers are quantized; the classification head stays in full
precision (PEFT trains a copy of it), and the LoRA factors are ordinary fp32 tensors over
the same module names, so the saved adapter is a plain LoRA the server merges as any other.
"""

from __future__ import annotations

from typing import Any

import torch

from fedbip_hub.errors import ConfigError
from fedbip_hub.federation.config import FederationConfig
from fedbip_hub.training.memory_estimate import HEAD_NAMES

QUANTIZE_MODES = ("4bit", "8bit")


def require_bitsandbytes(mode: str) -> None:
    """Refuse early (before any load) when bitsandbytes is missing."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"unknown quantization {mode!r}.",
                          hint=f"Use --quantize {' or '.join(QUANTIZE_MODES)}.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--quantize {mode} needs bitsandbytes, which is not installed.",
                          hint="pip install 'fedbip-hub[quantize]' (bitsandbytes ≥ 0.45 also "
                          "runs on CPU, slowly), or train without --quantize.") from exc


def bnb_config(mode: str, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    skip = list(HEAD_NAMES)
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_quantized_base(config: FederationConfig, mode: str, *, compute_dtype: torch.dtype,
                        device: torch.device, gradient_checkpointing: bool,
                        token: str | None = None) -> Any:
    """The federation's base with its linear layers quantized, ready for k-bit training
    (peft.prepare_model_for_kbit_training: norms and embeddings in fp32, input grads on).

    Raises:
        ConfigError: the model cannot be loaded or quantized.
    """
    from peft import prepare_model_for_kbit_training

    from fedbip_hub.training.models import model_for_task

    require_bitsandbytes(mode)
    kwargs: dict[str, Any] = {"revision": config.base_revision, "dtype": compute_dtype,
                              "token": token,
                              "quantization_config": bnb_config(mode, compute_dtype)}
    if device.type == "cuda":  # one process, one GPU: accelerate's local device
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    try:
        model = model_for_task(config, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise ConfigError(
            f"cannot load base model {config.base_model!r} quantized to {mode}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            hint="Check the model id and that bitsandbytes supports this device; or train "
            "without --quantize.") from exc
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None):
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    _no_cpu_inference_packing(model)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    release_checkpoint_mapping(model)
    return model


def release_checkpoint_mapping(model: Any) -> int:
    """Copy into memory of their own the CPU tensors that still view the memory-mapped
    checkpoint; returns the bytes copied.

    When the load dtype equals the checkpoint's, transformers leaves the unquantized
    weights (embeddings, norms, head) as views of the safetensors mapping. Any one view
    keeps the whole mapping alive, and with it the pages of every full-precision linear
    weight read once to quantize it: on CPU the process stays that much larger (the
    checkpoint's linear weights at its dtype; 11 MiB on the training benchmark's tiny
    Llama) for the whole run. A storage torch did not allocate is not resizable; that
    marks the views. GPU weights are copies already.
    """
    copied = 0
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        if storage.device.type == "cpu" and not storage.resizable():
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def _no_cpu_inference_packing(model: Any) -> None:
    """Keep bitsandbytes' 4-bit CPU layers on their differentiable path.

    On an AVX512-BF16 CPU, an eval-mode forward (the loss measured before training)
    repacks each 4-bit weight for a faster inference kernel that has no autograd, and
    training afterwards keeps using it: the gradients through the base layers come out
    wrong (bitsandbytes 0.50 warns "an autograd kernel was not registered").
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
