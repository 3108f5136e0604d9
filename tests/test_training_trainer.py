"""`fedbip train` on transformers' Trainer: chat data, gradient accumulation and
checkpointing, a quantized base (QLoRA), dtypes, resume, and the memory estimate.

Tiny Llama models built from configs (no download); LoRA dropout 0 where two runs must
agree step for step.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from federation_helpers import TINY_LLAMA, save_tiny_base
from safetensors.torch import load_file
from test_training import cls_rows, record_training_args, tiny_tokenizer

from fedbip_hub.errors import ConfigError

# A chat template over the test vocabulary: w60 opens a user turn, w61 an assistant turn,
# [EOS] closes each turn.
CHAT_TEMPLATE = ("{% for m in messages %}{{ ('w60 ' if m['role'] == 'user' else 'w61 ') "
                 "+ m['content'] + ' [EOS] ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'w61 ' }}{% endif %}")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_rows(n: int, seed: int) -> list[dict]:
    """The user says three words; the assistant repeats the first, twice on even rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [f"w{rng.randrange(10, 30)}" for _ in range(3)]
        answer = " ".join([words[0]] * (2 if i % 2 == 0 else 1))
        rows.append({"messages": [{"role": "user", "content": " ".join(words)},
                                  {"role": "assistant", "content": answer}]})
    return rows


