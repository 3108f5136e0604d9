"""How much memory one LoRA training run needs, before any weight is loaded.

``ModelShape.from_config`` counts parameters on the meta device (no weights, no download
beyond the config); ``estimate`` is pure arithmetic over that shape and the run's options:

* the frozen base at its dtype, or bitsandbytes 4-bit (NF4 with double-quantized scales)
  or 8-bit (LLM.int8 with one fp32 scale per row) for its linear layers;
* the trainable parameters (LoRA factors, the classification head copy PEFT trains) in
  fp32, their fp32 gradients and AdamW's two fp32 moments: 16 bytes each;
* the activations autograd keeps for the backward pass, from hidden size, intermediate
  size, layers, sequence length and batch: without checkpointing every layer's, with it
  each layer's input plus one layer recomputed at a time; plus the backward pass's
  gradients of one layer's activations; an 8-bit base also keeps an fp16 copy of each
  linear layer's input;
* for a causal LM, the logits: the loss's backward through log-softmax holds three
  fp32 vocabulary-sized tensors per token at once (its saved output, the gradient coming
  from the loss, the gradient it returns). That is the step's first moment in backward,
  before any layer is recomputed or has gradients of its own, so the peak is the larger
  of (stored activations + logits) and (the layers' own peak), not their sum.

It is the peak of the training steps: loading a checkpoint may briefly take more on the
host (a quantized load reads the full-precision shard before quantizing it).

The per-token coefficients were counted from a decoder layer (Llama/Mistral/Qwen-like,
SDPA attention) with ``torch.autograd.graph.saved_tensors_hooks``, leaving out the
frozen weights autograd also keeps (they are the base's bytes): about 6.25 hidden-sized
and 3 intermediate-sized tensors per token per layer, and, per LoRA module with dropout,
the dropout's output and mask. Other architectures land close, not exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024 ** 3
# Saved-for-backward elements per token per layer (see the module docstring).
HIDDEN_TERMS = 6.25
INTERMEDIATE_TERMS = 3.0
# Per LoRA module with dropout: its output (activation dtype) and mask, in bytes per h.
DROPOUT_EXTRA_BYTES = 1.5
# With checkpointing, what each layer keeps: its input and the rotary position tensors.
CHECKPOINT_HIDDEN_TERMS = 1.5
# Under half-precision autocast the norms still keep fp32 copies (elements per h).
HALF_NORM_FP32_TERMS = 1.3
# The backward pass's own gradients of one layer's activations, live at once: about two
# intermediate-sized and two hidden-sized tensors per token.
WORKSPACE_INTERMEDIATE_TERMS = 2.0
WORKSPACE_HIDDEN_TERMS = 2.0
# A causal LM's loss backward: log-softmax's saved fp32 output, the fp32 gradient from
# the loss and the fp32 gradient of the logits it returns, per token and vocabulary entry.
LOGITS_BACKWARD_BYTES = 4 + 4 + 4
# bitsandbytes storage per quantized weight: NF4 packs 2 per byte, plus one 8-bit absmax
# per 64 weights and one fp32 scale per 256 absmax (double quantization); int8 is 1 byte.
BYTES_4BIT = 0.5 + 1 / 64 + 4 / (64 * 256)
BYTES_8BIT = 1.0
TRAINABLE_BYTES = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW exp_avg and exp_avg_sq
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
HEAD_NAMES = ("lm_head", "score", "classifier")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a base model and its LoRA."""

    n_params: int          # every base parameter
    n_linear: int          # weights of the linear layers bitsandbytes would quantize
    n_trainable: int       # LoRA factors plus trainable head copies (modules_to_save)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    lora_modules_per_layer: int
    linear_per_layer: int  # the base's linear modules in one layer (7 in a Llama layer)
    lora_r: int
    lora_dropout: float
    causal_lm: bool

    @classmethod
    def from_config(cls, hf_config: Any, *, task_type: str, num_labels: int | None,
                    lora_config: Any) -> ModelShape:
        """Count the parameters of ``hf_config``'s model plus ``lora_config`` on the meta
        device: shapes only, nothing is allocated."""
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        causal = task_type == "CAUSAL_LM"
        with torch.device("meta"):
            if causal:
                model = AutoModelForCausalLM.from_config(hf_config)
            else:
                hf_config.num_labels = num_labels or 2
                model = AutoModelForSequenceClassification.from_config(hf_config)
            n_params = sum(p.numel() for p in model.parameters())
            linears = [m for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear)
                       and name.rsplit(".", 1)[-1] not in HEAD_NAMES]
            n_linear = sum(m.weight.numel() for m in linears)
            peft_model = get_peft_model(model, lora_config)
            n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            lora_modules = sum(1 for name, _ in peft_model.named_modules()
                               if name.endswith(".lora_A"))
        text = getattr(hf_config, "text_config", None) or hf_config
        hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "d_model", 0))
        layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))
        intermediate = int(getattr(text, "intermediate_size", 0)
                           or getattr(text, "ffn_dim", 0) or 4 * hidden)
        return cls(n_params=n_params, n_linear=n_linear, n_trainable=n_trainable,
                   hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                   vocab_size=int(getattr(text, "vocab_size", 0)),
                   lora_modules_per_layer=round(lora_modules / max(layers, 1)),
                   linear_per_layer=round(len(linears) / max(layers, 1)),
                   lora_r=int(lora_config.r), lora_dropout=float(lora_config.lora_dropout),
                   causal_lm=causal)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training run, by part; ``total`` counts the activations of the run's
    own checkpointing setting. The ``activations*`` fields are peaks that include a causal
    LM's logits; ``logits`` is those alone (0 for classification)."""

    base: int
    trainable: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    logits: int
    total: int
    dtype: str
    quantize: str | None
    gradient_checkpointing: bool
    batch_size: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The estimate as a few readable lines."""
        base = f"{self.quantize} (bitsandbytes)" if self.quantize else self.dtype
        other = ("without" if self.gradient_checkpointing else "with")
        other_bytes = (self.activations_without_checkpointing if self.gradient_checkpointing
                       else self.activations_with_checkpointing)
        return [
            f"base model ({base}): {gib(self.base)}",
            f"LoRA + head (fp32 weights, gradients, AdamW states): {gib(self.trainable)}",
            f"activations, batch {self.batch_size} × {self.seq_len} tokens, "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}: "
            f"{gib(self.activations)} ({other} checkpointing: {gib(other_bytes)})"
            + (f", of which logits {gib(self.logits)}" if self.logits else ""),
            f"total: {gib(self.total)}",
        ]


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 2**20:.1f} MiB"


def estimate(shape: ModelShape, *, dtype: str, quantize: str | None, batch_size: int,
             seq_len: int, gradient_checkpointing: bool, activation_dtype: str
             ) -> MemoryEstimate:
    """Peak bytes of a LoRA training step (see the module docstring for each part).

    Args:
        dtype: the frozen base's dtype ("fp32", "bf16", "fp16"); with ``quantize`` the
            dtype of what bitsandbytes leaves unquantized (embeddings, norms, head).
        quantize: None, "4bit" or "8bit".
        activation_dtype: the dtype activations are computed in (the autocast dtype).
    """
    weight = DTYPE_BYTES[dtype]
    if quantize is None:
        base = shape.n_params * weight
    else:
        per = BYTES_4BIT if quantize == "4bit" else BYTES_8BIT
        # prepare_model_for_kbit_training upcasts what is not quantized to fp32
        base = shape.n_linear * per + (shape.n_params - shape.n_linear) * 4
    trainable = shape.n_trainable * TRAINABLE_BYTES
    act = DTYPE_BYTES[activation_dtype]
    tokens = batch_size * seq_len
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = tokens * act * (HIDDEN_TERMS * h + INTERMEDIATE_TERMS * i)
    if act < 4:
        per_layer += tokens * 4 * HALF_NORM_FP32_TERMS * h
    if quantize == "8bit":  # bitsandbytes' int8 matmul keeps an fp16 copy of each input
        per_layer += tokens * 2 * ((shape.linear_per_layer - 1) * h + i)
    per_layer += tokens * shape.lora_modules_per_layer * (
        shape.lora_r * act + (h * (act + DROPOUT_EXTRA_BYTES) if shape.lora_dropout > 0
                              else 0))
    workspace = tokens * act * (WORKSPACE_INTERMEDIATE_TERMS * i + WORKSPACE_HIDDEN_TERMS * h)
    # What the layers hold when backward starts: every layer's saved tensors, or with
    # checkpointing each layer's input (one layer is recomputed at a time later on).
    stored_without = shape.num_layers * per_layer
    stored_with = shape.num_layers * tokens * act * CHECKPOINT_HIDDEN_TERMS * h
    logits = tokens * shape.vocab_size * LOGITS_BACKWARD_BYTES if shape.causal_lm else 0
    # The logits' peak comes first in backward, on top of the stored activations only;
    # the layers' own peak (their gradients, a recomputed layer) comes later.
    without = int(max(stored_without + workspace, stored_without + logits))
    with_ckpt = int(max(stored_with + per_layer + workspace, stored_with + logits))
    activations = with_ckpt if gradient_checkpointing else without
    return MemoryEstimate(
        base=int(base), trainable=int(trainable), activations=activations,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_ckpt, logits=int(logits),
        total=int(base + trainable + activations), dtype=dtype, quantize=quantize,
        gradient_checkpointing=gradient_checkpointing, batch_size=batch_size,
        seq_len=seq_len)


def fix_for(est: MemoryEstimate) -> str:
    """What to change when ``est`` does not fit, largest saving first."""
    fixes = []
    if est.quantize != "4bit":
        fixes.append("--quantize 4bit")
    if not est.gradient_checkpointing:
        fixes.append("--gradient-checkpointing")
    if est.batch_size > 1:
        fixes.append(f"a smaller --batch-size (e.g. {max(1, est.batch_size // 4)}) with "
                     "--grad-accum to keep the effective batch")
    fixes.append("a smaller --max-length")
    return "Try " + ", ".join(fixes) + "."
