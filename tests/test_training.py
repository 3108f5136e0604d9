"""Local training and evaluation: data loading, LoRA training from the right start, the
folder `fedbip push` uploads, and the `fedbip train|eval` commands.

Tiny Llama models built from configs (no download). The seq-cls task: label 1 iff token 5
appears, which the base cannot know and a trained adapter must learn through attention.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from federation_helpers import TINY_LLAMA, run_cli, save_tiny_base
from safetensors.torch import load_file

from fedbip_hub.errors import ConfigError

MARKER = 5
WORDS = range(4, 64)  # token ids with a word in the test tokenizer (0-3 are specials)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread than on contended cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- data -----------------------------------------------------------------------------------
def cls_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tokens = [rng.choice([t for t in WORDS if t != MARKER]) for _ in range(rng.randint(6, 12))]
        label = i % 2
        if label:
            tokens[rng.randrange(len(tokens))] = MARKER
        rows.append({"input_ids": tokens, "label": label})
    rng.shuffle(rows)
    return rows


def as_text(rows: list[dict]) -> list[dict]:
    return [{"text": " ".join(f"w{t}" for t in r["input_ids"]), "label": r["label"]}
            for r in rows]


def sft_rows(n: int, seed: int) -> list[dict]:
    """Prompt: five words then "w4"; completion: the prompt's first word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [f"w{rng.randrange(10, 30)}" for _ in range(5)]
        rows.append({"prompt": " ".join([*words, "w4"]), "completion": words[0]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{f"w{i}": i for i in WORDS}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


# -- the federation -----------------------------------------------------------------------
@dataclass
class World:
    root: Path
    base: Path
    address: str
    fed: object
    train: object
    holdout: object
    bob_train: object
    env: dict


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    import datasets

    from fedbip_hub.federation.client import init_federation, join
    from fedbip_hub.federation.config import FederationConfig, LoraSpec

    root = tmp_path_factory.mktemp("training")
    base = save_tiny_base(root / "base", num_labels=2)
    tiny_tokenizer().save_pretrained(base)
    address = str(root / "federation")
    config = FederationConfig(name="train", base_model=str(base), num_labels=2,
                              lora=LoraSpec(r=4, alpha=8))
    fed = init_federation(address, config)
    for client in ("alice", "bob", "carol"):
        join(fed, client)
    return World(root, base, address, fed,
                 train=datasets.Dataset.from_list(cls_rows(320, seed=1)),
                 holdout=datasets.Dataset.from_list(cls_rows(200, seed=2)),
                 bob_train=datasets.Dataset.from_list(cls_rows(160, seed=3)),
                 env={"FEDBIP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"})


def peft_model(world: World, folder: Path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(world.base, num_labels=2)
    return PeftModel.from_pretrained(base, str(folder))


def accuracy(world: World, folder: Path) -> float:
    from fedbip_hub.training.evaluation import evaluate

    return evaluate(peft_model(world, folder), world.holdout, task_type="SEQ_CLS")["accuracy"]


@dataclass
class FirstRound:
    alice: object
    bob: object
    revision: str
    pulled: Path


@pytest.fixture(scope="module")
def first_round(world: World) -> FirstRound:
    """Alice and Bob train from the initial adapter and push; one server round runs."""
    from fedbip_hub.federation.client import pull, push
    from fedbip_hub.server.rounds import run_round
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    args = TrainingArgs(epochs=5, learning_rate=1e-2, batch_size=16)
    alice = train_adapter(world.fed, "alice", world.train, world.root / "alice-r1",
                          args=args, progress=False)
    bob = train_adapter(world.fed, "bob", world.bob_train, world.root / "bob-r1",
                        args=args, progress=False)
    for client, result in (("alice", alice), ("bob", bob)):
        push(world.fed, client, result.output_dir)
    record = run_round(world.fed)
    assert record["status"] == "completed"
    pulled = pull(world.fed, "alice", world.root / "alice-pulled")
    return FirstRound(alice, bob, pulled.revision, pulled.folder)


# -- loading and preparing data ---------------------------------------------------------------
def test_loaders_read_every_format_alike(tmp_path: Path) -> None:
    import datasets

    from fedbip_hub.training.data import prepare_dataset
    from fedbip_hub.training.data_files import load_examples

    rows = cls_rows(12, seed=0)
    ds = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)  # input_ids become "[1, 2, 3]" strings
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 12))}
                         ).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "splits").mkdir()
    write_jsonl(tmp_path / "splits" / "test.jsonl", rows[8:])

    expected = prepare_dataset(ds, task_type="SEQ_CLS").to_dict()
    assert expected["labels"] == [r["label"] for r in rows]
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        loaded = load_examples(tmp_path / name)
        assert prepare_dataset(loaded, task_type="SEQ_CLS").to_dict() == expected, name
    # Text through the tokenizer gives the same ids.
    text = datasets.Dataset.from_list(as_text(rows))
    assert prepare_dataset(text, task_type="SEQ_CLS", tokenizer=tiny_tokenizer()
                           ).to_dict() == expected
    test_part = {k: v[8:] for k, v in expected.items()}
    assert prepare_dataset(load_examples(tmp_path / "saved", split="test"),
                           task_type="SEQ_CLS").to_dict() == test_part
    assert len(load_examples(tmp_path / "saved")) == 8  # default split: train
    assert prepare_dataset(load_examples(tmp_path / "splits", split="test"),
                           task_type="SEQ_CLS").to_dict() == test_part

    with pytest.raises(ConfigError, match="has no split 'validation'") as err:
        load_examples(tmp_path / "saved", split="validation")
    assert "train, test" in err.value.message
    with pytest.raises(ConfigError, match="no data at") as err:
        load_examples(tmp_path / "missing.jsonl")
    assert err.value.hint and "--data" in err.value.hint
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"unknown data format '\.txt'"):
        load_examples(tmp_path / "d.txt")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_examples(tmp_path / "bad.jsonl")


