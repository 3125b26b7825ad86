"""The Redis store with a real `redis-server`: the same limit and cache checks as the memory store,
and notifications and slots shared by two stores on one Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis_harness import RedisServer
from test_units import (
    check_auth_failures,
    check_cache,
    check_cache_counts_each_entrys_overhead,
    check_daily_quota,
    check_key_budget,
    check_token_bucket,
)

from proxy.redis_store import RedisStore
from proxy.store import Store

API_KEY = "client-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdefgh"


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> Store:
    store = RedisStore(redis_server.url, prefix="test:")
    await store.start()
    yield store  # type: ignore[misc]
    await store.aclose()


async def test_token_bucket(redis_store: Store) -> None:
    await check_token_bucket(redis_store)


async def test_daily_quota(redis_store: Store) -> None:
    await check_daily_quota(redis_store)


async def test_key_budget(redis_store: Store) -> None:
    await check_key_budget(redis_store)


async def test_auth_failures(redis_store: Store) -> None:
    await check_auth_failures(redis_store)


async def test_cache(redis_store: Store) -> None:
    await check_cache(redis_store)


async def test_cache_bound_counts_each_entrys_overhead(redis_store: Store) -> None:
    await check_cache_counts_each_entrys_overhead(redis_store)


async def test_notifications_reach_another_store_on_the_same_redis(redis_server: RedisServer) -> None:
    first, second = RedisStore(redis_server.url), RedisStore(redis_server.url)
    await first.start()
    await second.start()
    try:
        await asyncio.sleep(0.2)  # both listeners subscribed
        async with second.watch("channel") as watch:
            await first.append("channel", b"item", ttl_s=10)
            assert await watch.wait(2.0)
        assert await second.read("channel") == [b"item"]
        assert await first.try_acquire("slots", "a", limit=1, lease_s=10)
        assert not await second.try_acquire("slots", "b", limit=1, lease_s=10)
        await first.release_slot("slots", "a")
        assert await second.try_acquire("slots", "b", limit=1, lease_s=10)
    finally:
        await first.aclose()
        await second.aclose()
