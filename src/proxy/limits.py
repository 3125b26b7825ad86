"""Per-client protection: a token-bucket rate limit, a daily image quota, a monthly budget per API
key, a throttle on wrong keys, and per-client usage counts, all kept in the app's store.

With the memory store each process has its own buckets and counters (several workers multiply the
limits); with Redis every instance shares them, and the check-and-take is one atomic script.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from .errors import QuotaExceeded, RateLimitExceeded, StoreUnavailable
from .store import Admitted, Store, Window

__all__ = ["ClientLimiter"]

logger = logging.getLogger("proxy.limits")

DAY_S = 86_400


def _day_window(limit: int, now: float) -> Window:
    day = int(now // DAY_S)
    return Window("quota", limit, day, (day + 1) * DAY_S - now)


def _month_window(limit: int, now: float) -> Window:
    moment = datetime.fromtimestamp(now, UTC)
    days = calendar.monthrange(moment.year, moment.month)[1]
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp()
    return Window("budget", limit, moment.year * 12 + moment.month - 1, start + days * DAY_S - now)


class ClientLimiter:
    """Admission of generate calls per client id, against the store.

    Args:
        store: Where buckets and counters live.
        per_minute: Sustained requests a minute per client; 0 turns the rate limit off.
        burst: Requests a client may send at once before the rate applies.
        daily_quota: Images per client per UTC day; 0 means unlimited.
        key_monthly_budget: Images per API key per calendar month (UTC); 0 means unlimited.
            Applies to callers identified by an API key only.
        auth_failures_per_minute: Wrong API (or admin) keys a client address may send in one
            minute; then all its calls are refused until the minute ends. 0 turns it off.
        fail_open: When the store cannot be reached, let requests through unchecked (logged)
            instead of answering 503 `store_unavailable`.
        clock: Seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        store: Store,
        *,
        per_minute: float,
        burst: int,
        daily_quota: int,
        key_monthly_budget: int = 0,
        auth_failures_per_minute: int = 0,
        fail_open: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.per_minute = per_minute
        self.burst = burst
        self.daily_quota = daily_quota
        self.key_monthly_budget = key_monthly_budget
        self.auth_failures_per_minute = auth_failures_per_minute
        self.fail_open = fail_open
        self._clock = clock

    async def admit(self, caller: str, images: int = 1) -> Admitted:
        """Count the request, apply the rate limit and hold `images` of the caller's quota and
        budget, all at once: a refused request holds nothing.

        Returns:
            What was held, to give back with `release` or to settle with `deliver`.

        Raises:
            RateLimitExceeded: The caller's bucket is empty.
            QuotaExceeded: The daily quota or the key's monthly budget is used up.
            StoreUnavailable: The store cannot be reached (and `fail_open` is off).
        """
        now = self._clock()
        windows = []
        if self.daily_quota > 0:
            windows.append(_day_window(self.daily_quota, now))
        if self.key_monthly_budget > 0 and caller.startswith("key:"):
            windows.append(_month_window(self.key_monthly_budget, now))
        try:
            outcome = await self.store.admit(
                caller, per_minute=self.per_minute, burst=self.burst, windows=windows, images=images, now=now
            )
        except StoreUnavailable:
            if not self.fail_open:
                raise
            logger.warning("store unavailable: request let through without limits (fail-open)")
            return Admitted(caller, images, ())
        if isinstance(outcome, Admitted):
            return outcome
        if outcome.what == "rate":
            raise RateLimitExceeded(
                f"Too many requests: at most {self.per_minute:g} a minute (bursts of {self.burst}). "
                f"Try again in {outcome.retry_after:.0f} s.",
                retry_after=outcome.retry_after,
            )
        if outcome.what == "budget":
            raise QuotaExceeded(
                f"This API key's monthly budget of {self.key_monthly_budget} images is used up. "
                "It renews on the first day of next month (UTC).",
                retry_after=outcome.retry_after,
            )
        raise QuotaExceeded(
            f"Daily limit of {self.daily_quota} images reached. It resets at midnight UTC.",
            retry_after=outcome.retry_after,
        )

    def _auth_failures_key(self, client: str) -> tuple[str, float]:
        """The counter of `client`'s wrong keys this minute, and the seconds until the minute ends."""
        now = self._clock()
        minute = int(now // 60)
        return f"authfail:{minute}:{client}", (minute + 1) * 60 - now

    async def check_auth_failures(self, client: str) -> None:
        """Refuse every call of a client address that sent too many wrong keys this minute, the
        right key included: otherwise a guesser would still learn which guess is right.

        Raises:
            RateLimitExceeded: The address sent `auth_failures_per_minute` wrong keys this minute.
            StoreUnavailable: The store cannot be reached (and `fail_open` is off).
        """
        if self.auth_failures_per_minute <= 0:
            return
        key, ends_in = self._auth_failures_key(client)
        try:
            failures = int(await self.store.get(key) or 0)
        except StoreUnavailable:
            if not self.fail_open:
                raise
            return
        if failures >= self.auth_failures_per_minute:
            raise RateLimitExceeded(
                f"Too many wrong API keys from this address: at most {self.auth_failures_per_minute} "
                f"a minute. Try again in {math.ceil(ends_in)} s.",
                retry_after=ends_in,
            )

    async def auth_failed(self, client: str) -> None:
        """Count a wrong key sent from `client` (never failing the request for it)."""
        if self.auth_failures_per_minute <= 0:
            return
        key, ends_in = self._auth_failures_key(client)
        try:
            await self.store.incr(key, ttl_s=ends_in + 60)
        except StoreUnavailable:
            logger.warning("store unavailable: a wrong API key was not counted")

    async def deliver(self, held: Admitted) -> None:
        """The held images were answered: count them (they stay counted in the windows)."""
        await self._safely(self.store.count(held.caller, "images", held.images))

    async def release(self, held: Admitted) -> None:
        """No image was answered: give the held images back."""
        await self._safely(self.store.release(held))

    async def count(self, caller: str, what: str, n: int = 1) -> None:
        """Add to a per-client counter (`errors`, ...), never failing the request for it."""
        await self._safely(self.store.count(caller, what, n))

    async def _safely(self, step: Awaitable[None]) -> None:
        try:
            await step
        except StoreUnavailable:
            logger.warning("store unavailable: a usage count or release was lost")