def test_prepare_reports_missing_columns_and_bad_labels() -> None:
    import datasets

    from fedbip_hub.training.data import prepare_dataset

    no_label = datasets.Dataset.from_list([{"input_ids": [4, 5], "target": 1}])
    with pytest.raises(ConfigError, match="no 'label' column") as err:
        prepare_dataset(no_label, task_type="SEQ_CLS")
    assert "input_ids, target" in err.value.message and "--label-field" in err.value.hint
    assert prepare_dataset(no_label, task_type="SEQ_CLS", label_field="target")["labels"] == [1]
    text = datasets.Dataset.from_list([{"text": "w4 w5", "label": 0}])
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        prepare_dataset(text, task_type="SEQ_CLS")
    with pytest.raises(ConfigError, match="no input_ids or 'body' column"):
        prepare_dataset(text, task_type="SEQ_CLS", text_field="body")
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        prepare_dataset(datasets.Dataset.from_list([{"input_ids": [4], "label": 2}]),
                        task_type="SEQ_CLS", num_labels=2)
    with pytest.raises(ConfigError, match="not a class id"):
        prepare_dataset(datasets.Dataset.from_list([{"input_ids": [4], "label": "spam"}]),
                        task_type="SEQ_CLS")


def test_sft_labels_only_the_completion() -> None:
    import datasets

    from fedbip_hub.training.data import IGNORE_INDEX, prepare_dataset, split_holdout

    tokenizer = tiny_tokenizer()
    ds = datasets.Dataset.from_list([{"prompt": "w10 w11 w12 w4", "completion": "w10 w13"}])
    row = prepare_dataset(ds, task_type="CAUSAL_LM", tokenizer=tokenizer)[0]
    assert row["input_ids"] == [10, 11, 12, 4, 10, 13, 2]  # eos closes the completion
    assert row["labels"] == [IGNORE_INDEX] * 4 + [10, 13, 2]
    # Truncation keeps the completion and the end of the prompt.
    short = prepare_dataset(ds, task_type="CAUSAL_LM", tokenizer=tokenizer, max_length=5)[0]
    assert short["input_ids"] == [12, 4, 10, 13, 2]
    assert short["labels"] == [IGNORE_INDEX] * 2 + [10, 13, 2]
    # Pre-tokenized pairs need no tokenizer; plain input_ids are labelled everywhere.
    ids = datasets.Dataset.from_list([{"prompt": [7, 8], "completion": [9]}])
    assert prepare_dataset(ids, task_type="CAUSAL_LM")[0]["labels"] == [IGNORE_INDEX] * 2 + [9]
    plain = datasets.Dataset.from_list([{"input_ids": [7, 8, 9]}])
    assert prepare_dataset(plain, task_type="CAUSAL_LM")[0]["labels"] == [7, 8, 9]

    data = datasets.Dataset.from_list([{"input_ids": [i + 4], "label": 0} for i in range(10)])
    train, holdout = split_holdout(data, 0.3, seed=0)
    assert (len(train), len(holdout)) == (7, 3)
    assert sorted([*train["input_ids"], *holdout["input_ids"]]) == list(data["input_ids"])
    assert list(split_holdout(data, 0.3, seed=0)[1]["input_ids"]) == list(holdout["input_ids"])
    assert list(split_holdout(data, 0.3, seed=1)[1]["input_ids"]) != list(holdout["input_ids"])


