"""Offline ingredients for the examples: a tiny base model folder (config + weights +
tokenizer files, which is all a local ``--base-model`` needs) and members' data files.

A real federation points ``--base-model`` at a Hub id or at a folder written by
``AutoModel...save_pretrained`` plus ``AutoTokenizer...save_pretrained``; this one is
built from a config, so nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "red", "blue", "green", "cat",
         "dog", "bird", "the", "a", "is", "very"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]
FILLER = WORDS[6:]


def make_tiny_base(folder: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer Llama sequence classifier and a word-level tokenizer, saved together."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                        unk_token="[UNK]")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None,
                         num_labels=num_labels)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sentiment_data(path: Path, *, n: int, seed: int, flip: bool = False) -> Path:
    """``{"text": ..., "label": 0|1}`` JSON Lines: the seq-cls format ``fedbip train``
    reads (``flip`` swaps the labels: a member with a conflicting task)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.randint(0, 1)
        cue = rng.choice(POSITIVE if label else NEGATIVE)
        words = [rng.choice(FILLER) for _ in range(4)] + [cue]
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": label ^ int(flip)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_tiny_causal_base(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama causal LM and a word-level tokenizer with an end-of-sequence
    token (what SFT appends to each completion), saved together."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                        unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=0, bos_token_id=None, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_completion_data(path: Path, *, n: int, seed: int) -> Path:
    """``{"prompt": ..., "completion": ...}`` JSON Lines, the causal-LM format ``fedbip
    train`` and TRL's SFTTrainer both read (the loss is on the completion): the
    completion names the sentiment cue of the prompt."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(3)] + [rng.choice(POSITIVE if label
                                                                      else NEGATIVE)]
        rng.shuffle(words)
        lines.append(json.dumps({"prompt": " ".join(words) + " is",
                                 "completion": " good" if label else " bad"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
