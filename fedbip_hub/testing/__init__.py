"""Test helpers: a local, Hugging Face Hub-compatible server (see `hub_server`)."""
