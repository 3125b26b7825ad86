"""Narrow unit tests of the proxy's building blocks (no sockets): token bucket and quota, admission
queue, image cache, validation messages. Limits and cache run against the memory store here;
test_redis_store.py runs the same checks against Redis."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from pydantic import ValidationError

from proxy.admission import AdmissionQueue
from proxy.errors import (
    Busy,
    QuotaExceeded,
    RateLimitExceeded,
    StoreUnavailable,
    describe_validation_errors,
)
from proxy.jobs import JobManager
from proxy.limits import ClientLimiter
from proxy.schemas import GenerateBody, JobBody
from proxy.store import CACHE_ENTRY_OVERHEAD, MemoryStore, Store, cache_entry_size


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def check_token_bucket(store: Store) -> None:
    """A burst, then the rate; each client its own bucket; refills up to the burst only."""
    clock = Clock()
    limiter = ClientLimiter(store, per_minute=6, burst=3, daily_quota=0, clock=clock)
    for _ in range(3):
        await limiter.admit("a")
    with pytest.raises(RateLimitExceeded) as caught:
        await limiter.admit("a")
    assert caught.value.retry_after == 10  # one token every 10 s
    await limiter.admit("b")  # another client has its own bucket
    clock.now += 10
    await limiter.admit("a")
    with pytest.raises(RateLimitExceeded):
        await limiter.admit("a")
    clock.now += 1000
    for _ in range(3):  # refills up to the burst, not beyond
        await limiter.admit("a")
    with pytest.raises(RateLimitExceeded):
        await limiter.admit("a")
    counts = await store.counts()
    assert counts["a"]["rate_limited"] == 3
    assert counts["a"]["requests"] == 10


async def check_daily_quota(store: Store) -> None:
    """Held images count at once; a release gives one back; midnight UTC resets; a refused request
    takes no token of the rate limit."""
    clock = Clock(now=86_400 * 20_000 + 3_600)  # 01:00 UTC
    limiter = ClientLimiter(store, per_minute=60, burst=4, daily_quota=2, clock=clock)
    first = await limiter.admit("a")
    second = await limiter.admit("a")
    with pytest.raises(QuotaExceeded) as caught:  # two held: nothing left, even before delivery
        await limiter.admit("a")
    assert caught.value.retry_after == 23 * 3600
    await limiter.release(first)  # a failed generation gives its image back
    await limiter.deliver(second)
    third = await limiter.admit("a")
    await limiter.deliver(third)
    with pytest.raises(QuotaExceeded):
        await limiter.admit("a")
    clock.now += 23 * 3600  # midnight UTC
    await limiter.admit("a")
    counts = await store.counts()
    assert counts["a"]["images"] == 2
    assert counts["a"]["quota_exceeded"] == 2


async def check_key_budget(store: Store) -> None:
    """A monthly budget for API keys only, renewed on the 1st (UTC)."""
    clock = Clock(now=1_764_547_200.0 - 3600)  # 2025-11-30 23:00 UTC
    limiter = ClientLimiter(store, per_minute=0, burst=1, daily_quota=0, key_monthly_budget=1, clock=clock)
    await limiter.admit("key:abc")
    with pytest.raises(QuotaExceeded) as caught:
        await limiter.admit("key:abc")
    assert "monthly budget" in caught.value.message and caught.value.retry_after == 3600
    await limiter.admit("ip:1.2.3.4")
    await limiter.admit("ip:1.2.3.4")  # not a key: no budget
    clock.now += 3600
    await limiter.admit("key:abc")


async def check_auth_failures(store: Store) -> None:
    """Wrong keys are counted per address and minute; at the limit every call of the address is
    refused until the minute ends, and other addresses are not."""
    clock = Clock(now=60 * 1_000_000 + 15)
    limiter = ClientLimiter(
        store, per_minute=0, burst=1, daily_quota=0, auth_failures_per_minute=2, clock=clock
    )
    assert await store.incr("counter", ttl_s=10) == 1
    assert await store.incr("counter", ttl_s=10) == 2
    assert await store.get("counter") == b"2"
    for _ in range(2):
        await limiter.check_auth_failures("203.0.113.7")
        await limiter.auth_failed("203.0.113.7")
    with pytest.raises(RateLimitExceeded) as caught:
        await limiter.check_auth_failures("203.0.113.7")
    assert caught.value.retry_after == 45
    await limiter.check_auth_failures("203.0.113.8")
    clock.now += 45
    await limiter.check_auth_failures("203.0.113.7")


async def test_auth_failures() -> None:
    await check_auth_failures(MemoryStore())


async def check_cache(store: Store) -> None:
    """Least recently used out beyond the bytes; too big: not stored."""
    entry = cache_entry_size("a", b"a" * 40)  # the value, its key and the per-entry overhead
    limit = 2 * entry + entry // 2  # room for two entries
    await store.cache_put("a", b"a" * 40, ttl_s=60, max_bytes=limit)
    await store.cache_put("b", b"b" * 40, ttl_s=60, max_bytes=limit)
    assert await store.cache_get("a", ttl_s=60) is not None  # "a" is now the most recently used
    await store.cache_put("c", b"c" * 40, ttl_s=60, max_bytes=limit)  # a third: "b" goes
    assert await store.cache_get("b", ttl_s=60) is None
    assert await store.cache_get("a", ttl_s=60) == b"a" * 40
    assert await store.cache_get("c", ttl_s=60) == b"c" * 40
    await store.cache_put("huge", b"h" * limit, ttl_s=60, max_bytes=limit)  # larger than the cache
    assert await store.cache_get("huge", ttl_s=60) is None
    stats = await store.cache_stats()
    assert (stats["items"], stats["bytes"], stats["hits"]) == (2, 2 * entry, 3)


async def check_cache_counts_each_entrys_overhead(store: Store) -> None:
    """Many tiny entries: the bound counts what each entry costs beyond its bytes."""
    limit = 10_000
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]
    for key in keys:
        await store.cache_put(key, b"x", ttl_s=60, max_bytes=limit)
    stats = await store.cache_stats()
    fit = limit // cache_entry_size(keys[0], b"x")
    assert stats["items"] == fit < 50
    assert stats["bytes"] == fit * cache_entry_size(keys[0], b"x") <= limit
    assert CACHE_ENTRY_OVERHEAD >= 100


async def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    await check_token_bucket(MemoryStore())


async def test_daily_quota_holds_releases_and_resets_at_midnight_utc() -> None:
    await check_daily_quota(MemoryStore())


async def test_api_key_budget_is_monthly() -> None:
    await check_key_budget(MemoryStore())


async def test_rate_limit_zero_is_off() -> None:
    limiter = ClientLimiter(MemoryStore(), per_minute=0, burst=1, daily_quota=0)
    for _ in range(100):
        await limiter.admit("a")


async def test_cache_evicts_least_recently_used_beyond_its_bytes() -> None:
    await check_cache(MemoryStore())


async def test_cache_bound_counts_each_entrys_overhead() -> None:
    await check_cache_counts_each_entrys_overhead(MemoryStore())


async def test_cache_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.cache_put("a", b"x", ttl_s=10, max_bytes=1000)
    clock.now += 9
    assert await store.cache_get("a", ttl_s=10) == b"x"  # a hit renews the TTL
    clock.now += 9
    assert await store.cache_get("a", ttl_s=10) == b"x"
    clock.now += 11
    assert await store.cache_get("a", ttl_s=10) is None


async def test_admission_queue_refuses_beyond_its_size() -> None:
    queue = AdmissionQueue(max_concurrency=1, queue_size=1)
    positions: list[int] = []
    release = asyncio.Event()

    async def hold() -> None:
        async with queue.slot(positions.append):
            await release.wait()

    first = asyncio.create_task(hold())
    await asyncio.sleep(0)
    second = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert (queue.active, queue.waiting) == (1, 1)
    with pytest.raises(Busy) as caught:
        async with queue.slot():
            pass
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1
    release.set()
    await asyncio.gather(first, second)
    assert positions == [0, 1]
    assert queue.snapshot() == {
        "active": 0,
        "waiting": 0,
        "refused": 1,
        "max_concurrency": 1,
        "queue_size": 1,
    }


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    queue = AdmissionQueue(max_concurrency=1, queue_size=1)
    release = asyncio.Event()

    async def hold() -> None:
        async with queue.slot():
            await release.wait()

    first = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.waiting == 0
    release.set()
    await first
    assert queue.active == 0


def test_fingerprint_changes_with_every_field() -> None:
    base = GenerateBody(prompt="a fox", seed=1)
    assert base.fingerprint() == GenerateBody(prompt="a fox", seed=1).fingerprint()
    assert base.fingerprint() != GenerateBody(prompt="a fox", seed=2).fingerprint()
    assert base.fingerprint() != GenerateBody(prompt="a fox", seed=1, width=512).fingerprint()


def test_validation_messages_name_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateBody.model_validate({"prompt": "", "width": 100, "steps": 3, "guidance_scale": "high"})
    message = describe_validation_errors(caught.value.errors())
    assert "prompt: String should have at least 1 character" in message
    assert "width: Input should be a multiple of 8" in message
    assert "steps: unknown field (allowed: prompt, negative_prompt" in message
    assert "guidance_scale: Input should be a valid number" in message


class _JobsUnsaved(MemoryStore):
    """A store that cannot write job records (Redis going away between two calls)."""

    async def put(self, key: str, value: bytes, *, ttl_s: float) -> None:
        if key.startswith("job:"):
            raise StoreUnavailable("gone")
        await super().put(key, value, ttl_s=ttl_s)


async def test_a_job_that_cannot_be_saved_gives_its_image_and_idempotency_key_back() -> None:
    store = _JobsUnsaved()
    limiter = ClientLimiter(store, per_minute=0, burst=1, daily_quota=1)
    jobs = JobManager(store, None, limiter, ttl_s=60, webhooks=None)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        await jobs.create("a", JobBody(prompt="fox"), idempotency_key="k1", request_id=None)
    await limiter.admit("a")  # the quota of one image is whole again
    assert await store.counts() == {"a": {"requests": 2}}
    assert not [key for key in store._records if key.startswith("idem:")]
