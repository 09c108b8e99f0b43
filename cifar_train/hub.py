"""Is the Hugging Face Hub available? One answer for everything that reaches for it (datasets, evaluation, push).

`huggingface_hub` retries for a long time on a machine without network; the probe here fails in seconds.
Offline mode is `huggingface_hub.constants.HF_HUB_OFFLINE` (read when that library was imported) or the
environment variables as they are now, so a variable set after the import still counts.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from cifar_train.errors import UserError

__all__ = ["OFFLINE_REASON", "check_hub_reachable", "hub_offline", "hub_unavailable"]

OFFLINE_REASON = "offline mode is on (HF_HUB_OFFLINE is set)"

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline() -> bool:
    """Whether offline mode is on, by the library's constant or by the environment now."""
    from huggingface_hub import constants

    now = (os.environ.get(name, "").upper() for name in _OFFLINE_VARIABLES)
    return bool(constants.HF_HUB_OFFLINE) or any(value in constants.ENV_VARS_TRUE_VALUES for value in now)


def hub_unavailable(timeout: float = 3.0) -> str | None:  # timeout in seconds
    """Why the Hub cannot be used right now (offline mode, no route), or None when a TCP connection opens."""
    if hub_offline():
        return OFFLINE_REASON
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    try:
        with socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return None
    except OSError:
        return f"the Hub ({host}) is unreachable from this machine"


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:  # timeout in seconds
    """Raise a one-line `UserError` naming `what` at once when the Hub cannot be used."""
    reason = hub_unavailable(timeout)
    if reason is None:
        return
    fix = "unset HF_HUB_OFFLINE" if hub_offline() else "check the network"
    raise UserError(f"{what}: the Hugging Face Hub is not available: {reason}; {fix}")