# -- training -------------------------------------------------------------------------------
def test_training_from_the_initial_adapter_learns_the_task(world: World,
                                                            first_round: FirstRound) -> None:
    from fedbip_hub.training.evaluation import evaluate

    result = first_round.alice
    assert result.start == "init" and result.start_revision is None
    assert result.n_examples == 320 and result.device == "cpu" and result.precision == "fp32"
    assert result.end_loss < 0.5 * result.start_loss
    assert result.train_loss < 0.8 * result.losses[0]

    # The saved folder loads with PEFT and scores exactly what training measured last.
    out = result.output_dir
    model = peft_model(world, out)
    measured = evaluate(model, world.train.select(range(256)), task_type="SEQ_CLS")
    assert measured["loss"] == pytest.approx(result.end_loss, rel=1e-4)
    before = accuracy(world, world.fed.init_folder())
    after = evaluate(model, world.holdout, task_type="SEQ_CLS")["accuracy"]
    print(f"holdout accuracy: initial adapter {before:.3f}, trained {after:.3f}")
    assert after >= 0.8 and after >= before + 0.2

    # What `fedbip push` needs is in the folder, and the push used it.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(world.base)
    assert json.loads((out / "fedbip_start.json").read_text()) == {
        "start_revision": None, "repo_id": "clients/alice"}
    upload = json.loads((out / "fedbip_upload.json").read_text())
    assert upload["n_examples"] == 320 and upload["base_model"] == str(world.base)
    assert "start_revision" not in upload
    pushed = json.loads(world.fed.store.read_bytes(
        "clients/bob", "fedbip_upload.json", world.fed.store.head("clients/bob")))
    assert pushed["n_examples"] == 160


def test_training_is_deterministic_and_leaves_the_base_alone(world: World) -> None:
    from fedbip_hub.training.models import load_base_model
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    base = load_base_model(world.fed.config())
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    args = TrainingArgs(max_steps=4, learning_rate=1e-2, batch_size=8, seed=7)

    def weights(tag: str, seed_args: TrainingArgs, **kwargs) -> dict:
        out = train_adapter(world.fed, "carol", world.bob_train, world.root / tag,
                            args=seed_args, start="init", progress=False, **kwargs)
        return load_file(out.output_dir / "adapter_model.safetensors")

    first = weights("det-a", args, base_model=base)
    again = weights("det-b", args)  # loading the base itself gives the same run
    other = weights("det-c", TrainingArgs(max_steps=4, learning_rate=1e-2, batch_size=8,
                                          seed=8), base_model=base)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert not any("lora" in name for name, _ in base.named_modules())
    assert all(torch.equal(v, reference[k]) for k, v in base.state_dict().items())

    # A bf16 base (transformers loads checkpoints in their dtype) trains in fp32 on CPU.
    half = base.to(torch.bfloat16)
    bf16 = weights("det-bf16", args, base_model=half)
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert next(half.parameters()).dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in half.named_modules())


