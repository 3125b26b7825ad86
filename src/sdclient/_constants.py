"""Defaults of the client, in one place."""

from __future__ import annotations

import httpx

__all__ = [
    "COLD_START_PROBE_INTERVAL",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MAX_WAIT_FOR_MODEL",
    "DEFAULT_TIMEOUT",
    "HF_HOST_SUFFIXES",
    "INITIAL_RETRY_DELAY",
    "MAX_RETRY_AFTER",
    "MAX_RETRY_DELAY",
    "MIN_PROBE_INTERVAL",
]

DEFAULT_BASE_URL = "https://router.huggingface.co/hf-inference"
"""Where a Hub model id is sent: ``{DEFAULT_BASE_URL}/models/{model_id}``."""

DEFAULT_TIMEOUT = httpx.Timeout(timeout=120.0, connect=10.0)
"""Generating one image on a busy GPU can take a minute: read generously, connect quickly."""

DEFAULT_MAX_RETRIES = 3
"""Re-sends after a transient failure (5xx, 429, connection errors). Cold-start waits do not count."""

DEFAULT_MAX_WAIT_FOR_MODEL = 300.0
"""Seconds a call may spend waiting (cold start and back-off sleeps), counted from its first send."""

INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
"""Jittered exponential back-off: 0.5 s, 1 s, 2 s, ... at most 8 s."""

MAX_RETRY_AFTER = 60.0
"""A server's ``Retry-After`` is honoured up to this many seconds."""

COLD_START_PROBE_INTERVAL = 1.0
"""Once the server's ``estimated_time`` has passed, probe a loading model at most this far apart."""

MIN_PROBE_INTERVAL = 0.25
"""Never probe a loading model more often than this, whatever its estimate says."""

HF_HOST_SUFFIXES = ("huggingface.co", "huggingface.cloud")
"""A token that was discovered (not passed explicitly) is only sent to these hosts and their subdomains."""
