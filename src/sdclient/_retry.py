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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

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
    "StopAtDeadline",
    "backoff_delay",
    "build_retrying",
    "call_with_retries",
    "is_retryable",
    "parse_retry_after",
]

T = TypeVar("T")

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


class StopAtDeadline(tenacity.stop.stop_base):
    """Tenacity stop: give up when the next sleep would end past ``deadline`` (``time.monotonic()``)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return time.monotonic() + retry_state.upcoming_sleep >= self.deadline


def build_retrying(policy: RetryPolicy) -> AsyncRetrying:
    """The tenacity controller of one client (a template: :func:`call_with_retries` copies it).

    Args:
        policy: Back-off timing.

    Returns:
        An ``AsyncRetrying`` that retries what :func:`is_retryable` accepts, waits as the server
        asks or backs off, and re-raises the last error when it gives up.
    """
    return AsyncRetrying(retry=tenacity.retry_if_exception(is_retryable), wait=_Wait(policy), reraise=True)


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    retrying: AsyncRetrying,
    max_retries: int,
    deadline: float,
    before_sleep: Callable[[tenacity.RetryCallState], None],
) -> T:
    """Run ``attempt``, retrying transient failures as ``retrying`` says, never past ``deadline``.

    Most calls succeed at once, and a tenacity controller costs 50-100 µs per use (a few percent
    of a local request), so the first attempt runs bare. After a retryable failure tenacity takes
    over: its first "attempt" re-raises that failure, so attempt counts, waits and stops are
    exactly tenacity's.

    Args:
        attempt: One try (sends and parses), raising on failure.
        retrying: The client's template from :func:`build_retrying`.
        max_retries: Re-sends allowed after the first attempt.
        deadline: ``time.monotonic()`` after which no sleep may end.
        before_sleep: Called before each sleep (events, usage, logging).

    Returns:
        What ``attempt`` returned.

    Raises:
        Exception: The last failure, once retries, the deadline or retryability run out.
    """
    try:
        return await attempt()
    except Exception as exc:
        if not is_retryable(exc):
            raise
        replay: list[Exception] = [exc]
    stop = tenacity.stop_any(tenacity.stop_after_attempt(max_retries + 1), StopAtDeadline(deadline))
    controller = retrying.copy(stop=stop, before_sleep=before_sleep)
    async for trial in controller:
        with trial:
            if replay:
                raise replay.pop()  # the first attempt, already made above
            return await attempt()
    raise AssertionError("tenacity ended without a result or an error")  # pragma: no cover
