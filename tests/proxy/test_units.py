"""Narrow unit tests of the proxy's building blocks (no sockets): token bucket and quota, admission
queue, image cache, validation messages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from proxy.admission import AdmissionQueue
from proxy.cache import ImageCache
from proxy.errors import Busy, QuotaExceeded, RateLimitExceeded, describe_validation_errors
from proxy.limits import ClientLimiter
from proxy.schemas import GenerateBody


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = ClientLimiter(per_minute=6, burst=3, daily_quota=0, clock=clock)
    for _ in range(3):
        limiter.check_rate("a")
    with pytest.raises(RateLimitExceeded) as caught:
        limiter.check_rate("a")
    assert caught.value.retry_after == 10  # one token every 10 s
    limiter.check_rate("b")  # another client has its own bucket
    clock.now += 10
    limiter.check_rate("a")
    with pytest.raises(RateLimitExceeded):
        limiter.check_rate("a")
    clock.now += 1000
    for _ in range(3):  # refills up to the burst, not beyond
        limiter.check_rate("a")
    with pytest.raises(RateLimitExceeded):
        limiter.check_rate("a")
    assert limiter.counts["a"]["rate_limited"] == 3


def test_rate_limit_zero_is_off() -> None:
    limiter = ClientLimiter(per_minute=0, burst=1, daily_quota=0)
    for _ in range(100):
        limiter.check_rate("a")


def test_daily_quota_reserves_commits_releases_and_resets_at_midnight_utc() -> None:
    clock = Clock(now=86_400 * 20_000 + 3_600)  # 01:00 UTC
    limiter = ClientLimiter(per_minute=0, burst=1, daily_quota=2, clock=clock)
    limiter.reserve_image("a")
    limiter.reserve_image("a")
    with pytest.raises(QuotaExceeded) as caught:  # two held: nothing left, even before delivery
        limiter.reserve_image("a")
    assert caught.value.retry_after == 23 * 3600
    limiter.release_image("a")  # a failed generation gives its image back
    limiter.commit_image("a")
    limiter.reserve_image("a")
    limiter.commit_image("a")
    with pytest.raises(QuotaExceeded):
        limiter.reserve_image("a")
    clock.now += 23 * 3600  # midnight UTC
    limiter.reserve_image("a")
    assert limiter.counts["a"]["images"] == 2


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


@dataclass
class Blob:
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def test_cache_evicts_least_recently_used_beyond_its_bytes() -> None:
    cache: ImageCache[Blob] = ImageCache(max_bytes=100)
    cache.put("a", Blob(b"a" * 40))
    cache.put("b", Blob(b"b" * 40))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", Blob(b"c" * 40))  # over 100 bytes: "b" goes
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 80
    cache.put("huge", Blob(b"h" * 101))  # larger than the whole cache: not stored
    assert cache.get("huge") is None and len(cache) == 2
    assert cache.snapshot()["hits"] == 3


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
    assert "guidance_scale: Input should be a number" in message
