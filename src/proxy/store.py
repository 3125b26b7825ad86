"""The state of the proxy behind one interface: `MemoryStore` (one process, the default) and
`RedisStore` (`SDPROXY_REDIS_URL`, shared by every instance that points at the same Redis).

What a store keeps:

- **limits**: a token bucket per client and counters over a window (daily quota, monthly API-key
  budget), checked and taken in one atomic step (`admit`), given back with `release`;
- **usage counters** per client (`count`, `counts`);
- **the image cache**: bytes under a key, with a time to live, bounded by the bytes it holds,
  each entry counted with its key and a fixed overhead (`cache_entry_size`), so that many tiny
  entries cannot hold far more memory than the bound says;
- **records**: bytes under a key with a time to live (jobs, stored images, idempotency keys,
  coalesced calls), `put_new` setting one only if it is absent, `incr` counting in one;
- **logs**: lists of events that readers replay and follow (`append`, `read`);
- **notifications**: `watch(channel)` wakes a waiter when `notify(channel)` is called, in any
  instance; waiters always re-read what they wait for, so a lost notification only delays them;
- **slots**: a counting semaphore with leases (`try_acquire`, `release_slot`), the global cap on
  concurrent upstream calls.

Every method of a `RedisStore` raises `StoreUnavailable` (503 `store_unavailable`) when Redis
cannot be reached; it reconnects by itself on the next call once Redis is back.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

__all__ = [
    "CACHE_ENTRY_OVERHEAD",
    "MAX_TRACKED_CLIENTS",
    "Admitted",
    "MemoryStore",
    "Refused",
    "Store",
    "Watch",
    "Window",
    "cache_entry_size",
]

CACHE_ENTRY_OVERHEAD = 256
"""Bytes counted per cache entry beyond its key and value: in memory the dict slot, the entry and
the bytes object's header; in Redis the key's metadata and the entry's places in the index zset
and the sizes hash (a few hundred bytes either way)."""


def cache_entry_size(key: str, value: bytes) -> int:
    """What one cache entry counts against `SDPROXY_CACHE_MAX_BYTES`: value, key and overhead."""
    return len(value) + len(key) + CACHE_ENTRY_OVERHEAD


MAX_TRACKED_CLIENTS = 100_000
"""Buckets and counters kept per client in memory; the least recently seen are dropped beyond."""


@dataclass(frozen=True)
class Window:
    """A counter limited to `limit` over a fixed window (a UTC day, a calendar month).

    Attributes:
        name: What the counter is (`quota`, `budget`): part of its key and of the refusal.
        limit: The most that may be held in one window.
        index: Which window `now` is in (the day or month number): part of the key.
        ends_in_s: Seconds until the window ends (the counter then expires).
    """

    name: str
    limit: int
    index: int
    ends_in_s: float


@dataclass(frozen=True)
class Admitted:
    """A request that passed: the windows it holds `images` of, to give back with `release`."""

    caller: str
    images: int
    holds: tuple[Window, ...]


@dataclass(frozen=True)
class Refused:
    """A request that did not pass: `what` is `rate` or the name of a full window."""

    what: str
    retry_after: float
    window: Window | None = None


class Watch:
    """A registration for a channel's notifications, made *before* reading what is waited for."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """Wait for a notification (or `seconds`); True when one came."""
        try:
            await asyncio.wait_for(self.event.wait(), seconds)
        except TimeoutError:
            return False
        self.event.clear()
        return True