def varied_sft_rows(n: int, seed: int) -> list[dict]:
    """Completions of 1 to 4 words: token-weighted and example-weighted means differ."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(f"w{rng.randrange(10, 30)}" for _ in range(4)),
             "completion": " ".join(f"w{rng.randrange(30, 40)}"
                                    for _ in range(rng.randint(1, 4)))} for _ in range(n)]


@dataclass
class Feds:
    root: Path
    cls_base: Path
    cls: object       # SEQ_CLS, LoRA dropout 0
    causal: object    # CAUSAL_LM, LoRA dropout 0
    wide: object      # SEQ_CLS on a 64-wide base: bitsandbytes' CPU 4-bit kernels need
                      # in-features in whole 64-weight blocks


@pytest.fixture(scope="module")
def feds(tmp_path_factory: pytest.TempPathFactory) -> Feds:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from fedbip_hub.federation.client import init_federation, join
    from fedbip_hub.federation.config import FederationConfig, LoraSpec

    root = tmp_path_factory.mktemp("trainer")
    cls_base = save_tiny_base(root / "cls-base", num_labels=2)
    tiny_tokenizer().save_pretrained(cls_base)
    torch.manual_seed(0)
    causal_base = root / "causal-base"
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, initializer_range=0.2)
                     ).save_pretrained(causal_base)
    chat_tokenizer().save_pretrained(causal_base)
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    cls = init_federation(str(root / "cls"), FederationConfig(
        name="cls", base_model=str(cls_base), num_labels=2, lora=lora))
    causal = init_federation(str(root / "causal"), FederationConfig(
        name="causal", base_model=str(causal_base), task_type="CAUSAL_LM", lora=lora))
    torch.manual_seed(0)
    wide_base = root / "wide-base"
    LlamaForSequenceClassification(LlamaConfig(**{
        **TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}, num_labels=2)
        ).save_pretrained(wide_base)
    wide = init_federation(str(root / "wide"), FederationConfig(
        name="wide", base_model=str(wide_base), num_labels=2, lora=lora))
    for fed in (cls, causal, wide):
        join(fed, "erin")
    return Feds(root, cls_base, cls, causal, wide)


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.output_dir / "adapter_model.safetensors")


def train(fed, data, out: Path, **options):
    import datasets

    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    args = TrainingArgs(**{"learning_rate": 1e-2, "measure_examples": 0, "seed": 3,
                           **options})
    if isinstance(data, list):
        data = datasets.Dataset.from_list(data)
    return train_adapter(fed, "erin", data, out, args=args, start="init", progress=False)


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (
            key, float((a[key] - b[key]).abs().max()))


# -- chat data ---------------------------------------------------------------------------
def test_messages_are_labelled_on_the_assistant_turns_only() -> None:
    import datasets

    from fedbip_hub.training.data import IGNORE_INDEX, prepare_dataset

    tokenizer = chat_tokenizer()
    ds = datasets.Dataset.from_list([{"messages": [
        {"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w12"},
        {"role": "user", "content": "w13"}, {"role": "assistant", "content": "w14 w15"}]}])
    row = prepare_dataset(ds, task_type="CAUSAL_LM", tokenizer=tokenizer)[0]
    # w60 w10 w11 EOS | w61 w12 EOS | w60 w13 EOS | w61 w14 w15 EOS: the assistant's words
    # and end-of-turn are learned, the markup that opens its turn is the prompt's.
    assert row["input_ids"] == [60, 10, 11, 2, 61, 12, 2, 60, 13, 2, 61, 14, 15, 2]
    ignore = IGNORE_INDEX
    assert row["labels"] == [ignore] * 5 + [12, 2] + [ignore] * 4 + [14, 15, 2]
    # Truncation keeps the conversation's start.
    short = prepare_dataset(ds, task_type="CAUSAL_LM", tokenizer=tokenizer, max_length=6)[0]
    assert short["input_ids"] == [60, 10, 11, 2, 61, 12]

    with pytest.raises(ConfigError, match="chat template"):
        prepare_dataset(ds, task_type="CAUSAL_LM", tokenizer=tiny_tokenizer())
    no_answer = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "w10"}]}])
    with pytest.raises(ConfigError, match="no assistant turn"):
        prepare_dataset(no_answer, task_type="CAUSAL_LM", tokenizer=tokenizer)
    # A template that rewrites earlier turns once more follow cannot be split into turns.
    shifting = chat_tokenizer()
    shifting.chat_template = ("{% for m in messages %}{{ ('w5 ' if loop.last else '') + "
                              "m['content'] + ' [EOS] ' }}{% endfor %}")
    with pytest.raises(ConfigError, match="sum of its turns"):
        prepare_dataset(ds, task_type="CAUSAL_LM", tokenizer=shifting)


def test_chat_training_lowers_the_assistant_loss(feds: Feds) -> None:
    import datasets

    from fedbip_hub.training.data import prepare_dataset
    from fedbip_hub.training.evaluation import evaluate_prepared

    tokenizer = chat_tokenizer()
    result = train(feds.causal, chat_rows(128, seed=0), feds.root / "chat", epochs=4,
                   learning_rate=3e-2, batch_size=16, measure_examples=128)
    assert result.end_loss < 0.6 * result.start_loss
    # The base's own tokenizer (with its chat template) was used: no tokenizer was given.
    test = prepare_dataset(datasets.Dataset.from_list(chat_rows(32, seed=1)),
                           task_type="CAUSAL_LM", tokenizer=tokenizer)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def score(folder: Path) -> float:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(feds.root / "causal-base"), str(folder))
        return evaluate_prepared(model, test, task_type="CAUSAL_LM")["loss"]

    assert score(result.output_dir) < 0.6 * score(feds.causal.init_folder())


# -- gradient accumulation and checkpointing ----------------------------------------------
def test_gradient_accumulation_equals_the_larger_batch_for_both_tasks(feds: Feds) -> None:
    cls_data = cls_rows(64, seed=11)
    big = train(feds.cls, cls_data, feds.root / "b8", batch_size=8, max_steps=4)
    accum = train(feds.cls, cls_data, feds.root / "b2x4", batch_size=2, grad_accum=4,
                  max_steps=4)
    assert accum.steps == big.steps == 4 and accum.grad_accum == 4
    assert accum.losses == pytest.approx(big.losses, rel=1e-5)
    assert_close(weights(accum), weights(big), atol=1e-5)
    # Without accumulation, the same micro-batch makes four times the steps: a different run.
    small = train(feds.cls, cls_data, feds.root / "b2", batch_size=2, max_steps=4)
    assert small.losses != pytest.approx(big.losses, rel=1e-3)

    # CAUSAL_LM: token-weighted over the whole step, as one batch of 8 would be.
    sft = varied_sft_rows(64, seed=12)
    big = train(feds.causal, sft, feds.root / "c8", batch_size=8, max_steps=3)
    accum = train(feds.causal, sft, feds.root / "c2x4", batch_size=2, grad_accum=4,
                  max_steps=3)
    assert accum.losses == pytest.approx(big.losses, rel=1e-5)
    assert_close(weights(accum), weights(big), atol=1e-5)


def test_the_first_step_loss_is_the_token_weighted_mean_of_its_batch(feds: Feds) -> None:
    """Brute force: the logged loss of step 1 (2 × 4 micro-batches) equals the initial
    adapter's summed token losses over the step's 8 examples over their token count."""
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedbip_hub.training.data import IGNORE_INDEX, prepare_dataset

    rows = varied_sft_rows(8, seed=13)
    result = train(feds.causal, rows, feds.root / "one-step", batch_size=2, grad_accum=4,
                   max_steps=1)
    prepared = prepare_dataset(datasets.Dataset.from_list(rows), task_type="CAUSAL_LM",
                               tokenizer=chat_tokenizer())
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(feds.root / "causal-base"),
        str(feds.causal.init_folder()))
    total, tokens, per_example = 0.0, 0, []
    with torch.no_grad():
        for row in prepared:
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss = float(model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss)
            total, tokens = total + n * loss, tokens + n
            per_example.append(loss)
    assert result.losses[0] == pytest.approx(total / tokens, rel=1e-5)
    assert result.losses[0] != pytest.approx(sum(per_example) / 8, rel=1e-3)


def test_gradient_checkpointing_gives_the_same_run(feds: Feds) -> None:
    data = cls_rows(64, seed=14)
    plain = train(feds.cls, data, feds.root / "gc-off", batch_size=8, max_steps=4)
    checkpointed = train(feds.cls, data, feds.root / "gc-on", batch_size=8, max_steps=4,
                         gradient_checkpointing=True)
    assert checkpointed.gradient_checkpointing
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)
    assert_close(weights(checkpointed), weights(plain), atol=1e-6)


# -- dtypes ----------------------------------------------------------------------------------
def test_a_bf16_base_trains_fp32_adapters_and_bad_pairs_are_refused(feds: Feds) -> None:
    data = cls_rows(64, seed=15)
    fp32 = train(feds.cls, data, feds.root / "fp32", batch_size=8, max_steps=4,
                 measure_examples=32)
    bf16 = train(feds.cls, data, feds.root / "bf16", batch_size=8, max_steps=4,
                 measure_examples=32, dtype="bf16")
    assert (bf16.dtype, bf16.precision) == ("bf16", "bf16")
    assert (fp32.dtype, fp32.precision) == ("fp32", "fp32")
    saved = weights(bf16)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert bf16.end_loss < bf16.start_loss
    # bf16 rounding, not a different computation: the runs agree to bf16's precision.
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=2e-2)
    with pytest.raises(ConfigError, match="needs bf16 mixed precision") as err:
        train(feds.cls, data, feds.root / "never", dtype="bf16", precision="fp32")
    assert "--dtype fp32" in err.value.hint
    with pytest.raises(ConfigError, match="fp16 base needs a GPU"):
        train(feds.cls, data, feds.root / "never", dtype="fp16")
    with pytest.raises(ConfigError, match="--dtype"):
        train(feds.cls, data, feds.root / "never", dtype="int4")
    assert not (feds.root / "never").exists()


# -- the quantized base (QLoRA) ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_quantized_base_trains_a_plain_lora_like_the_unquantized_one(feds: Feds,
                                                                       mode: str) -> None:
    """bitsandbytes ≥ 0.45 runs 4-bit and 8-bit layers on CPU, so this runs everywhere the
    quantize extra is installed."""
    pytest.importorskip("bitsandbytes")
    from fedbip_hub.federation.client import push

    data = cls_rows(64, seed=16)
    plain = train(feds.wide, data, feds.root / f"plain-{mode}", batch_size=8, max_steps=6,
                  measure_examples=64)
    quantized = train(feds.wide, data, feds.root / f"q-{mode}", batch_size=8, max_steps=6,
                      measure_examples=64, quantize=mode)
    assert quantized.dtype == mode
    a, b = weights(quantized), weights(plain)
    assert a.keys() == b.keys()
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        k: (v.shape, v.dtype) for k, v in b.items()}
    config = json.loads((quantized.output_dir / "adapter_config.json").read_text())
    reference = json.loads((plain.output_dir / "adapter_config.json").read_text())
    assert config == reference
    assert quantized.end_loss < quantized.start_loss
    # Quantization error shifts the run without changing what it learns.
    assert quantized.start_loss == pytest.approx(plain.start_loss, rel=0.1)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    # The federation accepts it as any other upload.
    pushed = push(feds.wide, "erin", quantized.output_dir)
    assert pushed.metadata.n_examples == 64


def test_4bit_gradients_match_the_dequantized_base_after_an_eval_pass(feds: Feds) -> None:
    """The LoRA gradients through a 4-bit base equal those through an fp32 base holding
    its dequantized weights, also after an eval-mode forward (the measured start loss),
    which bitsandbytes' CPU kernels otherwise turn into a path without autograd."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedbip_hub.training.quantization import load_quantized_base

    config = feds.wide.config()
    quantized = load_quantized_base(config, "4bit", compute_dtype=torch.float32,
                                    device=torch.device("cpu"), gradient_checkpointing=False)
    reference = AutoModelForSequenceClassification.from_pretrained(config.base_model,
                                                                   num_labels=2)
    modules = dict(reference.named_modules())
    replaced = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data,
                                                    module.weight.quant_state)
            modules[name].weight.data = weight.float().reshape(modules[name].weight.shape)
            replaced += 1
    assert replaced == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    init = str(feds.wide.init_folder())
    models = [PeftModel.from_pretrained(m, init, is_trainable=True)
              for m in (quantized, reference)]
    rows = cls_rows(8, seed=22)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    mask = (torch.arange(width) < torch.tensor([[len(r["input_ids"])] for r in rows])).long()
    labels = torch.tensor([r["label"] for r in rows])
    grads = []
    for model in models:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()
                      if p.requires_grad and "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[0][name] is not None, f"no gradient reached {name}"
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_quantized_base_owns_its_memory_and_the_estimate_counts_it(
        feds: Feds, tmp_path: Path, mode: str) -> None:
    """After a quantized load, no weight is a view of the memory-mapped checkpoint: one
    such view (an fp32 embedding, loaded zero-copy) kept the whole file mapped, and with
    it the pages of every full-precision linear weight read to quantize it, for the whole
    run (the 11 MiB the quantized benchmark runs were missing on CPU). And the estimate's
    base is what the prepared model holds, tensor by tensor."""
    bnb = pytest.importorskip("bitsandbytes")
    import shutil

    from transformers import AutoConfig

    from fedbip_hub.training.memory_estimate import ModelShape, estimate
    from fedbip_hub.training.models import lora_config_for
    from fedbip_hub.training.quantization import load_quantized_base

    base = Path(shutil.copytree(feds.wide.config().base_model, tmp_path / "base"))
    config = feds.wide.config().model_copy(update={"base_model": str(base)})
    model = load_quantized_base(config, mode, compute_dtype=torch.float32,
                                device=torch.device("cpu"), gradient_checkpointing=True)
    tensors = (*model.parameters(), *model.buffers())
    assert all(t.untyped_storage().resizable() for t in tensors)  # torch allocated them
    smaps = Path("/proc/self/smaps")
    if smaps.is_file():  # Linux: the checkpoint is no longer mapped at all
        assert str(base / "model.safetensors") not in smaps.read_text()

    # Brute force: the bytes of every tensor the prepared model holds.
    quantized_types = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    held = 0
    for param in model.parameters():
        held += param.numel() * param.element_size()
        if isinstance(param, quantized_types):
            state = getattr(param, "quant_state", None)
            extra = ([v for v in state.as_dict(packed=False).values()
                      if isinstance(v, torch.Tensor)] if state is not None
                     else [param.SCB])
            held += sum(t.numel() * t.element_size() for t in extra)
        else:  # prepare_model_for_kbit_training upcast it
            assert param.dtype == torch.float32
    shape = ModelShape.from_config(AutoConfig.from_pretrained(base), task_type="SEQ_CLS",
                                   num_labels=2, lora_config=lora_config_for(config))
    est = estimate(shape, dtype="fp32", quantize=mode, batch_size=1, seq_len=8,
                   gradient_checkpointing=True, activation_dtype="fp32")
    # Within the double quantization's last partial block of 256 scales per layer.
    assert est.base == pytest.approx(held, abs=shape.n_linear_modules * 4)


