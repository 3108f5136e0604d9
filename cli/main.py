"""The ``fedbip`` command: thin typer wrappers over the library."""

from __future__ import annotations

from cli._common import VerboseOption, new_app, quiet_dependencies
from cli.demo import register_demo_commands
from cli.engine import register_engine_commands
from cli.federation import register_federation_commands
from cli.train import register_training_commands

app = new_app(
    "fedbip",
    "Personalized federated LoRA fine-tuning through the Hugging Face Hub (FedBip).",
)


@app.callback()
def _root(verbose: VerboseOption = False) -> None:
    """Personalized federated LoRA fine-tuning through the Hugging Face Hub (FedBip)."""
    quiet_dependencies(verbose)


register_engine_commands(app)
register_federation_commands(app)
register_training_commands(app)
register_demo_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
