"""Job webhooks delivered to a real receiver on 127.0.0.1: signed (checked here with `hmac`, not
with the proxy's code), retried after a failure, and refused for private targets unless allowed."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from proxy_harness import RunningProxy

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
