"""Job webhooks delivered to a real receiver on 127.0.0.1: signed (checked here with `hmac`, not
with the proxy's code), retried after a failure, and refused for private targets unless allowed,
including for a name that resolves to a public address at the check and to 127.0.0.1 afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from proxy_harness import RunningProxy

from proxy import webhooks
from proxy.webhooks import WebhookSender, _pinned_request, check_target
from sdclient.testing import InferenceTestServer, Reply

SECRET = "whsec-0123456789abcdef0123456789"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Answers the first `failures` deliveries with `status` (500), then 204."""

    url: str
    failures: int
    status: int = 500
    deliveries: list[Delivery] = field(default_factory=list)

    def wait(self, count: int, within: float = 10.0) -> list[Delivery]:
        deadline = time.monotonic() + within
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} deliveries"
            time.sleep(0.02)
        return self.deliveries


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="", failures=1)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.deliveries.append(Delivery(dict(self.headers.items()), body, time.time()))
            self.send_response(state.status if len(state.deliveries) <= state.failures else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/sdproxy"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _check_signature(delivery: Delivery) -> int:
    """Verify `Sdproxy-Signature: t=<ts>,v1=<hex>` as a receiver would; returns the timestamp."""
    parts = dict(item.split("=", 1) for item in delivery.headers["Sdproxy-Signature"].split(","))
    timestamp = int(parts["t"])
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + delivery.body, hashlib.sha256)
    assert hmac.compare_digest(expected.hexdigest(), parts["v1"])
    assert abs(time.time() - timestamp) < 60
    return timestamp


def test_a_finished_job_is_delivered_signed_and_retried_after_a_500(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, receiver: Receiver
) -> None:
    proxy = start_proxy(
        webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff_s=0.2, webhook_max_attempts=3
    )
    with proxy.client() as client:
        created = client.post("/v1/jobs", json={"prompt": "a fox", "seed": 9, "webhook_url": receiver.url})
        assert created.status_code == 202, created.text
        job = created.json()
        failed, accepted = receiver.wait(2)
        image = client.get(json.loads(accepted.body)["result_url"])
    assert accepted.at - failed.at >= 0.1  # backed off before retrying
    for delivery in (failed, accepted):
        _check_signature(delivery)
        assert delivery.headers["Content-Type"] == "application/json"
        assert delivery.headers["Sdproxy-Webhook-Id"] == job["id"]  # the same on each retry
    payload = json.loads(accepted.body)
    assert payload["id"] == job["id"] and payload["status"] == "succeeded" and payload["seed"] == 9
    assert payload["result_url"].startswith(proxy.url + "/v1/images/img_")
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
    # A body altered in transit fails the check.
    tampered = Delivery(accepted.headers, accepted.body.replace(b"succeeded", b"failed"), accepted.at)
    with pytest.raises(AssertionError):
        _check_signature(tampered)
    time.sleep(0.5)
    assert len(receiver.deliveries) == 2  # accepted: not sent again


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://10.0.0.7/hook",
        "http://[::1]:9/hook",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_a_private_webhook_target_is_refused_when_the_job_is_created(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, url: str
) -> None:
    proxy = start_proxy(webhook_secret=SECRET)
    with proxy.client() as client:
        refused = client.post("/v1/jobs", json={"prompt": "a fox", "webhook_url": url})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "validation_error"
    assert "webhook_url" in error["message"] and "SDPROXY_WEBHOOK_ALLOW_PRIVATE" in error["message"]
    assert not [r for r in upstream.requests if r.method == "POST"]  # nothing generated


def test_webhooks_need_a_secret_and_an_http_url(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    with start_proxy().client() as client:
        off = client.post("/v1/jobs", json={"prompt": "a fox", "webhook_url": "https://example.com/h"})
    with start_proxy(webhook_secret=SECRET).client() as client:
        ftp = client.post("/v1/jobs", json={"prompt": "a fox", "webhook_url": "ftp://example.com/h"})
    assert off.status_code == ftp.status_code == 422
    assert "SDPROXY_WEBHOOK_SECRET" in off.json()["error"]["message"]
    assert "http(s)" in ftp.json()["error"]["message"]


def test_a_failed_job_is_delivered_too_and_a_4xx_is_not_retried(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, receiver: Receiver
) -> None:
    upstream.default = Reply.error(400, "width must be 512")
    receiver.failures = 10**6  # every delivery fails...
    receiver.status = 410  # ...with a refusal
    proxy = start_proxy(webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff_s=0.1)
    with proxy.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "a fox", "webhook_url": receiver.url}).json()
        (delivery,) = receiver.wait(1)
        time.sleep(0.5)
    payload = json.loads(delivery.body)
    _check_signature(delivery)
    assert payload["id"] == job["id"] and payload["status"] == "failed"
    assert payload["error"]["code"] == "upstream_rejected" and payload["result_url"] is None
    assert len(receiver.deliveries) == 1  # 410: the receiver refused it, not tried again


PUBLIC = "93.184.216.34"  # global to `ipaddress` (203.0.113.x, TEST-NET, is not)


