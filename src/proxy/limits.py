"""Per-client protection: a token-bucket rate limit, a daily image quota, and per-client counts.

State lives in this process's memory. With several uvicorn workers each worker has its own buckets
and counters, so the effective limits are multiplied by the number of workers (docs/proxy.md).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import QuotaExceeded, RateLimitExceeded

__all__ = ["ClientLimiter", "TokenBucket"]

MAX_TRACKED_CLIENTS = 100_000
"""Buckets kept in memory; the least recently seen client's bucket is dropped beyond this."""


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `rate` tokens a second; one request takes one token."""

    capacity: float
    rate: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token.

        Returns:
            0 when a token was taken, else the seconds until one will be available.
        """
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def _utc_day(now: float) -> int:
    return int(now // 86_400)


class ClientLimiter:
    """Rate limit and daily quota per client id, plus counters for `GET /usage`.

    Args:
        per_minute: Sustained requests a minute per client; 0 turns the rate limit off.
        burst: Requests a client may send at once before the rate applies.
        daily_quota: Images per client per UTC day; 0 means unlimited.
        clock: Seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        *,
        per_minute: float,
        burst: int,
        daily_quota: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self.daily_quota = daily_quota
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._day = _utc_day(clock())
        self._images_today: Counter[str] = Counter()
        self._reserved: Counter[str] = Counter()
        self.counts: dict[str, Counter[str]] = {}

    def count(self, client: str, what: str) -> None:
        """Add one to a per-client counter (`requests`, `images`, `rate_limited`, ...)."""
        if client not in self.counts and len(self.counts) >= MAX_TRACKED_CLIENTS:
            self.counts.pop(next(iter(self.counts)))
        self.counts.setdefault(client, Counter())[what] += 1

    def check_rate(self, client: str) -> None:
        """Take one token from the client's bucket.

        Raises:
            RateLimitExceeded: The bucket is empty; `retry_after` says when it will not be.
        """
        if self.per_minute <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = TokenBucket(self.burst, self.per_minute / 60, float(self.burst), now)
            self._buckets[client] = bucket
            if len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        wait = bucket.take(now)
        if wait:
            self.count(client, "rate_limited")
            raise RateLimitExceeded(
                f"Too many requests: at most {self.per_minute:g} a minute (bursts of {self.burst}). "
                f"Try again in {wait:.0f} s.",
                retry_after=wait,
            )

    def reserve_image(self, client: str) -> None:
        """Hold one image of the client's daily quota until `commit_image` or `release_image`.

        Raises:
            QuotaExceeded: The client has used its images for today.
        """
        if self.daily_quota <= 0:
            return
        now = self._clock()
        if _utc_day(now) != self._day:
            self._day = _utc_day(now)
            self._images_today.clear()
        if self._images_today[client] + self._reserved[client] >= self.daily_quota:
            self.count(client, "quota_exceeded")
            raise QuotaExceeded(
                f"Daily limit of {self.daily_quota} images reached. It resets at midnight UTC.",
                retry_after=(self._day + 1) * 86_400 - now,
            )
        self._reserved[client] += 1

    def commit_image(self, client: str) -> None:
        """The reserved image was delivered: count it against today's quota."""
        self.count(client, "images")
        if self.daily_quota <= 0:
            return
        self._release(client)
        self._images_today[client] += 1

    def release_image(self, client: str) -> None:
        """The reserved image was not delivered: give the reservation back."""
        if self.daily_quota > 0:
            self._release(client)

    def _release(self, client: str) -> None:
        self._reserved[client] -= 1
        if self._reserved[client] <= 0:
            del self._reserved[client]