def test_quantize_errors_are_clear(feds: Feds, monkeypatch) -> None:
    import builtins

    import datasets

    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    data = datasets.Dataset.from_list(cls_rows(16, seed=17))
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match="needs bitsandbytes") as err:
        train_adapter(feds.cls, "erin", data, feds.root / "never",
                      args=TrainingArgs(quantize="4bit"), progress=False)
    assert "fedbip-hub[quantize]" in err.value.hint
    monkeypatch.setattr(builtins, "__import__", real_import)
    with pytest.raises(ConfigError, match="cannot copy a given base_model"):
        train_adapter(feds.cls, "erin", data, feds.root / "never",
                      args=TrainingArgs(quantize="4bit"), base_model=object(),
                      progress=False)
    with pytest.raises(ConfigError, match="--quantize"):
        TrainingArgs(quantize="3bit").validate()


# -- checkpoints and resume -------------------------------------------------------------------
def test_resume_from_a_checkpoint_continues_the_same_run(feds: Feds) -> None:
    import shutil

    data = cls_rows(64, seed=18)
    out = feds.root / "straight"
    straight = train(feds.cls, data, out, batch_size=8, max_steps=6, save_steps=3,
                     lr_scheduler="linear")
    checkpoints = out / "checkpoints"
    assert {p.name for p in checkpoints.glob("checkpoint-*")} == {"checkpoint-3",
                                                                  "checkpoint-6"}
    # What a run stopped after step 3 left behind: continue it elsewhere.
    resumed = train(feds.cls, data, feds.root / "resumed", batch_size=8, max_steps=6,
                    lr_scheduler="linear",
                    resume_from_checkpoint=str(checkpoints / "checkpoint-3"))
    assert resumed.learning_rates == pytest.approx(straight.learning_rates[3:], abs=1e-12)
    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-5)
    assert_close(weights(resumed), weights(straight), atol=1e-6)
    # Not resuming really is a different run (the weights do not just converge).
    fresh = train(feds.cls, data, feds.root / "fresh3", batch_size=8, max_steps=3,
                  lr_scheduler="linear")
    assert not torch.allclose(weights(fresh)[next(iter(weights(fresh)))],
                              weights(straight)[next(iter(weights(fresh)))], atol=1e-6)
    shutil.rmtree(checkpoints / "checkpoint-6")
    latest = train(feds.cls, data, out, batch_size=8, max_steps=6, lr_scheduler="linear",
                   resume_from_checkpoint="latest")
    assert latest.losses == pytest.approx(straight.losses[3:], rel=1e-5)
    assert_close(weights(latest), weights(straight), atol=1e-6)

    with pytest.raises(ConfigError, match="no checkpoint in"):
        train(feds.cls, data, feds.root / "fresh", resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match="no checkpoint at"):
        train(feds.cls, data, out, resume_from_checkpoint=str(out / "nope"))
    # A checkpoint from another start adapter would record the wrong start revision.
    noted = out / "checkpoints" / "fedbip_start.json"
    noted.write_text(json.dumps({"start_revision": "f" * 40, "repo_id": "clients/erin"}))
    with pytest.raises(ConfigError, match="continue a run that started from"):
        train(feds.cls, data, out, max_steps=6, resume_from_checkpoint="latest")