def test_training_starts_from_the_personalized_adapter(world: World,
                                                       first_round: FirstRound) -> None:
    from fedbip_hub.federation.client import push
    from fedbip_hub.training.evaluation import evaluate
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    # A zero learning rate saves exactly the start: the personalized adapter, not the init.
    frozen = train_adapter(world.fed, "alice", world.train, world.root / "alice-frozen",
                           args=TrainingArgs(max_steps=1, learning_rate=0.0), progress=False)
    assert frozen.start == "personalized" and frozen.start_revision == first_round.revision
    saved = load_file(frozen.output_dir / "adapter_model.safetensors")
    personalized = load_file(first_round.pulled / "adapter_model.safetensors")
    assert saved.keys() == personalized.keys()
    assert all(torch.equal(saved[k], personalized[k]) for k in saved)
    assert not all(torch.equal(saved[k], v) for k, v in load_file(
        first_round.alice.output_dir / "adapter_model.safetensors").items())

    # Real training from there: step-0 loss is the personalized adapter's, and a push
    # records the start revision, which the federation accepts.
    second = train_adapter(world.fed, "alice", world.holdout, world.root / "alice-r2",
                           args=TrainingArgs(max_steps=3, learning_rate=1e-3),
                           progress=False)
    assert second.start_revision == first_round.revision
    expected = evaluate(peft_model(world, first_round.pulled), world.holdout,
                        task_type="SEQ_CLS")["loss"]
    assert second.start_loss == pytest.approx(expected, rel=1e-4)
    assert json.loads((second.output_dir / "fedbip_start.json").read_text())[
        "start_revision"] == first_round.revision
    result = push(world.fed, "alice", second.output_dir)
    assert result.metadata.start_revision == first_round.revision
    assert result.metadata.n_examples == len(world.holdout)

    # start="init" ignores the personalized adapter; a folder start reads its revision.
    from_init = train_adapter(world.fed, "alice", world.train, world.root / "alice-init",
                              args=TrainingArgs(max_steps=0), start="init", progress=False)
    assert from_init.start_revision is None
    assert from_init.start_loss == pytest.approx(first_round.alice.start_loss, rel=1e-4)
    from_folder = train_adapter(world.fed, "alice", world.train, world.root / "alice-f",
                                args=TrainingArgs(max_steps=0), start=first_round.pulled,
                                progress=False)
    assert from_folder.start_revision == first_round.revision


