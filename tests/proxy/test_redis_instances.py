"""Two `sdproxy serve` processes on one `redis-server` and one upstream: one quota, one rate limit,
one cache and one coalesced upstream call between them; Redis killed and restarted mid-run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from proxy_harness import MODEL_ID, RunningProxy, sdproxy_processes
from redis_harness import RedisServer
from test_stream import parse_sse

from sdclient.testing import InferenceTestServer, Reply


def _posts(upstream: InferenceTestServer) -> int:
    return len([r for r in upstream.requests if r.method == "POST"])


async def test_100_identical_seeded_requests_over_two_processes_make_one_upstream_call(
    upstream: InferenceTestServer, redis_server: RedisServer
) -> None:
    upstream.default = Reply.image(delay=1.0)
    body = {"prompt": "a fox in a field", "seed": 1234, "width": 64, "height": 64}
    with sdproxy_processes(2, upstream.model_url(MODEL_ID), redis_url=redis_server.url) as urls:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            answers = await asyncio.gather(
                *(client.post(urls[i % 2] + "/generate", json=body) for i in range(100))
            )
            repeat = await client.post(urls[1] + "/generate", json=body)
    assert [a.status_code for a in answers] == [200] * 100
    assert _posts(upstream) == 1
    assert len({a.content for a in answers}) == 1
    assert {a.headers["x-cache"] for a in answers} == {"miss", "coalesced"}
    assert repeat.headers["x-cache"] == "hit" and repeat.content == answers[0].content  # one cache
    assert _posts(upstream) == 1


@pytest.mark.parametrize(
    ("settings", "code"),
    [
        ({"daily_quota": 3}, "quota_exceeded"),
        ({"rate_limit_per_minute": 0.01, "rate_limit_burst": 3}, "rate_limited"),
    ],
)
def test_two_processes_share_one_quota_and_one_rate_limit(
    upstream: InferenceTestServer, redis_server: RedisServer, settings: dict[str, Any], code: str
) -> None:
    with sdproxy_processes(2, upstream.model_url(MODEL_ID), redis_url=redis_server.url, **settings) as urls:
        answers = [httpx.post(urls[i % 2] + "/generate", json={"prompt": f"p{i}"}) for i in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[3].json()["error"]["code"] == code
    assert int(answers[3].headers["retry-after"]) >= 1
    assert _posts(upstream) == 3


async def _wait_for_200(client: httpx.AsyncClient, url: str, within: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + within
    while True:
        answer = await client.post(url + "/generate", json={"prompt": "back"})
        if answer.status_code == 200:
            return answer
        assert answer.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() < deadline, "the proxy did not recover when Redis came back"
        await asyncio.sleep(0.1)


async def test_redis_killed_and_restarted_mid_run(
    upstream: InferenceTestServer, redis_server: RedisServer
) -> None:
    upstream.default = Reply.image(delay=0.8)
    model = upstream.model_url(MODEL_ID)
    with sdproxy_processes(2, model, redis_url=redis_server.url, daily_quota=4) as urls:
        async with httpx.AsyncClient(timeout=30) as client:
            in_flight = asyncio.create_task(client.post(urls[0] + "/generate", json={"prompt": "early"}))
            await asyncio.sleep(0.4)  # admitted, waiting for the upstream
            redis_server.kill()
            down = [await client.post(url + "/generate", json={"prompt": "down"}) for url in urls]
            finished = await in_flight
            redis_server.start()  # the same port, empty: no persistence
            recovered = [await _wait_for_200(client, url) for url in urls]
            # Two images since the restart; the refused requests were never charged: two more fit
            # in the quota of 4, then it is full.
            more = [await client.post(urls[i % 2] + "/generate", json={"prompt": f"m{i}"}) for i in range(3)]
    assert finished.status_code == 200  # the image it was admitted for is answered
    for answer in down:
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "store_unavailable"
        assert answer.headers["retry-after"]
    assert [a.status_code for a in recovered] == [200, 200]
    assert [a.status_code for a in more] == [200, 200, 429]
    assert more[2].json()["error"]["code"] == "quota_exceeded"


def test_fail_open_lets_requests_through_while_redis_is_down(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, redis_server: RedisServer
) -> None:
    proxy = start_proxy(redis_url=redis_server.url, fail_open=True, daily_quota=1)
    with proxy.client() as client:
        assert client.post("/generate", json={"prompt": "one"}).status_code == 200
        redis_server.kill()
        while_down = [
            client.post("/generate", json={"prompt": "two"}),
            client.post("/generate", json={"prompt": "three", "seed": 5}),  # cache and coalescing skipped
        ]
        redis_server.start()
        deadline = time.monotonic() + 10
        while (back := client.post("/generate", json={"prompt": "four"})).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        full = client.post("/generate", json={"prompt": "five"})
    assert [a.status_code for a in while_down] == [200, 200]  # no quota while Redis is away
    assert back.status_code == 200
    assert full.status_code == 429  # limits apply again once Redis is back


def test_a_job_made_on_one_process_is_read_and_canceled_on_the_other(
    upstream: InferenceTestServer, redis_server: RedisServer
) -> None:
    upstream.default = Reply.image(delay=1.5)
    model = upstream.model_url(MODEL_ID)
    with sdproxy_processes(2, model, redis_url=redis_server.url, daily_quota=2) as (first, second):
        with httpx.Client(timeout=30) as client:
            done = client.post(first + "/v1/jobs", json={"prompt": "kept", "seed": 1}).json()
            events = client.get(f"{second}/v1/jobs/{done['id']}/events")  # followed from the other
            view = client.get(f"{second}/v1/jobs/{done['id']}").json()
            image = client.get(f"{second}/v1/images/{view['result_url'].rsplit('/', 1)[1]}")
            doomed = client.post(first + "/v1/jobs", json={"prompt": "canceled", "seed": 2}).json()
            canceled = client.delete(f"{second}/v1/jobs/{doomed['id']}")  # while it runs on the first
            on_first = client.get(f"{first}/v1/jobs/{doomed['id']}").json()
            time.sleep(2.0)  # the first process winds the canceled generation down
            # The canceled job was not charged: one image of the quota of 2 is left.
            last = client.post(second + "/generate", json={"prompt": "last"})
            over = client.post(first + "/generate", json={"prompt": "over"})
    assert [name for name, _ in parse_sse(events.text)][-1] == "image"
    assert view["status"] == "succeeded" and view["result_url"].startswith(second)  # as read
    assert image.status_code == 200 and image.headers["x-seed"] == "1"
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert on_first["status"] == "canceled"
    assert last.status_code == 200
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
