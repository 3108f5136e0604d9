"""A member who trains with their own transformers ``Trainer``:
``fedbip pull`` → ``PeftModel.from_pretrained(base, folder, is_trainable=True)`` →
``Trainer.train`` → ``save_pretrained`` → ``fedbip push``.

    python examples/own_trainer.py --fed ./walkthrough/myfed --client alice \\
        --data ./walkthrough/alice.jsonl [--quick]

``fedbip pull`` writes ``fedbip_start.json`` (the personalized revision it pulled; null
for the initial adapter ``--or-init`` writes before a first round) into the folder;
saving into the same folder keeps it, and ``fedbip push`` records that start, so
the server computes the task vector from the adapter you really trained from.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def fedbip(*args: str) -> None:
    """The ``fedbip`` command (its module when the entry point is not on PATH)."""
    command = [shutil.which("fedbip")] if shutil.which("fedbip") else [sys.executable, "-m",
                                                                        "cli.main"]
    subprocess.run([*command, *args], check=True)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fed", required=True, help="The federation (org/name or folder).")
    parser.add_argument("--client", required=True)
    parser.add_argument("--data", required=True, type=Path,
                        help='JSON Lines of {"text": ..., "label": <int>}.')
    parser.add_argument("--out", type=Path, default=None,
                        help="Adapter folder (default ./own-trainer-CLIENT).")
    parser.add_argument("--quick", action="store_true", help="A few steps (CI).")
    args = parser.parse_args(argv)

    from peft import PeftModel
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from fedbip_hub.federation.repo import Federation
    from fedbip_hub.training.data_files import load_examples

    folder = (args.out or Path(f"own-trainer-{args.client}")).resolve()
    # --or-init: before the member's first round, the federation's initial adapter
    fedbip("pull", args.fed, "--client", args.client, "--out", str(folder), "--or-init")

    config = Federation.at(args.fed).config()
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    base = AutoModelForSequenceClassification.from_pretrained(
        config.base_model, num_labels=config.num_labels)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)

    dataset = load_examples(args.data).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=64),
        remove_columns=["text"]).rename_column("label", "labels")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            model=model, train_dataset=dataset,
            data_collator=DataCollatorWithPadding(tokenizer),
            args=TrainingArguments(output_dir=scratch, max_steps=3 if args.quick else 100,
                                   per_device_train_batch_size=8, learning_rate=5e-3,
                                   save_strategy="no", report_to=[], use_cpu=True,
                                   logging_steps=10))
        trainer.train()
    model.save_pretrained(str(folder))  # safetensors; fedbip_start.json stays beside it
    fedbip("push", args.fed, "--client", args.client, "--adapter", str(folder),
           "--n-examples", str(len(dataset)))
    return folder


if __name__ == "__main__":
    main()