def test_evaluate_matches_scoring_each_example_alone(world: World,
                                                    first_round: FirstRound) -> None:
    """Batched, right-padded scoring equals the model's own loss on one example at a time."""
    from fedbip_hub.training.evaluation import evaluate

    model = peft_model(world, first_round.alice.output_dir)
    data = world.holdout.select(range(40))  # lengths 6..12: every batch is padded
    scores = evaluate(model, data, task_type="SEQ_CLS", batch_size=16)
    losses, hits = [], []
    with torch.no_grad():
        for row in data:
            label = torch.tensor([row["label"]])
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=label)
            losses.append(float(out.loss))
            hits.append(int(out.logits.argmax(-1)) == row["label"])
    assert scores["n"] == len(data)
    assert scores["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert scores["accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_evaluate_client_scores_base_own_and_personalized(world: World,
                                                          first_round: FirstRound) -> None:
    from fedbip_hub.training.evaluation import evaluate, evaluate_client

    report = evaluate_client(world.fed, "alice", world.holdout,
                             own_adapter=first_round.alice.output_dir, device="cpu")
    assert report["metric"] == "accuracy" and report["n"] == len(world.holdout)
    assert any("initial adapter" in note for note in report["notes"])
    # Each score is what that adapter alone gives on a fresh base.
    for name, folder in (("base", world.fed.init_folder()),
                         ("own", first_round.alice.output_dir),
                         ("personalized", first_round.pulled)):
        alone = evaluate(peft_model(world, folder), world.holdout, task_type="SEQ_CLS")
        assert report[name]["accuracy"] == pytest.approx(alone["accuracy"]), name
        assert report[name]["loss"] == pytest.approx(alone["loss"], rel=1e-4), name
    assert report["personalized"]["revision"] == first_round.revision
    assert report["gain"]["vs_own"] == pytest.approx(
        report["personalized"]["accuracy"] - report["own"]["accuracy"])
    assert report["gain"]["vs_base"] == pytest.approx(
        report["personalized"]["accuracy"] - report["base"]["accuracy"])
    print("alice:", {k: report[k]["accuracy"] for k in ("base", "own", "personalized")})

    # Before any round, there is nothing personalized to score.
    carol = evaluate_client(world.fed, "carol", world.holdout, device="cpu")
    assert carol["personalized"] is None and carol["own"] is None
    assert carol["gain"] == {"vs_own": None, "vs_base": None}


def test_causal_lm_sft_lowers_the_completion_loss(tmp_path: Path) -> None:
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedbip_hub.federation.client import init_federation, join
    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.training.data import IGNORE_INDEX, prepare_dataset
    from fedbip_hub.training.evaluation import evaluate, evaluate_client
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    torch.manual_seed(0)
    base = tmp_path / "causal"
    # A wider init than the default 0.02, or the frozen random head's logits stay ~uniform.
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, initializer_range=0.2)).save_pretrained(base)
    fed = init_federation(str(tmp_path / "fed"), FederationConfig(
        name="sft", base_model=str(base), task_type="CAUSAL_LM",
        lora=LoraSpec(r=4, alpha=8)))
    join(fed, "dora")
    train = datasets.Dataset.from_list(sft_rows(256, seed=0))
    test = datasets.Dataset.from_list(sft_rows(64, seed=1))

    with pytest.raises(ConfigError, match="no loadable tokenizer") as err:
        train_adapter(fed, "dora", train, tmp_path / "out", progress=False)
    assert "input_ids" in err.value.hint

    tokenizer = tiny_tokenizer()
    result = train_adapter(fed, "dora", train, tmp_path / "out", tokenizer=tokenizer,
                           args=TrainingArgs(epochs=4, learning_rate=3e-2), progress=False)
    assert result.end_loss < 0.6 * result.start_loss
    report = evaluate_client(fed, "dora", test, own_adapter=result.output_dir,
                             tokenizer=tokenizer, device="cpu")
    assert report["metric"] == "perplexity" and report["notes"][0].startswith("no personal")
    assert report["own"]["tokens"] == 2 * len(test)  # the word and EOS; no prompt token
    assert report["own"]["perplexity"] < 0.6 * report["base"]["perplexity"]
    print(f"SFT completion loss {result.start_loss:.3f} → {result.end_loss:.3f}; held-out "
          f"perplexity {report['base']['perplexity']:.2f} → {report['own']['perplexity']:.2f}")
    model = LlamaForCausalLM.from_pretrained(base)
    plain = evaluate(model, test, task_type="CAUSAL_LM", tokenizer=tokenizer)
    assert plain["loss"] == pytest.approx(report["base"]["loss"], rel=1e-5)
    # The reference: the model's own shifted loss, one example at a time, token-weighted.
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in prepare_dataset(test, task_type="CAUSAL_LM", tokenizer=tokenizer):
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += n * float(model(input_ids=torch.tensor([row["input_ids"]]),
                                     labels=labels).loss)
            tokens += n
    assert plain["tokens"] == tokens
    assert plain["loss"] == pytest.approx(total / tokens, rel=1e-5)


