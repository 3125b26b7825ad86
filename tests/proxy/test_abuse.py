"""Limits that cannot be dodged by a visitor, nor turned against other visitors: what is charged
to a quota, who a client is behind proxies and on IPv6, abandoned calls, slow connections, API-key
guessing and the bounds of `Retry-After`."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from proxy_harness import MODEL_ID, RunningProxy, sdproxy_processes
from test_stream import parse_sse

from proxy.errors import MAX_RETRY_AFTER_S
from sdclient.testing import InferenceTestServer, Reply


def test_invalid_bodies_take_nothing_of_the_daily_quota(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(daily_quota=2)
    with proxy.client() as client:
        invalid = [client.post(path, json={"prompt": ""}) for path in ("/generate", "/generate/stream") * 3]
        answers = [client.post("/generate", json={"prompt": f"fox {i}"}) for i in range(3)]
    assert [a.status_code for a in invalid] == [422] * 6
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["code"] == "quota_exceeded"


@pytest.mark.parametrize("estimate", [1e308, math.inf])
def test_retry_after_is_bounded_whatever_the_upstream_estimates(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, estimate: float
) -> None:
    upstream.default = Reply.loading(estimate)
    proxy = start_proxy(max_wait_for_model=1)
    with proxy.client() as client:
        answer = client.post("/generate", json={"prompt": "fox"})
        stream = client.post("/generate/stream", json={"prompt": "fox"})
        status = client.get("/status").json()
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "model_loading"
    assert 1 <= int(answer.headers["retry-after"]) <= MAX_RETRY_AFTER_S
    assert answer.json()["error"]["retry_after"] == int(answer.headers["retry-after"])
    assert len(answer.text) < 1000
    error = dict(parse_sse(stream.text))["error"]["error"]
    assert 1 <= error["retry_after"] <= MAX_RETRY_AFTER_S
    # A loading model's estimate is bounded as well (or dropped, when it is not a finite number).
    for eta in (dict(parse_sse(stream.text))["loading"]["eta_s"], status["eta_s"]):
        assert eta is None or 0 <= eta <= MAX_RETRY_AFTER_S
    assert status["state"] == "loading"


def _closed_after(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes `sock` (reading anything it answers first); fails past
    `limit_s`."""
    sock.settimeout(limit_s)
    started = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit_s} s")
    return time.monotonic() - started


def test_serve_closes_connections_with_unfinished_headers_or_bodies(upstream: InferenceTestServer) -> None:
    upstream.default = Reply.image(delay=3.5)
    settings = {"header_timeout_s": 2, "body_timeout_s": 2, "keep_alive_timeout_s": 1}
    with sdproxy_processes(1, upstream.model_url(MODEL_ID), **settings) as (url,):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        with contextlib.ExitStack() as stack:
            half_headers, half_body, silent, huge = (
                stack.enter_context(socket.create_connection(address)) for _ in range(4)
            )
            half_headers.sendall(b"POST /generate HTTP/1.1\r\nHost: proxy\r\nContent-Type: appl")
            half_body.sendall(
                b"POST /generate HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                b'Content-Length: 40\r\n\r\n{"prompt": '
            )
            # Far more header bytes than any request needs: closed at once, not at the deadline.
            with contextlib.suppress(OSError):
                huge.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 100_000)
            assert _closed_after(huge, 5) < 1.5
            for sock in (half_headers, half_body, silent):
                assert _closed_after(sock, 6) < 4
        # A request that is all in gets its answer, however long the model takes (3.5 s here).
        answer = httpx.post(url + "/generate", json={"prompt": "fox"}, timeout=10)
        assert answer.status_code == 200


