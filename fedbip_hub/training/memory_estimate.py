"""How much memory one LoRA training run needs, before any weight is loaded.

``ModelShape.from_config`` counts parameters on the meta device (no weights, no download
beyond the config); ``estimate`` is pure arithmetic over that shape and the run's options:

* the frozen base at its dtype, or bitsandbytes 4-bit (NF4 with double-quantized scales
  and two code tables per layer) or 8-bit (LLM.int8 with one fp32 scale per row) for its
  linear layers, and the rest (embeddings, norms, head) in fp32, as
  ``prepare_model_for_kbit_training`` upcasts it;
* the trainable parameters (LoRA factors, the classification head copy PEFT trains) in
  fp32, their fp32 gradients and AdamW's two fp32 moments: 16 bytes each;
* the activations autograd keeps for the backward pass, from hidden size, intermediate
  size, layers, sequence length and batch: without checkpointing every layer's, with it
  each layer's input plus one layer recomputed at a time; plus the backward pass's
  gradients of one layer's activations; an 8-bit base also holds each linear layer's
  input by reference, outside what checkpointing drops. The hidden states between
  layers keep the embeddings' dtype: under half-precision autocast over a quantized
  base (fp32 embeddings, and bitsandbytes' layers return their input's dtype) the MLP's
  tensors, each layer's checkpointed input and their gradients stay fp32;
* for a causal LM, the logits: the loss's backward through log-softmax holds three
  fp32 vocabulary-sized tensors per token at once (its saved output, the gradient coming
  from the loss, the gradient it returns). That is the step's first moment in backward,
  before any layer is recomputed or has gradients of its own, so the peak is the larger
  of (stored activations + logits) and (the layers' own peak), not their sum. A frozen
  fp32 head (a quantized base's) under half autocast adds the half copy of its weight
  that autocast makes and the backward keeps.

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
# The distinct inputs of a Llama-like layer's linears (q/k/v share one, gate/up another):
# three hidden-sized (attention, o_proj, MLP) and one intermediate-sized (down_proj).
INT8_HELD_HIDDEN_INPUTS = 3
INT8_HELD_INTERMEDIATE_INPUTS = 1
# A causal LM's loss backward: log-softmax's saved fp32 output, the fp32 gradient from
# the loss and the fp32 gradient of the logits it returns, per token and vocabulary entry.
LOGITS_BACKWARD_BYTES = 4 + 4 + 4
# bitsandbytes storage per quantized weight: NF4 packs 2 per byte, plus one 8-bit absmax
# per 64 weights and one fp32 scale per 256 absmax (double quantization); int8 is 1 byte.
BYTES_4BIT = 0.5 + 1 / 64 + 4 / (64 * 256)
BYTES_8BIT = 1.0
# Per 4-bit module, fp32 code tables: NF4's 16 values and the 256 of the 8-bit code its
# absmax is double-quantized with. Per 8-bit weight row: its fp32 absmax scale (SCB).
CODE_TABLE_BYTES_4BIT = (16 + 256) * 4
ROW_SCALE_BYTES_8BIT = 4
TRAINABLE_BYTES = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW exp_avg and exp_avg_sq
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
HEAD_NAMES = ("lm_head", "score", "classifier")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a base model and its LoRA."""

    n_params: int          # every base parameter
    n_linear: int          # weights of the linear layers bitsandbytes would quantize
    n_linear_modules: int  # those layers
    n_linear_rows: int     # their output features, summed
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
        return cls(n_params=n_params, n_linear=n_linear, n_linear_modules=len(linears),
                   n_linear_rows=sum(m.out_features for m in linears), n_trainable=n_trainable,
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
        if quantize == "4bit":
            quantized = (shape.n_linear * BYTES_4BIT
                         + shape.n_linear_modules * CODE_TABLE_BYTES_4BIT)
        else:
            quantized = shape.n_linear * BYTES_8BIT + shape.n_linear_rows * ROW_SCALE_BYTES_8BIT
        # prepare_model_for_kbit_training upcasts what is not quantized to fp32
        base = quantized + (shape.n_params - shape.n_linear) * 4
    trainable = shape.n_trainable * TRAINABLE_BYTES
    act = DTYPE_BYTES[activation_dtype]
    # The hidden states between layers keep the embeddings' dtype, also under autocast:
    # fp32 for an fp32 base and for a quantized one (whose embeddings were upcast).
    # bitsandbytes' layers return their input's dtype, so a quantized base's MLP tensors
    # are fp32 as well; nn.Linear under autocast returns the autocast dtype.
    fp32_rest = quantize is not None or dtype == "fp32"
    stream = 4 if fp32_rest else act
    mlp = 4 if quantize is not None else act
    tokens = batch_size * seq_len
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = tokens * (act * HIDDEN_TERMS * h + mlp * INTERMEDIATE_TERMS * i)
    if act < 4:
        per_layer += tokens * 4 * HALF_NORM_FP32_TERMS * h
    # bitsandbytes' int8 matmul holds each input by reference (a ctx attribute, so
    # checkpointing cannot drop it): per layer the attention's, o_proj's, the MLP's and
    # down_proj's. Without checkpointing autograd saves o_proj's input anyway.
    held_8bit = (tokens * stream * (INT8_HELD_HIDDEN_INPUTS * h
                                    + INT8_HELD_INTERMEDIATE_INPUTS * i)
                 if quantize == "8bit" else 0)
    if quantize == "8bit":
        per_layer += held_8bit - tokens * stream * h
    per_layer += tokens * shape.lora_modules_per_layer * (
        shape.lora_r * act + (h * (act + DROPOUT_EXTRA_BYTES) if shape.lora_dropout > 0
                              else 0))
    workspace = tokens * (WORKSPACE_INTERMEDIATE_TERMS * i * mlp
                          + WORKSPACE_HIDDEN_TERMS * h * stream)
    # What the layers hold when backward starts: every layer's saved tensors, or with
    # checkpointing each layer's input (one layer is recomputed at a time later on).
    stored_without = shape.num_layers * per_layer
    stored_with = shape.num_layers * (tokens * stream * CHECKPOINT_HIDDEN_TERMS * h + held_8bit)
    logits = 0
    if shape.causal_lm:
        logits = tokens * shape.vocab_size * LOGITS_BACKWARD_BYTES
        if fp32_rest and act < 4:  # autocast's half copy of the frozen fp32 head, kept
            logits += shape.vocab_size * h * act  # for backward until the head's turn
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
