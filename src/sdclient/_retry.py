"""When to retry and how long to wait: pure functions, then the tenacity wiring.

Why re-sending a POST is safe here: a text-to-image request has no side effects on the server. It
creates nothing and changes nothing; the worst a duplicate does is compute (and bill) an image twice.
So a request that may already have run (read timeout, reset, truncated body) is repeated like any
other transient failure. Errors the caller has to fix (4xx other than 408/429) are never retried.

A service in front of the client (the proxy) may not want that for timeouts: when its timeout is
shorter than a generation, each re-send after a read timeout queues one more job on a server that
is still working on the first. ``RetryPolicy(retry_read_timeouts=False)`` gives up instead.

A refused connection (nothing listens yet: a self-hosted server still starting) is retried until
the call's deadline, not just ``max_retries`` times. Cold-start waits (503 with
``estimated_time``) are not retries: they are handled by
:mod:`sdclient._coldstart` inside one attempt and bounded by ``max_wait_for_model`` only.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from ._constants import (
    COLD_START_PROBE_INTERVAL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_POLL_INTERVAL,
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    MIN_PROBE_INTERVAL,
)
from ._exceptions import APIConnectionError, APIStatusError, APITimeoutError, ModelLoadingTimeout

__all__ = [
    "RETRYABLE_STATUS_CODES",
    "RetryPolicy",
    "backoff_delay",
    "call_with_retries",
    "is_retryable",
    "parse_retry_after",
]

T = TypeVar("T")

RETRYABLE_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses worth another try. Any other 5xx is retried too; other 4xx never."""


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often :class:`SDClient` tries again: ``SDClient(retry=RetryPolicy(...))``.

    Example:
        ```python
        patient = RetryPolicy(max_retries=6, max_delay=30.0)
        client = SDClient("user/sd-model", retry=patient)
        ```
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    """Re-sends after a transient failure (5xx, 429, timeouts, resets). A refused connection (a
    server still starting) is retried until ``max_wait_for_model`` instead; cold-start waits do
    not count."""
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
    poll_interval: float = DEFAULT_POLL_INTERVAL
    """Gap between status requests of a job queued at a provider."""
    retry_read_timeouts: bool = True
    """Re-send a request whose answer timed out after it was sent (``APITimeoutError.sent``).
    ``False``: raise the timeout at once, since the server may still be generating and a re-send
    would queue a second job there (the proxy sets this). Connect timeouts, and GETs (a provider's
    job status, an image download), are retried either way."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("initial_delay", "max_delay", "max_retry_after", "probe_interval", "min_probe_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if not self.poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {self.poll_interval}")


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


def is_retryable(exc: BaseException, policy: RetryPolicy | None = None) -> bool:
    """Whether a failed attempt is worth repeating (see the module docstring).

    Args:
        exc: What the attempt raised.
        policy: The policy in force (its ``retry_read_timeouts``); the default policy when omitted.

    Returns:
        ``True`` for connection errors, timeouts, 408, 429 and 5xx (but not a cold start that
        ran past its deadline, nor a timeout after sending when the policy says so).
    """
    if isinstance(exc, ModelLoadingTimeout):
        return False
    if isinstance(exc, APITimeoutError) and exc.sent and policy is not None:
        return policy.retry_read_timeouts
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


class _Stop(tenacity.stop.stop_base):
    """Tenacity stop: at the deadline (when the next sleep would end past it), or after
    ``max_retries`` re-sends; refused connections do not count towards these."""

    def __init__(self, max_retries: int, deadline: float, clock: Callable[[], float]) -> None:
        self.max_retries = max_retries
        self.deadline = deadline
        self.clock = clock
        self.counted = 0

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        if self.clock() + retry_state.upcoming_sleep >= self.deadline:
            return True
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, APIConnectionError) and exc.refused:
            return False  # a server that is still starting: wait for it until the deadline
        self.counted += 1
        return self.counted > self.max_retries


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    deadline: float,
    before_sleep: Callable[[tenacity.RetryCallState], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> T:
    """Run ``attempt``, retrying transient failures (see :func:`is_retryable`), never past ``deadline``.

    Args:
        attempt: One try (sends and parses), raising on failure.
        policy: How many re-sends and how long to wait between them.
        deadline: ``clock()`` after which no sleep may end.
        before_sleep: Called before each sleep (events, usage, logging).
        clock: The monotonic clock the deadline is on.
        sleep: Sleeps seconds of ``clock`` (``asyncio.sleep`` by default).

    Returns:
        What ``attempt`` returned.

    Raises:
        Exception: The last failure, once retries, the deadline or retryability run out.
    """
    # tenacity's attempt loop, synchronous (its asyncio variant re-wraps every callback in a
    # coroutine on every try); the sleep tenacity decides on is awaited here, before the next try.
    sleeps: list[float] = []
    retrying = tenacity.Retrying(
        sleep=sleeps.append,
        retry=tenacity.retry_if_exception(lambda exc: is_retryable(exc, policy)),
        wait=_Wait(policy),
        stop=_Stop(policy.max_retries, deadline, clock),
        before_sleep=before_sleep,
        reraise=True,
    )
    pause = sleep or asyncio.sleep
    for try_ in retrying:
        if sleeps:
            await pause(sleeps.pop())
        with try_:
            result = await attempt()
    return result
