"""Decide once, before any Hugging Face library is imported, whether the Hub is reachable.

Without this, a missing model or dataset costs huggingface_hub's retry loop (minutes, a hundred
log lines) before the error. huggingface_hub, transformers and datasets read their offline
switches when first imported, so the decision must be made, and written to the environment,
before that.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


def endpoint_address(endpoint: str) -> tuple[str, int]:
    """(host, port) of a Hub endpoint URL such as https://huggingface.co or http://127.0.0.1:9."""
    url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def reachable(host: str, port: int, timeout: float) -> bool:
    """A TCP connection to host:port opens within `timeout` seconds (DNS included: the lookup runs
    in a daemon thread because socket timeouts do not cover getaddrinfo)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def decide_offline(environ=os.environ, timeout: float = 1.0) -> tuple[bool, str]:
    """(offline, one-line reason); sets every library's offline switch in `environ` when offline.

    HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) set by the user wins without a
    check; otherwise one connection attempt to HF_ENDPOINT (default huggingface.co:443)."""
    if any(str(environ.get(v, "")).lower() in _TRUE for v in OFFLINE_VARS):
        for var in OFFLINE_VARS:
            environ[var] = "1"
        return True, "offline (HF_HUB_OFFLINE=1): models and data load from local paths only"
    endpoint = environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    host, port = endpoint_address(endpoint)
    if reachable(host, port, timeout):
        return False, f"Hugging Face Hub reachable at {host}:{port}"
    for var in OFFLINE_VARS:
        environ[var] = "1"
    return True, (
        f"offline: the Hugging Face Hub ({host}:{port}) is not reachable, so models and data "
        "load from local paths only (set HF_HUB_OFFLINE=1 to skip this check)"
    )