# -- the commands ------------------------------------------------------------------------------
def test_cli_train_push_and_eval(world: World, first_round: FirstRound) -> None:
    """`fedbip train --push` in a subprocess on text data (the base's tokenizer); then
    `fedbip eval --json`."""
    from typer.testing import CliRunner

    from cli.main import app

    data = write_jsonl(world.root / "carol.jsonl", as_text(cls_rows(48, seed=4)))
    out = world.root / "carol-cli"
    result = run_cli(["train", world.address, "--client", "carol", "--data", str(data),
                      "--out", str(out), "--max-steps", "4", "--batch-size", "8",
                      "--device", "cpu", "--push", "--json"], world.env)
    payload = json.loads(result.stdout)
    assert payload["ok"] and payload["n_examples"] == 48 and payload["start_revision"] is None
    assert payload["push"]["commit"] == world.fed.store.head("clients/carol")
    uploaded = json.loads(world.fed.store.read_bytes("clients/carol", "fedbip_upload.json",
                                                     payload["push"]["commit"]))
    assert uploaded["n_examples"] == 48 and uploaded["base_model"] == str(world.base)
    assert (out / "adapter_model.safetensors").is_file()

    holdout = write_jsonl(world.root / "holdout.jsonl", world.holdout.to_list())
    runner = CliRunner()
    shown = runner.invoke(app, ["eval", world.address, "--client", "alice", "--data",
                                str(holdout), "--adapter", str(first_round.alice.output_dir),
                                "--device", "cpu", "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert {"base", "own", "personalized", "gain"} <= report.keys()
    for name in ("base", "own", "personalized"):
        assert 0 <= report[name]["accuracy"] <= 1 and report[name]["n"] == 200
    assert report["gain"]["vs_own"] == pytest.approx(
        report["personalized"]["accuracy"] - report["own"]["accuracy"])

    table = runner.invoke(app, ["eval", world.address, "--client", "alice", "--data",
                                str(holdout), "--device", "cpu"])
    assert table.exit_code == 0 and "personalized" in table.stdout
    assert "Personalization gain over base" in table.stdout


def test_cli_errors_name_the_problem(world: World, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    missing = runner.invoke(app, ["train", world.address, "--client", "carol", "--data",
                                  str(tmp_path / "nope.jsonl"), "--json"])
    assert missing.exit_code == 2
    error = json.loads(missing.stdout)
    assert error["error"] == "ConfigError" and "no data at" in error["message"]
    unlabeled = write_jsonl(tmp_path / "unlabeled.jsonl", [{"text": "w4 w5", "y": 1}])
    shown = runner.invoke(app, ["train", world.address, "--client", "carol", "--data",
                                str(unlabeled), "--out", str(tmp_path / "o")])
    assert shown.exit_code == 2
    assert "no 'label' column" in shown.stderr and "--label-field" in shown.stderr
    assert not (tmp_path / "o").exists()


# -- training options: schedule, warmup, clipping, LoRA dropout ------------------------------
def expected_rate(kind: str, step: int, lr: float, warmup: int, total: int) -> float:
    """The schedules written out: linear warmup from 0, then constant, linear or cosine
    decay to 0 at the last step."""
    import math

    if step < warmup:
        return lr * step / warmup
    if kind == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


def transformers_rates(name: str, lr: float, warmup: int, total: int) -> list[float]:
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def quick_train(world: World, tag: str, **options):
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    args = TrainingArgs(**{"max_steps": 8, "learning_rate": 1e-2, "batch_size": 8,
                           "measure_examples": 0, **options})
    return train_adapter(world.fed, "carol", world.bob_train, world.root / tag, args=args,
                         start="init", progress=False)


def adapter_weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.output_dir / "adapter_model.safetensors")


def test_each_schedule_gives_the_learning_rates_it_names(world: World) -> None:
    from fedbip_hub.training.trainer import DEFAULT_LR_SCHEDULER, TrainingArgs

    assert TrainingArgs().lr_scheduler == DEFAULT_LR_SCHEDULER == "constant"
    default = quick_train(world, "sched-default")
    assert default.learning_rates == [1e-2] * 8 and default.lr_scheduler == "constant"
    names = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    for kind, name in names.items():
        for ratio in (0.0, 0.25):
            result = quick_train(world, f"sched-{kind}-{ratio}", lr_scheduler=kind,
                                 warmup_ratio=ratio)
            warmup = int(ratio * 8)
            assert result.warmup_steps == warmup and result.steps == 8
            assert len(result.learning_rates) == 8
            written = [expected_rate(kind, s, 1e-2, warmup, 8) for s in range(8)]
            assert result.learning_rates == pytest.approx(written, abs=1e-12), (kind, ratio)
            assert result.learning_rates == pytest.approx(
                transformers_rates(name, 1e-2, warmup, 8), abs=1e-12), (kind, ratio)
            assert result.to_dict()["lr_scheduler"] == kind
    # Decaying schedules really move the weights differently from a constant rate.
    linear = adapter_weights(quick_train(world, "sched-linear-again", lr_scheduler="linear"))
    constant = adapter_weights(default)
    assert not all(torch.equal(linear[k], constant[k]) for k in linear)


def test_warmup_steps_win_over_the_ratio(world: World) -> None:
    result = quick_train(world, "warm-steps", lr_scheduler="linear", warmup_steps=3,
                         warmup_ratio=0.5)
    assert result.warmup_steps == 3
    assert result.learning_rates == pytest.approx(
        [expected_rate("linear", s, 1e-2, 3, 8) for s in range(8)], abs=1e-12)
    assert result.learning_rates[:4] == pytest.approx([0, 1e-2 / 3, 2e-2 / 3, 1e-2])
    # An explicit 0 is no warmup, whatever the ratio says.
    none = quick_train(world, "warm-zero", warmup_steps=0, warmup_ratio=0.5)
    assert none.warmup_steps == 0 and none.learning_rates == [1e-2] * 8


def test_max_grad_norm_clips_the_gradients(world: World) -> None:
    init = load_file(world.fed.init_folder() / "adapter_model.safetensors")

    def moved(weights: dict[str, torch.Tensor]) -> float:
        return sum(float((weights[k] - init[k]).abs().sum()) for k in init)

    free = adapter_weights(quick_train(world, "clip-none", max_grad_norm=None, max_steps=3))
    for tag, off in (("clip-zero", 0.0), ("clip-huge", 1e9)):  # disabled / never reached
        same = adapter_weights(quick_train(world, tag, max_grad_norm=off, max_steps=3))
        assert all(torch.equal(same[k], free[k]) for k in free), tag
    # Gradients clipped to a norm of 1e-12 fall far below AdamW's eps (1e-8): the update
    # shrinks ~10⁴-fold. Unclipped, AdamW's first steps move each weight by about the LR.
    clipped = adapter_weights(quick_train(world, "clip-tiny", max_grad_norm=1e-12,
                                          max_steps=3))
    assert moved(free) > 0
    assert moved(clipped) < 1e-2 * moved(free)
    # A moderate clip changes the run, too (the per-step factors differ).
    half = adapter_weights(quick_train(world, "clip-half", max_grad_norm=1e-3, max_steps=3))
    assert not all(torch.equal(half[k], free[k]) for k in free)


def test_bad_training_options_are_refused_before_the_model_loads(world: World,
                                                                 monkeypatch) -> None:
    from fedbip_hub.training import trainer as training
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    def no_load(*_args, **_kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(training, "load_frozen_base", no_load)
    for options, flag in (({"lr_scheduler": "step"}, "--lr-scheduler"),
                          ({"warmup_ratio": 1.5}, "--warmup-ratio"),
                          ({"warmup_ratio": float("nan")}, "--warmup-ratio"),
                          ({"warmup_steps": -1}, "--warmup-steps"),
                          ({"max_grad_norm": -1.0}, "--max-grad-norm"),
                          ({"weight_decay": -0.1}, "--weight-decay"),
                          ({"learning_rate": -1.0}, "--lr"),
                          ({"batch_size": 0}, "--batch-size"),
                          ({"precision": "fp8"}, "--precision")):
        with pytest.raises(ConfigError, match="invalid training options") as err:
            train_adapter(world.fed, "carol", world.bob_train, world.root / "never",
                          args=TrainingArgs(**options), progress=False)
        assert flag in err.value.message, options
    assert not (world.root / "never").exists()


def test_lora_dropout_reaches_the_initial_adapter_and_training(world: World,
                                                               tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from fedbip_hub.federation.client import init_federation, join
    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.federation.repo import Federation
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    runner = CliRunner()
    address = str(tmp_path / "dropout")
    made = runner.invoke(app, ["init", address, "--base-model", str(world.base),
                               "--r", "4", "--alpha", "8", "--lora-dropout", "0.3", "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["config"]["lora"]["dropout"] == 0.3
    fed = Federation.at(address)
    init_config = json.loads((fed.init_folder() / "adapter_config.json").read_text())
    assert init_config["lora_dropout"] == 0.3
    for bad in ("1.0", "-0.1"):
        refused = runner.invoke(app, ["init", str(tmp_path / f"bad{bad}"), "--base-model",
                                      str(world.base), "--lora-dropout", bad, "--json"])
        assert refused.exit_code == 2, refused.output
        error = json.loads(refused.stdout)
        assert error["error"] == "ConfigError" and "dropout" in error["message"]
        assert "--lora-dropout" in error["hint"]
        assert not (tmp_path / f"bad{bad}").exists()

    # Training uses it: the same initial weights (same seed) train differently with
    # dropout than without, and the trained adapter records it.
    no_dropout = init_federation(str(tmp_path / "plain"), FederationConfig(
        name="plain", base_model=str(world.base), num_labels=2,
        lora=LoraSpec(r=4, alpha=8, dropout=0.0)))
    assert torch.equal(*(load_file(f.init_folder() / "adapter_model.safetensors")[k]
                         for f in (fed, no_dropout)
                         for k in ["base_model.model.model.layers.0.self_attn.q_proj."
                                   "lora_A.weight"]))
    args = TrainingArgs(max_steps=4, learning_rate=1e-2, batch_size=8, measure_examples=0)
    trained = {}
    for name, federation in (("dropout", fed), ("plain", no_dropout)):
        join(federation, "carol")
        result = train_adapter(federation, "carol", world.bob_train, tmp_path / f"{name}-out",
                               args=args, progress=False)
        trained[name] = adapter_weights(result)
        saved = json.loads((result.output_dir / "adapter_config.json").read_text())
        assert saved["lora_dropout"] == (0.3 if name == "dropout" else 0.0)
    assert not all(torch.equal(trained["dropout"][k], trained["plain"][k])
                   for k in trained["plain"])


def record_training_args(monkeypatch) -> list:
    """The TrainingArgs of every train_adapter call, which still runs as usual."""
    from fedbip_hub.training import trainer as training

    seen: list = []
    real = training.train_adapter

    def recording(*args, **kwargs):
        seen.append(kwargs["args"])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_adapter", recording)
    return seen


def test_cli_training_options_reach_the_training(world: World, tmp_path: Path,
                                                 monkeypatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from fedbip_hub.training import trainer as training

    seen = record_training_args(monkeypatch)
    data = write_jsonl(tmp_path / "carol.jsonl", cls_rows(32, seed=5))
    runner = CliRunner()
    shown = runner.invoke(app, [
        "train", world.address, "--client", "carol", "--data", str(data), "--out",
        str(tmp_path / "out"), "--max-steps", "6", "--batch-size", "8", "--device", "cpu",
        "--lr", "0.02", "--lr-scheduler", "cosine", "--warmup-steps", "2", "--warmup-ratio",
        "0.5", "--max-grad-norm", "0.5", "--weight-decay", "0.01", "--json"],
        env={"FEDBIP_CACHE": world.env["FEDBIP_CACHE"]})
    assert shown.exit_code == 0, shown.output
    payload = json.loads(shown.stdout)
    assert payload["lr_scheduler"] == "cosine" and payload["warmup_steps"] == 2
    (args,) = seen
    assert (args.lr_scheduler, args.warmup_steps, args.warmup_ratio, args.max_grad_norm,
            args.weight_decay, args.learning_rate) == ("cosine", 2, 0.5, 0.5, 0.01, 0.02)
    # Defaults: the library's schedule, clipping at 1, no warmup, no weight decay.
    seen.clear()
    default = runner.invoke(app, ["train", world.address, "--client", "carol", "--data",
                                  str(data), "--out", str(tmp_path / "out2"), "--max-steps",
                                  "1", "--device", "cpu", "--json"],
                            env={"FEDBIP_CACHE": world.env["FEDBIP_CACHE"]})
    assert default.exit_code == 0, default.output
    assert seen[0] == training.TrainingArgs(max_steps=1, device="cpu")

    # Bad values are refused before the data, the federation or the model are read: the
    # data file and the federation do not even exist.
    seen.clear()
    for option, value in (("--lr-scheduler", "step"), ("--warmup-ratio", "2"),
                          ("--warmup-steps", "-3"), ("--max-grad-norm", "-1"),
                          ("--weight-decay", "-0.5")):
        refused = runner.invoke(app, ["train", str(tmp_path / "no-federation"), "--client",
                                      "carol", "--data", str(tmp_path / "missing.jsonl"),
                                      option, value, "--json"])
        assert refused.exit_code == 2, (option, refused.output)
        error = json.loads(refused.stdout)
        assert error["error"] == "ConfigError" and option in error["message"], error
    assert seen == []