def tensorboard_losses(folder: Path) -> dict[int, float]:
    """Step → logged training loss, from the TensorBoard event files right in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*")), sorted(folder.rglob("*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_report_to_tensorboard_logs_the_loss_of_every_step(feds: Feds,
                                                           tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from typer.testing import CliRunner

    from cli.main import app

    rows = cls_rows(32, seed=19)
    out = tmp_path / "tb"
    result = train(feds.cls, rows, out, max_steps=3, batch_size=8, report_to="tensorboard")
    # By default under the checkpoint folder, one runs/<time>_<host> folder per run.
    (run,) = (out / "checkpoints" / "runs").iterdir()
    logged = tensorboard_losses(run)
    assert sorted(logged) == [1, 2, 3]
    assert [logged[step] for step in (1, 2, 3)] == pytest.approx(result.losses, rel=1e-6)

    chosen = tmp_path / "logs"
    train(feds.cls, rows, tmp_path / "tb2", max_steps=2, batch_size=8,
          report_to="tensorboard", logging_dir=str(chosen))
    assert sorted(tensorboard_losses(chosen)) == [1, 2]
    assert not (tmp_path / "tb2" / "checkpoints" / "runs").exists()

    # The CLI's --logging-dir reaches the Trainer.
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli_logs = tmp_path / "cli-logs"
    shown = CliRunner().invoke(app, [
        "train", str(feds.root / "cls"), "--client", "erin", "--data", str(data), "--out",
        str(tmp_path / "cli-out"), "--max-steps", "2", "--batch-size", "8", "--device",
        "cpu", "--report-to", "tensorboard", "--logging-dir", str(cli_logs), "--json"],
        env={"FEDBIP_CACHE": str(tmp_path / "cache")})
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["steps"] == 2
    assert sorted(tensorboard_losses(cli_logs)) == [1, 2]


def test_report_to_needs_its_package(feds: Feds, monkeypatch) -> None:
    import builtins

    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the wandb package") as err:
            train(feds.cls, cls_rows(16, seed=19), feds.root / "wb", max_steps=1,
                  report_to="wandb")
        assert "--report-to none" in err.value.hint and "pip install wandb" in err.value.hint
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="needs the tensorboard package") as err:
        train(feds.cls, cls_rows(16, seed=19), feds.root / "tb-missing", max_steps=1,
              report_to="tensorboard")
    assert "pip install tensorboard" in err.value.hint
    monkeypatch.setattr(builtins, "__import__", real_import)
    with pytest.raises(ConfigError, match="--logging-dir"):
        train(feds.cls, cls_rows(16, seed=19), feds.root / "no-tb", max_steps=1,
              logging_dir=str(feds.root / "logs"))
    assert not (feds.root / "logs").exists()


# -- the memory estimate ------------------------------------------------------------------------
def test_the_parameter_counts_match_the_real_models() -> None:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.training.memory_estimate import ModelShape
    from fedbip_hub.training.models import lora_config_for

    for task, cls in (("SEQ_CLS", LlamaForSequenceClassification),
                      ("CAUSAL_LM", LlamaForCausalLM)):
        config = FederationConfig(name="m", base_model="x", task_type=task, num_labels=3,
                                  lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj",
                                                                     "down_proj"]))
        hf = LlamaConfig(**TINY_LLAMA, num_labels=3)
        shape = ModelShape.from_config(hf, task_type=task, num_labels=3,
                                       lora_config=lora_config_for(config))
        real = cls(LlamaConfig(**TINY_LLAMA, num_labels=3))
        assert shape.n_params == sum(p.numel() for p in real.parameters())
        linear = sum(m.weight.numel() for n, m in real.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.endswith(("lm_head", "score")))
        assert shape.n_linear == linear
        linears = [m for n, m in real.named_modules() if isinstance(m, torch.nn.Linear)
                   and not n.endswith(("lm_head", "score"))]
        assert shape.n_linear_modules == len(linears) == 2 * 7
        assert shape.n_linear_rows == sum(m.weight.shape[0] for m in linears)
        peft = get_peft_model(real, lora_config_for(config))
        assert shape.n_trainable == sum(p.numel() for p in peft.parameters()
                                        if p.requires_grad)
        assert shape.lora_modules_per_layer == 3 and shape.num_layers == 2
        assert shape.linear_per_layer == 7


def saved_activation_bytes(model, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """What autograd keeps for backward, one count per storage, less the model's own
    weights (which it keeps too, but which are counted as the base)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        pointer = t.untyped_storage().data_ptr()
        if pointer not in weights:
            seen[(pointer, t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_activation_estimate_matches_what_autograd_keeps(dropout: float) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedbip_hub.training.memory_estimate import (
        WORKSPACE_HIDDEN_TERMS,
        WORKSPACE_INTERMEDIATE_TERMS,
        ModelShape,
        estimate,
    )

    hf = dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=2)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                      lora_dropout=dropout, task_type="SEQ_CLS")
    shape = ModelShape.from_config(LlamaConfig(**hf), task_type="SEQ_CLS", num_labels=2,
                                   lora_config=lora)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForSequenceClassification(LlamaConfig(**hf)), lora)
    model.train()
    for batch, seq in ((4, 64), (8, 32)):
        ids = torch.randint(1, 512, (batch, seq))
        measured = saved_activation_bytes(model, ids, torch.zeros(batch, dtype=torch.long))
        est = estimate(shape, dtype="fp32", quantize=None, batch_size=batch, seq_len=seq,
                       gradient_checkpointing=False, activation_dtype="fp32")
        # The estimate adds the backward pass's gradients of one layer, not saved.
        workspace = batch * seq * 4 * (WORKSPACE_INTERMEDIATE_TERMS * 344
                                       + WORKSPACE_HIDDEN_TERMS * 128)
        assert est.activations - workspace == pytest.approx(measured, rel=0.1), (batch, seq)


