"""When to retry and how long to wait: pure functions, then the tenacity wiring.

Why re-sending a POST is safe here: a text-to-image request has no side effects on the server. It
creates nothing and changes nothing; the worst a duplicate does is compute (and bill) an image twice.
So a request that may already have run (read timeout, reset, truncated body) is repeated like any
other transient failure. Errors the caller has to fix (4xx other than 408/429) are never retried.

Cold-start waits (503 with ``estimated_time``) are not retries: they are handled by
:mod:`sdclient._coldstart` inside one attempt and bounded by ``max_wait_for_model`` only.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity
from tenacity.asyncio import AsyncRetrying

from ._constants import (
    COLD_START_PROBE_INTERVAL,
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    MIN_PROBE_INTERVAL,
)
from ._exceptions import APIConnectionError, APIStatusError, ModelLoadingTimeout

__all__ = [
    "RETRYABLE_STATUS_CODES",
    "RetryPolicy",
    "backoff_delay",
    "build_retrying",
    "is_retryable",
    "parse_retry_after",
]

RETRYABLE_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses worth another try. Any other 5xx is retried too; other 4xx never."""


@dataclass(frozen=True)
class RetryPolicy:
    """Timing knobs of retries and cold-start probing (tests shrink them)."""

    initial_delay: float = INITIAL_RETRY_DELAY
    """First back-off delay; doubles per retry."""
    max_delay: float = MAX_RETRY_DELAY
    """Longest back-off delay."""
    max_retry_after: float = MAX_RETRY_AFTER
    """``Retry-After`` values are capped to this."""
    probe_interval: float = COLD_START_PROBE_INTERVAL
    """Longest gap between cold-start probes once the first estimate has passed."""
    min_probe_interval: float = MIN_PROBE_INTERVAL
    """Shortest gap between cold-start probes."""


def parse_retry_after(
    value: str | None, *, cap: float = MAX_RETRY_AFTER, now: float | None = None
) -> float | None:
    """Parse a ``Retry-After`` header: delay seconds or an HTTP date.

    Args:
        value: The header value, or ``None``.
        cap: Longest delay returned.
        now: The current time (``time.time()``), for tests.

    Returns:
        Seconds to wait, between 0 and ``cap``; ``None`` when absent or unparsable.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


def backoff_delay(retry_number: int, policy: RetryPolicy) -> float:
    """Jittered exponential back-off.

    Args:
        retry_number: 1 for the first retry, 2 for the second, ...
        policy: Initial and maximum delay.

    Returns:
        ``min(initial * 2**(n-1), max)`` reduced by up to 25 % at random (so that many clients
        that failed together do not come back together).
    """
    base = min(policy.initial_delay * 2.0 ** (retry_number - 1), policy.max_delay)
    return base * (1.0 - 0.25 * random.random())


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed attempt is worth repeating (see the module docstring).

    Args:
        exc: What the attempt raised.

    Returns:
        ``True`` for connection errors, timeouts, 408, 429 and 5xx (but not a cold start that
        ran past its deadline).
    """
    if isinstance(exc, ModelLoadingTimeout):
        return False
    if isinstance(exc, APIConnectionError):
        return True
    if isinstance(exc, APIStatusError):
        return exc.status_code in RETRYABLE_STATUS_CODES or exc.status_code >= 500
    return False


class _Wait(tenacity.wait.wait_base):
    """Tenacity wait: the server's ``Retry-After`` when it sent one, else jittered back-off."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, APIStatusError) and exc.retry_after is not None:  # 429, or a 503 with it
            return exc.retry_after
        return backoff_delay(retry_state.attempt_number, self.policy)


def build_retrying(
    *,
    max_retries: int,
    deadline_s: float,
    policy: RetryPolicy,
    before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
) -> AsyncRetrying:
    """The tenacity controller of one client; use ``.copy(before_sleep=...)`` per call.

    Args:
        max_retries: Re-sends allowed after the first attempt.
        deadline_s: No attempt starts (and no sleep ends) later than this many seconds after the
            first one.
        policy: Back-off timing.
        before_sleep: Called before each sleep (events, usage, logging).

    Returns:
        An ``AsyncRetrying`` that re-raises the last error when it gives up.
    """
    return AsyncRetrying(
        retry=tenacity.retry_if_exception(is_retryable),
        wait=_Wait(policy),
        stop=tenacity.stop_after_attempt(max_retries + 1) | tenacity.stop_before_delay(deadline_s),
        before_sleep=before_sleep,
        reraise=True,
    )
