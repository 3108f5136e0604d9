"""The Hugging Face Hub as a store (`HubStore`; see `fedbip_hub.stores.hub.store`)."""

from fedbip_hub.stores.hub.calls import DEFAULT_MAX_RATE_WAIT
from fedbip_hub.stores.hub.client import DEFAULT_TIMEOUT, TIMEOUT_ENV
from fedbip_hub.stores.hub.commits import WRITE_ID_TRAILER
from fedbip_hub.stores.hub.failures import TRANSIENT_STATUS
from fedbip_hub.stores.hub.store import HubStore

__all__ = ["DEFAULT_MAX_RATE_WAIT", "DEFAULT_TIMEOUT", "TIMEOUT_ENV", "TRANSIENT_STATUS",
           "WRITE_ID_TRAILER", "HubStore"]