def test_the_qlora_activation_estimate_matches_what_autograd_keeps(tmp_path: Path) -> None:
    """QLoRA as on a GPU: a 4-bit base under bf16 autocast. The embeddings were upcast to
    fp32 and bitsandbytes' layers return their input's dtype, so the hidden states and the
    MLP's tensors stay fp32 where a bf16 base keeps them in bf16."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.training.memory_estimate import (
        WORKSPACE_HIDDEN_TERMS,
        WORKSPACE_INTERMEDIATE_TERMS,
        ModelShape,
        estimate,
    )
    from fedbip_hub.training.models import lora_config_for
    from fedbip_hub.training.quantization import load_quantized_base

    # In-features in whole 64-weight blocks, for bitsandbytes' CPU 4-bit kernels.
    hf = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     pad_token_id=0, num_labels=2)
    torch.manual_seed(0)
    LlamaForSequenceClassification(hf).save_pretrained(tmp_path / "base")
    config = FederationConfig(name="q", base_model=str(tmp_path / "base"), num_labels=2,
                              lora=LoraSpec(r=8, alpha=16, dropout=0.1))
    lora = lora_config_for(config)
    shape = ModelShape.from_config(hf, task_type="SEQ_CLS", num_labels=2, lora_config=lora)
    base = load_quantized_base(config, "4bit", compute_dtype=torch.bfloat16,
                               device=torch.device("cpu"), gradient_checkpointing=False)
    model = get_peft_model(base, lora)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.train()
    for batch, seq in ((4, 64), (8, 32)):
        ids = torch.randint(1, 512, (batch, seq))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured = saved_activation_bytes(model, ids, torch.zeros(batch, dtype=torch.long))
        est = estimate(shape, dtype="fp32", quantize="4bit", batch_size=batch, seq_len=seq,
                       gradient_checkpointing=False, activation_dtype="bf16")
        # The backward's gradients of one layer (fp32 here too), not saved.
        workspace = batch * seq * 4 * (WORKSPACE_INTERMEDIATE_TERMS * 384
                                       + WORKSPACE_HIDDEN_TERMS * 128)
        assert est.activations - workspace == pytest.approx(measured, rel=0.1), (batch, seq)


# One forward and backward of a causal LM whose logits dominate, measured as the rise of
# the resident set (glibc returns freed tensors at once): what the loss's backward holds.
LOGITS_PEAK_SCRIPT = """
import ctypes, gc, json, re, sys
from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from fedbip_hub.training.memory_estimate import ModelShape, estimate

