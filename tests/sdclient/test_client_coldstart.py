"""The shared cold-start wait: concurrent calls of one model send one probe per interval, not N."""

from __future__ import annotations

import asyncio
import time

import pytest
from client_harness import MakeClient

import sdclient
from sdclient import GenerationEvent
from sdclient.testing import InferenceTestServer, Reply


async def wait_until(predicate, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_twenty_concurrent_calls_share_one_wait(server: InferenceTestServer, make_client: MakeClient):
    server.cold_start(1.0)
    client = make_client()

    images = await asyncio.gather(*(client.generate(f"fox {i}") for i in range(20)))

    assert len(images) == 20
    loading = [r for r in server.requests if r.reply == "loading"]
    # All 20 were in flight before the first 503 came back; after it, the callers share one
    # prober: it sleeps until the estimate (1 s), then probes every 0.1 s at most (FAST).
    probes = len(loading) - 20
    assert probes <= 3, f"{probes} probes after the first 503s: the callers did not share the wait"
    assert len([r for r in server.requests if r.reply == "image"]) == 20
    usage = client.usage.total
    assert usage.cold_start_waits == 1
    assert 0.9 <= usage.cold_start_wait_seconds <= 1.6
    assert usage.requests == len(server.requests)
    assert usage.images == 20


async def test_calls_that_arrive_during_a_cold_start_wait_on_the_gate(
    server: InferenceTestServer, make_client: MakeClient
):
    server.cold_start(0.8)
    client = make_client()
    first = asyncio.ensure_future(client.generate("first"))
    await wait_until(lambda: client.status.state == "loading")

    others = await asyncio.gather(*(client.generate(f"fox {i}") for i in range(19)))
    await first

    assert len(others) == 19
    loading = [r for r in server.requests if r.reply == "loading"]
    assert 1 <= len(loading) <= 4, [r.reply for r in server.requests]
    # After the first 503, at most a few probes reached the server before it was ready.
    assert server.requests_while_loading - 1 <= 3
    # Every waiter saw the wait and its ETA.
    assert all(image.timings.cold_start_wait_s > 0.3 for image in others)


async def test_first_image_arrives_soon_after_the_model_is_ready(
    server: InferenceTestServer, make_client: MakeClient
):
    server.cold_start(0.6)
    client = make_client()

    start = time.monotonic()
    await asyncio.gather(*(client.generate("fox") for _ in range(5)))
    elapsed = time.monotonic() - start

    assert 0.6 <= elapsed < 0.6 + 0.3


async def test_a_model_ready_earlier_than_estimated_is_noticed_within_the_probe_interval(
    server: InferenceTestServer, make_client: MakeClient
):
    # The server overestimates (says 0.3 s, then keeps saying 0.5 s while it is ready at ~0.6 s).
    server.enqueue(Reply.loading(0.3), Reply.loading(0.5), Reply.loading(0.5), Reply.image())
    client = make_client()

    await client.generate("fox")

    times = [r.received_at - server.requests[0].received_at for r in server.requests]
    assert times[1] == pytest.approx(0.3, abs=0.1)  # first probe at the estimate
    gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    assert all(0.08 <= gap <= 0.25 for gap in gaps), gaps  # then capped at probe_interval (0.1 s)


async def test_loading_events_and_status(server: InferenceTestServer, make_client: MakeClient):
    server.cold_start(0.5)
    events: list[GenerationEvent] = []
    client = make_client(on_event=events.append)
    assert client.status.state == "unknown"

    task = asyncio.ensure_future(client.generate("fox"))
    await wait_until(lambda: client.status.state == "loading")
    status = client.status
    assert status.eta_s is not None and 0.2 < status.eta_s <= 0.5
    assert "currently loading" in (status.message or "")
    await task

    assert client.status.state == "ready"
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["queued", "sending", "loading"]
    assert kinds[-2:] == ["sending", "done"]
    (loading, *_) = [e for e in events if e.kind == "loading"]
    assert loading.eta_s is not None and 0.4 < loading.eta_s <= 0.5
    assert loading.attempt == 1


async def test_prober_that_gives_up_hands_over_to_a_waiter(
    server: InferenceTestServer, make_client: MakeClient
):
    server.cold_start(0.9)
    client = make_client(max_wait_for_model=0.6)

    first = asyncio.ensure_future(client.generate("first"))
    await wait_until(lambda: client.status.state == "loading")
    await asyncio.sleep(0.4)
    second = asyncio.ensure_future(client.generate("second"))

    with pytest.raises(sdclient.ModelLoadingTimeout):
        await first
    image = await second  # took over the probing after the first caller gave up

    assert image.timings.cold_start_wait_s > 0.3
    assert client.status.state == "ready"


async def test_an_error_during_the_wait_opens_the_gate(server: InferenceTestServer, make_client: MakeClient):
    # The probe gets a 404 (not "loading"): the waiters stop waiting and send for themselves.
    server.enqueue(Reply.loading(0.3), Reply.error(404, "Model user/sd-model does not exist"))
    server.default = Reply.error(404, "Model user/sd-model does not exist")
    client = make_client()

    first = asyncio.ensure_future(client.generate("first"))
    await wait_until(lambda: client.status.state == "loading")
    results = await asyncio.gather(first, *(client.generate("x") for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, sdclient.ModelNotFound) for r in results)
    assert client.status.state == "unavailable"
    assert len(server.requests) == 5  # 1 loading + the probe + 3 waiters


async def test_cold_start_probes_do_not_count_as_retries(
    server: InferenceTestServer, make_client: MakeClient
):
    server.cold_start(0.3)
    client = make_client(max_retries=0)  # no retries allowed, but cold starts are still waited out

    image = await client.generate("fox")

    assert image.attempts >= 2
    assert client.usage.total.retries == 0


# -- dedicated Endpoints: X-Scale-Up-Timeout -----------------------------------------------


async def test_scale_up_timeout_makes_the_server_hold_the_request(
    server: InferenceTestServer, make_client: MakeClient
):
    server.cold_start(0.3)
    image = await make_client(scale_up_timeout=5).generate("a fox")
    (request,) = server.requests  # held, not answered 503
    assert request.headers["x-scale-up-timeout"] == "5"
    assert image.timings.cold_start_wait_s == 0.0


async def test_a_server_that_does_not_hold_still_gets_the_503_handling(
    server: InferenceTestServer, make_client: MakeClient
):
    server.enqueue(Reply.loading(0.1))
    image = await make_client(scale_up_timeout=5).generate("a fox")
    assert [r.reply for r in server.requests] == ["loading", "image"]
    assert image.attempts == 2


def test_scale_up_timeout_goes_to_endpoints_by_default_only():
    endpoint = sdclient.SDClient(
        "https://abc123.us-east-1.aws.endpoints.huggingface.cloud", max_wait_for_model=60
    )
    other = sdclient.SDClient("http://127.0.0.1:1/models/x")
    off = sdclient.SDClient("https://abc123.us-east-1.aws.endpoints.huggingface.cloud", scale_up_timeout=0)
    assert endpoint._scale_up == "60"
    assert other._scale_up is None and off._scale_up is None
