"""`RedisStore`: the proxy's state in Redis (`SDPROXY_REDIS_URL`), shared by every instance.

Each operation is one round trip: the ones that read and write (admission, cache, slots) are Lua
scripts, which Redis runs atomically, so two instances never both take the last token of a bucket
or the last image of a quota. Keys all start with the store's prefix (`sdproxy:` by default). The
scripts touch keys named from their arguments (cache entries), which a single Redis allows; Redis
Cluster is not supported.

Notifications go over one pub/sub channel, `<prefix>notify`, read by one connection per instance
that reconnects by itself. Waiters re-read what they wait for after each wake-up or timeout, so a
notification lost while Redis restarts only delays them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import StoreUnavailable
from .store import Admitted, Refused, Store, Window, cache_entry_size

__all__ = ["RedisStore"]

logger = logging.getLogger("proxy.store")

CONNECT_TIMEOUT_S = 0.5
"""Connecting to Redis on a private network takes milliseconds: fail fast when it is down."""

COMMAND_TIMEOUT_S = 2.0
"""The longest a command may take before the store is treated as unavailable."""

RECONNECT_DELAY_S = 0.25
"""Pause between attempts of the notification listener to reconnect."""

# KEYS: usage hash, bucket hash, window counters...; ARGV: caller, now, per_minute, burst, images,
# then limit and name of each window, then the window TTLs in ms (same order).
_ADMIT = """
local nwin = #KEYS - 2
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('SADD', ARGV[6 + 2 * nwin], ARGV[1])
local now = tonumber(ARGV[2])
local per_minute = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local images = tonumber(ARGV[5])
local tokens = 0
local rate = per_minute / 60
if per_minute > 0 then
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'updated')
  local t = tonumber(b[1])
  local u = tonumber(b[2])
  if t == nil then t = burst; u = now end
  tokens = math.min(burst, t + math.max(0, now - u) * rate)
  if tokens < 1 then
    redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'updated', tostring(now))
    redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
    redis.call('HINCRBY', KEYS[1], 'rate_limited', 1)
    return {'rate', tostring((1 - tokens) / rate)}
  end
end
for i = 1, nwin do
  local limit = tonumber(ARGV[5 + 2 * i - 1])
  local held = tonumber(redis.call('GET', KEYS[2 + i]) or '0')
  if held + images > limit then
    redis.call('HINCRBY', KEYS[1], ARGV[5 + 2 * i] .. '_exceeded', 1)
    return {'window', tostring(i)}
  end
end
if per_minute > 0 then
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
end
for i = 1, nwin do
  redis.call('INCRBY', KEYS[2 + i], images)
  redis.call('PEXPIRE', KEYS[2 + i], ARGV[6 + 2 * nwin + i])
end
return {'ok', '0'}
"""

# KEYS: window counters; ARGV: images.
_RELEASE = """
for i = 1, #KEYS do
  local held = tonumber(redis.call('GET', KEYS[i]) or '0')
  if held > 0 then redis.call('DECRBY', KEYS[i], math.min(held, tonumber(ARGV[1]))) end
end
return 1
"""

# KEYS: entry, stats hash, index zset (name -> expiry ms); ARGV: name, ttl ms, now ms.
_CACHE_GET = """
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('HINCRBY', KEYS[2], 'misses', 1)
  return false
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], 'XX', tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[1])
redis.call('HINCRBY', KEYS[2], 'hits', 1)
return value
"""

# KEYS: entry, stats hash, index zset, sizes hash; ARGV: name, value, ttl ms, max bytes, now ms,
# entry key prefix, size counted (`cache_entry_size`: value, key and overhead). Entries are
# evicted by expiry (the least recently used first).
_CACHE_PUT = """
local function forget(name)
  local size = tonumber(redis.call('HGET', KEYS[4], name) or '0')
  redis.call('HDEL', KEYS[4], name)
  redis.call('ZREM', KEYS[3], name)
  if size > 0 then redis.call('HINCRBY', KEYS[2], 'bytes', -size) end
  return size
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])) do forget(name) end
forget(ARGV[1])
local size = tonumber(ARGV[7])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], tonumber(ARGV[5]) + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], size)
local total = redis.call('HINCRBY', KEYS[2], 'bytes', size)
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #oldest == 0 then break end
  total = total - forget(oldest[1])
  redis.call('DEL', ARGV[6] .. oldest[1])