class Store(ABC):
    """Shared state of the proxy; see the module docstring for what it holds."""

    shared: bool = False
    """Whether other instances see the same state (Redis) or only this process (memory)."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[Watch]] = {}

    # -- limits and counters ----------------------------------------------------------------------

    @abstractmethod
    async def admit(
        self,
        caller: str,
        *,
        per_minute: float,
        burst: int,
        windows: Sequence[Window],
        images: int,
        now: float,
    ) -> Admitted | Refused:
        """Count a request, take a token from the caller's bucket (when `per_minute` > 0) and
        hold `images` in each window, all or nothing.

        Returns:
            `Admitted` (nothing refused), or `Refused` (nothing taken except the request count).
        """

    @abstractmethod
    async def release(self, admitted: Admitted) -> None:
        """Give back the images an admitted request held (it delivered none)."""

    @abstractmethod
    async def count(self, caller: str, what: str, n: int = 1) -> None:
        """Add `n` to a per-client usage counter (`images`, `errors`, `rate_limited`, ...)."""

    @abstractmethod
    async def counts(self) -> dict[str, dict[str, int]]:
        """Every per-client counter."""

    # -- image cache ------------------------------------------------------------------------------

    @abstractmethod
    async def cache_get(self, key: str, *, ttl_s: float) -> bytes | None:
        """The cached bytes under `key`, or None; a hit lives `ttl_s` more (a sliding TTL)."""

    @abstractmethod
    async def cache_put(self, key: str, value: bytes, *, ttl_s: float, max_bytes: int) -> None:
        """Cache `value` for `ttl_s` after its last use, evicting the least recently used entries
        beyond `max_bytes` in all."""

    @abstractmethod
    async def cache_stats(self) -> dict[str, int]:
        """`items`, `bytes`, `hits`, `misses` of the cache."""

    # -- records and logs -------------------------------------------------------------------------

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The record under `key`, or None (absent or expired)."""

    @abstractmethod
    async def put(self, key: str, value: bytes, *, ttl_s: float) -> None:
        """Store a record, replacing any."""

    @abstractmethod
    async def put_new(self, key: str, value: bytes, *, ttl_s: float) -> bytes | None:
        """Store a record only if `key` is free.

        Returns:
            None when it was stored, else the record already there (left as it is).
        """

    @abstractmethod
    async def incr(self, key: str, *, ttl_s: float) -> int:
        """Add one to the counter record under `key` (read it with `get`: the number in ASCII) and
        return the new count; a new counter expires `ttl_s` after its first increment."""

    @abstractmethod
    async def delete(self, *keys: str) -> None:
        """Remove records and logs."""

    @abstractmethod
    async def append(self, key: str, item: bytes, *, ttl_s: float) -> None:
        """Append to a log and notify the channel of the same name."""

    @abstractmethod
    async def read(self, key: str, start: int = 0) -> list[bytes]:
        """The log's items from index `start` on."""

    # -- notifications and slots -----------------------------------------------------------------

    @abstractmethod
    async def notify(self, channel: str) -> None:
        """Wake every `watch(channel)` waiter, in every instance."""

    def watch(self, channel: str) -> AbstractAsyncContextManager[Watch]:
        """`async with store.watch(channel) as watch:` registers, then read, then `watch.wait()`."""
        return self._watch(channel)

    @asynccontextmanager
    async def _watch(self, channel: str) -> AsyncIterator[Watch]:
        watch = Watch()
        self._watchers.setdefault(channel, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._watchers[channel]
            watchers.discard(watch)
            if not watchers:
                del self._watchers[channel]

    def _wake(self, channel: str) -> None:
        """Wake this process's waiters of `channel`."""
        for watch in self._watchers.get(channel, ()):
            watch.event.set()

    def _wake_all(self) -> None:
        for watchers in self._watchers.values():
            for watch in watchers:
                watch.event.set()

    @abstractmethod
    async def try_acquire(self, name: str, holder: str, *, limit: int, lease_s: float) -> bool:
        """Take one of `limit` slots for `holder` (its lease ends after `lease_s`); False if none."""

    @abstractmethod
    async def release_slot(self, name: str, holder: str) -> None:
        """Give a slot back and notify the channel `name`."""

    # -- life -------------------------------------------------------------------------------------

    @abstractmethod
    async def start(self) -> None:
        """Connect (the app's lifespan calls it)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Disconnect."""

    @abstractmethod
    async def ping(self) -> None:
        """Check the store answers; raises `StoreUnavailable` otherwise."""


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class _Expiring:
    value: bytes
    expires: float


@dataclass
class _Log:
    items: list[bytes] = field(default_factory=list)
    expires: float = 0.0


class MemoryStore(Store):
    """State in this process's memory: what one proxy process needs, with nothing to install.

    Args:
        clock: Monotonic seconds, for expiry (injectable for tests).
    """

    shared = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._windows: dict[tuple[str, str, int], int] = {}
        self._counts: OrderedDict[str, Counter[str]] = OrderedDict()
        self._cache: OrderedDict[str, _Expiring] = OrderedDict()
        self._cache_bytes = 0
        self._hits = 0
        self._misses = 0
        self._records: dict[str, _Expiring] = {}
        self._logs: dict[str, _Log] = {}
        self._slots: dict[str, dict[str, float]] = {}

    # -- limits and counters ----------------------------------------------------------------------

    async def admit(
        self,
        caller: str,
        *,
        per_minute: float,
        burst: int,
        windows: Sequence[Window],
        images: int,
        now: float,
    ) -> Admitted | Refused:
        self._count(caller, "requests", 1)
        bucket: _Bucket | None = None
        tokens = taken = 0.0
        if per_minute > 0:
            bucket = self._buckets.get(caller)
            if bucket is None:
                bucket = self._buckets[caller] = _Bucket(float(burst), now)
                if len(self._buckets) > MAX_TRACKED_CLIENTS:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(caller)
            rate = per_minute / 60
            tokens = min(float(burst), bucket.tokens + max(0.0, now - bucket.updated) * rate)
            if tokens < 1:
                bucket.tokens, bucket.updated = tokens, now
                self._count(caller, "rate_limited", 1)
                return Refused("rate", (1 - tokens) / rate)
            # Taken only once every window has room: a refused request costs no token.
            taken = tokens - 1
        for window in windows:
            if self._windows.get((caller, window.name, window.index), 0) + images > window.limit:
                self._count(caller, f"{window.name}_exceeded", 1)
                if bucket is not None:
                    bucket.tokens, bucket.updated = tokens, now
                return Refused(window.name, window.ends_in_s, window)
        if bucket is not None:
            bucket.tokens, bucket.updated = taken, now
        for window in windows:
            self._drop_old_windows(caller, window)
            key = (caller, window.name, window.index)
            self._windows[key] = self._windows.get(key, 0) + images
        return Admitted(caller, images, tuple(windows))

    def _drop_old_windows(self, caller: str, window: Window) -> None:
        for key in [k for k in self._windows if k[:2] == (caller, window.name) and k[2] != window.index]:
            del self._windows[key]

    async def release(self, admitted: Admitted) -> None:
        for window in admitted.holds:
            key = (admitted.caller, window.name, window.index)
            if key in self._windows:
                self._windows[key] = max(0, self._windows[key] - admitted.images)

    def _count(self, caller: str, what: str, n: int) -> None:
        counter = self._counts.get(caller)
        if counter is None:
            counter = self._counts[caller] = Counter()
            if len(self._counts) > MAX_TRACKED_CLIENTS:
                self._counts.popitem(last=False)
        counter[what] += n

    async def count(self, caller: str, what: str, n: int = 1) -> None:
        self._count(caller, what, n)

    async def counts(self) -> dict[str, dict[str, int]]:
        return {caller: dict(counter) for caller, counter in self._counts.items()}

    # -- image cache ------------------------------------------------------------------------------

    async def cache_get(self, key: str, *, ttl_s: float) -> bytes | None:
        entry = self._cache.get(key)
        if entry is not None and entry.expires <= self._clock():
            self._cache_bytes -= cache_entry_size(key, self._cache.pop(key).value)
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._cache.move_to_end(key)
        entry.expires = self._clock() + ttl_s
        self._hits += 1
        return entry.value

    async def cache_put(self, key: str, value: bytes, *, ttl_s: float, max_bytes: int) -> None:
        size = cache_entry_size(key, value)
        if size > max_bytes:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= cache_entry_size(key, old.value)
        self._cache[key] = _Expiring(value, self._clock() + ttl_s)
        self._cache_bytes += size
        while self._cache_bytes > max_bytes:
            evicted_key, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= cache_entry_size(evicted_key, evicted.value)

    async def cache_stats(self) -> dict[str, int]:
        return {
            "items": len(self._cache),
            "bytes": self._cache_bytes,
            "hits": self._hits,
            "misses": self._misses,
        }

    # -- records and logs -------------------------------------------------------------------------

    def _live(self, key: str) -> _Expiring | None:
        entry = self._records.get(key)
        if entry is not None and entry.expires <= self._clock():
            del self._records[key]
            return None
        return entry

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return None if entry is None else entry.value

    async def put(self, key: str, value: bytes, *, ttl_s: float) -> None:
        self._expire_some()
        self._records[key] = _Expiring(value, self._clock() + ttl_s)

    async def put_new(self, key: str, value: bytes, *, ttl_s: float) -> bytes | None:
        entry = self._live(key)
        if entry is not None:
            return entry.value
        await self.put(key, value, ttl_s=ttl_s)
        return None

    async def incr(self, key: str, *, ttl_s: float) -> int:
        entry = self._live(key)
        if entry is None:
            await self.put(key, b"1", ttl_s=ttl_s)
            return 1
        count = int(entry.value) + 1
        entry.value = str(count).encode()
        return count

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._records.pop(key, None)
            self._logs.pop(key, None)

    async def append(self, key: str, item: bytes, *, ttl_s: float) -> None:
        log = self._logs.setdefault(key, _Log())
        log.items.append(item)
        log.expires = self._clock() + ttl_s
        await self.notify(key)

    async def read(self, key: str, start: int = 0) -> list[bytes]:
        log = self._logs.get(key)
        if log is None:
            return []
        if log.expires <= self._clock():
            del self._logs[key]
            return []
        return log.items[start:]

    def _expire_some(self) -> None:
        """Drop expired records and logs now and then, so that nothing grows without bound."""
        if len(self._records) % 256 or not self._records:
            return
        now = self._clock()
        for key in [k for k, v in self._records.items() if v.expires <= now]:
            del self._records[key]
        for key in [k for k, v in self._logs.items() if v.expires <= now]:
            del self._logs[key]

    # -- notifications and slots -----------------------------------------------------------------

    async def notify(self, channel: str) -> None:
        self._wake(channel)

    async def start(self) -> None:
        """Nothing to connect to."""

    async def aclose(self) -> None:
        """Nothing to disconnect."""

    async def ping(self) -> None:
        """Memory always answers."""

    async def try_acquire(self, name: str, holder: str, *, limit: int, lease_s: float) -> bool:
        now = self._clock()
        holders = self._slots.setdefault(name, {})
        for expired in [h for h, until in holders.items() if until <= now]:
            del holders[expired]
        if len(holders) >= limit:
            return False
        holders[holder] = now + lease_s
        return True

    async def release_slot(self, name: str, holder: str) -> None:
        self._slots.get(name, {}).pop(holder, None)
        await self.notify(name)
