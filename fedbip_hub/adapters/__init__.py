"""The PEFT LoRA adapter a member uploads: its config, lazy file I/O, target-module
patterns, the upload's file listing and its metadata.
"""
