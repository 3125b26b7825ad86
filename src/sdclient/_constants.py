"""Defaults of the client, in one place."""

from __future__ import annotations

import httpx

from .protocol import DEFAULT_BASE_URL, HF_HOST_SUFFIXES, HUB_ENDPOINT, ROUTER_URL

__all__ = [
    "CANCEL_TIMEOUT",
    "COLD_START_PROBE_INTERVAL",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MAX_WAIT_FOR_MODEL",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_SCALE_UP_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ENDPOINT_HOST_SUFFIX",
    "HF_HOST_SUFFIXES",
    "HUB_ENDPOINT",
    "ROUTER_URL",
    "INITIAL_RETRY_DELAY",
    "MAX_RETRY_AFTER",
    "MAX_RETRY_DELAY",
    "MIN_PROBE_INTERVAL",
]


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

DEFAULT_POLL_INTERVAL = 0.5
"""Seconds between status requests of a job queued at a provider (huggingface_hub polls at 0.5 s too)."""

ENDPOINT_HOST_SUFFIX = ".endpoints.huggingface.cloud"
"""Dedicated Inference Endpoints: sent ``X-Scale-Up-Timeout`` unless told otherwise."""

DEFAULT_SCALE_UP_TIMEOUT = 300.0
"""Seconds a scaled-to-zero Endpoint is asked to hold a request (capped by ``max_wait_for_model``)."""

CANCEL_TIMEOUT = 5.0
"""Seconds allowed for cancelling a provider job the caller gave up on."""