def status(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024

torch.set_num_threads(1)
act = sys.argv[1]
hf = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=1024,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                  task_type="CAUSAL_LM")
shape = ModelShape.from_config(hf, task_type="CAUSAL_LM", num_labels=None, lora_config=lora)
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(hf), lora)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model.train()
ids = torch.randint(1, 4096, (4, 128))

def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=act == "bf16"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)

step()  # lazy initialisations
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
step()
est = estimate(shape, dtype="fp32", quantize=None, batch_size=4, seq_len=128,
               gradient_checkpointing=True, activation_dtype=act)
print(json.dumps({"peak": status("VmHWM") - before, "estimate": est.activations,
                  "grads": shape.n_trainable * 4, "logits": est.logits}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("act", ["fp32", "bf16"])
def test_a_causal_lm_logits_peak_matches_the_measured_one(act: str) -> None:
    """With checkpointing the loss's backward is the step's peak: stored layer inputs plus
    three fp32 vocabulary-sized tensors per token (plus, under bf16 autocast over fp32
    weights, the head's bf16 copy), not the logits on top of a recomputed layer."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", LOGITS_PEAK_SCRIPT, act], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["logits"] > 0.9 * got["estimate"]  # the logits dominate this model
    assert got["estimate"] + got["grads"] == pytest.approx(got["peak"], rel=0.05)


def test_the_estimate_adds_up_and_an_8b_model_fits_24gb_only_quantized() -> None:
    from peft import LoraConfig
    from transformers import LlamaConfig

    from fedbip_hub.training.memory_estimate import (
        BYTES_4BIT,
        GIB,
        TRAINABLE_BYTES,
        ModelShape,
        estimate,
    )

    llama3_8b = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, max_position_embeddings=8192)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    shape = ModelShape.from_config(llama3_8b, task_type="CAUSAL_LM", num_labels=None,
                                   lora_config=lora)
    assert 8.0e9 < shape.n_params < 8.1e9  # Llama-3-8B: 8.03B parameters
    # LoRA r=16 on q, k, v, o: r·(in + out) per module, 32 layers.
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    assert shape.n_trainable == 32 * per_layer
    run = dict(batch_size=1, seq_len=2048)
    qlora = estimate(shape, dtype="bf16", quantize="4bit", gradient_checkpointing=True,
                     activation_dtype="bf16", **run)
    assert qlora.base == int(shape.n_linear * BYTES_4BIT + shape.n_linear_modules * 1088
                             + (shape.n_params - shape.n_linear) * 4)
    assert qlora.trainable == shape.n_trainable * TRAINABLE_BYTES
    assert qlora.total == qlora.base + qlora.trainable + qlora.activations
    # Three fp32 vocabulary-sized tensors per token in the loss's backward, and the bf16
    # copy autocast makes of the fp32 head (prepare_model_for_kbit_training upcast it).
    assert qlora.logits == 2048 * 128256 * 12 + 128256 * 4096 * 2
    assert qlora.activations > qlora.logits
    assert (qlora.activations_with_checkpointing - qlora.logits
            < (qlora.activations_without_checkpointing - qlora.logits) / 5)
    assert qlora.total < 24 * GIB
    full = estimate(shape, dtype="bf16", quantize=None, gradient_checkpointing=False,
                    activation_dtype="bf16", **run)
    assert full.base == shape.n_params * 2 and full.total > 24 * GIB


def test_a_run_that_cannot_fit_the_gpu_stops_before_loading(monkeypatch) -> None:
    from fedbip_hub.training import memory_check
    from fedbip_hub.training.memory_estimate import GIB, MemoryEstimate

    est = MemoryEstimate(base=20 * GIB, trainable=GIB, activations=8 * GIB,
                         activations_without_checkpointing=8 * GIB,
                         activations_with_checkpointing=GIB, logits=0, total=29 * GIB,
                         dtype="bf16", quantize=None, gradient_checkpointing=False,
                         batch_size=16, seq_len=512)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (23 * GIB, 24 * GIB))
    with pytest.raises(ConfigError, match=r"needs about 29\.00 GiB but cuda has 23\.00 GiB"
                       ) as err:
        memory_check.check_fits(est, torch.device("cuda"), "erin")
    assert err.value.client == "erin"
    for fix in ("--quantize 4bit", "--gradient-checkpointing", "--batch-size", "--grad-accum"):
        assert fix in err.value.hint
    memory_check.check_fits(est, torch.device("cpu"), "erin")  # CPU: printed, never refused
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * GIB, 32 * GIB))
    memory_check.check_fits(est, torch.device("cuda"), "erin")


def test_the_estimate_is_printed_and_returned(feds: Feds, capsys) -> None:
    import datasets

    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    rows = cls_rows(16, seed=20)
    result = train_adapter(feds.cls, "erin", datasets.Dataset.from_list(rows),
                           feds.root / "printed", start="init", progress=True,
                           args=TrainingArgs(max_steps=2, batch_size=8, measure_examples=0))
    err = capsys.readouterr().err
    assert "Memory estimate: base model (fp32)" in err and "total:" in err
    est = result.memory_estimate
    # The longest example sets the padded width a batch can reach.
    assert est["seq_len"] == max(len(r["input_ids"]) for r in rows)
    assert est["batch_size"] == 8
    assert est["total"] == est["base"] + est["trainable"] + est["activations"]
    # The trainable bytes count what was trained (the saved adapter's tensors: LoRA
    # factors and the head copy), not the start adapter's saved inference_mode.
    saved = load_file(str(feds.root / "printed" / "adapter_model.safetensors"))
    assert est["trainable"] == 16 * sum(t.numel() for t in saved.values()) > 0


def test_cli_passes_the_trainer_options(feds: Feds, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    seen = record_training_args(monkeypatch)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in cls_rows(16, seed=21)))
    runner = CliRunner()
    shown = runner.invoke(app, [
        "train", str(feds.root / "cls"), "--client", "erin", "--data", str(data), "--out",
        str(tmp_path / "out"),
        "--max-steps", "2", "--batch-size", "4", "--grad-accum", "2", "--device", "cpu",
        "--gradient-checkpointing", "--dtype", "bf16", "--save-steps", "1",
        "--checkpoint-dir", str(tmp_path / "ck"), "--skip-memory-check", "--json"],
        env={"FEDBIP_CACHE": str(tmp_path / "cache")})
    assert shown.exit_code == 0, shown.output
    payload = json.loads(shown.stdout)
    assert payload["grad_accum"] == 2 and payload["dtype"] == "bf16"
    assert payload["gradient_checkpointing"] and payload["memory_estimate"]["total"] > 0
    (args,) = seen
    assert (args.grad_accum, args.gradient_checkpointing, args.dtype, args.save_steps,
            args.checkpoint_dir, args.memory_check) == (2, True, "bf16", 1,
                                                        str(tmp_path / "ck"), False)
    assert (tmp_path / "ck" / "checkpoint-2").is_dir()
    for option, value in (("--quantize", "3bit"), ("--report-to", "mlflow"),
                          ("--grad-accum", "0"), ("--dtype", "int8")):
        refused = runner.invoke(app, ["train", str(tmp_path / "no-federation"), "--client",
                                      "erin", "--data", str(tmp_path / "missing.jsonl"),
                                      option, value, "--json"])
        assert refused.exit_code == 2, (option, refused.output)
        assert option in json.loads(refused.stdout)["message"]
