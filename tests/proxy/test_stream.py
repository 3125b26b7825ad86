"""`POST /generate/stream`: the Server-Sent Events a page reads while it waits."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from proxy_harness import RunningProxy

from sdclient.testing import InferenceTestServer, Reply


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """`(event, data)` pairs of an event stream (comments skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def names(events: list[tuple[str, Any]]) -> list[str]:
    """Event names with repeats in a row collapsed (a moving ETA may send `loading` again)."""
    collapsed: list[str] = []
    for name, _ in events:
        if not collapsed or collapsed[-1] != name:
            collapsed.append(name)
    return collapsed


def test_cold_start_streams_queued_loading_generating_image(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.cold_start(1.5)
    proxy = start_proxy(max_wait_for_model=10)
    with proxy.client() as client:
        response = client.post("/generate/stream", json={"prompt": "a fox", "seed": 3})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    events = parse_sse(response.text)
    assert names(events) == ["queued", "loading", "generating", "image"]
    assert events[0][1] == {"position": 0}
    loading = dict(events)["loading"]
    assert 1.0 <= loading["eta_s"] <= 1.5
    image = events[-1][1]
    assert image["seed"] == 3
    assert image["content_type"] == "image/jpeg"
    assert base64.b64decode(image["image"])[:2] == b"\xff\xd8"
    assert image["timings"]["cold_start_wait_s"] > 1.0
    assert image["request_id"] == response.headers["x-request-id"]


def test_warm_model_streams_queued_generating_image(proxy: RunningProxy) -> None:
    with proxy.client() as client:
        client.post("/generate", json={"prompt": "wake up"})
        response = client.post("/generate/stream", json={"prompt": "a fox"})
    assert names(parse_sse(response.text)) == ["queued", "generating", "image"]


def test_cold_start_past_the_wait_ends_with_an_error_event(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.cold_start(30)
    proxy = start_proxy(max_wait_for_model=1)
    with proxy.client() as client:
        response = client.post("/generate/stream", json={"prompt": "a fox"})
    events = parse_sse(response.text)
    assert names(events) == ["queued", "loading", "error"]
    error = events[-1][1]["error"]
    assert error["code"] == "model_loading"
    assert error["retry_after"] >= 20


def test_upstream_failure_is_an_error_event(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.error(401, "Invalid credentials in Authorization header"))
    proxy = start_proxy()
    with proxy.client() as client:
        response = client.post("/generate/stream", json={"prompt": "a fox"})
    events = parse_sse(response.text)
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["code"] == "upstream_auth"


def test_errors_before_the_stream_starts_are_plain_json_answers(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_proxy(rate_limit_per_minute=1, rate_limit_burst=1)
    with proxy.client() as client:
        invalid = client.post("/generate/stream", json={"prompt": "a fox", "width": 1001})
        limited = client.post("/generate/stream", json={"prompt": "a fox"})
    assert invalid.status_code == 422  # (the invalid request also took the only token)
    assert invalid.json()["error"]["code"] == "validation_error"
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/json"
    assert limited.json()["error"]["code"] == "rate_limited"


async def test_a_queued_request_is_told_its_place_in_line(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.5)
    proxy = start_proxy(max_concurrency=1, queue_size=4)
    async with proxy.async_client() as client:
        running = asyncio.create_task(client.post("/generate", json={"prompt": "first"}))
        deadline = time.monotonic() + 5
        while proxy.service.admission.active == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        streamed = await client.post("/generate/stream", json={"prompt": "second"})
        await running
    events = parse_sse(streamed.text)
    assert events[0] == ("queued", {"position": 1})
    assert names(events) == ["queued", "generating", "image"]


def test_busy_queue_is_a_plain_json_answer_before_the_stream(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.5)
    proxy = start_proxy(max_concurrency=1, queue_size=0)

    async def scenario() -> httpx.Response:
        async with proxy.async_client() as client:
            running = asyncio.create_task(client.post("/generate", json={"prompt": "first"}))
            while proxy.service.admission.active == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            streamed = await client.post("/generate/stream", json={"prompt": "second"})
            await running
            return streamed

    streamed = asyncio.run(scenario())
    assert streamed.status_code == 503
    assert streamed.headers["content-type"] == "application/json"
    assert streamed.json()["error"]["code"] == "busy"
    assert int(streamed.headers["retry-after"]) >= 1
