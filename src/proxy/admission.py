"""Bounded concurrency with a bounded queue: a request either gets a slot, waits in line, or is
refused at once with 503 `busy` (so load beyond capacity never piles up in memory)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from .errors import Busy

__all__ = ["AdmissionQueue"]


class AdmissionQueue:
    """`max_concurrency` upstream calls at once, at most `queue_size` more waiting for a slot.

    Args:
        max_concurrency: Calls that may run at the same time.
        queue_size: Calls that may wait for a slot; one more is refused with `Busy`.
    """

    def __init__(self, max_concurrency: int, queue_size: int) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self._slots = asyncio.Semaphore(max_concurrency)
        self.active = 0
        self.waiting = 0
        self.refused = 0
        self._avg_duration_s = 5.0  # a guess until the first call finishes

    def _retry_after(self) -> float:
        """About how long until a place frees up: the average call time per slot in line."""
        return self._avg_duration_s * (self.waiting + 1) / self.max_concurrency

    def is_full(self) -> bool:
        """Whether a new call would be refused: every slot and every place in line is taken."""
        return self._slots.locked() and self.waiting >= self.queue_size

    def refuse_if_full(self) -> None:
        """The one busy check: refuse a new call while every slot and queue place is taken.

        `LoadSheddingMiddleware` calls it before a generate request's body is read (a refusal
        then costs almost nothing), and `slot()` calls it again as the bound itself: requests
        that passed the middleware together may since have filled the queue.

        Raises:
            Busy: With an estimate of when to try again.
        """
        if self.is_full():
            self.refused += 1
            raise Busy(
                "The service is busy: every generation slot and queue place is taken. Try again shortly.",
                retry_after=self._retry_after(),
            )

    @asynccontextmanager
    async def slot(self, on_queued: Callable[[int], None] | None = None) -> AsyncIterator[None]:
        """Hold a slot for the duration of the `async with` block.

        Args:
            on_queued: Called once, before waiting, with the number of calls ahead in line
                (0 when a slot is free).

        Raises:
            Busy: Every slot and every place in the queue is taken.
        """
        self.refuse_if_full()
        free = not self._slots.locked()
        if on_queued is not None:
            on_queued(0 if free else self.waiting + 1)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
            self._avg_duration_s = 0.8 * self._avg_duration_s + 0.2 * (time.monotonic() - started)

    def snapshot(self) -> dict[str, int]:
        """Counters for `GET /usage`."""
        return {
            "active": self.active,
            "waiting": self.waiting,
            "refused": self.refused,
            "max_concurrency": self.max_concurrency,
            "queue_size": self.queue_size,
        }
