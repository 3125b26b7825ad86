"""Bounded queue (refuse at once beyond it), coalescing of identical seeded calls, and the cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from proxy_harness import RunningProxy

from sdclient.testing import InferenceTestServer, Reply


def _posts(upstream: InferenceTestServer) -> int:
    return len([r for r in upstream.requests if r.method == "POST"])


async def _wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_beyond_the_queue_requests_are_refused_at_once(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.6)
    proxy = start_proxy(max_concurrency=1, queue_size=1)
    admission = proxy.service.admission
    async with proxy.async_client() as client:
        running = asyncio.create_task(client.post("/generate", json={"prompt": "one"}))
        await _wait_until(lambda: admission.active == 1)
        queued = asyncio.create_task(client.post("/generate", json={"prompt": "two"}))
        await _wait_until(lambda: admission.waiting == 1)
        started = time.perf_counter()
        refused = await client.post("/generate", json={"prompt": "three"})
        refused_after = time.perf_counter() - started
        first, second = await running, await queued
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "busy"
    assert refused.headers["retry-after"] == str(error["retry_after"])
    assert refused_after < 0.3  # refused at once, not after waiting for a slot
    assert first.status_code == second.status_code == 200
    assert _posts(upstream) == 2
    assert admission.refused == 1


async def test_identical_seeded_requests_share_one_upstream_call(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.5)
    proxy = start_proxy(max_concurrency=2, queue_size=2)
    body = {"prompt": "a fox in a field", "seed": 1234, "width": 64, "height": 64}
    async with proxy.async_client() as client:
        answers = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(100)))
    assert [a.status_code for a in answers] == [200] * 100
    assert _posts(upstream) == 1
    assert len({a.content for a in answers}) == 1
    sources = [a.headers["x-cache"] for a in answers]
    assert sources.count("miss") == 1
    assert set(sources) <= {"miss", "coalesced", "hit"}
    assert proxy.service.upstream_calls == 1


async def test_requests_without_a_seed_are_not_coalesced(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.2)
    proxy = start_proxy()
    async with proxy.async_client() as client:
        answers = await asyncio.gather(
            *(client.post("/generate", json={"prompt": "a fox"}) for _ in range(3))
        )
    assert [a.status_code for a in answers] == [200] * 3
    assert _posts(upstream) == 3
    assert len({a.headers["x-seed"] for a in answers}) == 3


async def test_a_failed_shared_call_fails_every_waiter_and_is_not_cached(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.error(404, "Model test/model does not exist"))
    upstream.default = Reply.image()
    proxy = start_proxy()
    body = {"prompt": "a fox", "seed": 5}
    async with proxy.async_client() as client:
        answers = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(5)))
        again = await client.post("/generate", json=body)
    assert {a.json()["error"]["code"] for a in answers} == {"upstream_not_found"}
    assert again.status_code == 200
    assert _posts(upstream) == 2


def test_repeats_of_a_seeded_request_come_from_the_cache(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy()
    body = {"prompt": "a fox", "seed": 9}
    with proxy.client() as client:
        first = client.post("/generate", json=body)
        second = client.post("/generate", json=body)
        other_seed = client.post("/generate", json={**body, "seed": 10})
    assert (first.headers["x-cache"], second.headers["x-cache"], other_seed.headers["x-cache"]) == (
        "miss",
        "hit",
        "miss",
    )
    assert first.content == second.content
    assert second.headers["x-seed"] == "9"
    assert _posts(upstream) == 2


def test_the_cache_can_be_turned_off(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(cache_max_bytes=0)
    with proxy.client() as client:
        for _ in range(2):
            assert client.post("/generate", json={"prompt": "a fox", "seed": 9}).headers["x-cache"] == "miss"
    assert _posts(upstream) == 2
