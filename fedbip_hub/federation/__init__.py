"""A federation as its members see it: its config and state in the federation repo,
the client commands (init, join, push, pull), status, and model cards.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # 0.1's fedbip_hub.federation was a module: its names still resolve, with a warning.
    from fedbip_hub import moved_attribute

    return moved_attribute("federation", name)
