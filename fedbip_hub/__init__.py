"""fedbip-hub: personalized federated LoRA fine-tuning through the Hugging Face Hub."""

__version__ = "0.1.0"