def test_ipv6_clients_are_one_client_per_64(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(rate_limit_per_minute=6, rate_limit_burst=1, trusted_proxies=["127.0.0.1/32"])

    def status(address: str) -> int:
        headers = {"X-Forwarded-For": address}
        return client.post("/generate", json={"prompt": "fox"}, headers=headers).status_code

    with proxy.client() as client:
        assert status("2001:db8:1:2::1") == 200
        assert status("2001:db8:1:2:ffff:ffff:ffff:fffe") == 429  # another address of the same /64
        assert status("2001:db8:1:3::1") == 200  # the next /64 is another client
        assert status("203.0.113.7") == 200
        assert status("::ffff:203.0.113.7") == 429  # the same IPv4 client, written as IPv6


def test_ipv6_prefix_is_configurable(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(
        rate_limit_per_minute=6, rate_limit_burst=1, trusted_proxies=["127.0.0.1/32"], ipv6_prefix=48
    )
    with proxy.client() as client:
        answers = [
            client.post("/generate", json={"prompt": "fox"}, headers={"X-Forwarded-For": address})
            for address in ("2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:2::1")
        ]
    assert [a.status_code for a in answers] == [200, 429, 200]


API_KEY = "client-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"


def test_wrong_api_keys_are_throttled_per_client_address(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(
        api_keys=[API_KEY], admin_key=ADMIN_KEY, auth_failures_per_minute=3, trusted_proxies=["127.0.0.1/32"]
    )
    guesser = {"X-Forwarded-For": "203.0.113.7"}

    def call(key: str, headers: dict[str, str]) -> httpx.Response:
        return client.post("/generate", json={"prompt": "fox"}, headers={"X-API-Key": key, **headers})

    with proxy.client() as client:
        wrong = [call(f"guess-{i:020d}", guesser).status_code for i in range(3)]
        throttled = call("guess-again-000000000000", guesser)
        right_key = call(API_KEY, guesser)  # the right key too: a guesser must not tell it apart
        admin = client.get("/usage", headers={"X-Admin-Key": ADMIN_KEY, **guesser})
        other_address = call(API_KEY, {"X-Forwarded-For": "203.0.113.8"})
        # The minute is over (the limiter's clock moved on): the address may try again.
        limiter = proxy.app.state.proxy.limiter
        limiter._clock = lambda: time.time() + 60
        later = call(API_KEY, guesser)
    assert wrong == [401, 401, 401]
    assert throttled.status_code == right_key.status_code == admin.status_code == 429
    error = throttled.json()["error"]
    assert error["code"] == "rate_limited"
    assert "wrong API keys" in error["message"]
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    assert other_address.status_code == 200
    assert later.status_code == 200


def test_wrong_admin_keys_count_too(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(admin_key=ADMIN_KEY, auth_failures_per_minute=2)
    with proxy.client() as client:
        answers = [client.get("/usage", headers={"X-Admin-Key": "x" * 20}).status_code for _ in range(3)]
        right = client.get("/usage", headers={"X-Admin-Key": ADMIN_KEY})
    assert answers == [401, 401, 429]
    assert right.status_code == 429


def _wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_abandoned_stream_gives_up_its_queue_place_and_its_call(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=1.0)
    proxy = start_proxy(max_concurrency=1, queue_size=1)
    queue = proxy.service.admission
    # A plain client for the stream: the recording one reads every answer to its end first.
    with proxy.client() as first, httpx.Client(base_url=proxy.url, timeout=30) as second:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(first.post, "/generate", json={"prompt": "first"})
            _wait_until(lambda: queue.active == 1)
            with second.stream("POST", "/generate/stream", json={"prompt": "left"}) as stream:
                lines = stream.iter_lines()
                assert next(lines) == "event: queued"
                assert json.loads(next(lines).removeprefix("data:")) == {"position": 1}
                assert queue.waiting == 1
            _wait_until(lambda: queue.waiting == 0)  # the tab closed: its place in line is free
            assert running.result().status_code == 200
    time.sleep(0.2)
    assert [r.prompt for r in upstream.requests] == ["first"]  # the abandoned call never ran
    assert proxy.service.abandoned == 1


def test_an_abandoned_generate_stops_its_running_call_and_frees_the_slot(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=3.0)
    proxy = start_proxy(max_concurrency=1, daily_quota=5)
    queue = proxy.service.admission
    with proxy.client() as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.post("/generate", json={"prompt": "left"}, timeout=0.5)
    _wait_until(lambda: queue.active == 0)
    assert time.monotonic() - started < 2  # well before the upstream's 3 s
    assert proxy.service.abandoned == 1


def test_a_call_shared_by_coalescing_goes_on_when_one_of_its_visitors_leaves(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=1.0)
    proxy = start_proxy()
    body = {"prompt": "shared", "seed": 5}
    with proxy.client() as stays, proxy.client() as leaves:
        with ThreadPoolExecutor(1) as pool:
            kept = pool.submit(stays.post, "/generate", json=body)
            _wait_until(lambda: proxy.service.describe()["flights"] == 1)
            with pytest.raises(httpx.ReadTimeout):
                leaves.post("/generate", json=body, timeout=0.3)
            answer = kept.result()
    assert answer.status_code == 200
    assert len(upstream.requests) == 1
    assert proxy.service.abandoned == 0


def test_forwarded_for_cannot_name_another_trusted_address(start_proxy: Callable[..., RunningProxy]) -> None:
    # An internal client (in a trusted range) writes addresses of that range in front of its own.
    proxy = start_proxy(
        rate_limit_per_minute=6, rate_limit_burst=1, trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"]
    )
    with proxy.client() as client:
        answers = [
            client.post("/generate", json={"prompt": "fox"}, headers={"X-Forwarded-For": chain})
            for chain in ("10.0.0.5", "10.9.9.9, 10.0.0.5", "10.9.9.8, 10.0.0.5", "10.0.0.6")
        ]
    # The entry the trusted peer wrote is believed, nothing the client wrote before it.
    assert [a.status_code for a in answers] == [200, 429, 429, 200]


def test_failures_that_are_not_the_visitors_give_the_quota_back(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(daily_quota=1, max_retries=0)
    upstream.enqueue(Reply.error(500, "boom"), Reply.error(401, "bad token"), Reply.html(503))
    with proxy.client() as client:
        failed = [client.post("/generate", json={"prompt": f"fox {i}"}) for i in range(3)]
        answers = [client.post("/generate", json={"prompt": f"fox {i}"}) for i in range(2)]
    assert [a.json()["error"]["code"] for a in failed] == [
        "upstream_error",
        "upstream_auth",
        "upstream_error",
    ]
    assert [a.status_code for a in answers] == [200, 429]
