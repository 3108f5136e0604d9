"""A whole federation with the Python API: a coordinator creates it, two members join,
train and push, the server runs a round, and a member loads the result with PEFT.

    python examples/walkthrough.py --work ./walkthrough          # a local folder
    python examples/walkthrough.py --work ./walkthrough --quick  # CI's reduced mode

The same flow on the command line, for a Hub federation (org/name) or a folder:

    fedbip init FED --base-model BASE --num-labels 2 --rank 4 --alpha 8
    fedbip join FED --client alice
    fedbip train FED --client alice --data alice.jsonl --push
    fedbip-server run FED
    fedbip pull FED --client alice --out ./alice-personalized
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_setup import make_tiny_base, write_sentiment_data


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("walkthrough"),
                        help="Folder for the base model, data and the federation.")
    parser.add_argument("--base-model", help="A Hub id or local folder (default: a tiny "
                        "model built offline in WORK/tiny-base).")
    parser.add_argument("--quick", action="store_true", help="Few examples and steps (CI).")
    args = parser.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedbip_hub.federation.client import init_federation, join, personalized_folder, push
    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.server.rounds import run_round
    from fedbip_hub.training.data_files import load_examples
    from fedbip_hub.training.trainer import TrainingArgs, train_adapter

    work = args.work.resolve()
    base = args.base_model or str(make_tiny_base(work / "tiny-base"))
    n, steps = (32, 4) if args.quick else (400, 60)

    # 1. The coordinator creates the federation (a local folder here; "org/name" is the Hub).
    config = FederationConfig(name="walkthrough", base_model=base, num_labels=2,
                              lora=LoraSpec(r=4, alpha=8), strategy={"method": "fedbip-l"})
    fed = init_federation(str(work / "myfed"), config)
    print(f"created {fed.address}")

    # 2. Each member joins, trains on its own data and pushes its adapter.
    for seed, client in enumerate(("alice", "bob")):
        join(fed, client)
        data = write_sentiment_data(work / f"{client}.jsonl", n=n, seed=seed)
        result = train_adapter(fed, client, load_examples(data), work / f"adapter-{client}",
                               args=TrainingArgs(max_steps=steps, batch_size=8,
                                                 learning_rate=5e-3), progress=False)
        pushed = push(fed, client, result.output_dir, n_examples=result.n_examples)
        print(f"{client}: trained {result.steps} steps, pushed {pushed.commit[:12]}")

    # 3. The server job (normally a scheduler runs `fedbip-server run FED`).
    record = run_round(fed)
    print(f"round {record['round']}: {record['status']}, published for "
          f"{', '.join(sorted(record['outputs']))}")

    # 4. A member loads its personalized adapter with PEFT.
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model = PeftModel.from_pretrained(model, personalized_folder(fed, "alice"))
    print(f"alice loaded her personalized adapter: {type(model).__name__}")
    return record


if __name__ == "__main__":
    main()
