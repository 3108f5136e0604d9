"""Client-side training and evaluation: data, the Trainer-based training, quantization,
memory estimates, base-model loading and the bring-your-own-trainer hooks.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # 0.1's fedbip_hub.training was a module: its names still resolve, with a warning.
    from fedbip_hub import moved_attribute

    return moved_attribute("training", name)
