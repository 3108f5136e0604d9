"""A member who trains with TRL's ``SFTTrainer``: start from the right adapter, train,
and let a callback push the result with the right metadata.

    python examples/trl_member.py --fed ORG/NAME --client alice --data alice.jsonl
    python examples/trl_member.py --setup ./trl-demo --quick   # CI: builds it all offline

``--setup DIR`` builds a tiny causal LM and its tokenizer from a config, a local
causal-LM federation with ``alice`` as a member, and her prompt/completion data, then
runs the member's side against it. The member's side is three calls:

1. ``prepare_start``: the member's latest personalized adapter, or the federation's
   initial one before the first round (``fedbip pull --or-init`` on the command line),
   in a folder ``PeftModel.from_pretrained(base, folder, is_trainable=True)`` loads;
2. ``load_trainable``: the base with that adapter on it, trainable;
3. ``FedbipPushCallback``: on train end, saves the adapter and pushes it (start revision,
   example count) through ``fedbip push``'s checks.

Without the callback, any trainer does the same by hand: ``fedbip pull --or-init --out
DIR``, train, ``save_pretrained(DIR)``, ``fedbip push --adapter DIR``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_setup import make_tiny_causal_base, write_completion_data


def setup(work: Path) -> tuple[str, Path]:
    """A local causal-LM federation with member alice, and her data (all offline)."""
    from fedbip_hub.federation.client import init_federation, join
    from fedbip_hub.federation.config import FederationConfig, LoraSpec
    from fedbip_hub.federation.repo import Federation

    work = work.resolve()
    address = str(work / "llmfed")
    fed = Federation.at(address)
    if not fed.store.repo_exists(fed.repo_id):  # a second run trains the next round
        base = make_tiny_causal_base(work / "tiny-causal-base")
        config = FederationConfig(name="llmfed", base_model=str(base), task_type="CAUSAL_LM",
                                  lora=LoraSpec(r=4, alpha=8))
        init_federation(address, config)
    join(fed, "alice")
    return address, write_completion_data(work / "alice-sft.jsonl", n=32, seed=0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fed", help="The federation (org/name or folder).")
    parser.add_argument("--client", default="alice")
    parser.add_argument("--data", type=Path,
                        help='JSON Lines of {"prompt": ..., "completion": ...} (or "text").')
    parser.add_argument("--setup", type=Path, help="Build a tiny federation here first.")
    parser.add_argument("--out", type=Path, help="Adapter folder (default ./trl-CLIENT).")
    parser.add_argument("--quick", action="store_true", help="A few steps (CI).")
    args = parser.parse_args(argv)
    if args.setup:
        args.fed, args.data = setup(args.setup)
    if not (args.fed and args.data):
        parser.error("pass --fed and --data, or --setup DIR")

    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from fedbip_hub.federation.repo import Federation
    from fedbip_hub.training.data_files import load_examples
    from fedbip_hub.training.integration import (
        FedbipPushCallback,
        load_trainable,
        prepare_start,
    )

    fed = Federation.at(args.fed)
    config = fed.config()
    folder = (args.out or Path(f"trl-{args.client}")).resolve()
    start = prepare_start(fed, args.client, folder)
    print(f"{args.client} starts from "
          f"{start.revision[:12] if start.revision else 'the initial adapter'}")
    model = load_trainable(fed, start)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model, token=fed.token)
    dataset = load_examples(args.data)
    push = FedbipPushCallback(fed, start, n_examples=len(dataset))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=dataset,
            callbacks=[push],
            args=SFTConfig(output_dir=scratch, max_steps=3 if args.quick else 200,
                           per_device_train_batch_size=8, learning_rate=5e-3,
                           max_length=64, save_strategy="no", report_to=[], use_cpu=True,
                           logging_steps=1 if args.quick else 20))
        trainer.train()
    result = push.result
    print(f"pushed {result.repo_id} @ {result.commit[:12]} ({result.metadata.n_examples} "
          f"examples, start {(result.metadata.start_revision or 'init')[:12]})")
    return {"folder": str(folder), "commit": result.commit,
            "start_revision": result.metadata.start_revision}


if __name__ == "__main__":
    main()