end
return total
"""

# KEYS: holders zset (holder -> lease end ms); ARGV: holder, limit, now ms, lease ms.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


# KEYS: counter; ARGV: ttl ms (set on the first increment only).
_INCR = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _now_ms() -> str:
    """Now in milliseconds, with its fraction: cache uses within one millisecond stay ordered."""
    return repr(time.time() * 1000)


class RedisStore(Store):
    """State in Redis, shared by every proxy instance that uses the same URL and prefix.

    Args:
        url: A redis-py URL: `redis://host:6379/0`, `rediss://...` for TLS, with
            `user:password@` when Redis needs them.
        prefix: Start of every key (instances of different deployments may share one Redis).
    """

    shared = True

    def __init__(self, url: str, *, prefix: str = "sdproxy:") -> None:
        super().__init__()
        self.prefix = prefix
        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            # One immediate retry on a fresh connection: a connection broken by a Redis restart
            # is replaced without an error; a Redis that is down fails at once.
            "retry": Retry(NoBackoff(), 1),
        }
        self._redis = aioredis.from_url(url, socket_timeout=COMMAND_TIMEOUT_S, **options)
        # The listener waits for messages for as long as it takes: no read timeout.
        self._listener_redis = aioredis.from_url(url, socket_timeout=None, **options)
        self._channel = prefix + "notify"
        self._listener: asyncio.Task[None] | None = None
        self._admit = self._redis.register_script(_ADMIT)
        self._release = self._redis.register_script(_RELEASE)
        self._cache_get = self._redis.register_script(_CACHE_GET)
        self._cache_put = self._redis.register_script(_CACHE_PUT)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._incr = self._redis.register_script(_INCR)

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Translate Redis being away into `StoreUnavailable` (503 `store_unavailable`)."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(
                "The proxy's shared store (Redis) cannot be reached. Try again shortly."
            ) from exc
        except RedisError as exc:
            logger.error("Redis refused a command: %s", exc)
            raise StoreUnavailable("The proxy's shared store (Redis) refused a command.") from exc

    # -- life -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="sdproxy-redis-listener")

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()
        await self._listener_redis.aclose()

    async def ping(self) -> None:
        async with self._guard():
            await self._redis.ping()

    async def _listen(self) -> None:
        """Relay the notification channel to this instance's waiters; reconnect when it breaks."""
        down_since: float | None = None
        while True:
            pubsub = self._listener_redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                if down_since is not None:
                    logger.info("Redis notifications back after %.1f s", time.monotonic() - down_since)
                    down_since = None
                self._wake_all()  # anything published while away: waiters re-read
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._wake(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning("Redis notifications lost (%s); reconnecting", type(exc).__name__)
                self._wake_all()
                await asyncio.sleep(RECONNECT_DELAY_S)
            finally:
                with suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- limits and counters ----------------------------------------------------------------------

    def _usage_key(self, caller: str) -> str:
        return f"{self.prefix}usage:{caller}"

    def _window_key(self, caller: str, window: Window) -> str:
        return f"{self.prefix}{window.name}:{window.index}:{caller}"

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
        keys = [self._usage_key(caller), f"{self.prefix}bucket:{caller}"]
        keys += [self._window_key(caller, window) for window in windows]
        args: list[str | int] = [caller, repr(now), repr(float(per_minute)), burst, images]
        for window in windows:
            args += [window.limit, window.name]
        args.append(self.prefix + "usage-callers")
        args += [_ms(window.ends_in_s + 60) for window in windows]
        async with self._guard():
            what, value = await self._admit(keys=keys, args=args)
        if what == b"ok":
            return Admitted(caller, images, tuple(windows))
        if what == b"rate":
            return Refused("rate", float(value))
        window = windows[int(value) - 1]
        return Refused(window.name, window.ends_in_s, window)

    async def release(self, admitted: Admitted) -> None:
        if not admitted.holds:
            return
        keys = [self._window_key(admitted.caller, window) for window in admitted.holds]
        async with self._guard():
            await self._release(keys=keys, args=[admitted.images])

    async def count(self, caller: str, what: str, n: int = 1) -> None:
        async with self._guard():
            await self._redis.hincrby(self._usage_key(caller), what, n)

    async def counts(self) -> dict[str, dict[str, int]]:
        async with self._guard():
            members = await self._redis.smembers(self.prefix + "usage-callers")
            callers = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
            async with self._redis.pipeline(transaction=False) as pipe:
                for caller in callers:
                    pipe.hgetall(self._usage_key(caller))
                rows = await pipe.execute()
        return {
            caller: {k.decode(): int(v) for k, v in row.items()}
            for caller, row in zip(callers, rows, strict=True)
        }

    # -- image cache ------------------------------------------------------------------------------

    async def cache_get(self, key: str, *, ttl_s: float) -> bytes | None:
        keys = [f"{self.prefix}cache:{key}", self.prefix + "cache-stats", self.prefix + "cache-index"]
        async with self._guard():
            value = await self._cache_get(keys=keys, args=[key, _ms(ttl_s), _now_ms()])
        return value if isinstance(value, bytes) else None

    async def cache_put(self, key: str, value: bytes, *, ttl_s: float, max_bytes: int) -> None:
        size = cache_entry_size(key, value)
        if size > max_bytes:
            return
        keys = [
            f"{self.prefix}cache:{key}",
            self.prefix + "cache-stats",
            self.prefix + "cache-index",
            self.prefix + "cache-sizes",
        ]
        args: list[str | bytes | int] = [
            key,
            value,
            _ms(ttl_s),
            max_bytes,
            _now_ms(),
            self.prefix + "cache:",
            size,
        ]
        async with self._guard():
            await self._cache_put(keys=keys, args=args)

    async def cache_stats(self) -> dict[str, int]:
        async with self._guard():
            stats = await self._redis.hgetall(self.prefix + "cache-stats")
            items = await self._redis.zcard(self.prefix + "cache-index")
        values = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in stats.items()}
        return {
            "items": items,
            "bytes": values.get("bytes", 0),
            "hits": values.get("hits", 0),
            "misses": values.get("misses", 0),
        }

    # -- records and logs -------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        async with self._guard():
            value = await self._redis.get(self.prefix + key)
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, *, ttl_s: float) -> None:
        async with self._guard():
            await self._redis.set(self.prefix + key, value, px=_ms(ttl_s))

    async def put_new(self, key: str, value: bytes, *, ttl_s: float) -> bytes | None:
        async with self._guard():
            old = await self._redis.set(self.prefix + key, value, px=_ms(ttl_s), nx=True, get=True)
        return old if isinstance(old, bytes) else None

    async def incr(self, key: str, *, ttl_s: float) -> int:
        async with self._guard():
            return int(await self._incr(keys=[self.prefix + key], args=[_ms(ttl_s)]))

    async def delete(self, *keys: str) -> None:
        async with self._guard():
            await self._redis.delete(*(self.prefix + key for key in keys))

    async def append(self, key: str, item: bytes, *, ttl_s: float) -> None:
        async with self._guard(), self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(self.prefix + key, item)
            pipe.pexpire(self.prefix + key, _ms(ttl_s))
            pipe.publish(self._channel, key)
            await pipe.execute()

    async def read(self, key: str, start: int = 0) -> list[bytes]:
        async with self._guard():
            items = await self._redis.lrange(self.prefix + key, start, -1)
        return [item if isinstance(item, bytes) else item.encode() for item in items]

    # -- notifications and slots -----------------------------------------------------------------

    async def notify(self, channel: str) -> None:
        async with self._guard():
            await self._redis.publish(self._channel, channel)

    async def try_acquire(self, name: str, holder: str, *, limit: int, lease_s: float) -> bool:
        async with self._guard():
            taken = await self._acquire(
                keys=[f"{self.prefix}slots:{name}"], args=[holder, limit, _ms(time.time()), _ms(lease_s)]
            )
        return bool(taken)

    async def release_slot(self, name: str, holder: str) -> None:
        async with self._guard(), self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(f"{self.prefix}slots:{name}", holder)
            pipe.publish(self._channel, name)
            await pipe.execute()
