"""Running rounds without a server: scheduled jobs (cron, GitHub Actions, HF Jobs) and
webhooks.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # 0.1's fedbip_hub.scheduling was a module: its names still resolve, with a warning.
    from fedbip_hub import moved_attribute

    return moved_attribute("scheduling", name)