class FakeResolver:
    """The running loop's `getaddrinfo`, which the check and httpx's connect (through anyio) both
    use, for names under `.test`: answers `answers` in turn (the last one again after), counting
    lookups; another name goes to the real resolver."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *answers: str) -> None:
        self.real = loop.getaddrinfo
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)  # anyio passes IDNA bytes
        if not name.endswith(".test"):
            return await self.real(host, port, *args, **kwargs)
        self.lookups.append(name)
        address = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))]


def _sender(monkeypatch: pytest.MonkeyPatch, *answers: str) -> tuple[WebhookSender, FakeResolver]:
    loop = asyncio.get_running_loop()
    resolver = FakeResolver(loop, *answers)
    monkeypatch.setattr(loop, "getaddrinfo", resolver)
    monkeypatch.setattr(webhooks, "DELIVERY_TIMEOUT_S", 2.0)
    return WebhookSender(SECRET, allow_private=False, max_attempts=1, backoff_s=0.01), resolver


async def test_a_name_rebound_to_loopback_after_the_check_does_not_reach_it(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    receiver.failures = 0
    port = urlsplit(receiver.url).port
    sender, resolver = _sender(monkeypatch, PUBLIC, "127.0.0.1")  # public at the check, then not
    try:
        delivered = await sender.deliver(f"http://hooks.rebind.test:{port}/hooks/sdproxy", "job_1", {"a": 1})
    finally:
        await sender.aclose()
    # The connect went to the checked public address (refused or unreachable here), not to a
    # second lookup's 127.0.0.1, where the receiver listens.
    assert not receiver.deliveries
    assert not delivered and sender.failed == 1
    assert resolver.lookups == ["hooks.rebind.test"]  # one lookup: the one that was checked


async def test_a_delivery_goes_to_the_checked_address_with_the_original_host_header(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    receiver.failures = 0
    port = urlsplit(receiver.url).port
    # The check passes 127.0.0.1 here (as if it were public); a second lookup would give TEST-NET.
    monkeypatch.setattr(webhooks, "_is_public", lambda address: address == "127.0.0.1")
    sender, resolver = _sender(monkeypatch, "127.0.0.1", "192.0.2.1")
    try:
        delivered = await sender.deliver(f"http://Hooks.Example.test:{port}/hooks/sdproxy", "job_2", {"a": 2})
    finally:
        await sender.aclose()
    assert delivered and sender.delivered == 1
    (delivery,) = receiver.deliveries
    assert delivery.headers["Host"] == f"hooks.example.test:{port}"
    assert delivery.headers["Sdproxy-Webhook-Id"] == "job_2" and json.loads(delivery.body) == {"a": 2}
    _check_signature(delivery)
    assert resolver.lookups == ["hooks.example.test"]


async def test_check_target_returns_what_it_checked_and_resolves_nothing_when_private_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolver = FakeResolver(asyncio.get_running_loop(), PUBLIC)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolver)
    assert await check_target("http://hooks.example.test/h", allow_private=True) == []
    assert resolver.lookups == []  # allowed: sent to the name, as before
    assert await check_target("http://hooks.example.test/h", allow_private=False) == [PUBLIC]
    assert resolver.lookups == ["hooks.example.test"]


SNI = "sni_hostname"


@pytest.mark.parametrize(
    ("url", "address", "sent_to", "host", "extensions"),
    [
        (
            "https://Hooks.Example.com/h?x=1",
            "2606:4700::6810:85e5",
            "https://[2606:4700::6810:85e5]/h?x=1",
            "hooks.example.com",
            {SNI: "hooks.example.com"},
        ),
        (
            "https://hooks.example.com:443/h",
            PUBLIC,
            f"https://{PUBLIC}/h",
            "hooks.example.com",
            {SNI: "hooks.example.com"},
        ),
        (
            "https://hooks.example.com:8443/h",
            PUBLIC,
            f"https://{PUBLIC}:8443/h",
            "hooks.example.com:8443",
            {SNI: "hooks.example.com"},
        ),
        ("http://hooks.example.com:8080/h", PUBLIC, f"http://{PUBLIC}:8080/h", "hooks.example.com:8080", {}),
        ("http://hooks.example.com:80/h", PUBLIC, f"http://{PUBLIC}/h", "hooks.example.com", {}),
        (
            "https://bücher.example/h",
            PUBLIC,
            f"https://{PUBLIC}/h",
            "xn--bcher-kva.example",
            {SNI: "xn--bcher-kva.example"},
        ),
        ("http://[2606:4700::1]:9/h", "2606:4700::1", "http://[2606:4700::1]:9/h", "[2606:4700::1]:9", {}),
    ],
)
def test_the_pinned_request_keeps_the_name_for_host_and_tls(
    url: str, address: str, sent_to: str, host: str, extensions: dict[str, str]
) -> None:
    """An IPv6 address goes in brackets; `Host` keeps a port that is not the default; https keeps
    the (IDNA) name for SNI and the certificate check."""
    assert _pinned_request(url, address) == (httpx.URL(sent_to), host, extensions)
